"""What each transfer was verified against, --require-checksum, and queue lag from the queue's
own clock (issue 13, "Messages and help").

The worker runs as a subprocess with its HTTP endpoint on, against moto (S3, SQS), the Pub/Sub
emulator and local mode; each test reads what an operator reads: the JSON log lines, /metrics,
the dead-letter envelopes and the destination bucket (through boto3, not the worker).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import transfer_worker as tw
from tests.conftest import LoggedProcess, free_port, wait_for

pytestmark = pytest.mark.timeout(240)

SCRIPT = str(Path(__file__).resolve().parent.parent / "transfer_worker.py")
MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part: a source of two parts and a bit is multipart
REPLAYED = "2024-03-01T12:00:00Z"  # the README's example events are from 2024
YEAR = 365 * 86400


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_event(
    src: tuple[str, str, str],
    dst: tuple[str, str, str],
    *,
    checksum: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    stamp = timestamp or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    metadata: dict[str, Any] = {"maxRetries": 1}
    if checksum:
        metadata["checksumSHA256"] = checksum
    return {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": stamp,
        "source": dict(zip(("provider", "bucket", "key"), src, strict=True)),
        "destination": dict(zip(("provider", "bucket", "key"), dst, strict=True)),
        "metadata": metadata,
    }


# -- the worker as a subprocess, with /metrics --------------------------------------------------


class Worker(LoggedProcess):
    """``transfer_worker.py run`` (not --once: /metrics is read while it runs), its JSON lines
    collected as they come; stop() sends SIGTERM and waits, bounded."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        cmd = [sys.executable, SCRIPT, "run", "--http-host", "127.0.0.1"]
        cmd += ["--http-port", str(self.port), "--backoff-initial", "0.2", "--backoff-max", "1"]
        super().__init__([*cmd, *args], {**os.environ, **(env or {})})

    def settled(self, count: int, timeout: float = 90) -> list[dict[str, Any]]:
        """The first ``count`` lines that settle an event (success, skipped, dead-lettered)."""

        def done() -> list[dict[str, Any]]:
            assert self.proc.poll() is None, self.text()
            lines = [line for line in list(self.lines) if "outcome" in line]
            return lines if len(lines) >= count else []

        return wait_for(done, timeout, message=f"{count} settled event(s):\n{self.text()}")

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """/metrics as {(sample name, labels): value}."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture
def worker() -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Worker:
        started.append(Worker(*args, env=env))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


# -- S3 and SQS on moto -------------------------------------------------------------------------


class Cloud:
    """A fresh S3 bucket, SQS work and dead-letter queues on moto."""

    def __init__(self, endpoint: str) -> None:
        import boto3

        self.s3 = boto3.client("s3", endpoint_url=endpoint)
        self.sqs = boto3.client("sqs", endpoint_url=endpoint)
        self.bucket = unique("verified")
        self.s3.create_bucket(Bucket=self.bucket)
        self.queue = self.sqs.create_queue(QueueName=unique("work"))["QueueUrl"]
        self.dead_letter = self.sqs.create_queue(QueueName=unique("dlq"))["QueueUrl"]

    def put_multipart(self, key: str, data: bytes) -> None:
        """Parts of 5 MiB, as any large upload makes them: S3 then publishes no whole-object
        digest (the ETag is "<md5 of the part md5s>-<parts>")."""
        upload = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        parts = []
        for number, start in enumerate(range(0, len(data), PART), start=1):
            body = data[start : start + PART]
            etag = self.s3.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=body
            )["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        self.s3.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
        )
        assert "-" in self.s3.head_object(Bucket=self.bucket, Key=key)["ETag"]

    def send(self, event: dict[str, Any]) -> None:
        self.sqs.send_message(QueueUrl=self.queue, MessageBody=json.dumps(event))

    def exists(self, key: str) -> bool:
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=key).get("Contents", [])
        return any(item["Key"] == key for item in listed)

    def dead_letters(self) -> list[dict[str, Any]]:
        response = self.sqs.receive_message(
            QueueUrl=self.dead_letter, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        return [json.loads(item["Body"]) for item in response.get("Messages", [])]

    def ref(self, key: str) -> tuple[str, str, str]:
        return ("aws_s3", self.bucket, key)

    def args(self, *more: str) -> tuple[str, ...]:
        return (
            *("--storage", "cloud", "--allowed-buckets", "*", "--part-size", str(PART)),
            *("--queue", self.queue, "--dead-letter", self.dead_letter, *more),
        )


@pytest.fixture
def cloud(aws_env: str, gcs_env: str) -> Cloud:
    """S3 to S3 on moto; cloud mode builds a GCS store too, hence the emulator's endpoint."""
    return Cloud(aws_env)


BIG = os.urandom(2 * PART + 12345)  # three parts
SMALL = os.urandom(64 * 1024)  # one PutObject: its ETag is its MD5


def test_each_transfer_logs_and_counts_what_it_was_verified_against(
    cloud: Cloud, worker: Callable[..., Worker]
) -> None:
    """A multipart S3 source and no checksumSHA256: nothing but the worker's own reading vouches
    for the bytes, and the log says `none` (it used to read like any verified transfer). With
    the event's SHA-256 it says `event_sha256`; a single-part source's MD5 ETag, `source_md5`.
    transfer_verified_total counts each by `against`."""
    cloud.put_multipart("in/big.bin", BIG)
    cloud.s3.put_object(Bucket=cloud.bucket, Key="in/small.bin", Body=SMALL)
    events = {
        "none": make_event(cloud.ref("in/big.bin"), cloud.ref("out/unchecked.bin")),
        "event_sha256": make_event(
            cloud.ref("in/big.bin"), cloud.ref("out/checked.bin"), checksum=sha(BIG)
        ),
        "source_md5": make_event(cloud.ref("in/small.bin"), cloud.ref("out/small.bin")),
    }
    for event in events.values():
        cloud.send(event)

    running = worker(*cloud.args())
    lines = running.settled(3)
    metrics = running.metrics()

    by_event = {line["event_id"]: line for line in lines}
    for against, event in events.items():
        line = by_event[event["eventId"]]
        assert line["message"] == "Transfer completed successfully", line
        assert line["verified_against"] == against, line
        pair = {"source_provider": "aws_s3", "destination_provider": "aws_s3"}
        assert sample(metrics, "transfer_verified_total", **pair, against=against) == 1
    body = cloud.s3.get_object(Bucket=cloud.bucket, Key="out/unchecked.bin")["Body"].read()
    assert body == BIG  # unverified is reported, not refused: --require-checksum is off


def test_require_checksum_dead_letters_unverifiable_before_any_destination_object(
    cloud: Cloud, worker: Callable[..., Worker]
) -> None:
    """--require-checksum (the flag alone): the unverifiable event is dead-lettered
    `unverifiable` and its destination key never exists, not even as an open multipart upload;
    the same source with the event's SHA-256 is still transferred."""
    cloud.put_multipart("in/big.bin", BIG)
    refused = make_event(cloud.ref("in/big.bin"), cloud.ref("out/refused.bin"))
    checked = make_event(cloud.ref("in/big.bin"), cloud.ref("out/checked.bin"), checksum=sha(BIG))
    cloud.send(refused)
    cloud.send(checked)

    running = worker(*cloud.args("--require-checksum"))
    lines = {line["event_id"]: line for line in running.settled(2)}
    metrics = running.metrics()

    assert lines[refused["eventId"]]["outcome"] == "dead_lettered", running.text()
    assert lines[refused["eventId"]]["reason"] == "unverifiable"
    assert lines[checked["eventId"]]["verified_against"] == "event_sha256"
    [envelope] = wait_for(cloud.dead_letters, 10, message="the dead letter")
    assert envelope["reason"] == "unverifiable" and envelope["event_id"] == refused["eventId"]
    assert not cloud.exists("out/refused.bin")
    uploads = cloud.s3.list_multipart_uploads(Bucket=cloud.bucket).get("Uploads", [])
    assert [u for u in uploads if u["Key"] == "out/refused.bin"] == []
    pair = {"source_provider": "aws_s3", "destination_provider": "aws_s3"}
    assert sample(metrics, "transfer_failure_total", **pair, reason="unverifiable") == 1
    assert sample(metrics, "transfer_verified_total", **pair, against="none") == 0


def local_cli(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, SCRIPT, *args, "--local-root", str(root)],
        env={**os.environ, "TRANSFER_WORKER_HTTP_PORT": "0"},
        capture_output=True,
        timeout=120,
        check=False,
    )


def put_local(root: Path, provider: str, bucket: str, key: str, data: bytes) -> None:
    """A file put there by hand: local mode has no record, so no checksum, of it."""
    path = root / provider / bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_require_checksum_from_the_environment_in_local_mode(
    tmp_path: Path, worker: Callable[..., Worker]
) -> None:
    """TRANSFER_WORKER_REQUIRE_CHECKSUM=on: a hand-placed local file (no record) without the
    event's SHA-256 is dead-lettered `unverifiable` and no destination file appears; `dlq list`
    shows the reason. The same file with the event's SHA-256 is transferred."""
    root = tmp_path / "root"
    data = os.urandom(4096)
    put_local(root, "aws_s3", "src", "in/data.bin", data)
    refused = make_event(("aws_s3", "src", "in/data.bin"), ("gcp_gcs", "dst", "refused.bin"))
    checked = make_event(
        ("aws_s3", "src", "in/data.bin"), ("gcp_gcs", "dst", "checked.bin"), checksum=sha(data)
    )
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(refused) + "\n" + json.dumps(checked) + "\n")
    assert local_cli(root, "submit", str(events)).returncode == 0

    running = worker("--local-root", str(root), env={"TRANSFER_WORKER_REQUIRE_CHECKSUM": "on"})
    lines = {line["event_id"]: line for line in running.settled(2)}

    assert lines[refused["eventId"]]["reason"] == "unverifiable", running.text()
    assert lines[checked["eventId"]]["verified_against"] == "event_sha256"
    assert not (root / "gcp_gcs" / "dst" / "refused.bin").exists()
    assert (root / "gcp_gcs" / "dst" / "checked.bin").read_bytes() == data
    listed = local_cli(root, "dlq", "list")
    [envelope] = [json.loads(line) for line in listed.stdout.decode().splitlines()]
    assert envelope["reason"] == "unverifiable"


def test_the_run_help_names_require_checksum_and_its_variable() -> None:
    result = subprocess.run(
        [sys.executable, SCRIPT, "run", "--help"], capture_output=True, timeout=60, check=True
    )
    text = " ".join(result.stdout.decode().split())
    assert "--require-checksum [{on,off}]" in text
    assert "[env TRANSFER_WORKER_REQUIRE_CHECKSUM]" in text


# -- queue lag: from the queue's clock, whatever the event's timestamp -------------------------


class LocalChannel:
    """The local SQLite queue under the worker's root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def send(self, event: dict[str, Any]) -> None:
        tw.LocalQueue(self.root / "queue.db").publish(json.dumps(event).encode())

    def args(self) -> tuple[str, ...]:
        return ()


class SQSChannel:
    def __init__(self, endpoint: str) -> None:
        import boto3

        self.sqs = boto3.client("sqs", endpoint_url=endpoint)
        self.queue = self.sqs.create_queue(QueueName=unique("lag"))["QueueUrl"]
        self.dead_letter = self.sqs.create_queue(QueueName=unique("lag-dlq"))["QueueUrl"]

    def send(self, event: dict[str, Any]) -> None:
        self.sqs.send_message(QueueUrl=self.queue, MessageBody=json.dumps(event))

    def args(self) -> tuple[str, ...]:
        return ("--queue", self.queue, "--dead-letter", self.dead_letter)


class PubSubChannel:
    def __init__(self, resources: Any) -> None:
        self.resources = resources

    def send(self, event: dict[str, Any]) -> None:
        topic = self.resources.topic
        self.resources.publisher.publish(topic, json.dumps(event).encode()).result(timeout=30)

    def args(self) -> tuple[str, ...]:
        return (
            *("--queue", self.resources.subscription),
            *("--dead-letter", self.resources.dead_letter_topic),
        )


@pytest.fixture(params=["local", "sqs", "pubsub"])
def channel(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "local":
        return LocalChannel(tmp_path / "root")
    if request.param == "sqs":
        return SQSChannel(request.getfixturevalue("aws_env"))
    make = request.getfixturevalue("pubsub_topic_subscription")
    return PubSubChannel(make(dead_letter=True, max_delivery_attempts=10))


def test_a_replayed_2024_event_has_no_queue_lag_and_years_of_age(
    channel: Any, tmp_path: Path, worker: Callable[..., Worker]
) -> None:
    """An event stamped 2024 and submitted now waited seconds in the queue, not years:
    queue_lag_seconds counts from the queue's own send time (SQS SentTimestamp, Pub/Sub
    publish_time, the local insert time); event_age_seconds keeps the producer's view."""
    root = tmp_path / "root"
    data = os.urandom(4096)
    put_local(root, "aws_s3", "src", "in/data.bin", data)
    event = make_event(
        ("aws_s3", "src", "in/data.bin"), ("gcp_gcs", "dst", "out.bin"), timestamp=REPLAYED
    )
    channel.send(event)
    sent = time.time()

    running = worker("--local-root", str(root), *channel.args())
    [line] = running.settled(1)
    metrics = running.metrics()

    assert line["outcome"] == "success", running.text()
    waited = time.time() - sent
    assert sample(metrics, "queue_lag_seconds_count") == 1
    assert 0 <= sample(metrics, "queue_lag_seconds_sum") <= waited + 2  # the moto / emulator clock
    assert sample(metrics, "queue_lag_seconds_bucket", le="300.0") == 1  # QueueLagHigh: quiet
    assert sample(metrics, "event_age_seconds_count") == 1
    assert sample(metrics, "event_age_seconds_sum") > 2 * YEAR


def test_an_sqs_hand_back_keeps_the_first_send_time(aws_env: str) -> None:
    """A shutdown hand-back on SQS is a new copy (ADR 11), with a SentTimestamp of its own: the
    copy carries the first one, so a handed-back message's lag still counts from its send."""
    import boto3

    sqs = boto3.client("sqs", endpoint_url=aws_env)
    url = sqs.create_queue(QueueName=unique("handback"))["QueueUrl"]
    config = tw.Config(queue=url, visibility_timeout=30)
    queue = tw.SQSQueue(config, tw.SQSPublisher(url, config), client=sqs)
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    [first] = wait_for(lambda: queue.receive(1, 1), 20, message="the message")
    assert first.sent_at is not None and abs(first.sent_at - time.time()) < 60

    wait_for(lambda: time.time() > first.sent_at + 0.01, 5, message="a later millisecond")
    queue.hand_back(first)
    [again] = wait_for(lambda: queue.receive(1, 1), 20, message="its copy")

    assert again.message_id != first.message_id  # a copy, sent later
    assert again.sent_at == pytest.approx(first.sent_at, abs=0.001)
    queue.ack(again)


@pytest.mark.parametrize(
    ("published", "event_sha", "expected"),
    [
        ({"crc32c": "c"}, False, "source_crc32c"),  # a composite GCS object
        ({"md5": "m", "crc32c": "c"}, False, "source_md5"),  # any other GCS object
        ({"sha256": "s", "md5": "m"}, False, "source_sha256"),
        ({"md5": "m"}, True, "event_sha256"),  # both checked: the strongest is reported
        ({}, False, "none"),
    ],
)
def test_the_strongest_check_passed_is_the_one_reported(
    published: dict[str, str], event_sha: bool, expected: str
) -> None:
    """The order the README states: event_sha256 > source_sha256 > source_md5 > source_crc32c."""
    actual = {"sha256": "s", "md5": "m", "crc32c": "c"}
    info = tw.ObjectInfo(size=1, version="v", checksums=published)
    event = tw.TransferEvent(
        event_id="e",
        correlation_id="c",
        timestamp=tw.parse_time(REPLAYED),
        source=tw.ObjectRef("gcp_gcs", "b", "k"),
        destination=tw.ObjectRef("aws_s3", "b", "k"),
        content_type=None,
        checksum_sha256="s" if event_sha else None,
        max_retries=0,
        priority="normal",
    )
    expected_sha = "s" if event_sha or "sha256" in published else None
    assert tw.TransferEngine._verify(event, info, expected_sha, actual) == expected
