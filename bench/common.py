"""Shared pieces of the benchmarks: the machine line, medians, and running the worker CLI as a child
process whose wall time and peak RSS are measured by the kernel (os.wait4), not by the worker."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
WORKER = [PYTHON, str(REPO / "transfer_worker.py")]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(
    argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} failed: {child.stderr.read().decode() if child.stderr else ''}")
    return wall, usage.ru_maxrss * 1024


def event(
    src: tuple[str, str, str], dst: tuple[str, str, str], checksum: str | None = None
) -> dict:
    doc: dict = {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": "2024-01-15T10:30:00Z",
        "source": dict(zip(("provider", "bucket", "key"), src, strict=True)),
        "destination": dict(zip(("provider", "bucket", "key"), dst, strict=True)),
        "metadata": {"contentType": "application/octet-stream"},
    }
    if checksum:
        doc["metadata"]["checksumSHA256"] = checksum
    return doc


def submit(events: list[dict], env: dict[str, str], *extra: str) -> None:
    lines = "\n".join(json.dumps(e) for e in events).encode()
    subprocess.run(
        [*WORKER, "submit", "-", *extra], input=lines, env=env, check=True, capture_output=True
    )
