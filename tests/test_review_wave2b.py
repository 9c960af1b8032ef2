"""Adversarial review of the wave-2 fixes (since 908abc8): each test is a promise broken, kept as a
strict xfail until fixed, so the branch stays green and a fix shows as XPASS. Real servers
(moto behind a relay) where the behaviour is on the wire; no test waits without a bound."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

import transfer_worker as tw
from tests.test_commits import event_for, relayed_store, s3_side
from tests.test_review_dlq import envelope
from tests.test_s3put import NEW, committed_meanwhile

pytestmark = pytest.mark.timeout(180)


def slowed_down_meanwhile(upstream: str, key: str, meanwhile: Callable[[], None]) -> Any:
    """The first PutObject of ``key`` is NOT forwarded and is ANSWERED 503 SlowDown (S3's
    'nothing done, try again'), after ``meanwhile`` ran. botocore retries: RetryAttempts 1,
    although no send of ours was ever applied."""
    from tests.test_cloud import FaultProxy

    class SlowDown(FaultProxy):
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
                    answer = (
                        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)

                do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

            return Handler

    return SlowDown(upstream)


# -- (a) a 412 on botocore's resend: a racing delivery of the same event ---------------------------


@pytest.mark.parametrize(
    "first_send", [committed_meanwhile, slowed_down_meanwhile], ids=["dropped", "slowdown-503"]
)
def test_s3_a_put_lost_before_s3_while_a_redelivery_commits_is_a_skip_not_a_success(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, first_send: Any
) -> None:
    """Two deliveries of one event race (a visibility timeout ran out mid-transfer). Ours sends
    its PutObject; the relay drops it BEFORE S3, or answers it 503 SlowDown (either way nothing
    of ours is applied: botocore's RetryAttempts counts every retry, whatever its cause, see
    botocore/endpoint.py _send_request), the redelivery
    commits the same bytes with the same record, botocore resends ours: 412. This delivery wrote
    nothing: it is skipped already_applied (as it is when the 412 comes on the first send). It
    is reported success with the object's bytes as transferred: a skip counted as a success."""
    side = s3_side()
    side.put("src/a", data := os.urandom(3000))
    event = event_for(side.ref("src/a"), side.ref("out"), NEW)
    results: dict[str, tw.TransferResult] = {}

    def redelivery_commits() -> None:  # straight to moto, not through the relay
        results["redelivery"] = tw.TransferEngine({"aws_s3": side.store}).transfer(event)

    proxy = first_send(aws_env, "out", redelivery_commits)
    try:
        store = relayed_store(monkeypatch, "aws_s3", proxy.url)
        results["ours"] = tw.TransferEngine({"aws_s3": store}).transfer(event)
        puts = [p for m, p in proxy.seen if m == "PUT" and p.endswith("/out")]
    finally:
        proxy.close()
    assert proxy.injected == 1 and len(puts) == 2, puts  # dropped before S3, then the resend: 412
    assert results["redelivery"].outcome == "success"
    head = boto3.client("s3").head_object(Bucket=side.bucket, Key="out")
    assert head["Metadata"][tw.META_EVENT_ID] == event.event_id and side.read("out") == data
    # exactly one delivery wrote the object: one success, one skip
    outcomes = sorted(r.outcome for r in results.values())
    seen = {name: (r.outcome, r.reason) for name, r in results.items()}
    assert outcomes == ["skipped", "success"], seen


# -- (e) local store: keys with empty components ---------------------------------------------------


def local_commit(store: tw.LocalObjectStore, ref: tw.ObjectRef, data: bytes) -> None:
    upload = store.open_write(ref, size=len(data), content_type="text/plain", metadata={})
    upload.write(data)
    upload.commit({})


def test_a_local_key_with_an_empty_component_is_not_another_keys_object(tmp_path: Path) -> None:
    """S3 and GCS keys 'a/f' and 'a//f' are two objects. In local mode only 'a/f' is written;
    'a//f' must be absent (or refused invalid_key), never 'a/f''s bytes."""
    store = tw.LocalObjectStore(tmp_path, "gcp_gcs")
    local_commit(store, tw.ObjectRef("gcp_gcs", "dst", "a/f"), b"the bytes of a/f")
    doubled = tw.ObjectRef("gcp_gcs", "dst", "a//f")
    with pytest.raises(tw.TransferError) as refused:
        store.head(doubled)
    assert refused.value.reason == "invalid_key" and "cloud store" in str(refused.value)
    with pytest.raises(tw.TransferError) as refused:
        local_commit(store, doubled, b"would replace a/f")
    assert refused.value.reason == "invalid_key"
    assert (store.bucket_dir("dst") / "a" / "f").read_bytes() == b"the bytes of a/f"


def test_a_local_key_ending_in_a_slash_is_refused_as_an_invalid_key(tmp_path: Path) -> None:
    """Bad input gets a clear error: the key, not the destination, is what cannot be written."""
    store = tw.LocalObjectStore(tmp_path, "gcp_gcs")
    with pytest.raises(tw.TransferError) as refused:
        local_commit(store, tw.ObjectRef("gcp_gcs", "dst", "folder/"), b"")
    assert refused.value.reason == "invalid_key", refused.value


# -- (e) local store: a directory whose maker died before syncing it -------------------------------


def test_a_commit_into_a_directory_whose_maker_died_unsynced_syncs_its_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed commit left bucket/new made but its entry in bucket never synced. The next commit
    into new/ must sync that entry before it reports done: nothing else ever will."""
    store = tw.LocalObjectStore(tmp_path, "gcp_gcs")
    bucket = store.bucket_dir("dst")
    bucket.mkdir(parents=True)
    os.mkdir(bucket / "new")  # the dead maker's mkdir, without its fsync of bucket
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    local_commit(store, tw.ObjectRef("gcp_gcs", "dst", "new/key"), b"acknowledged")
    assert str(bucket) in synced, synced


# -- (d) dlq: the copies of one message in two forms -----------------------------------------------


def test_copies_of_one_message_in_plain_and_compressed_form_are_one_message() -> None:
    """Same message id, same event, same body bytes; the second delivery's longer error made only
    the compressed form fit. Both copies are the one message: redriven once."""
    body = json.dumps({"eventId": "e-1", "pad": "x" * 500}).encode()
    plain = envelope(body, message_id="m1", error="short")
    packed = {**envelope(body, message_id="m1", error="long " * 100), **tw._compressed_fields(body)}
    assert tw.envelope_body(packed) == tw.envelope_body(plain) == body
    entries = [tw.DeadLetter(plain, "h1"), tw.DeadLetter(packed, "h2")]
    assert len(tw.copies_by_message(entries)) == 1


# -- (e) local store: the root the worker makes ----------------------------------------------------


def test_a_local_root_the_worker_makes_is_synced_in_its_parent_before_a_commit_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--local-root names a directory that does not exist yet: the first commit is acknowledged
    only once the root's entry (in tmp_path) is on disk too, as every directory below it is."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "fresh-root"
    store = tw.LocalObjectStore(root, "gcp_gcs")
    local_commit(store, tw.ObjectRef("gcp_gcs", "dst", "key"), b"acknowledged")
    assert str(root) in synced  # the control: gcp_gcs's entry in the root is synced
    assert str(tmp_path) in synced, synced


# -- (c) dead letters: a limit that could not be read ----------------------------------------------


def test_a_dead_letter_the_queue_takes_is_sent_when_its_limit_cannot_be_read(
    aws_env: str, tmp_path: Path
) -> None:
    """1 MiB work and dead-letter queues (SQS's default since 2025), a role without
    sqs:GetQueueAttributes on the DLQ, and a 300 KiB event that is invalid and whose padding
    barely compresses: the worker raises DeadLetterTooLarge (its 256 KiB guess) instead of
    sending the 300 KiB attribute form that the queue would take."""
    import io

    from tests.test_deadletter_size import (
        MiB,
        Refusing,
        SizedSends,
        held,
        incompressible_event,
        make_queues,
        worker_on,
    )

    client = boto3.client("sqs", endpoint_url=aws_env)
    url, dlq = make_queues(client, 1 * MiB)
    body = incompressible_event(300 * 1024)
    client.send_message(QueueUrl=url, MessageBody=body.decode())
    config = tw.Config(
        local_root=str(tmp_path), queue=url, http_port=0, visibility_timeout=30,
        max_message_bytes=1 * MiB,
    )  # fmt: skip
    sends = SizedSends(Refusing(client, "AccessDenied", 403), limit=1 * MiB)
    queue = tw.SQSQueue(config, tw.SQSPublisher(dlq, config, client=sends), client=client)
    log, metrics = io.StringIO(), tw.Metrics()
    worker_on(config, queue, log, metrics).run(once=True)
    too_large = metrics.registry.get_sample_value(
        "dead_letters_too_large_total", {"reason": "invalid_event"}
    )
    assert too_large is None, log.getvalue()[-1500:]
    [envelope] = held(client, dlq)
    assert envelope["reason"] == "invalid_event" and tw.envelope_body(envelope) == body


def test_a_local_queue_event_whose_dead_letter_never_fits_still_ends(
    aws_env: str, tmp_path: Path
) -> None:
    """Finding W2b-8, decided (ADR 4): a local work queue has no redrive policy, so an event whose
    dead letter fits in no form would be redelivered for ever. The worker refuses to start
    instead: `run --queue work.db --dead-letter <SQS queue of 1 KiB>` exits 2 naming
    --dead-letter, its limit and --max-message-bytes, before taking any event. The control: a
    --max-message-bytes whose dead letters fit starts and ends the (empty) run."""
    import subprocess
    import sys

    from tests.test_deadletter_size import HERE, make_queues

    client = boto3.client("sqs", endpoint_url=aws_env)
    _, dlq = make_queues(client, 1024 * 64)
    work = tmp_path / "work.db"
    tw.LocalQueue(work).publish(b'{"not": "an event"}')

    def run(max_bytes: int) -> subprocess.CompletedProcess[str]:
        args = ["run", "--once", "--local-root", str(tmp_path / "root"), "--queue", str(work)]
        args += ["--dead-letter", dlq, "--max-message-bytes", str(max_bytes), "--http-port", "0"]
        return subprocess.run(
            [sys.executable, str(HERE / "transfer_worker.py"), *args],
            cwd=HERE, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    refused = run(256 * 1024)
    assert refused.returncode == 2, refused.stderr
    assert all(word in refused.stderr for word in ("--dead-letter", "65536", "--max-message-bytes"))
    assert tw.LocalQueue(work).depth() == 1  # nothing taken, nothing dropped
    started = run(32 * 1024)
    assert started.returncode == 0, started.stderr
    [envelope] = [json.loads(m["Body"]) for m in client.receive_message(QueueUrl=dlq)["Messages"]]
    assert (envelope["reason"], tw.LocalQueue(work).depth()) == ("invalid_event", 0)


def test_a_bucket_directory_that_is_a_symlink_is_followed_but_not_a_symlink_inside_it(
    tmp_path: Path,
) -> None:
    """W2b-9, decided (ADR 10): the bucket directories are the operator's, who may put a bucket
    on another disk by a symlink; the keys are the producer's, and a symlink met below the
    bucket is still refused invalid_key, for reads and commits alike."""
    elsewhere = tmp_path / "other-disk"
    (elsewhere / "in").mkdir(parents=True)
    (elsewhere / "in" / "data").write_bytes(b"on the other disk")
    (tmp_path / "outside").mkdir()
    (elsewhere / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    root = tmp_path / "root"
    (root / "aws_s3").mkdir(parents=True)
    (root / "aws_s3" / "src").symlink_to(elsewhere, target_is_directory=True)
    store = tw.LocalObjectStore(root, "aws_s3")
    info = store.head(tw.ObjectRef("aws_s3", "src", "in/data"))
    assert info is not None and info.size == len(b"on the other disk")
    local_commit(store, tw.ObjectRef("aws_s3", "src", "in/new"), b"written there")
    assert (elsewhere / "in" / "new").read_bytes() == b"written there"
    for use in (
        lambda: store.head(tw.ObjectRef("aws_s3", "src", "link/secret")),
        lambda: local_commit(store, tw.ObjectRef("aws_s3", "src", "link/new"), b"x"),
    ):
        with pytest.raises(tw.TransferError) as refused:
            use()
        assert refused.value.reason == "invalid_key"
    assert list((tmp_path / "outside").iterdir()) == []
