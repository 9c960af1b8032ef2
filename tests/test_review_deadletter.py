"""Review of the dead-letter publishing side: an envelope's size against its queue's limit
(finding 1), one dead letter per delivery on every queue, a publisher's stated limit, the
hand-back accounting on Pub/Sub (finding 5) and a local commit's failed directory fsync (finding
4). Each test failed on the code before its fix. Real servers (moto, the Pub/Sub emulator) where
the behaviour is on the wire; sleeps are recorded, never slept."""

from __future__ import annotations

import errno
import io
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_queue_outage import copied, make_event, put_source

pytestmark = pytest.mark.timeout(180)

KiB = 1024


@pytest.fixture
def sqs(aws_env: str) -> Iterator[tuple[Any, str, str]]:
    """A work queue and a dead-letter queue on moto, both of SQS's long-standing 256 KiB (a queue
    made before 2025, or sized so)."""
    import boto3

    client = boto3.client("sqs", endpoint_url=aws_env)
    name = f"revdl-{uuid.uuid4().hex[:10]}"
    urls = [client.create_queue(QueueName=n)["QueueUrl"] for n in (name, name + "-dlq")]
    for url in urls:
        client.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": str(256 * KiB)})
    yield client, urls[0], urls[1]
    for url in urls:
        client.delete_queue(QueueUrl=url)


class SizedSends:
    """The real boto3 SQS client, with SendMessage held to SQS's size rule, which moto does not
    apply (moto compares only the body's length, in characters, with MaximumMessageSize): the
    body plus each message attribute's name, data type and value, in UTF-8 bytes. Over it, the
    request is answered as SQS answers it (InvalidParameterValue); every size sent is kept."""

    def __init__(self, client: Any, limit: int = 256 * KiB) -> None:
        self.client, self.limit = client, limit
        self.sizes: list[int] = []
        self.with_attributes: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def send_message(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        attributes = kwargs.get("MessageAttributes") or {}
        size = len(kwargs["MessageBody"].encode()) + sum(
            len(f"{name}{value['DataType']}{value['StringValue']}".encode())
            for name, value in attributes.items()
        )
        self.sizes.append(size)
        self.with_attributes.append(bool(attributes))
        if size > self.limit:
            error = {
                "Code": "InvalidParameterValue",
                "Message": "One or more parameters are invalid. Reason: Message must be shorter "
                f"than {self.limit} bytes.",
            }
            raise ClientError({"Error": error}, "SendMessage")
        return self.client.send_message(**kwargs)


class Recorded:
    """A publisher seen through a wrapper (as a test, a metrics or tracing layer sees it): what
    it states and publishes is the wrapped one's; each body sent is kept."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.bodies: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def publish(self, body: bytes, **kwargs: Any) -> Any:
        self.bodies.append(body)
        return self.target.publish(body, **kwargs)


def worker_on(config: tw.Config, queue: Any, log: io.StringIO, metrics: Any = None) -> tw.Worker:
    return tw.Worker(
        config,
        queue,
        tw.TransferEngine(tw.build_stores(config)),
        metrics or tw.Metrics(),
        tw.make_logger("DEBUG", log),
        sleep=lambda seconds: None,
    )


def bad_event(size: int, padding: str = "b") -> bytes:
    """A JSON event of ``size`` bytes whose correlationId holds 150 KiB: the schema's message
    repeats the whole value, so the error alone is 150 KiB. Padded with ``padding`` characters
    (a quote is escaped in the body, and escaped again in a JSON envelope)."""
    event = make_event()
    event["correlationId"] = "a" * (150 * KiB)
    event["metadata"]["padding"] = ""
    room = size - len(json.dumps(event))
    event["metadata"]["padding"] = padding * (room // len(json.dumps(padding)[1:-1]))
    body = json.dumps(event).encode()
    assert size - 1 <= len(body) <= size
    return body


# -- finding 1: an oversize error made the envelope too large in both forms ------------------------


@pytest.mark.parametrize(
    ("size", "padding", "form"),
    [
        (250 * KiB, "b", "json"),  # the envelope with the error cut fits as JSON
        (250 * KiB, '"', "attribute"),  # escaped twice as JSON: the body and fields beside it
        (256 * KiB - 700, "b", "error left out"),  # even the cut error is too much
    ],
)
def test_finding1_an_event_with_a_huge_bad_field_is_dead_lettered_with_its_reason(
    sqs: tuple[Any, str, str], tmp_path: Path, size: int, padding: str, form: str
) -> None:
    """An event near 256 KiB whose bad field is 150 KiB: the envelope's error repeated it at full
    length, so the body plus the transfer-worker-envelope attribute was over SQS's limit too,
    SendMessage refused it on every delivery, and the redrive policy would move it without its
    reason. The error is cut at a few KiB, saying so; where even that is too much, left out."""
    client, url, dlq = sqs
    body = bad_event(size, padding)
    client.send_message(QueueUrl=url, MessageBody=body.decode())  # within the work queue's limit
    config = tw.Config(local_root=str(tmp_path), queue=url, http_port=0, visibility_timeout=30)
    sends = SizedSends(client)
    queue = tw.SQSQueue(config, tw.SQSPublisher(dlq, config, client=sends), client=client)
    log = io.StringIO()
    worker_on(config, queue, log).run(once=True)

    assert len(sends.sizes) == 1 and sends.sizes[0] <= 256 * KiB, (sends.sizes, log.getvalue())
    assert sends.with_attributes == [form != "json"]
    with tw.SQSDeadLetters(dlq, client).held(10) as letters:  # as `dlq list` reads them
        [letter] = letters
        envelope = letter.envelope
    assert envelope["reason"] == "invalid_event"
    assert tw.envelope_body(envelope) == body  # what a redrive sends
    if form == "error left out":
        assert envelope["error"] == tw.ERROR_LEFT_OUT
    else:
        assert envelope["error"].startswith("$.correlationId: 'aaaa")
        assert envelope["error"].endswith("characters in all]")
        assert len(json.dumps(envelope["error"])) <= tw.ERROR_TEXT_LIMIT
    [line] = [x for x in map(json.loads, log.getvalue().splitlines()) if "reason" in x]
    assert line["message"] == "Event dead-lettered" and len(line["error"]) <= tw.ERROR_TEXT_LIMIT
    assert client.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages") is None


def test_an_error_text_is_cut_to_its_limit_even_when_escapes_grow_it() -> None:
    r"""Control characters and non-ASCII text grow sixfold as JSON (\u0001): the cut is measured
    on the JSON, not on the characters."""
    for text in ("x" * 10_000, "\x01" * 10_000, "é" * 10_000, "😀" * 10_000):
        cut = tw.capped(text)
        assert len(json.dumps(cut)) <= tw.ERROR_TEXT_LIMIT
        assert cut.startswith(text[:100]) and cut.endswith(" [cut: 10000 characters in all]")
    assert tw.capped("short") == "short"


# -- a publisher states its own limit --------------------------------------------------------------


def test_a_wrapped_sqs_publisher_still_gets_the_attribute_form(
    sqs: tuple[Any, str, str], tmp_path: Path
) -> None:
    """The choice of form asked ``isinstance(target, SQSPublisher)``: any other object in front
    of the SQS publisher got the JSON envelope whatever its size, which SQS refused. It is now
    decided from what the publisher states (max_message_bytes, carries_attributes)."""
    client, url, dlq = sqs
    body = '{"not": "an event", "padding": "' + '\\"' * (120 * KiB) + '"}'  # escapes grow it
    client.send_message(QueueUrl=url, MessageBody=body)
    config = tw.Config(local_root=str(tmp_path), queue=url, http_port=0, visibility_timeout=30)
    target = Recorded(tw.SQSPublisher(dlq, config, client=client))
    log = io.StringIO()
    worker_on(config, tw.SQSQueue(config, target, client=client), log).run(once=True)
    assert target.bodies == [body.encode()], log.getvalue()  # the body, fields beside it
    with tw.SQSDeadLetters(dlq, client).held(10) as letters:
        assert [e.envelope["reason"] for e in letters] == ["invalid_event"]
        assert tw.envelope_body(letters[0].envelope) == body.encode()


def test_each_publisher_states_its_limit(sqs: tuple[Any, str, str]) -> None:
    """SQS: the queue's own MaximumMessageSize (the fixture's 256 KiB; tests/
    test_deadletter_size.py has a 1 MiB one)."""
    client, _, dlq = sqs
    publisher = tw.SQSPublisher(dlq, tw.Config(), client=client)
    assert (publisher.max_message_bytes, publisher.carries_attributes) == (256 * KiB, True)
    assert tw.PubSubPublisher.max_message_bytes == 10_000_000
    assert tw.PubSubPublisher.carries_attributes is False
    assert tw.LocalQueue.max_message_bytes is None and tw.LocalDeadLetters.max_message_bytes is None


# -- one dead letter per delivery, on Pub/Sub too --------------------------------------------------


class FlakyAcks(tw.PubSubQueue):
    """The real Pub/Sub queue whose first ``failures`` acks fail as an unreachable service does
    (the classifier's RetryableError), before anything is sent."""

    failures = 0

    def ack(self, message: tw.Message) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise tw.RetryableError("Pub/Sub 503 ServiceUnavailable", reason="unavailable")
        super().ack(message)


def pull_all(resources: Any, subscription: str) -> list[bytes]:
    bodies: list[bytes] = []
    while True:
        response = resources.subscriber.pull(subscription=subscription, max_messages=10, timeout=5)
        if not response.received_messages:
            return bodies
        bodies += [bytes(item.message.data) for item in response.received_messages]
        ids = [item.ack_id for item in response.received_messages]
        resources.subscriber.acknowledge(subscription=subscription, ack_ids=ids)


def test_a_pubsub_dead_letter_is_published_once_when_its_ack_is_retried(
    pubsub_topic_subscription: Callable[..., Any], tmp_path: Path
) -> None:
    """dead_letter() was publish-then-ack, retried as a whole by the worker; only SQSQueue kept
    a set of receipts already published. On Pub/Sub each failed ack published the envelope
    again: one invalid event, four dead letters. The worker now publishes once and retries only
    the ack, on every queue."""
    resources = pubsub_topic_subscription(dead_letter=True, max_delivery_attempts=20)
    resources.publisher.publish(resources.topic, b"not json").result(timeout=30)
    config = tw.Config(
        local_root=str(tmp_path), queue=resources.subscription, http_port=0, concurrency=1
    )
    target = tw.PubSubPublisher(resources.dead_letter_topic, config)
    queue = FlakyAcks(config, target)
    queue.failures = 3
    log = io.StringIO()
    try:
        worker_on(config, queue, log).run(once=True)
    finally:
        queue.close()
    assert queue.failures == 0, log.getvalue()
    letters = [json.loads(b) for b in pull_all(resources, resources.dead_letter_subscription)]
    assert [e["reason"] for e in letters] == ["invalid_event"], log.getvalue()
    assert pull_all(resources, resources.subscription) == []  # acknowledged in the end


# -- finding 5: on Pub/Sub every redelivery counted as a hand-back ---------------------------------


def test_finding5_pubsub_redeliveries_are_not_taken_for_hand_backs(
    pubsub_topic_subscription: Callable[..., Any], tmp_path: Path
) -> None:
    """Pub/Sub records no hand-back, so every earlier delivery was taken for one, and after
    HANDBACK_ALLOWANCE + 1 deliveries the budget shrank as if hand-backs beyond the allowance
    had happened: the 15th delivery of an event that never failed in this worker was
    dead-lettered retries_exhausted, its error claiming '14 of them handed back'. On Pub/Sub
    the budget is per delivery (ADR 11); the subscription's max_delivery_attempts is the net."""
    resources = pubsub_topic_subscription(dead_letter=True, max_delivery_attempts=30)
    event = make_event(max_retries=3)
    put_source(tmp_path, "in/data.bin", b"z" * 4096)
    resources.publisher.publish(resources.topic, json.dumps(event).encode()).result(timeout=30)
    deliveries = 0
    for _ in range(tw.HANDBACK_ALLOWANCE + 4):  # deliveries that never settled (nacked)
        response = resources.subscriber.pull(
            subscription=resources.subscription, max_messages=1, timeout=10
        )
        [item] = response.received_messages
        deliveries = item.delivery_attempt
        resources.subscriber.modify_ack_deadline(
            subscription=resources.subscription, ack_ids=[item.ack_id], ack_deadline_seconds=0
        )
    assert deliveries == tw.HANDBACK_ALLOWANCE + 4  # the emulator counts them
    config = tw.Config(
        local_root=str(tmp_path), queue=resources.subscription, http_port=0, concurrency=1
    )
    queue = tw.PubSubQueue(config, tw.PubSubPublisher(resources.dead_letter_topic, config))
    log = io.StringIO()
    try:
        worker_on(config, queue, log).run(once=True)
    finally:
        queue.close()
    assert copied(tmp_path, "in/data.bin") == b"z" * 4096, log.getvalue()
    assert pull_all(resources, resources.dead_letter_subscription) == []


def test_a_local_retries_exhausted_error_says_how_many_hand_backs_are_forgiven(
    tmp_path: Path,
) -> None:
    """Where hand-backs are recorded (local, SQS) the text counts real ones and says that only
    HANDBACK_ALLOWANCE of them are forgiven, so the arithmetic is visible."""
    from tests.test_queue_outage import Rig, submit

    rig = Rig(tmp_path)
    submit(rig)
    for _ in range(tw.HANDBACK_ALLOWANCE + 4):
        (message,) = rig.queue.receive(1, 0)
        rig.queue.hand_back(message)
    rig.worker.run(once=True)
    [envelope] = rig.dead_letters()
    assert envelope["reason"] == "retries_exhausted"
    assert envelope["error"] == (
        f"delivered {tw.HANDBACK_ALLOWANCE + 5} times without settling, "
        f"{tw.HANDBACK_ALLOWANCE + 4} of them handed back at shutdown "
        f"(at most {tw.HANDBACK_ALLOWANCE} are forgiven; attempt budget 4)"
    )


# -- finding 4: a local commit's failed directory fsync went unreported ----------------------------


def test_finding4_a_failed_directory_fsync_after_a_local_commit_is_logged_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit is done (its bytes are visible) and acknowledged, but the directory fsync
    failed, so a power loss may undo it. The error was kept on the upload (``unsynced``) and
    nobody read it: no log line, no metric. Now one WARNING per transfer, with the destination
    and the error, and local_fsync_failures_total."""
    from tests.test_queue_outage import Rig, submit

    def failing_fsync(path: Any) -> None:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(tw, "_fsync_dir", failing_fsync)
    rig = Rig(tmp_path)
    event = submit(rig, b"q" * 3000)
    rig.worker.run(once=True)
    assert copied(tmp_path, "in/data.bin") == b"q" * 3000
    assert rig.queue.depth() == 0 and rig.dead_letters() == []
    [warning] = rig.logs("Committed, but the directory fsync failed")
    assert warning["level"] == "WARNING" and "Input/output error" in warning["error"]
    to = event["destination"]
    assert warning["destination"].endswith(f"{to['bucket']}/{to['key']}")
    assert rig.metric("local_fsync_failures_total") == 1
    assert rig.logs("Transfer completed successfully")
