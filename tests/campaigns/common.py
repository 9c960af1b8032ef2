"""Helpers shared by the reliability campaigns and test_security.py: events, local buckets, worker
processes of the real CLI (logs to files, never to pipes that could fill), bounded waits, the
Prometheus text of /metrics, and RELIABILITY.md sections. Everything listens on 127.0.0.1."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SCRIPT = str(REPO / "transfer_worker.py")
SLOW_SCRIPT = str(REPO / "tests" / "slow_worker.py")
RELIABILITY = REPO / "RELIABILITY.md"
KiB, MiB = 1024, 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_event(
    src: tuple[str, str, str],
    dst: tuple[str, str, str],
    *,
    checksum: str | None = None,
    timestamp: str | None = None,
    event_id: str | None = None,
    **meta: Any,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schemaVersion": "1.0.0",
        "eventId": event_id or str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": timestamp or dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "source": dict(zip(("provider", "bucket", "key"), src, strict=True)),
        "destination": dict(zip(("provider", "bucket", "key"), dst, strict=True)),
        "metadata": {"contentType": "application/octet-stream", **meta},
    }
    if checksum:
        event["metadata"]["checksumSHA256"] = checksum
    return event


def body(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event).encode()


def put_local(root: Path, provider: str, bucket: str, key: str, data: bytes) -> Path:
    path = root / provider / bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll until ``predicate`` is truthy (exceptions count as not yet); bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    gate = threading.Event()
    while True:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        gate.wait(interval)


def base_env(root: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "TRANSFER_WORKER_LOCAL_ROOT": str(root),
        "TRANSFER_WORKER_HTTP_PORT": "0",
        "TRANSFER_WORKER_HTTP_HOST": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def cli(
    root: Path,
    *args: str,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [PYTHON, SCRIPT, *args],
        input=stdin,
        env=dict(env) if env is not None else base_env(root),
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def submit(
    root: Path,
    bodies: Iterable[bytes],
    *,
    to: str = "",
    env: Mapping[str, str] | None = None,
) -> None:
    """Enqueue bodies as they are (one per line; a body must not contain a raw newline)."""
    data = b"\n".join(bodies)
    args = ["submit", "--no-validate", "-"] + (["--to", to] if to else [])
    result = cli(root, *args, stdin=data, env=env, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"submit failed: {result.stderr.decode(errors='replace')[-2000:]}")


def dlq_list(root: Path, env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    out = cli(root, "dlq", "list", env=env).stdout.decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


class WorkerProcess:
    """One ``transfer_worker.py run`` subprocess, stdout and stderr to files in ``logdir``."""

    def __init__(
        self,
        root: Path,
        logdir: Path,
        name: str,
        *args: str,
        http_port: int | None = None,
        slow: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name, self.http_port = name, http_port
        self.terminated = False
        logdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = logdir / f"{name}.out"
        self.stderr_path = logdir / f"{name}.err"
        full_env = base_env(root, **(dict(env) if env else {}))
        if http_port:
            full_env["TRANSFER_WORKER_HTTP_PORT"] = str(http_port)
        full_env.setdefault("TRANSFER_WORKER_WORKER_ID", name)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [PYTHON, SLOW_SCRIPT if slow else SCRIPT, "run", *args],
                env=full_env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        with contextlib.suppress(FileNotFoundError):
            for raw in self.stdout_path.read_bytes().splitlines():
                if raw.startswith(b"{"):
                    with contextlib.suppress(ValueError):
                        lines.append(json.loads(raw))
        return lines

    def http(self, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
        return http_get(self.http_port or 0, path, timeout)

    def wait_http(self, timeout: float = 30.0) -> None:
        wait_until(lambda: self.http("/health")[0] == 200, timeout, f"{self.name} /health")

    def terminate(self) -> None:
        """One SIGTERM per process: a second one tells the worker to exit at once (143)."""
        if self.terminated:
            return
        self.terminated = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (unless already sent), then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.terminate()
            if self.wait(timeout) is None:
                self.kill()
        return self.proc.wait(10)


def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- Prometheus text ------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match:
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **match: str) -> float:
    return sum(
        v
        for n, labels, v in samples
        if n == name and all(labels.get(k) == want for k, want in match.items())
    )


def histogram_quantile(
    samples: list[tuple[str, dict[str, str], float]], name: str, q: float, **match: str
) -> float | None:
    """Like PromQL's histogram_quantile over the sum of all matching series (linear within a
    bucket); None without observations."""
    buckets: dict[float, float] = {}
    for n, labels, v in samples:
        if n == f"{name}_bucket" and all(labels.get(k) == w for k, w in match.items()):
            bound = float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + v
    if not buckets or buckets.get(float("inf"), 0) == 0:
        return None
    bounds = sorted(buckets)
    total = buckets[float("inf")]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return None


def slo_figures(text: str) -> dict[str, Any]:
    samples = parse_metrics(text)
    success = metric_sum(samples, "transfer_success_total")
    skipped = metric_sum(samples, "transfer_skipped_total")
    failure = metric_sum(samples, "transfer_failure_total")
    total = success + skipped + failure
    return {
        "success": int(success),
        "skipped": int(skipped),
        "failure": int(failure),
        "retries": int(metric_sum(samples, "retry_count_total")),
        "success_rate": (success + skipped) / total if total else None,
        "p99": histogram_quantile(samples, "transfer_duration_seconds", 0.99),
    }


# -- RELIABILITY.md -------------------------------------------------------------------------------


def machine() -> str:
    cpus = os.cpu_count() or 0
    mem = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f", {int(line.split()[1]) // 1024 // 1024 + 1} GiB RAM"
    system = f"{platform.system()} {platform.machine()}"
    return f"{system}, {cpus} CPU{mem}, Python {platform.python_version()}"


HEADER = """# Reliability figures

Produced by the campaign runner (`tests/campaigns/`, issue 5). Each section below is rewritten by
the campaign that owns it, so the file always shows the latest run of each campaign and size.
Command for the whole small set: `.venv/bin/python -m tests.campaigns.run --size small`
(full: `--size full`). A section says which size produced it; full figures appear only for
campaigns that were run at full size.
"""


def write_section(campaign: str, size: str, markdown: str) -> None:
    """Insert or replace the section of ``campaign`` at ``size`` in RELIABILITY.md (a lock file
    keeps two runners from interleaving their writes)."""
    start, end = f"<!-- campaign:{campaign}:{size} -->", f"<!-- /campaign:{campaign}:{size} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = RELIABILITY.read_text(encoding="utf-8") if RELIABILITY.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RELIABILITY.write_text(text, encoding="utf-8")


def fmt_rate(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def fmt_seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"
