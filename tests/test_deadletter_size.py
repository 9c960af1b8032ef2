"""A dead letter's size against its queue's real limit (review wave 2, finding B): the SQS
publisher states the queue's own MaximumMessageSize, a body whose plain forms are all over it
goes compressed (zlib+base64) and comes back exactly through `dlq list` and `dlq redrive`, and one
that fits in no form is not sent at all: logged CRITICAL, counted, and left on the work queue for
its redrive policy. moto server throughout; SizedSends applies SQS's size rule, which moto does
not."""

from __future__ import annotations

import base64
import io
import json
import random
import string
import subprocess
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_queue_outage import make_event
from tests.test_review_deadletter import SizedSends, bad_event, worker_on

pytestmark = pytest.mark.timeout(180)

KiB = 1024
MiB = 1024 * KiB
HERE = Path(__file__).resolve().parent.parent


def make_queues(client: Any, size: int) -> tuple[str, str]:
    """A work queue and its dead-letter queue, both of MaximumMessageSize ``size``."""
    name = f"dlsize-{uuid.uuid4().hex[:10]}"
    urls = [client.create_queue(QueueName=n)["QueueUrl"] for n in (name, name + "-dlq")]
    for url in urls:
        client.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": str(size)})
    return urls[0], urls[1]


@pytest.fixture
def client(aws_env: str) -> Iterator[Any]:
    import boto3

    yield boto3.client("sqs", endpoint_url=aws_env)


def run_worker(
    client: Any, url: str, dlq: str, tmp_path: Path, limit: int, **settings: Any
) -> tuple[SizedSends, io.StringIO, tw.Metrics]:
    """One worker pass over ``url``, its dead letters sent through SizedSends(``limit``)."""
    config = tw.Config(
        local_root=str(tmp_path), queue=url, http_port=0, visibility_timeout=30, **settings
    )
    sends = SizedSends(client, limit=limit)
    queue = tw.SQSQueue(config, tw.SQSPublisher(dlq, config, client=sends), client=client)
    log, metrics = io.StringIO(), tw.Metrics()
    worker_on(config, queue, log, metrics).run(once=True)
    return sends, log, metrics


def held(client: Any, dlq: str) -> list[dict[str, Any]]:
    with tw.SQSDeadLetters(dlq, client).held(10) as letters:  # as `dlq list` reads them
        return [letter.envelope for letter in letters]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(HERE / "transfer_worker.py"), *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result


# -- the publisher states the queue's own limit ----------------------------------------------------


def test_a_1mib_dead_letter_queue_keeps_the_error_text_of_a_300kib_event(
    client: Any, tmp_path: Path
) -> None:
    """SQSPublisher stated 256 KiB whatever the queue took: on a 1 MiB queue (the default since
    2025) every form of a 300 KiB event's dead letter was "over" it, and the smallest, without
    the error text, went. It now reads MaximumMessageSize and the whole envelope goes as JSON."""
    url, dlq = make_queues(client, 1 * MiB)
    body = bad_event(300 * KiB)
    client.send_message(QueueUrl=url, MessageBody=body.decode())
    sends, log, _ = run_worker(client, url, dlq, tmp_path, 1 * MiB, max_message_bytes=1 * MiB)

    assert len(sends.sizes) == 1 and sends.with_attributes == [False], log.getvalue()[-2000:]
    [envelope] = held(client, dlq)
    assert envelope["reason"] == "invalid_event"
    assert envelope["error"].startswith("$.correlationId: 'aaaa")
    assert envelope["body_encoding"] == "utf-8" and tw.envelope_body(envelope) == body
    assert tw.SQSPublisher(dlq, tw.Config(), client=client).max_message_bytes == 1 * MiB


class Refusing:
    """The real boto3 client whose GetQueueAttributes is answered as IAM or an outage answers
    it: the worker's role has only sqs:SendMessage on the dead-letter queue (terraform/ grants no
    more), or the service is unavailable ``unavailable`` times first."""

    def __init__(self, client: Any, code: str, status: int, times: int = 1000) -> None:
        self.client, self.code, self.status, self.times = client, code, status, times
        self.asked = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def get_queue_attributes(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        self.asked += 1
        if self.asked <= self.times:
            error = {"Error": {"Code": self.code, "Message": "no"}}
            error["ResponseMetadata"] = {"HTTPStatusCode": self.status}  # type: ignore[assignment]
            raise ClientError(error, "GetQueueAttributes")  # type: ignore[arg-type]
        return self.client.get_queue_attributes(**kwargs)


def test_a_limit_that_cannot_be_read_is_taken_as_256kib(client: Any) -> None:
    """Denied: 256 KiB, asked once. Unavailable: 256 KiB this time, read again next time."""
    _, dlq = make_queues(client, 1 * MiB)
    denied = Refusing(client, "AccessDenied", 403)
    publisher = tw.SQSPublisher(dlq, tw.Config(), client=denied)
    assert [publisher.max_message_bytes, publisher.max_message_bytes] == [256 * KiB] * 2
    assert denied.asked == 1
    down = Refusing(client, "ServiceUnavailable", 503, times=1)
    publisher = tw.SQSPublisher(dlq, tw.Config(), client=down)
    assert [publisher.max_message_bytes, publisher.max_message_bytes] == [256 * KiB, 1 * MiB]
    assert publisher.max_message_bytes == 1 * MiB and down.asked == 2


# -- the compressed form ---------------------------------------------------------------------------


def test_a_compressed_dead_letter_round_trips_through_dlq_list_and_redrive(
    client: Any, tmp_path: Path
) -> None:
    """256 KiB - 200 bytes: no plain form fits a 256 KiB queue, so the envelope goes as JSON with
    the body zlib+base64, the error text kept. `dlq list` (a subprocess, as an operator runs it)
    shows it with its reason and the event's sides; `dlq redrive` puts the exact original bytes
    back on the work queue and empties the dead-letter queue."""
    url, dlq = make_queues(client, 256 * KiB)
    body = bad_event(256 * KiB - 200)
    client.send_message(QueueUrl=url, MessageBody=body.decode())
    sends, log, _ = run_worker(client, url, dlq, tmp_path, 256 * KiB)
    assert len(sends.sizes) == 1 and sends.sizes[0] <= 256 * KiB // 4, log.getvalue()[-2000:]

    queues = ["--queue", url, "--dead-letter", dlq]
    [line] = [json.loads(x) for x in cli("dlq", "list", *queues).stdout.splitlines()]
    assert (line["reason"], line["body_encoding"]) == ("invalid_event", "zlib+base64")
    assert line["error"].startswith("$.correlationId: 'aaaa")
    assert line["event_id"] == json.loads(body)["eventId"].lower()
    assert line["source"] == "s3://src/in/data.bin"  # read from the decompressed body
    cli("dlq", "redrive", *queues)
    items = client.receive_message(QueueUrl=url, WaitTimeSeconds=1)["Messages"]
    assert [item["Body"].encode() for item in items] == [body]
    assert held(client, dlq) == []


def test_envelope_body_gives_back_the_exact_bytes_of_a_compressed_body() -> None:
    for body in (b'{"a": 1}', bytes(range(256)) * 10, b""):
        packed = base64.b64encode(zlib.compress(body)).decode()
        assert tw.envelope_body({"body": packed, "body_encoding": "zlib+base64"}) == body


def zlib_bomb() -> bytes:
    """64 KiB that inflate to 64 MiB + 1: one byte over what envelope_body takes."""
    return zlib.compress(b"\0" * (64 * MiB + 1), 9)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (lambda: zlib.compress(b"x" * 1000)[:-6], "cut short"),
        (lambda: zlib.compress(b"x") + b"more", "followed by other data"),
        (lambda: b"not zlib at all", "does not decompress"),
        (zlib_bomb, "more than"),
    ],
)
def test_a_compressed_body_that_is_not_one_whole_bounded_stream_is_refused(
    data: Callable[[], bytes], problem: str
) -> None:
    """A ValueError, as for bad base64: `dlq list` shows it malformed_envelope and `dlq redrive`
    leaves it, rather than sending half a body or inflating a zlib bomb into memory."""
    envelope = {"body": base64.b64encode(data()).decode(), "body_encoding": "zlib+base64"}
    with pytest.raises(ValueError, match=problem):
        tw.envelope_body(envelope)


class Topic:
    """A publisher that carries no attributes and states a small limit (as Pub/Sub states its
    10 MB): what it was sent is kept."""

    carries_attributes = False
    max_message_bytes = 8 * KiB

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def publish(self, body: bytes, **kwargs: Any) -> None:
        self.sent.append(body)


def test_a_target_without_attributes_gets_the_compressed_form_too() -> None:
    body = json.dumps({"padding": "p" * (20 * KiB)}).encode()
    envelope = {**tw._body_fields(body), "reason": "invalid_event", "error": "bad"}
    topic = Topic()
    tw.publish_envelope(topic, body, envelope)
    [sent] = topic.sent
    doc = json.loads(sent)
    assert len(sent) <= 8 * KiB and doc["error"] == "bad"
    assert doc["body_encoding"] == "zlib+base64" and tw.envelope_body(doc) == body


# -- nothing fits: nothing is sent, nothing is lost ------------------------------------------------


def incompressible_event(size: int) -> bytes:
    """An event of ``size`` bytes that fails the schema (correlationId too long), its padding
    random letters: zlib saves a quarter at most, base64 adds a third."""
    text = "".join(random.Random(7).choices(string.ascii_letters + string.digits, k=size))
    event = make_event()
    event["correlationId"] = "a" * 300
    event["metadata"]["padding"] = ""
    event["metadata"]["padding"] = text[: size - len(json.dumps(event))]
    return json.dumps(event).encode()


def test_a_dead_letter_that_fits_in_no_form_is_not_sent_and_the_message_stays(
    client: Any, tmp_path: Path
) -> None:
    """Before, the smallest form went anyway, SQS refused it on every delivery, and each
    refusal was reported as the queue failing. Now nothing is sent; one CRITICAL line with the
    event id, the reason and the error; dead_letters_too_large_total counts it; the message is
    left on the work queue, hidden for a visibility timeout, for the redrive policy to move."""
    url, dlq = make_queues(client, 256 * KiB)
    body = incompressible_event(256 * KiB - 200)
    client.send_message(QueueUrl=url, MessageBody=body.decode())
    sends, log, metrics = run_worker(client, url, dlq, tmp_path, 256 * KiB)

    assert sends.sizes == [], log.getvalue()[-2000:]
    lines = [json.loads(x) for x in log.getvalue().splitlines()]
    [line] = [x for x in lines if x["level"] == "CRITICAL"]
    assert line["event_id"] == json.loads(body)["eventId"].lower()
    assert (line["reason"], line["limit_bytes"]) == ("invalid_event", 256 * KiB)
    assert line["error"].startswith("$.correlationId: 'aaaa")
    assert line["dead_letter_bytes"] > 256 * KiB
    assert not [x for x in lines if x["message"].startswith("Queue unreachable")]
    sample = metrics.registry.get_sample_value
    assert sample("dead_letters_too_large_total", {"reason": "invalid_event"}) == 1
    assert sample("queue_errors_total", {"operation": "dead_letter"}) is None
    counts = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert counts["ApproximateNumberOfMessagesNotVisible"] == "1"  # not acknowledged
    assert held(client, dlq) == []
