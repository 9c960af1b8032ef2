"""Review of `dlq list` / `dlq redrive` reading SQS and Pub/Sub dead-letter queues. Each test names
its finding and failed on the code before its fix. Real servers: moto's SQS (in this process, so a
test can give it AWS's rule for superseded receipts and a clock of its own) and Google's Pub/Sub
emulator; the CLI runs as a subprocess where the finding is about what a user sees."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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
