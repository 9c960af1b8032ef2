"""`dlq list` and `dlq redrive` against real servers (moto's SQS, Google's Pub/Sub emulator): the
dead letters come from a real worker run, the CLI runs as a subprocess, and every assertion is
on what the queues hold afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent.parent
SCRIPT = str(HERE / "transfer_worker.py")

pytestmark = pytest.mark.timeout(240)


def poison_event(bucket: str) -> bytes:
    """A well-formed event naming a bucket outside --allowed-buckets: dead-lettered "forbidden"."""
    event = {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"provider": "aws_s3", "bucket": bucket, "key": "in/a.bin"},
        "destination": {"provider": "gcp_gcs", "bucket": bucket, "key": "out/a.bin"},
        "metadata": {"maxRetries": 0},
    }
    return json.dumps(event).encode()


def cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=HERE, capture_output=True, text=True, timeout=120
    )
    if check is not None:
        assert result.returncode == check, result.stderr + result.stdout
    return result


class SQS:
    kind = "sqs"

    def __init__(self) -> None:
        import boto3

        self.sqs = boto3.client("sqs")
        self.queue = self.sqs.create_queue(QueueName=f"work-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        self.dlq = self.sqs.create_queue(QueueName=f"dlq-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        self.settings = ["--queue", self.queue, "--dead-letter", self.dlq]

    def send(self, body: bytes) -> None:
        self.sqs.send_message(QueueUrl=self.queue, MessageBody=body.decode())

    def drain_work(self) -> list[bytes]:
        """Every body on the work queue, consumed."""
        bodies = []
        while items := self.sqs.receive_message(
            QueueUrl=self.queue, MaxNumberOfMessages=10, WaitTimeSeconds=1
        ).get("Messages", []):
            for item in items:
                bodies.append(item["Body"].encode())
                self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=item["ReceiptHandle"])
        return bodies

    def break_work_queue(self) -> None:
        self.sqs.delete_queue(QueueUrl=self.queue)


class PubSub:
    kind = "pubsub"

    def __init__(self, resources: Any) -> None:
        self.r = resources
        self.queue = resources.subscription
        self.settings = ["--queue", resources.subscription, "--dead-letter"]
        self.settings += [resources.dead_letter_topic]
        self.settings += ["--dead-letter-subscription", resources.dead_letter_subscription]

    def send(self, body: bytes) -> None:
        self.r.publisher.publish(self.r.topic, body).result(timeout=30)

    def drain_work(self) -> list[bytes]:
        bodies = []
        while True:
            response = self.r.subscriber.pull(subscription=self.queue, max_messages=10, timeout=5)
            if not response.received_messages:
                return bodies
            bodies += [bytes(item.message.data) for item in response.received_messages]
            ids = [item.ack_id for item in response.received_messages]
            self.r.subscriber.acknowledge(subscription=self.queue, ack_ids=ids)

    def break_work_queue(self) -> None:
        self.r.publisher.delete_topic(topic=self.r.topic)


@pytest.fixture(params=["sqs", "pubsub"])
def channel(request: pytest.FixtureRequest, aws_env: str, gcs_env: str) -> Any:
    if request.param == "sqs":
        return SQS()
    make = request.getfixturevalue("pubsub_topic_subscription")
    return PubSub(make(dead_letter=True, max_delivery_attempts=10))


@pytest.fixture
def dead(channel: Any) -> dict[str, bytes]:
    """Three dead letters written by a real worker run: two "forbidden" events, one poison body
    ("invalid_event"); by event id (None for the poison)."""
    bodies = {}
    for _ in range(2):
        body = poison_event(f"b-{uuid.uuid4().hex[:8]}")
        bodies[json.loads(body)["eventId"]] = body
        channel.send(body)
    channel.send(b"this is not json")
    bodies[None] = b"this is not json"
    run = ["run", "--once", "--storage", "cloud", "--allowed-buckets", "aws_s3:only-this"]
    cli(*run, "--http-port", "0", *channel.settings)
    return bodies


def listed(channel: Any, *args: str) -> list[dict[str, Any]]:
    out = cli("dlq", "list", *channel.settings, *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_list_shows_every_dead_letter_and_consumes_none(channel: Any, dead: dict) -> None:
    first = listed(channel)
    assert sorted(map(str, (e["event_id"] for e in first))) == sorted(map(str, dead))
    again = listed(channel)  # still there: the list released what it read
    assert sorted(map(str, (e["event_id"] for e in again))) == sorted(map(str, dead))
    entry = next(e for e in first if e["event_id"] is not None)
    assert entry["reason"] == "forbidden"
    assert entry["attempts"] == 0 and entry["time"]  # refused before any attempt
    bucket = json.loads(dead[entry["event_id"]])["source"]["bucket"]
    assert entry["source"] == f"s3://{bucket}/in/a.bin"
    assert entry["destination"] == f"gs://{bucket}/out/a.bin"


def test_reason_filters_the_list(channel: Any, dead: dict) -> None:
    [poison] = listed(channel, "--reason", "invalid_event")
    assert poison["body"] == "this is not json"
    assert len(listed(channel, "--reason", "forbidden")) == 2


def test_redrive_by_event_id_moves_only_that_event(channel: Any, dead: dict) -> None:
    chosen = next(k for k in dead if k is not None)
    cli("dlq", "redrive", *channel.settings, "--event-id", chosen)
    assert channel.drain_work() == [dead[chosen]]  # the producer's body, byte for byte
    left = {e["event_id"] for e in listed(channel)}
    assert left == set(dead) - {chosen}


def test_redrive_by_reason_and_dry_run(channel: Any, dead: dict) -> None:
    dry = cli("dlq", "redrive", *channel.settings, "--reason", "invalid_event", "--dry-run")
    assert "would redrive 1" in dry.stderr
    assert len(listed(channel)) == 3
    cli("dlq", "redrive", *channel.settings, "--reason", "invalid_event")
    assert channel.drain_work() == [b"this is not json"]
    assert {e["reason"] for e in listed(channel)} == {"forbidden"}


def test_a_redrive_whose_send_fails_leaves_the_entry(channel: Any, dead: dict) -> None:
    chosen = next(k for k in dead if k is not None)
    channel.break_work_queue()
    result = cli("dlq", "redrive", *channel.settings, "--event-id", chosen, check=1)
    if channel.kind == "sqs":  # the send itself fails
        assert chosen in result.stderr and "left on the dead-letter queue" in result.stderr
    else:  # the subscription no longer names a topic to send to: nothing is tried
        assert "receives no topic" in result.stderr
    assert "Traceback" not in result.stderr
    assert {e["event_id"] for e in listed(channel)} == set(dead)


def test_pubsub_dead_letters_need_their_subscription(pubsub_env: str) -> None:
    topic = "projects/p/topics/dead"
    result = cli("dlq", "list", "--dead-letter", topic, check=2)
    assert "--dead-letter-subscription" in result.stderr


def test_a_cloud_queue_without_dead_letter_queue_is_a_usage_error(aws_env: str) -> None:
    import boto3

    queue = boto3.client("sqs").create_queue(QueueName=f"bare-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    result = cli("dlq", "list", "--queue", queue, check=2)
    assert "--dead-letter" in result.stderr and "RedrivePolicy" in result.stderr
    result = cli("dlq", "list", "--queue", "projects/p/subscriptions/s", check=2)
    assert "--dead-letter" in result.stderr


def test_the_redrive_policy_names_the_sqs_dead_letter_queue(aws_env: str) -> None:
    """Without --dead-letter, the work queue's RedrivePolicy says where its dead letters are;
    a body that policy moved there is the original event itself."""
    sqs = SQS()
    arn = sqs.sqs.get_queue_attributes(QueueUrl=sqs.dlq, AttributeNames=["QueueArn"])
    policy = {"deadLetterTargetArn": arn["Attributes"]["QueueArn"], "maxReceiveCount": "5"}
    attributes = {"RedrivePolicy": json.dumps(policy)}
    sqs.sqs.set_queue_attributes(QueueUrl=sqs.queue, Attributes=attributes)
    body = poison_event("bucket-z")
    sqs.sqs.send_message(QueueUrl=sqs.dlq, MessageBody=body.decode())
    out = cli("dlq", "list", "--queue", sqs.queue).stdout
    [entry] = [json.loads(line) for line in out.splitlines()]
    assert entry["reason"] == "queue_delivery_limit"
    assert entry["event_id"] == json.loads(body)["eventId"]
    cli("dlq", "redrive", "--queue", sqs.queue)
    assert sqs.drain_work() == [body]
    assert cli("dlq", "list", "--queue", sqs.queue).stdout == ""


def test_an_unreachable_dead_letter_queue_is_a_clear_error(aws_env: str) -> None:
    url = aws_env.rstrip("/") + "/123456789012/no-such-queue"
    result = cli("dlq", "list", "--dead-letter", url, "--queue", url, check=1)
    assert "unreachable" in result.stderr and "Traceback" not in result.stderr


def test_local_dead_letters_filter_by_reason_and_event_ids(tmp_path: Path) -> None:
    root = ["--local-root", str(tmp_path)]
    first, second = poison_event("bucket-x"), poison_event("bucket-y")
    for body in (first, second, b"this is not json"):
        subprocess.run(
            [sys.executable, SCRIPT, "submit", "--no-validate", "-", *root],
            input=body.decode(), cwd=HERE, check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    cli("run", "--once", "--allowed-buckets", "aws_s3:only-this", "--http-port", "0", *root)
    ids = [json.loads(b)["eventId"] for b in (first, second)]
    by_reason = listed_local(root, "--reason", "invalid_event")
    assert [e["body"] for e in by_reason] == ["this is not json"]
    both = listed_local(root, "--event-id", ids[0], "--event-id", ids[1])
    assert sorted(e["event_id"] for e in both) == sorted(ids)
    cli("dlq", "redrive", *root, "--reason", "forbidden", "--event-id", ids[1])
    assert sorted(str(e["event_id"]) for e in listed_local(root)) == sorted([ids[0], "None"])


def listed_local(root: list[str], *args: str) -> list[dict[str, Any]]:
    out = cli("dlq", "list", *root, *args).stdout
    return [json.loads(line) for line in out.splitlines()]
