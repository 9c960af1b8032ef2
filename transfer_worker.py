#!/usr/bin/env python3
"""transfer-worker: move objects between AWS S3 and Google Cloud Storage, driven by queue events.

Each transfer event (``event_schema.json``) names one source object and one destination. The worker
streams the bytes across in fixed-size chunks, computes SHA-256 on the way, and only lets the
destination object exist once the digest matches. Transient failures are retried with backoff;
everything else goes to a dead-letter queue with a reason. With no configuration it runs in local
mode: filesystem "buckets" and a SQLite queue under ``./storage_simulator``.

The module reads top to bottom; each section depends only on the ones above it:

    1. Constants and Config        every tunable, its default, its flag and environment variable
    2. Errors                      TransferError -> RetryableError / PermanentError, with a reason
    3. Data types                  ObjectRef, ObjectInfo, TransferEvent, Message, TransferResult
    4. Event validation            jsonschema against event_schema.json, plus key and size rules
    5. Ports                       ObjectStore, Upload and MessageQueue protocols
    6. Local adapters              filesystem object store, SQLite queue
    7. Cloud adapters              S3, GCS, SQS, Pub/Sub (each imports its SDK inside itself)
    8. Transfer engine             plan, stream, hash, verify, commit or abort
    9. Observability               structlog JSON logs, Prometheus metrics, /health /ready /metrics
   10. Worker                      receive -> validate -> transfer with retry -> settle
   11. CLI                         main(): run, submit, validate, dlq
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from queue import SimpleQueue
from typing import IO, Any, Protocol, TextIO

import jsonschema
import structlog
import tenacity
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# =================================================================================================
# 1. Constants and Config
# =================================================================================================

SERVICE_NAME = "transfer-worker"
ENV_PREFIX = "TRANSFER_WORKER_"
SCHEMA_PATH = Path(__file__).with_name("event_schema.json")
SUPPORTED_SCHEMA_MAJOR = 1
MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's lower bound for every multipart part but the last
PROVIDERS = ("aws_s3", "gcp_gcs")
PRIORITIES = {"high": 0, "normal": 1, "low": 2}
OVERWRITE_POLICIES = ("different", "never", "always")
# Object metadata the worker writes on every destination; lowercase because S3 lowercases user keys.
META_SHA256 = "sha256"
META_EVENT_ID = "transfer-event-id"
META_EVENT_TIME = "transfer-event-time"
META_SOURCE = "transfer-source"


def _setting(default: Any, help: str, **extra: Any) -> Any:
    """A Config field whose metadata drives its command-line flag and environment variable."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass(frozen=True)
class Config:
    """Every tunable of the worker. Each field is a flag (``--local-root``) and an environment
    variable (``TRANSFER_WORKER_LOCAL_ROOT``); the flag wins over the variable, the variable over
    the default."""

    local_root: str = _setting("./storage_simulator", "root of local-mode buckets and queue.db")
    storage: str = _setting(
        "local", "object stores: local (filesystem) or cloud (S3 + GCS)", choices=("local", "cloud")
    )
    queue: str = _setting(
        "",
        "SQS queue URL, projects/P/subscriptions/S, or a SQLite path "
        "(default <local-root>/queue.db)",
    )
    dead_letter: str = _setting(
        "",
        "SQS queue URL, projects/P/topics/T, or a SQLite path "
        "(default: the local queue's dead-letter table)",
    )
    concurrency: int = _setting(8, "transfers in flight at once", minimum=1)
    part_size: int = _setting(
        8 * MiB, "multipart part / resumable chunk size in bytes", minimum=MIN_PART_SIZE
    )
    max_retries: int = _setting(3, "cap on an event's metadata.maxRetries", minimum=0)
    overwrite: str = _setting(
        "different", "when an existing destination is replaced", choices=OVERWRITE_POLICIES
    )
    # Probes and scrapes come from outside the pod, so all interfaces by default.
    http_host: str = _setting(
        "0.0.0.0",  # noqa: S104 - see above  # nosec B104
        "address the HTTP endpoints listen on",
    )
    http_port: int = _setting(8080, "port of /health, /ready and /metrics (0 disables)", minimum=0)
    log_level: str = _setting(
        "INFO", "DEBUG, INFO, WARNING or ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    allowed_buckets: str = _setting("", "comma-separated provider:bucket allowlist (empty: all)")
    visibility_timeout: int = _setting(
        300,
        "seconds a received message stays hidden; extended "
        "every third of it while its transfer runs",
        minimum=1,
    )
    drain_timeout: int = _setting(
        60, "seconds in-flight transfers get to finish after SIGTERM", minimum=0
    )
    aws_role_arn: str = _setting("", "AWS role to assume with this pod's Google identity token")
    aws_role_audience: str = _setting("sts.amazonaws.com", "audience of that Google ID token")
    worker_id: str = _setting(
        f"{socket.gethostname()}-{os.getpid()}", "name in dead-letter envelopes and logs"
    )
    chunk_size: int = _setting(1 * MiB, "bytes read from the source at a time", minimum=64 * 1024)
    backoff_initial: float = _setting(1.0, "first retry delay in seconds (then x2 with jitter)")
    backoff_max: float = _setting(30.0, "largest retry delay in seconds")
    max_message_bytes: int = _setting(
        256 * 1024, "larger message bodies are dead-lettered", minimum=1024
    )

    @property
    def allowlist(self) -> frozenset[tuple[str, str]]:
        """The allowed (provider, bucket) pairs; empty means every bucket is allowed."""
        pairs = [item.strip() for item in self.allowed_buckets.split(",") if item.strip()]
        return frozenset(tuple(pair.split(":", 1)) for pair in pairs)  # type: ignore[misc]

    def validate(self) -> None:
        """Reject combinations argparse cannot see, naming the setting to fix."""
        for item in filter(None, (p.strip() for p in self.allowed_buckets.split(","))):
            provider, _, bucket = item.partition(":")
            if provider not in PROVIDERS or not bucket:
                raise ValueError(
                    f"--allowed-buckets: {item!r} is not provider:bucket "
                    f"(provider one of {', '.join(PROVIDERS)})"
                )
        for field in dataclasses.fields(self):
            minimum = field.metadata.get("minimum")
            if minimum is not None and getattr(self, field.name) < minimum:
                raise ValueError(f"--{field.name.replace('_', '-')} must be at least {minimum}")


# =================================================================================================
# 2. Errors
# =================================================================================================


class TransferError(Exception):
    """A failure with a stable, low-cardinality ``reason`` for metrics and dead-letter envelopes."""

    retryable = False
    default_reason = "internal_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason


class RetryableError(TransferError):
    """Worth another attempt: network errors, timeouts, throttling, 5xx, a source that changed."""

    retryable = True
    default_reason = "transient"


class PermanentError(TransferError):
    """Another attempt would fail the same way; the event goes to the dead-letter queue at once."""

    default_reason = "permanent"


class InvalidEvent(PermanentError):
    """The message is not a transfer event this worker can act on."""

    default_reason = "invalid_event"


class SourceChanged(RetryableError):
    """The source object changed while it was read; the transfer starts again from the beginning."""

    default_reason = "source_changed"


class ShutdownRequested(Exception):
    """Raised out of a retry backoff when the worker drains: the message goes back unsettled."""


# =================================================================================================
# 3. Data types
# =================================================================================================

URI_SCHEMES = {"aws_s3": "s3", "gcp_gcs": "gs"}


@dataclasses.dataclass(frozen=True)
class ObjectRef:
    """One object in one bucket of one provider."""

    provider: str
    bucket: str
    key: str
    region: str | None = None

    @property
    def uri(self) -> str:
        return f"{URI_SCHEMES[self.provider]}://{self.bucket}/{self.key}"


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about an object without reading it. ``version`` (ETag, generation, file
    stat) pins reads so a concurrent change is detected; ``checksums`` holds the provider's own
    digests as lowercase hex under ``sha256``, ``md5`` or ``crc32c``, where it publishes them."""

    size: int
    version: str
    content_type: str | None = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    checksums: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TransferEvent:
    """A validated transfer event."""

    event_id: str
    correlation_id: str
    timestamp: dt.datetime
    source: ObjectRef
    destination: ObjectRef
    content_type: str | None
    checksum_sha256: str | None
    max_retries: int
    priority: str


@dataclasses.dataclass
class Message:
    """One delivery of one queue message. ``receive_count`` counts this delivery (1 = first);
    ``handle`` is whatever the queue adapter needs to settle it."""

    body: bytes
    receive_count: int
    handle: Any
    message_id: str
    received_at: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass(frozen=True)
class TransferResult:
    """How a transfer ended well: ``success`` (bytes written) or ``skipped`` (reason says why)."""

    outcome: str
    bytes_transferred: int = 0
    sha256: str | None = None
    reason: str | None = None


# =================================================================================================
# 4. Event validation
# =================================================================================================

_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def load_validator(schema_path: Path = SCHEMA_PATH) -> jsonschema.protocols.Validator:
    """A Draft 2020-12 validator for the event schema, with format checking (uuid, date-time) on."""
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    flat = _inline_refs(schema, schema.get("$defs", {}))
    return cls(flat, format_checker=cls.FORMAT_CHECKER)


def _inline_refs(node: Any, defs: Mapping[str, Any]) -> Any:
    """The schema with its local ``#/$defs/...`` references written out in place. jsonschema
    resolves a $ref on every validation, a third of the time spent per event; the file keeps
    them for readers."""
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref", "")
    rest = {k: _inline_refs(v, defs) for k, v in node.items() if k not in ("$ref", "$defs")}
    if not ref.startswith("#/$defs/"):
        return rest
    return {**_inline_refs(defs[ref.removeprefix("#/$defs/")], defs), **rest}


def parse_event(
    body: bytes, validator: jsonschema.protocols.Validator, *, max_bytes: int = 256 * 1024
) -> TransferEvent:
    """Turn a raw message body into a TransferEvent or raise InvalidEvent naming the bad field."""
    if len(body) > max_bytes:
        raise InvalidEvent(
            f"message body is {len(body)} bytes, over the {max_bytes} byte limit",
            reason="message_too_large",
        )
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidEvent(f"message body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidEvent(f"$: expected a JSON object, got {type(document).__name__}")
    _check_schema_version(document.get("schemaVersion"))
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        raise InvalidEvent(f"{error.json_path}: {error.message}")
    for side in ("source", "destination"):
        check_key(document[side]["key"], f"$.{side}.key")
    return _event_from_document(document)


def _check_schema_version(version: Any) -> None:
    """A different major version is named as such, not as a generic pattern mismatch."""
    match = _SEMVER.match(version) if isinstance(version, str) else None
    if match and int(match.group(1)) != SUPPORTED_SCHEMA_MAJOR:
        raise InvalidEvent(
            f"$.schemaVersion: unsupported schema version {version!r} "
            f"(this worker reads {SUPPORTED_SCHEMA_MAJOR}.x.y)"
        )


def check_key(key: str, path: str = "$.key") -> None:
    """Reject keys that are too long in bytes or could escape a bucket directory.

    S3 and GCS accept ``..`` segments and leading slashes, but a worker that writes such a key to a
    filesystem, or a downstream tool that does, can be tricked into writing outside the bucket, so
    the worker refuses them everywhere."""
    if len(key.encode("utf-8")) > 1024:
        raise InvalidEvent(f"{path}: key is longer than 1024 UTF-8 bytes")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise InvalidEvent(f"{path}: key contains a control character", reason="invalid_key")
    if key.startswith("/") or "\\" in key or any(part in (".", "..") for part in key.split("/")):
        raise InvalidEvent(
            f"{path}: key {key!r} could escape its bucket "
            "(leading '/', backslash, or a '.' or '..' segment)",
            reason="invalid_key",
        )


def _event_from_document(doc: Mapping[str, Any]) -> TransferEvent:
    meta = doc.get("metadata") or {}
    checksum = meta.get("checksumSHA256")
    return TransferEvent(
        event_id=doc["eventId"].lower(),
        correlation_id=doc["correlationId"].lower(),
        timestamp=parse_time(doc["timestamp"]),
        source=_ref(doc["source"]),
        destination=_ref(doc["destination"]),
        content_type=meta.get("contentType"),
        checksum_sha256=checksum.lower() if checksum else None,
        max_retries=meta.get("maxRetries", 3),
        priority=meta.get("priority", "normal"),
    )


def _ref(side: Mapping[str, Any]) -> ObjectRef:
    return ObjectRef(side["provider"], side["bucket"], side["key"], side.get("region"))


def parse_time(text: str) -> dt.datetime:
    """RFC 3339 to an aware datetime (Python 3.11 reads 'Z' and fractional seconds)."""
    value = dt.datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def now_rfc3339(clock: Callable[[], float] = time.time) -> str:
    return dt.datetime.fromtimestamp(clock(), dt.UTC).isoformat(timespec="milliseconds")


def peek_priority(body: bytes) -> str:
    """Best-effort priority of a body that may be invalid (for enqueueing poison as it is)."""
    try:
        priority = json.loads(body)["metadata"]["priority"]
    except Exception:  # noqa: BLE001 - any malformed body simply gets the normal priority
        return "normal"
    return priority if priority in PRIORITIES else "normal"


# =================================================================================================
# 5. Ports
# =================================================================================================


class Upload(Protocol):
    """A destination object being written. Nothing is visible to readers before ``commit()``."""

    def write(self, chunk: bytes) -> None: ...

    def commit(self, metadata: Mapping[str, str]) -> None:
        """Make the object visible. ``metadata`` is final (it now includes the verified sha256)."""

    def abort(self) -> None:
        """Discard everything written; safe to call twice and after a failed commit."""


class ObjectStore(Protocol):
    """One provider's buckets. Adapters translate their SDK's errors into RetryableError /
    PermanentError here, so the engine never sees botocore or google.api_core exceptions."""

    # Largest object whose metadata can still be chosen at commit(). Above it (S3 multipart, GCS
    # resumable) metadata is fixed when the upload starts, so the engine needs the SHA-256 first.
    late_metadata_limit: int

    def head(self, ref: ObjectRef) -> ObjectInfo | None: ...

    def open_read(
        self, ref: ObjectRef, info: ObjectInfo
    ) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        """Chunks of the object, pinned to ``info.version``; raises SourceChanged if it moved on."""

    def open_write(
        self, ref: ObjectRef, *, size: int, content_type: str, metadata: Mapping[str, str]
    ) -> Upload: ...

    def check(self) -> None:
        """Raise if the store cannot be reached (used by /ready)."""


class Publisher(Protocol):
    """Puts one message body on a queue or topic (``submit --to``, dead-letter targets)."""

    def publish(self, body: bytes, *, priority: str = "normal") -> Any: ...


class MessageQueue(Protocol):
    """At-least-once delivery. ``close()`` hands back what was received but not started."""

    # How long one receive() may block. A shutdown is noticed only between receives, so queues
    # whose polling is free (SQLite, the Pub/Sub client's buffer) keep it short; SQS polls 20 s.
    receive_wait: float

    def receive(self, max_messages: int, wait_seconds: float) -> list[Message]: ...

    def ack(self, message: Message) -> None: ...

    def retry_later(self, message: Message, delay: float) -> None:
        """Make the message visible again after ``delay`` seconds (0: now)."""

    def dead_letter(self, message: Message, envelope: Mapping[str, Any]) -> None:
        """Store the envelope on the dead-letter queue, then delete the message."""

    def extend(self, message: Message, seconds: float) -> None:
        """Keep the message hidden for another ``seconds`` while its transfer runs."""

    def check(self) -> None: ...

    def close(self) -> None: ...


# =================================================================================================
# 6. Local adapters
# =================================================================================================


class LocalMetadata:
    """Object metadata of local mode in ``<root>/metadata.db``, outside the object trees. Each
    record carries the stat of the file it describes, so a file replaced by hand is never
    described by stale metadata. One instance is shared by the stores of one root."""

    def __init__(self, root: str | Path) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            Path(root) / "metadata.db", timeout=30, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS objects (provider TEXT, bucket TEXT, key TEXT, "
            "stat TEXT NOT NULL, metadata TEXT NOT NULL, PRIMARY KEY (provider, bucket, key))"
        )

    def get(self, ref: ObjectRef, version: str) -> dict[str, str]:
        with self._lock:
            row = self._db.execute(
                "SELECT stat, metadata FROM objects WHERE provider=? AND bucket=? AND key=?",
                (ref.provider, ref.bucket, ref.key),
            ).fetchone()
        return json.loads(row[1]) if row and row[0] == version else {}

    def put(self, ref: ObjectRef, version: str, metadata: Mapping[str, str]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?)",
                (ref.provider, ref.bucket, ref.key, version, json.dumps(metadata)),
            )


class LocalObjectStore:
    """Buckets as directories: ``<root>/<provider>/<bucket>/<key>`` is a plain file, so people can
    drop sources in and inspect results with ordinary tools. Uploads go to ``<root>/.tmp`` (same
    filesystem), are fsynced, and are renamed into place only at commit; metadata is recorded in
    LocalMetadata after the rename."""

    late_metadata_limit = sys.maxsize

    def __init__(
        self,
        root: str | Path,
        provider: str,
        *,
        chunk_size: int = MiB,
        metadata: LocalMetadata | None = None,
    ) -> None:
        self.root = Path(root)
        self.provider = provider
        self.chunk_size = chunk_size
        self.tmp_dir = self.root / ".tmp"
        self.metadata = metadata or LocalMetadata(root)

    def head(self, ref: ObjectRef) -> ObjectInfo | None:
        path = self._path(ref)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        meta = dict(self.metadata.get(ref, _stat_version(st)))
        return ObjectInfo(
            size=st.st_size,
            version=_stat_version(st),
            content_type=meta.pop("content-type", None),
            metadata=meta,
            checksums={"sha256": meta[META_SHA256]} if META_SHA256 in meta else {},
        )

    @contextlib.contextmanager
    def open_read(self, ref: ObjectRef, info: ObjectInfo) -> Iterator[Iterator[bytes]]:
        path = self._path(ref)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise SourceChanged(f"{ref.uri} disappeared before it was read") from None
        with handle:
            if _stat_version(os.fstat(handle.fileno())) != info.version:
                raise SourceChanged(f"{ref.uri} changed before it was read")
            yield self._chunks(handle, path, ref, info)

    def _chunks(
        self, handle: IO[bytes], path: Path, ref: ObjectRef, info: ObjectInfo
    ) -> Iterator[bytes]:
        while chunk := handle.read(self.chunk_size):
            yield chunk
        # Both the open file and the name must still be the version we started with: an in-place
        # write changes the mtime, a replacement changes the inode behind the name.
        try:
            current = _stat_version(path.stat())
        except FileNotFoundError:
            current = "gone"
        if _stat_version(os.fstat(handle.fileno())) != info.version or current != info.version:
            raise SourceChanged(f"{ref.uri} changed while it was read")

    def open_write(
        self, ref: ObjectRef, *, size: int, content_type: str, metadata: Mapping[str, str]
    ) -> LocalUpload:
        path = self._path(ref)
        temp = self.tmp_dir / f"upload-{uuid.uuid4().hex}"
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PermanentError(
                f"cannot write {ref.uri}: {exc}", reason="destination_error"
            ) from exc
        return LocalUpload(self, ref, path=path, temp=temp, fd=fd, content_type=content_type)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise PermanentError(f"{self.root} is not writable", reason="destination_error")

    def sweep_temporary(self, max_age: float) -> int:
        """Delete upload temp files that a killed worker left behind. A live upload writes its
        file continuously, so anything untouched for ``max_age`` seconds is an orphan."""
        removed = 0
        cutoff = time.time() - max_age
        for path in self.tmp_dir.glob("upload-*") if self.tmp_dir.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def bucket_dir(self, bucket: str) -> Path:
        return self.root / self.provider / bucket

    def _path(self, ref: ObjectRef) -> Path:
        """The file of ``ref``. The key was already refused if it has '..', '.', a leading '/' or
        a control character; what is left is a symlink inside the bucket pointing elsewhere, so
        no component below the bucket directory may be a symlink."""
        check_key(ref.key)
        path = self.bucket_dir(ref.bucket)
        for part in ref.key.split("/"):
            path = path / part
            if os.path.islink(path):
                raise InvalidEvent(
                    f"key {ref.key!r} passes through a symlink in bucket {ref.bucket!r}",
                    reason="invalid_key",
                )
        return path


def _stat_version(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


class LocalUpload:
    """A temp file that becomes the object by rename at commit, then gets its metadata record."""

    def __init__(
        self,
        store: LocalObjectStore,
        ref: ObjectRef,
        *,
        path: Path,
        temp: Path,
        fd: int,
        content_type: str,
    ) -> None:
        self.store, self.ref, self.path, self.temp, self.fd = store, ref, path, temp, fd
        self.content_type = content_type

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]

    def commit(self, metadata: Mapping[str, str]) -> None:
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.store._path(self.ref)  # re-check: a symlink may have appeared since open_write
            os.replace(self.temp, self.path)
            _fsync_dir(self.path.parent)  # the rename itself must reach the disk before the ack
            record = {**metadata, "content-type": self.content_type}
            self.store.metadata.put(self.ref, _stat_version(self.path.stat()), record)
        except OSError as exc:
            self.abort()
            raise PermanentError(
                f"cannot write {self.ref.uri}: {exc}", reason="destination_error"
            ) from exc

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalQueue:
    """A durable at-least-once queue in SQLite, shared safely by several processes.

    Receiving hides a message for the visibility timeout and counts the delivery; a worker that dies
    simply lets the timeout pass. ``BEGIN IMMEDIATE`` takes the write lock before reading, so two
    processes never receive the same visible message. High priority is served before normal before
    low, then first in, first out."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            body BLOB NOT NULL,
            priority INTEGER NOT NULL DEFAULT 1,
            enqueued_at REAL NOT NULL,
            visible_at REAL NOT NULL,
            receive_count INTEGER NOT NULL DEFAULT 0,
            receipt TEXT);
        CREATE INDEX IF NOT EXISTS messages_ready ON messages (priority, visible_at, id);
        CREATE TABLE IF NOT EXISTS dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            envelope TEXT NOT NULL,
            event_id TEXT,
            created_at REAL NOT NULL);
    """

    receive_wait = 1.0  # polling SQLite is cheap; a short wait keeps shutdown prompt

    def __init__(
        self,
        path: str | Path,
        *,
        visibility_timeout: float = 300,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 0.2,
        dead_letter_target: Publisher | None = None,
    ) -> None:
        self.path = Path(path)
        self.dead_letter_target = dead_letter_target
        self.visibility_timeout = visibility_timeout
        self.clock = clock
        self.poll_interval = poll_interval
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
        self._db.executescript(self.SCHEMA)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def publish(self, body: bytes, *, priority: str = "normal", delay: float = 0) -> int:
        now = self.clock()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO messages (body, priority, enqueued_at, visible_at) VALUES (?,?,?,?)",
                (body, PRIORITIES[priority], now, now + delay),
            )
        return int(cursor.lastrowid or 0)

    def receive(self, max_messages: int, wait_seconds: float) -> list[Message]:
        deadline = time.monotonic() + wait_seconds
        while True:
            messages = self._receive_now(max_messages)
            remaining = deadline - time.monotonic()
            if messages or remaining <= 0 or self._closing.is_set():
                return messages
            self._closing.wait(min(self.poll_interval, remaining))

    def _receive_now(self, max_messages: int) -> list[Message]:
        now = self.clock()
        receipt = uuid.uuid4().hex
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE messages SET visible_at = ?, receive_count = receive_count + 1, "
                "receipt = ? "
                "WHERE id IN (SELECT id FROM messages WHERE visible_at <= ? "
                "ORDER BY priority, id LIMIT ?) RETURNING priority, id, body, receive_count",
                (now + self.visibility_timeout, receipt, now, max_messages),
            ).fetchall()
        return [
            Message(
                body=bytes(body),
                receive_count=count,
                handle=(msg_id, receipt),
                message_id=str(msg_id),
                received_at=now,
            )
            for _, msg_id, body, count in sorted(rows)  # RETURNING has no defined order
        ]

    def ack(self, message: Message) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE id = ? AND receipt = ?", message.handle)

    def retry_later(self, message: Message, delay: float) -> None:
        self._set_visible(message, self.clock() + delay)

    def extend(self, message: Message, seconds: float) -> None:
        self._set_visible(message, self.clock() + seconds)

    def _set_visible(self, message: Message, visible_at: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE messages SET visible_at = ? WHERE id = ? AND receipt = ?",
                (visible_at, *message.handle),
            )

    def dead_letter(self, message: Message, envelope: Mapping[str, Any]) -> None:
        if self.dead_letter_target is not None:
            self.dead_letter_target.publish(json.dumps(envelope).encode())
            self.ack(message)
            return
        with self._transaction() as db:  # the envelope and the deletion land together or not at all
            self._insert_dead_letter(db, envelope)
            db.execute("DELETE FROM messages WHERE id = ? AND receipt = ?", message.handle)

    def put_dead_letter(self, envelope: Mapping[str, Any]) -> None:
        with self._transaction() as db:
            self._insert_dead_letter(db, envelope)

    def _insert_dead_letter(self, db: sqlite3.Connection, envelope: Mapping[str, Any]) -> None:
        db.execute(
            "INSERT INTO dead_letters (envelope, event_id, created_at) VALUES (?,?,?)",
            (json.dumps(envelope), envelope.get("event_id"), self.clock()),
        )

    def dead_letters(self, event_id: str | None = None) -> list[tuple[int, dict[str, Any]]]:
        query = "SELECT id, envelope FROM dead_letters"
        args: tuple[Any, ...] = ()
        if event_id:
            query, args = query + " WHERE event_id = ?", (event_id.lower(),)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [(row_id, json.loads(text)) for row_id, text in rows]

    def forget_dead_letter(self, row_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM dead_letters WHERE id = ?", (row_id,))

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def check(self) -> None:
        with self._lock:
            self._db.execute("SELECT 1 FROM messages LIMIT 1").fetchall()

    def close(self) -> None:
        self._closing.set()


class LocalDeadLetters:
    """The dead-letter table of a SQLite queue as a Publisher, for ``--dead-letter PATH``."""

    def __init__(self, queue: LocalQueue) -> None:
        self.queue = queue

    def publish(self, body: bytes, *, priority: str = "normal") -> None:
        self.queue.put_dead_letter(json.loads(body))


def envelope_body(envelope: Mapping[str, Any]) -> bytes:
    """The original message body stored in a dead-letter envelope."""
    if envelope.get("body_encoding") == "base64":
        return base64.b64decode(envelope["body"])
    return str(envelope["body"]).encode("utf-8")


# =================================================================================================
# 7. Cloud adapters
# =================================================================================================
# (S3, GCS, SQS and Pub/Sub live here; see build_stores() and build_queue() below.)


# =================================================================================================
# 8. Transfer engine
# =================================================================================================


def plan_skip(
    event: TransferEvent, dst: ObjectInfo | None, expected_sha256: str | None, overwrite: str
) -> str | None:
    """Why the destination must not be written, or None to go ahead.

    Order matters: an event already applied is a plain duplicate delivery; a destination written by
    a newer event must never be replaced by an older one, whatever the overwrite policy."""
    if dst is None:
        return None
    dst_sha = dst.metadata.get(META_SHA256)
    if (
        dst.metadata.get(META_EVENT_ID) == event.event_id
        and dst_sha
        and (expected_sha256 in (None, dst_sha))
    ):
        return "already_applied"
    written_at = dst.metadata.get(META_EVENT_TIME)
    if written_at and _newer(written_at, event.timestamp):
        return "stale_event"
    if overwrite == "never":
        return "never_overwrite"
    if overwrite == "different" and dst_sha and dst_sha == expected_sha256:
        return "same_content"
    return None


def _newer(written_at: str, event_time: dt.datetime) -> bool:
    try:
        return parse_time(written_at) > event_time
    except ValueError:
        return False


class DigestSet:
    """SHA-256 always, plus the digests the source publishes itself (MD5, CRC32C), in one pass."""

    def __init__(self, wanted: Iterable[str] = ()) -> None:
        self.hashers: dict[str, Any] = {"sha256": hashlib.sha256()}
        if "md5" in wanted:
            self.hashers["md5"] = hashlib.md5(usedforsecurity=False)
        if "crc32c" in wanted:
            import google_crc32c  # shipped with google-cloud-storage

            self.hashers["crc32c"] = google_crc32c.Checksum()

    def update(self, chunk: bytes) -> None:
        for hasher in self.hashers.values():
            hasher.update(chunk)

    def hexdigests(self) -> dict[str, str]:
        return {name: h.digest().hex() for name, h in self.hashers.items()}


def hash_source(store: ObjectStore, ref: ObjectRef, info: ObjectInfo) -> str:
    """A read-only pass over the source, for destinations that fix metadata at upload start."""
    digest = hashlib.sha256()
    with store.open_read(ref, info) as chunks:
        for chunk in chunks:
            digest.update(chunk)
    return digest.hexdigest()


class TransferEngine:
    """One attempt at one transfer: plan, stream, hash, verify, then commit or abort."""

    def __init__(self, stores: Mapping[str, ObjectStore], *, overwrite: str = "different") -> None:
        self.stores = stores
        self.overwrite = overwrite

    def transfer(
        self, event: TransferEvent, *, on_progress: Callable[[int], None] = lambda n: None
    ) -> TransferResult:
        src, dst = self.stores[event.source.provider], self.stores[event.destination.provider]
        src_info = src.head(event.source)
        if src_info is None:
            raise PermanentError(
                f"source {event.source.uri} does not exist", reason="source_not_found"
            )
        expected = event.checksum_sha256 or src_info.checksums.get("sha256")
        dst_info = dst.head(event.destination)
        skip = plan_skip(event, dst_info, expected, self.overwrite)
        if skip:
            return TransferResult("skipped", sha256=expected, reason=skip)
        if expected is None and src_info.size > dst.late_metadata_limit:
            expected = hash_source(src, event.source, src_info)
        metadata = self._metadata(event, expected)
        content_type = event.content_type or src_info.content_type or "application/octet-stream"
        upload = dst.open_write(
            event.destination, size=src_info.size, content_type=content_type, metadata=metadata
        )
        try:
            digests = self._pump(src, event.source, src_info, upload, on_progress)
            self._verify(event, src_info, expected, digests)
            sha256 = digests["sha256"]
            if self._same_content(dst_info, sha256):
                upload.abort()
                return TransferResult("skipped", sha256=sha256, reason="same_content")
            upload.commit({**metadata, META_SHA256: sha256})
        except BaseException:
            upload.abort()
            raise
        return TransferResult("success", bytes_transferred=src_info.size, sha256=sha256)

    def _same_content(self, dst: ObjectInfo | None, sha256: str) -> bool:
        """Policy ``different`` learns the source's digest only after reading it when neither the
        event nor the source states it; identical bytes are then not written again."""
        return (
            self.overwrite == "different"
            and dst is not None
            and (dst.metadata.get(META_SHA256) == sha256)
        )

    @staticmethod
    def _metadata(event: TransferEvent, sha256: str | None) -> dict[str, str]:
        metadata = {
            META_EVENT_ID: event.event_id,
            META_SOURCE: event.source.uri,
            META_EVENT_TIME: event.timestamp.isoformat(),
        }
        return {**metadata, META_SHA256: sha256} if sha256 else metadata

    @staticmethod
    def _pump(
        src: ObjectStore,
        ref: ObjectRef,
        info: ObjectInfo,
        upload: Upload,
        on_progress: Callable[[int], None],
    ) -> dict[str, str]:
        digests = DigestSet(info.checksums)
        moved = 0
        with src.open_read(ref, info) as chunks:
            for chunk in chunks:
                digests.update(chunk)
                upload.write(chunk)
                moved += len(chunk)
                on_progress(len(chunk))
        if moved != info.size:
            raise SourceChanged(f"{ref.uri}: read {moved} bytes, expected {info.size}")
        return digests.hexdigests()

    @staticmethod
    def _verify(
        event: TransferEvent, info: ObjectInfo, expected: str | None, actual: Mapping[str, str]
    ) -> None:
        """The event's checksum is the producer's promise: a mismatch is permanent. The source's
        own digests describe the stored bytes: a mismatch there means they were damaged on the way,
        which another attempt can fix."""
        if expected and actual["sha256"] != expected:
            raise PermanentError(
                f"SHA-256 of {event.source.uri} is {actual['sha256']}, expected {expected}",
                reason="checksum_mismatch",
            )
        for name, value in info.checksums.items():
            if name in actual and actual[name] != value:
                raise RetryableError(
                    f"{name} of {event.source.uri} read as {actual[name]}, the "
                    f"source publishes {value}",
                    reason="checksum_mismatch",
                )


# =================================================================================================
# 9. Observability
# =================================================================================================

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 300, 600)
PAIR = ("source_provider", "destination_provider")


class Metrics:
    """The worker's Prometheus metrics on a registry of their own (no global state).

    prometheus_client appends ``_total`` to counters, so the seed's ``transfer_bytes`` and
    ``retry_count`` are exposed as ``transfer_bytes_total`` and ``retry_count_total``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        self.success = Counter(
            "transfer_success", "Transfers committed and verified", PAIR, registry=reg
        )
        self.failure = Counter(
            "transfer_failure", "Events dead-lettered, by reason", (*PAIR, "reason"), registry=reg
        )
        self.skipped = Counter(
            "transfer_skipped",
            "Events acknowledged without writing, by reason",
            (*PAIR, "reason"),
            registry=reg,
        )
        self.duration = Histogram(
            "transfer_duration_seconds",
            "Receipt to settlement of an event",
            (*PAIR, "outcome"),
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.bytes = Counter("transfer_bytes", "Bytes written to destinations", PAIR, registry=reg)
        self.retries = Counter(
            "retry_count",
            "Retries after transient failures, by reason",
            (*PAIR, "reason"),
            registry=reg,
        )
        self.in_flight = Gauge("transfers_in_flight", "Transfers running now", registry=reg)
        self.queue_lag = Histogram(
            "queue_lag_seconds", "Event age when received", buckets=DURATION_BUCKETS, registry=reg
        )
        self.ready = Gauge("worker_ready", "1 when /ready answers 200", registry=reg)

    def render(self) -> bytes:
        return generate_latest(self.registry)


LEADING_LOG_FIELDS = ("timestamp", "level", "correlation_id", "event_id", "service", "message")


def _seed_field_order(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    """The seed's field order and upper-case levels, so lines read the same as its example."""
    event["level"] = str(event.get("level", method)).upper()
    head = {key: event.pop(key) for key in LEADING_LOG_FIELDS if key in event}
    return {**head, **event}


def make_logger(level: str = "INFO", stream: TextIO | None = None) -> Any:
    """A structlog logger writing one JSON object per line, with the seed's field names."""
    return structlog.wrap_logger(
        structlog.PrintLogger(stream or sys.stdout),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("message"),
            _seed_field_order,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        context_class=dict,
    ).bind(service=SERVICE_NAME)


class Readiness:
    """Answers /ready: the queue and every store reachable and the worker not draining. Checks are
    cached for a few seconds so a probe storm cannot hammer the cloud APIs."""

    def __init__(
        self,
        checks: Mapping[str, Callable[[], None]],
        *,
        ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.checks, self.ttl, self.clock = checks, ttl, clock
        self.draining = threading.Event()
        self._cached: tuple[float, list[str]] | None = None
        self._lock = threading.Lock()

    def problems(self) -> list[str]:
        if self.draining.is_set():
            return ["draining"]
        with self._lock:
            if self._cached is None or self.clock() - self._cached[0] > self.ttl:
                self._cached = (self.clock(), self._run_checks())
            return self._cached[1]

    def _run_checks(self) -> list[str]:
        failed = []
        for name, check in self.checks.items():
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported by name
                failed.append(f"{name}: {type(exc).__name__}")
        return failed


def make_wsgi_app(metrics: Metrics, readiness: Readiness) -> Callable[..., Iterable[bytes]]:
    """/health, /ready and /metrics; every other path is 404 and every other method 405."""

    def app(environ: Mapping[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path not in ("/health", "/ready", "/metrics"):
            return _reply(start_response, "404 Not Found", b"not found\n")
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"method not allowed\n")
        if path == "/metrics":
            return _reply(start_response, "200 OK", metrics.render(), CONTENT_TYPE_LATEST)
        if path == "/health":
            return _reply(start_response, "200 OK", b"ok\n")
        problems = readiness.problems()
        metrics.ready.set(0 if problems else 1)
        if problems:
            return _reply(
                start_response,
                "503 Service Unavailable",
                ("not ready: " + "; ".join(problems) + "\n").encode(),
            )
        return _reply(start_response, "200 OK", b"ready\n")

    return app


def _reply(
    start_response: Callable[..., Any],
    status: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def start_http_server(
    app: Callable[..., Iterable[bytes]],
    port: int,
    host: str = "127.0.0.1",
) -> tuple[Any, threading.Thread]:
    """Serve ``app`` on a named daemon thread; one thread per request, so a slow or stuck client
    never blocks the others, and a socket timeout so it cannot hold its thread for ever. Returns
    the server (``server.shutdown()`` stops it) and the thread."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Handler(WSGIRequestHandler):
        timeout = 10  # seconds a client may take to send its request

        def log_message(self, format: str, *args: Any) -> None:
            pass  # access logs would drown the JSON event log

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        allow_reuse_address = True

    server = make_server(host, port, app, server_class=Server, handler_class=Handler)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, thread


# =================================================================================================
# 10. Worker
# =================================================================================================


def _labels(event: TransferEvent | None) -> tuple[str, str]:
    if event is None:
        return ("unknown", "unknown")
    return (event.source.provider, event.destination.provider)


class Heartbeat:
    """Keeps in-flight messages hidden: every third of the visibility timeout, extends each one.
    Owns one named thread that waits on its stop event, never on sleep."""

    def __init__(
        self,
        queue: MessageQueue,
        in_flight: Callable[[], list[Message]],
        visibility_timeout: float,
        log: Any,
    ) -> None:
        self.queue, self.in_flight, self.log = queue, in_flight, log
        self.visibility_timeout = visibility_timeout
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def _run(self) -> None:
        while not self.stop_event.wait(self.visibility_timeout / 3):
            for message in self.in_flight():
                try:
                    self.queue.extend(message, self.visibility_timeout)
                except Exception as exc:  # noqa: BLE001 - the next beat tries again
                    self.log.warning(
                        "Could not extend visibility", message_id=message.message_id, error=str(exc)
                    )


class Worker:
    """Receive -> validate -> transfer with retries -> settle (ack, dead-letter, or hand back).

    Nothing is acknowledged that was not committed. A message whose transfer is still running when
    the drain timeout passes is handed back to the queue, so another worker finishes it."""

    def __init__(
        self,
        config: Config,
        queue: MessageQueue,
        engine: TransferEngine,
        metrics: Metrics,
        log: Any,
        *,
        validator: Any = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self.config, self.queue, self.engine, self.metrics, self.log = (
            config,
            queue,
            engine,
            metrics,
            log,
        )
        self.validator = validator or load_validator()
        self.clock = clock
        self.sleep = sleep or self._interruptible_sleep
        self.readiness = readiness
        self.stop_event = threading.Event()
        self._in_flight: dict[int, Message] = {}
        self._in_flight_lock = threading.Condition()
        self._stop_requested_at: float | None = None
        self._work: SimpleQueue[tuple[int, Message] | None] = SimpleQueue()
        self._next_id = 0

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, *, once: bool = False) -> None:
        """Work until stop() (or, with ``once``, until the queue is empty), then drain."""
        heartbeat = Heartbeat(self.queue, self.in_flight, self.config.visibility_timeout, self.log)
        heartbeat.start()
        self._start_pool()
        self.log.info(
            "Worker started", worker_id=self.config.worker_id, concurrency=self.config.concurrency
        )
        try:
            while not self.stop_event.is_set():
                free = self._wait_for_free_slot()
                if free == 0:
                    continue
                # --once never waits on an empty queue: it waits for its own transfers instead,
                # and stops when both are done.
                messages = self.queue.receive(
                    min(free, 10), 0.0 if once else self.queue.receive_wait
                )
                if once and not messages and not self._wait_for_a_transfer():
                    break
                self._start_all(messages)
        finally:
            self._drain()
            for _ in range(self.config.concurrency):
                self._work.put(None)  # idle pool threads end; busy ones were handed back
            heartbeat.stop()
            self.queue.close()
            self.log.info("Worker stopped", worker_id=self.config.worker_id)

    def stop(self) -> None:
        """Stop receiving; run() then drains. Safe to call from a signal handler (sets a flag)."""
        self._stop_requested_at = time.monotonic()  # the drain timeout counts from the signal
        self.stop_event.set()

    def in_flight(self) -> list[Message]:
        with self._in_flight_lock:
            return list(self._in_flight.values())

    def _wait_for_free_slot(self) -> int:
        with self._in_flight_lock:
            self._in_flight_lock.wait_for(
                lambda: len(self._in_flight) < self.config.concurrency or self.stop_event.is_set(),
                timeout=1.0,
            )
            return self.config.concurrency - len(self._in_flight)

    def _wait_for_a_transfer(self) -> bool:
        """Wait until one in-flight transfer ends; False when none was running."""
        with self._in_flight_lock:
            running = len(self._in_flight)
            if running:
                self._in_flight_lock.wait_for(lambda: len(self._in_flight) < running, timeout=1.0)
            return running > 0

    def _start_all(self, messages: list[Message]) -> None:
        for message in messages:
            if self.stop_event.is_set():  # received after the stop request: never started
                self._settle_quietly(functools.partial(self.queue.retry_later, message, 0))
                continue
            with self._in_flight_lock:
                self._next_id += 1
                self._in_flight[self._next_id] = message
            self._work.put((self._next_id, message))

    def _start_pool(self) -> None:
        """A fixed pool of named threads: starting a thread per message costs more than a small
        transfer does."""
        for number in range(1, self.config.concurrency + 1):
            threading.Thread(target=self._pool_loop, name=f"transfer-{number}", daemon=True).start()

    def _pool_loop(self) -> None:
        while (item := self._work.get()) is not None:
            self._run_one(*item)

    def _run_one(self, slot: int, message: Message) -> None:
        self.metrics.in_flight.inc()
        try:
            self.handle(message)
        finally:
            self.metrics.in_flight.dec()
            with self._in_flight_lock:
                self._in_flight.pop(slot, None)
                self._in_flight_lock.notify_all()

    def _drain(self) -> None:
        """Give in-flight transfers the drain timeout, then hand back whatever is still running."""
        if self.readiness:
            self.readiness.draining.set()
        deadline = (self._stop_requested_at or time.monotonic()) + self.config.drain_timeout
        with self._in_flight_lock:
            self._in_flight_lock.wait_for(
                lambda: not self._in_flight, timeout=max(0.0, deadline - time.monotonic())
            )
            left = list(self._in_flight.values())
        for message in left:
            self._settle_quietly(functools.partial(self.queue.retry_later, message, 0))
        if left:
            self.log.warning(
                "Drain timeout passed; handed back unfinished messages", count=len(left)
            )

    # -- one message ------------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        """Classify, execute and settle one message. Never raises: a bug in one transfer must not
        take the worker down, and its message is dead-lettered with reason internal_error."""
        started = self.clock()
        event: TransferEvent | None = None
        log = self.log.bind(message_id=message.message_id)
        attempts = [message.receive_count - 1]  # earlier deliveries each made at least one
        try:
            event = parse_event(
                message.body, self.validator, max_bytes=self.config.max_message_bytes
            )
            log = log.bind(
                event_id=event.event_id,
                correlation_id=event.correlation_id,
                source=event.source.uri,
                destination=event.destination.uri,
            )
            self.metrics.queue_lag.observe(
                max(0.0, message.received_at - event.timestamp.timestamp())
            )
            self._check_allowed(event)
            result = self._transfer_with_retries(event, message, attempts, log)
        except ShutdownRequested:
            self._settle_quietly(lambda: self.queue.retry_later(message, 0))
            log.info("Transfer interrupted by shutdown; message handed back", outcome="released")
        except TransferError as exc:
            self._dead_letter(message, event, exc, attempts=attempts[0], started=started, log=log)
        except Exception as exc:
            error = TransferError(f"{type(exc).__name__}: {exc}", reason="internal_error")
            log.exception("Unexpected error in transfer")
            self._dead_letter(message, event, error, attempts=attempts[0], started=started, log=log)
        else:
            self._complete(message, event, result, started, log)

    def _check_allowed(self, event: TransferEvent) -> None:
        allowed = self.config.allowlist
        for ref in (event.source, event.destination):
            if allowed and (ref.provider, ref.bucket) not in allowed:
                raise PermanentError(
                    f"bucket {ref.provider}:{ref.bucket} is not in --allowed-buckets",
                    reason="forbidden",
                )

    def _transfer_with_retries(
        self, event: TransferEvent, message: Message, attempts: list[int], log: Any
    ) -> TransferResult:
        """Attempts = 1 + the event's maxRetries (capped by --max-retries), counting earlier
        deliveries, so a message that keeps crashing workers still ends in the dead-letter queue."""
        budget = 1 + min(event.max_retries, self.config.max_retries)
        remaining = budget - attempts[0]
        if remaining <= 0:
            raise PermanentError(
                f"delivered {message.receive_count} times without settling "
                f"(attempt budget {budget})",
                reason="retries_exhausted",
            )

        def attempt() -> TransferResult:
            attempts[0] += 1
            return self.engine.transfer(event)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(remaining),
            wait=tenacity.wait_exponential_jitter(
                initial=self.config.backoff_initial,
                max=self.config.backoff_max,
                jitter=self.config.backoff_initial,
            ),
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, RetryableError)),
            sleep=self.sleep,
            before_sleep=lambda state: self._on_retry(event, state, log),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except RetryableError as exc:
            raise PermanentError(
                f"gave up after {attempts[0]} attempts: {exc} ({exc.reason})",
                reason="retries_exhausted",
            ) from exc

    def _on_retry(self, event: TransferEvent, state: tenacity.RetryCallState, log: Any) -> None:
        exc = state.outcome.exception() if state.outcome else None
        reason = getattr(exc, "reason", "transient")
        self.metrics.retries.labels(*_labels(event), reason).inc()
        log.warning(
            "Transfer attempt failed; retrying",
            attempt=state.attempt_number,
            reason=reason,
            error=str(exc),
            retry_in_seconds=round(state.upcoming_sleep, 3),
        )

    def _interruptible_sleep(self, seconds: float) -> None:
        """Backoff that a shutdown cuts short: the message goes back rather than waiting."""
        if self.stop_event.wait(seconds):
            raise ShutdownRequested()

    # -- settling ---------------------------------------------------------------------------------

    def _complete(
        self,
        message: Message,
        event: TransferEvent | None,
        result: TransferResult,
        started: float,
        log: Any,
    ) -> None:
        labels = _labels(event)
        self._settle_quietly(lambda: self.queue.ack(message))
        duration = self.clock() - started
        self.metrics.duration.labels(*labels, result.outcome).observe(duration)
        if result.outcome == "skipped":
            self.metrics.skipped.labels(*labels, result.reason).inc()
            log.info(
                "Transfer skipped",
                outcome="skipped",
                reason=result.reason,
                duration_seconds=round(duration, 3),
                bytes_transferred=0,
            )
            return
        self.metrics.success.labels(*labels).inc()
        self.metrics.bytes.labels(*labels).inc(result.bytes_transferred)
        log.info(
            "Transfer completed successfully",
            outcome="success",
            sha256=result.sha256,
            duration_seconds=round(duration, 3),
            bytes_transferred=result.bytes_transferred,
        )

    def _dead_letter(
        self,
        message: Message,
        event: TransferEvent | None,
        exc: TransferError,
        *,
        attempts: int,
        started: float,
        log: Any,
    ) -> None:
        envelope = make_envelope(
            message,
            exc,
            attempts=attempts,
            worker_id=self.config.worker_id,
            event=event,
            clock=self.clock,
        )
        try:
            self.queue.dead_letter(message, envelope)
        except Exception as dlq_exc:  # noqa: BLE001 - keep the message: it is redelivered later
            log.error(
                "Could not dead-letter; message left for redelivery",
                reason=exc.reason,
                error=str(dlq_exc),
            )
            self._settle_quietly(lambda: self.queue.retry_later(message, self.config.backoff_max))
            return
        labels = _labels(event)
        duration = self.clock() - started
        self.metrics.failure.labels(*labels, exc.reason).inc()
        self.metrics.duration.labels(*labels, "failure").observe(duration)
        level = (
            log.warning
            if isinstance(exc, InvalidEvent) or exc.reason == "forbidden"
            else (log.error)
        )
        level(
            "Event dead-lettered",
            outcome="dead_lettered",
            reason=exc.reason,
            error=str(exc),
            attempts=attempts,
            duration_seconds=round(duration, 3),
            bytes_transferred=0,
        )

    def _settle_quietly(self, settle: Callable[[], None]) -> None:
        """Ack / hand-back failures are logged, not raised: the queue redelivers the message, and
        the idempotency check turns the redelivery into a skip."""
        try:
            settle()
        except Exception as exc:  # noqa: BLE001
            self.log.error("Could not settle message with the queue", error=str(exc))


def make_envelope(
    message: Message,
    exc: TransferError,
    *,
    attempts: int,
    worker_id: str,
    event: TransferEvent | None = None,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """The dead-letter envelope: the original body verbatim plus why, how often, who and when."""
    try:
        body, encoding = message.body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(message.body).decode("ascii"), "base64"
    ids = _peek_ids(message.body) if event is None else (event.event_id, event.correlation_id)
    return {
        "body": body,
        "body_encoding": encoding,
        "reason": exc.reason,
        "error": str(exc),
        "attempts": attempts,
        "receive_count": message.receive_count,
        "worker_id": worker_id,
        "time": now_rfc3339(clock),
        "message_id": message.message_id,
        "event_id": ids[0],
        "correlation_id": ids[1],
    }


def _peek_ids(body: bytes) -> tuple[str | None, str | None]:
    """Event and correlation ids of an invalid event, when they are at least strings."""
    try:
        doc = json.loads(body)
    except Exception:  # noqa: BLE001 - not JSON: no ids
        return (None, None)
    if not isinstance(doc, dict):
        return (None, None)
    ids = (doc.get("eventId"), doc.get("correlationId"))
    return tuple(i.lower()[:64] if isinstance(i, str) else None for i in ids)  # type: ignore[return-value]


# =================================================================================================
# 11. CLI
# =================================================================================================

COMMANDS = ("run", "submit", "validate", "dlq")


def build_stores(config: Config) -> dict[str, ObjectStore]:
    if config.storage == "local":
        metadata = LocalMetadata(config.local_root)
        return {
            p: LocalObjectStore(
                config.local_root, p, chunk_size=config.chunk_size, metadata=metadata
            )
            for p in PROVIDERS
        }
    return {name: factory(config) for name, factory in CLOUD_STORES.items()}


def build_publisher(spec: str, config: Config) -> Any:
    """A Publisher for ``spec``: SQS queue URL, Pub/Sub topic path, or a SQLite queue path."""
    for pattern, factory in PUBLISHERS.items():
        if re.match(pattern, spec):
            return factory(spec, config)
    return local_queue(config, spec)


def build_queue(config: Config) -> MessageQueue:
    """The queue to consume from ``--queue`` and where ``--dead-letter`` envelopes go."""
    target = build_dead_letter_target(config)
    for pattern, factory in QUEUES.items():
        if re.match(pattern, config.queue):
            if target is None:
                raise ValueError(
                    "--dead-letter is required with a cloud queue "
                    "(an SQS queue URL or projects/P/topics/T)"
                )
            return factory(config, target)
    return local_queue(config, config.queue, dead_letter_target=target)


def build_dead_letter_target(config: Config) -> Publisher | None:
    if not config.dead_letter:
        return None
    for pattern, factory in PUBLISHERS.items():
        if re.match(pattern, config.dead_letter):
            return factory(config.dead_letter, config)
    return LocalDeadLetters(local_queue(config, config.dead_letter))


def local_queue(config: Config, path: str = "", **kwargs: Any) -> LocalQueue:
    return LocalQueue(
        path or Path(config.local_root) / "queue.db",
        visibility_timeout=config.visibility_timeout,
        **kwargs,
    )


# Cloud adapters register here (section 7); the keys are regular expressions on the --queue,
# --dead-letter and --to values.
CLOUD_STORES: dict[str, Callable[[Config], ObjectStore]] = {}
QUEUES: dict[str, Callable[[Config, Publisher], MessageQueue]] = {}
PUBLISHERS: dict[str, Callable[[str, Config], Publisher]] = {}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field; its default comes from TRANSFER_WORKER_<FIELD> when set."""
    group = parser.add_argument_group(
        "settings (each also TRANSFER_WORKER_<NAME> in the environment)"
    )
    for field in dataclasses.fields(Config):
        env = ENV_PREFIX + field.name.upper()
        kind = type(field.default)
        group.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=kind,
            default=_env_default(env, kind, field.default),
            metavar=env if kind is str else kind.__name__.upper(),
            choices=field.metadata.get("choices"),
            help=f"{field.metadata['help']} (default: {field.default!r}; env {env})",
        )


def _env_default(env: str, kind: type, default: Any) -> Any:
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"error: {env}={raw!r} is not a valid {kind.__name__}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transfer_worker.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without a command, 'run' is assumed.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="consume the queue and transfer (the default)")
    run.add_argument("--once", action="store_true", help="exit 0 once the queue is empty")
    for name, text in (
        ("submit", "validate and enqueue events from FILE or - (stdin)"),
        ("validate", "check events in FILE or - (stdin) against the schema"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("file", metavar="FILE", help="a JSON object, a JSON array, or JSON lines")
        if name == "submit":
            sub.add_argument(
                "--to",
                default="",
                help="SQS queue URL, projects/P/topics/T or a "
                "SQLite path (default: the local queue)",
            )
            sub.add_argument(
                "--no-validate",
                action="store_true",
                help="enqueue the bodies as they are (to see how poison is treated)",
            )
    dlq = commands.add_parser("dlq", help="inspect or redrive the local dead-letter table")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    for name, text in (
        ("list", "print dead-letter envelopes as JSON lines"),
        ("redrive", "put dead-lettered bodies back on the queue"),
    ):
        action = dlq_commands.add_parser(name, help=text)
        action.add_argument("--event-id", default=None, help="only this event")
        add_config_arguments(action)
    for sub in (run, commands.choices["submit"], commands.choices["validate"]):
        add_config_arguments(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    config = Config(**values)
    config.validate()
    return config


def read_bodies(source: str, *, validate: bool) -> list[bytes]:
    """Message bodies from a file: one JSON object, a JSON array of them, or JSON lines. Without
    validation, text that is not JSON at all is taken as one body per line."""
    raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    text = raw.decode("utf-8", errors="surrogateescape").strip()
    try:
        document = json.loads(text)
    except ValueError:
        lines = [line for line in text.splitlines() if line.strip()]
        if validate:
            return [_canonical_line(line, number) for number, line in enumerate(lines, 1)]
        return [line.encode("utf-8", errors="surrogateescape") for line in lines]
    if isinstance(document, list):
        return [json.dumps(item).encode() for item in document]
    return [text.encode("utf-8", errors="surrogateescape")]


def _canonical_line(line: str, number: int) -> bytes:
    try:
        json.loads(line)
    except ValueError as exc:
        raise InvalidEvent(f"line {number}: not JSON: {exc}") from None
    return line.encode("utf-8", errors="surrogateescape")


def check_bodies(bodies: Sequence[bytes], config: Config) -> list[TransferEvent]:
    validator = load_validator()
    events = []
    for index, body in enumerate(bodies):
        try:
            events.append(parse_event(body, validator, max_bytes=config.max_message_bytes))
        except InvalidEvent as exc:
            where = f"event {index}: " if len(bodies) > 1 else ""
            raise InvalidEvent(f"{where}{exc}", reason=exc.reason) from None
    return events


def cmd_validate(args: argparse.Namespace, config: Config) -> int:
    events = check_bodies(read_bodies(args.file, validate=True), config)
    print(f"ok: {len(events)} valid event(s)")
    return 0


def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    bodies = read_bodies(args.file, validate=not args.no_validate)
    if not args.no_validate:
        check_bodies(bodies, config)
    publisher = build_publisher(args.to or config.queue, config)
    for body in bodies:
        publisher.publish(body, priority=peek_priority(body))
    print(f"submitted {len(bodies)} message(s)", file=sys.stderr)
    return 0


def cmd_dlq(args: argparse.Namespace, config: Config) -> int:
    if re.match(r"^(https?://|projects/)", config.dead_letter or config.queue):
        raise ValueError(
            "dlq reads a local dead-letter table; for SQS use the console's DLQ "
            "redrive (StartMessageMoveTask), for Pub/Sub a subscription on the "
            "dead-letter topic"
        )
    queue = local_queue(config, config.dead_letter or config.queue)
    if args.dlq_command == "list":
        for _, envelope in queue.dead_letters(args.event_id):
            print(json.dumps(envelope, ensure_ascii=False))
        return 0
    target = local_queue(config, config.queue) if config.dead_letter else queue
    moved = 0
    for row_id, envelope in queue.dead_letters(args.event_id):
        body = envelope_body(envelope)
        target.publish(body, priority=peek_priority(body))
        queue.forget_dead_letter(row_id)
        moved += 1
    print(f"redrove {moved} message(s)", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    log = make_logger(config.log_level)
    stores = build_stores(config)
    queue = build_queue(config)
    metrics = Metrics()
    checks: dict[str, Callable[[], None]] = {"queue": queue.check}
    checks.update({f"store:{name}": store.check for name, store in stores.items()})
    readiness = Readiness(checks)
    for store in stores.values():
        if isinstance(store, LocalObjectStore):
            store.sweep_temporary(max(3600.0, 2.0 * config.visibility_timeout))
    worker = Worker(
        config,
        queue,
        TransferEngine(stores, overwrite=config.overwrite),
        metrics,
        log,
        readiness=readiness,
    )
    server = None
    if config.http_port:
        server, _ = start_http_server(
            make_wsgi_app(metrics, readiness), config.http_port, host=config.http_host
        )
    install_signal_handlers(worker, log)
    try:
        worker.run(once=args.once)
    finally:
        if server is not None:
            server.shutdown()
    return 0


def install_signal_handlers(worker: Worker, log: Any) -> None:
    """The first SIGTERM/SIGINT asks for a drain; a second one exits at once."""

    def handler(signum: int, frame: Any) -> None:
        if worker.stop_event.is_set():
            os._exit(128 + signum)  # the operator insists: the queue redelivers what was running
        worker.stop()
        log.info("Shutdown requested; draining", signal=signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


HANDLERS = {"run": cmd_run, "submit": cmd_submit, "validate": cmd_validate, "dlq": cmd_dlq}


def main(argv: Sequence[str] | None = None) -> int:
    with contextlib.suppress(ModuleNotFoundError):  # TEMPORARY: cloud adapters under development
        import cloud_adapters_wip  # noqa: F401
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["run", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        return HANDLERS[args.command](args, config)
    except InvalidEvent as exc:
        print(f"invalid event: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as a script, this module is __main__; make `import transfer_worker` (tests, plug-ins)
    # find this same copy instead of loading a second one with its own registries.
    sys.modules.setdefault("transfer_worker", sys.modules[__name__])
    sys.exit(main())
