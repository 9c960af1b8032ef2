"""1 GiB object, local to local: the worker against `sha256sum FILE && cp FILE DEST` on the same file,
side by side in each run. Prints the medians and the ratio; peak RSS of the worker process.

    .venv/bin/python bench/local_large.py [--size-mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import WORKER, event, machine, median, submit, timed


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(4 * 1024 * 1024)
    with path.open("wb") as handle:
        for offset in range(0, size, len(block)):
            piece = block[: min(len(block), size - offset)]
            handle.write(piece)
            digest.update(piece)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    base = Path(tempfile.mkdtemp(prefix="tw-bench-", dir=args.dir))
    root = base / "storage"
    source = root / "aws_s3" / "bench-source" / "big.bin"
    source.parent.mkdir(parents=True)
    checksum = make_file(source, size)
    env = {**os.environ, "TRANSFER_WORKER_LOCAL_ROOT": str(root), "TRANSFER_WORKER_HTTP_PORT": "0"}
    baseline, worker, rss = [], [], []
    try:
        for run in range(args.runs):
            copy = base / f"copy-{run}.bin"
            wall, _ = timed(
                ["sh", "-c", f"sha256sum '{source}' >/dev/null && cp '{source}' '{copy}'"]
            )
            baseline.append(wall)
            copy.unlink()
            submit(
                [
                    event(
                        ("aws_s3", "bench-source", "big.bin"),
                        ("gcp_gcs", "bench-dest", f"big-{run}.bin"),
                        checksum,
                    )
                ],
                env,
            )
            wall, peak = timed([*WORKER, "run", "--once"], env=env)
            worker.append(wall)
            rss.append(peak)
            (root / "gcp_gcs" / "bench-dest" / f"big-{run}.bin").unlink()
            subprocess.run(["sync"], check=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"machine: {machine()}")
    print(f"object: {args.size_mib} MiB, runs: {args.runs}")
    print(
        f"sha256sum && cp : median {median(baseline):.2f} s  runs {[round(x, 2) for x in baseline]}"
    )
    print(f"transfer_worker : median {median(worker):.2f} s  runs {[round(x, 2) for x in worker]}")
    print(f"ratio worker / baseline (medians): {median(worker) / median(baseline):.2f}")
    print(f"worker peak RSS: median {median(rss) / 2**20:.1f} MiB, max {max(rss) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
