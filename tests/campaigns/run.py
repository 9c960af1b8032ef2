"""Reliability campaign runner (issue 5).

    python -m tests.campaigns.run --size small|full [--only poison,drain,...] [--keep]

Each campaign prints ONE summary line (PASS/FAIL with its figures) and rewrites its own section of
RELIABILITY.md (command, size, machine, result). Exit status 0 when every campaign passed, 1 when
one found a defect, 2 on a usage error. Work directories are under a temporary directory, removed
at the end unless --keep. Campaigns: faults (cloud: S3/GCS through tests/faultproxy.py, SQS and
Pub/Sub), crashes, drain, scaleout (local, plus SQS and Pub/Sub when the cloud adapters and
servers are available), poison, changes (source changes mid-transfer + checksum mismatch),
model (tests/test_model.py with many examples)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.campaigns.common import machine, write_section
from tests.campaigns.local import LOCAL_CAMPAIGNS, Result

ORDER = (
    "poison",
    "drain",
    "crashes",
    "scaleout",
    "changes",
    "model",
    "faults",
    "crashes-cloud",
    "drain-cloud",
    "scaleout-cloud",
    "races-cloud",
    "outage-cloud",
)


def all_campaigns() -> dict:
    campaigns = dict(LOCAL_CAMPAIGNS)
    try:
        from tests.campaigns.cloud import CLOUD_CAMPAIGNS
    except ImportError as exc:  # the cloud adapters or an SDK are missing
        error = f"{exc}"

        def unavailable(size: str, work: Path, name: str = "") -> Result:
            return Result(name, False, f"{name}[{size}]: NOT RUN ({error})", "", [error])

        CLOUD_CAMPAIGNS = {
            n: (lambda s, w, n=n: unavailable(s, w, n)) for n in ORDER if n not in LOCAL_CAMPAIGNS
        }
    campaigns.update(CLOUD_CAMPAIGNS)
    return campaigns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.campaigns.run", description=__doc__)
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--only", default="", help=f"comma list of {', '.join(ORDER)}")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--no-write", action="store_true", help="do not update RELIABILITY.md")
    args = parser.parse_args(argv)
    campaigns = all_campaigns()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ORDER)
    unknown = [n for n in names if n not in campaigns]
    if unknown:
        parser.error(f"unknown campaigns {unknown}; known: {', '.join(ORDER)}")
    base = Path(tempfile.mkdtemp(prefix="tw-campaigns-"))
    failed = 0
    try:
        for name in names:
            work = base / name
            work.mkdir()
            started = time.monotonic()
            try:
                result = campaigns[name](args.size, work)
            except Exception as exc:  # a campaign that breaks is a failed campaign, with its trace
                traceback.print_exc()
                result = Result(name, False, f"{name}[{args.size}]: ERROR {exc!r}", "", [repr(exc)])
            took = time.monotonic() - started
            print(f"{result.summary} [{took:.0f} s]", flush=True)
            if not result.ok:
                failed += 1
            if result.markdown and not args.no_write:
                stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                write_section(
                    name,
                    args.size,
                    result.markdown.rstrip()
                    + f"\n- Machine: {machine()}; run {stamp}, {took:.0f} s wall clock.\n",
                )
    finally:
        if args.keep:
            print(f"work directories kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
