"""The newcomer walk-through's error findings: a worker, `submit` or `dlq` given a queue, a topic or
a dead-letter target that does not exist, or run without Google credentials, says so in one line
naming the setting (exit 2) instead of running on, hot-looping or printing a traceback; `submit`
does not strand events in a mistyped directory; positions in `validate` count from 1 and say
whether they are lines or array elements; the help says what --part-size sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from tests.conftest import GCP_PROJECT, LoggedProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
WORKER = [sys.executable, str(ROOT / "transfer_worker.py")]
EXAMPLE = json.loads((ROOT / "examples" / "event.json").read_text(encoding="utf-8"))
# A worker that runs on instead of exiting is the failure: it is killed after this long.
TIMEOUT = 45.0


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, **kw: Any) -> Any:
    """The CLI as a user runs it, bounded; the environment is this process's (the fixtures')."""
    return subprocess.run(
        [*WORKER, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env or {**os.environ, "TRANSFER_WORKER_HTTP_PORT": "0"},
        cwd=cwd,
        **kw,
    )


def one_line_error(result: Any, *words: str) -> str:
    """Exit 2, no traceback, and an error line naming every word."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def event_file(tmp_path: Path) -> Path:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(EXAMPLE), encoding="utf-8")
    return path


@pytest.fixture
def sqs(aws_env: str) -> Any:
    import boto3

    return boto3.client("sqs")


def sqs_queue(sqs: Any) -> str:
    return str(sqs.create_queue(QueueName=f"work-{uuid.uuid4().hex[:12]}")["QueueUrl"])


def missing_sqs_url(sqs: Any) -> str:
    """A URL of the same form as a real one, naming no queue."""
    real = sqs_queue(sqs)
    return real.rsplit("/", 1)[0] + f"/missing-{uuid.uuid4().hex[:12]}"


def missing_topic() -> str:
    return f"projects/{GCP_PROJECT}/topics/missing-{uuid.uuid4().hex[:12]}"


# -------------------------------------------------------------------------------------------------
# 1. a --dead-letter that does not exist
# -------------------------------------------------------------------------------------------------


def test_run_refuses_a_missing_sqs_dead_letter_queue(sqs: Any) -> None:
    dead = missing_sqs_url(sqs)
    result = cli("run", "--once", "--queue", sqs_queue(sqs), "--dead-letter", dead)
    one_line_error(result, "--dead-letter", dead)


def test_run_refuses_a_missing_pubsub_dead_letter_topic(pubsub_topic_subscription: Any) -> None:
    made = pubsub_topic_subscription()
    dead = missing_topic()
    result = cli("run", "--once", "--queue", made.subscription, "--dead-letter", dead)
    one_line_error(result, "--dead-letter", dead)


class Refusing:
    """A publisher whose existence check fails as ``error`` does."""

    def __init__(self, error: tw.TransferError) -> None:
        self.error = error

    def check(self) -> None:
        raise self.error


class Present:
    def check(self) -> None:
        """Exists."""


def test_a_dead_letter_target_that_cannot_be_checked_does_not_stop_the_worker() -> None:
    """A role with only pubsub.topics.publish (or sqs:SendMessage) may not ask whether the topic
    exists: PermissionDenied is "cannot tell", and an unreachable service is left to the
    worker's backoff; only a definite "no such target" stops it."""
    config = tw.Config(queue="q.db", dead_letter=missing_topic())
    queue: Any = Present()
    for error in (
        tw.PermanentError("403 PermissionDenied", reason="access_denied"),
        tw.RetryableError("unavailable", reason="unavailable"),
    ):
        tw.check_targets(config, queue, Refusing(error))  # type: ignore[arg-type]
    missing = tw.PermanentError("404 NotFound", reason="queue_error")
    with pytest.raises(ValueError, match="--dead-letter projects/"):
        tw.check_targets(config, queue, Refusing(missing))  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------
# 2. a --queue or --to that does not exist
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("once", [True, False], ids=["once", "forever"])
def test_run_refuses_a_missing_sqs_queue(sqs: Any, once: bool) -> None:
    queue = missing_sqs_url(sqs)
    args = ["--once"] if once else []
    result = cli("run", *args, "--queue", queue, "--dead-letter", sqs_queue(sqs))
    one_line_error(result, "--queue", queue)


@pytest.mark.parametrize("once", [True, False], ids=["once", "forever"])
def test_run_refuses_a_missing_pubsub_subscription(
    pubsub_topic_subscription: Any, once: bool
) -> None:
    made = pubsub_topic_subscription()
    queue = f"projects/{GCP_PROJECT}/subscriptions/missing-{uuid.uuid4().hex[:12]}"
    args = ["--once"] if once else []
    result = cli("run", *args, "--queue", queue, "--dead-letter", made.topic)
    one_line_error(result, "--queue", queue)


def test_submit_to_a_missing_sqs_queue_is_one_line(sqs: Any, tmp_path: Path) -> None:
    target = missing_sqs_url(sqs)
    result = cli("submit", str(event_file(tmp_path)), "--to", target)
    one_line_error(result, "--to", target)


def test_submit_to_a_missing_topic_is_one_line(pubsub_env: str, tmp_path: Path) -> None:
    target = missing_topic()
    result = cli("submit", str(event_file(tmp_path)), "--to", target)
    one_line_error(result, "--to", target)


# -------------------------------------------------------------------------------------------------
# 3. no Google credentials
# -------------------------------------------------------------------------------------------------


def without_google(tmp_path: Path) -> dict[str, str]:
    """A shell that forgot `export PUBSUB_EMULATOR_HOST`: no emulator, no key file, no gcloud
    login (an empty config directory) and no metadata server (an address nothing answers)."""
    prefixes = ("PUBSUB_", "GOOGLE_", "STORAGE_EMULATOR", "CLOUDSDK_", "TRANSFER_WORKER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return {
        **env,
        "HOME": str(tmp_path),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "TRANSFER_WORKER_HTTP_PORT": "0",
    }


@pytest.mark.parametrize("command", ["run", "submit", "dlq"])
def test_missing_google_credentials_say_how_to_provide_them(tmp_path: Path, command: str) -> None:
    topic = f"projects/{GCP_PROJECT}/topics/t"
    subscription = f"projects/{GCP_PROJECT}/subscriptions/s"
    args = {
        "run": ["run", "--once", "--queue", subscription, "--dead-letter", topic],
        "submit": ["submit", str(event_file(tmp_path)), "--to", topic],
        "dlq": ["dlq", "list", "--dead-letter", topic, "--dead-letter-subscription", subscription],
    }[command]
    result = cli(*args, env=without_google(tmp_path), cwd=tmp_path)
    one_line_error(result, "no Google credentials", "PUBSUB_EMULATOR_HOST")


# -------------------------------------------------------------------------------------------------
# 4. submit to a mistyped local queue
# -------------------------------------------------------------------------------------------------


def test_submit_refuses_a_queue_file_in_a_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "storage_simulatr" / "queue.db"
    result = cli("submit", str(event_file(tmp_path)), "--to", str(target), cwd=tmp_path)
    one_line_error(result, str(target))
    assert not target.parent.exists()


def test_submit_says_when_it_creates_a_queue_file(tmp_path: Path) -> None:
    target = tmp_path / "queu.db"
    result = cli("submit", str(event_file(tmp_path)), "--to", str(target), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"created new queue file {target}" in result.stderr
    assert f"--queue {target}" in result.stderr
    again = cli("submit", str(event_file(tmp_path)), "--to", str(target), cwd=tmp_path)
    assert again.returncode == 0 and "created new" not in again.stderr, again.stderr


# -------------------------------------------------------------------------------------------------
# 5. positions count from 1 and say what they count
# -------------------------------------------------------------------------------------------------


def bad_schema() -> dict[str, Any]:
    return {**EXAMPLE, "eventId": "not-a-uuid", "schemaVersion": 7}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("\n".join([json.dumps(EXAMPLE), json.dumps(bad_schema())]), "line 2"),
        ("\n".join([json.dumps(EXAMPLE), "{not json"]), "line 2"),
        ("\n".join([json.dumps(EXAMPLE), "", json.dumps(bad_schema())]), "line 3"),
        (json.dumps([EXAMPLE, bad_schema()]), "event 2"),
    ],
    ids=["lines-schema", "lines-parse", "lines-blank", "array"],
)
def test_validate_positions_count_from_one(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(text, encoding="utf-8")
    result = cli("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert f"{where}:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -------------------------------------------------------------------------------------------------
# 6. help texts
# -------------------------------------------------------------------------------------------------


def test_run_help_hides_dead_letter_subscription_but_run_accepts_it(tmp_path: Path) -> None:
    helped = cli("run", "--help")
    assert helped.returncode == 0
    assert "--dead-letter-subscription" not in helped.stdout
    assert "resumable chunk size" not in helped.stdout
    assert "S3 multipart part size" in " ".join(helped.stdout.split())
    queue = tmp_path / "queue.db"
    ran = cli(
        "run",
        "--once",
        "--queue",
        str(queue),
        "--local-root",
        str(tmp_path),
        "--dead-letter-subscription",
        f"projects/{GCP_PROJECT}/subscriptions/s",
    )
    assert ran.returncode == 0, ran.stderr


# -------------------------------------------------------------------------------------------------
# 1b. a dead-letter topic that goes away: redeliveries spaced by the backoff, not a hot loop
# -------------------------------------------------------------------------------------------------

WINDOW = 6.0  # seconds of failed dead-lettering watched
BACKOFF_MAX = 2.0


def test_a_failed_pubsub_dead_letter_is_redelivered_after_the_backoff(
    pubsub_topic_subscription: Any, tmp_path: Path
) -> None:
    """Pub/Sub redelivers a nack at once (no retry_policy here, as on many subscriptions): the
    worker holds the message for --backoff-max before it nacks, as SQS hides it that long.
    Before, the walk-through counted 331 deliveries in 17 s."""
    made = pubsub_topic_subscription()
    dead = made.publisher.topic_path(GCP_PROJECT, f"gone-{uuid.uuid4().hex[:12]}")
    made.publisher.create_topic(name=dead)
    env = {**os.environ, "TRANSFER_WORKER_HTTP_PORT": "0"}
    settings = ["--backoff-initial", "0.1", "--backoff-max", str(BACKOFF_MAX)]
    cmd = [*WORKER, "run", "--queue", made.subscription, "--dead-letter", dead, *settings]
    worker = LoggedProcess(cmd, env=env, cwd=tmp_path)
    try:
        made.publisher.publish(made.topic, b"poison one").result(timeout=30)
        wait_for(lambda: "Event dead-lettered" in "\n".join(worker.raw), TIMEOUT, message="1st")
        made.publisher.delete_topic(topic=dead)
        made.publisher.publish(made.topic, b"poison two").result(timeout=30)

        def failures() -> int:
            return sum("Could not dead-letter" in line for line in list(worker.raw))

        wait_for(lambda: failures() >= 1, TIMEOUT, message="a failed dead letter")
        first = time.monotonic()
        wait_for(lambda: time.monotonic() - first >= WINDOW, WINDOW + 5, message="window")
        seen = failures()
    finally:
        worker.stop()
    # one delivery per backoff, and a few seconds of slack for the emulator's redelivery
    assert 2 <= seen <= WINDOW / BACKOFF_MAX + 2, (seen, worker.text())
