"""The dlq reading side after review wave 2: copies of one message's dead letter go back once, the
hold renewer outlives any error and says so, Pub/Sub deadlines go in the client library's
batches, and a --queue / --dead-letter of an unknown form is refused. Real servers (moto's SQS,
Google's Pub/Sub emulator) where the behaviour is on the wire; the CLI as a subprocess where the
finding is about what a user sees. No test waits without a bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_dlq import SCRIPT, SQS, cli, poison_event
from tests.test_review_dlq import envelope, pubsub_dead, pulled_now

pytestmark = pytest.mark.timeout(240)

__all__ = ["pubsub_dead"]  # the fixture, imported so that pytest finds it here


def copy_of(body: bytes, message_id: str, **extra: Any) -> str:
    """A dead letter of message ``message_id`` as the worker writes it, as JSON."""
    return json.dumps(envelope(body, message_id=message_id, **extra))


# -- copies of one message: sent once, removed only after the send --------------------------------


def test_sqs_copies_of_one_message_are_listed_once_and_redriven_once(aws_env: str) -> None:
    """Three deliveries of message m1 dead-lettered (its ack kept failing), and one other message:
    list shows two entries, m1 with its three copies; redrive sends each body once and leaves
    the dead-letter queue empty."""
    sqs = SQS()
    first, other = poison_event("b-1"), poison_event("b-2")
    for attempts in range(3):
        sqs.sqs.send_message(QueueUrl=sqs.dlq, MessageBody=copy_of(first, "m1", attempts=attempts))
    sqs.sqs.send_message(QueueUrl=sqs.dlq, MessageBody=copy_of(other, "m2"))
    out = cli("dlq", "list", *sqs.settings).stdout
    listed = sorted((e["message_id"], e["copies"]) for e in map(json.loads, out.splitlines()))
    assert listed == [("m1", 3), ("m2", 1)]
    result = cli("dlq", "redrive", *sqs.settings)
    assert "redrove 2 message(s), 0 failed (4 dead letters" in result.stderr
    assert sorted(sqs.drain_work()) == sorted([first, other])
    assert cli("dlq", "list", *sqs.settings).stdout == ""


def local_dead(tmp_path: Path, *envelopes: dict[str, Any]) -> tw.LocalQueue:
    dead = tw.LocalQueue(tmp_path / "dlq.db")
    for doc in envelopes:
        dead.put_dead_letter(doc)
    return dead


def test_only_the_same_message_id_event_and_body_make_copies(tmp_path: Path) -> None:
    """A local queue file made anew numbers its messages from 1 again: two poison bodies of
    message "1" (no event id) are two messages, and a malformed envelope is nobody's copy."""
    poison = {"reason": "invalid_event", "error": "x", "message_id": "1", "event_id": None}
    malformed = {**poison, "reason": tw.MALFORMED_ENVELOPE}
    dead = local_dead(
        tmp_path,
        {"body": "garbage one", **poison},
        {"body": "garbage two", **poison},
        {"body": "garbage one", **poison, "attempts": 3},  # a copy of the first
        {"body": "garbage one", **malformed},
        {"body": "garbage one", **malformed},
    )
    entries = [tw.DeadLetter(doc, row) for row, doc in dead.dead_letters()]
    groups = tw.copies_by_message(entries)
    assert [[e.handle for e in copies] for copies in groups] == [[1, 3], [2], [4], [5]]


class RefusingTarget:
    """A work queue whose every send is refused, as an unreachable one's would be."""

    max_message_bytes = None
    carries_attributes = False

    def __init__(self) -> None:
        self.sends = 0

    def publish(self, body: bytes, **kwargs: Any) -> str:
        self.sends += 1
        raise tw.RetryableError("work queue unreachable", reason="unavailable")


def test_no_copy_is_removed_when_the_one_send_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = poison_event("b-1")
    dead = local_dead(tmp_path, *(envelope(body, message_id="7") for _ in range(3)))
    target = RefusingTarget()
    readers = tw.LocalDeadLetters(dead)
    with readers.held(1000) as entries:
        assert tw.redrive(readers, entries, target) == 1
    assert target.sends == 1  # one send for the three copies, refused
    assert "not sent, left on the dead-letter queue" in capsys.readouterr().err
    assert len(dead.dead_letters()) == 3


def test_a_dry_run_names_a_message_with_copies_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = poison_event("b-1")
    local_dead(tmp_path, *(envelope(body, message_id="7") for _ in range(2)))
    settings = ["--local-root", str(tmp_path), "--dead-letter", str(tmp_path / "dlq.db")]
    assert tw.main(["dlq", "redrive", "--dry-run", *settings]) == 0
    err = capsys.readouterr().err
    assert err.count("would redrive ") == 2  # the message's line and the summary
    assert "would redrive 1 message(s), 0 failed (2 dead letters" in err


# -- the hold renewer: any error fails one beat, reported once per streak -------------------------


def test_the_renewer_reports_each_streak_of_failures_once_and_counts_them_at_the_end() -> None:
    outcomes = [ValueError("Cannot invoke RPC on closed channel!")] * 3 + [None]
    outcomes += [RuntimeError("untranslated")] * 2
    done = threading.Event()

    def renew() -> None:
        if not outcomes:
            done.set()
            return
        if (outcome := outcomes.pop(0)) is not None:
            raise outcome

    reports: list[str] = []
    with tw.HoldRenewer(renew, period=0.01, report=reports.append):
        assert done.wait(timeout=5.0)  # bounded: 500 beats
    assert len(reports) == 3, reports  # two streaks, then the summary
    assert "closed channel" in reports[0] and "untranslated" in reports[1]
    assert reports[2].startswith("warning: 5 renewal(s)")


class VisibilityRefused:
    """The real SQS client, whose renewals (a visibility other than 0) raise botocore's own
    ParamValidationError, which aws_error does not translate, until ``failures`` are spent."""

    def __init__(self, client: Any, failures: int) -> None:
        self.client, self.failures = client, failures
        self.refused = threading.Event()

    def change_message_visibility_batch(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ParamValidationError

        renewal = any(e["VisibilityTimeout"] for e in kwargs["Entries"])
        if renewal and self.failures > 0:
            self.failures -= 1
            if not self.failures:
                self.refused.set()
            raise ParamValidationError(report="Invalid type for parameter Entries")
        return self.client.change_message_visibility_batch(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_an_sqs_list_whose_renewals_fail_warns_and_still_releases(
    aws_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sqs = SQS()
    body = poison_event("b-1")
    sqs.sqs.send_message(QueueUrl=sqs.dlq, MessageBody=copy_of(body, "m1"))
    client = VisibilityRefused(sqs.sqs, failures=2)
    dead = tw.SQSDeadLetters(sqs.dlq, client)
    dead.hold = 1  # a beat every 1/3 s
    with dead.held(10) as entries:
        assert client.refused.wait(timeout=10.0)
        tw.list_dead_letters(entries)
    err = capsys.readouterr().err
    assert err.count("could not be extended") == 1 and "ParamValidationError" in err
    assert "warning: 2 renewal(s) of the dead letters' hold failed" in err
    visible = sqs.sqs.receive_message(QueueUrl=sqs.dlq, MaxNumberOfMessages=10)
    assert [m["Body"] for m in visible.get("Messages", [])] == [copy_of(body, "m1")]


# -- Pub/Sub: ModifyAckDeadline in batches of the client library's size ---------------------------


class RecordingDeadlines:
    """A real SubscriberClient whose ModifyAckDeadline requests are recorded on their way."""

    def __init__(self) -> None:
        from google.cloud import pubsub_v1

        self.client = pubsub_v1.SubscriberClient()
        self.deadlines: list[tuple[int, int]] = []  # (number of ack ids, seconds)

    def modify_ack_deadline(self, *, request: dict[str, Any]) -> Any:
        self.deadlines.append((len(request["ack_ids"]), request["ack_deadline_seconds"]))
        return self.client.modify_ack_deadline(request=request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_more_than_a_thousand_held_pubsub_entries_are_released_in_batches(
    pubsub_dead: tuple[Any, Any],
) -> None:
    resources, _ = pubsub_dead
    data = [json.dumps(envelope(poison_event(f"b-{n}"))).encode() for n in range(1005)]
    futures = [resources.publisher.publish(resources.dead_letter_topic, d) for d in data]
    for future in futures:
        future.result(timeout=60)
    subscriber = RecordingDeadlines()
    dead = tw.PubSubDeadLetters(resources.dead_letter_subscription, subscriber=subscriber)
    with dead.held(1100) as entries:
        assert len(entries) == 1005
        subscriber.deadlines.clear()  # the pages' own: a hundred at most each
    assert sorted(subscriber.deadlines) == [(5, 0), (1000, 0)]  # the release
    assert pulled_now(resources)  # released: deliverable again at once


# -- an unknown form of --queue / --dead-letter is refused, not made a file -----------------------


@pytest.mark.parametrize(
    ("setting", "value", "forms"),
    [
        ("--queue", "sqs:/typo", tw.CONSUME_FORMS),
        ("--queue", "sqs:typo", tw.CONSUME_FORMS),
        ("--dead-letter", "sqs:typo", tw.PUBLISH_FORMS),
        ("--dead-letter", "projects/p/typo/t", tw.PUBLISH_FORMS),
    ],
    ids=["queue-slash", "queue", "dead-letter", "dead-letter-projects"],
)
def test_dlq_refuses_a_queue_of_an_unknown_form(
    tmp_path: Path, setting: str, value: str, forms: str
) -> None:
    result = subprocess.run(
        [sys.executable, SCRIPT, "dlq", "list", setting, value, "--local-root", "root"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert forms in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


# -- a cloud dead-letter queue is never redriven into the local queue ------------------------------


@pytest.mark.parametrize("dry_run", [False, True], ids=["redrive", "dry_run"])
def test_an_sqs_redrive_without_queue_is_refused_and_moves_nothing(
    aws_env: str, tmp_path: Path, dry_run: bool
) -> None:
    """Newcomer finding: `dlq redrive --dead-letter URL` without --queue sent the bodies to the
    local queue that --queue names by default (a laptop file, out of the pipeline) and exited
    0. It is refused, naming --queue, a dry run too; the dead letter stays where it was."""
    sqs = SQS()
    body = poison_event("b-1")
    sqs.sqs.send_message(QueueUrl=sqs.dlq, MessageBody=copy_of(body, "m1"))
    local = ["--local-root", str(tmp_path)]
    result = cli(
        "dlq", "redrive", "--dead-letter", sqs.dlq, *local, *(["--dry-run"] * dry_run), check=2
    )
    assert "needs --queue" in result.stderr
    assert not list(tmp_path.rglob("*.db")), "no local queue was made"
    listed = cli("dlq", "list", *sqs.settings).stdout.splitlines()
    assert [json.loads(line)["message_id"] for line in listed] == ["m1"]
