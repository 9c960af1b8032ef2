"""The command line as a newcomer meets it (issue 13): the installed `transfer-worker` command,
its help and messages, `submit --wait`, and an idle SQS worker that stops when told to."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import transfer_worker as tw
from tests.conftest import AWS_REGION
from tests.installed import ROOT, install_worker

EXAMPLE = ROOT / "examples" / "event.json"
TIMEOUT = 60.0


def outside_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would make the clone importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_worker(tmp_path_factory.mktemp("installed"))


def run_installed(
    bin_dir: Path, *args: str, cwd: Path, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(bin_dir / "transfer-worker"), *args],
        cwd=cwd,
        env=outside_env(TRANSFER_WORKER_LOCAL_ROOT=str(cwd / "storage")),
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return result


# -------------------------------------------------------------------------------------------------
# 1. Installed like any Python tool
# -------------------------------------------------------------------------------------------------


def test_installed_command_validates_from_outside_the_clone(
    installed: Path, tmp_path: Path
) -> None:
    good = run_installed(installed, "validate", str(EXAMPLE), cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == "ok: 1 valid event(s)"
    # The schema really is read: a schema violation is reported by the installed copy.
    event = json.loads(EXAMPLE.read_text())
    event["source"]["provider"] = "azure_blob"
    bad = run_installed(installed, "validate", "-", cwd=tmp_path, stdin=json.dumps(event).encode())
    assert bad.returncode == 2
    assert "$.source.provider" in bad.stderr


def test_installed_copy_finds_its_schema_in_the_venv(installed: Path, tmp_path: Path) -> None:
    probe = "import transfer_worker as t; print(t.__file__); print(t.SCHEMA_PATH)"
    result = subprocess.run(
        [str(installed / "python"), "-c", probe],
        cwd=tmp_path,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    module, schema = (Path(line) for line in result.stdout.split())
    venv = installed.parent
    assert module.is_relative_to(venv / "lib"), module  # site-packages, not the clone
    assert schema == venv / "share" / "transfer-worker" / "event_schema.json"
    assert schema.read_bytes() == (ROOT / "event_schema.json").read_bytes()


def test_installed_help_names_the_command(installed: Path, tmp_path: Path) -> None:
    result = run_installed(installed, "submit", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: transfer-worker submit")


COMMAND_WORDS = r"(?:run|submit|validate|dlq)\b"


@pytest.mark.parametrize(
    "relative",
    [
        "README.md",
        "Dockerfile",
        "Makefile",
        "ops_profile.json",
        "docs/authentication.md",
        *sorted(
            str(p.relative_to(ROOT))
            for p in [*(ROOT / "deploy").rglob("*.yaml"), *(ROOT / "monitoring").rglob("*.yaml")]
        ),
    ],
)
def test_documents_spell_the_command_transfer_worker(relative: str) -> None:
    """A reader copies commands from these: `transfer_worker.py dlq list` fails in the image and
    outside the venv, `transfer-worker dlq list` works wherever the package is installed."""
    text = (ROOT / relative).read_text(encoding="utf-8")
    assert not re.findall(rf"transfer_worker\.py\s+{COMMAND_WORDS}", text)
    assert not re.findall(r"\"transfer_worker\.py\"", text)


# -------------------------------------------------------------------------------------------------
# 2. Help and messages
# -------------------------------------------------------------------------------------------------

HELP_COMMANDS = [["run"], ["submit"], ["validate"], ["dlq", "list"], ["dlq", "redrive"]]


def help_text(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tw.main([*command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def setting_flags(text: str) -> set[str]:
    """The setting flags a help text lists (its 'settings' section)."""
    section = text.split("settings (", 1)[1] if "settings (" in text else ""
    return set(re.findall(r"^  (--[a-z0-9-]+)", section, re.M))


def option_entry(text: str, flag: str) -> str:
    """An option's lines in a help text: its own and the indented ones under it."""
    match = re.search(rf"^  {flag}\b.*\n(?:^ {{4,}}\S.*\n)*", text, re.M)
    assert match, f"{flag} not in the help"
    return " ".join(match.group(0).split())


ALL_FLAGS = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(tw.Config)}


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # one line per option: the checks read lines


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_help_placeholders_are_values_and_names_the_variables(
    wide: None, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    text = help_text(capsys, *command)
    assert not re.findall(r"--[a-z0-9-]+ TRANSFER_WORKER_", text), (
        "a placeholder is a variable name"
    )
    assert not re.findall(r"--[a-z0-9-]+ (INT|FLOAT)\b", text), "a placeholder is a type name"
    for flag in setting_flags(text):
        entry = option_entry(text, flag)
        env = "TRANSFER_WORKER_" + flag[2:].replace("-", "_").upper()
        assert f"[env {env}]" in entry, entry
        assert entry.count("default") <= 1, f"the default is said twice: {entry}"


def test_placeholders_say_what_the_value_is(wide: None, capsys: pytest.CaptureFixture[str]):
    text = help_text(capsys, "run")
    for option in (
        "--local-root PATH",
        "--concurrency N",
        "--visibility-timeout SECONDS",
        "--part-size BYTES",
        "--storage {local,cloud}",
        "--worker-id NAME",
    ):
        assert f"  {option} " in text or f"  {option}\n" in text, option
    assert "(default: <hostname>-<pid>)" in text


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["run"], ALL_FLAGS - {"--dead-letter-subscription"}),  # accepted, unread, unlisted
        (["validate"], {"--max-message-bytes"}),
        (
            ["submit"],
            {
                "--local-root",
                "--queue",
                "--dead-letter",
                "--max-message-bytes",
                "--aws-role-arn",
                "--aws-role-audience",
            },
        ),
        *(
            (
                ["dlq", action],
                {
                    "--local-root",
                    "--queue",
                    "--dead-letter",
                    "--dead-letter-subscription",
                    "--aws-role-arn",
                    "--aws-role-audience",
                },
            )
            for action in ("list", "redrive")
        ),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_each_command_lists_the_settings_it_uses(
    wide: None, capsys: pytest.CaptureFixture[str], command: list[str], expected: set[str]
) -> None:
    assert setting_flags(help_text(capsys, *command)) == expected


def test_settings_a_command_does_not_list_still_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRANSFER_WORKER_VISIBILITY_TIMEOUT", "7")
    args = tw.build_parser().parse_args(["validate", "x.json"])
    assert tw.config_from_args(args).visibility_timeout == 7


def write_event(tmp_path: Path, **sides: dict[str, str]) -> Path:
    event = json.loads(EXAMPLE.read_text())
    for side, values in sides.items():
        event[side].update(values)
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))
    return path


S3_RULES = json.loads((ROOT / "event_schema.json").read_text())["$defs"]["s3Bucket"]
GCS_RULES = json.loads((ROOT / "event_schema.json").read_text())["$defs"]["gcsBucket"]


@pytest.mark.parametrize(
    "bucket",
    [
        "ab",
        "a" * 64,
        "Upper",
        "under_score",
        "-dash",
        "dash-",
        "a..b",
        "192.168.1.1",
        "xn--abc",
        "sthree-abc",
        "amzn-s3-demo-abc",
        "abc-s3alias",
        "abc--ol-s3",
        "abc.mrap",
        "abc--x-s3",
        "abc--table-s3",
    ],
)
def test_bad_s3_bucket_is_explained_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bucket: str
) -> None:
    """Each name breaks one rule the message states; the regex is not printed."""
    path = write_event(tmp_path, source={"bucket": bucket})
    assert tw.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"invalid event: $.source.bucket: {bucket!r} is not a valid bucket name. "
        f"{S3_RULES['description']}"
    )
    assert "(?!" not in err


@pytest.mark.parametrize(
    "bucket",
    [
        "ab",
        "a" * 64,
        "goog-data",
        "my-google-data",
        "my-g00gle-data",
        "a..b",
        "10.0.0.1",
        "_ab",
        ".".join(["a" * 63] * 3 + ["a" * 40]),  # 232 characters with dots
        "a." + "b" * 64,  # a dot-separated part of 64
    ],
)
def test_bad_gcs_bucket_is_explained_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bucket: str
) -> None:
    path = write_event(tmp_path, destination={"bucket": bucket})
    assert tw.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"invalid event: $.destination.bucket: {bucket!r} is not a valid bucket name. "
        f"{GCS_RULES['description']}"
    )


@pytest.mark.parametrize(
    ("side", "bucket"),
    [
        ("source", "abc"),
        ("source", "a" * 63),
        ("source", "my.data-1"),
        ("destination", "my_data.bucket-1"),
        ("destination", ".".join(["a" * 63] * 3) + ".abcd"),  # 196 characters with dots
    ],
)
def test_good_buckets_pass(tmp_path: Path, side: str, bucket: str) -> None:
    assert tw.main(["validate", str(write_event(tmp_path, **{side: {"bucket": bucket}}))]) == 0


@pytest.mark.parametrize("content", ["", "  \n\n", "[]"], ids=["empty", "blank", "empty-array"])
@pytest.mark.parametrize("command", ["validate", "submit"])
def test_no_events_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, command: str
) -> None:
    path = tmp_path / "events.json"
    path.write_text(content)
    root = tmp_path / "storage"
    extra = ["--local-root", str(root)] if command == "submit" else []
    assert tw.main([command, *extra, str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: no events in {path}"
    assert "ok:" not in captured.out
    assert not (root / "queue.db").exists()  # nothing was opened, nothing enqueued


# -------------------------------------------------------------------------------------------------
# 3. submit --wait
# -------------------------------------------------------------------------------------------------


def event_body(**changes: object) -> bytes:
    event = json.loads(EXAMPLE.read_text())
    event["eventId"] = str(uuid.uuid4())
    event.update(changes)
    return json.dumps(event).encode()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watching(
    queue: tw.LocalQueue, act: Callable[[int], None], clock: FakeClock | None = None
) -> tuple[tw.OutcomeWatch, io.StringIO]:
    """An OutcomeWatch whose sleeps run ``act(n)``, the n-th step of a stand-in worker, and move
    the fake clock: no real time passes."""
    clock = clock or FakeClock()
    calls = iter(range(1000))

    def sleep(seconds: float) -> None:
        clock.now += seconds
        act(next(calls))

    out = io.StringIO()
    return tw.OutcomeWatch(queue, queue, clock=clock, sleep=sleep, out=out), out


def dead_letter(queue: tw.LocalQueue, message: tw.Message, reason: str, error: str) -> None:
    exc = tw.PermanentError(error, reason=reason)
    queue.dead_letter(message, tw.make_envelope(message, exc, attempts=1, worker_id="w"))


def test_wait_prints_each_outcome_and_exits_1_on_a_dead_letter(tmp_path: Path) -> None:
    queue = tw.LocalQueue(tmp_path / "queue.db")
    bodies = [event_body(), event_body()]
    received: list[tw.Message] = []

    def worker(step: int) -> None:  # the first is acknowledged at once, the second later fails
        received.extend(queue.receive(10, 0))
        if step == 0:
            queue.ack(received[0])
        if step == 3:
            dead_letter(queue, received[1], "not_found", "source object does not exist")

    watch, out = watching(queue, worker)
    ids = [queue.publish(body) for body in bodies]
    assert watch.wait(dict(zip(ids, bodies, strict=True)), timeout=60) == 1
    first, second = (json.loads(body)["eventId"] for body in bodies)
    assert out.getvalue().splitlines() == [
        f"{first}: done (transferred or skipped)",
        f"{second}: dead-lettered (not_found): source object does not exist",
    ]


def test_wait_ignores_an_older_dead_letter_of_the_same_event(tmp_path: Path) -> None:
    """A resubmitted event that failed before, and is transferred now, exits 0."""
    queue = tw.LocalQueue(tmp_path / "queue.db")
    body = event_body()
    queue.publish(body)
    [old] = queue.receive(1, 0)
    dead_letter(queue, old, "not_found", "source object does not exist")
    watch, out = watching(queue, lambda step: [queue.ack(m) for m in queue.receive(10, 0)])
    new_id = queue.publish(body)
    assert watch.wait({new_id: body}, timeout=60) == 0
    assert out.getvalue().endswith(": done (transferred or skipped)\n")


def test_wait_times_out_with_its_own_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tw.LocalQueue(tmp_path / "queue.db")
    clock = FakeClock()
    watch, out = watching(queue, lambda step: None, clock)
    bodies = [event_body(), event_body()]
    ids = [queue.publish(body) for body in bodies]
    assert watch.wait(dict(zip(ids, bodies, strict=True)), timeout=5) == tw.EXIT_WAIT_TIMEOUT
    assert 5 <= clock.now < 5.5
    assert out.getvalue() == ""
    assert capsys.readouterr().err.strip() == (
        f"error: timed out after 5 s: 2 of 2 event(s) still on {tmp_path / 'queue.db'} "
        "(is a worker consuming it?)"
    )


def test_wait_refuses_a_cloud_target_before_enqueueing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/transfers"
    code = tw.main(["submit", "--wait", "--to", url, str(EXAMPLE)])
    assert code == 2
    assert "--wait follows events on a local (SQLite) queue only" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_worker(command: list[str], cwd: Path, **env: str) -> subprocess.Popen[bytes]:
    log = (cwd / "worker.log").open("wb")  # a file, not a pipe: it can never fill and block
    return subprocess.Popen(
        [*command, "run"], cwd=cwd, env=outside_env(**env), stdout=log, stderr=log
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def test_submit_wait_against_a_running_worker(tmp_path: Path) -> None:
    """The real CLI both sides: one event is transferred, one names a missing source."""
    root = tmp_path / "storage"
    source = root / "aws_s3" / "source-data-bucket" / "data" / "2024" / "01" / "file.parquet"
    source.parent.mkdir(parents=True)
    source.write_bytes(os.urandom(100_000))
    good = event_body()
    missing = json.loads(event_body())
    missing["source"]["key"] = "data/missing.parquet"
    events = tmp_path / "events.jsonl"
    events.write_bytes(good + b"\n" + json.dumps(missing).encode() + b"\n")
    command = [sys.executable, str(ROOT / "transfer_worker.py")]
    env = {"TRANSFER_WORKER_LOCAL_ROOT": str(root), "TRANSFER_WORKER_HTTP_PORT": "0"}
    worker = start_worker(command, tmp_path, **env)
    try:
        result = subprocess.run(
            [*command, "submit", "--wait", "--wait-timeout", "50", str(events)],
            env=outside_env(**env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        stop(worker)
    assert result.returncode == 1, result.stderr
    assert sorted(result.stdout.splitlines()) == sorted(
        [
            f"{json.loads(good)['eventId']}: transferred "
            "gs://destination-data-bucket/imports/2024/01/file.parquet",
            f"{missing['eventId']}: dead-lettered (source_not_found): "
            "source s3://source-data-bucket/data/missing.parquet does not exist",
        ]
    )
    copy = root / "gcp_gcs" / "destination-data-bucket" / "imports" / "2024" / "01"
    assert (copy / "file.parquet").read_bytes() == source.read_bytes()


def readme_block(heading: str) -> str:
    """The first ```bash block after ``heading`` in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text.split(heading, 1)[1]
    match = re.search(r"```bash\n(.*?)```", after, re.S)
    assert match, f"no bash block after {heading!r}"
    return match.group(1)


def test_readme_first_transfer_pasted_whole(installed: Path, tmp_path: Path) -> None:
    """The block run as written in a clone (its .venv the installed copy), next to the worker
    `make run` starts: every line succeeds, in order, with no waiting in between."""
    (tmp_path / ".venv").symlink_to(installed.parent)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "event.json").write_bytes(EXAMPLE.read_bytes())
    port = free_port()
    block = readme_block("### A first transfer, in local mode")
    assert "localhost:8080" in block
    block = block.replace("localhost:8080", f"localhost:{port}")
    env = {"TRANSFER_WORKER_HTTP_PORT": str(port), "TRANSFER_WORKER_HTTP_HOST": "127.0.0.1"}
    worker = start_worker([str(installed / "transfer-worker")], tmp_path, **env)
    try:
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block],
            cwd=tmp_path,
            env=outside_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        stop(worker)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "550e8400-e29b-41d4-a716-446655440000: transferred "
        "gs://destination-data-bucket/imports/2024/01/file.parquet"
    )
    assert " 5000000 " in lines[1] and lines[1].endswith("imports/2024/01/file.parquet")
    assert lines[2] == (
        'transfer_success_total{destination_provider="gcp_gcs",source_provider="aws_s3"} 1.0'
    )


# -------------------------------------------------------------------------------------------------
# 4. An idle SQS worker stops promptly
# -------------------------------------------------------------------------------------------------


def wait_for_log(path: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while text not in path.read_text(errors="replace"):
        assert process.poll() is None, path.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, f"no {text!r} in the log"
        time.sleep(0.05)


def test_idle_sqs_worker_exits_promptly_on_sigterm(aws_env: str, tmp_path: Path) -> None:
    """An idle worker is inside a long poll when SIGTERM comes; it exits 0 within the poll
    (5 s), not the 20 s it took with the longest poll."""
    import boto3

    sqs = boto3.client("sqs", endpoint_url=aws_env, region_name=AWS_REGION)
    queue, dead = (
        sqs.create_queue(QueueName=f"{name}-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        for name in ("idle", "idle-dlq")
    )
    command = [sys.executable, str(ROOT / "transfer_worker.py")]
    worker = start_worker(
        command,
        tmp_path,
        TRANSFER_WORKER_QUEUE=queue,
        TRANSFER_WORKER_DEAD_LETTER=dead,
        TRANSFER_WORKER_LOCAL_ROOT=str(tmp_path / "storage"),
        TRANSFER_WORKER_HTTP_PORT="0",
    )
    try:
        wait_for_log(tmp_path / "worker.log", "Worker started", worker)
        time.sleep(1.0)  # bounded: let the first long poll start
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)
    assert code == 0, (tmp_path / "worker.log").read_text()[-4000:]
    assert elapsed < 7.0, f"took {elapsed:.1f} s to exit after SIGTERM"
