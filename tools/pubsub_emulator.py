"""Start Google's Cloud Pub/Sub emulator, patched so that it does not lose messages.

    make pubsub-emulator PORT=8085
    .venv/bin/python tools/pubsub_emulator.py --port 8085     # the same

starts the emulator on 127.0.0.1:PORT, waits until it answers, prints the line to paste into the
worker's shell (``export PUBSUB_EMULATOR_HOST=127.0.0.1:PORT``) and runs until SIGTERM, SIGINT
(Ctrl-C) or SIGHUP, which stop the emulator and its java process. The tests' Pub/Sub fixture
(tests/conftest.py) starts the emulator with this same module. Standard library only.

Why a patch: the emulator jar shipped with the Google Cloud CLI
(cloud-pubsub-emulator-0.8.20-all.jar) bundles io.grpc.internal.ServerImpl/ServerCallImpl from a
newer grpc-java than its io.grpc.InternalStatus. When a client cancels a StreamingPull (RST_STREAM:
any subscriber that stops, so every worker restart) the server calls
InternalStatus.asRuntimeException(Status, Metadata, boolean), which that InternalStatus lacks:
NoSuchMethodError, the server never closes its side of the stream, keeps treating the dead stream as
a live subscriber and keeps handing it messages. Observed with the unpatched jar: a message
published after the cancel was never delivered to a new subscriber of the same subscription (not
within 45 s, not by a synchronous pull either).

The fix: pubsub_emulator_fix/src/io/grpc/InternalStatus.java re-declares the bundled class
(MESSAGE_KEY, CODE_KEY, asRuntimeExceptionWithoutStacktrace) and adds the missing method with the
constructors this grpc version has. It is compiled with javac (--release 8, against the jar) into
pubsub_emulator_fix/build/ (cached, keyed by source and jar) and put AHEAD of the jar on the
classpath. gcloud's launcher (platform/pubsub-emulator/bin/cloud-pubsub-emulator) runs
``java -jar``, which ignores -cp/CLASSPATH, so the jar's Main-Class is run here directly; gcloud
only locates the jar. Rejected: rewriting the jar (modifies the system SDK) and
-Xbootclasspath/a (the boot loader cannot see io.grpc.Status in the jar). The shim is applied only
when the jar's own InternalStatus lacks the method, so a fixed SDK runs unmodified. ``--unpatched``
(the fixtures: TW_PUBSUB_EMULATOR_UNPATCHED=1) starts the emulator through ``gcloud beta emulators
pubsub start`` to reproduce the defect. PUBSUB_EMULATOR_JAR overrides the jar location.

Stopping: gcloud's launcher exits on SIGTERM and leaves its java child running, still holding the
port. The emulator is therefore started in a process group of its own, and stopping signals the
whole group (SIGTERM, then SIGKILL), then the group once more in case the leader went first.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

HOST = "127.0.0.1"
PROJECT = "test-project"  # for gcloud's launcher only; the emulator accepts any project
START_TIMEOUT = 90.0  # JVM start on a loaded 2-core CI runner; typically 2-4 s
JAVAC_TIMEOUT = 180.0
STOP_TIMEOUT = 10.0

FIX_DIR = Path(__file__).resolve().parent / "pubsub_emulator_fix"
FIX_SOURCE = FIX_DIR / "src" / "io" / "grpc" / "InternalStatus.java"
FIX_BUILD = FIX_DIR / "build"  # gitignored compile cache
FIX_CLASS = Path("io") / "grpc" / "InternalStatus.class"


class Unavailable(Exception):
    """A tool the emulator needs is missing (the tests skip on it, or fail under CI=true)."""


class StartFailed(Exception):
    """The emulator did not come up; the message names the command and the log's tail."""


class PortTaken(StartFailed):
    """Another process holds the port (a caller that picked it may pick another)."""


# -------------------------------------------------------------------------------------------------
# Finding the tools and building the fix
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    java: str
    jar: Path
    javac: str | None
    gcloud: str | None


def find_jar(gcloud: str | None) -> Path | None:
    override = os.environ.get("PUBSUB_EMULATOR_JAR")
    if override:
        return Path(override) if Path(override).is_file() else None
    if not gcloud:
        return None
    sdk_root = Path(os.path.realpath(gcloud)).parent.parent  # <sdk>/bin/gcloud
    jars = sorted((sdk_root / "platform" / "pubsub-emulator" / "lib").glob("*pubsub-emulator*.jar"))
    return jars[-1] if jars else None


def find_tools() -> Tools:
    gcloud, java = shutil.which("gcloud"), shutil.which("java")
    jar = find_jar(gcloud)
    if java is None:
        raise Unavailable("Pub/Sub emulator needs Java: no 'java' on PATH")
    if jar is None:
        raise Unavailable(
            "Pub/Sub emulator jar not found: install the Google Cloud CLI component "
            "'pubsub-emulator' (gcloud on PATH) or set PUBSUB_EMULATOR_JAR"
        )
    return Tools(java=java, jar=jar, javac=shutil.which("javac"), gcloud=gcloud)


def jar_main_class(jar: Path) -> str:
    with zipfile.ZipFile(jar) as zf:
        manifest = zf.read("META-INF/MANIFEST.MF").decode("utf-8", "replace")
    for line in manifest.splitlines():
        if line.startswith("Main-Class:"):
            return line.split(":", 1)[1].strip()
    return "com.google.cloud.pubsub.testing.v1.Main"


def jar_needs_fix(jar: Path) -> bool:
    """True when the jar's io.grpc.InternalStatus lacks asRuntimeException(...)."""
    with zipfile.ZipFile(jar) as zf:
        try:
            data = zf.read("io/grpc/InternalStatus.class")
        except KeyError:
            return False
    name = b"asRuntimeException"
    # A CONSTANT_Utf8 entry is tag 0x01 + u2 length + bytes: match the exact method name only.
    return b"\x01" + len(name).to_bytes(2, "big") + name not in data


def _fix_key(jar: Path) -> str:
    """Source and jar (path, size, mtime): a new SDK or an edited shim compiles again."""
    stat = jar.stat()
    identity = f"{jar.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return hashlib.sha256(FIX_SOURCE.read_bytes() + identity).hexdigest()[:16]


def _javac(tools: Tools, out: Path) -> None:
    assert tools.javac is not None
    command = [tools.javac, "--release", "8", "-nowarn", "-Xlint:-options"]
    command += ["-cp", str(tools.jar), "-d", str(out), str(FIX_SOURCE)]
    proc = subprocess.run(  # noqa: S603 (the JDK's javac on our own source file)
        command, capture_output=True, text=True, timeout=JAVAC_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise StartFailed(f"javac failed on {FIX_SOURCE}:\n{proc.stdout}{proc.stderr}")


def build_fix(tools: Tools, build_dir: Path = FIX_BUILD) -> Path:
    """Compile the InternalStatus shim once per (source, jar); returns the classes dir."""
    if tools.javac is None:
        raise Unavailable(
            "Pub/Sub emulator fix needs a JDK: no 'javac' on PATH (the 0.8.20 emulator jar "
            "loses messages after a cancelled streaming pull without it)"
        )
    key = _fix_key(tools.jar)
    out = build_dir / key
    if (out / FIX_CLASS).is_file():
        return out
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        _javac(tools, tmp)
        try:
            tmp.rename(out)  # atomic publish; a concurrent builder may have won the race
        except OSError:
            if not (out / FIX_CLASS).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -------------------------------------------------------------------------------------------------
# Starting, watching and stopping the emulator
# -------------------------------------------------------------------------------------------------


def command(tools: Tools, host: str, port: int, *, unpatched: bool = False) -> list[str]:
    """The patched emulator (its main class, the fix ahead of the jar), or gcloud's launcher."""
    if unpatched:
        if tools.gcloud is None:
            raise Unavailable("the unpatched Pub/Sub emulator is started by gcloud: not on PATH")
        launcher = [tools.gcloud, "beta", "emulators", "pubsub", "start"]
        return [*launcher, f"--host-port={host}:{port}", f"--project={PROJECT}", "--quiet"]
    fix = [str(build_fix(tools))] if jar_needs_fix(tools.jar) else []
    classpath = os.pathsep.join([*fix, str(tools.jar)])
    jvm = [tools.java, "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", classpath]
    return [*jvm, jar_main_class(tools.jar), f"--host={host}", f"--port={port}"]


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the whole process group (gcloud -> java), then SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        # The leader may be gone while a child (gcloud's java) lingers: empty the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def answers(host: str, port: int) -> bool:
    """The emulator answers GET / with 200 "Ok" once its gRPC/HTTP server is up."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=2.0) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def bind_failed(log_path: Path) -> bool:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return False
    return "Address already in use" in text or "BindException" in text


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


@dataclass
class Emulator:
    """A running emulator: ``host_port`` is the PUBSUB_EMULATOR_HOST value."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        stop_process_group(self.proc, timeout)


def _state(emulator: Emulator) -> str:
    if emulator.proc.poll() is not None:
        return "exited"
    if bind_failed(emulator.log_path):  # the emulator logs BindException and stays alive
        return "bind-failed"
    return "up" if answers(emulator.host, emulator.port) else ""


def wait_up(emulator: Emulator, timeout: float) -> str:
    """ "up", "exited", "bind-failed" or "timeout", polling at most every 0.5 s for ``timeout``."""
    deadline, interval = time.monotonic() + timeout, 0.1
    while not (state := _state(emulator)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        time.sleep(min(interval, remaining))
        interval = min(interval * 1.5, 0.5)
    # A port another server answers on may look "up" before the emulator logs its BindException.
    return "bind-failed" if bind_failed(emulator.log_path) else state


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(  # noqa: S603 (java or gcloud found on PATH, our arguments)
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own: killpg() reaches gcloud's java
        )


def start(
    port: int,
    *,
    log_path: Path,
    host: str = HOST,
    unpatched: bool = False,
    timeout: float = START_TIMEOUT,
) -> Emulator:
    """Start the emulator on host:port and return once it answers (raises on failure)."""
    if port_open(host, port):
        raise PortTaken(f"{host}:{port} is already in use")
    cmd = command(find_tools(), host, port, unpatched=unpatched)
    emulator = Emulator(_spawn(cmd, log_path), host, port, log_path)
    try:
        outcome = wait_up(emulator, timeout)
    except BaseException:  # a stop signal or Ctrl-C while starting: leave no java behind
        emulator.stop()
        raise
    if outcome == "up":
        return emulator
    emulator.stop()
    error = PortTaken if outcome == "bind-failed" else StartFailed
    code = emulator.proc.poll()
    raise error(f"emulator {outcome} (exit code {code})\n--- {' '.join(cmd)}\n{log_tail(log_path)}")


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the signal handler so that ``finally`` stops the emulator."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, default=8085, help="PORT to listen on (8085)")
    parser.add_argument("--host", default=HOST, help=f"address to listen on ({HOST})")
    parser.add_argument("--log", type=Path, help="emulator log FILE (default: in the temp dir)")
    parser.add_argument("--unpatched", action="store_true", help="gcloud's launcher, no fix")
    return parser.parse_args(argv)


def _announce(emulator: Emulator) -> None:
    print(f"export PUBSUB_EMULATOR_HOST={emulator.host_port}", flush=True)
    endpoint = f"http://{emulator.host_port}/"
    print(
        f"Pub/Sub emulator up on {emulator.host_port} (log: {emulator.log_path}); "
        f"gcloud ignores PUBSUB_EMULATOR_HOST, give it CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB="
        f"{endpoint} CLOUDSDK_AUTH_DISABLE_CREDENTIALS=true. Ctrl-C or SIGTERM stops it.",
        file=sys.stderr,
        flush=True,
    )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    log = args.log or Path(tempfile.gettempdir()) / f"pubsub-emulator-{args.port}.log"
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    emulator = None
    try:
        emulator = start(args.port, log_path=log, host=args.host, unpatched=args.unpatched)
        _announce(emulator)
        code = emulator.proc.wait()
        print(f"emulator exited ({code}):\n{log_tail(log)}", file=sys.stderr)
        return 1
    except _Stop:
        return 0
    except (Unavailable, StartFailed) as exc:
        print(f"pubsub-emulator: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in STOP_SIGNALS:  # a second Ctrl-C must not interrupt the stop itself
            signal.signal(sig, signal.SIG_IGN)
        if emulator is not None:
            emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
