"""The worker survives its queue (issue 11): failed queue calls back off instead of ending the
worker, are counted, logged once per streak and shown on /ready; shutdown hand-backs do not use up
an event's attempt budget; a lease the heartbeat cannot keep stops its transfer.

Unit tests drive the real Worker on a real LocalQueue (or SQSQueue on moto) with failing
subclasses in front; sleeps are recorded, never slept. The last test runs the real CLI against
moto in server mode behind a proxy that goes away for a few seconds (connection refused)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sqlite3
import sys
import threading
import time
import typing
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from conftest import Clock
from tests.conftest import LoggedProcess, free_port, wait_for
from tests.faultproxy import FaultProxy

HERE = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
pytestmark = pytest.mark.timeout(120)


# -- helpers --------------------------------------------------------------------------------------


def make_event(key: str = "in/data.bin", max_retries: int = 3) -> dict[str, Any]:
    return {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": "2024-01-15T10:30:00Z",
        "source": {"provider": "aws_s3", "bucket": "src", "key": key},
        "destination": {"provider": "gcp_gcs", "bucket": "dst", "key": f"copy/{key}"},
        "metadata": {"maxRetries": max_retries},
    }


def put_source(root: Path, key: str, data: bytes) -> None:
    path = root / "aws_s3" / "src" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def copied(root: Path, key: str) -> bytes | None:
    path = root / "gcp_gcs" / "dst" / "copy" / key
    return path.read_bytes() if path.exists() else None


class Down(Exception):
    """What an SDK raises before the adapter's classifier knows it (a refused connection)."""


class FailingQueue(tw.LocalQueue):
    """A real LocalQueue whose named operations fail while ``failures[operation]`` > 0, with a
    raw SDK-like exception and a RetryableError in turn (both reach the worker today)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def _maybe_fail(self, operation: str) -> None:
        self.calls[operation] = self.calls.get(operation, 0) + 1
        left = self.failures.get(operation, 0)
        if left > 0:
            self.failures[operation] = left - 1
            if left % 2:
                raise Down("connect ECONNREFUSED 127.0.0.1:4566")
            raise tw.RetryableError("SQS 503 ServiceUnavailable", reason="unavailable")

    def receive(self, max_messages: int, wait_seconds: float) -> list[tw.Message]:
        self._maybe_fail("receive")
        return super().receive(max_messages, wait_seconds)

    def ack(self, message: tw.Message) -> None:
        self._maybe_fail("ack")
        super().ack(message)

    def dead_letter(self, message: tw.Message, envelope: Any) -> None:
        self._maybe_fail("dead_letter")
        super().dead_letter(message, envelope)

    def extend(self, message: tw.Message, seconds: float) -> bool:
        self._maybe_fail("extend")
        return super().extend(message, seconds)


class Rig:
    """A Worker on a temporary local root and a FailingQueue; its log is captured, its sleeps
    are recorded (``on_sleep`` may act on them: heal the queue, stop the worker)."""

    def __init__(self, root: Path, *, stores: dict[str, Any] | None = None, **settings: Any):
        self.root = root
        settings = {"backoff_initial": 1.0, "backoff_max": 8.0, **settings}
        self.config = tw.Config(local_root=str(root), http_port=0, **settings)
        self.clock = Clock()
        self.queue = FailingQueue(
            root / "queue.db",
            clock=self.clock,
            poll_interval=0.01,
            visibility_timeout=self.config.visibility_timeout,
        )
        self.metrics = tw.Metrics()
        self.readiness = tw.Readiness({})
        self.stream = io.StringIO()
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[float], None] = lambda seconds: None
        self.worker = tw.Worker(
            self.config,
            self.queue,
            tw.TransferEngine(stores or tw.build_stores(self.config)),
            self.metrics,
            tw.make_logger("DEBUG", self.stream),
            clock=self.clock,
            sleep=self._sleep,
            readiness=self.readiness,
        )

    def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.on_sleep(seconds)

    def logs(self, message: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [x for x in lines if message is None or x["message"].startswith(message)]

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def dead_letters(self) -> list[dict[str, Any]]:
        return [envelope for _, envelope in self.queue.dead_letters()]


def submit(rig: Rig, data: bytes = b"x" * 5000, **kwargs: Any) -> dict[str, Any]:
    event = make_event(**kwargs)
    put_source(rig.root, event["source"]["key"], data)
    rig.queue.publish(json.dumps(event).encode())
    return event


# -- the run loop: receive ------------------------------------------------------------------------


def test_failed_receives_back_off_are_counted_and_the_worker_carries_on(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    submit(rig)
    rig.queue.failures["receive"] = 5
    seen_ready: list[list[str]] = []
    rig.on_sleep = lambda seconds: seen_ready.append(rig.readiness.problems())

    rig.worker.run(once=True)

    assert copied(tmp_path, "in/data.bin") == b"x" * 5000
    assert rig.queue.depth() == 0
    # The configured backoff, doubling from --backoff-initial (plus jitter up to it) to the cap.
    assert len(rig.sleeps) == 5
    for n, slept in enumerate(rig.sleeps):
        assert min(8.0, 2**n) <= slept <= min(8.0, 2**n + 1.0)
    assert rig.metric("queue_errors_total", operation="receive") == 5
    # One warning for the streak, one "reachable again" with its count; /ready 503 meanwhile.
    [warning] = rig.logs("Queue unreachable")
    assert warning["level"] == "WARNING" and warning["operation"] == "receive"
    [again] = rig.logs("Queue reachable again")
    assert again["level"] == "INFO" and again["failures"] == 5
    assert all(any(p.startswith("queue: unreachable") for p in ps) for ps in seen_ready)
    rig.readiness.draining.clear()  # run() ended with its drain
    assert rig.readiness.problems() == []


def test_a_stop_during_the_receive_backoff_ends_the_worker_at_once(tmp_path: Path) -> None:
    """The default sleep waits on the stop event: SIGTERM (stop()) cuts a 60 s backoff short."""
    config = tw.Config(local_root=str(tmp_path), http_port=0, backoff_initial=60, backoff_max=60)
    queue = FailingQueue(tmp_path / "queue.db", poll_interval=0.01)
    queue.failures["receive"] = 10**6
    log = io.StringIO()
    engine = tw.TransferEngine(tw.build_stores(config))
    worker = tw.Worker(config, queue, engine, tw.Metrics(), tw.make_logger("INFO", log))
    thread = threading.Thread(target=worker.run, name="worker-under-test", daemon=True)
    thread.start()
    wait_for(lambda: queue.calls.get("receive"), 10, message="a first receive")
    started = time.monotonic()
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 5
    assert "Worker stopped" in log.getvalue()


def test_run_once_gives_up_on_a_permanent_receive_error(tmp_path: Path) -> None:
    """A batch run against a queue that does not exist fails instead of waiting for ever."""

    class Missing(FailingQueue):
        def receive(self, max_messages: int, wait_seconds: float) -> list[tw.Message]:
            raise tw.PermanentError("AWS ReceiveMessage: NonExistentQueue", reason="queue_error")

    rig = Rig(tmp_path)
    rig.worker.queue = Missing(tmp_path / "other.db")
    with pytest.raises(tw.PermanentError):
        rig.worker.run(once=True)
    assert rig.sleeps == []


# -- settling: ack and dead-letter ----------------------------------------------------------------


def test_a_failed_ack_is_retried_with_backoff_and_not_redelivered(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    submit(rig)
    rig.queue.failures["ack"] = 3
    rig.worker.run(once=True)
    assert rig.queue.calls["ack"] == 4
    assert rig.queue.depth() == 0  # acknowledged after all: no redelivery, no second transfer
    assert rig.metric("queue_errors_total", operation="ack") == 3
    assert len(rig.logs("Queue unreachable")) == 1
    assert rig.logs("Queue reachable again")[0]["failures"] == 3


def test_a_failed_dead_letter_is_retried_with_backoff(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.queue.publish(b"not json")
    rig.queue.failures["dead_letter"] = 2
    rig.worker.run(once=True)
    [envelope] = rig.dead_letters()
    assert envelope["reason"] == "invalid_event"
    assert rig.queue.depth() == 0
    assert rig.metric("queue_errors_total", operation="dead_letter") == 2


def test_a_permanent_ack_error_is_not_retried(tmp_path: Path) -> None:
    class Refusing(FailingQueue):
        def ack(self, message: tw.Message) -> None:
            self.calls["ack"] = self.calls.get("ack", 0) + 1
            raise tw.PermanentError("AWS DeleteMessage: AccessDenied", reason="access_denied")

    rig = Rig(tmp_path)
    rig.worker.queue = queue = Refusing(
        tmp_path / "refusing.db", clock=rig.clock, visibility_timeout=300
    )
    event = make_event()
    put_source(tmp_path, "in/data.bin", b"y" * 10)
    queue.publish(json.dumps(event).encode())
    rig.worker.run(once=True)
    assert queue.calls["ack"] == 1
    assert rig.logs("Could not settle message")[0]["operation"] == "ack"


# -- the heartbeat --------------------------------------------------------------------------------


def heartbeat(
    queue: Any, message: tw.Message, clock: Clock, lost: list[tuple[str, str]], **kwargs: Any
) -> tw.Heartbeat:
    return tw.Heartbeat(
        queue,
        lambda: [message],
        30,
        tw.make_logger("DEBUG", io.StringIO()),
        on_lost=lambda m, why: lost.append((m.message_id, why)),
        backoff=lambda failures: float(2 ** (failures - 1)),
        clock=clock,
        **kwargs,
    )


def test_a_local_receipt_taken_by_another_worker_is_a_lost_lease(tmp_path: Path) -> None:
    clock = Clock()
    queue = tw.LocalQueue(tmp_path / "q.db", clock=clock, visibility_timeout=30)
    queue.publish(b"{}")
    [mine] = queue.receive(1, 0)
    assert queue.extend(mine, 30) is True
    clock.advance(31)
    [theirs] = queue.receive(1, 0)  # the timeout passed: another worker has it now
    assert queue.extend(mine, 30) is False
    assert queue.extend(theirs, 30) is True

    lost: list[tuple[str, str]] = []
    heartbeat(queue, mine, clock, lost).beat()
    assert lost == [(mine.message_id, "receipt_invalid")]


def test_an_unreachable_queue_keeps_the_lease_until_it_has_certainly_expired(
    tmp_path: Path,
) -> None:
    clock = Clock()
    queue = FailingQueue(tmp_path / "q.db", clock=clock, visibility_timeout=30)
    queue.publish(b"{}")
    [message] = queue.receive(1, 0)
    metrics, stream = tw.Metrics(), io.StringIO()
    outage = tw.QueueOutage(tw.make_logger("DEBUG", stream), metrics)
    lost: list[tuple[str, str]] = []
    beat = heartbeat(queue, message, clock, lost, outage=outage)
    assert beat.next_wait() == 10  # a third of the visibility timeout

    clock.advance(10)
    beat.beat()  # renewed at t=10: the lease now runs until t=40
    queue.failures["extend"] = 3
    waits = []
    for _ in range(3):  # t = 20, 30, 40: unreachable, but the lease may still be ours
        clock.advance(10)
        beat.beat()
        waits.append(beat.next_wait())
    assert lost == []
    assert waits == [1.0, 2.0, 4.0]  # the next beat comes sooner, along the backoff
    queue.failures["extend"] = 1
    clock.advance(1)  # t = 41: more than 30 s since the last extension
    beat.beat()
    assert lost == [(message.message_id, "lease_expired")]
    assert metrics.registry.get_sample_value("queue_errors_total", {"operation": "extend"}) == 4
    assert stream.getvalue().count("Queue unreachable") == 1


@pytest.fixture
def sqs(aws_env: str) -> Iterator[tuple[Any, str]]:
    import boto3

    client = boto3.client("sqs", endpoint_url=aws_env)
    url = client.create_queue(QueueName=f"outage-{uuid.uuid4().hex[:10]}")["QueueUrl"]
    yield client, url
    client.delete_queue(QueueUrl=url)


def sqs_queue(client: Any, url: str, visibility: int = 30) -> tw.SQSQueue:
    config = tw.Config(queue=url, visibility_timeout=visibility)
    return tw.SQSQueue(config, tw.SQSPublisher(url, config, client=client), client=client)


def test_an_sqs_receipt_that_is_gone_is_a_lost_lease(sqs: tuple[Any, str]) -> None:
    client, url = sqs
    queue = sqs_queue(client, url)
    client.send_message(QueueUrl=url, MessageBody="{}")
    [message] = queue.receive(1, 1)
    assert queue.extend(message, 30) is True
    client.delete_message(QueueUrl=url, ReceiptHandle=message.handle)  # settled elsewhere
    assert queue.extend(message, 30) is False

    lost: list[tuple[str, str]] = []
    heartbeat(queue, message, Clock(time.time()), lost).beat()
    assert lost == [(message.message_id, "receipt_invalid")]


def test_an_sqs_endpoint_that_refuses_connections_is_not_a_lost_lease(
    sqs: tuple[Any, str],
) -> None:
    import boto3
    from botocore.config import Config as BotoConfig

    client, url = sqs
    client.send_message(QueueUrl=url, MessageBody="{}")
    [message] = sqs_queue(client, url).receive(1, 1)
    with socket.socket() as closed:  # a port nobody listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    refused = boto3.client("sqs", endpoint_url=dead, config=BotoConfig(retries={"max_attempts": 1}))
    queue = sqs_queue(refused, url)
    with pytest.raises(Exception):  # raw or translated: the classifier's business
        queue.extend(message, 30)

    clock, lost = Clock(time.time()), []
    beat = heartbeat(queue, message, clock, lost)
    beat.beat()
    assert lost == [] and beat.failures == 1
    clock.advance(31)
    beat.beat()
    assert lost == [(message.message_id, "lease_expired")]


class GatedStore(tw.LocalObjectStore):
    """Reads stop before their second chunk until ``gate`` is set; ``at_gate`` runs there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.reading = threading.Event()
        self.at_gate: Callable[[], None] = lambda: None

    def open_read(self, ref: tw.ObjectRef, info: tw.ObjectInfo) -> Any:
        inner = super().open_read(ref, info)
        store = self

        class Gated:
            def __enter__(self) -> Iterator[bytes]:
                chunks = inner.__enter__()

                def gated() -> Iterator[bytes]:
                    for number, chunk in enumerate(chunks):
                        if number == 1:
                            store.reading.set()
                            store.at_gate()
                            assert store.gate.wait(20), "gate never opened"
                        yield chunk

                return gated()

            def __exit__(self, *exc: Any) -> Any:
                return inner.__exit__(*exc)

        return Gated()


def gated_stores(root: Path) -> dict[str, Any]:
    stores: dict[str, Any] = tw.build_stores(tw.Config(local_root=str(root)))
    stores["aws_s3"] = GatedStore(root, "aws_s3", chunk_size=64 * 1024)
    return stores


def test_a_transfer_whose_lease_is_lost_stops_and_commits_nothing(tmp_path: Path) -> None:
    stores = gated_stores(tmp_path)
    rig = Rig(tmp_path, stores=stores, visibility_timeout=30)
    submit(rig, os.urandom(300 * 1024))
    other = tw.LocalQueue(tmp_path / "queue.db", clock=rig.clock, visibility_timeout=30)
    taken: list[tw.Message] = []

    def another_worker_takes_it() -> None:
        rig.clock.advance(31)  # this worker was paused past its visibility timeout
        taken.extend(other.receive(1, 0))
        assert rig.worker.heartbeat is not None
        rig.worker.heartbeat.beat()
        stores["aws_s3"].gate.set()

    stores["aws_s3"].at_gate = another_worker_takes_it
    rig.worker.run(once=True)

    assert len(taken) == 1
    assert copied(tmp_path, "in/data.bin") is None  # stopped at its next chunk, upload aborted
    assert [p for p in (tmp_path / ".tmp").rglob("*") if p.is_file()] == []  # no temp file left
    [lost] = rig.logs("Lease lost")
    assert lost["reason"] == "receipt_invalid"
    [stopped] = rig.logs("Transfer stopped")
    assert stopped["outcome"] == "released"
    assert rig.dead_letters() == []
    assert other.extend(taken[0], 30) is True  # the other worker's lease is untouched
    other.ack(taken[0])
    assert rig.queue.depth() == 0


# -- hand-backs do not use up the budget ----------------------------------------------------------


def rollout(root: Path, visibility: int = 30) -> Rig:
    """One worker that starts the event's transfer and is stopped with --drain-timeout 0 while
    the transfer runs: the drain hands the message back, the transfer stops at its next chunk."""
    stores = gated_stores(root)
    rig = Rig(root, stores=stores, drain_timeout=0, visibility_timeout=visibility)
    thread = threading.Thread(target=rig.worker.run, name="rolled-out", daemon=True)
    thread.start()
    wait_for(
        lambda: stores["aws_s3"].reading.is_set() or rig.dead_letters(), 20, message="a transfer"
    )
    assert rig.dead_letters() == [], "dead-lettered instead of transferred"
    rig.worker.stop()
    wait_for(lambda: rig.logs("Drain timeout passed"), 20, message="the drain's hand-back")
    assert rig.worker.heartbeat is not None
    rig.worker.heartbeat.beat()  # a beat while the transfer winds down must not hide it again
    with sqlite3.connect(root / "queue.db") as db:
        [(visible_at,)] = db.execute("SELECT visible_at FROM messages").fetchall()
    assert visible_at <= rig.clock()
    stores["aws_s3"].gate.set()
    thread.join(20)
    assert not thread.is_alive()
    return rig


def test_shutdown_hand_backs_beyond_the_budget_do_not_exhaust_the_event(tmp_path: Path) -> None:
    first = Rig(tmp_path)
    data = os.urandom(300 * 1024)
    submit(first, data, max_retries=1)  # a budget of 2 attempts
    for _ in range(5):
        rig = rollout(tmp_path)
        assert rig.dead_letters() == []
        assert copied(tmp_path, "in/data.bin") is None

    final = Rig(tmp_path)
    [message] = final.queue.receive(1, 0)
    assert (message.receive_count, message.handed_back) == (6, 5)
    final.queue.retry_later(message, 0)
    final.worker.run(once=True)
    assert final.dead_letters() == []
    assert copied(tmp_path, "in/data.bin") == data


def test_a_hand_back_after_a_failed_attempt_still_counts_it(tmp_path: Path) -> None:
    class FailingHead(tw.LocalObjectStore):
        def head(self, ref: tw.ObjectRef) -> tw.ObjectInfo | None:
            raise tw.RetryableError("timeout", reason="network")

    stores: dict[str, Any] = tw.build_stores(tw.Config(local_root=str(tmp_path)))
    stores["aws_s3"] = FailingHead(tmp_path, "aws_s3")
    rig = Rig(tmp_path, stores=stores)
    submit(rig)

    def sigterm_during_the_backoff(seconds: float) -> None:
        rig.worker.stop()
        raise tw.ShutdownRequested()

    rig.on_sleep = sigterm_during_the_backoff
    [message] = rig.queue.receive(1, 0)
    rig.worker.handle(message)
    [again] = rig.queue.receive(1, 0)
    assert (again.receive_count, again.handed_back) == (2, 0)  # the failure is not forgotten


def test_an_old_queue_db_gains_the_hand_back_column(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL,
        priority INTEGER NOT NULL DEFAULT 1, enqueued_at REAL NOT NULL, visible_at REAL NOT NULL,
        receive_count INTEGER NOT NULL DEFAULT 0, receipt TEXT);
        INSERT INTO messages (body, enqueued_at, visible_at, receive_count)
        VALUES (x'7b7d', 0, 0, 2);"""
    )
    db.commit()
    db.close()
    queue = tw.LocalQueue(path)
    [message] = queue.receive(1, 0)
    assert (message.receive_count, message.handed_back) == (3, 0)
    queue.hand_back(message)
    [again] = tw.LocalQueue(path).receive(1, 0)  # a second process opens the migrated file
    assert (again.receive_count, again.handed_back) == (4, 1)


def test_sqs_hand_backs_are_carried_on_a_copy_and_do_not_exhaust_the_event(
    sqs: tuple[Any, str], tmp_path: Path
) -> None:
    client, url = sqs
    queue = sqs_queue(client, url)
    event = make_event(max_retries=1)
    data = os.urandom(2048)
    put_source(tmp_path, "in/data.bin", data)
    client.send_message(QueueUrl=url, MessageBody=json.dumps(event))
    for n in range(1, 6):
        [message] = queue.receive(1, 1)
        assert (message.receive_count, message.handed_back) == (n, n - 1)
        queue.hand_back(message)

    config = tw.Config(local_root=str(tmp_path), queue=url, http_port=0, visibility_timeout=30)
    stream = io.StringIO()
    worker = tw.Worker(
        config,
        queue,
        tw.TransferEngine(tw.build_stores(config)),
        tw.Metrics(),
        tw.make_logger("DEBUG", stream),
        sleep=lambda seconds: None,
    )
    worker.run(once=True)
    assert copied(tmp_path, "in/data.bin") == data, stream.getvalue()
    attrs = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0"
    assert attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_a_pubsub_delivery_count_claims_no_hand_backs() -> None:
    """Pub/Sub counts nacks in delivery_attempt and carries nothing between deliveries: no
    hand-back is known, and the worker's budget is per delivery there (records_handbacks);
    max_delivery_attempts is the safety net (ADR 11)."""

    class Received:  # the fields of a google.cloud.pubsub_v1 subscriber Message that are read
        data, delivery_attempt, message_id = b"{}", 7, "m-1"

    message = tw.PubSubQueue._message(Received())
    assert (message.receive_count, message.handed_back) == (7, 0)
    assert tw.PubSubQueue.records_handbacks is False


def test_a_pubsub_lease_past_the_clients_maximum_is_lost() -> None:
    """The client's lease management stops extending a message ``max_lease`` after receipt."""
    config = tw.Config(queue="projects/p/subscriptions/s")
    queue = tw.PubSubQueue(config, typing.cast(Any, None), subscriber=object())
    fresh = tw.Message(body=b"{}", receive_count=1, handle=None, message_id="m-1")
    old = tw.Message(
        body=b"{}",
        receive_count=1,
        handle=None,
        message_id="m-2",
        received_at=time.time() - queue.max_lease - 1,
    )
    assert queue.extend(fresh, 300) is True
    assert queue.extend(old, 300) is False


def test_a_pubsub_stream_that_ended_is_opened_again_by_a_later_receive(
    pubsub_topic_subscription: Callable[..., Any],
) -> None:
    """A stream the server ended (here: the subscription did not exist yet) raises once; the
    worker backs off and its next receive opens a new stream, instead of raising for ever."""
    resources = pubsub_topic_subscription()
    subscriber = resources.subscriber
    late = subscriber.subscription_path(resources.project, f"late-{uuid.uuid4().hex[:10]}")
    config = tw.Config(queue=late, concurrency=2)
    queue = tw.PubSubQueue(config, tw.PubSubPublisher(resources.topic, config))
    errors: list[Exception] = []

    def receive_fails() -> bool:
        try:
            queue.receive(1, 0.2)
        except tw.TransferError as exc:
            errors.append(exc)
        return bool(errors)

    try:
        wait_for(receive_fails, 30, message="the stream to end with NotFound")
        subscriber.create_subscription(name=late, topic=resources.topic, timeout=30)
        resources.publisher.publish(resources.topic, b'{"late": true}').result(timeout=30)
        received: list[tw.Message] = []
        wait_for(lambda: received.extend(queue.receive(1, 1)) or received, 30, message="a message")
        assert received[0].body == b'{"late": true}'
        queue.ack(received[0])
    finally:
        queue.close()
        subscriber.delete_subscription(subscription=late, timeout=30)


# -- the real CLI through a queue outage ----------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class WorkerProcess(LoggedProcess):
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        super().__init__([PYTHON, str(HERE / "transfer_worker.py"), "run", *args], env, cwd=HERE)


def test_a_worker_rides_out_connection_refused_on_its_queue(aws_env: str, tmp_path: Path) -> None:
    """8 s of connection refused on the SQS endpoint used to end the worker with a traceback.
    Now it stays up, /ready is 503 during the outage and 200 after, /metrics counts the failed
    calls, one WARNING covers the streak, and the event sent during the outage is transferred."""
    import boto3

    sqs = boto3.client("sqs", endpoint_url=aws_env)
    work = sqs.create_queue(QueueName=f"blip-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    dlq = sqs.create_queue(QueueName=f"blip-dlq-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    root, port = tmp_path / "root", free_port()
    data = os.urandom(4096)
    event = make_event()
    put_source(root, "in/data.bin", data)

    proxy = FaultProxy(aws_env).start()
    proxy_port = int(proxy.url.rsplit(":", 1)[1])
    env = {**os.environ, "AWS_ENDPOINT_URL_SQS": proxy.url}
    args = ["--storage", "local", "--local-root", str(root), "--queue", work]
    args += ["--dead-letter", dlq, "--http-port", str(port), "--http-host", "127.0.0.1"]
    args += ["--backoff-initial", "0.2", "--backoff-max", "1", "--visibility-timeout", "10"]
    worker = WorkerProcess(args, env)
    try:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, 30, message="/ready 200")

        proxy.stop()  # connection refused from now on
        outage_started = time.monotonic()
        sqs.send_message(QueueUrl=work, MessageBody=json.dumps(event))
        wait_for(lambda: http_get(port, "/ready")[0] == 503, 30, message="/ready 503")
        _, text = http_get(port, "/ready")
        assert "queue: unreachable" in text, text
        while time.monotonic() - outage_started < 8:
            assert worker.proc.poll() is None, worker.text()
            time.sleep(0.2)
        assert copied(root, "in/data.bin") is None

        proxy = FaultProxy(aws_env, port=proxy_port).start()  # the endpoint is back
        wait_for(lambda: copied(root, "in/data.bin") == data, 60, message="the transfer")
        wait_for(lambda: http_get(port, "/ready")[0] == 200, 30, message="/ready 200 again")
        _, metrics = http_get(port, "/metrics")
        [errors] = [
            line
            for line in metrics.splitlines()
            if line.startswith('queue_errors_total{operation="receive"}')
        ]
        assert float(errors.split()[-1]) >= 2
        assert len(worker.messages("Queue unreachable")) == 1, worker.text()
        [again] = worker.messages("Queue reachable again")
        assert again["failures"] >= 2 and again["outage_seconds"] >= 7
        assert worker.messages("Transfer completed successfully")
        assert "Traceback" not in "\n".join(worker.raw)
    finally:
        code = worker.stop()
        proxy.stop()
    assert code == 0, worker.text()
    wait_for(
        lambda: (
            sqs.get_queue_attributes(QueueUrl=work, AttributeNames=["All"])["Attributes"][
                "ApproximateNumberOfMessages"
            ]
            == "0"
        ),
        10,
        message="an empty work queue",
    )
    assert hashlib.sha256(copied(root, "in/data.bin") or b"").hexdigest() == (
        hashlib.sha256(data).hexdigest()
    )
