"""Review of issue 11's survival promises (classifier, queue survival, GCS resume), by a fresh-
context adversary. Each test names its finding; it failed on the code before its fix (or is a
strict xfail naming what stays open). Real servers (moto) where the behaviour is on the wire;
sleeps are recorded, never slept."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw

pytestmark = pytest.mark.timeout(120)


def make_event(key: str = "in/data.bin") -> dict[str, Any]:
    return {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": "2024-01-15T10:30:00Z",
        "source": {"provider": "aws_s3", "bucket": "src", "key": key},
        "destination": {"provider": "gcp_gcs", "bucket": "dst", "key": f"copy/{key}"},
    }


def put_source(root: Path, key: str, data: bytes) -> None:
    path = root / "aws_s3" / "src" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def copied(root: Path, key: str) -> bytes | None:
    path = root / "gcp_gcs" / "dst" / "copy" / key
    return path.read_bytes() if path.exists() else None


@pytest.fixture
def sqs(aws_env: str) -> Iterator[tuple[Any, str, str]]:
    """A work queue and a dead-letter queue on moto."""
    import boto3

    client = boto3.client("sqs", endpoint_url=aws_env)
    name = f"rev11-{uuid.uuid4().hex[:10]}"
    url = client.create_queue(QueueName=name)["QueueUrl"]
    dlq = client.create_queue(QueueName=name + "-dlq")["QueueUrl"]
    yield client, url, dlq
    client.delete_queue(QueueUrl=url)
    client.delete_queue(QueueUrl=dlq)


def drain_queue(client: Any, url: str) -> list[dict[str, Any]]:
    """Every message now visible on ``url`` (received with a long visibility: read, not taken
    back)."""
    seen: list[dict[str, Any]] = []
    while True:
        batch = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, VisibilityTimeout=600
        ).get("Messages", [])
        if not batch:
            return seen
        seen += batch


def worker_on(config: tw.Config, queue: Any, log: io.StringIO) -> tw.Worker:
    return tw.Worker(
        config,
        queue,
        tw.TransferEngine(tw.build_stores(config)),
        tw.Metrics(),
        tw.make_logger("DEBUG", log),
        sleep=lambda seconds: None,
    )


# -- finding 1: one malformed carried count poisons every receive ---------------------------------


def test_finding1_a_malformed_hand_back_attribute_does_not_block_the_queue(
    sqs: tuple[Any, str, str], tmp_path: Path
) -> None:
    """SQS Number attributes may be decimals ("1.5"): int() raised inside receive(), after SQS
    had hidden the whole batch, so the good message beside it was never handed to a transfer and
    every receive failed (the worker reported the queue unreachable) until the redrive policy
    took both, without an envelope."""
    client, url, dlq = sqs
    data = os.urandom(4096)
    put_source(tmp_path, "in/data.bin", data)
    event = make_event()
    client.send_message(QueueUrl=url, MessageBody=json.dumps(event))
    odd = {"DataType": "Number", "StringValue": "1.5"}
    client.send_message(
        QueueUrl=url,
        MessageBody=json.dumps(make_event("in/other.bin")),
        MessageAttributes={tw.SQS_HANDBACKS: odd, tw.SQS_DELIVERIES: odd},
    )
    config = tw.Config(local_root=str(tmp_path), queue=url, http_port=0, visibility_timeout=30)
    queue = tw.SQSQueue(config, tw.SQSPublisher(dlq, config, client=client), client=client)
    received = queue.receive(10, 1) + queue.receive(10, 1)
    assert len(received) == 2
    for message in received:
        assert message.receive_count >= 1 and message.handed_back >= 0
        queue.retry_later(message, 0)

    log = io.StringIO()
    worker_on(config, queue, log).run(once=True)
    assert copied(tmp_path, "in/data.bin") == data, log.getvalue()


# -- finding 2: an S3 token that must be refreshed is not a permanent error ------------------------


def test_finding2_token_refresh_required_is_retried_as_credentials() -> None:
    """S3's 400 TokenRefreshRequired ("The provided token must be refreshed") is cured by the next
    attempt's refreshed credentials, like ExpiredToken; it was dead-lettered destination_error."""
    from botocore.exceptions import ClientError

    response = {
        "Error": {"Code": "TokenRefreshRequired", "Message": "The token must be refreshed"},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }
    error = tw.aws_error(ClientError(response, "UploadPart"), "destination")  # type: ignore[arg-type]
    assert type(error) is tw.RetryableError and error.reason == "credentials"


# -- finding 3: a dead-letter whose ack fails is published again on every retry --------------


class FailingDeletes:
    """The real boto3 SQS client, whose first ``failures`` DeleteMessage calls fail the way a
    dropped connection does (botocore's own exception)."""

    def __init__(self, client: Any, failures: int) -> None:
        self.client, self.failures = client, failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def delete_message(self, **kwargs: Any) -> Any:
        from botocore.exceptions import EndpointConnectionError

        if self.failures > 0:
            self.failures -= 1
            raise EndpointConnectionError(endpoint_url="http://sqs.down.invalid")
        return self.client.delete_message(**kwargs)


def test_finding3_a_dead_letter_is_published_once_when_its_ack_is_retried(
    sqs: tuple[Any, str, str], tmp_path: Path
) -> None:
    """dead_letter() is publish-then-delete, retried as one: each retry of a failed delete sent
    the envelope again, so one invalid event became four dead letters (and a redrive ran it four
    times)."""
    client, url, dlq = sqs
    client.send_message(QueueUrl=url, MessageBody="not json")
    config = tw.Config(local_root=str(tmp_path), queue=url, http_port=0, visibility_timeout=30)
    flaky = FailingDeletes(client, failures=3)
    queue = tw.SQSQueue(config, tw.SQSPublisher(dlq, config, client=client), client=flaky)
    log = io.StringIO()
    worker_on(config, queue, log).run(once=True)
    assert flaky.failures == 0, log.getvalue()
    letters = drain_queue(client, dlq)
    assert [json.loads(m["Body"])["reason"] for m in letters] == ["invalid_event"]
    assert drain_queue(client, url) == []
