"""S3 PutObject refusals and CRC32C records: a 412 on botocore's resend of a PutObject is this
commit's own only when the object there is (test_review_wave2's finding F has the lost answer
itself); a CRC32C record stands for the bytes only of the source object it names.

The relay sits in front of moto, so the 412 and the resend travel on the wire as they would to S3.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import boto3
import pytest

import transfer_worker as tw
from tests.test_commits import event_for, relayed_store, s3_side

pytestmark = pytest.mark.timeout(180)

OLD, NEW = "2026-01-01T00:00:00Z", "2026-06-01T00:00:00Z"


def committed_meanwhile(upstream: str, key: str, meanwhile: Callable[[], None]) -> Any:
    """test_cloud's relay: the first PutObject of ``key`` is NOT forwarded; ``meanwhile`` runs
    (another writer commits the key), then the connection is closed without an answer, as when
    a request is lost before it reaches S3. botocore sends the put again and meets the other
    writer's object: S3 (moto) answers 412, exactly as to a resend of a put that was applied."""
    from tests.test_cloud import FaultProxy

    class LostBeforeS3(FaultProxy):
        def _handler(self) -> Any:
            base, relay = super()._handler(), self

            class Handler(base):  # type: ignore[misc, valid-type]
                def _any(self) -> None:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else b""
                    relay.seen.append((self.command, self.path))
                    plain_put = self.command == "PUT" and "?" not in self.path
                    if not (plain_put and self.path.endswith(f"/{key}")) or relay.injected:
                        return self._forward(body)
                    relay.injected += 1
                    meanwhile()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

                do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

            return Handler

    return LostBeforeS3(upstream)


def test_s3_a_put_refused_on_its_resend_by_another_events_commit_replans(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 412 comes on botocore's resend, as after a lost answer, but the object there is a
    newer event's, of the very same bytes (so the same ETag, our body's MD5): only the event on
    record tells it from our own commit. It is a real conflict: the older event re-plans and is
    skipped stale_event, the newer event's record stays. Claiming it as our commit would report
    an event transferred whose bytes and record are another's."""
    side = s3_side()
    side.put("src/a", data := os.urandom(3000))
    side.put("src/b", data)
    older = event_for(side.ref("src/a"), side.ref("out"), OLD)
    newer = event_for(side.ref("src/b"), side.ref("out"), NEW)
    results: dict[str, tw.TransferResult] = {}

    def newer_commits() -> None:  # straight to moto, not through the relay
        results["newer"] = tw.TransferEngine({"aws_s3": side.store}).transfer(newer)

    proxy = committed_meanwhile(aws_env, "out", newer_commits)
    try:
        store = relayed_store(monkeypatch, "aws_s3", proxy.url)
        results["older"] = tw.TransferEngine({"aws_s3": store}).transfer(older)
        puts = [p for m, p in proxy.seen if m == "PUT" and p.endswith("/out")]
    finally:
        proxy.close()
    assert proxy.injected == 1 and len(puts) == 2, puts  # lost, then botocore's resend: 412
    assert results["newer"].outcome == "success"
    assert (results["older"].outcome, results["older"].reason) == ("skipped", "stale_event")
    assert results["older"].bytes_transferred == 0
    head = boto3.client("s3").head_object(Bucket=side.bucket, Key="out")
    assert head["Metadata"][tw.META_EVENT_ID] == newer.event_id
    assert side.read("out") == data


def test_s3_a_put_refused_on_its_resend_by_other_bytes_of_its_own_event_is_not_claimed(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object there names this very event (a redelivery committed it while our send was
    lost), but holds other bytes: the source was rewritten between the two reads. Its ETag is
    not our body's MD5, so it is not our commit: the re-plan finds the source changed. Claiming
    it would report these bytes' SHA-256 as transferred beside an object that holds others."""
    side = s3_side()
    side.put("src/a", ours := os.urandom(3000))
    event = event_for(side.ref("src/a"), side.ref("out"), NEW)
    results: dict[str, tw.TransferResult] = {}

    def redelivery_of_new_bytes() -> None:
        side.put("src/a", os.urandom(3000))
        results["redelivery"] = tw.TransferEngine({"aws_s3": side.store}).transfer(event)

    proxy = committed_meanwhile(aws_env, "out", redelivery_of_new_bytes)
    try:
        store = relayed_store(monkeypatch, "aws_s3", proxy.url)
        with pytest.raises(tw.SourceChanged):
            tw.TransferEngine({"aws_s3": store}).transfer(event)
    finally:
        proxy.close()
    assert proxy.injected == 1 and results["redelivery"].outcome == "success"
    assert side.read("out") != ours


# Real S3's ETag of an SSE-KMS object is no MD5 of its bytes; moto's is. The relay below gives
# HEAD this one instead, so that only the record can say the object is ours.
KMS_ETAG = '"0123456789abcdef0123456789abcdef"'


def lost_put_under_kms(upstream: str, key: str) -> Any:
    """test_review_wave2's lost PutObject (applied, its answer lost, botocore resends: 412),
    with S3's SSE-KMS answers to HEAD of ``key``: an ETag that is not the MD5 of the body."""
    import http.client

    from tests.test_review_wave2 import lost_put_once

    proxy = lost_put_once(upstream, key)
    base = proxy.server.RequestHandlerClass

    class KmsHead(base):  # type: ignore[misc, valid-type]
        def _any(self) -> None:
            if self.command != "HEAD" or not self.path.endswith(f"/{key}"):
                return super()._any()
            up = http.client.HTTPConnection(
                proxy.upstream.hostname, proxy.upstream.port, timeout=60
            )
            up.request("HEAD", self.path, headers=dict(self.headers.items()))
            response = up.getresponse()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in {"etag", "connection", "transfer-encoding"}:
                    self.send_header(name, value)
            self.send_header("ETag", KMS_ETAG)
            self.end_headers()
            up.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

    proxy.server.RequestHandlerClass = KmsHead
    return proxy


def test_s3_a_put_under_sse_kms_whose_answer_is_lost_is_reported_transferred(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding F under SSE-KMS: the ETag is no digest of the bytes, so our body's MD5 cannot
    name the object; its record (this event, the source version read, the SHA-256 of our
    bytes) does. Reported transferred, once, not skipped already_applied."""
    side = s3_side()
    side.put("src/a", data := os.urandom(3000))
    proxy = lost_put_under_kms(aws_env, "out")
    try:
        store = relayed_store(monkeypatch, "aws_s3", proxy.url)
        options = tw.WriteOptions(s3_sse="aws:kms")
        engine = tw.TransferEngine({"aws_s3": store}, options=options)
        result = engine.transfer(event_for(side.ref("src/a"), side.ref("out"), NEW))
        puts = [p for m, p in proxy.seen if m == "PUT" and p.endswith("/out")]
        there = store.head(side.ref("out"))
    finally:
        proxy.close()
    assert proxy.injected == 1 and proxy.applied == 200 and len(puts) == 2, puts
    assert there is not None and there.version == KMS_ETAG  # as S3 answers under SSE-KMS
    assert "md5" not in there.checksums  # moto says aws:kms: the ETag is vouched for nothing
    assert (result.outcome, result.reason) == ("success", None), result
    assert result.bytes_transferred == len(data)
    assert side.read("out") == data


# -- a CRC32C record names one source object -------------------------------------------------------


SRC = tw.ObjectRef("gcp_gcs", "src-bucket", "one")
DST = tw.ObjectRef("aws_s3", "dst-bucket", "out")
CRC, GENERATION = "0a0b0c0d", "1767225600000000"


def crc_record(event: tw.TransferEvent, source: str) -> tw.ObjectInfo:
    """An S3 object written on the CRC32C path (no SHA-256) from ``source``, as the engine
    records it: that event, its source URI, the source's CRC32C and generation."""
    return tw.ObjectInfo(
        size=1,
        version='"e-3"',
        metadata={
            tw.META_EVENT_ID: event.event_id,
            tw.META_EVENT_TIME: event.timestamp.isoformat(),
            tw.META_SOURCE: source,
            tw.META_CRC32C: CRC,
            tw.META_SOURCE_ATTRIBUTE + "generation": GENERATION,
        },
    )


def gcs_source() -> tw.ObjectInfo:
    return tw.ObjectInfo(
        size=1, version=GENERATION, checksums={"crc32c": CRC}, revision={"generation": GENERATION}
    )


@pytest.mark.parametrize(
    "recorded_source",
    ["gs://src-bucket/two", "gs://other-bucket/one", "s3://src-bucket/one"],
    ids=["another-key", "another-bucket", "another-provider"],
)
def test_a_crc32c_record_of_another_source_object_is_not_these_bytes(
    recorded_source: str,
) -> None:
    """A GCS generation is unique per object name only: two objects written in the same
    microsecond share it, and one CRC32C in 2**32 is shared too. A destination that records
    another source object with the same generation and CRC32C holds other bytes: not
    already_applied, not same_content; the transfer writes. Before, the record's source was not
    compared and both claimed these bytes were there."""
    event = event_for(SRC, DST, NEW)
    dst = crc_record(event, recorded_source)
    assert tw.plan_skip(event, dst, None, "always", src=gcs_source()) is None
    assert tw.plan_skip(event, dst, "ab" * 32, "always", src=gcs_source()) is None
    assert not tw.same_content(dst, "ab" * 32, event, src=gcs_source())


def test_a_crc32c_record_of_the_events_own_source_object_still_counts() -> None:
    """The control: the same record naming the event's own source is this event's bytes."""
    event = event_for(SRC, DST, NEW)
    dst = crc_record(event, SRC.uri)
    assert tw.plan_skip(event, dst, None, "always", src=gcs_source()) == "already_applied"
    assert tw.same_content(dst, "ab" * 32, event, src=gcs_source())
