"""S3 commits carry a per-attempt nonce (transfer-worker-commit): a commit refused on botocore's
resend is this attempt's own only when the object at the key carries its nonce (ADR 10). A
redelivery of the same event writes the same bytes and the same record, so neither the event on
record nor the ETag can tell the two apart. Real moto behind a relay (test_cloud's FaultProxy)."""

from __future__ import annotations

import os
import socket
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import boto3
import pytest

import transfer_worker as tw
from tests.test_commits import LARGE, event_for, relayed_store, s3_side
from tests.test_s3put import NEW

pytestmark = pytest.mark.timeout(180)


def completion_lost_before_s3(
    upstream: str, meanwhile: Callable[[str], None], *, gone: bool
) -> Any:
    """The first CompleteMultipartUpload (a POST with uploadId) is NOT forwarded: ``meanwhile``
    runs with its upload id, then the connection is closed without an answer. botocore sends
    the completion again: forwarded to moto (which checks the condition first: 412), or, with
    ``gone``, answered 404 NoSuchUpload by the relay, as S3 answers a completion of an aborted
    upload."""
    from tests.test_cloud import FaultProxy
    from tests.test_crc32c_multipart import NO_SUCH_UPLOAD

    class LostBeforeS3(FaultProxy):
        def _handler(self) -> Any:
            base, relay = super()._handler(), self

            class Handler(base):  # type: ignore[misc, valid-type]
                def _any(self) -> None:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else b""
                    relay.seen.append((self.command, self.path))
                    completion = self.command == "POST" and "uploadId=" in self.path
                    if not completion or (relay.injected and not gone):
                        return self._forward(body)
                    if relay.injected:
                        return self._gone()
                    relay.injected += 1
                    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                    meanwhile(query["uploadId"])
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

    return LostBeforeS3(upstream)


@pytest.mark.parametrize("gone", [True, False], ids=["nosuchupload", "412"])
def test_s3_a_completion_lost_before_s3_while_a_redelivery_completes_is_a_skip(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, gone: bool
) -> None:
    """Two deliveries of one event race. Ours sends its CompleteMultipartUpload; the relay drops
    it before S3. Meanwhile the redelivery uploads the same parts (same bytes, same part size:
    the same multipart ETag), completes, and aborts our upload as a stale one; botocore resends
    our completion: NoSuchUpload (or 412). Nothing of ours was applied: this delivery is skipped
    (already_applied), not reported a second success with the bytes counted again."""
    side = s3_side()
    side.put("src/a", data := os.urandom(LARGE))
    event = event_for(side.ref("src/a"), side.ref("out"), NEW)
    results: dict[str, tw.TransferResult] = {}

    def redelivery_completes(ours: str) -> None:  # straight to moto, not through the relay
        results["redelivery"] = tw.TransferEngine({"aws_s3": side.store}).transfer(event)
        boto3.client("s3").abort_multipart_upload(Bucket=side.bucket, Key="out", UploadId=ours)

    proxy = completion_lost_before_s3(aws_env, redelivery_completes, gone=gone)
    try:
        store = relayed_store(monkeypatch, "aws_s3", proxy.url)
        results["ours"] = tw.TransferEngine({"aws_s3": store}).transfer(event)
        completions = [p for m, p in proxy.seen if m == "POST" and "uploadId=" in p]
    finally:
        proxy.close()
    assert proxy.injected == 1 and len(completions) == 2, completions  # dropped, then resent
    assert results["redelivery"].outcome == "success"
    assert side.read("out") == data
    seen = {name: (r.outcome, r.reason) for name, r in results.items()}
    assert seen["ours"] == ("skipped", "already_applied"), seen


def committed(side: Any, key: str, data: bytes, metadata: dict[str, str]) -> dict[str, Any]:
    upload = side.store.open_write(
        side.ref(key), size=len(data), content_type="text/plain", metadata=metadata
    )
    upload.write(data)
    upload.commit(metadata)
    return boto3.client("s3").head_object(Bucket=side.bucket, Key=key)


@pytest.mark.parametrize("size", [3000, LARGE], ids=["put", "multipart"])
def test_s3_every_commit_attempt_writes_its_own_nonce(aws_env: str, size: int) -> None:
    """PutObject and CreateMultipartUpload both write the nonce; two commits of the same bytes
    and record (a delivery and its redelivery) write different ones."""
    side = s3_side()
    data = os.urandom(size)
    record = {tw.META_EVENT_ID: str(uuid.uuid4()), tw.META_SOURCE: "s3://b/k"}
    first = committed(side, "a", data, record)["Metadata"]
    second = committed(side, "b", data, record)["Metadata"]
    assert first[tw.META_EVENT_ID] == second[tw.META_EVENT_ID] == record[tw.META_EVENT_ID]
    assert len(first[tw.META_COMMIT]) == 16 and first[tw.META_COMMIT] != second[tw.META_COMMIT]


def test_s3_a_nonce_on_a_source_is_the_workers_record_not_carried_user_metadata(
    aws_env: str,
) -> None:
    """An object the worker wrote, later a source (S3 to S3, --metadata all): its nonce is
    dropped with the rest of its record, as _is_record says, not refused as a user key under
    the reserved prefix and not carried; the new object has its own commit's nonce."""
    side = s3_side()
    side.put("src", data := os.urandom(3000))
    engine = tw.TransferEngine({"aws_s3": side.store})
    first = engine.transfer(event_for(side.ref("src"), side.ref("mid"), NEW))
    again = engine.transfer(event_for(side.ref("mid"), side.ref("out"), NEW))
    assert (first.outcome, again.outcome) == ("success", "success"), (first, again)
    s3 = boto3.client("s3")
    mid = s3.head_object(Bucket=side.bucket, Key="mid")["Metadata"]
    out = s3.head_object(Bucket=side.bucket, Key="out")["Metadata"]
    assert mid[tw.META_COMMIT] and out[tw.META_COMMIT]
    assert mid[tw.META_COMMIT] != out[tw.META_COMMIT]
    assert side.read("out") == data


def test_s3_the_largest_record_with_its_nonce_is_committed_within_2_kb(aws_env: str) -> None:
    """test_keys' largest record (a 1,024-byte emoji key in a 222-byte GCS bucket as source,
    every other value at its longest) with the nonce: 2,043 bytes, under S3's 2,048."""
    bucket = ".".join(["b" * 63] * 3) + "." + "c" * 30
    record = {
        tw.META_EVENT_ID: str(uuid.uuid4()),
        tw.META_SOURCE: f"gs://{bucket}/{'😀' * 256}",
        tw.META_EVENT_TIME: "2026-12-01T19:01:06.123456+00:00",
        tw.META_SOURCE_ATTRIBUTE + "generation": "9" * 19,
        tw.META_SOURCE_ATTRIBUTE + "metageneration": "9" * 6,
        tw.META_SHA256: "f" * 64,
    }
    sent = tw._s3_metadata_out({**record, tw.META_COMMIT: "0" * 16})
    assert sum(len(k) + len(v) for k, v in sent.items()) == 2043 <= tw.S3_METADATA_LIMIT
    head = committed(s3_side(), "big", b"abc", record)
    assert tw._s3_metadata_in(head["Metadata"])[tw.META_SOURCE] == record[tw.META_SOURCE]
