"""Tests of transfer_worker.py, in the module's section order, then end-to-end runs of the real CLI
as a subprocess on a temporary local root. Clocks and tenacity's sleep are injected; the few tests
that must wait for a real process wait on bounded polls."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import typing
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from conftest import Clock

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
SCRIPT = str(HERE / "transfer_worker.py")
SLOW_SCRIPT = str(HERE / "tests" / "slow_worker.py")
VALIDATOR = tw.load_validator()


# -------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------


def make_event(
    *,
    src: tuple[str, str, str] = ("aws_s3", "source-bucket", "in/data.bin"),
    dst: tuple[str, str, str] = ("gcp_gcs", "dest-bucket", "out/data.bin"),
    checksum: str | None = None,
    timestamp: str = "2024-01-15T10:30:00Z",
    **meta: Any,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": timestamp,
        "source": dict(zip(("provider", "bucket", "key"), src, strict=True)),
        "destination": dict(zip(("provider", "bucket", "key"), dst, strict=True)),
        "metadata": {"contentType": "application/octet-stream", **meta},
    }
    if checksum:
        event["metadata"]["checksumSHA256"] = checksum
    return event


def put_source(root: Path, provider: str, bucket: str, key: str, data: bytes) -> Path:
    path = root / provider / bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def parse(event: dict[str, Any] | bytes) -> tw.TransferEvent:
    raw = event if isinstance(event, bytes) else body(event)
    return tw.parse_event(raw, VALIDATOR)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def stores(root: Path) -> dict[str, tw.LocalObjectStore]:
    return {p: tw.LocalObjectStore(root, p, chunk_size=64 * 1024) for p in tw.PROVIDERS}


# -------------------------------------------------------------------------------------------------
# 1. Config
# -------------------------------------------------------------------------------------------------


def test_every_setting_has_a_flag_and_an_environment_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRANSFER_WORKER_CONCURRENCY", "3")
    monkeypatch.setenv("TRANSFER_WORKER_LOCAL_ROOT", "/somewhere")
    args = tw.build_parser().parse_args(["run", "--local-root", "/flag-wins"])
    config = tw.config_from_args(args)
    assert config.concurrency == 3
    assert config.local_root == "/flag-wins"
    help_text = tw.build_parser()._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    # run accepts --dead-letter-subscription but does not read it: dlq's help shows it
    for field in tw.Config.__dataclass_fields__.keys() - {"dead_letter_subscription"}:
        assert f"--{field.replace('_', '-')}" in help_text
        assert f"TRANSFER_WORKER_{field.upper()}" in help_text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--allowed-buckets", "s3:foo"], "--allowed-buckets"),
        (["--part-size", "1024"], "--part-size must be at least"),
        (["--concurrency", "0"], "--concurrency must be at least 1"),
    ],
)
def test_bad_settings_are_rejected_naming_the_setting(argv: list[str], message: str, capsys):
    assert tw.main(["run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRANSFER_WORKER_CONCURRENCY", "many")
    with pytest.raises(SystemExit, match="TRANSFER_WORKER_CONCURRENCY='many'"):
        tw.build_parser()


def test_allowlist_parses_provider_bucket_pairs():
    config = tw.Config(allowed_buckets="aws_s3:a-bucket, gcp_gcs:b_bucket")
    assert config.allowlist == {("aws_s3", "a-bucket"), ("gcp_gcs", "b_bucket")}


# -------------------------------------------------------------------------------------------------
# 4. Event validation
# -------------------------------------------------------------------------------------------------


def test_the_readme_example_event_is_valid():
    event = parse((HERE / "examples" / "event.json").read_bytes())
    assert event.source.uri == "s3://source-data-bucket/data/2024/01/file.parquet"
    assert event.destination.uri == "gs://destination-data-bucket/imports/2024/01/file.parquet"
    assert event.priority == "normal"
    assert event.max_retries == 3


def mutate(path: str, value: Any) -> dict[str, Any]:
    event = make_event()
    *parents, last = path.split(".")
    node = event
    for part in parents:
        node = node[part]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return event


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("schemaVersion", "2.0.0", "$.schemaVersion: unsupported schema version '2.0.0'"),
        ("schemaVersion", "0.9.1", "unsupported schema version"),
        ("schemaVersion", "1.0", "$.schemaVersion"),
        ("eventId", "not-a-uuid", "$.eventId"),
        ("correlationId", KeyError, "'correlationId' is a required property"),
        ("timestamp", "2024-13-45T10:30:00Z", "$.timestamp"),
        ("timestamp", "yesterday", "$.timestamp"),
        ("source.provider", "azure_blob", "$.source.provider"),
        ("source.bucket", "Upper_Case", "$.source.bucket"),
        ("source.bucket", "192.168.1.1", "$.source.bucket"),
        ("source.bucket", "ab", "$.source.bucket"),
        ("source.bucket", "under_score", "$.source.bucket"),  # fine for GCS, not for S3
        ("destination.bucket", "goog-data", "$.destination.bucket"),
        ("destination.bucket", "my-google-bucket", "$.destination.bucket"),
        ("destination.key", "", "$.destination.key"),
        ("destination.key", "tab\there", "$.destination.key"),
        ("source.key", KeyError, "'key' is a required property"),
        ("metadata.checksumSHA256", "abc", "$.metadata.checksumSHA256"),
        ("metadata.maxRetries", 11, "$.metadata.maxRetries"),
        ("metadata.maxRetries", -1, "$.metadata.maxRetries"),
        ("metadata.priority", "urgent", "$.metadata.priority"),
        ("metadata.contentType", "not a type", "$.metadata.contentType"),
    ],
)
def test_invalid_events_name_the_bad_field(path: str, value: Any, expected: str):
    with pytest.raises(tw.InvalidEvent) as caught:
        parse(mutate(path, value))
    assert expected in str(caught.value)
    assert caught.value.reason == "invalid_event"


def test_bucket_rules_differ_by_provider():
    parse(make_event(dst=("gcp_gcs", "under_score.bucket", "k")))
    with pytest.raises(tw.InvalidEvent, match=r"\$\.destination\.bucket"):
        parse(make_event(dst=("aws_s3", "under_score.bucket", "k")))


def test_key_length_is_counted_in_utf8_bytes():
    parse(make_event(src=("aws_s3", "source-bucket", "é" * 512)))  # 1024 bytes
    with pytest.raises(tw.InvalidEvent, match="longer than 1024 UTF-8 bytes"):
        parse(make_event(src=("aws_s3", "source-bucket", "é" * 513)))


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b", "/absolute", "a/./b", "a\\b"])
def test_keys_that_could_escape_a_bucket_are_invalid_key(key: str):
    with pytest.raises(tw.InvalidEvent) as caught:
        parse(make_event(dst=("gcp_gcs", "dest-bucket", key)))
    assert caught.value.reason == "invalid_key"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"text"', "expected a JSON object, got str"),
    ],
)
def test_bodies_that_are_not_json_objects(raw: bytes, expected: str):
    with pytest.raises(tw.InvalidEvent, match=expected):
        parse(raw)


def test_oversized_body_is_message_too_large():
    event = make_event()
    event["padding"] = "x" * (256 * 1024)
    with pytest.raises(tw.InvalidEvent) as caught:
        parse(event)
    assert caught.value.reason == "message_too_large"


def test_schema_allows_minor_version_additions():
    event = make_event()
    event["schemaVersion"] = "1.7.2"
    event["newOptionalField"] = {"added": "in 1.7"}
    assert parse(event).event_id == event["eventId"]


# -------------------------------------------------------------------------------------------------
# 6. Local adapters: object store
# -------------------------------------------------------------------------------------------------

REF = tw.ObjectRef("gcp_gcs", "dest-bucket", "dir/obj.bin")


def test_upload_is_invisible_until_commit_and_carries_metadata(stores, root: Path):
    store = stores["gcp_gcs"]
    upload = store.open_write(REF, size=6, content_type="text/plain", metadata={})
    upload.write(b"abc")
    upload.write(b"def")
    assert store.head(REF) is None
    assert not (root / "gcp_gcs" / "dest-bucket" / "dir" / "obj.bin").exists()
    upload.commit({tw.META_SHA256: sha(b"abcdef"), tw.META_EVENT_ID: "e1"})
    info = store.head(REF)
    assert info is not None and info.size == 6
    assert info.content_type == "text/plain"
    assert info.metadata[tw.META_EVENT_ID] == "e1"
    assert info.checksums == {"sha256": sha(b"abcdef")}
    assert (root / "gcp_gcs" / "dest-bucket" / "dir" / "obj.bin").read_bytes() == b"abcdef"
    assert list((root / ".tmp").iterdir()) == []


def test_abort_leaves_nothing_behind(stores, root: Path):
    upload = stores["gcp_gcs"].open_write(REF, size=3, content_type="x/y", metadata={})
    upload.write(b"abc")
    upload.abort()
    upload.abort()
    assert stores["gcp_gcs"].head(REF) is None
    assert list((root / ".tmp").iterdir()) == []


def test_metadata_of_a_file_replaced_by_hand_is_ignored(stores, root: Path):
    upload = stores["gcp_gcs"].open_write(REF, size=3, content_type="x/y", metadata={})
    upload.write(b"abc")
    upload.commit({"sha256": sha(b"abc")})
    path = root / "gcp_gcs" / "dest-bucket" / "dir" / "obj.bin"
    path.unlink()
    path.write_bytes(b"other bytes")
    info = stores["gcp_gcs"].head(REF)
    assert info is not None and info.metadata == {} and info.checksums == {}


def test_a_symlink_out_of_the_bucket_is_refused(stores, root: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    bucket = root / "gcp_gcs" / "dest-bucket"
    bucket.mkdir(parents=True)
    (bucket / "dir").symlink_to(outside)
    with pytest.raises(tw.InvalidEvent) as caught:
        stores["gcp_gcs"].head(REF)
    assert caught.value.reason == "invalid_key"


def test_reads_detect_a_source_that_changes_midway(stores, root: Path):
    path = put_source(root, "aws_s3", "source-bucket", "k", b"x" * 200_000)
    ref = tw.ObjectRef("aws_s3", "source-bucket", "k")
    info = stores["aws_s3"].head(ref)
    assert info is not None
    with pytest.raises(tw.SourceChanged), stores["aws_s3"].open_read(ref, info) as chunks:
        next(chunks)
        with path.open("r+b") as handle:  # an in-place rewrite of the same length
            handle.write(b"y" * 10)
        for _ in chunks:
            pass


# -------------------------------------------------------------------------------------------------
# 6. Local adapters: queue
# -------------------------------------------------------------------------------------------------


def test_queue_serves_high_before_normal_before_low_then_fifo(tmp_path: Path):
    queue = tw.LocalQueue(tmp_path / "q.db")
    for name, priority in [("n1", "normal"), ("l1", "low"), ("h1", "high"), ("n2", "normal")]:
        queue.publish(name.encode(), priority=priority)
    assert [m.body for m in queue.receive(10, 0)] == [b"h1", b"n1", b"n2", b"l1"]


def test_queue_visibility_timeout_and_receive_count(tmp_path: Path):
    clock = Clock()
    queue = tw.LocalQueue(tmp_path / "q.db", visibility_timeout=30, clock=clock)
    queue.publish(b"m")
    first = queue.receive(1, 0)
    assert [m.receive_count for m in first] == [1]
    assert queue.receive(1, 0) == []  # hidden
    clock.advance(29)
    queue.extend(first[0], 30)  # the heartbeat keeps it hidden
    clock.advance(29)
    assert queue.receive(1, 0) == []
    clock.advance(2)
    second = queue.receive(1, 0)  # the worker died: it comes back, counted
    assert [m.receive_count for m in second] == [2]
    queue.ack(first[0])  # a stale receipt does not delete the redelivered message
    assert queue.depth() == 1
    queue.ack(second[0])
    assert queue.depth() == 0


def test_queue_retry_later_and_dead_letter(tmp_path: Path):
    clock = Clock()
    queue = tw.LocalQueue(tmp_path / "q.db", clock=clock)
    queue.publish(b"m")
    [message] = queue.receive(1, 0)
    queue.retry_later(message, 5)
    assert queue.receive(1, 0) == []
    clock.advance(5)
    [message] = queue.receive(1, 0)
    queue.dead_letter(message, {"body": "m", "reason": "x", "event_id": "e"})
    assert queue.depth() == 0
    assert [env for _, env in queue.dead_letters("e")] == [
        {"body": "m", "reason": "x", "event_id": "e"}
    ]


def test_queue_receive_waits_for_a_message_from_another_connection(tmp_path: Path):
    consumer = tw.LocalQueue(tmp_path / "q.db", poll_interval=0.01)
    producer = tw.LocalQueue(tmp_path / "q.db")
    threading.Timer(0.05, producer.publish, args=(b"late",)).start()
    assert [m.body for m in consumer.receive(1, 5)] == [b"late"]


def test_queue_never_hands_one_message_to_two_consumers(tmp_path: Path):
    path = tmp_path / "q.db"
    producer = tw.LocalQueue(path)
    for i in range(300):
        producer.publish(str(i).encode())
    seen: list[bytes] = []
    lock = threading.Lock()

    def consume() -> None:
        queue = tw.LocalQueue(path)  # one connection each, as separate processes would have
        while batch := queue.receive(7, 0):
            with lock:
                seen.extend(m.body for m in batch)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(seen, key=int) == [str(i).encode() for i in range(300)]


# -------------------------------------------------------------------------------------------------
# 8. Transfer engine
# -------------------------------------------------------------------------------------------------


def engine_for(stores: dict[str, tw.LocalObjectStore], overwrite: str = "different"):
    return tw.TransferEngine(stores, overwrite=overwrite)


def test_transfer_streams_verifies_and_commits(stores, root: Path):
    data = os.urandom(300_000)
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
    event = parse(make_event(checksum=sha(data), contentType="application/x-test"))
    result = engine_for(stores).transfer(event)
    assert (result.outcome, result.bytes_transferred, result.sha256) == (
        "success",
        300_000,
        sha(data),
    )
    info = stores["gcp_gcs"].head(event.destination)
    assert info is not None
    assert (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").read_bytes() == data
    assert info.content_type == "application/x-test"
    assert info.metadata["transfer-worker-sha256"] == sha(data)
    assert info.metadata["transfer-worker-event-id"] == event.event_id
    assert info.metadata["transfer-worker-source"] == "s3://source-bucket/in/data.bin"
    assert info.metadata["transfer-worker-event-time"] == "2024-01-15T10:30:00+00:00"


def test_checksum_mismatch_leaves_the_destination_untouched(stores, root: Path):
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"new bytes")
    dest = put_source(root, "gcp_gcs", "dest-bucket", "out/data.bin", b"old bytes")
    event = parse(
        make_event(
            checksum=sha(b"something else"),
        )
    )
    with pytest.raises(tw.PermanentError) as caught:
        engine_for(stores, "always").transfer(event)
    assert caught.value.reason == "checksum_mismatch"
    assert dest.read_bytes() == b"old bytes"
    assert list((root / ".tmp").iterdir()) == []


def test_missing_source_is_source_not_found(stores):
    with pytest.raises(tw.PermanentError) as caught:
        engine_for(stores).transfer(parse(make_event()))
    assert caught.value.reason == "source_not_found"


def test_an_applied_event_is_skipped_without_moving_bytes(stores, root: Path):
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"payload")
    event = parse(make_event())
    assert engine_for(stores).transfer(event).outcome == "success"
    dest = root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin"
    before = dest.stat().st_mtime_ns
    result = engine_for(stores, "always").transfer(event)
    assert (result.outcome, result.reason) == ("skipped", "already_applied")
    assert dest.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("policy", "existing_sha_matches", "expected"),
    [
        ("different", True, ("success", None)),
        ("different", False, ("success", None)),
        ("never", False, ("skipped", "never_overwrite")),
        ("always", True, ("success", None)),
    ],
)
def test_overwrite_policies(stores, root, policy, existing_sha_matches, expected):
    data = b"source payload"
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
    first = parse(make_event(checksum=sha(data if existing_sha_matches else b"older")))
    put_source(
        root, "aws_s3", "source-bucket", "in/data.bin", data if existing_sha_matches else b"older"
    )
    engine_for(stores).transfer(first)
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
    # a newer event with the same bytes is written again, so it is on record (test_model.py)
    second = parse(make_event(timestamp="2024-01-16T00:00:00Z"))
    result = engine_for(stores, policy).transfer(second)
    assert (result.outcome, result.reason) == expected


def test_same_content_skips_identical_bytes_that_record_no_newer_event():
    """same_content is for a destination whose SHA-256 is known but no event of ours is on
    record for it, or the very same event; identical bytes of another event are written again
    (test_identical_bytes_...): only then is the newest event on record."""
    event = parse(make_event())
    bare = tw.ObjectInfo(size=1, version="v", metadata={"sha256": "ab"})
    assert tw.plan_skip(event, bare, "ab", "different") == "same_content"
    assert tw.plan_skip(event, bare, "cd", "different") is None
    older = {"sha256": "ab", "transfer-event-time": "2024-01-01T00:00:00+00:00"}
    older_info = tw.ObjectInfo(size=1, version="v", metadata={**older, "transfer-event-id": "x"})
    assert tw.plan_skip(event, older_info, "ab", "different") is None


def test_identical_bytes_of_a_newer_event_are_recorded_so_an_older_one_is_stale(stores, root):
    """Found by the model test: t0 writes X, t2 brings X again (skipped as same_content, so t0
    stayed on record), then t1 arrives late with Y and replaced the newest event's bytes."""

    def copy(data: bytes, when: str) -> tw.TransferResult:
        put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
        return engine_for(stores).transfer(parse(make_event(timestamp=when)))

    copy(b"X", "2024-01-01T00:00:00Z")
    assert copy(b"X", "2024-01-03T00:00:00Z").outcome == "success"
    late = copy(b"Y", "2024-01-02T00:00:00Z")
    assert (late.outcome, late.reason) == ("skipped", "stale_event")
    assert (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").read_bytes() == b"X"


def test_an_older_event_never_overwrites_a_newer_one(stores, root: Path):
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"newer")
    engine_for(stores).transfer(parse(make_event(timestamp="2024-02-01T00:00:00Z")))
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"older")
    result = engine_for(stores, "always").transfer(
        parse(make_event(timestamp="2024-01-01T00:00:00Z"))
    )
    assert (result.outcome, result.reason) == ("skipped", "stale_event")
    assert (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").read_bytes() == b"newer"


def test_a_source_checksum_is_checked_when_the_event_has_none(stores, root: Path):
    """The local store publishes the sha256 it recorded; a damaged read is retryable."""
    data = b"x" * 100
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
    info = tw.ObjectInfo(size=100, version="v", checksums={"sha256": sha(b"y" * 100)})
    with pytest.raises(tw.RetryableError) as caught:
        tw.TransferEngine._verify(parse(make_event()), info, None, {"sha256": sha(data)})
    assert caught.value.reason == "damaged_in_transit"


class LateMetadataStore(tw.LocalObjectStore):
    """A destination that, like S3 multipart, fixes metadata when the upload starts."""

    late_metadata_limit = 10
    seen_metadata: typing.ClassVar[list[dict[str, str]]] = []

    def open_write(self, ref, *, metadata, **kwargs):  # type: ignore[no-untyped-def]
        self.seen_metadata.append(dict(metadata))
        return super().open_write(ref, metadata=metadata, **kwargs)


def test_destinations_with_early_metadata_get_the_sha256_up_front(stores, root: Path):
    data = os.urandom(5000)
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
    stores = {**stores, "gcp_gcs": LateMetadataStore(root, "gcp_gcs")}
    engine_for(stores).transfer(parse(make_event()))
    assert LateMetadataStore.seen_metadata[-1][tw.META_SHA256] == sha(data)


# -------------------------------------------------------------------------------------------------
# 9. Observability and 10. Worker (in process, with injected sleep and clock)
# -------------------------------------------------------------------------------------------------


class Harness:
    """A worker on a temporary local root, its log captured, sleeps recorded instead of slept."""

    def __init__(self, root: Path, stores: dict[str, Any] | None = None, **settings: Any) -> None:
        self.root = root
        self.config = tw.Config(local_root=str(root), http_port=0, **settings)
        self.clock = Clock()
        self.queue = tw.LocalQueue(
            root / "queue.db",
            clock=self.clock,
            poll_interval=0.01,
            visibility_timeout=self.config.visibility_timeout,
        )
        self.stores = stores or tw.build_stores(self.config)
        self.metrics = tw.Metrics()
        self.log_stream = io.StringIO()
        self.sleeps: list[float] = []
        self.worker = tw.Worker(
            self.config,
            self.queue,
            tw.TransferEngine(self.stores, overwrite=self.config.overwrite),
            self.metrics,
            tw.make_logger("DEBUG", self.log_stream),
            clock=self.clock,
            sleep=self.sleeps.append,
        )

    def submit(self, event: dict[str, Any] | bytes, priority: str = "normal") -> None:
        self.queue.publish(event if isinstance(event, bytes) else body(event), priority=priority)

    def run_once(self) -> None:
        self.worker.run(once=True)

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_stream.getvalue().splitlines()]

    def outcome_logs(self) -> list[dict[str, Any]]:
        return [line for line in self.logs() if "outcome" in line]

    def dead_letters(self) -> list[dict[str, Any]]:
        return [env for _, env in self.queue.dead_letters()]

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


class FlakyStore:
    """Wraps a store; its first ``failures`` heads raise the given error."""

    def __init__(self, inner: tw.LocalObjectStore, failures: int, error: Exception) -> None:
        self.inner, self.failures, self.error = inner, failures, error
        self.late_metadata_limit = inner.late_metadata_limit
        self.calls = 0

    def head(self, ref: tw.ObjectRef) -> tw.ObjectInfo | None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.inner.head(ref)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def with_source_store(
    root: Path, make: Callable[[tw.LocalObjectStore], Any], **settings: Any
) -> Harness:
    """A Harness whose aws_s3 store is ``make(<the real local store>)``: a flaky or changing
    source in front of the real files."""
    stores = tw.build_stores(tw.Config(local_root=str(root)))
    return Harness(root, stores={**stores, "aws_s3": make(stores["aws_s3"])}, **settings)


def test_worker_transfers_and_reports(root: Path):
    h = Harness(root)
    data = os.urandom(4096)
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
    event = make_event(checksum=sha(data))
    h.submit(event)
    h.run_once()
    assert (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").read_bytes() == data
    [line] = h.outcome_logs()
    assert list(line)[:6] == [
        "timestamp",
        "level",
        "correlation_id",
        "event_id",
        "service",
        "message",
    ]
    assert line["level"] == "INFO"
    assert line["message"] == "Transfer completed successfully"
    assert line["event_id"] == event["eventId"]
    assert line["correlation_id"] == event["correlationId"]
    assert line["bytes_transferred"] == 4096
    assert line["outcome"] == "success"
    assert line["source"] == "s3://source-bucket/in/data.bin"
    pair = {"source_provider": "aws_s3", "destination_provider": "gcp_gcs"}
    assert h.metric("transfer_success_total", **pair) == 1
    assert h.metric("transfer_bytes_total", **pair) == 4096
    assert h.queue.depth() == 0


def test_transient_errors_are_retried_with_exponential_backoff(root: Path):
    h = with_source_store(
        root,
        lambda real: FlakyStore(real, 2, tw.RetryableError("503 SlowDown", reason="throttled")),
    )
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"data")
    h.submit(make_event())
    h.run_once()
    assert (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").read_bytes() == b"data"
    assert len(h.sleeps) == 2
    assert 1.0 <= h.sleeps[0] <= 2.0 and 2.0 <= h.sleeps[1] <= 3.0  # 1 s, 2 s, plus jitter
    labels = {"source_provider": "aws_s3", "destination_provider": "gcp_gcs", "reason": "throttled"}
    assert h.metric("retry_count_total", **labels) == 2


def test_backoff_is_capped(root: Path):
    h = with_source_store(
        root,
        lambda real: FlakyStore(real, 99, tw.RetryableError("timeout", reason="network")),
        max_retries=10,
        backoff_max=30.0,
    )
    h.submit(make_event(maxRetries=10))
    h.run_once()
    assert len(h.sleeps) == 10
    assert max(h.sleeps) <= 30.0 and h.sleeps[-1] == 30.0


def test_exhausted_retries_are_dead_lettered_with_attempts(root: Path):
    h = with_source_store(
        root,
        lambda real: FlakyStore(real, 99, tw.RetryableError("connection reset", reason="network")),
        max_retries=3,
    )
    event = make_event(maxRetries=5)  # capped by --max-retries 3
    h.submit(event)
    h.run_once()
    [envelope] = h.dead_letters()
    assert envelope["reason"] == "retries_exhausted"
    assert envelope["attempts"] == 4
    assert "connection reset" in envelope["error"]
    assert json.loads(envelope["body"]) == event
    assert envelope["worker_id"] == h.config.worker_id
    assert envelope["event_id"] == event["eventId"]
    assert (
        h.metric(
            "transfer_failure_total",
            source_provider="aws_s3",
            destination_provider="gcp_gcs",
            reason="retries_exhausted",
        )
        == 1
    )


def test_max_retries_zero_means_one_attempt(root: Path):
    h = with_source_store(
        root, lambda real: FlakyStore(real, 99, tw.RetryableError("timeout", reason="network"))
    )
    flaky = h.stores["aws_s3"]
    h.submit(make_event(maxRetries=0))
    h.run_once()
    assert flaky.calls == 1 and h.sleeps == []
    assert h.dead_letters()[0]["reason"] == "retries_exhausted"


def test_receive_count_counts_as_attempts(root: Path):
    """A message that crashed earlier workers gets only what is left of its attempt budget."""
    h = with_source_store(
        root,
        lambda real: FlakyStore(real, 99, tw.RetryableError("timeout", reason="network")),
        visibility_timeout=10,
    )
    flaky = h.stores["aws_s3"]
    h.submit(make_event(maxRetries=3))
    for _ in range(2):  # two deliveries that "crashed" before settling
        assert h.queue.receive(1, 0)
        h.clock.advance(11)
    h.run_once()
    assert flaky.calls == 2  # the third delivery had 4 - 2 attempts left
    assert h.dead_letters()[0]["attempts"] == 4


def test_a_message_past_its_budget_is_dead_lettered_without_a_transfer(root: Path):
    h = with_source_store(
        root, lambda real: FlakyStore(real, 0, RuntimeError("unused")), visibility_timeout=10
    )
    flaky = h.stores["aws_s3"]
    h.submit(make_event(maxRetries=1))
    for _ in range(2):
        h.queue.receive(1, 0)
        h.clock.advance(11)
    h.run_once()
    assert flaky.calls == 0
    [envelope] = h.dead_letters()
    assert envelope["reason"] == "retries_exhausted" and envelope["receive_count"] == 3


class UploadsLeftStore(tw.LocalObjectStore):
    """A destination whose killed deliveries left uploads behind, and whose abort may fail."""

    def __init__(self, *args: Any, error: Exception | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error = error
        self.aborted: list[tw.ObjectRef] = []

    def abort_stale_uploads(self, ref: tw.ObjectRef) -> int:
        if self.error:
            raise self.error
        self.aborted.append(ref)
        return 1


@pytest.mark.parametrize("error", [None, tw.RetryableError("503", reason="throttled")])
def test_an_event_past_its_budget_aborts_leftover_uploads_best_effort(
    root: Path, error: Exception | None
):
    stores = tw.build_stores(tw.Config(local_root=str(root)))
    destination = UploadsLeftStore(root, "gcp_gcs", error=error)
    h = Harness(root, stores={**stores, "gcp_gcs": destination}, visibility_timeout=10)
    h.submit(make_event(maxRetries=0))
    h.queue.receive(1, 0)  # the first delivery "crashed"
    h.clock.advance(11)
    h.run_once()
    assert h.dead_letters()[0]["reason"] == "retries_exhausted"  # with or without the abort
    messages = [line["message"] for line in h.logs()]
    if error:
        assert destination.aborted == []
        assert "Could not abort uploads left by earlier deliveries" in messages
    else:
        assert destination.aborted == [tw.ObjectRef("gcp_gcs", "dest-bucket", "out/data.bin")]
        assert "Aborted uploads left by earlier deliveries" in messages


def test_bucket_outside_the_allowlist_is_forbidden(root: Path):
    h = Harness(root, allowed_buckets="aws_s3:source-bucket")
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"data")
    h.submit(make_event())
    h.run_once()
    assert h.dead_letters()[0]["reason"] == "forbidden"
    assert not (root / "gcp_gcs").exists()
    [line] = h.outcome_logs()
    assert line["level"] == "WARNING" and line["reason"] == "forbidden"


def test_an_unexpected_bug_dead_letters_and_the_worker_goes_on(root: Path):
    h = with_source_store(root, lambda real: FlakyStore(real, 1, KeyError("bug")))
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"data")
    h.submit(make_event())
    h.submit(make_event())
    h.run_once()
    reasons = sorted(line.get("reason", "ok") for line in h.outcome_logs())
    assert reasons == ["internal_error", "ok"]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "invalid_event"),
        (b"\x00\xff binary", "invalid_event"),
        (body(mutate("schemaVersion", "2.0.0")), "invalid_event"),
        (body(mutate("eventId", KeyError)), "invalid_event"),
        (body(make_event(dst=("gcp_gcs", "dest-bucket", "../../escape"))), "invalid_key"),
        (b'{"pad": "' + b"x" * (300 * 1024) + b'"}', "message_too_large"),
    ],
)
def test_poison_messages_are_dead_lettered_verbatim(root: Path, raw: bytes, reason: str):
    h = Harness(root)
    h.submit(raw)
    h.run_once()
    [envelope] = h.dead_letters()
    assert envelope["reason"] == reason
    assert tw.envelope_body(envelope) == raw
    assert (
        h.metric(
            "transfer_failure_total",
            source_provider="unknown",
            destination_provider="unknown",
            reason=reason,
        )
        == 1
    )
    [line] = h.outcome_logs()
    assert line["level"] == "WARNING"


def test_duration_histogram_and_queue_lag_are_recorded(root: Path):
    """Queue lag counts from the queue's insert (42 s of waiting), the event's age from its
    timestamp (an hour before the insert), each in its own histogram."""
    h = Harness(root)
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"data")
    event = make_event(timestamp=tw.now_rfc3339(lambda: h.clock() - 3600))
    h.submit(event)
    h.clock.advance(42)
    h.run_once()
    assert h.metric("queue_lag_seconds_count") == 1
    assert h.metric("queue_lag_seconds_bucket", le="45.0") == 1
    assert h.metric("queue_lag_seconds_bucket", le="30.0") == 0
    assert h.metric("event_age_seconds_bucket", le="21600.0") == 1
    assert h.metric("event_age_seconds_bucket", le="3600.0") == 0
    assert (
        h.metric(
            "transfer_duration_seconds_count",
            source_provider="aws_s3",
            destination_provider="gcp_gcs",
            outcome="success",
        )
        == 1
    )


def test_shutdown_during_backoff_hands_the_message_back(root: Path):
    h = with_source_store(
        root, lambda real: FlakyStore(real, 99, tw.RetryableError("timeout", reason="network"))
    )
    h.worker.sleep = h.worker._interruptible_sleep
    h.worker.stop_event.set()  # as if SIGTERM arrived during the first attempt
    message = (h.submit(make_event()), h.queue.receive(1, 0))[1][0]
    h.worker.handle(message)
    assert h.dead_letters() == []
    assert [m.body for m in h.queue.receive(1, 0)] == [message.body]  # visible again at once


def test_heartbeat_extends_visibility_of_in_flight_messages(tmp_path: Path):
    calls: list[tuple[str, float]] = []

    class RecordingQueue:
        def extend(self, message: tw.Message, seconds: float) -> None:
            calls.append((message.message_id, seconds))

    message = tw.Message(body=b"", receive_count=1, handle=None, message_id="m1")
    beat = tw.Heartbeat(RecordingQueue(), lambda: [message], 0.03, tw.make_logger())  # type: ignore[arg-type]
    beat.start()
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        beat.stop_event.wait(0.01)
    beat.stop()
    assert calls[:2] == [("m1", 0.03), ("m1", 0.03)]


@pytest.mark.parametrize(("visibility", "interval"), [(30, 10), (1800, 200), (7200, 200)])
def test_heartbeat_beats_before_a_pubsub_lease_of_600_s_lapses(visibility: int, interval: float):
    """Pub/Sub extends a lease by 600 s at most, whatever the visibility timeout asks."""
    beat = tw.Heartbeat(None, list, visibility, tw.make_logger())  # type: ignore[arg-type]
    assert beat.interval == interval


# -------------------------------------------------------------------------------------------------
# 9. HTTP endpoints (the WSGI app, then the real server thread)
# -------------------------------------------------------------------------------------------------


def call(app: Callable[..., Any], path: str, method: str = "GET") -> tuple[str, bytes]:
    status: list[str] = []
    chunks = app({"PATH_INFO": path, "REQUEST_METHOD": method}, lambda s, h: status.append(s))
    return status[0], b"".join(chunks)


def test_health_ready_metrics_and_nothing_else():
    metrics = tw.Metrics()
    broken = {"ok": lambda: None}
    readiness = tw.Readiness(broken)
    app = tw.make_wsgi_app(metrics, readiness)
    assert call(app, "/health") == ("200 OK", b"ok\n")
    assert call(app, "/ready")[0] == "200 OK"
    status, text = call(app, "/metrics")
    assert status == "200 OK"
    for name in (
        "transfer_success_total",
        "transfer_failure_total",
        "transfer_skipped_total",
        "transfer_duration_seconds",
        "transfer_bytes_total",
        "retry_count_total",
        "transfers_in_flight",
        "queue_lag_seconds",
        "worker_ready",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text.decode()
    assert call(app, "/")[0] == "404 Not Found"
    assert call(app, "/metrics/../etc")[0] == "404 Not Found"
    assert call(app, "/health", "POST")[0] == "405 Method Not Allowed"
    readiness.draining.set()
    assert call(app, "/ready") == ("503 Service Unavailable", b"not ready: draining\n")


def test_ready_reports_unreachable_dependencies_by_name():
    def down() -> None:
        raise ConnectionError("refused")

    clock = Clock()
    readiness = tw.Readiness({"queue": down, "store:aws_s3": lambda: None}, clock=clock)
    app = tw.make_wsgi_app(tw.Metrics(), readiness)
    assert call(app, "/ready") == (
        "503 Service Unavailable",
        b"not ready: queue: ConnectionError\n",
    )


def test_http_server_thread_serves_and_survives_bad_clients():
    metrics = tw.Metrics()
    server, thread = tw.start_http_server(tw.make_wsgi_app(metrics, tw.Readiness({})), 0)
    port = server.server_address[1]
    try:
        slow = socket_connect(port)  # a client that never finishes its request
        slow.sendall(b"GET /hea")
        garbage = socket_connect(port)
        garbage.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        garbage.recv(1024)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/admin", timeout=5)
        assert caught.value.code == 404
        huge = socket_connect(port)
        huge.sendall(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
        assert b"414" in huge.recv(1024)  # request line over 64 KiB is refused
        for sock in (slow, garbage, huge):
            sock.close()
    finally:
        server.shutdown()
        thread.join(timeout=5)


def socket_connect(port: int):
    import socket

    return socket.create_connection(("127.0.0.1", port), timeout=5)


# -------------------------------------------------------------------------------------------------
# 11. CLI, end to end: the real command as a subprocess on a temporary local root
# -------------------------------------------------------------------------------------------------


class Cli:
    """The real CLI in subprocesses sharing one temporary local root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            **os.environ,
            "TRANSFER_WORKER_LOCAL_ROOT": str(root),
            "TRANSFER_WORKER_HTTP_PORT": "0",
            "TRANSFER_WORKER_HTTP_HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        }

    def run(
        self, *args: str, stdin: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [PYTHON, SCRIPT, *args],
            input=stdin,
            env=self.env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def start(self, *args: str, slow: bool = False, **env: str) -> subprocess.Popen[bytes]:
        script = SLOW_SCRIPT if slow else SCRIPT
        return subprocess.Popen(
            [PYTHON, script, *args],
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def submit(self, *events: dict[str, Any]) -> None:
        result = self.run("submit", "-", stdin=b"\n".join(body(e) for e in events))
        assert result.returncode == 0, result.stderr

    def dlq(self) -> list[dict[str, Any]]:
        out = self.run("dlq", "list").stdout.decode()
        return [json.loads(line) for line in out.splitlines()]


def follow(process: subprocess.Popen[bytes]) -> list[str]:
    """Collect a running process's stdout lines as they come, on a background thread."""
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            lines.append(raw.decode())

    threading.Thread(target=read, daemon=True).start()
    return lines


def log_lines(output: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]


def wait_until(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    gate = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        gate.wait(0.05)


@pytest.fixture
def cli(root: Path) -> Cli:
    return Cli(root)


@pytest.mark.parametrize(
    "command", [[], ["run"], ["submit"], ["validate"], ["dlq"], ["dlq", "list"], ["dlq", "redrive"]]
)
def test_every_command_has_help(cli: Cli, command: list[str]):
    result = cli.run(*command, "--help")
    assert result.returncode == 0
    assert b"usage: transfer-worker" in result.stdout


@pytest.mark.parametrize(("src", "dst"), [("aws_s3", "gcp_gcs"), ("gcp_gcs", "aws_s3")])
def test_cli_happy_path_both_directions(cli: Cli, root: Path, src: str, dst: str):
    data = os.urandom(3 * 1024 * 1024 + 17)
    put_source(root, src, "source-bucket", "in/data.bin", data)
    event = make_event(
        src=(src, "source-bucket", "in/data.bin"),
        dst=(dst, "dest-bucket", "out/data.bin"),
        checksum=sha(data),
    )
    cli.submit(event)
    result = cli.run("run", "--once")
    assert result.returncode == 0, result.stderr
    assert (root / dst / "dest-bucket" / "out" / "data.bin").read_bytes() == data
    [line] = [x for x in log_lines(result.stdout) if "outcome" in x]
    assert (line["outcome"], line["event_id"], line["bytes_transferred"]) == (
        "success",
        event["eventId"],
        len(data),
    )
    with contextlib.closing(sqlite3.connect(root / "metadata.db")) as db:
        [(record,)] = db.execute(
            "SELECT metadata FROM versions WHERE provider=? AND bucket='dest-bucket' "
            "AND key='out/data.bin'",
            (dst,),
        ).fetchall()
    assert json.loads(record)["metadata"]["transfer-worker-sha256"] == sha(data)
    assert json.loads(record)["metadata"]["transfer-worker-event-id"] == event["eventId"]


def test_cli_duplicate_event_is_a_skip(cli: Cli, root: Path):
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"once")
    event = make_event()
    cli.submit(event, event)
    result = cli.run("run", "--once", "--concurrency", "1")
    outcomes = [(x["outcome"], x.get("reason")) for x in log_lines(result.stdout) if "outcome" in x]
    assert outcomes == [("success", None), ("skipped", "already_applied")]


def test_cli_bad_inputs_each_end_in_the_dead_letter_queue(cli: Cli, root: Path):
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"payload")
    # a bucket whose directory cannot be created (a file is in the way): writing must fail
    (root / "gcp_gcs").mkdir(parents=True)
    (root / "gcp_gcs" / "blocked-bucket").write_bytes(b"not a directory")
    cases = {
        "invalid_event": [
            b"this is not json",
            body(mutate("schemaVersion", "3.0.0")),
            body(mutate("eventId", "nope")),
        ],
        "invalid_key": [body(make_event(dst=("gcp_gcs", "dest-bucket", "a/../../../escape")))],
        "forbidden": [body(make_event(dst=("gcp_gcs", "other-bucket", "k")))],
        "source_not_found": [body(make_event(src=("aws_s3", "source-bucket", "missing")))],
        "checksum_mismatch": [body(make_event(checksum="0" * 64))],
        "message_too_large": [body({**make_event(), "pad": "x" * 300_000})],
    }
    cases["destination_error"] = [body(make_event(dst=("gcp_gcs", "blocked-bucket", "k")))]
    for raws in cases.values():
        for raw in raws:
            result = cli.run("submit", "--no-validate", "-", stdin=raw)
            assert result.returncode == 0, result.stderr
    allowed = "aws_s3:source-bucket,gcp_gcs:dest-bucket,gcp_gcs:blocked-bucket"
    result = cli.run("run", "--once", "--allowed-buckets", allowed)
    assert result.returncode == 0
    envelopes = cli.dlq()
    by_reason: dict[str, list[bytes]] = {}
    for envelope in envelopes:
        by_reason.setdefault(envelope["reason"], []).append(tw.envelope_body(envelope))
    assert {r: sorted(b) for r, b in by_reason.items()} == {r: sorted(b) for r, b in cases.items()}
    logged = [x for x in log_lines(result.stdout) if x.get("outcome") == "dead_lettered"]
    assert sorted(x["reason"] for x in logged) == sorted(
        r for r, raws in cases.items() for _ in raws
    )
    assert all(x["level"] in ("WARNING", "ERROR") for x in logged)
    assert not (root / "gcp_gcs" / "dest-bucket").exists()
    assert not (root / "gcp_gcs" / "other-bucket").exists()


def test_cli_submit_rejects_an_invalid_event_naming_the_field(cli: Cli):
    events = [make_event(), mutate("metadata.priority", "urgent")]
    result = cli.run("submit", "-", stdin=json.dumps(events).encode())
    assert result.returncode == 2
    assert b"event 2: $.metadata.priority" in result.stderr  # the second element, from 1
    assert cli.run("run", "--once").returncode == 0
    assert cli.dlq() == []  # nothing was enqueued, not even the valid one


def test_cli_validate(cli: Cli, tmp_path: Path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([make_event(), make_event()]))
    result = cli.run("validate", str(good))
    assert (result.returncode, result.stdout) == (0, b"ok: 2 valid event(s)\n")
    result = cli.run("validate", "-", stdin=body(mutate("timestamp", "noon")))
    assert result.returncode == 2 and b"$.timestamp" in result.stderr
    result = cli.run("validate", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and b"No such file" in result.stderr


def test_cli_dlq_redrive_puts_bodies_back(cli: Cli, root: Path):
    first, second = make_event(), make_event()
    cli.submit(first, second)
    cli.run("run", "--once")  # no sources yet: both dead-lettered source_not_found
    assert sorted(e["event_id"] for e in cli.dlq()) == sorted([first["eventId"], second["eventId"]])
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"now here")
    redrive = cli.run("dlq", "redrive", "--event-id", first["eventId"])
    assert redrive.returncode == 0 and b"redrove 1" in redrive.stderr
    result = cli.run("run", "--once")
    assert [x["event_id"] for x in log_lines(result.stdout) if x.get("outcome") == "success"] == [
        first["eventId"]
    ]
    assert [e["event_id"] for e in cli.dlq()] == [second["eventId"]]


def test_cli_priority_order(cli: Cli, root: Path):
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"p")
    events = [
        make_event(priority=p, dst=("gcp_gcs", "dest-bucket", p)) for p in ("low", "normal", "high")
    ]
    cli.submit(*events)
    result = cli.run("run", "--once", "--concurrency", "1")
    done = [x["destination"] for x in log_lines(result.stdout) if x.get("outcome") == "success"]
    assert done == ["gs://dest-bucket/high", "gs://dest-bucket/normal", "gs://dest-bucket/low"]


def test_cli_metrics_and_health_over_http(cli: Cli, root: Path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", b"m")
    cli.submit(make_event())
    worker = cli.start("run", TRANSFER_WORKER_HTTP_PORT=str(port))
    try:

        def metrics_text() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    return r.read().decode()
            except OSError:
                return ""

        wait_until(
            lambda: (
                'transfer_success_total{destination_provider="gcp_gcs",'
                'source_provider="aws_s3"} 1.0' in metrics_text()
            ),
            what="success metric",
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
            assert r.status == 200
        text = metrics_text()
        assert "worker_ready 1.0" in text
        assert (
            'transfer_bytes_total{destination_provider="gcp_gcs",source_provider="aws_s3"} 1.0'
            in text
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0


def test_cli_sigterm_during_a_transfer_finishes_it_and_exits_0(cli: Cli, root: Path):
    data = os.urandom(2 * 1024 * 1024)  # 32 chunks of 64 KiB at 0.05 s: about 1.6 s in flight
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
    cli.submit(make_event(checksum=sha(data)))
    worker = cli.start("run", slow=True)
    wait_until(lambda: any((root / ".tmp").glob("upload-*")), what="transfer in flight")
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").read_bytes() == data
    messages = [x["message"] for x in log_lines(out)]
    assert messages.index("Shutdown requested; draining") < messages.index(
        "Transfer completed successfully"
    )
    assert tw.LocalQueue(root / "queue.db").depth() == 0


def test_cli_drain_timeout_hands_unfinished_work_back(cli: Cli, root: Path):
    data = os.urandom(4 * 1024 * 1024)  # about 3 s in flight; drain timeout 0
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
    cli.submit(make_event(checksum=sha(data)))
    worker = cli.start("run", "--drain-timeout", "0", slow=True)
    wait_until(lambda: any((root / ".tmp").glob("upload-*")), what="transfer in flight")
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0
    assert not (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").exists()
    assert "Drain timeout passed; handed back unfinished messages" in out.decode()
    assert "Transfer interrupted by shutdown; message handed back" in out.decode()
    assert not list((root / ".tmp").glob("upload-*"))  # the upload was aborted, not orphaned
    assert cli.run("run", "--once").returncode == 0  # the message is visible again at once
    assert (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").read_bytes() == data


def test_cli_second_signal_exits_at_once(cli: Cli, root: Path):
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", os.urandom(4 * 1024 * 1024))
    cli.submit(make_event())
    worker = cli.start("run", slow=True)
    wait_until(lambda: any((root / ".tmp").glob("upload-*")), what="transfer in flight")
    lines = follow(worker)
    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: any("draining" in line for line in lines), what="first signal handled")
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=30) == 128 + signal.SIGINT
    assert not (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").exists()


def test_cli_kill_9_mid_transfer_then_restart_completes(cli: Cli, root: Path):
    data = os.urandom(2 * 1024 * 1024)
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
    event = make_event(checksum=sha(data))
    cli.submit(event)
    dest = root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin"
    worker = cli.start("run", "--visibility-timeout", "2", slow=True)
    wait_until(lambda: any((root / ".tmp").glob("upload-*")), what="transfer in flight")
    worker.kill()
    worker.communicate(timeout=30)
    assert not dest.exists()  # nothing half-written is visible
    restarted = cli.start("run", "--visibility-timeout", "2")
    try:
        wait_until(dest.exists, timeout=60, what="redelivered transfer")
    finally:
        restarted.send_signal(signal.SIGTERM)
        out, _ = restarted.communicate(timeout=30)
    assert dest.read_bytes() == data
    [line] = [x for x in log_lines(out) if x.get("outcome") == "success"]
    assert line["event_id"] == event["eventId"]
    assert tw.LocalQueue(root / "queue.db").depth() == 0


def _open_local_root(root: Path, barrier: Any, errors: Any) -> None:
    barrier.wait()
    try:
        tw.LocalMetadata(root)
        tw.LocalQueue(root / "queue.db").close()
        errors.put(None)
    except Exception as error:  # reported to the parent, which asserts on it
        errors.put(repr(error))


def test_workers_started_at_once_on_a_fresh_root_all_open_it(tmp_path: Path):
    """Two workers started together on a new root both switched its SQLite files to WAL; one of
    them could get "database is locked" at once, with no busy wait, and exit 1 (CI, 2026-11-29).
    Six processes race on a fresh root, twenty times: the old code failed about one round in
    three."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(20):
        barrier, errors = context.Barrier(6), context.Queue()
        processes = [
            context.Process(target=_open_local_root, args=(tmp_path / str(round_), barrier, errors))
            for _ in range(6)
        ]
        for process in processes:
            process.start()
        failures += [e for e in (errors.get(timeout=60) for _ in processes) if e]
        for process in processes:
            process.join(timeout=60)
    assert failures == []


def test_cli_two_workers_share_one_queue(cli: Cli, root: Path):
    events = []
    for i in range(120):
        data = f"object {i}".encode() * 50
        put_source(root, "aws_s3", "source-bucket", f"in/{i}", data)
        events.append(
            make_event(
                src=("aws_s3", "source-bucket", f"in/{i}"),
                dst=("gcp_gcs", "dest-bucket", f"out/{i}"),
                checksum=sha(data),
            )
        )
    cli.submit(*events)
    workers = [cli.start("run", "--once", "--concurrency", "4") for _ in range(2)]
    results = [w.communicate(timeout=120) for w in workers]
    outputs = [out for out, _ in results]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in results]
    done = [
        x["event_id"] for out in outputs for x in log_lines(out) if x.get("outcome") == "success"
    ]
    assert sorted(done) == sorted(e["eventId"] for e in events)  # each exactly once
    assert all(log_lines(out) for out in outputs)
    for i in range(120):
        assert (
            root / "gcp_gcs" / "dest-bucket" / f"out/{i}"
        ).read_bytes() == f"object {i}".encode() * 50


# Four threads each free 8 MiB buffers with a small object allocated after each, as transfer
# threads do; prints how many bytes the process still holds once every buffer is freed.
HELD_AFTER_FREE = """
import os, sys, threading
import transfer_worker
if sys.argv[1] == "tuned":
    transfer_worker.return_large_buffers_to_the_os()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
alive = []
def transfer():
    for _ in range(4):
        buffer = b"x" * (8 << 20)
        alive.append(bytearray(1000))
        del buffer
before = rss()
threads = [threading.Thread(target=transfer) for _ in range(4)]
for thread in threads: thread.start()
for thread in threads: thread.join()
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc's malloc")
@pytest.mark.parametrize(
    ("mode", "environment", "returned"),
    [
        ("tuned", {}, True),
        ("untuned", {}, False),  # the control: glibc alone keeps freed buffers
        ("tuned", {"MALLOC_MMAP_THRESHOLD_": str(64 << 20)}, False),  # the operator's choice wins
    ],
)
def test_freed_transfer_buffers_go_back_to_the_os(
    mode: str, environment: dict[str, str], returned: bool
):
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(PYTHONPATH=str(HERE), **environment)
    result = subprocess.run(
        [PYTHON, "-c", HELD_AFTER_FREE, mode], env=env, capture_output=True, timeout=60, check=True
    )
    held_mib = int(result.stdout) / 2**20
    assert (held_mib < 4) is returned, f"{held_mib:.1f} MiB still held"


def test_cli_local_mode_needs_no_configuration(tmp_path: Path):
    """`python transfer_worker.py --once` in an empty directory creates ./storage_simulator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFER_WORKER_")}
    env["TRANSFER_WORKER_HTTP_PORT"] = "0"
    result = subprocess.run(
        [PYTHON, SCRIPT, "--once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "storage_simulator" / "queue.db").exists()
    assert [x["message"] for x in log_lines(result.stdout)] == ["Worker started", "Worker stopped"]


def test_sweep_removes_only_orphaned_upload_files(stores, root: Path):
    store = stores["gcp_gcs"]
    live = store.open_write(REF, size=1, content_type="x/y", metadata={})
    orphan = store.open_write(
        tw.ObjectRef("gcp_gcs", "dest-bucket", "other"), size=1, content_type="x/y", metadata={}
    )
    os.close(orphan.fd)
    old = time.time() - 7200
    os.utime(orphan.temp, (old, old))
    assert store.sweep_temporary(3600) == 1
    assert [p.name for p in (root / ".tmp").iterdir()] == [live.temp.name]
    live.abort()


class ChangingSourceStore(tw.LocalObjectStore):
    """Rewrites the source in place while the first read is under way, as a producer might."""

    changes_left = 1

    def _chunks(self, handle, entry, ref, info):  # type: ignore[no-untyped-def]
        for number, chunk in enumerate(super()._chunks(handle, entry, ref, info)):
            if number == 0 and self.changes_left:
                self.changes_left -= 1
                with open(self._path(ref), "r+b") as rewrite:
                    rewrite.write(b"Z" * 16)
            yield chunk


def test_a_source_changed_mid_transfer_is_retried_from_the_start(root: Path):
    data = os.urandom(300_000)
    put_source(root, "aws_s3", "source-bucket", "in/data.bin", data)
    stores = tw.build_stores(tw.Config(local_root=str(root)))
    changing = ChangingSourceStore(root, "aws_s3", chunk_size=64 * 1024)
    h = Harness(root, stores={**stores, "aws_s3": changing})
    h.submit(make_event())
    h.run_once()
    final = (root / "aws_s3" / "source-bucket" / "in" / "data.bin").read_bytes()
    assert final[:16] == b"Z" * 16
    assert (root / "gcp_gcs" / "dest-bucket" / "out" / "data.bin").read_bytes() == final
    assert (
        h.metric(
            "retry_count_total",
            source_provider="aws_s3",
            destination_provider="gcp_gcs",
            reason="source_changed",
        )
        == 1
    )


def test_readme_documents_every_setting():
    readme = (HERE / "README.md").read_text()
    for field in tw.Config.__dataclass_fields__:
        row_start = f"| `--{field.replace('_', '-')}` | `TRANSFER_WORKER_{field.upper()}` |"
        assert row_start in readme, f"README configuration table lacks {field}"


@pytest.mark.parametrize("key", ["\ud800", "a\ud800b", "c1\u0085control", "del\u007f"])
def test_keys_that_are_not_text_or_hold_control_characters_are_invalid_key(key: str):
    raw = json.dumps(make_event(src=("aws_s3", "source-bucket", key))).encode()  # \ud800 escaped
    with pytest.raises(tw.InvalidEvent) as caught:
        parse(raw)
    assert caught.value.reason in ("invalid_key", "invalid_event")
    with pytest.raises(tw.InvalidEvent) as direct:
        tw.check_key(key)
    assert direct.value.reason == "invalid_key"
