"""S3 multipart destinations: a completion whose answer was lost, and a GCS source verified by its
own CRC32C (read once) instead of a SHA-256 pre-pass.

Interleavings and lost answers come from a relay in front of moto (tests/test_review_commits'
dropping_proxy), so the requests travel on the wire as they would to S3.
"""

from __future__ import annotations

import http.client
import os
import socket
import urllib.parse
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_commits import LARGE, event_for, relayed_store, s3_side

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
