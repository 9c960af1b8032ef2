"""Review of `dlq list` / `dlq redrive` reading SQS and Pub/Sub dead-letter queues. Each test names
its finding and failed on the code before its fix. Real servers: moto's SQS (in this process, so a
test can give it AWS's rule for superseded receipts and a clock of its own) and Google's Pub/Sub
emulator; the CLI runs as a subprocess where the finding is about what a user sees."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_dlq import SQS, PubSub, cli, poison_event

pytestmark = pytest.mark.timeout(240)


def envelope(body: bytes, reason: str = "forbidden", **extra: Any) -> dict[str, Any]:
    """A dead-letter envelope as the worker writes it."""
    event_id = json.loads(body)["eventId"]
    fields = {
        "reason": reason,
        "error": "x",
        "attempts": 0,
        "message_id": "m",
        "event_id": event_id,
    }
    return {"body": body.decode(), "body_encoding": "utf-8", **fields, **extra}


def listed(settings: list[str], *args: str) -> list[dict[str, Any]]:
    out = cli("dlq", "list", *settings, *args).stdout
    return [json.loads(line) for line in out.splitlines()]


# -- finding 1: one malformed dead letter blocked every list and redrive -------------------------


def sqs_dead_letters(sqs: SQS) -> dict[str, Any]:
    """On the SQS dead-letter queue: one good envelope, and three whose envelope is unreadable
    (an attribute that is not JSON, one that is JSON but no object, a base64 body that is not
    base64). By what the test calls them."""
    good = poison_event("bucket-good")
    attribute = tw.ENVELOPE_ATTRIBUTE
    bad_base64 = {**envelope(poison_event("b")), "body": "!!not base64", "body_encoding": "base64"}
    sent = {
        "good": (json.dumps(envelope(good)), None),
        "not json": (poison_event("b1").decode(), "{not json"),
        "not an object": (poison_event("b2").decode(), "[1, 2]"),
        "bad base64": (json.dumps(bad_base64), None),
    }
    for body, fields in sent.values():
        extra = {attribute: {"DataType": "String", "StringValue": fields}} if fields else {}
        sqs.sqs.send_message(QueueUrl=sqs.dlq, MessageBody=body, MessageAttributes=extra)
    return {"good": good, "raw": {name: body for name, (body, _) in sent.items()}}


def test_malformed_sqs_dead_letters_are_listed_and_never_redriven(aws_env: str) -> None:
    sqs = SQS()
    dead = sqs_dead_letters(sqs)
    result = cli("dlq", "list", *sqs.settings)
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    malformed = [e for e in entries if e["reason"] == "malformed_envelope"]
    assert len(entries) == 4 and len(malformed) == 3
    assert {e["body"] for e in malformed} == {dead["raw"][n] for n in dead["raw"] if n != "good"}
    errors = " | ".join(e["error"] for e in malformed)
    assert "not JSON" in errors and "not a JSON object" in errors and "base64" in errors
    assert "3 dead letter(s) with a malformed envelope" in result.stderr

    redrive = cli("dlq", "redrive", *sqs.settings, check=1)  # exit 1: three left behind
    assert "redrove 1 message(s), 3 failed" in redrive.stderr
    assert "Traceback" not in redrive.stderr
    assert sqs.drain_work() == [dead["good"]]  # the good one's original body, and only it
    left = listed(sqs.settings)
    assert sorted(e["body"] for e in left) == sorted(e["body"] for e in malformed)


def test_a_malformed_pubsub_dead_letter_is_listed_and_left(
    pubsub_topic_subscription: Callable[..., Any],
) -> None:
    resources = pubsub_topic_subscription(dead_letter=True, max_delivery_attempts=10)
    channel = PubSub(resources)
    good = poison_event("bucket-good")
    bad = {**envelope(poison_event("b")), "body": "%%%", "body_encoding": "base64"}
    for doc in (envelope(good), bad):
        topic = resources.dead_letter_topic
        resources.publisher.publish(topic, json.dumps(doc).encode()).result(timeout=30)
    [malformed] = listed(channel.settings, "--reason", "malformed_envelope")
    assert malformed["body"] == json.dumps(bad) and "base64" in malformed["error"]
    redrive = cli("dlq", "redrive", *channel.settings, check=1)
    assert "redrove 1 message(s), 1 failed" in redrive.stderr
    assert channel.drain_work() == [good]
    assert [e["reason"] for e in listed(channel.settings)] == ["malformed_envelope"]


def test_an_envelope_attribute_cannot_replace_the_body_it_travels_with() -> None:
    """The attribute of a large envelope carries the fields beside the body: a "body" in it (no
    worker writes one) must not become what a redrive sends."""
    body = poison_event("bucket-a")
    fields = json.dumps({"reason": "forbidden", "body": "forged", "body_encoding": "utf-8"})
    rebuilt = tw.dead_letter_envelope(body, "m1", fields)
    assert tw.envelope_body(rebuilt) == body and rebuilt["reason"] == "forbidden"


# -- finding 2: a redrive longer than the hold deleted with superseded receipts ------------------


class MotoLikeAWS:
    """Two differences between moto and SQS that finding 2 is about, patched into moto's
    in-process backend for one test. SQS deletes a message received more than once only by its
    latest receipt ("the request succeeds, but the message might not be deleted"); moto deletes
    by any receipt it ever had. And moto's visibility clock is the test's: ``per_receive``
    seconds pass on each ReceiveMessage of the queue named ``slow``, as on a slow link."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from moto.sqs import models

        self.offset_ms = 0
        self.slow = ""
        self.per_receive = 0.0
        real_clock, real_receive = models.unix_time_millis, models.SQSBackend.receive_message
        real_delete = models.Queue.delete_message

        def receive(backend: Any, queue_name: str, *args: Any, **kwargs: Any) -> Any:
            if queue_name == self.slow:
                self.offset_ms += int(self.per_receive * 1000)
            return real_receive(backend, queue_name, *args, **kwargs)

        def delete(queue: Any, receipt: str) -> None:
            if any(receipt in m._old_receipt_handles for m in queue._messages):
                return  # superseded: succeeds, deletes nothing
            real_delete(queue, receipt)

        monkeypatch.setattr(models, "unix_time_millis", lambda: real_clock() + self.offset_ms)
        monkeypatch.setattr(models.SQSBackend, "receive_message", receive)
        monkeypatch.setattr(models.Queue, "delete_message", delete)


class SlowPublisher:
    """The work queue's publisher, taking ``seconds`` per send and calling ``meanwhile`` after
    each: a redrive that outlasts the hold."""

    def __init__(self, inner: Any, seconds: float, meanwhile: Callable[[], None]) -> None:
        self.inner, self.seconds, self.meanwhile = inner, seconds, meanwhile

    def publish(self, body: bytes, *, priority: str = "normal") -> str:
        result = self.inner.publish(body, priority=priority)
        time.sleep(self.seconds)  # bounded: a few sends of 1 s
        self.meanwhile()
        return str(result)


def fill_sqs(sqs: SQS, count: int) -> list[bytes]:
    bodies = [poison_event(f"b-{n}") for n in range(count)]
    for body in bodies:
        sqs.sqs.send_message(QueueUrl=sqs.dlq, MessageBody=json.dumps(envelope(body)))
    return bodies


def redrive_in_process(dead: tw.DeadLetters, target: Any, limit: int = 1000) -> int:
    with dead.held(limit) as entries:
        return tw.redrive(dead, entries, target)


def visible_now(sqs: SQS, url: str) -> list[dict[str, Any]]:
    """What a reader of ``url`` would get now (taken back at once)."""
    items = sqs.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
    for item in items:
        sqs.sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=item["ReceiptHandle"], VisibilityTimeout=0
        )
    return items


def test_a_message_seen_again_is_deleted_by_its_latest_receipt(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """25 dead letters; each ReceiveMessage takes 25 s of moto's clock, so the fourth page, 100 s
    in, brings the first page's ten back with new receipts. Deleting by the first receipts
    left them on the queue, and the next run sent them again."""
    aws = MotoLikeAWS(monkeypatch)
    sqs = SQS()
    bodies = fill_sqs(sqs, 25)
    aws.slow, aws.per_receive = sqs.dlq.rsplit("/", 1)[1], 25
    dead = tw.SQSDeadLetters(sqs.dlq, sqs.sqs)
    assert redrive_in_process(dead, tw.SQSPublisher(sqs.queue, tw.Config(), client=sqs.sqs)) == 0
    aws.per_receive, aws.offset_ms = 0, aws.offset_ms + 3600_000  # every hold long over
    assert visible_now(sqs, sqs.dlq) == []
    assert sorted(sqs.drain_work()) == sorted(bodies)  # each once


def test_an_sqs_redrive_keeps_its_entries_hidden_while_it_runs(aws_env: str) -> None:
    """With a hold of 2 s, a redrive of three entries at 1 s each outlasts it: the entries not
    yet redriven became visible to any other reader (a second `dlq redrive` sent them too)."""
    sqs = SQS()
    bodies = fill_sqs(sqs, 3)
    dead = tw.SQSDeadLetters(sqs.dlq, sqs.sqs)
    dead.hold = 2
    seen: list[Any] = []
    inner = tw.SQSPublisher(sqs.queue, tw.Config(), client=sqs.sqs)
    target = SlowPublisher(inner, 1.0, lambda: seen.extend(visible_now(sqs, sqs.dlq)))
    assert redrive_in_process(dead, target) == 0
    assert seen == []
    assert sorted(sqs.drain_work()) == sorted(bodies)


class RecordingSubscriber:
    """A real SubscriberClient whose pulls are recorded (request and timeout) on their way."""

    def __init__(self) -> None:
        from google.cloud import pubsub_v1

        self.client = pubsub_v1.SubscriberClient()
        self.pulls: list[tuple[dict[str, Any], float]] = []

    def pull(self, *, request: dict[str, Any], timeout: float) -> Any:
        self.pulls.append((dict(request), timeout))
        return self.client.pull(request=request, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@pytest.fixture
def pubsub_dead(pubsub_topic_subscription: Callable[..., Any]) -> Iterator[tuple[Any, PubSub]]:
    resources = pubsub_topic_subscription(dead_letter=True, max_delivery_attempts=10)
    yield resources, PubSub(resources)


def publish_dead(resources: Any, count: int) -> list[bytes]:
    bodies = [poison_event(f"b-{n}") for n in range(count)]
    for body in bodies:
        data = json.dumps(envelope(body)).encode()
        resources.publisher.publish(resources.dead_letter_topic, data).result(timeout=30)
    return bodies


def pulled_now(resources: Any) -> list[Any]:
    """What another reader of the dead-letter subscription gets now (released at once)."""
    from google.api_core.exceptions import DeadlineExceeded

    sub = resources.dead_letter_subscription
    try:
        response = resources.subscriber.pull(subscription=sub, max_messages=10, timeout=1)
    except DeadlineExceeded:  # nothing to get
        return []
    ids = [r.ack_id for r in response.received_messages]
    if ids:
        resources.subscriber.modify_ack_deadline(
            subscription=sub, ack_ids=ids, ack_deadline_seconds=0
        )
    return list(response.received_messages)


def test_a_pubsub_redrive_keeps_its_lease_while_it_runs(pubsub_dead: tuple[Any, PubSub]) -> None:
    """The Pub/Sub side of finding 2: a lease of 2 s, three entries at 2 s each."""
    resources, channel = pubsub_dead
    bodies = publish_dead(resources, 3)
    dead = tw.PubSubDeadLetters(resources.dead_letter_subscription)
    dead.hold = 2
    seen: list[Any] = []
    inner = tw.PubSubPublisher(resources.topic, tw.Config())
    target = SlowPublisher(inner, 2.0, lambda: seen.extend(pulled_now(resources)))
    assert redrive_in_process(dead, target) == 0
    assert seen == []
    assert sorted(channel.drain_work()) == sorted(bodies)


# -- finding 3: a forged transfer-worker-sent skewed queue_lag_seconds ---------------------------


@pytest.mark.parametrize(
    ("offset_ms", "trusted"),
    [
        (-3600_000, True),  # a hand-back an hour after the first send
        (0, True),
        (86400_000, False),  # a day in the future
        (-15 * 86400_000, False),  # before SQS could have kept the first copy (14 days)
    ],
)
def test_a_carried_send_time_is_trusted_only_where_a_first_copy_could_be(
    aws_env: str, offset_ms: int, trusted: bool
) -> None:
    sqs = SQS()
    config = tw.Config(queue=sqs.queue, visibility_timeout=30)
    queue = tw.SQSQueue(config, tw.SQSPublisher(sqs.dlq, config, client=sqs.sqs), client=sqs.sqs)
    carried = int(time.time() * 1000) + offset_ms
    number = {"DataType": "Number", "StringValue": str(carried)}
    sqs.sqs.send_message(
        QueueUrl=sqs.queue, MessageBody="{}", MessageAttributes={tw.SQS_SENT: number}
    )
    [message] = queue.receive(1, 5)
    assert message.sent_at is not None
    if trusted:
        assert message.sent_at == pytest.approx(carried / 1000, abs=0.001)
    else:  # its own SentTimestamp: now, by the moto clock
        assert abs(message.sent_at - time.time()) < 60
    queue.ack(message)


# -- finding 4: every Pub/Sub dlq command waited out a 10 s pull ---------------------------------


def test_an_empty_pubsub_dead_letter_subscription_is_read_without_waiting(
    pubsub_dead: tuple[Any, PubSub],
) -> None:
    """A pull that may wait for messages on an empty subscription waits its whole deadline (the
    emulator and the service alike): each list and redrive took about 10 s. Pages now come from
    immediate pulls, and the end is confirmed by one pull that waits at most 2 s."""
    resources, _ = pubsub_dead
    subscriber = RecordingSubscriber()
    dead = tw.PubSubDeadLetters(resources.dead_letter_subscription, subscriber=subscriber)
    with dead.held(1000) as entries:
        assert entries == []
    assert subscriber.pulls
    for request, timeout in subscriber.pulls:
        assert request.get("return_immediately") or timeout <= 2


def test_pubsub_pages_still_bring_every_dead_letter(pubsub_dead: tuple[Any, PubSub]) -> None:
    resources, _ = pubsub_dead
    bodies = publish_dead(resources, 12)
    dead = tw.PubSubDeadLetters(resources.dead_letter_subscription)
    with dead.held(1000) as entries:
        assert sorted(tw.envelope_body(e.envelope) for e in entries) == sorted(bodies)
