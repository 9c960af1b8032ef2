"""Large GCS uploads survive a dropped connection (issue 11, item 3): a resumable upload whose
request breaks asks the session how many bytes it kept and goes on from there, reading only the
lost range again from the source (``open_read(start=)``, pinned to the same version), rather than
starting the whole object again. The finalising request's lost answer is asked of the session too.

Against gcp-storage-emulator through ``SessionProxy`` (below), which cuts chosen requests to the
upload session. The emulator keeps the bytes of a request body that ended early (an EOF mid-body),
as GCS keeps what it persisted, and answers ``bytes */size`` with 308 and their Range. Where it
differs from GCS the proxy answers as GCS does, and says so: a status query of a finalised session
(emulator 404, GCS 200 with the object). fake-gcs-server does worse here: it finalises an empty
object on a status query.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import socket
import struct
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw

MiB = 1024 * 1024
KiB = 1024
Q = tw.GCS_QUANTUM

pytestmark = pytest.mark.timeout(120)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- a proxy in front of the emulator that cuts requests to upload sessions ----------------------


@dataclass
class Seen:
    """One request the proxy received: its method, Content-Range and body bytes forwarded."""

    method: str
    path: str
    content_range: str
    forwarded: int
    range: str = ""  # the Range header of a read

    @property
    def kind(self) -> str:
        """create (POST of a session), status (``bytes */N``), stream (``/*``), final, other."""
        if self.method == "POST" and "uploadType=resumable" in self.path:
            return "create"
        if self.method != "PUT" or "upload_id=" not in self.path:
            return "other"
        if self.content_range.startswith("bytes */"):
            return "status"
        return "stream" if self.content_range.endswith("/*") else "final"


# What to do with the n-th (from 1) request of a kind: forward only that many body bytes then
# break the connection (None: forward it whole); the same after taking the whole body from the
# client ("whole", n: the client has handed over everything when the cut shows); "lose" the
# answer (forward whole, then reset); or "throttle" (answer 429 itself; nothing reaches the server).
Rule = Callable[[int], "int | str | tuple[str, int] | None"]


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dropped connection looks to the client."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class SessionProxy:
    """Forwards HTTP to ``upstream``; the ``rules`` (by request kind) break chosen requests. A cut
    sends the first bytes of the body upstream and then ends it (EOF), so the server keeps those,
    and resets the client's connection. Records every request in ``seen``."""

    upstream: str
    rules: dict[str, Rule] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    finalised: dict[str, bytes] = field(default_factory=dict)  # upload_id -> object resource

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of(self, kind: str) -> list[Seen]:
        with self.lock:
            return [seen for seen in self.seen if seen.kind == kind]

    def _decide(self, seen: Seen) -> int | str | None:
        with self.lock:
            self.seen.append(seen)
            n = sum(s.kind == seen.kind for s in self.seen)
        rule = self.rules.get(seen.kind)
        return rule(n) if rule else None

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                # A small receive buffer: what the client hands over before a cut shows is
                # bounded, not up to the 32 MiB that Linux autotuning may allow.
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * KiB)
                super().setup()

            def finish(self) -> None:
                with contextlib.suppress(OSError):
                    super().finish()

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(self.command, self.path, self.headers.get("Content-Range", ""), 0)
                seen.range = self.headers.get("Range", "")
                action = proxy._decide(seen)
                upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get(
                    "upload_id", [""]
                )[0]
                if seen.kind == "status" and upload_id in proxy.finalised:
                    self._answer(200, proxy.finalised[upload_id])  # GCS; the emulator says 404
                    return
                if action == "throttle":
                    self.rfile.read(length)
                    self._answer(429, b'{"error": {"code": 429, "message": "slow down"}}')
                    return
                whole = isinstance(action, tuple)
                cut = action[1] if isinstance(action, tuple) else action
                cut = cut if isinstance(cut, int) else None
                wanted = length if cut is None or whole else min(cut, length)
                body = self.rfile.read(wanted)  # short if the client gave up: end early too
                body = body[:cut] if whole else body
                seen.forwarded = len(body)
                ended_early = cut is not None or len(body) < wanted
                status, headers, payload = self._forward(body, ended_early=ended_early)
                if seen.kind == "final" and status in (200, 201):
                    proxy.finalised[upload_id] = payload
                if cut is not None or action == "lose":
                    self.close_connection = True
                    _reset(self.connection)
                    return
                self._answer(status, payload, headers)

            def _forward(self, body: bytes, *, ended_early: bool) -> tuple[int, Any, bytes]:
                up = urllib.parse.urlsplit(proxy.upstream)
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                try:
                    conn.putrequest(
                        self.command, self.path, skip_host=True, skip_accept_encoding=True
                    )
                    for name, value in self.headers.items():
                        if name.lower() not in ("connection", "accept-encoding"):
                            conn.putheader(name, value)
                    conn.endheaders(body)
                    if ended_early:  # the server reads to EOF and keeps what came
                        assert conn.sock is not None
                        conn.sock.shutdown(socket.SHUT_WR)
                    response = conn.getresponse()
                    return response.status, response.getheaders(), response.read()
                finally:
                    conn.close()

            def _answer(self, status: int, payload: bytes, headers: Any = ()) -> None:
                self.send_response(status)
                head = self.command == "HEAD"  # keeps the upstream Content-Length: the size
                skip = {"transfer-encoding", "connection", "date", "server"}
                for name, value in headers:
                    if name.lower() not in skip | (set() if head else {"content-length"}):
                        self.send_header(name, value)
                if not headers:
                    self.send_header("Content-Type", "application/json")
                if not head:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if not head:
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _any

        return Handler


# -- a source that counts what is read from it ----------------------------------------------------


@dataclass
class Read:
    start: int
    while_reading: bool  # opened while another read of the source was still open
    size: int = 0


class CountingSource:
    """A real store (local or S3), recording each open_read(): where it started, how much it
    gave."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.late_metadata_limit = inner.late_metadata_limit
        self.reads: list[Read] = []
        self.open_now = 0

    def head(self, ref: tw.ObjectRef) -> tw.ObjectInfo | None:
        return self.inner.head(ref)

    @contextlib.contextmanager
    def open_read(
        self, ref: tw.ObjectRef, info: tw.ObjectInfo, *, start: int = 0
    ) -> Iterator[Iterator[bytes]]:
        read = Read(start, while_reading=self.open_now > 0)
        self.reads.append(read)
        self.open_now += 1
        try:
            opened = self.inner.open_read(ref, info, start=start) if start else None
            with opened or self.inner.open_read(ref, info) as chunks:
                yield self._counted(chunks, read)
        finally:
            self.open_now -= 1

    @staticmethod
    def _counted(chunks: Iterator[bytes], read: Read) -> Iterator[bytes]:
        for chunk in chunks:
            read.size += len(chunk)
            yield chunk


# -- the setting: local source -> GCS destination through the proxy -------------------------------


@dataclass
class Setting:
    source: CountingSource
    engine: tw.TransferEngine
    proxy: SessionProxy
    bucket: Any  # the destination bucket, read directly on the emulator
    put: Callable[[str, bytes], None]  # a source object into bucket "src"

    def event(self, key: str, data: bytes) -> tw.TransferEvent:
        self.put(key, data)
        document = {
            "schemaVersion": "1.0.0",
            "eventId": str(uuid.uuid4()),
            "correlationId": str(uuid.uuid4()),
            "timestamp": "2026-06-01T00:00:00Z",
            "source": {"provider": "aws_s3", "bucket": "src", "key": key},
            "destination": {"provider": "gcp_gcs", "bucket": self.bucket.name, "key": key},
            "metadata": {"checksumSHA256": sha(data)},  # no hashing pass: one read to count
        }
        return tw.parse_event(json.dumps(document).encode(), tw.load_validator())

    def stored(self, key: str) -> tuple[bytes, dict[str, str]]:
        blob = self.bucket.get_blob(key)
        assert blob is not None, f"{key} was not written"
        return bytes(blob.download_as_bytes()), dict(blob.metadata or {})


def local_source(root: Path) -> tuple[Any, Callable[[str, bytes], None]]:
    def put(key: str, data: bytes) -> None:
        path = root / "aws_s3" / "src" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return tw.LocalObjectStore(root, "aws_s3", chunk_size=256 * KiB), put


def s3_source() -> tuple[Any, Callable[[str, bytes], None]]:
    """moto's S3, with a bucket named "src" of this test's own (the server is shared)."""
    import boto3

    bucket = f"src-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    store = tw.S3Store(chunk_size=256 * KiB, clients=tw.AwsClients(pool=4))

    def put(key: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=data)

    return _RenamedBucket(store, bucket), put


class _RenamedBucket:
    """A store whose bucket "src" is ``bucket``: events name "src" whatever the source."""

    def __init__(self, inner: Any, bucket: str) -> None:
        self.inner, self.bucket = inner, bucket
        self.late_metadata_limit = inner.late_metadata_limit

    def _ref(self, ref: tw.ObjectRef) -> tw.ObjectRef:
        return tw.ObjectRef(ref.provider, self.bucket, ref.key, ref.region)

    def head(self, ref: tw.ObjectRef) -> tw.ObjectInfo | None:
        return self.inner.head(self._ref(ref))

    def open_read(self, ref: tw.ObjectRef, info: tw.ObjectInfo, **start: int) -> Any:
        return self.inner.open_read(self._ref(ref), info, **start)


@pytest.fixture(params=["local"])
def setting(
    request: pytest.FixtureRequest, gcs_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Setting]:
    from google.cloud import storage

    if request.param == "aws_s3":
        request.getfixturevalue("aws_env")
    store, put = s3_source() if request.param == "aws_s3" else local_source(tmp_path)
    bucket = storage.Client().create_bucket(f"resume-{uuid.uuid4().hex[:10]}")
    proxy = SessionProxy(gcs_env)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    source = CountingSource(store)
    destination = tw.GCSStore(part_size=MiB)  # above 1 MiB: a resumable upload
    engine = tw.TransferEngine({"aws_s3": source, "gcp_gcs": destination})  # type: ignore[dict-item]
    try:
        yield Setting(source, engine, proxy, bucket, put)
    finally:
        proxy.close()


class RecordingLog:
    """Stands in for the attempt's logger (ATTEMPT_LOG): keeps what was logged."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def warning(self, message: str, **fields: Any) -> None:
        self.lines.append({"message": message, **fields})


def ranges(seen: list[Seen]) -> list[str]:
    return [s.content_range for s in seen]


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "action"),
    [
        (3 * MiB + 1000, ("whole", 5 * Q)),  # all was handed over: resumed at commit
        (24 * MiB + 1000, 4 * MiB + 12345),  # resumed while the source is still read
    ],
    ids=["at-commit", "mid-stream"],
)
@pytest.mark.parametrize("setting", ["local", "aws_s3"], indirect=True)
def test_a_streamed_request_cut_mid_body_resumes_from_what_the_session_kept(
    setting: Setting, size: int, action: int | tuple[str, int]
) -> None:
    """The first streamed request breaks after ``cut`` bytes, which the session keeps. The next
    request starts there; the source is read again from there only (same version), not from byte
    0; the object arrives whole with its SHA-256, in the same attempt and session."""
    data = os.urandom(size)
    streamed = (size - 1) // Q * Q
    cut = action[1] if isinstance(action, tuple) else action
    setting.proxy.rules["stream"] = lambda n: action if n == 1 else None

    result = setting.engine.transfer(setting.event("big.bin", data))

    assert result.outcome == "success"
    stored, metadata = setting.stored("big.bin")
    assert stored == data
    assert metadata[tw.META_SHA256] == sha(data)
    proxy = setting.proxy
    assert len(proxy.of("create")) == 1  # one session: the object did not start again
    assert ranges(proxy.of("stream")) == [
        f"bytes 0-{streamed - 1}/*",
        f"bytes {cut}-{streamed - 1}/*",
    ]
    assert proxy.of("stream")[1].forwarded == streamed - cut
    assert ranges(proxy.of("status")) == [f"bytes */{size}"]
    assert ranges(proxy.of("final")) == [f"bytes {streamed}-{size - 1}/{size}"]
    first, again = setting.source.reads
    assert (first.start, first.size) == (0, size)
    assert again.start == cut  # not from byte 0
    assert 0 < again.size <= streamed - cut
    # At commit, the lost range is read again after the first read ended; mid-stream, while it
    # is still open, which then goes on (the sockets buffer far less than 24 MiB).
    assert again.while_reading == (size > 8 * MiB)
    if again.while_reading:
        assert again.size < streamed - cut


def test_a_stream_cut_every_time_fails_the_attempt_after_the_bound_and_the_next_starts_fresh(
    setting: Setting,
) -> None:
    """Each streamed request breaks after one more 256 KiB: after GCS_RESUMES resumptions the
    attempt fails, retryably (the worker's retry then backs off); the next attempt opens a new
    session and sends from byte 0."""
    size = 3 * MiB + 1000
    data = os.urandom(size)
    kept = [Q * n for n in range(1, tw.GCS_RESUMES + 2)]
    setting.proxy.rules["stream"] = lambda n: Q if n <= len(kept) else None
    event = setting.event("flaky.bin", data)

    log = RecordingLog()
    token = tw.ATTEMPT_LOG.set(log)
    try:
        with pytest.raises(tw.RetryableError) as failed:
            setting.engine.transfer(event)
    finally:
        tw.ATTEMPT_LOG.reset(token)
    assert type(failed.value) is tw.RetryableError  # the failure itself, not a ResumeFrom
    assert failed.value.reason == "network"
    assert [(line["request_attempt"], line["resume_at_byte"]) for line in log.lines] == [
        (n, offset) for n, offset in enumerate(kept[:-1], start=1)
    ]  # each resumption is logged with the attempt's event, where it resumed
    streams = setting.proxy.of("stream")
    assert [s.content_range.split("-")[0] for s in streams] == ["bytes 0"] + [
        f"bytes {offset}" for offset in kept[:-1]
    ]
    assert len(setting.proxy.of("status")) == tw.GCS_RESUMES
    assert setting.bucket.get_blob("flaky.bin") is None

    result = setting.engine.transfer(event)
    assert result.outcome == "success"
    assert setting.stored("flaky.bin")[0] == data
    assert len(setting.proxy.of("create")) == 2
    assert setting.proxy.of("stream")[-1].content_range.startswith("bytes 0-")


def test_a_resumption_the_session_refuses_fails_the_attempt_and_the_next_starts_fresh(
    setting: Setting,
) -> None:
    """A session that says it holds bytes it does not (gcp-storage-emulator answers
    ``bytes=0-0``, one byte, for none; GCS sends no Range) refuses the resumed request: asking
    again would repeat the mistake, so the attempt fails retryably, not dead-lettered as a 400,
    and the next attempt opens a new session."""
    size = 2 * MiB + 5000
    data = os.urandom(size)
    setting.proxy.rules["stream"] = lambda n: "throttle" if n == 1 else None
    event = setting.event("refused.bin", data)

    with pytest.raises(tw.RetryableError) as failed:
        setting.engine.transfer(event)
    assert failed.value.reason == "conflict"
    assert "resumed at byte 1" in str(failed.value)
    assert [s.content_range.split("-")[0] for s in setting.proxy.of("stream")] == [
        "bytes 0",
        "bytes 1",
    ]
    assert len(setting.proxy.of("status")) == 1

    assert setting.engine.transfer(event).outcome == "success"
    assert setting.stored("refused.bin")[0] == data
    assert len(setting.proxy.of("create")) == 2


def test_a_lost_answer_to_the_finalising_request_asks_the_session_and_is_done(
    setting: Setting,
) -> None:
    """The finalising request reaches GCS, but its answer is lost: the session says the object
    is complete (200 with it), so the commit is done; nothing is sent or read again."""
    size = 2 * MiB + 5000
    data = os.urandom(size)
    setting.proxy.rules["final"] = lambda n: "lose" if n == 1 else None

    result = setting.engine.transfer(setting.event("final.bin", data))

    assert result.outcome == "success"
    stored, metadata = setting.stored("final.bin")
    assert (stored, metadata[tw.META_SHA256]) == (data, sha(data))
    assert len(setting.proxy.of("final")) == 1
    assert len(setting.proxy.of("status")) == 1
    assert len(setting.proxy.of("create")) == 1
    assert [read.start for read in setting.source.reads] == [0]


def test_a_finalising_request_cut_mid_body_sends_the_rest_of_the_tail_from_memory(
    setting: Setting,
) -> None:
    """The finalising request breaks after 50,000 of its bytes, which the session keeps: the rest
    of the held tail goes again from memory, with the CRC32C of the whole object; the source is
    not read again."""
    size = 3 * MiB + 200_000
    streamed = 3 * MiB
    data = os.urandom(size)
    setting.proxy.rules["final"] = lambda n: 50_000 if n == 1 else None

    result = setting.engine.transfer(setting.event("tail.bin", data))

    assert result.outcome == "success"
    assert setting.stored("tail.bin")[0] == data
    assert ranges(setting.proxy.of("final")) == [
        f"bytes {streamed}-{size - 1}/{size}",
        f"bytes {streamed + 50_000}-{size - 1}/{size}",
    ]
    assert [read.start for read in setting.source.reads] == [0]


# -- open_read from an offset, for each store -----------------------------------------------------


def test_a_local_read_from_an_offset(tmp_path: Path) -> None:
    store = tw.LocalObjectStore(tmp_path, "aws_s3", chunk_size=100_000)
    data = os.urandom(350_000)
    (tmp_path / "aws_s3" / "b").mkdir(parents=True)
    (tmp_path / "aws_s3" / "b" / "k").write_bytes(data)
    ref = tw.ObjectRef("aws_s3", "b", "k")
    info = store.head(ref)
    assert info is not None
    with store.open_read(ref, info, start=123_457) as chunks:
        assert b"".join(chunks) == data[123_457:]


def test_an_s3_read_from_an_offset_asks_for_that_range(aws_env: str) -> None:
    import boto3

    bucket, data = f"resume-{uuid.uuid4().hex[:10]}", os.urandom(3 * MiB + 11)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    proxy = SessionProxy(aws_env)
    try:
        store = tw.S3Store(clients=tw.AwsClients(pool=4, endpoint_url=proxy.url))
        ref = tw.ObjectRef("aws_s3", bucket, "k")
        info = store.head(ref)
        assert info is not None
        with store.open_read(ref, info, start=MiB + 5) as chunks:
            assert b"".join(chunks) == data[MiB + 5 :]
        gets = [s.range for s in proxy.seen if s.method == "GET"]
    finally:
        proxy.close()
    assert gets == [f"bytes={MiB + 5}-"]


def test_a_gcs_read_from_an_offset_reads_ranges_from_there(
    gcs_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.cloud import storage

    bucket = storage.Client().create_bucket(f"resume-{uuid.uuid4().hex[:10]}")
    data = os.urandom(3 * MiB + 11)
    bucket.blob("k").upload_from_string(data)
    proxy = SessionProxy(gcs_env)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        store = tw.GCSStore(part_size=MiB)
        ref = tw.ObjectRef("gcp_gcs", bucket.name, "k")
        info = store.head(ref)
        assert info is not None
        with store.open_read(ref, info, start=2 * MiB + 7) as chunks:
            assert b"".join(chunks) == data[2 * MiB + 7 :]
        media = [s.range for s in proxy.seen if s.method == "GET" and "alt=media" in s.path]
    finally:
        proxy.close()
    start = 2 * MiB + 7  # ranges of one chunk from there, none before it
    assert media == [f"bytes={start}-{start + MiB - 1}", f"bytes={start + MiB}-{3 * MiB + 10}"]
