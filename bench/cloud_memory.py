"""1 GiB, S3 to GCS and S3 to S3: peak RSS of the worker process (cloud mode, fed by SQS, default
settings), from os.wait4 through a small launcher (see servers.start_measured). Target: at most
128 MiB. Every copy is downloaded and its SHA-256 compared with the source's.

    .venv/bin/python bench/cloud_memory.py [--size-mib 1024] [--runs 3] [--events 1]

--events N puts N events of that size on the queue at once: with the default concurrency (8) the
worker moves up to eight together, which is the peak a pod's memory limit has to hold.

moto keeps objects in spooled temporary files and fake-gcs-server (memory backend) in RAM: about
2-3 GiB of server memory at 1 GiB; the servers' RSS is printed too.
"""

from __future__ import annotations

import argparse
import shlex

from common import WORKER, event, machine, median, submit
from servers import Servers, put_random_s3_object, timed_usage

SOURCE_BUCKET, S3_DEST, GCS_DEST, KEY = "bench-source", "bench-dest-s3", "bench-dest-gcs", "big.bin"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--destinations", default="gcp_gcs,aws_s3", help="comma list of providers")
    parser.add_argument("--events", type=int, default=1, help="events on the queue at once")
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    results: dict[str, dict[str, list[float]]] = {
        d: {"wall": [], "rss": [], "cpu": []} for d in ("gcp_gcs", "aws_s3")
    }
    server_rss: dict[str, int] = {}
    with Servers() as servers:
        s3 = servers.s3()
        for bucket in (SOURCE_BUCKET, S3_DEST):
            s3.create_bucket(Bucket=bucket)
        servers.create_gcs_bucket(GCS_DEST)
        sqs = servers.sqs()
        queue = sqs.create_queue(QueueName="bench-queue")["QueueUrl"]
        dead = sqs.create_queue(QueueName="bench-dead")["QueueUrl"]
        checksum = put_random_s3_object(s3, SOURCE_BUCKET, KEY, size)
        env = servers.worker_env()
        argv = [*WORKER, "run", "--once", "--queue", queue, "--dead-letter", dead]
        for run in range(args.runs):
            wanted = args.destinations.split(",")
            pairs = [(p, b) for p, b in (("gcp_gcs", GCS_DEST), ("aws_s3", S3_DEST)) if p in wanted]
            for provider, bucket in pairs:
                dests = [f"copy-{run}-{i}.bin" for i in range(args.events)]
                source = ("aws_s3", SOURCE_BUCKET, KEY)
                bodies = [event(source, (provider, bucket, dest), checksum) for dest in dests]
                submit(bodies, env, "--to", queue)
                wall, peak, cpu = timed_usage(argv, env=env, timeout=1800)
                for name, rss in servers.rss().items():
                    server_rss[name] = max(server_rss.get(name, 0), rss)
                for dest in dests:
                    if provider == "gcp_gcs":
                        digest, length = servers.gcs_sha256(bucket, dest)
                        servers.gcs_delete(bucket, dest)
                    else:
                        digest, length = servers.s3_sha256(bucket, dest)
                        s3.delete_object(Bucket=bucket, Key=dest)
                    if (digest, length) != (checksum, size):
                        raise SystemExit(
                            f"{provider} run {run} {dest}: destination {length} bytes {digest}, "
                            f"source {size} bytes {checksum}"
                        )
                uploads = s3.list_multipart_uploads(Bucket=S3_DEST).get("Uploads", [])
                assert not uploads, f"multipart uploads left behind: {uploads}"
                results[provider]["wall"].append(wall)
                results[provider]["rss"].append(peak)
                results[provider]["cpu"].append(cpu)
    print(f"machine: {machine()}")
    print(
        f"object: {args.size_mib} MiB from S3, {args.events} event(s) on the queue at once, "
        f"runs: {args.runs}, default settings, "
        "every copy SHA-256 verified"
    )
    print(f"command: TRANSFER_WORKER_STORAGE=cloud TRANSFER_WORKER_ALLOWED_BUCKETS='*' {shlex.join(argv)}")
    for provider, label in (("gcp_gcs", "S3 -> GCS"), ("aws_s3", "S3 -> S3 ")):
        rss = results[provider]["rss"]
        if not rss:  # a destination left out with --destinations
            continue
        wall = results[provider]["wall"]
        cpu = results[provider]["cpu"]
        print(
            f"{label}: peak RSS median {median(rss) / 2**20:.1f} MiB, max {max(rss) / 2**20:.1f} "
            f"MiB (target <= 128)  runs {[round(x / 2**20, 1) for x in rss]}; wall median "
            f"{median(wall):.1f} s; CPU median {median(cpu):.1f} s"
        )
    print(
        "server peak RSS seen: "
        + ", ".join(f"{name} {rss / 2**20:.0f} MiB" for name, rss in server_rss.items())
    )


if __name__ == "__main__":
    main()
