"""Bounded resources whatever an event (or a client) says: cached SDK clients, HTTP handler
threads, S3 part bookkeeping, the hashing pre-pass, the bucket allowlist in cloud mode, a
destination's event time, and the multipart uploads one delivery may abort."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import gc
import hashlib
import json
import os
import socket
import threading
import time
import urllib.request
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from conftest import Clock

MiB = 1024 * 1024
VALIDATOR = tw.load_validator()

pytestmark = pytest.mark.timeout(120)


def event(
    *,
    src: tuple[str, str, str] = ("aws_s3", "source-bucket", "in/data.bin"),
    dst: tuple[str, str, str] = ("gcp_gcs", "dest-bucket", "out/data.bin"),
    timestamp: str = "2024-06-01T00:00:00Z",
) -> tw.TransferEvent:
    doc = {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": timestamp,
        "source": dict(zip(("provider", "bucket", "key"), src, strict=True)),
        "destination": dict(zip(("provider", "bucket", "key"), dst, strict=True)),
        "metadata": {"priority": "normal", "maxRetries": 3},
    }
    return tw.parse_event(json.dumps(doc).encode(), VALIDATOR)


def put_source(root: Path, provider: str, bucket: str, key: str, data: bytes) -> None:
    path = root / provider / bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def stores(root: Path) -> dict[str, tw.LocalObjectStore]:
    return {p: tw.LocalObjectStore(root, p, chunk_size=64 * 1024) for p in tw.PROVIDERS}


# -- 1. one boto3 client per (service, region), but not for ever --------------------------------


def offline_session() -> Any:
    import boto3

    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )


def test_clients_for_many_regions_are_not_all_kept():
    """300 regions named by events cost 106 MiB when every client was kept: past the cache's
    size the least recently used client is dropped and freed."""
    clients = tw.AwsClients(pool=2, session=offline_session())
    first = weakref.ref(clients.get("s3", "region-0"))
    favourite = clients.get("s3", "us-east-1")
    for n in range(1, 3 * tw.AWS_CLIENT_CACHE):
        clients.get("s3", f"region-{n}")
        assert clients.get("s3", "us-east-1") is favourite  # recently used: kept
    gc.collect()
    assert first() is None, "a client no transfer holds any more is still alive"


def test_an_evicted_client_keeps_working_for_whoever_holds_it(aws_env: str):
    clients = tw.AwsClients(pool=2, size=2)
    held = clients.get("s3", "us-east-1")  # what a running S3Upload holds
    for region in ("eu-west-1", "eu-west-2", "eu-west-3"):
        clients.get("s3", region)
    assert clients.get("s3", "us-east-1") is not held  # it was evicted: a new one is built
    bucket = f"lru-{uuid.uuid4().hex[:10]}"
    held.create_bucket(Bucket=bucket)
    held.put_object(Bucket=bucket, Key="k", Body=b"still works")
    assert held.get_object(Bucket=bucket, Key="k")["Body"].read() == b"still works"


# -- 2. HTTP: a fixed number of handler threads ---------------------------------------------------


def get(port: int, path: str, timeout: float) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return response.read()


def test_idle_and_slow_connections_neither_take_threads_nor_block_health():
    before = threading.active_count()
    app = tw.make_wsgi_app(tw.Metrics(), tw.Readiness({}))
    server, thread = tw.start_http_server(app, 0, threads=3, timeout=2.0)
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        for sock in slow:  # a head that never ends: read as it comes, by no handler thread
            sock.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        assert get(port, "/health", timeout=5) == b"ok\n"
        assert time.monotonic() - started < 2.0  # within the socket timeout, not after it
        assert threading.active_count() - before <= 1 + 3  # the server loop and its handlers
    finally:
        for sock in idle + slow:
            sock.close()
        server.shutdown()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_request_head_not_complete_in_time_is_closed():
    app = tw.make_wsgi_app(tw.Metrics(), tw.Readiness({}))
    server, thread = tw.start_http_server(app, 0, threads=1, timeout=0.5)
    port = server.server_address[1]
    try:
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        assert idle.recv(16) == b""  # closed by the server, well before our 5 s
        assert slow.recv(16) == b""
        assert get(port, "/health", timeout=5) == b"ok\n"
    finally:
        server.shutdown()
        thread.join(timeout=5)


# -- 3. S3 part bookkeeping is linear -------------------------------------------------------------


class FakeS3:
    """Stands in for a boto3 S3 client at the Python level: keeps multipart uploads in memory
    with the times S3 reports (Initiated, each part's LastModified, from ``now``), and records
    every call; ``fail_part`` makes that part number fail."""

    def __init__(self, fail_part: int | None = None, now: Any = time.time) -> None:
        self.calls: list[str] = []
        self.uploads: dict[str, dict[str, Any]] = {}  # id -> key, initiated, parts
        self.completed: dict[str, bytes] = {}
        self.fail_part, self.now = fail_part, now
        self.lock = threading.Lock()

    def _record(self, name: str) -> None:
        with self.lock:
            self.calls.append(name)

    def _time(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.now(), dt.UTC)

    def create_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        self._record("create_multipart_upload")
        upload_id = uuid.uuid4().hex
        self.uploads[upload_id] = {"key": kwargs["Key"], "initiated": self._time(), "parts": {}}
        return {"UploadId": upload_id}

    def upload_part(self, **kwargs: Any) -> dict[str, Any]:
        self._record("upload_part")
        if kwargs["PartNumber"] == self.fail_part:
            raise tw.PermanentError("part refused", reason="access_denied")
        data = bytes(kwargs["Body"])
        with self.lock:
            parts = self.uploads[kwargs["UploadId"]]["parts"]
            parts[kwargs["PartNumber"]] = (data, self._time())
        return {"ETag": hashlib.md5(data, usedforsecurity=False).hexdigest()}

    def complete_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        self._record("complete_multipart_upload")
        parts = self.uploads.pop(kwargs["UploadId"])["parts"]
        numbers = [p["PartNumber"] for p in kwargs["MultipartUpload"]["Parts"]]
        self.completed[kwargs["Key"]] = b"".join(parts[n][0] for n in numbers)
        return {}

    def abort_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        self._record("abort_multipart_upload")
        del self.uploads[kwargs["UploadId"]]
        return {}

    def get_paginator(self, name: str) -> Any:
        self._record(name)
        return FakePages(getattr(self, f"_{name}_page"))

    def _list_multipart_uploads_page(self, **kwargs: Any) -> dict[str, Any]:
        return {
            "Uploads": [
                {"Key": u["key"], "UploadId": upload_id, "Initiated": u["initiated"]}
                for upload_id, u in self.uploads.items()
                if u["key"].startswith(kwargs["Prefix"])
            ]
        }

    def _list_parts_page(self, **kwargs: Any) -> dict[str, Any]:
        parts = self.uploads[kwargs["UploadId"]]["parts"]
        return {"Parts": [{"PartNumber": n, "LastModified": t} for n, (_, t) in parts.items()]}


class FakePages:
    """A paginator of one page."""

    def __init__(self, page: Any) -> None:
        self.page = page

    def paginate(self, **kwargs: Any) -> list[dict[str, Any]]:
        return [self.page(**kwargs)]


class FakeClients:
    """What S3Store asks for its clients: always the one fake."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def get(self, service: str, region: str | None = None) -> Any:
        return self.client


class CountedInspections:
    """Counts Future.done(), .exception() and .cancelled() calls; far past ``limit`` it fails
    at once, so quadratic bookkeeping fails the test quickly instead of running for minutes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
        self.count, self.limit = 0, limit
        for name in ("done", "exception", "cancelled"):
            original = getattr(concurrent.futures.Future, name)
            monkeypatch.setattr(concurrent.futures.Future, name, self._counted(original))

    def _counted(self, original: Any) -> Any:
        def inspect(future: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            if self.count > 10 * self.limit:
                raise AssertionError(f"over {10 * self.limit} future inspections")
            return original(future, *args, **kwargs)

        return inspect


def tiny_part_upload(client: FakeS3, parts: int, part_size: int = 16) -> tw.S3Upload:
    store = tw.S3Store(part_size=part_size, clients=FakeClients(client))  # type: ignore[arg-type]
    ref = tw.ObjectRef("aws_s3", "bucket", "big/object")
    upload = store.open_write(ref, size=parts * part_size, content_type="x/y", metadata={})
    # Real parts are at least 1 MiB; 16 bytes keep 10,000 of them cheap. Nothing is allocated
    # yet, so every part buffer has this size.
    upload.part_size = part_size
    return upload


def test_ten_thousand_parts_cost_linear_bookkeeping(monkeypatch: pytest.MonkeyPatch):
    parts = 10_000
    client = FakeS3()
    upload = tiny_part_upload(client, parts)
    counted = CountedInspections(monkeypatch, limit=parts)
    data = bytes(range(256)) * (parts * 16 // 256)
    for offset in range(0, len(data), 4096):
        upload.write(data[offset : offset + 4096])
    upload.commit({})
    assert client.completed["big/object"] == data
    assert client.calls.count("upload_part") == parts
    # a constant per part: the part's own done-callback, and tenacity's attempt (a Future too)
    # around each UploadPart; quadratic bookkeeping was 5,000 inspections per part on average
    assert counted.count <= 6 * parts, f"{counted.count} future inspections for {parts} parts"


def test_a_failed_part_still_stops_the_upload_at_the_next_part():
    client = FakeS3(fail_part=3)
    upload = tiny_part_upload(client, parts=500)
    with pytest.raises(tw.PermanentError, match="part refused"):
        for _ in range(500):  # a full window waits for a buffer, which part 3 gives back
            upload.write(b"p" * 16)
    upload.abort()
    assert client.calls.count("upload_part") < 500
    assert "complete_multipart_upload" not in client.calls
    assert client.calls[-1] == "abort_multipart_upload"


# -- 4. the hashing pre-pass stops at a drain -----------------------------------------------------


class CountingSource(tw.LocalObjectStore):
    """A local store that counts the chunks it hands out."""

    chunks_read = 0

    def _chunks(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        for chunk in super()._chunks(*args, **kwargs):
            CountingSource.chunks_read += 1
            yield chunk


class FixedMetadataDestination(tw.LocalObjectStore):
    """Like S3 multipart: metadata is fixed at upload start, so the engine hashes first."""

    late_metadata_limit = 10
    uploads_opened = 0

    def open_write(self, ref, **kwargs):  # type: ignore[no-untyped-def]
        FixedMetadataDestination.uploads_opened += 1
        return super().open_write(ref, **kwargs)


def test_a_drain_stops_the_hashing_pass_at_the_next_chunk(root: Path):
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"x" * (40 * 64 * 1024))
    stores = {
        "aws_s3": CountingSource(root, "aws_s3", chunk_size=64 * 1024),
        "gcp_gcs": FixedMetadataDestination(root, "gcp_gcs", chunk_size=64 * 1024),
    }
    CountingSource.chunks_read = FixedMetadataDestination.uploads_opened = 0
    handed_back = threading.Event()
    handed_back.set()  # the drain already handed the message back

    def on_progress(n: int) -> None:  # what Worker passes: _stop_if_handed_back
        if handed_back.is_set():
            raise tw.ShutdownRequested()

    with pytest.raises(tw.ShutdownRequested):
        tw.TransferEngine(stores).transfer(event(), on_progress=on_progress)
    assert CountingSource.chunks_read == 1  # not the 40 chunks of the whole object
    assert FixedMetadataDestination.uploads_opened == 0


# -- 5. deny by default in cloud mode -------------------------------------------------------------


def test_cloud_mode_without_an_allowlist_refuses_to_start(capsys: pytest.CaptureFixture[str]):
    assert tw.main(["run", "--storage", "cloud", "--http-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--allowed-buckets" in err and "TRANSFER_WORKER_ALLOWED_BUCKETS" in err
    assert "'*'" in err


def test_cloud_mode_allows_every_bucket_only_when_told_so():
    everything = tw.Config(storage="cloud", allowed_buckets="*")
    everything.validate()
    assert everything.allowlist is None
    assert tw.Config().allowlist is None  # local mode: all, as before
    assert tw.Config(storage="cloud").allowlist == frozenset()  # deny, even unvalidated
    with pytest.raises(ValueError, match="--allowed-buckets"):
        tw.Config(allowed_buckets="*, aws_s3:a").validate()


def test_an_unvalidated_cloud_config_forbids_every_bucket(root: Path):
    config = tw.Config(storage="cloud", local_root=str(root), http_port=0)
    queue = tw.LocalQueue(root / "queue.db")
    worker = tw.Worker(config, queue, tw.TransferEngine({}), tw.Metrics(), tw.make_logger())
    with pytest.raises(tw.PermanentError) as caught:
        worker._check_allowed(event())
    assert caught.value.reason == "forbidden"


def test_commands_that_touch_no_bucket_need_no_allowlist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    doc = {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": "2024-06-01T00:00:00Z",
        "source": {"provider": "aws_s3", "bucket": "source-bucket", "key": "k"},
        "destination": {"provider": "gcp_gcs", "bucket": "dest-bucket", "key": "k"},
    }
    (tmp_path / "event.json").write_text(json.dumps(doc))
    monkeypatch.setenv("TRANSFER_WORKER_STORAGE", "cloud")  # validate has no --storage flag
    assert tw.main(["validate", str(tmp_path / "event.json")]) == 0


# -- 6. a destination's event time from the far future is not believed ----------------------------

NOW = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)


def rfc3339(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def engine(stores: dict[str, tw.LocalObjectStore]) -> tw.TransferEngine:
    return tw.TransferEngine(stores, overwrite="always", clock=NOW.timestamp)


def written_at(root: Path, stores: dict[str, tw.LocalObjectStore], moment: dt.datetime) -> None:
    """The destination as written by an event of time ``moment``."""
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"first")
    assert engine(stores).transfer(event(timestamp=rfc3339(moment))).outcome == "success"
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"second")


def test_a_far_future_destination_time_does_not_block_later_events(root: Path, stores):
    written_at(root, stores, NOW + dt.timedelta(seconds=tw.DEFAULT_CLOCK_SKEW + 60))
    result = engine(stores).transfer(event(timestamp=rfc3339(NOW)))
    assert result.outcome == "success"
    assert (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").read_bytes() == b"second"


def test_a_destination_time_within_the_skew_still_wins(root: Path, stores):
    written_at(root, stores, NOW + dt.timedelta(seconds=tw.DEFAULT_CLOCK_SKEW - 60))
    result = engine(stores).transfer(event(timestamp=rfc3339(NOW)))
    assert (result.outcome, result.reason) == ("skipped", "stale_event")
    assert (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").read_bytes() == b"first"


def test_the_clock_skew_is_a_setting():
    args = tw.build_parser().parse_args(["run", "--clock-skew", "30"])
    assert tw.config_from_args(args).clock_skew == 30


# -- S3: abort only the uploads of dead deliveries ------------------------------------------------


def test_only_uploads_idle_past_the_visibility_timeout_are_aborted():
    clock = Clock()
    fake = FakeS3(now=clock)
    key = "out/object"

    def create(at: float, *, part_at: float | None = None, name: str = key) -> str:
        clock.now = at
        upload_id = fake.create_multipart_upload(Key=name)["UploadId"]
        if part_at is not None:
            clock.now = part_at
            fake.upload_part(UploadId=upload_id, PartNumber=1, Body=b"p")
        return upload_id

    young = create(1000.0)  # a redelivery that has just started
    busy = create(0.0, part_at=990.0)  # created long ago, still sending parts
    dead = create(0.0, part_at=600.0)  # its last part was 400 s ago
    other_key = create(0.0, name=key + ".other")
    clock.now = 1000.0
    store = tw.S3Store(clients=FakeClients(fake), stale_after=300, clock=clock)  # type: ignore[arg-type]
    assert store.abort_stale_uploads(tw.ObjectRef("aws_s3", "bucket", key)) == 1
    assert set(fake.uploads) == {young, busy, other_key}
    assert dead not in fake.uploads


class LosingCreates(FakeS3):
    """CreateMultipartUpload whose first answer is lost: botocore sends it again and S3 makes a
    second upload; the caller only ever hears of the second."""

    def create_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        super().create_multipart_upload(**kwargs)  # the upload whose answer was lost
        return super().create_multipart_upload(**kwargs)


def test_a_lost_create_upload_is_aborted_once_it_is_old_not_before():
    """Right after the create, the lost create's upload cannot be told from another live
    delivery's, so it stays; a visibility timeout later, the next transfer of the key or the
    event's retries_exhausted path aborts it."""
    clock = Clock()
    fake = LosingCreates(now=clock)
    store = tw.S3Store(part_size=16, clients=FakeClients(fake), stale_after=300, clock=clock)  # type: ignore[arg-type]
    ref = tw.ObjectRef("aws_s3", "bucket", "out/created-twice")
    upload = store.open_write(ref, size=48, content_type="x/y", metadata={})
    upload.part_size = 16
    upload.write(b"a" * 48)
    upload.commit({})
    assert fake.completed[ref.key] == b"a" * 48
    assert len(fake.uploads) == 1  # the lost create's: young, left alone
    clock.now += 301
    assert store.abort_stale_uploads(ref) == 1  # what retries_exhausted or the next transfer does
    assert fake.uploads == {}


def test_two_live_uploads_of_one_key_do_not_abort_each_other(aws_env: str):
    """Two deliveries of one key (a redelivery after a lapsed lease, or two events) at once, on
    moto: each creates its upload, sends parts in turn and commits; neither aborts the other
    (before, each create aborted the other's upload, on every attempt); the commit that comes
    second is refused by its condition, not by a missing upload. moto reports every upload as
    Initiated 2010-11-10, so a part-less upload looks idle there: each upload has a part at S3
    before the other's create or commit looks (with real Initiated times,
    test_only_uploads_idle_past... covers a part-less one)."""
    import boto3

    from tests.conftest import wait_for

    s3 = boto3.client("s3")
    bucket = f"two-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    store = tw.S3Store(part_size=5 * MiB, clients=tw.AwsClients(pool=8))
    ref = tw.ObjectRef("aws_s3", bucket, "same/key.bin")
    size = 11 * MiB  # parts of 5, 5 and 1 MiB
    first, second = (os.urandom(size) for _ in range(2))

    def parts_at_s3(upload: tw.S3Upload) -> int:
        listed = s3.list_parts(Bucket=bucket, Key=ref.key, UploadId=upload.upload_id)
        return len(listed.get("Parts", []))

    a = store.open_write(ref, size=size, content_type="x/y", metadata={})
    a.write(first[: 5 * MiB])
    wait_for(lambda: parts_at_s3(a) == 1, 30, message="a's first part")
    b = store.open_write(ref, size=size, content_type="x/y", metadata={})
    b.write(second[: 5 * MiB])
    a.write(first[5 * MiB : 10 * MiB])
    b.write(second[5 * MiB : 10 * MiB])
    wait_for(lambda: parts_at_s3(b) == 2, 30, message="b's second part")
    a.write(first[10 * MiB :])
    b.write(second[10 * MiB :])
    a.commit({})
    # Both planned the key absent: b's upload survived a's create and commit (no NoSuchUpload),
    # and its conditional commit is refused because a's object exists now (the engine re-plans).
    with pytest.raises(tw.CommitRefused):
        b.commit({})
    b.abort()
    assert s3.get_object(Bucket=bucket, Key=ref.key)["Body"].read() == first
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


class RacingClient:
    """A real boto3 S3 client whose first ListParts finds its upload just finished by its own
    delivery (aborted here, as a completion would remove it too)."""

    def __init__(self, client: Any) -> None:
        self.client, self.raced = client, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def get_paginator(self, name: str) -> Any:
        paginator = self.client.get_paginator(name)
        if name != "list_parts" or self.raced:
            return paginator
        self.raced = True
        client = self.client

        class Racing:
            def paginate(self, **kwargs: Any) -> Any:
                client.abort_multipart_upload(
                    Bucket=kwargs["Bucket"], Key=kwargs["Key"], UploadId=kwargs["UploadId"]
                )
                return paginator.paginate(**kwargs)

        return Racing()


def test_an_upload_gone_during_the_sweep_does_not_stop_it(aws_env: str):
    import boto3

    s3 = boto3.client("s3")
    bucket = f"race-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    for _ in range(2):  # both idle since "2010" on moto: dead
        s3.create_multipart_upload(Bucket=bucket, Key="k")
    store = tw.S3Store(clients=FakeClients(RacingClient(s3)))  # type: ignore[arg-type]
    assert store.abort_stale_uploads(tw.ObjectRef("aws_s3", bucket, "k")) == 1
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
