"""Adversarial review, wave 2: the changes since b64bdc6 (one dead letter per delivery, the
envelope's forms against a queue's limit, the GCS->S3 CRC32C multipart path, dlq's held entries
and their renewer) and the earlier unreviewed parts (hand-back allowance, the SQS envelope
attribute, the S3 NoSuchUpload re-plan, the local directory-fd walk and its fsync).

Each test here demonstrates one finding and FAILS on the code it was written against: it is
marked ``xfail(strict=True)`` so the branch stays green, and the mark goes when the fix lands
(strict: a fix that makes it pass turns the run red until the mark is removed). Real servers
(moto) where the behaviour is on the wire; no test sleeps without a bound."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_queue_outage import Rig, copied, submit
from tests.test_review_deadletter import SizedSends, bad_event, sqs, worker_on

pytestmark = pytest.mark.timeout(180)

KiB = 1024

__all__ = ["sqs"]  # the fixture, imported so that pytest finds it here


# -- finding A: a new key's directories are made and never synced (local commit, ADR 10) ----------


def test_a_commit_that_makes_directories_syncs_each_new_entry_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination copy/in/data.bin is new: the commit makes gcp_gcs/dst, copy and copy/in.
    The rename is made durable by fsync(copy/in), but copy/in's own entry lives in copy, and
    copy's in dst, and neither directory is ever synced: after a power loss the file's directory
    entry may survive in an inode nothing links to, and the object, acknowledged and deleted from
    the queue, is gone ("nothing lost"). fsync(2): "Calling fsync() does not necessarily ensure
    that the entry in the directory containing the file has also reached disk. For that an
    explicit fsync() on a file descriptor for the directory is also needed." """
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    rig = Rig(tmp_path)
    submit(rig, b"d" * 3000)
    rig.worker.run(once=True)
    assert copied(tmp_path, "in/data.bin") == b"d" * 3000
    bucket = tmp_path / "gcp_gcs" / "dst"
    made = [bucket / "copy" / "in", bucket / "copy", bucket]  # each new, its entry in the parent
    assert str(made[0]) in synced  # the rename's directory: synced today
    missing = [str(d.parent) for d in made if str(d.parent) not in synced]
    assert missing == [], f"parents never synced: {missing}; synced: {synced}"


# -- finding B: a body within ~450 bytes of SQS's limit can never be dead-lettered -----------------


def test_an_invalid_event_just_under_the_queue_limit_is_dead_lettered_with_its_reason(
    sqs: tuple[Any, str, str], tmp_path: Path
) -> None:
    """A producer's event of 256 KiB - 200 bytes, which the work queue (256 KiB) and the worker
    (--max-message-bytes 256 KiB) both take, fails the schema. The attribute form without the
    error is the body plus ~430 bytes of fields (reason, attempts, worker_id, time, message_id,
    event_id, correlation_id, the ERROR_LEFT_OUT note): over 256 KiB. publish_envelope sends it
    anyway, SQS answers InvalidParameterValue, the worker logs "Could not dead-letter" and leaves
    the message for redelivery: on every delivery, until the queue's maxReceiveCount moves the
    bare body without any reason (or, with no redrive policy, forever). Anyone who may send to the
    work queue can make an event that is never dead-lettered with its reason."""
    client, url, dlq = sqs
    body = bad_event(256 * KiB - 200)
    client.send_message(QueueUrl=url, MessageBody=body.decode())  # the work queue takes it
    config = tw.Config(local_root=str(tmp_path), queue=url, http_port=0, visibility_timeout=30)
    sends = SizedSends(client)
    queue = tw.SQSQueue(config, tw.SQSPublisher(dlq, config, client=sends), client=client)
    log = io.StringIO()
    worker_on(config, queue, log).run(once=True)

    assert all(size <= 256 * KiB for size in sends.sizes), (sends.sizes, log.getvalue()[-2000:])
    with tw.SQSDeadLetters(dlq, client).held(10) as letters:
        assert [letter.envelope["reason"] for letter in letters] == ["invalid_event"]
        assert tw.envelope_body(letters[0].envelope) == body


# -- finding C: the hold renewer dies at the first exception it was not told about -----------------


def test_the_hold_renewer_survives_an_unexpected_error_and_renews_at_the_next_beat() -> None:
    """A renewal that raises something other than a TransferError kills the dlq-hold thread (the
    exception goes to threading.excepthook), __exit__ joins a dead thread without a word, and from
    then on the command's entries lapse after `hold` (60 s): other readers see them, later pages
    bring them back with new receipts, and an SQS delete by a superseded receipt "succeeds" without
    deleting, so the next redrive sends them again. A renewer should log and carry on."""
    calls: list[float] = []
    renewed = threading.Event()

    def renew() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("an SDK error nobody translated")
        renewed.set()

    hooked: list[Any] = []
    previous_hook = threading.excepthook
    threading.excepthook = hooked.append  # keep the dying thread's report out of the run
    try:
        with tw.HoldRenewer(renew, period=0.01):
            renewed.wait(timeout=2.0)  # bounded: 200 beats
    finally:
        threading.excepthook = previous_hook
    assert renewed.is_set(), f"renewals: {len(calls)}; thread died with {hooked}"


# -- finding D: a dead letter whose ack keeps failing is published again at every redelivery ---


def test_a_message_whose_ack_keeps_failing_is_redriven_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The worker publishes the envelope once and retries only the ack, for about one visibility
    timeout. An ack that fails for longer (the queue's delete permission revoked, an endpoint
    down) leaves the message in flight; its redelivery is dead-lettered again and publishes a
    second envelope, the next a third: N deliveries, N dead letters of one message, and a redrive
    sent the body back N times (against the promise that a redrive never sends twice). A redelivery
    of a message already dead-lettered is recognisable (its message id is in the envelope).

    Adapted from the reviewer's test, which asserted one envelope on the dead-letter table (the
    publishing side): the fix is on the reading side, so this asserts what a user sees. `dlq list`
    shows the message once with its copies; `dlq redrive` sends it back once and leaves the
    dead-letter queue empty."""
    from conftest import Clock
    from tests.test_queue_outage import FailingQueue

    clock = Clock()
    dead = tw.LocalQueue(tmp_path / "dlq.db", clock=clock)
    queue = FailingQueue(
        tmp_path / "queue.db",
        clock=clock,
        poll_interval=0.01,
        visibility_timeout=30,
        dead_letter_target=tw.LocalDeadLetters(dead),
    )
    config = tw.Config(
        local_root=str(tmp_path), http_port=0, visibility_timeout=30, backoff_max=8.0
    )
    worker = tw.Worker(
        config,
        queue,
        tw.TransferEngine(tw.build_stores(config)),
        tw.Metrics(),
        tw.make_logger("DEBUG", io.StringIO()),
        clock=clock,
        sleep=lambda seconds: None,
    )
    queue.publish(b"not json")
    queue.failures["ack"] = 10**6  # the ack fails for three deliveries...
    for _ in range(3):  # each after the visibility timeout
        worker.run(once=True)
        clock.advance(31)
    queue.failures["ack"] = 0  # ...and works at the fourth: the work queue is empty
    worker.run(once=True)
    assert queue.calls["dead_letter"] == 4  # each delivery did reach the dead-letter step
    assert queue.depth() == 0
    assert len(dead.dead_letters()) == 4  # the worker still writes one per delivery

    settings = ["--local-root", str(tmp_path), "--queue", str(tmp_path / "queue.db")]
    settings += ["--dead-letter", str(tmp_path / "dlq.db")]
    assert tw.main(["dlq", "list", *settings]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["message_id"], e["copies"]) for e in listed] == [("1", 4)]

    assert tw.main(["dlq", "redrive", *settings]) == 0
    assert "redrove 1 message(s), 0 failed (4 dead letters" in capsys.readouterr().err
    work = tw.LocalQueue(tmp_path / "queue.db")
    assert [m.body for m in work.receive(10, 0)] == [b"not json"]  # once, not four times
    assert dead.dead_letters() == []


# -- finding E: the read side still resolves a local key by path, checked then used ---------------


def test_a_source_directory_swapped_for_a_symlink_after_its_check_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 8 made the commit walk the key's directories by file descriptor; the read
    side did not get it. Whoever can write the source bucket (the reason symlinks are refused at
    all) swaps src/in for a symlink to a directory outside the bucket while the worker is between
    _path()'s islink checks and its lstat()/open(): head() and open_read() then both see the
    outside file, its stat matches, and its bytes land at the destination, readable to whoever
    reads that bucket. The race is won here deterministically (the swap happens right after each
    check, as an attacker looping rename() would at some point); the checks themselves are the
    real ones."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"SECRET, outside every bucket")
    rig = Rig(root)
    submit(rig, b"public bytes")
    real, parked = root / "aws_s3" / "src" / "in", root / "aws_s3" / "src" / "in.real"

    def swap(to_symlink: bool) -> None:
        if to_symlink and not real.is_symlink():
            real.rename(parked)
            real.symlink_to(outside, target_is_directory=True)
        elif not to_symlink and real.is_symlink():
            real.unlink()
            parked.rename(real)

    original = tw.LocalObjectStore._path

    def racing_path(store: tw.LocalObjectStore, ref: tw.ObjectRef) -> str:
        swap(False)  # the checks see the real directory...
        path = original(store, ref)
        swap(ref.bucket == "src")  # ...and the use sees the attacker's symlink
        return path

    monkeypatch.setattr(tw.LocalObjectStore, "_path", racing_path)
    rig.worker.run(once=True)
    swap(False)
    assert copied(root, "in/data.bin") != b"SECRET, outside every bucket"


# -- finding F: a PutObject whose answer was lost is counted skipped, not transferred -------------


def lost_put_once(upstream: str, key: str) -> Any:
    """test_cloud's relay: the first PutObject of ``key`` is forwarded (moto applies it) and its
    connection closed without the answer; everything else, botocore's retry included, is
    forwarded as it is (moto answers the retried IfNoneMatch put 412, as S3 does)."""
    import http.client
    import socket
    import urllib.parse

    from tests.test_cloud import FaultProxy

    target = urllib.parse.urlsplit(upstream)

    class LostPut(FaultProxy):
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
                    up = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    up.request(self.command, self.path, body=body, headers=headers)
                    relay.applied = up.getresponse().status
                    up.close()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

                do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

            return Handler

    proxy = LostPut(upstream)
    proxy.applied = 0
    return proxy


def test_s3_a_put_whose_answer_is_lost_is_reported_transferred(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same lost answer as test_crc32c_multipart's completion, on the common path: a small
    object, one conditional PutObject. The put is applied; botocore sends it again, the key now
    exists, S3 answers 412 PreconditionFailed, CommitRefused re-plans, and plan_skip finds this
    event on record: outcome skipped, reason already_applied, no transfer_success, no bytes, no
    verified_against, for an object this very attempt wrote (and under --overwrite never, the
    one write it was allowed)."""
    from tests.test_commits import event_for, relayed_store, s3_side

    side = s3_side()
    side.put("src/a", data := os.urandom(3000))
    proxy = lost_put_once(aws_env, "out")
    try:
        store = relayed_store(monkeypatch, "aws_s3", proxy.url)
        engine = tw.TransferEngine({"aws_s3": store})
        result = engine.transfer(
            event_for(side.ref("src/a"), side.ref("out"), "2026-06-01T00:00:00Z")
        )
        puts = [p for m, p in proxy.seen if m == "PUT" and p.endswith("/out")]
    finally:
        proxy.close()
    assert proxy.injected == 1 and proxy.applied == 200  # the first put was applied
    assert len(puts) == 2, puts  # botocore's retry
    assert side.read("out") == data
    assert (result.outcome, result.reason) == ("success", None), result
