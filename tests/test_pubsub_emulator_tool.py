"""tools/pubsub_emulator.py, the Pub/Sub emulator a user starts by hand (`make pubsub-emulator`):
it serves, and stopping it (the module's stop, SIGTERM to the script, Ctrl-C to make) leaves no
java process behind on its port. Skips without gcloud/java (fails under CI=true instead)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import GCP_PROJECT, _unavailable, free_port, wait_for
from tools import pubsub_emulator as tool

ROOT = Path(tool.__file__).resolve().parent.parent


@pytest.fixture
def tools_present() -> None:
    try:
        tool.find_tools()
    except tool.Unavailable as exc:
        _unavailable(str(exc))


def java_on_port(port: int) -> list[int]:
    """Pids of java processes whose command line names the emulator's port."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        names_port = {f"--port={port}".encode(), f"--host-port=127.0.0.1:{port}".encode()}
        if args and args[0].endswith(b"java") and names_port & set(args):
            found.append(int(entry.name))
    return found


def assert_no_java_survives(port: int) -> None:
    wait_for(lambda: not java_on_port(port), 15.0, message=f"no java left on port {port}")


def publish_and_pull(host_port: str, monkeypatch: pytest.MonkeyPatch) -> bytes:
    from google.cloud import pubsub_v1

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", host_port)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    suffix = uuid.uuid4().hex[:8]
    topic = publisher.topic_path(GCP_PROJECT, f"tool-{suffix}")
    sub = subscriber.subscription_path(GCP_PROJECT, f"tool-{suffix}")
    try:
        publisher.create_topic(name=topic, timeout=30)
        subscriber.create_subscription(name=sub, topic=topic, timeout=30)
        publisher.publish(topic, b"hello from the tool").result(timeout=30)
        response = subscriber.pull(subscription=sub, max_messages=1, timeout=30)
        return response.received_messages[0].message.data
    finally:
        publisher.transport.close()
        subscriber.close()


def test_the_module_starts_an_emulator_that_serves_and_stops_with_its_java(
    tools_present: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    emulator = tool.start(port, log_path=tmp_path / "emulator.log")
    try:
        assert java_on_port(port), "the emulator runs as java on its port"
        assert publish_and_pull(emulator.host_port, monkeypatch) == b"hello from the tool"
    finally:
        emulator.stop()
    assert_no_java_survives(port)


def read_line(proc: subprocess.Popen[str]) -> str:
    """Bounded: the script gives up (and exits: EOF) after tool.START_TIMEOUT."""
    assert proc.stdout is not None
    return proc.stdout.readline()


@pytest.mark.parametrize(
    ("how", "sig"),
    [("script", signal.SIGTERM), ("script", signal.SIGINT), ("make", signal.SIGINT)],
)
def test_the_command_prints_the_env_line_and_a_signal_stops_its_java(
    tools_present: None, how: str, sig: signal.Signals, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a user runs it: `make pubsub-emulator PORT=...` and Ctrl-C (SIGINT to the terminal's
    process group), or the script and SIGTERM (a supervisor). gcloud's launcher would leave java
    running on SIGTERM; the command leaves nothing."""
    port = free_port()
    if how == "make":
        command = ["make", "--no-print-directory", "pubsub-emulator", f"PORT={port}"]
    else:
        command = [sys.executable, str(ROOT / "tools" / "pubsub_emulator.py"), f"--port={port}"]
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        lines = [read_line(proc)]
        if how == "make":  # make echoes the command first
            lines.append(read_line(proc))
        assert lines[-1] == f"export PUBSUB_EMULATOR_HOST=127.0.0.1:{port}\n", lines
        assert publish_and_pull(f"127.0.0.1:{port}", monkeypatch) == b"hello from the tool"
        os.killpg(proc.pid, sig)  # the whole group, as a terminal's Ctrl-C does
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert_no_java_survives(port)
