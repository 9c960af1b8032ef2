"""The container image, checked without a container engine.

The Dockerfile is parsed (continuations, comments, exec-form JSON), then:
- every file COPY'd from the build context exists and is not excluded by .dockerignore;
- the runtime stage runs as UID/GID 1001, exposes 8080, has an exec-form HEALTHCHECK, and both
  stages start from the same base pinned to an exact patch release (never `latest`);
- the image's command (ENTRYPOINT + CMD) runs outside a container from a directory holding only
  the files the runtime stage copies, with the image's environment: `run --once` exits 0 and
  writes nothing beside the code; and the HEALTHCHECK command passes against a running worker,
  fails once it is gone, and the worker exits 0 on SIGTERM.
Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.installed import PACKAGE_FILES, install_worker

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
UID_GID = "1001"
PORT = "8080"
START_TIMEOUT = 60.0  # seconds for the worker to answer /health
STOP_TIMEOUT = 30.0  # seconds for the worker to exit after SIGTERM (drain of an idle worker)
RUN_TIMEOUT = 120.0  # seconds for `run --once` on an empty queue


# -------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore parsing
# -------------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        return None


@dataclass
class Stage:
    image: str
    name: str | None
    index: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_instructions(text: str) -> list[Instruction]:
    """Docker's line rules: `\\` at the end of a line continues it; comment lines (also inside a
    continuation) and blank lines are dropped; parser directives are comments here."""
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not stripped:
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        joined = " ".join(part for part in buffer if part)
        buffer = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not buffer, "Dockerfile ends inside a line continuation"
    return instructions


def parse_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs (before the first FROM) and the stages, with ${ARG} expanded in FROM."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            words = [w for w in shlex.split(instruction.args) if not w.startswith("--platform")]
            image = expand(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name, len(stages)))
        elif not stages:
            assert instruction.keyword == "ARG", f"{instruction.keyword} before the first FROM"
            key, _, value = instruction.args.partition("=")
            global_args[key.strip()] = value.strip().strip('"')
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), m.group(0)),
        value,
    )


def copy_sources(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY or ADD instruction, shell or exec form."""
    words = instruction.exec_form() or shlex.split(instruction.args)
    flags: dict[str, str] = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    assert len(words) >= 2, f"line {instruction.line}: {instruction.keyword} needs source and dest"
    return flags, words[:-1], words[-1]


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: use ENV key=value"
            env[key] = value
    return env


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per .dockerignore line, in order (moby/patternmatcher semantics)."""
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        if negated:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        patterns.append((negated, re.compile(glob_to_regex(line))))
    return patterns


def glob_to_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(char))
        i += 1
    return "^" + "".join(out) + "$"


def excluded(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves `path` out: the last pattern matching the path or one of
    its parent directories decides."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            result = not negated
    return result


def context_files(source: str) -> list[Path]:
    """The repository files a context source names (a file, a directory, or a glob)."""
    source = source.lstrip("/")
    if any(ch in source for ch in "*?["):
        matches = sorted(ROOT.glob(source))
    else:
        matches = [ROOT / source] if (ROOT / source).exists() else []
    files: list[Path] = []
    for match in matches:
        if match.is_dir():
            files.extend(p for p in sorted(match.rglob("*")) if p.is_file())
        else:
            files.append(match)
    return files


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    assert DOCKERFILE.is_file(), "Dockerfile missing"
    _, parsed = parse_stages(DOCKERFILE.read_text(encoding="utf-8"))
    assert parsed, "no FROM in the Dockerfile"
    return parsed


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


# -------------------------------------------------------------------------------------------------
# Static checks
# -------------------------------------------------------------------------------------------------


def test_parser_handles_continuations_and_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1\nARG BASE=python:3.11.1-slim\nFROM ${BASE} AS b\n"
        "RUN a \\\n    # a comment inside\n    && b\nCOPY --chown=1:1 x y /d/\n"
    )
    args, parsed = parse_stages(text)
    assert args == {"BASE": "python:3.11.1-slim"}
    assert (parsed[0].image, parsed[0].name) == ("python:3.11.1-slim", "b")
    assert parsed[0].instructions[0].args == "a && b"
    assert copy_sources(parsed[0].instructions[1]) == ({"chown": "1:1"}, ["x", "y"], "/d/")


def test_dockerignore_matcher_follows_docker_rules() -> None:
    patterns = [
        (False, re.compile(glob_to_regex("*"))),
        (True, re.compile(glob_to_regex("keep.py"))),
        (False, re.compile(glob_to_regex("**/*.pyc"))),
    ]
    assert excluded(".git/config", patterns)
    assert not excluded("keep.py", patterns)
    assert excluded("a/b/c.pyc", patterns)
    only_dir = [(False, re.compile(glob_to_regex("tests")))]
    assert excluded("tests/x/y.py", only_dir)  # a directory pattern covers what is inside
    assert not excluded("tests.py", only_dir)


def test_multi_stage_with_a_builder(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    assert stages[-1].name == "runtime"


def test_every_base_image_pinned_to_an_exact_tag(stages: list[Stage]) -> None:
    names = {s.name for s in stages if s.name}
    bases = [s.image for s in stages if s.image not in names]
    assert bases
    for image in bases:
        reference, _, _digest = image.partition("@")
        repository, _, tag = reference.rpartition(":")
        assert repository and tag and "/" not in tag, f"{image}: no tag"
        assert tag != "latest", f"{image}: latest is not a pin"
        assert re.match(r"^\d+\.\d+\.\d+-", tag), f"{image}: pin the exact patch release"
    assert len(set(bases)) == 1, f"builder and runtime should share one base: {bases}"
    python_tag = bases[0].partition("@")[0].rpartition(":")[2]
    assert python_tag.startswith("3.11."), "the image runs Python 3.11 (pyproject: >=3.11)"


def test_copy_sources_exist_and_survive_dockerignore(stages: list[Stage]) -> None:
    assert DOCKERIGNORE.is_file(), ".dockerignore missing"
    patterns = dockerignore_patterns()
    checked = 0
    for stage in stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            flags, sources, _ = copy_sources(instruction)
            if "from" in flags:
                continue
            for source in sources:
                assert not re.match(r"^[a-z]+://", source), f"remote ADD source {source}"
                files = context_files(source)
                assert files, f"line {instruction.line}: {source} is not in the repository"
                for path in files:
                    relative = path.relative_to(ROOT).as_posix()
                    assert not excluded(relative, patterns), (
                        f"line {instruction.line}: {relative} is excluded by .dockerignore"
                    )
                    checked += 1
    assert checked, "no COPY from the build context at all"


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".tools/bin/hadolint",
        "tests/slow_worker.py",
        "test_transfer_worker.py",
        ".mypy_cache/x",
        "__pycache__/x.pyc",
        "storage_simulator/queue.db",
        "terraform/main.tf",
        "deploy/k8s/base/deployment.yaml",
        "sbom.json",
        ".env",
    ):
        assert excluded(path, patterns), f"{path} would be sent to the builder"


def copied(stage: Stage) -> tuple[list[str], list[str]]:
    """What a stage copies from the build context, and what from other stages."""
    from_context: list[str] = []
    from_stages: list[str] = []
    for instruction in stage.all("COPY") + stage.all("ADD"):
        flags, sources, _ = copy_sources(instruction)
        (from_stages if "from" in flags else from_context).extend(sources)
    return from_context, from_stages


def test_runtime_copies_only_the_virtualenv(runtime: Stage) -> None:
    """The worker is installed into the builder's virtualenv (the `transfer-worker` command,
    the module in site-packages, its schema in share/), so the runtime needs nothing else."""
    assert copied(runtime) == ([], ["/opt/venv"])


def test_builder_installs_the_pins_and_the_package(stages: list[Stage]) -> None:
    from_context, _ = copied(stages[0])
    assert sorted(from_context) == sorted(("requirements.txt", *PACKAGE_FILES))
    run_text = " ".join(i.args for i in stages[0].all("RUN"))
    assert "-r /tmp/requirements.txt" in run_text and "pip check" in run_text


def test_runtime_runs_as_1001(runtime: Stage) -> None:
    user = runtime.last("USER")
    assert user is not None, "runtime stage has no USER"
    assert user.args in (UID_GID, f"{UID_GID}:{UID_GID}"), f"USER {user.args}"
    assert runtime.instructions.index(user) > max(
        runtime.instructions.index(i) for i in runtime.all("RUN")
    ), "USER should come after the last RUN"


def test_runtime_layout_and_environment(runtime: Stage) -> None:
    workdir = runtime.last("WORKDIR")
    assert workdir is not None and workdir.args == "/app"
    env = env_of(runtime)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("TRANSFER_WORKER_LOCAL_ROOT") == "/app/storage_simulator"
    assert env.get("PATH", "").startswith("/opt/venv/bin:")
    run_text = " ".join(i.args for i in runtime.all("RUN"))
    assert "/app/storage_simulator" in run_text and "chown 1001:1001" in run_text


def test_runtime_exposes_8080(runtime: Stage) -> None:
    ports = [p.split("/")[0] for i in runtime.all("EXPOSE") for p in i.args.split()]
    assert PORT in ports


def healthcheck_command(runtime: Stage) -> list[str]:
    instruction = runtime.last("HEALTHCHECK")
    assert instruction is not None, "runtime stage has no HEALTHCHECK"
    match = re.match(r"^((?:--[\w-]+=\S+\s+)*)CMD\s+(.+)$", instruction.args, re.S)
    assert match, f"HEALTHCHECK must be `[OPTIONS] CMD [...]`: {instruction.args}"
    command = Instruction("CMD", match.group(2), instruction.line).exec_form()
    assert command, "HEALTHCHECK CMD must be exec form (a JSON array)"
    return command


def test_healthcheck_is_exec_form_without_curl(runtime: Stage) -> None:
    command = healthcheck_command(runtime)
    assert command[0] == "python"
    assert not any(tool in " ".join(command) for tool in ("curl", "wget"))
    assert "/health" in " ".join(command)


def test_entrypoint_and_cmd(runtime: Stage) -> None:
    entrypoint = runtime.last("ENTRYPOINT")
    cmd = runtime.last("CMD")
    assert entrypoint is not None and entrypoint.exec_form() == ["transfer-worker"]
    assert cmd is not None and cmd.exec_form() == ["run"]


# -------------------------------------------------------------------------------------------------
# The image's command, run outside a container
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's /opt/venv: the pins and the package built from the files it copies."""
    return install_worker(tmp_path_factory.mktemp("image"))


@pytest.fixture
def image_app(tmp_path: Path) -> Path:
    """The image's WORKDIR /app: empty, the code lives in the virtualenv."""
    app = tmp_path / "app"
    app.mkdir()
    return app


def image_env(runtime: Stage, tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The image's ENV, with its paths moved under tmp_path, on top of this environment."""
    env = dict(os.environ)
    for key, value in env_of(runtime).items():
        if key == "PATH":
            continue  # the entry point is run by its path in the test virtualenv
        env[key] = value
    local_root = tmp_path / "storage_simulator"
    local_root.mkdir(exist_ok=True)
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env.update(
        TRANSFER_WORKER_LOCAL_ROOT=str(local_root),
        TMPDIR=str(scratch),
        HOME=str(scratch),
    )
    env.update(overrides)
    return env


def image_command(runtime: Stage, venv_bin: Path, *extra: str) -> list[str]:
    """ENTRYPOINT + CMD, the entry point found on the image's PATH (/opt/venv/bin first)."""
    entrypoint = runtime.last("ENTRYPOINT")
    cmd = runtime.last("CMD")
    assert entrypoint is not None and cmd is not None
    command = (entrypoint.exec_form() or []) + (cmd.exec_form() or []) + list(extra)
    assert (venv_bin / command[0]).is_file(), f"{command[0]} is not in the virtualenv's bin"
    return [str(venv_bin / command[0]), *command[1:]]


def snapshot(directory: Path) -> dict[str, float]:
    return {str(p.relative_to(directory)): p.stat().st_mtime for p in directory.rglob("*")}


def test_image_command_runs_once_and_writes_only_its_storage(
    runtime: Stage, image_venv: Path, image_app: Path, tmp_path: Path
) -> None:
    before = snapshot(image_app), snapshot(image_venv.parent)
    env = image_env(runtime, tmp_path, TRANSFER_WORKER_HTTP_PORT="0")
    result = subprocess.run(
        image_command(runtime, image_venv, "--once"),
        cwd=image_app,
        env=env,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-4000:]
    # read-only root: nothing written beside the code (no .pyc, no state)
    assert (snapshot(image_app), snapshot(image_venv.parent)) == before


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def run_healthcheck(runtime: Stage, port: int, env: dict[str, str]) -> int:
    command = healthcheck_command(runtime)
    command = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    # The image's healthcheck reads TRANSFER_WORKER_HTTP_PORT (default 8080); a command that
    # hard-codes 8080 is pointed at the test's port instead.
    command = [part.replace(f":{PORT}/", f":{port}/") for part in command]
    result = subprocess.run(
        command,
        env={**env, "TRANSFER_WORKER_HTTP_PORT": str(port)},
        capture_output=True,
        timeout=15,
        check=False,
    )
    return result.returncode


def test_healthcheck_against_running_worker_and_sigterm(
    runtime: Stage, image_venv: Path, image_app: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = image_env(
        runtime,
        tmp_path,
        TRANSFER_WORKER_HTTP_PORT=str(port),
        TRANSFER_WORKER_HTTP_HOST="127.0.0.1",
    )
    log_path = tmp_path / "worker.log"
    log = log_path.open("wb")  # a file, not a pipe: a chatty worker can never block on it
    process = subprocess.Popen(
        image_command(runtime, image_venv),
        cwd=image_app,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def output() -> str:
        return log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not health_answers(port):
            if process.poll() is not None:
                pytest.fail(
                    f"worker exited {process.returncode} before /health answered:\n{output()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"/health did not answer within {START_TIMEOUT:.0f} s:\n{output()}")
            time.sleep(0.1)
        assert run_healthcheck(runtime, port, env) == 0

        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still running {STOP_TIMEOUT:.0f} s after SIGTERM")
        assert code == 0, output()
        # and the healthcheck fails once nothing answers
        assert run_healthcheck(runtime, port, env) != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()
