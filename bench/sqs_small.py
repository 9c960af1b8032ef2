"""1 KiB objects over SQS (moto): events per second of one and of two worker processes (cloud mode,
--concurrency 8 each) on one queue, S3 to GCS and S3 to S3. The events are submitted first
(`submit - --to URL`, not timed); the clock runs from the start of the first worker process to
the exit of the last (`run --once` exits when the queue is empty), so it includes process start-up.
Every destination object is downloaded and its SHA-256 compared with the source's; the queue and
the dead-letter queue must be empty afterwards.

    .venv/bin/python bench/sqs_small.py [--events 1000] [--runs 3] [--destinations gcp_gcs,aws_s3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import time
from concurrent.futures import ThreadPoolExecutor

from common import WORKER, event, machine, median, submit
from servers import Servers, finish_measured, start_measured

SOURCE_BUCKET = "bench-source"
DEST = {"gcp_gcs": "bench-dest-gcs", "aws_s3": "bench-dest-s3"}


def queue_depth(sqs: object, url: str) -> int:
    attributes = sqs.get_queue_attributes(  # type: ignore[attr-defined]
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(value) for value in attributes.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--destinations", default="gcp_gcs,aws_s3")
    parser.add_argument("--workers", default="1,2", help="worker process counts to measure")
    args = parser.parse_args()
    destinations = args.destinations.split(",")
    counts = [int(n) for n in args.workers.split(",")]
    rates: dict[tuple[str, int], list[float]] = {(d, n): [] for d in destinations for n in counts}
    leftovers: list[str] = []
    with Servers() as servers:
        s3 = servers.s3()
        s3.create_bucket(Bucket=SOURCE_BUCKET)
        s3.create_bucket(Bucket=DEST["aws_s3"])
        servers.create_gcs_bucket(DEST["gcp_gcs"])
        sqs = servers.sqs()
        queue = sqs.create_queue(QueueName="bench-queue")["QueueUrl"]
        dead = sqs.create_queue(QueueName="bench-dead")["QueueUrl"]
        blobs = {f"obj-{i:05d}": os.urandom(1024) for i in range(args.events)}
        digests = {key: hashlib.sha256(data).hexdigest() for key, data in blobs.items()}
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda item: s3.put_object(Bucket=SOURCE_BUCKET, Key=item[0], Body=item[1]),
                    blobs.items(),
                )
            )
        env = servers.worker_env()
        argv = [
            *WORKER,
            "run",
            "--once",
            "--queue",
            queue,
            "--dead-letter",
            dead,
            "--concurrency",
            str(args.concurrency),
        ]

        def verify(provider: str, prefix: str) -> None:
            bucket = DEST[provider]

            def one(key: str) -> bool:
                if provider == "gcp_gcs":
                    got = servers.gcs_sha256(bucket, f"{prefix}/{key}")
                else:
                    got = servers.s3_sha256(bucket, f"{prefix}/{key}")
                return got == (digests[key], 1024)

            with ThreadPoolExecutor(8) as pool:
                good = sum(pool.map(one, digests))
            assert good == args.events, f"{provider}: {good} of {args.events} copies verified"

        for run in range(args.runs):
            for provider in destinations:
                for count in counts:
                    prefix = f"run{run}-{count}w"
                    events = [
                        event(
                            ("aws_s3", SOURCE_BUCKET, key),
                            (provider, DEST[provider], f"{prefix}/{key}"),
                            digests[key],
                        )
                        for key in blobs
                    ]
                    submit(events, env, "--to", queue)
                    start = time.perf_counter()
                    launchers = [start_measured(argv, env, timeout=900) for _ in range(count)]
                    for launcher in launchers:
                        finish_measured(launcher, argv)
                    wall = time.perf_counter() - start
                    # `run --once` exits when a receive comes back empty; an event another worker
                    # held (or put back) at that moment is left over. Count only what was done
                    # in the timed window, say so, and finish the rest untimed before verifying.
                    left = queue_depth(sqs, queue)
                    if left:
                        leftovers.append(f"run {run} {provider} {count} worker(s): {left} left")
                        deadline = time.monotonic() + 120
                        while queue_depth(sqs, queue) and time.monotonic() < deadline:
                            finish_measured(start_measured(argv, env, timeout=300), argv)
                            time.sleep(1)
                    assert queue_depth(sqs, dead) == 0, "events dead-lettered"
                    verify(provider, prefix)
                    rates[(provider, count)].append((args.events - left) / wall)
    print(f"machine: {machine()}")
    print(
        f"events: {args.events} x 1 KiB from S3 per measurement, runs: {args.runs}, "
        f"--concurrency {args.concurrency} per worker; servers: moto (S3, SQS) and "
        "fake-gcs-server, each one process, on the same 2 cores as the workers"
    )
    print(f"command (per worker process): TRANSFER_WORKER_STORAGE=cloud TRANSFER_WORKER_ALLOWED_BUCKETS='*' {shlex.join(argv)}")
    for provider in destinations:
        for count in counts:
            values = rates[(provider, count)]
            label = f"S3 -> {'GCS' if provider == 'gcp_gcs' else 'S3 '}, {count} worker(s)"
            print(
                f"{label}: median {median(values):.0f} events/s  runs {[round(x) for x in values]}"
            )
        if len(counts) > 1:
            first, last = counts[0], counts[-1]
            ratio = median(rates[(provider, last)]) / median(rates[(provider, first)])
            print(f"  scaling {last} / {first} worker(s): {ratio:.2f}")
    for line in leftovers:
        print(f"left on the queue when the last worker exited (rate counts only the rest): {line}")
    print("wall time includes each worker's start-up (imports, clients) and the final empty poll")


if __name__ == "__main__":
    main()
