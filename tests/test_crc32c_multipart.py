"""S3 multipart destinations: a completion whose answer was lost, and a GCS source verified by its
own CRC32C (read once) instead of a SHA-256 pre-pass.

Interleavings and lost answers come from a relay in front of moto (tests/test_review_commits'
dropping_proxy), so the requests travel on the wire as they would to S3.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import os
import socket
import urllib.parse
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_commits import LARGE, PART, event_for, relayed_store, s3_side

JUN = "2026-06-01T00:00:00Z"

NO_SUCH_UPLOAD = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchUpload</Code><Message>The '
    b"specified upload does not exist. The upload ID may be invalid, or the upload may have "
    b"been aborted or completed.</Message></Error>"
)


def lost_then_gone(upstream: str) -> Any:
    """test_cloud's relay around the completion (a POST with uploadId): the first one is
    forwarded and its connection closed without the answer (the object exists, the worker does
    not know); every later one is answered 404 NoSuchUpload, as S3 answers a completion of an
    upload that is complete and so gone (moto instead repeats its 200)."""
    from tests.test_cloud import FaultProxy

    target = urllib.parse.urlsplit(upstream)

    class LostThenGone(FaultProxy):
        def _handler(self) -> Any:
            base, relay = super()._handler(), self

            class Handler(base):  # type: ignore[misc, valid-type]
                def _any(self) -> None:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else b""
                    relay.seen.append((self.command, self.path))
                    if self.command != "POST" or "uploadId=" not in self.path:
                        return self._forward(body)
                    relay.injected += 1
                    return self._lose(body) if relay.injected == 1 else self._gone()

                def _lose(self, body: bytes) -> None:
                    up = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    up.request(self.command, self.path, body=body, headers=headers)
                    relay.applied = up.getresponse().status
                    up.close()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

                def _gone(self) -> None:
                    self.send_response(404)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(NO_SUCH_UPLOAD)))
                    self.end_headers()
                    self.wfile.write(NO_SUCH_UPLOAD)

                do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

            return Handler

    proxy = LostThenGone(upstream)
    proxy.applied = 0
    return proxy


# -- a CompleteMultipartUpload whose answer was lost ----------------------------------------------


@pytest.mark.parametrize("overwrite", ["different", "always"])
def test_s3_a_completion_whose_answer_is_lost_is_reported_transferred(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, overwrite: str
) -> None:
    """The relay forwards the first CompleteMultipartUpload and closes the connection without
    its answer: the object exists. botocore sends the completion again and S3 answers
    NoSuchUpload (the upload is complete, so gone). That is this transfer's own commit, not
    another delivery's abort: the worker finds its upload's object at the key (the multipart
    ETag of its parts, its event on record) and reports it transferred, once. Before, it
    re-planned and counted the event skipped (already_applied) under either policy: no
    transfer_success, no bytes counted for an object it wrote (the review feared a second
    upload under --overwrite always; already_applied comes first, so there was none)."""
    side = s3_side()
    side.put("src/a", data := os.urandom(LARGE))
    proxy = lost_then_gone(aws_env)
    try:
        store = relayed_store(monkeypatch, "aws_s3", proxy.url)
        engine = tw.TransferEngine({"aws_s3": store}, overwrite=overwrite)
        result = engine.transfer(event_for(side.ref("src/a"), side.ref("out"), JUN))
        completions = [p for m, p in proxy.seen if m == "POST" and "uploadId=" in p]
        uploads = [p for m, p in proxy.seen if m == "POST" and p.endswith("?uploads")]
    finally:
        proxy.close()
    assert proxy.injected == 2 and proxy.applied == 200  # the first completion was applied
    assert (result.outcome, result.reason) == ("success", None), result
    assert result.bytes_transferred == LARGE
    assert len(uploads) == 1, uploads  # never uploaded again
    assert len(completions) == 2  # botocore's retry of the completion, answered NoSuchUpload
    assert side.read("out") == data


# -- a large GCS source without checksumSHA256 to S3: read once, checked by its CRC32C ----------


class Recording:
    """test_cloud's relay, recording each request's method, path and headers and counting the
    body bytes it answers GETs with (what the source served), optionally changing one byte of
    the ``nth`` request matching ``damage`` on its way."""

    def __init__(self, upstream: str, damage: Any = None, media: str = "alt=media") -> None:
        from tests.test_cloud import FaultProxy

        relay = self
        self.served = 0
        self.damage = damage  # (method, path part), or None
        self.media = media  # the GETs whose answers count as served

        class Proxy(FaultProxy):
            def _handler(self) -> Any:
                base = super()._handler()

                class Handler(base):  # type: ignore[misc, valid-type]
                    def _forward(self, body: bytes) -> None:
                        if relay._damages(self.command, self.path) and body:
                            body = body[:-1] + bytes([body[-1] ^ 0xFF])
                        super()._forward(body)

                    def send_header(self, name: str, value: str) -> None:
                        media = relay.media in self.path
                        if self.command == "GET" and media and name.lower() == "content-length":
                            relay.served += int(value)
                        super().send_header(name, value)

                return Handler

        self.proxy = Proxy(upstream)
        self.url = self.proxy.url

    def _damages(self, method: str, path: str) -> bool:
        if self.damage is None or method != self.damage[0] or self.damage[1] not in path:
            return False
        self.damage = None  # once
        return True

    def requests(self, method: str, part: str) -> list[dict[str, str]]:
        return [
            {k.lower(): v for k, v in headers.items()}
            for verb, path, headers in self.proxy.requests
            if verb == method and part in path
        ]

    def close(self) -> None:
        self.proxy.close()


@pytest.fixture
def gcs_to_s3(aws_env: str, fake_gcs_env: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A GCS bucket (fake-gcs-server) and an S3 bucket (moto), and a function that builds an
    engine whose stores talk to them through recording relays (S3's relay may damage a part)."""
    from tests.test_commits import gcs_side

    gcs, s3 = gcs_side(), s3_side()
    relays: list[Recording] = []

    def engine(damage: Any = None) -> tuple[tw.TransferEngine, Recording, Recording]:
        gcs_relay, s3_relay = Recording(fake_gcs_env), Recording(aws_env, damage)
        relays.extend([gcs_relay, s3_relay])
        stores = {
            "gcp_gcs": relayed_store(monkeypatch, "gcp_gcs", gcs_relay.url),
            "aws_s3": relayed_store(monkeypatch, "aws_s3", s3_relay.url),
        }
        return tw.TransferEngine(stores), gcs_relay, s3_relay

    yield gcs, s3, engine
    for relay in relays:
        relay.close()


def crc32c_hex(data: bytes) -> str:
    import google_crc32c

    return google_crc32c.Checksum(data).digest().hex()


def s3_head(s3: Any, key: str) -> dict[str, Any]:
    import boto3

    return boto3.client("s3").head_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")


def test_gcs_to_s3_multipart_reads_the_source_once_and_s3_checks_its_crc32c(gcs_to_s3: Any) -> None:
    """An event without checksumSHA256 for a GCS object of three S3 parts. Before, the worker
    read the whole source twice (a SHA-256 pass for the S3 record, then the copy): twice the
    cross-cloud egress. Now the source is read once; the upload is created with CRC32C
    FULL_OBJECT, each part carries its CRC32C and the completion names the source's CRC32C,
    which S3 checks against the parts put together; the destination records that CRC32C and
    the source's generation, and a redelivery of the event is already_applied."""
    gcs, s3, engine_with = gcs_to_s3
    gcs.put("src/a", data := os.urandom(LARGE))
    engine, gcs_relay, s3_relay = engine_with()
    event = event_for(gcs.ref("src/a"), s3.ref("out"), JUN)
    result = engine.transfer(event)
    assert result.outcome == "success", result  # verified against the source's MD5 and CRC32C
    assert gcs_relay.served == LARGE  # once, not twice
    assert result.sha256 == hashlib.sha256(data).hexdigest()  # computed on the way
    [create] = s3_relay.requests("POST", "?uploads")
    assert create["x-amz-checksum-algorithm"] == "CRC32C"
    assert create["x-amz-checksum-type"] == "FULL_OBJECT"
    parts = s3_relay.requests("PUT", "partNumber=")
    assert len(parts) == 3 and all("x-amz-checksum-crc32c" in part for part in parts)
    [complete] = s3_relay.requests("POST", "uploadId=")
    crc = crc32c_hex(data)
    assert base64.b64decode(complete["x-amz-checksum-crc32c"]).hex() == crc
    assert complete["x-amz-checksum-type"] == "FULL_OBJECT"
    assert s3.read("out") == data
    head = s3_head(s3, "out")
    generation = str(tw_gcs_generation(gcs, "src/a"))
    assert head["Metadata"]["transfer-worker-crc32c"] == crc
    assert head["Metadata"]["transfer-worker-source-generation"] == generation
    assert "transfer-worker-sha256" not in head["Metadata"]
    assert base64.b64decode(head["ChecksumCRC32C"]).hex() == crc  # S3's own, FULL_OBJECT
    again = engine.transfer(event)
    assert (again.outcome, again.reason) == ("skipped", "already_applied")


def tw_gcs_generation(gcs: Any, key: str) -> int:
    info = gcs.store.head(gcs.ref(key))
    return int(info.revision["generation"])


def test_gcs_to_s3_a_byte_damaged_on_the_way_to_s3_is_never_committed(gcs_to_s3: Any) -> None:
    """The relay flips the last byte of the second part on its way to S3, after the worker read
    and checked it (S3 would refuse that part by its CRC32C; moto does not check parts): the
    completion names the source's CRC32C, S3 (moto, adjusted as S3 behaves: tests/
    moto_conditions.py) refuses it as BadDigest, damage in transit, retryable. No object ever
    exists at the key; the next attempt writes the source's bytes. Before, with the SHA-256
    pre-pass and no whole-object checksum on the completion, the damaged object was committed."""
    gcs, s3, engine_with = gcs_to_s3
    gcs.put("src/a", data := os.urandom(LARGE))
    engine, _, _ = engine_with(damage=("PUT", "partNumber=2"))
    event = event_for(gcs.ref("src/a"), s3.ref("out"), JUN)
    with pytest.raises(tw.RetryableError) as refused:
        engine.transfer(event)
    assert refused.value.reason == tw.DAMAGED, refused.value
    assert s3.read("out") is None
    assert engine.transfer(event).outcome == "success"  # the worker's retry
    assert s3.read("out") == data


class DamagingSource:
    """The GCS store with one byte of the source changed as it is read (damage between GCS and
    the worker), once."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.damaged = inner, False

    @contextlib.contextmanager
    def open_read(self, ref: tw.ObjectRef, info: tw.ObjectInfo, **kwargs: Any) -> Any:
        with self.inner.open_read(ref, info, **kwargs) as chunks:
            yield self._chunks(chunks)

    def _chunks(self, chunks: Any) -> Any:
        for chunk in chunks:
            if not self.damaged:
                self.damaged, chunk = True, bytes([chunk[0] ^ 1]) + chunk[1:]
            yield chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_gcs_to_s3_a_byte_damaged_on_the_way_from_gcs_is_never_committed(gcs_to_s3: Any) -> None:
    """The worker's own check: the bytes read disagree with the CRC32C GCS publishes, so the
    attempt fails as damage in transit before the completion, the upload is aborted and no
    object exists; the next attempt reads the source again and writes it."""
    import boto3

    gcs, s3, engine_with = gcs_to_s3
    gcs.put("src/a", data := os.urandom(LARGE))
    engine, _, _ = engine_with()
    engine.stores = {**engine.stores, "gcp_gcs": DamagingSource(engine.stores["gcp_gcs"])}
    event = event_for(gcs.ref("src/a"), s3.ref("out"), JUN)
    with pytest.raises(tw.RetryableError) as refused:
        engine.transfer(event)
    assert refused.value.reason == tw.DAMAGED, refused.value
    assert s3.read("out") is None
    uploads = boto3.client("s3").list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert uploads == []  # aborted
    assert engine.transfer(event).outcome == "success"
    assert s3.read("out") == data


# -- the plan's comparisons with a CRC32C record ---------------------------------------------------


SRC = tw.ObjectRef("gcp_gcs", "src-bucket", "k")
DST = tw.ObjectRef("aws_s3", "dst-bucket", "k")


def crc_record(event: tw.TransferEvent, crc: str, generation: str) -> tw.ObjectInfo:
    """A destination written on the CRC32C path: the event's source, its CRC32C and generation."""
    return tw.ObjectInfo(
        size=1,
        version='"e-3"',
        metadata={
            "transfer-worker-event-id": event.event_id,
            "transfer-worker-event-time": event.timestamp.isoformat(),
            "transfer-worker-source": event.source.uri,
            "transfer-worker-crc32c": crc,
            "transfer-worker-source-generation": generation,
        },
    )


def gcs_source(crc: str, generation: str) -> tw.ObjectInfo:
    return tw.ObjectInfo(
        size=1, version=generation, checksums={"crc32c": crc}, revision={"generation": generation}
    )


@pytest.mark.parametrize(
    ("crc", "generation", "sha256", "expected"),
    [
        ("0a0b0c0d", "7", None, "already_applied"),  # the redelivery
        ("0a0b0c0d", "8", None, None),  # another source version: written again
        ("ffffffff", "7", None, None),  # not the CRC32C on record
        ("0a0b0c0d", "7", "ab" * 32, "already_applied"),  # the SHA-256 known on one side only
    ],
)
def test_a_crc32c_record_counts_only_with_the_source_version_it_names(
    crc: str, generation: str, sha256: str | None, expected: str | None
) -> None:
    """A CRC32C (32 bits) alone never says two objects are equal: the record counts as this
    event's bytes only with the very source version planned now on record beside it."""
    event = event_for(SRC, DST, JUN)
    dst = crc_record(event, "0a0b0c0d", "7")
    src = gcs_source(crc, generation)
    assert tw.plan_skip(event, dst, sha256, "always", src=src) == expected
    assert tw.plan_skip(event, dst, sha256, "always") is None  # without the source: no claim


def test_same_content_accepts_a_crc32c_record_of_the_same_source_version() -> None:
    """After the stream, the SHA-256 is known but the destination records only the CRC32C (the
    same event, re-planned after a refusal): the bytes are there already, S3 having checked
    them against that CRC32C at completion, but only for the source version on record."""
    event = event_for(SRC, DST, JUN)
    dst = crc_record(event, "0a0b0c0d", "7")
    assert tw.same_content(dst, "ab" * 32, event, src=gcs_source("0a0b0c0d", "7"))
    assert not tw.same_content(dst, "ab" * 32, event, src=gcs_source("0a0b0c0d", "8"))
    assert not tw.same_content(dst, "ab" * 32, event)


def put_full_object_crc32c(client: Any, bucket: str, key: str, data: bytes) -> None:
    """A multipart S3 object with a FULL_OBJECT CRC32C, as a writer using it (or this worker)
    leaves one."""
    upload = client.create_multipart_upload(
        Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C", ChecksumType="FULL_OBJECT"
    )["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(data), PART), 1):
        piece = data[start : start + PART]
        crc = base64.b64encode(bytes.fromhex(crc32c_hex(piece))).decode()
        etag = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload,
            PartNumber=number,
            Body=piece,
            ChecksumCRC32C=crc,
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag, "ChecksumCRC32C": crc})
    client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload,
        MultipartUpload={"Parts": parts},
        ChecksumCRC32C=base64.b64encode(bytes.fromhex(crc32c_hex(data))).decode(),
        ChecksumType="FULL_OBJECT",
    )


def test_s3_source_with_a_full_object_crc32c_is_checked_by_it_and_read_once(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_s3_checksums reads a CRC32C that S3 states is FULL_OBJECT: such an S3 object (the
    worker's own output of the test above, say) is verified against it as a source, and to an
    S3 destination without a SHA-256 it is read once too. Before, the CRC32C was ignored: no
    source check, and a hashing pass first."""
    import boto3

    side = s3_side()
    put_full_object_crc32c(boto3.client("s3"), side.bucket, "src/a", data := os.urandom(LARGE))
    relay = Recording(aws_env, media="/src/a")
    try:
        engine = tw.TransferEngine({"aws_s3": relayed_store(monkeypatch, "aws_s3", relay.url)})
        result = engine.transfer(event_for(side.ref("src/a"), side.ref("out"), JUN))
    finally:
        relay.close()
    assert (result.outcome, result.verified_against) == ("success", "source_crc32c"), result
    assert relay.served == LARGE
    assert side.read("out") == data
    assert s3_head(side, "out")["Metadata"]["transfer-worker-crc32c"] == crc32c_hex(data)
