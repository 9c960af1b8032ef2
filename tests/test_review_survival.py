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
import tenacity

import transfer_worker as tw
from tests.test_queue_outage import copied, make_event, put_source

pytestmark = pytest.mark.timeout(120)


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


# -- finding 4: a second delivery of a message whose first one lost its lease ---------------------


def test_finding4_a_redelivery_to_the_same_worker_is_not_stopped_by_the_lost_first_one(
    tmp_path: Path,
) -> None:
    """After a queue outage longer than the visibility timeout the heartbeat marks the lease
    lost; the queue returns and this same worker receives the message again while the first
    transfer still winds down. The worker kept lost/handed-back state by message id, which both
    deliveries share: the new, rightful delivery was stopped at once as 'lease lost', nothing
    settled it, and the event waited another visibility timeout with one more counted attempt."""
    import threading

    from tests.test_queue_outage import Rig, gated_stores, submit

    stores = gated_stores(tmp_path)
    rig = Rig(tmp_path, stores=stores, visibility_timeout=30, concurrency=2)
    data = os.urandom(300 * 1024)
    submit(rig, data)
    second = threading.Event()
    calls: list[int] = []

    def outage_past_the_lease() -> None:
        calls.append(1)
        if len(calls) > 1:  # the second delivery reached the gate: it was not stopped
            second.set()
            return
        rig.clock.advance(31)
        rig.queue.failures["extend"] = 1
        assert rig.worker.heartbeat is not None
        rig.worker.heartbeat.beat()  # unreachable, 31 s since the last extension: lost
        stopped = lambda: second.is_set() or rig.logs("Transfer stopped")  # noqa: E731
        from tests import conftest

        conftest.wait_for(stopped, 20, message="the second delivery")
        stores["aws_s3"].gate.set()

    stores["aws_s3"].at_gate = outage_past_the_lease
    rig.worker.run(once=True)

    assert rig.dead_letters() == []
    assert copied(tmp_path, "in/data.bin") == data, rig.stream.getvalue()
    assert rig.queue.depth() == 0  # the second delivery acknowledged it


# -- finding 5: the drain handed back a delivery whose lease was lost ------------------------------


def test_finding5_a_lost_lease_is_not_handed_back_as_a_copy(
    sqs: tuple[Any, str, str], tmp_path: Path
) -> None:
    """A drain hands back every transfer still running, including one whose lease the heartbeat
    saw lost. On SQS a hand-back sends a copy and deletes the original: the copy duplicates a
    message another worker now owns (the delete with a stale receipt does not remove it)."""
    client, url, dlq = sqs
    config = tw.Config(local_root=str(tmp_path), queue=url, http_port=0, visibility_timeout=30)
    queue = tw.SQSQueue(config, tw.SQSPublisher(dlq, config, client=client), client=client)
    client.send_message(QueueUrl=url, MessageBody=json.dumps(make_event()))
    [mine] = queue.receive(1, 1)
    client.change_message_visibility(QueueUrl=url, ReceiptHandle=mine.handle, VisibilityTimeout=0)
    [theirs] = client.receive_message(QueueUrl=url, VisibilityTimeout=600)["Messages"]
    worker = worker_on(config, queue, io.StringIO())
    worker._lose_lease(mine, "receipt_invalid")  # what the heartbeat reports
    worker._hand_back(mine)  # what the drain does with a transfer still running
    assert drain_queue(client, url) == []  # no second copy beside the other worker's
    client.delete_message(QueueUrl=url, ReceiptHandle=theirs["ReceiptHandle"])


# -- finding 6: a wall clock set back during an outage stretched the unreachable grace ------------


def test_finding6_a_clock_set_back_does_not_stretch_the_unreachable_grace() -> None:
    """The grace is measured on the worker's wall clock. NTP setting it back a day during an
    endpoint outage made every unreachable attempt "within the grace" for a day: the event kept
    its slot and retried for 24 hours instead of 300 s before counting attempts."""
    from conftest import Clock

    clock = Clock()
    attempts: list[int] = []

    def unreachable() -> None:
        attempts.append(1)
        if len(attempts) == 2:
            clock.advance(-86400)  # the clock is corrected backwards mid-outage
        raise tw.RetryableError("connection refused", reason=tw.UNREACHABLE)

    retrying = tenacity.Retrying(
        stop=tw.AttemptBudget(2, 300, clock) | tenacity.stop_after_attempt(10_000),
        wait=tenacity.wait_fixed(30),
        sleep=lambda seconds: clock.advance(seconds),
        retry=tenacity.retry_if_exception_type(tw.RetryableError),
        reraise=True,
    )
    with pytest.raises(tw.RetryableError):
        retrying(unreachable)
    # 300 s of grace at 30 s a try (restarted at most once by the jump), then 2 counted attempts
    assert len(attempts) <= 2 * 300 // 30 + 4


# -- finding 7: an envelope larger than SQS's message limit ---------------------------------------


def test_finding7_an_event_near_the_sqs_limit_is_still_dead_lettered(
    sqs: tuple[Any, str, str], tmp_path: Path
) -> None:
    client, url, dlq = sqs
    for queue_url in (url, dlq):  # queues made before 2025, or sized so: SQS's old 256 KiB
        client.set_queue_attributes(
            QueueUrl=queue_url, Attributes={"MaximumMessageSize": str(256 * 1024)}
        )
    body = '{"not": "an event", "padding": "' + '\\"' * (120 * 1024) + '"}'
    client.send_message(QueueUrl=url, MessageBody=body)  # ~240 KiB: SQS takes it
    config = tw.Config(local_root=str(tmp_path), queue=url, http_port=0, visibility_timeout=30)
    queue = tw.SQSQueue(config, tw.SQSPublisher(dlq, config, client=client), client=client)
    log = io.StringIO()
    worker_on(config, queue, log).run(once=True)
    assert "Queue unreachable" not in log.getvalue()
    with tw.SQSDeadLetters(dlq, client).held(10) as letters:  # as `dlq list` reads them
        assert [e.envelope["reason"] for e in letters] == ["invalid_event"], log.getvalue()
        assert tw.envelope_body(letters[0].envelope) == body.encode()  # what a redrive sends
        assert letters[0].envelope["receive_count"] == 1 and "error" in letters[0].envelope
    assert client.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages") is None


# -- finding 8: a message handed back on every delivery -------------------------------------------


def _handed_back(rig: Any, times: int) -> None:
    for _ in range(times):
        (message,) = rig.queue.receive(1, 0)
        rig.queue.hand_back(message)


@pytest.mark.parametrize(
    ("hand_backs", "outcome"),
    [(tw.HANDBACK_ALLOWANCE + 3, "transferred"), (tw.HANDBACK_ALLOWANCE + 4, "retries_exhausted")],
)
def test_finding8_a_message_handed_back_on_every_delivery_ends_in_the_dead_letter_queue(
    tmp_path: Path, hand_backs: int, outcome: str
) -> None:
    """A graceful stop never counted as an attempt, so a message whose worker is stopped with
    SIGTERM on every delivery (a liveness probe, a crash-looping node) was handed back for ever.
    Hand-backs beyond HANDBACK_ALLOWANCE count again: with the default 4 attempts, the delivery
    after allowance + 4 hand-backs has none left and is dead-lettered with its reason."""
    from tests.test_queue_outage import Rig, submit

    rig = Rig(tmp_path)
    event = submit(rig)
    _handed_back(rig, hand_backs)
    rig.worker.run(once=True)
    to = event["destination"]
    destination = tmp_path / to["provider"] / to["bucket"] / to["key"]
    if outcome == "transferred":
        assert destination.exists() and rig.dead_letters() == []
    else:
        assert not destination.exists()
        assert [e["reason"] for e in rig.dead_letters()] == ["retries_exhausted"]
