"""Cloud adapters (section 7) end to end: the real CLI as a subprocess against servers that speak
the real protocols (moto for S3 and SQS, gcp-storage-emulator for GCS, Google's Pub/Sub emulator).

Every test asserts what a user observes: bytes and metadata at the destination, dead-letter
envelopes, the worker's JSON log lines, what is left in the queue and in the buckets.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

from tests.conftest import LoggedProcess, wait_for

HERE = Path(__file__).resolve().parent.parent  # the repository root
PYTHON = sys.executable
MiB = 1024 * 1024
PART = 8 * MiB
LARGE = 40 * MiB + 12345  # five parts, the last one short

pytestmark = pytest.mark.timeout(240)


# -- servers: tests/conftest.py (moto_server, gcs_emulator, pubsub_emulator and their *_env) ----


def wait_until(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """conftest.wait_for with a message naming what the test waited for."""
    return wait_for(predicate, timeout, message=what)


@pytest.fixture
def cloud_env(aws_env: str, gcs_env: str) -> dict[str, str]:
    """Both stores' endpoints; conftest already put them (and credentials) into os.environ,
    which the worker subprocesses inherit."""
    return {"AWS_ENDPOINT_URL": aws_env, "STORAGE_EMULATOR_HOST": gcs_env}


# -- clients, buckets and queues ------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Buckets:
    """One S3 bucket and one GCS bucket, fresh per test."""

    def __init__(self, env: dict[str, str]) -> None:
        import boto3
        from google.cloud import storage

        self.s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        self.gcs = storage.Client()
        self.names = {"aws_s3": unique("s3b"), "gcp_gcs": unique("gcsb")}
        self.s3.create_bucket(Bucket=self.names["aws_s3"])
        self.gcs.create_bucket(self.names["gcp_gcs"])

    def put(self, provider: str, key: str, data: bytes) -> None:
        if provider == "aws_s3":
            self.s3.put_object(Bucket=self.names[provider], Key=key, Body=data)
        else:
            self.gcs.bucket(self.names[provider]).blob(key).upload_from_string(data)

    def get(self, provider: str, key: str) -> tuple[bytes, dict[str, str]] | None:
        """Bytes and user metadata, or None when the object does not exist (HEAD-like)."""
        bucket = self.names[provider]
        if provider == "aws_s3":
            try:
                response = self.s3.get_object(Bucket=bucket, Key=key)
            except self.s3.exceptions.NoSuchKey:
                return None
            return response["Body"].read(), response["Metadata"]
        blob = self.gcs.bucket(bucket).get_blob(key)
        if blob is None:
            return None
        return blob.download_as_bytes(), dict(blob.metadata or {})

    def keys(self, provider: str) -> list[str]:
        bucket = self.names[provider]
        if provider == "aws_s3":
            return [o["Key"] for o in self.s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        return [blob.name for blob in self.gcs.list_blobs(bucket)]

    def multipart_uploads(self) -> list[dict[str, Any]]:
        uploads = self.s3.list_multipart_uploads(Bucket=self.names["aws_s3"])
        return list(uploads.get("Uploads", []))


class SQSChannel:
    """A work queue and a dead-letter queue on moto."""

    kind = "sqs"

    def __init__(self, env: dict[str, str]) -> None:
        import boto3

        self.sqs = boto3.client("sqs", endpoint_url=env["AWS_ENDPOINT_URL"])
        self.queue = self.sqs.create_queue(QueueName=unique("work"))["QueueUrl"]
        self.dead_letter = self.sqs.create_queue(QueueName=unique("dlq"))["QueueUrl"]

    def send(self, body: bytes) -> None:
        self.sqs.send_message(QueueUrl=self.queue, MessageBody=body.decode())

    def dead_letters(self, expected: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def poll() -> bool:
            response = self.sqs.receive_message(
                QueueUrl=self.dead_letter, MaxNumberOfMessages=10, WaitTimeSeconds=0
            )
            for item in response.get("Messages", []):
                found.append(json.loads(item["Body"]))
                self.sqs.delete_message(
                    QueueUrl=self.dead_letter, ReceiptHandle=item["ReceiptHandle"]
                )
            return len(found) >= expected

        wait_until(poll, timeout, f"{expected} dead letter(s)")
        return found

    def counts(self) -> tuple[int, int]:
        """(visible, in flight) messages of the work queue."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.queue, AttributeNames=names)
        return tuple(int(attrs["Attributes"][name]) for name in names)  # type: ignore[return-value]

    def is_empty(self) -> bool:
        return self.counts() == (0, 0)


class PubSubChannel:
    """A fresh topic + subscription (with a dead_letter_policy, so delivery_attempt counts
    deliveries) from conftest's factory; the worker's --dead-letter is that policy's topic, and
    a subscription on it lets the test read the envelopes."""

    kind = "pubsub"

    def __init__(self, resources: Any) -> None:
        self.publisher, self.subscriber = resources.publisher, resources.subscriber
        self.topic = resources.topic
        self.queue = resources.subscription
        self.dead_letter = resources.dead_letter_topic
        self.dlq_subscription = resources.dead_letter_subscription

    def send(self, body: bytes) -> None:
        self.publisher.publish(self.topic, body).result(timeout=30)

    def dead_letters(self, expected: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def poll() -> bool:
            response = self.subscriber.pull(
                subscription=self.dlq_subscription, max_messages=10, timeout=5
            )
            ids = [item.ack_id for item in response.received_messages]
            found.extend(json.loads(item.message.data) for item in response.received_messages)
            if ids:
                self.subscriber.acknowledge(subscription=self.dlq_subscription, ack_ids=ids)
            return len(found) >= expected

        wait_until(poll, timeout, f"{expected} dead letter(s)")
        return found

    def is_empty(self) -> bool:
        """Nothing deliverable now (pull returns at once on the emulator)."""
        response = self.subscriber.pull(subscription=self.queue, max_messages=10, timeout=5)
        ids = [item.ack_id for item in response.received_messages]
        if ids:  # put them straight back
            self.subscriber.modify_ack_deadline(
                subscription=self.queue, ack_ids=ids, ack_deadline_seconds=0
            )
        return not ids


@pytest.fixture
def buckets(cloud_env: dict[str, str]) -> Buckets:
    return Buckets(cloud_env)


@pytest.fixture(params=["sqs", "pubsub"])
def channel(request: pytest.FixtureRequest, cloud_env: dict[str, str]) -> Any:
    if request.param == "sqs":
        return SQSChannel(cloud_env)
    make = request.getfixturevalue("pubsub_topic_subscription")
    return PubSubChannel(make(dead_letter=True, max_delivery_attempts=10))


DIRECTIONS = {"s3_to_gcs": ("aws_s3", "gcp_gcs"), "gcs_to_s3": ("gcp_gcs", "aws_s3")}


@pytest.fixture(params=list(DIRECTIONS))
def direction(request: pytest.FixtureRequest) -> tuple[str, str]:
    return DIRECTIONS[request.param]


def make_event(
    buckets: Buckets, src: str, dst: str, key: str, *, sha256: str | None = None, **meta: Any
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"maxRetries": 3, **meta}
    if sha256:
        metadata["checksumSHA256"] = sha256
    return {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"provider": src, "bucket": buckets.names[src], "key": key},
        "destination": {"provider": dst, "bucket": buckets.names[dst], "key": f"copy/{key}"},
        "metadata": metadata,
    }


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


# -- the worker as a subprocess -----------------------------------------------------------------


class WorkerProcess(LoggedProcess):
    """``transfer_worker.py run`` in a subprocess; its JSON log lines are collected as they come."""

    def __init__(self, env: dict[str, str], channel: Any, *args: str, once: bool) -> None:
        cmd = [PYTHON, str(HERE / "transfer_worker.py"), "run", "--storage", "cloud"]
        cmd += ["--allowed-buckets", "*"]  # each test makes fresh buckets
        cmd += ["--queue", channel.queue, "--dead-letter", channel.dead_letter]
        cmd += ["--http-port", "0", "--part-size", str(PART), "--backoff-initial", "0.2"]
        cmd += ["--backoff-max", "1", *args] + (["--once"] if once else [])
        super().__init__(cmd, {**os.environ, **env}, cwd=HERE)

    def wait_outcome(self, outcome: str, count: int = 1, timeout: float = 90) -> list[Any]:
        return wait_until(
            lambda: len(self.outcomes(outcome)) >= count and self.outcomes(outcome),
            timeout,
            f"{count} log line(s) with outcome={outcome}; log so far:\n" + self.log_text(),
        )

    def log_text(self) -> str:
        return self.text()


def run_once(env: dict[str, str], channel: Any, *args: str) -> WorkerProcess:
    worker = WorkerProcess(env, channel, *args, once=True)
    code = worker.wait()
    assert code == 0, worker.log_text()
    return worker


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_copied(buckets: Buckets, event: dict[str, Any], data: bytes) -> None:
    dst = event["destination"]
    found = buckets.get(dst["provider"], dst["key"])
    assert found is not None, f"no object at {dst}"
    body, metadata = found
    assert len(body) == len(data)
    assert sha(body) == sha(data)
    if "transfer-worker-sha256" not in metadata:  # a large GCS source to S3, read once (ADR 6)
        assert (event["source"]["provider"], dst["provider"]) == ("gcp_gcs", "aws_s3")
        crc32c = google_crc32c.Checksum(data).digest().hex()
        assert metadata["transfer-worker-crc32c"] == crc32c
    else:
        assert metadata["transfer-worker-sha256"] == sha(data)
    assert metadata["transfer-worker-event-id"] == event["eventId"]


# -- a fault-injecting proxy between the worker and a store ---------------------------------------


class FaultProxy:
    """Forwards HTTP to ``upstream``; answers the first ``failures`` matching requests itself
    (S3 503 SlowDown or GCS 429), and can hold matching requests for ``delay`` seconds."""

    S3_SLOWDOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(self, upstream: str, *, status: int = 503, failures: int = 0) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.status, self.failures = status, failures
        self.delay = 0.0
        self.match: Callable[[str, str], bool] = lambda method, path: True
        self.seen: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, headers
        self.injected = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def _decide(self, method: str, path: str) -> tuple[bool, float]:
        with self.lock:
            self.seen.append((method, path))
            if not self.match(method, path):
                return False, 0.0
            if self.injected < self.failures:
                self.injected += 1
                return True, 0.0
            return False, self.delay

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.requests.append((self.command, self.path, dict(self.headers.items())))
                fail, delay = proxy._decide(self.command, self.path)
                if fail:
                    self._fail()
                    return
                if delay:
                    proxy.stopping.wait(delay)
                self._forward(body)

            def _fail(self) -> None:
                s3 = proxy.status == 503
                payload = proxy.S3_SLOWDOWN if s3 else b'{"error": {"code": 429}}'
                self.send_response(proxy.status)
                self.send_header("Content-Type", "application/xml" if s3 else "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes) -> None:
                up = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                up.request(self.command, self.path, body=body or None, headers=headers)
                response = up.getresponse()
                payload = response.read()
                self.send_response(response.status)
                head = self.command == "HEAD"  # keeps the upstream Content-Length: the size
                skip = {"transfer-encoding", "connection"} | (set() if head else {"content-length"})
                for name, value in response.getheaders():
                    if name.lower() not in skip:
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                up.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

        return Handler


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    made: list[FaultProxy] = []

    def make(upstream: str, **kwargs: Any) -> FaultProxy:
        made.append(FaultProxy(upstream, **kwargs))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def endpoint_of(env: dict[str, str], provider: str) -> str:
    """The server a provider's store talks to; ``via_proxy`` puts a proxy in front of it."""
    return env["AWS_ENDPOINT_URL" if provider == "aws_s3" else "STORAGE_EMULATOR_HOST"]


def via_proxy(env: dict[str, str], provider: str, proxy: FaultProxy) -> dict[str, str]:
    """The worker's environment with one store behind ``proxy`` (queues stay direct)."""
    if provider == "aws_s3":
        return {**env, "AWS_ENDPOINT_URL_S3": proxy.url}
    return {**env, "STORAGE_EMULATOR_HOST": proxy.url}


def is_upload(provider: str) -> Callable[[str, str], bool]:
    """Requests that carry a multipart part (S3) or a resumable chunk (GCS)."""
    if provider == "aws_s3":
        return lambda method, path: method == "PUT" and "partNumber=" in path
    return lambda method, path: method == "PUT" and "upload_id=" in path


# =================================================================================================
# Tests
# =================================================================================================


def test_a_multipart_sized_object_is_copied_and_a_duplicate_is_skipped(
    cloud_env: dict[str, str], buckets: Buckets, channel: Any, direction: tuple[str, str]
) -> None:
    src, dst = direction
    data = os.urandom(LARGE)
    buckets.put(src, "big.bin", data)
    event = make_event(buckets, src, dst, "big.bin", sha256=sha(data))
    channel.send(encode(event))

    first = run_once(cloud_env, channel)
    [line] = first.outcomes("success")
    assert line["bytes_transferred"] == LARGE
    assert line["event_id"] == event["eventId"]
    assert_copied(buckets, event, data)
    if dst == "aws_s3":
        assert buckets.multipart_uploads() == []

    channel.send(encode(event))  # the same event delivered again
    second = run_once(cloud_env, channel)
    [skip] = second.outcomes("skipped")
    assert skip["reason"] == "already_applied"
    assert second.outcomes("success") == []
    assert channel.is_empty()


def test_a_checksum_mismatch_leaves_no_destination_object(
    cloud_env: dict[str, str], buckets: Buckets, channel: Any, direction: tuple[str, str]
) -> None:
    src, dst = direction
    data = os.urandom(LARGE)
    buckets.put(src, "big.bin", data)
    event = make_event(buckets, src, dst, "big.bin", sha256="0" * 64)
    channel.send(encode(event))

    worker = run_once(cloud_env, channel)
    [envelope] = channel.dead_letters()
    assert envelope["reason"] == "checksum_mismatch"
    assert json.loads(envelope["body"]) == event
    assert worker.outcomes("dead_lettered")[0]["reason"] == "checksum_mismatch"
    assert buckets.get(dst, f"copy/{'big.bin'}") is None  # HEAD
    assert buckets.keys(dst) == []  # and listing
    if dst == "aws_s3":
        assert buckets.multipart_uploads() == []
    assert channel.is_empty()


def test_a_missing_source_is_dead_lettered(
    cloud_env: dict[str, str], buckets: Buckets, channel: Any, direction: tuple[str, str]
) -> None:
    src, dst = direction
    event = make_event(buckets, src, dst, "no/such/object.bin")
    channel.send(encode(event))

    run_once(cloud_env, channel)
    [envelope] = channel.dead_letters()
    assert envelope["reason"] == "source_not_found"
    assert envelope["event_id"] == event["eventId"]
    assert buckets.keys(dst) == []


def test_a_poison_message_is_dead_lettered_as_invalid(
    cloud_env: dict[str, str], buckets: Buckets, channel: Any
) -> None:
    channel.send(b'{"schemaVersion": "1.0.0", "eventId": "not-a-uuid"}')
    channel.send(b"this is not json")

    worker = run_once(cloud_env, channel)
    envelopes = channel.dead_letters(expected=2)
    assert {e["reason"] for e in envelopes} == {"invalid_event"}
    assert {e["body"] for e in envelopes} == {
        '{"schemaVersion": "1.0.0", "eventId": "not-a-uuid"}',
        "this is not json",
    }
    assert len(worker.outcomes("dead_lettered")) == 2
    assert channel.is_empty()


@pytest.mark.parametrize(
    ("throttled", "status"), [("aws_s3", 503), ("gcp_gcs", 429)], ids=["s3_503", "gcs_429"]
)
def test_throttling_between_worker_and_store_is_retried(
    cloud_env: dict[str, str],
    buckets: Buckets,
    channel: Any,
    fault_proxy: Callable[..., FaultProxy],
    throttled: str,
    status: int,
) -> None:
    other = "gcp_gcs" if throttled == "aws_s3" else "aws_s3"
    upstream = endpoint_of(cloud_env, throttled)
    proxy = fault_proxy(upstream, status=status, failures=3)
    proxy.match = lambda method, path: method != "HEAD"  # a HEAD answer has no error code to read
    data = os.urandom(3 * MiB)
    buckets.put(throttled, "t.bin", data)
    event = make_event(buckets, throttled, other, "t.bin")  # the throttled store is read first
    channel.send(encode(event))

    worker = run_once(via_proxy(cloud_env, throttled, proxy), channel)
    assert proxy.injected == 3
    assert worker.outcomes("success"), worker.log_text()
    retries = [
        line
        for line in worker.lines
        if line.get("message", "").startswith("Transfer attempt failed")
    ]
    assert retries and {line["reason"] for line in retries} == {"throttled"}
    assert_copied(buckets, event, data)


def test_a_large_gcs_upload_is_one_streamed_request_and_a_failed_one_is_retried(
    cloud_env: dict[str, str],
    buckets: Buckets,
    channel: Any,
    fault_proxy: Callable[..., FaultProxy],
) -> None:
    """All but the last bytes go up in one request while the source is read; the final request
    carries the rest and finalises the object. A throttled streamed request is resumed from what
    the session kept (tests/test_resume.py). gcp-storage-emulator says ``bytes=0-0`` (one byte)
    where it holds none (GCS sends no Range), so the resumed request is refused and the attempt
    starts again, with a new session, and succeeds; no session is left waiting for bytes."""
    proxy = fault_proxy(cloud_env["STORAGE_EMULATOR_HOST"], status=429, failures=1)
    proxy.match = is_upload("gcp_gcs")
    data = os.urandom(LARGE)
    buckets.put("aws_s3", "streamed.bin", data)
    event = make_event(buckets, "aws_s3", "gcp_gcs", "streamed.bin", sha256=sha(data))
    channel.send(encode(event))

    worker = run_once(via_proxy(cloud_env, "gcp_gcs", proxy), channel)
    assert worker.outcomes("success"), worker.log_text()
    assert proxy.injected == 1
    ranges = [
        headers.get("Content-Range", "").split("-")[0]
        for method, path, headers in proxy.requests
        if is_upload("gcp_gcs")(method, path)
    ]
    # throttled; asked; resumed at the emulator's byte 1 and refused; streamed + final again
    assert ranges == ["bytes 0", f"bytes */{LARGE}", "bytes 1", "bytes 0", "bytes 41943040"]
    assert_copied(buckets, event, data)


def test_a_worker_killed_mid_transfer_is_redelivered_and_leaves_no_upload(
    cloud_env: dict[str, str],
    buckets: Buckets,
    channel: Any,
    direction: tuple[str, str],
    fault_proxy: Callable[..., FaultProxy],
) -> None:
    src, dst = direction
    upstream = endpoint_of(cloud_env, dst)
    proxy = fault_proxy(upstream)
    proxy.match, proxy.delay = is_upload(dst), 30.0  # parts hang: the kill lands mid-transfer
    data = os.urandom(LARGE)
    buckets.put(src, "big.bin", data)
    event = make_event(buckets, src, dst, "big.bin", sha256=sha(data))
    channel.send(encode(event))

    slow = WorkerProcess(
        via_proxy(cloud_env, dst, proxy), channel, "--visibility-timeout", "10", once=False
    )
    wait_until(lambda: any(proxy.match(*r) for r in proxy.seen), 60, "the first part upload")
    slow.stop(signal.SIGKILL)

    # The message comes back after its visibility timeout / ack deadline; a new worker (straight
    # to the store) takes it: redelivered, completed, and the killed worker's upload is cleaned.
    # Not `run --once` as soon as SQS counts the message visible: the killed worker's last long
    # poll is still open on the server, can take the message for another visibility timeout, and
    # the --once worker then finds the queue empty (seen with moto; real SQS does the same).
    again = WorkerProcess(cloud_env, channel, "--visibility-timeout", "10", once=False)
    again.wait_outcome("success", timeout=90)
    assert again.stop() == 0
    successes = again.outcomes("success")
    assert len(successes) == 1, again.log_text()
    assert successes[0]["event_id"] == event["eventId"]
    assert_copied(buckets, event, data)
    assert buckets.keys(dst) == ["copy/big.bin"]
    if dst == "aws_s3":
        assert buckets.multipart_uploads() == []


def test_an_event_past_its_budget_aborts_the_uploads_its_killed_deliveries_left(
    cloud_env: dict[str, str], buckets: Buckets
) -> None:
    """The last delivery of an event whose earlier deliveries were killed mid-upload is
    dead-lettered at once; it also aborts what they left open, since no attempt follows."""
    channel = SQSChannel(cloud_env)
    buckets.put("gcp_gcs", "big.bin", b"x" * 1024)
    event = make_event(buckets, "gcp_gcs", "aws_s3", "big.bin", maxRetries=0)
    dst_bucket, dst_key = buckets.names["aws_s3"], event["destination"]["key"]
    # The killed delivery's: idle since before its lease lapsed, so provably dead (moto reports
    # every upload as Initiated 2010-11-10, long past the visibility timeout).
    buckets.s3.create_multipart_upload(Bucket=dst_bucket, Key=dst_key)
    buckets.s3.create_multipart_upload(Bucket=dst_bucket, Key=dst_key + ".other")  # not ours
    channel.send(encode(event))
    first = channel.sqs.receive_message(QueueUrl=channel.queue, VisibilityTimeout=0)
    assert len(first["Messages"]) == 1  # delivery 1 of a budget of 1: it "crashed"

    worker = run_once(cloud_env, channel)
    [envelope] = channel.dead_letters()
    assert envelope["reason"] == "retries_exhausted" and envelope["receive_count"] == 2
    assert [u["Key"] for u in buckets.multipart_uploads()] == [dst_key + ".other"]
    assert buckets.keys("aws_s3") == []
    [line] = [x for x in worker.lines if x.get("message", "").startswith("Aborted uploads")]
    assert line["uploads_aborted"] == 1


@pytest.mark.parametrize("drain", ["finish", "hand_back"])
def test_sigterm_during_a_transfer_exits_0_and_loses_nothing(
    cloud_env: dict[str, str],
    buckets: Buckets,
    channel: Any,
    fault_proxy: Callable[..., FaultProxy],
    drain: str,
) -> None:
    src, dst = "aws_s3", "gcp_gcs"
    proxy = fault_proxy(cloud_env["STORAGE_EMULATOR_HOST"])
    proxy.match, proxy.delay = is_upload(dst), 0.5
    data = os.urandom(LARGE)
    buckets.put(src, "big.bin", data)
    event = make_event(buckets, src, dst, "big.bin", sha256=sha(data))
    channel.send(encode(event))

    drain_timeout = "60" if drain == "finish" else "0"
    worker = WorkerProcess(
        via_proxy(cloud_env, dst, proxy),
        channel,
        "--drain-timeout",
        drain_timeout,
        "--visibility-timeout",
        "30",
        once=True,
    )
    wait_until(lambda: any(proxy.match(*r) for r in proxy.seen), 60, "the first chunk upload")
    assert worker.stop(signal.SIGTERM) == 0, worker.log_text()
    stopped = [line for line in worker.lines if line.get("message") == "Worker stopped"]
    assert stopped, worker.log_text()

    if drain == "finish":
        assert worker.outcomes("success"), worker.log_text()
        assert_copied(buckets, event, data)
        assert channel.is_empty()
        return
    # Handed back at once (visibility 0 / nack). The transfer thread is not cancelled, so it may
    # still finish before the process exits; either way a new worker leaves the event done.
    handed_back = [line for line in worker.lines if line.get("message", "").startswith("Drain")]
    assert handed_back or worker.outcomes("success"), worker.log_text()
    again = run_once(cloud_env, channel)
    assert again.outcomes("success") or again.outcomes("skipped") or worker.outcomes("success")
    assert_copied(buckets, event, data)
    assert channel.is_empty()


def test_a_stopped_pubsub_worker_hands_back_every_unfinished_message_at_once(
    cloud_env: dict[str, str],
    buckets: Buckets,
    pubsub_topic_subscription: Callable[..., Any],
    fault_proxy: Callable[..., FaultProxy],
) -> None:
    """SIGTERM while the worker holds more messages than it runs (the client keeps the rest on
    hold) and the drain hands back the running ones: another subscriber gets every unfinished
    message within seconds, not when the stopped worker's lease (300 s) runs out. Hand-backs sent
    while the worker's own stream was still open came straight back down that stream, unread."""
    channel = PubSubChannel(pubsub_topic_subscription(dead_letter=True))
    proxy = fault_proxy(cloud_env["STORAGE_EMULATOR_HOST"])
    proxy.delay = 2.0  # every GCS request: each transfer outlasts the drain timeout
    events = [make_event(buckets, "aws_s3", "gcp_gcs", f"held/{n}.bin") for n in range(8)]
    for event in events:
        buckets.put("aws_s3", event["source"]["key"], os.urandom(1024))
        channel.send(encode(event))
    args = ("--concurrency", "2", "--drain-timeout", "0")
    worker = WorkerProcess(via_proxy(cloud_env, "gcp_gcs", proxy), channel, *args, once=False)
    wait_until(lambda: len(proxy.seen) >= 2, 60, "transfers talking to GCS")
    assert worker.stop(signal.SIGTERM) == 0, worker.log_text()

    unfinished = {e["eventId"] for e in events} - {
        line["event_id"] for line in worker.outcomes("success")
    }
    pulled: set[str] = set()

    def pull_all() -> bool:
        response = channel.subscriber.pull(subscription=channel.queue, max_messages=10, timeout=5)
        received = list(response.received_messages)
        pulled.update(json.loads(item.message.data)["eventId"] for item in received)
        if received:
            ack_ids = [item.ack_id for item in received]
            channel.subscriber.acknowledge(subscription=channel.queue, ack_ids=ack_ids)
        return unfinished <= pulled

    with contextlib.suppress(TimeoutError):
        wait_until(pull_all, 15, "every unfinished message back on the subscription")
    assert unfinished - pulled == set(), worker.log_text()


def test_s3_parts_grow_to_stay_within_ten_thousand(aws_env: str):
    """A 200 GiB object at 8 MiB parts would need 25,600 parts; S3 allows 10,000. The upload is
    created for real on moto (and aborted), nothing of that size is sent."""
    import boto3

    import transfer_worker as tw

    boto3.client("s3").create_bucket(Bucket="parts-limit-bucket")
    store = tw.S3Store(part_size=8 * tw.MiB, clients=tw.AwsClients(pool=2))
    ref = tw.ObjectRef("aws_s3", "parts-limit-bucket", "huge.bin")
    upload = store.open_write(ref, size=200 * 1024 * tw.MiB, content_type="x/y", metadata={})
    try:
        assert upload.part_size == 21 * tw.MiB  # ceil(200 GiB / 10,000) rounded up to a MiB
        assert upload.upload_id is not None
    finally:
        upload.abort()
    listed = boto3.client("s3").list_multipart_uploads(Bucket="parts-limit-bucket")
    assert listed.get("Uploads", []) == []


def test_a_body_cut_mid_download_is_retryable_for_both_providers():
    """urllib3 and http.client errors escape the SDKs unwrapped when a body is cut mid-read."""
    import http.client

    import urllib3

    import transfer_worker as tw

    cut = urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
    short = http.client.IncompleteRead(b"partial", 100)
    for translate in (tw.google_error, tw.aws_error):
        for exc in (cut, short):
            error = translate(exc, "source")
            assert isinstance(error, tw.RetryableError) and error.reason == "network", (
                translate,
                exc,
            )


# -- one dropped connection does not restart a transfer -----------------------------------------


def faulting(
    method: str, path_part: str, seen: list[str], faulted: Callable[[int], bool]
) -> Callable[[str, str], bool]:
    """Fault-proxy predicate: records every ``method`` request whose path contains
    ``path_part`` in ``seen``, and faults the n-th of them (from 1) when ``faulted(n)``."""

    def applies(request_method: str, path: str) -> bool:
        if request_method != method or path_part not in path:
            return False
        seen.append(path)
        return faulted(len(seen))

    return applies


def read_whole(store: Any, ref: Any) -> bytes:
    """The object as open_read() yields it, pinned to the version head() sees."""
    info = store.head(ref)
    assert info is not None
    with store.open_read(ref, info) as chunks:
        return b"".join(chunks)


def test_an_s3_read_cut_mid_body_resumes_where_it_stopped(aws_env: str) -> None:
    import boto3

    import transfer_worker as tw
    from tests.faultproxy import FaultProxy as CuttingProxy

    bucket, key, data = unique("s3r"), "in/resume.bin", os.urandom(3 * MiB + 77)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    gets: list[str] = []
    applies = faulting("GET", f"/{bucket}/{key}", gets, lambda n: n == 1)
    with CuttingProxy(aws_env, rates={"reset_mid_body": 1.0}, applies=applies) as proxy:
        store = tw.S3Store(clients=tw.AwsClients(pool=4, endpoint_url=proxy.url))
        read = read_whole(store, tw.ObjectRef("aws_s3", bucket, key))
        assert proxy.counts["reset_mid_body"] == 1
    assert read == data
    assert len(gets) == 2  # the cut GET, then one from where it stopped (Range, same ETag)


def test_a_gcs_range_read_cut_mid_body_is_read_again(
    gcs_env: str, gcs_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second of three ranges is cut: it is read again, the first is not. (A cut first
    range fails the attempt instead: nothing read yet is lost, and that retry backs off.)"""
    import transfer_worker as tw
    from tests.faultproxy import FaultProxy as CuttingProxy

    bucket, key, data = unique("gcsr"), "in/range.bin", os.urandom(2 * MiB + 77)
    gcs_client.create_bucket(bucket)
    gcs_client.bucket(bucket).blob(key).upload_from_string(data)
    gets: list[str] = []
    applies = faulting("GET", "alt=media", gets, lambda n: n == 2)
    with CuttingProxy(
        gcs_env, rates={"reset_mid_body": 1.0}, applies=applies, dialect="gcs"
    ) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        read = read_whole(tw.GCSStore(part_size=tw.MiB), tw.ObjectRef("gcp_gcs", bucket, key))
        assert proxy.counts["reset_mid_body"] == 1
    assert read == data
    assert len(gets) == 4  # three ranges, the second of them twice


@pytest.mark.parametrize(
    ("source", "cut", "args"),
    [
        ("aws_s3", 1, ()),  # the stream is reopened where it stopped
        ("gcp_gcs", 2, ("--part-size", str(5 * MiB))),  # the second range is read again
    ],
)
def test_a_read_retried_within_the_attempt_is_logged_with_its_event(
    cloud_env: dict[str, str], buckets: Buckets, source: str, cut: int, args: tuple[str, ...]
) -> None:
    """The attempt goes on, so the attempt's own retry line never appears; the operator still
    sees the dropped connection, on the event's log."""
    from tests.faultproxy import FaultProxy as CuttingProxy

    destination = "gcp_gcs" if source == "aws_s3" else "aws_s3"
    upstream = endpoint_of(cloud_env, source)
    data = os.urandom(5 * MiB + 77)
    buckets.put(source, "cut.bin", data)
    event = make_event(buckets, source, destination, "cut.bin")
    channel = SQSChannel(cloud_env)
    channel.send(encode(event))
    gets: list[str] = []
    path = f"/{buckets.names[source]}/cut.bin" if source == "aws_s3" else "alt=media"
    applies = faulting("GET", path, gets, lambda n: n == cut)
    dialect = "s3" if source == "aws_s3" else "gcs"
    with CuttingProxy(
        upstream, rates={"reset_mid_body": 1.0}, applies=applies, dialect=dialect
    ) as proxy:
        worker = run_once(via_proxy(cloud_env, source, proxy), channel, *args)  # type: ignore[arg-type]
        assert proxy.counts["reset_mid_body"] == 1
    assert worker.outcomes("success"), worker.log_text()
    retried = [
        line
        for line in worker.lines
        if line.get("message") == "Request failed; retrying it within the attempt"
    ]
    assert [(line["event_id"], line["reason"]) for line in retried] == [
        (event["eventId"], "network")
    ], worker.log_text()
    assert not [line for line in worker.lines if "Transfer attempt failed" in line["message"]]
    assert_copied(buckets, event, data)


def test_an_s3_abort_that_fails_is_tried_again(aws_env: str) -> None:
    """When the last attempt fails, nothing else would abort its upload before the bucket's
    lifecycle rule: the abort itself is retried (botocore tries twice, the worker three times)."""
    import boto3

    import transfer_worker as tw
    from tests.faultproxy import FaultProxy as FailingProxy

    bucket, key = unique("s3a"), "out/aborted.bin"
    boto3.client("s3").create_bucket(Bucket=bucket)
    deletes: list[str] = []
    first_three_aborts = faulting("DELETE", "uploadId=", deletes, lambda n: n <= 3)
    with FailingProxy(aws_env, rates={"error500": 1.0}, applies=first_three_aborts) as proxy:
        store = tw.S3Store(clients=tw.AwsClients(pool=4, endpoint_url=proxy.url))
        upload = store.open_write(
            tw.ObjectRef("aws_s3", bucket, key), size=20 * MiB, content_type="x/y", metadata={}
        )
        upload.write(os.urandom(9 * MiB))  # one part sent, one being filled
        upload.abort()
        assert proxy.counts["error500"] == 3
    assert len(deletes) == 4
    uploads = boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == []


@pytest.mark.parametrize("lost", [1, 99], ids=["sdk_retry_succeeds", "create_fails"])
def test_a_create_whose_answer_is_lost_leaves_no_orphan_upload(aws_env: str, lost: int) -> None:
    """CreateMultipartUpload whose answer is cut after S3 made the upload: botocore sends it
    again and S3 makes another. The first would stay open until the lifecycle rule; when every
    answer is lost, the attempt fails and must not leave any. Only provably dead uploads are
    aborted (idle past the visibility timeout: a young one may be another live delivery's), so
    the store looks as it does a visibility timeout after the lost create, as at a later
    transfer of the key (tests/test_bounds.py shows a young one left alone, with real
    Initiated times: moto reports 2010-11-10 for every upload)."""
    import boto3

    import transfer_worker as tw
    from tests.faultproxy import FaultProxy as CuttingProxy

    bucket, key = unique("s3c"), "out/created-twice.bin"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    creates: list[str] = []
    first_creates = faulting("POST", "?uploads", creates, lambda n: n <= lost)
    data = os.urandom(12 * MiB)

    def later() -> float:  # a visibility timeout (300 s) and a second after now
        return time.time() + 301

    with CuttingProxy(aws_env, rates={"truncate": 1.0}, applies=first_creates) as proxy:
        store = tw.S3Store(
            clients=tw.AwsClients(pool=4, endpoint_url=proxy.url), stale_after=300, clock=later
        )
        ref = tw.ObjectRef("aws_s3", bucket, key)
        if lost < 2:
            upload = store.open_write(ref, size=len(data), content_type="x/y", metadata={})
            upload.write(data)
            upload.commit({})
        else:
            with pytest.raises(tw.RetryableError):
                store.open_write(ref, size=len(data), content_type="x/y", metadata={})
    assert proxy.counts["truncate"] == min(lost, len(creates))
    assert len(creates) >= 2  # botocore sent the create again
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    if lost < 2:
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
