"""1 KiB objects, local to local: events per second of one worker process (concurrency 8) against a
bare Python loop doing the same file work (read, hash, write, fsync, rename), side by side per run.

    .venv/bin/python bench/local_small.py [--events 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import WORKER, event, machine, median, submit, timed


def bare_loop(sources: list[Path], dest_dir: Path) -> float:
    """What any copy-with-verification must do per object, and nothing else."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for index, source in enumerate(sources):
        data = source.read_bytes()
        hashlib.sha256(data).hexdigest()
        tmp = dest_dir / f".tmp-{index}"
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest_dir / source.name)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--log-level", default="INFO", help="the worker's; INFO (its default) logs every event"
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tw-bench-small-"))
    loop_rates, worker_rates = [], []
    try:
        for run in range(args.runs):
            root = base / f"run-{run}"
            src_dir = root / "aws_s3" / "bench-source"
            src_dir.mkdir(parents=True)
            sources, events = [], []
            for i in range(args.events):
                path = src_dir / f"obj-{i}"
                data = os.urandom(1024)
                path.write_bytes(data)
                sources.append(path)
                events.append(
                    event(
                        ("aws_s3", "bench-source", path.name),
                        ("gcp_gcs", "bench-dest", path.name),
                        hashlib.sha256(data).hexdigest(),
                    )
                )
            loop_rates.append(args.events / bare_loop(sources, base / f"loop-{run}"))
            env = {
                **os.environ,
                "TRANSFER_WORKER_LOCAL_ROOT": str(root),
                "TRANSFER_WORKER_HTTP_PORT": "0",
                "TRANSFER_WORKER_LOG_LEVEL": args.log_level,
            }
            submit(events, env)
            wall, _ = timed(
                [*WORKER, "run", "--once", "--concurrency", str(args.concurrency)], env=env
            )
            worker_rates.append(args.events / wall)
            done = len(list((root / "gcp_gcs" / "bench-dest").iterdir()))
            assert done == args.events, f"only {done} of {args.events} objects arrived"
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"machine: {machine()}")
    print(
        f"events: {args.events} x 1 KiB, runs: {args.runs}, worker concurrency {args.concurrency}, "
        f"log level {args.log_level}"
    )
    print(
        f"bare loop       : median {median(loop_rates):.0f} objects/s  runs {[round(x) for x in loop_rates]}"
    )
    print(
        f"transfer_worker : median {median(worker_rates):.0f} events/s   runs {[round(x) for x in worker_rates]}"
    )
    print(f"ratio worker / loop (medians): {median(worker_rates) / median(loop_rates):.2f}")
    print("worker time includes process start-up and its SQLite queue; the loop has neither")


if __name__ == "__main__":
    main()
