"""Campaigns against real protocol servers: moto (S3 + SQS), gcp-storage-emulator (GCS) and the
Cloud Pub/Sub emulator, started here on 127.0.0.1 (tests/campaigns/servers.py). The worker is the
real CLI in cloud mode (`--storage cloud`), its S3 and GCS traffic through tests/faultproxy.py.

    faults          N events, 1 KiB..8 MiB (full: 32 MiB), both directions, one worker on SQS and
                    one on Pub/Sub at the same time, ~10 % of storage requests faulted
    scaleout-cloud  3 workers on one SQS queue, then on one Pub/Sub subscription, vs 1 worker
    crashes-cloud   kill -9 during large GCS->S3 multipart transfers; a watcher hashes every S3
                    object version it can see; list_multipart_uploads must be empty at the end
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.campaigns import servers
from tests.campaigns.common import (
    KiB,
    MiB,
    WorkerProcess,
    body,
    cli,
    fmt_rate,
    fmt_seconds,
    free_port,
    make_event,
    sha,
    slo_figures,
    wait_until,
)
from tests.campaigns.local import KNOWN_REASONS, Result, internal_errors, success_counts
from tests.faultproxy import FaultProxy

S3_SRC, S3_DST, GCS_SRC, GCS_DST = "tw-src-s3", "tw-dst-s3", "tw-src-gcs", "tw-dst-gcs"
ALLOWED = f"aws_s3:{S3_SRC},aws_s3:{S3_DST},gcp_gcs:{GCS_SRC},gcp_gcs:{GCS_DST}"
FAULT_MIX = {
    "slowdown": 0.02,
    "throttle": 0.015,
    "error500": 0.015,
    "reset_before": 0.015,
    "reset_mid_body": 0.015,
    "truncate": 0.01,
    "latency": 0.01,
}


@dataclasses.dataclass
class Rig:
    """Running servers, fault proxies in front of S3 and GCS, and direct clients for checks."""

    moto_url: str
    gcs_url: str
    pubsub_host: str | None
    s3_proxy: FaultProxy
    gcs_proxy: FaultProxy
    s3: Any
    sqs: Any
    gcs: Any

    def worker_env(self, root: Path) -> dict[str, str]:
        env = servers.clean_env(
            {
                **servers.aws_env(self.moto_url, self.s3_proxy.url),
                **servers.gcp_env(self.gcs_proxy.url, self.pubsub_host),
            }
        )
        env.update(
            {
                "TRANSFER_WORKER_LOCAL_ROOT": str(root),
                "TRANSFER_WORKER_HTTP_HOST": "127.0.0.1",
                "TRANSFER_WORKER_HTTP_PORT": "0",
                "TRANSFER_WORKER_STORAGE": "cloud",
                "TRANSFER_WORKER_ALLOWED_BUCKETS": ALLOWED,
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def sqs_pair(self) -> tuple[str, str]:
        name = uuid.uuid4().hex[:10]
        queue = self.sqs.create_queue(
            QueueName=f"q-{name}", Attributes={"VisibilityTimeout": "30"}
        )["QueueUrl"]
        dlq = self.sqs.create_queue(QueueName=f"dlq-{name}")["QueueUrl"]
        return queue, dlq

    def pubsub_pair(self, ack_deadline: int = 30) -> tuple[str, str, str, str]:
        """(topic, subscription, dead-letter topic, subscription on the dead-letter topic)."""
        from google.cloud import pubsub_v1

        name = uuid.uuid4().hex[:10]
        project = servers.PROJECT
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        topic = f"projects/{project}/topics/t-{name}"
        sub = f"projects/{project}/subscriptions/s-{name}"
        dlq_topic = f"projects/{project}/topics/dlq-{name}"
        dlq_sub = f"projects/{project}/subscriptions/dlqs-{name}"
        publisher.create_topic(name=topic, timeout=30)
        publisher.create_topic(name=dlq_topic, timeout=30)
        subscriber.create_subscription(
            name=sub, topic=topic, ack_deadline_seconds=ack_deadline, timeout=30
        )
        subscriber.create_subscription(name=dlq_sub, topic=dlq_topic, timeout=30)
        subscriber.close()
        return topic, sub, dlq_topic, dlq_sub

    # -- objects ---------------------------------------------------------------------------------

    def put(self, provider: str, bucket: str, key: str, data: bytes) -> None:
        if provider == "aws_s3":
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)
        else:
            self.gcs.bucket(bucket).blob(key).upload_from_string(data)

    def digest(self, provider: str, bucket: str, key: str) -> str | None:
        """SHA-256 of the destination object read directly (not through the proxy), or None."""
        try:
            if provider == "aws_s3":
                data = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            else:
                blob = self.gcs.bucket(bucket).get_blob(key)
                if blob is None:
                    return None
                data = blob.download_as_bytes()
        except Exception as exc:
            if "NoSuchKey" in repr(exc) or "404" in repr(exc):
                return None
            raise
        return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def rig(seed: int, rates: dict[str, float], with_pubsub: bool = True) -> Iterator[Rig]:
    import boto3
    from google.cloud import storage

    with contextlib.ExitStack() as stack:
        moto_url = stack.enter_context(servers.moto())
        gcs_url = stack.enter_context(servers.gcs())
        pubsub_host = stack.enter_context(servers.pubsub()) if with_pubsub else None
        # this process's own clients talk to the servers directly
        os.environ.update(servers.aws_env(moto_url))
        os.environ.update(servers.gcp_env(gcs_url, pubsub_host))
        os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        # moto keeps its backends per process: start every rig from an empty one
        urllib.request.urlopen(
            urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"), timeout=30
        ).close()
        s3 = boto3.client("s3", endpoint_url=moto_url, region_name=servers.REGION)
        sqs = boto3.client("sqs", endpoint_url=moto_url, region_name=servers.REGION)
        gcs = storage.Client(project=servers.PROJECT)
        for bucket in (S3_SRC, S3_DST):
            s3.create_bucket(Bucket=bucket)
        for bucket in (GCS_SRC, GCS_DST):
            with contextlib.suppress(Exception):  # Conflict: left by an earlier rig
                gcs.create_bucket(bucket)
        s3_proxy = stack.enter_context(
            FaultProxy(moto_url, rates=rates, seed=seed, dialect="s3", max_connections=128)
        )
        gcs_proxy = stack.enter_context(
            FaultProxy(gcs_url, rates=rates, seed=seed + 1, dialect="gcs", max_connections=128)
        )
        yield Rig(moto_url, gcs_url, pubsub_host, s3_proxy, gcs_proxy, s3, sqs, gcs)


def drain_sqs_dlq(rig: Rig, url: str, into: list[dict[str, Any]]) -> None:
    while True:
        response = rig.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        messages = response.get("Messages", [])
        if not messages:
            return
        for message in messages:
            into.append(json.loads(message["Body"]))
            rig.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def drain_pubsub_dlq(subscription: str, into: list[dict[str, Any]]) -> None:
    from google.cloud import pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    try:
        for _ in range(20):
            try:
                response = subscriber.pull(
                    request={"subscription": subscription, "max_messages": 100}, timeout=3
                )
            except Exception:
                return
            if not response.received_messages:
                return
            for received in response.received_messages:
                into.append(json.loads(received.message.data))
            subscriber.acknowledge(
                request={
                    "subscription": subscription,
                    "ack_ids": [r.ack_id for r in response.received_messages],
                }
            )
    finally:
        subscriber.close()


@dataclasses.dataclass
class Planned:
    event: dict[str, Any]
    digest: str
    size: int
    queue: str  # "sqs" or "pubsub"

    @property
    def dst(self) -> tuple[str, str, str]:
        d = self.event["destination"]
        return d["provider"], d["bucket"], d["key"]


def plan_events(
    rig: Rig, n: int, sizes: list[int], rng: random.Random, queues: tuple[str, ...], prefix: str
) -> list[Planned]:
    from concurrent.futures import ThreadPoolExecutor

    planned = []
    uploads = []
    for i in range(n):
        size = rng.choice(sizes)
        data = rng.randbytes(size)  # seeded: the same objects every run
        if rng.random() < 0.5:
            src, dst = ("aws_s3", S3_SRC), ("gcp_gcs", GCS_DST)
        else:
            src, dst = ("gcp_gcs", GCS_SRC), ("aws_s3", S3_DST)
        key = f"{prefix}/{i}"
        uploads.append((*src, key, data))
        event = make_event((*src, key), (*dst, key))
        planned.append(Planned(event, sha(data), size, queues[i % len(queues)]))
    with ThreadPoolExecutor(8, thread_name_prefix="put") as pool:
        list(pool.map(lambda args: rig.put(*args), uploads))
    return planned


def submit_to(root: Path, env: dict[str, str], target: str, bodies: list[bytes]) -> None:
    for start in range(0, len(bodies), 200):
        chunk = bodies[start : start + 200]
        result = cli(
            root, "submit", "--to", target, "-", stdin=b"\n".join(chunk), env=env, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"submit to {target}: {result.stderr.decode()[-1500:]}")


def verify(
    rig: Rig, planned: list[Planned], dead: list[dict[str, Any]]
) -> tuple[dict[str, list[str]], Counter[str]]:
    """Sort events into transferred / corrupt / dead_lettered / missing (not yet or lost)."""
    dead_ids = {e.get("event_id") for e in dead}
    reasons = Counter(e.get("reason") for e in dead)
    result: dict[str, list[str]] = {"transferred": [], "corrupt": [], "dead": [], "missing": []}
    for item in planned:
        event_id = item.event["eventId"]
        digest = rig.digest(*item.dst)
        if digest == item.digest:
            result["transferred"].append(event_id)
        elif digest is not None:
            result["corrupt"].append(event_id)
        elif event_id in dead_ids:
            result["dead"].append(event_id)
        else:
            result["missing"].append(event_id)
    return result, reasons


def _sizes(size: str) -> list[int]:
    small = [1 * KiB, 16 * KiB, 256 * KiB, 1 * MiB, 3 * MiB, 5 * MiB + 1, 8 * MiB]
    return small if size == "small" else [*small, 12 * MiB, 20 * MiB, 32 * MiB]


# =================================================================================================
# faults
# =================================================================================================


def campaign_faults(size: str, work: Path) -> Result:
    n = 60 if size == "small" else 1000
    rng = random.Random(31)
    with rig(seed=31, rates={}) as r:
        root = work / "root"
        env = r.worker_env(root)
        queue, dlq = r.sqs_pair()
        topic, sub, dlq_topic, dlq_sub = r.pubsub_pair()
        planned = plan_events(r, n, _sizes(size), rng, ("sqs", "pubsub"), "f")
        submit_to(root, env, queue, [body(p.event) for p in planned if p.queue == "sqs"])
        submit_to(root, env, topic, [body(p.event) for p in planned if p.queue == "pubsub"])
        r.s3_proxy.set_rates(FAULT_MIX)
        r.gcs_proxy.set_rates(FAULT_MIX)
        ports = {"sqs": free_port(), "pubsub": free_port()}
        started = time.monotonic()
        workers = {
            "sqs": WorkerProcess(
                root,
                work / "logs",
                "faults-sqs",
                "--queue",
                queue,
                "--dead-letter",
                dlq,
                "--concurrency",
                "4",
                http_port=ports["sqs"],
                env=env,
            ),
            "pubsub": WorkerProcess(
                root,
                work / "logs",
                "faults-pubsub",
                "--queue",
                sub,
                "--dead-letter",
                dlq_topic,
                "--concurrency",
                "4",
                http_port=ports["pubsub"],
                env=env,
            ),
        }
        dead: list[dict[str, Any]] = []
        deadline = time.monotonic() + (600 if size == "small" else 5400)
        state: dict[str, list[str]] = {}
        try:
            for worker in workers.values():
                worker.wait_http(60)
            while time.monotonic() < deadline:
                drain_sqs_dlq(r, dlq, dead)
                drain_pubsub_dlq(dlq_sub, dead)
                state, reasons = verify(r, planned, dead)
                if not state["missing"] or not all(w.alive() for w in workers.values()):
                    break
                threading.Event().wait(2.0)
            elapsed = time.monotonic() - started
            metrics = {name: w.http("/metrics")[1].decode() for name, w in workers.items()}
        finally:
            for worker in workers.values():
                worker.terminate()
            codes = {name: w.stop(40) for name, w in workers.items()}
        r.s3_proxy.set_rates({})
        r.gcs_proxy.set_rates({})
        drain_sqs_dlq(r, dlq, dead)
        drain_pubsub_dlq(dlq_sub, dead)
        state, reasons = verify(r, planned, dead)
        # Workers abort only uploads idle past the visibility timeout (a younger one may be a
        # live delivery's). moto reports every upload as Initiated 2010-11-10, so a lost
        # create's part-less upload looks idle at once here; on S3 it waits for a later
        # transfer of its key, retries_exhausted, or the bucket's lifecycle rule.
        orphans = sum(
            len(r.s3.list_multipart_uploads(Bucket=b).get("Uploads", [])) for b in (S3_SRC, S3_DST)
        )
        proxy_counts = {"s3": r.s3_proxy.counts, "gcs": r.gcs_proxy.counts}
    figures = {name: slo_figures(text) for name, text in metrics.items()}
    lines = []
    for name in ("sqs", "pubsub"):
        ids = {p.event["eventId"] for p in planned if p.queue == name}
        f = figures[name]
        lines.append(
            f"  - {name}: {len(ids)} events, transferred "
            f"{sum(1 for i in state['transferred'] if i in ids)}, dead-lettered "
            f"{sum(1 for i in state['dead'] if i in ids)}, lost "
            f"{sum(1 for i in state['missing'] if i in ids)}, corrupt "
            f"{sum(1 for i in state['corrupt'] if i in ids)}; /metrics success {f['success']}, "
            f"skipped {f['skipped']}, failure {f['failure']}, retries {f['retries']}, success "
            f"rate {fmt_rate(f['success_rate'])}, P99 {fmt_seconds(f['p99'])}"
        )
    total = {
        "success": sum(f["success"] + f["skipped"] for f in figures.values()),
        "failure": sum(f["failure"] for f in figures.values()),
        "retries": sum(f["retries"] for f in figures.values()),
    }
    rate = total["success"] / max(1, total["success"] + total["failure"])
    p99 = max((f["p99"] or 0) for f in figures.values())
    injected = {k: proxy_counts["s3"][k] + proxy_counts["gcs"][k] for k in FaultProxy.KINDS}
    requests = proxy_counts["s3"]["requests"] + proxy_counts["gcs"]["requests"]
    defects = []
    if state["missing"]:
        defects.append(f"lost (neither transferred nor dead-lettered): {len(state['missing'])}")
    if state["corrupt"]:
        defects.append(f"corrupt destination objects: {len(state['corrupt'])}")
    unknown = {k: v for k, v in reasons.items() if k not in KNOWN_REASONS}
    if unknown:
        defects.append(f"dead-letter reasons outside the documented set: {unknown}")
    if orphans:
        defects.append(f"{orphans} multipart uploads left open on S3")
    defects += internal_errors(workers.values())
    ok = not defects
    summary = (
        f"faults[{size}]: {'PASS' if ok else 'FAIL'} {n} events in {elapsed:.0f} s, "
        f"{sum(injected.values())} of {requests} storage requests faulted "
        f"({100 * sum(injected.values()) / max(1, requests):.1f} %): transferred "
        f"{len(state['transferred'])}, dead-lettered {len(state['dead'])} {dict(reasons)}, lost "
        f"{len(state['missing'])}, corrupt {len(state['corrupt'])}; retries {total['retries']}, "
        f"success rate {fmt_rate(rate)}, P99 {fmt_seconds(p99)}, open multipart uploads {orphans}"
    )
    md = f"""## Faults: S3 and GCS through the fault proxy, SQS and Pub/Sub ({size})

- Command: `python -m tests.campaigns.run --size {size} --only faults`
- Size: {n} events, objects of {", ".join(_human(s) for s in _sizes(size))}, S3->GCS and GCS->S3
  at random, half on an SQS queue (moto), half on a Pub/Sub subscription (emulator); one worker
  per queue (`--storage cloud`, concurrency 4, default retries: --max-retries 3, backoff 1 s x2
  with jitter, botocore standard mode 2 attempts). Both storage endpoints go through
  `tests/faultproxy.py` with {100 * sum(FAULT_MIX.values()):.0f} % of requests faulted:
  {", ".join(f"{k} {100 * v:.1f} %" for k, v in FAULT_MIX.items())}.
- Injected: {injected} over {requests} storage requests (S3 {proxy_counts["s3"]["requests"]},
  GCS {proxy_counts["gcs"]["requests"]}).
- Result: **{"PASS" if ok else "FAIL"}** in {elapsed:.0f} s. Transferred and verified
  {len(state["transferred"])}, dead-lettered {len(state["dead"])} ({dict(reasons)}), lost
  {len(state["missing"])}, corrupt {len(state["corrupt"])}; open multipart uploads at the end
  {orphans}; worker exit codes {codes}.
{chr(10).join(lines)}
- Overall from /metrics: retries {total["retries"]}, success rate {fmt_rate(rate)}
  (SLO 99.5 %), P99 {fmt_seconds(p99)} (SLO 60 s; histogram buckets, upper estimate).
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects)}
"""
    return Result("faults", ok, summary, md, defects)


def _human(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


# =================================================================================================
# scale-out on SQS and Pub/Sub
# =================================================================================================


def campaign_scaleout_cloud(size: str, work: Path) -> Result:
    n = 200 if size == "small" else 2000
    rng = random.Random(41)
    rows = []
    defects: list[str] = []
    with rig(seed=41, rates={}) as r:
        root = work / "root"
        env = r.worker_env(root)
        for kind in ("sqs", "pubsub"):
            for processes in (3, 1):
                if kind == "sqs":
                    target, dlq = r.sqs_pair()
                    queue_arg, dlq_arg, dlq_sub = target, dlq, None
                else:
                    target, sub, dlq_topic, dlq_sub = r.pubsub_pair()
                    queue_arg, dlq_arg = sub, dlq_topic
                prefix = f"sc-{kind}-{processes}"
                planned = plan_events(r, n, [1 * KiB, 4 * KiB, 16 * KiB], rng, (kind,), prefix)
                submit_to(root, env, target, [body(p.event) for p in planned])
                started = time.monotonic()
                workers = [
                    WorkerProcess(
                        root,
                        work / "logs",
                        f"{prefix}-{i}",
                        "--queue",
                        queue_arg,
                        "--dead-letter",
                        dlq_arg,
                        "--concurrency",
                        "4",
                        env=env,
                    )
                    for i in range(processes)
                ]
                ids = {p.event["eventId"] for p in planned}
                try:
                    with contextlib.suppress(TimeoutError):
                        wait_until(
                            lambda workers=workers, ids=ids: ids <= set(success_counts(workers)),
                            300 if size == "small" else 1800,
                            "every event completed",
                            interval=0.5,
                        )
                    elapsed = time.monotonic() - started
                finally:
                    for worker in workers:  # all at once: an SQS worker ends its 20 s long poll
                        worker.terminate()
                    for worker in workers:
                        worker.stop(40)
                writes = success_counts(workers)
                dead: list[dict[str, Any]] = []
                if kind == "sqs":
                    drain_sqs_dlq(r, dlq_arg, dead)
                elif dlq_sub:
                    drain_pubsub_dlq(dlq_sub, dead)
                missing = ids - set(writes)
                dupes = {k: v for k, v in writes.items() if v > 1}
                split = [sum(success_counts([w]).values()) for w in workers]
                if missing or dead:
                    defects.append(
                        f"{kind} x{processes}: {len(missing)} not completed, "
                        f"{len(dead)} dead-lettered"
                    )
                if dupes:
                    defects.append(
                        f"{kind} x{processes}: {len(dupes)} events written twice or more"
                    )
                defects += internal_errors(workers)
                rows.append(
                    (kind, processes, elapsed, n / elapsed, split, len(missing), len(dupes))
                )
    ok = not defects
    table = "\n".join(
        f"| {k} | {p} | {e:.1f} s | {t:.1f}/s | {s} | {m} | {d} |" for k, p, e, t, s, m, d in rows
    )
    speed = {
        k: next(t for kk, p, _, t, *_ in rows if kk == k and p == 3)
        / next(t for kk, p, _, t, *_ in rows if kk == k and p == 1)
        for k in ("sqs", "pubsub")
    }
    summary = (
        f"scaleout-cloud[{size}]: {'PASS' if ok else 'FAIL'} {n} events per run: "
        + "; ".join(
            f"{k} x{p} {e:.1f} s ({t:.1f}/s, dup {d}, missing {m})" for k, p, e, t, _, m, d in rows
        )
        + f"; speed-up SQS x{speed['sqs']:.2f}, Pub/Sub x{speed['pubsub']:.2f}"
    )
    md = f"""## Scale-out on SQS and Pub/Sub ({size})

- Command: `python -m tests.campaigns.run --size {size} --only scaleout-cloud`
- Size: {n} events of 1-16 KiB per run (S3->GCS and GCS->S3), 3 worker processes
  (concurrency 4 each) on one SQS queue (moto) and then on one Pub/Sub subscription (emulator),
  each compared with 1 process on a fresh queue. Time runs from the first worker start to the last
  success log line (includes start-up). Writes are counted from the success log lines per event id.

| queue | processes | time | throughput | events per process | not completed | written twice |
|---|---|---|---|---|---|---|
{table}

- Result: **{"PASS" if ok else "FAIL"}**. Speed-up with 3 processes: SQS x{speed["sqs"]:.2f},
  Pub/Sub x{speed["pubsub"]:.2f} (2 CPUs shared by the workers, moto, the GCS emulator, which
  serves one request at a time, and the Pub/Sub emulator: the emulators are the bottleneck).
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects)}
"""
    return Result("scaleout-cloud", ok, summary, md, defects)


# =================================================================================================
# crashes on S3 multipart uploads
# =================================================================================================


class S3Watcher:
    """Lists the S3 destination every 100 ms and hashes each object version (ETag) it sees."""

    def __init__(self, rig: Rig, bucket: str, expected: Callable[[str], set[str] | None]) -> None:
        self.rig, self.bucket, self.expected = rig, bucket, expected
        self.stop_event = threading.Event()
        self.seen: dict[str, str] = {}
        self.hashed = 0
        self.bad: list[str] = []
        self.thread = threading.Thread(target=self._run, name="s3-watcher", daemon=True)

    def __enter__(self) -> S3Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(60)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(Exception):
                self.scan()
            self.stop_event.wait(0.1)
        with contextlib.suppress(Exception):
            self.scan()

    def scan(self) -> None:
        listing = self.rig.s3.list_objects_v2(Bucket=self.bucket)
        for item in listing.get("Contents", []):
            key, etag = item["Key"], item["ETag"]
            allowed = self.expected(key)  # the digests this key may show; None: not watched
            if self.seen.get(key) == etag or allowed is None:
                continue
            data = self.rig.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            self.seen[key] = etag
            self.hashed += 1
            if sha(data) not in allowed:
                self.bad.append(f"{key}: {len(data)} bytes, sha256 {sha(data)[:12]}")


def campaign_crashes_cloud(size: str, work: Path) -> Result:
    k = 4 if size == "small" else 20
    # Kills stay at one per transfer: each one re-delivers the messages at the head of the queue
    # (the killed worker's and those its still-open long poll takes), and past 11 deliveries an
    # event is dead-lettered retries_exhausted by design (a message that keeps killing workers
    # must not loop forever). 40 kills on 20 transfers did that to 4 events.
    max_kills = 8 if size == "small" else 20
    rng = random.Random(53)
    with rig(seed=53, rates={}, with_pubsub=False) as r:
        root = work / "root"
        env = r.worker_env(root)
        queue, dlq = r.sqs_pair()
        expected: dict[str, str] = {}
        events = []
        for i in range(k):
            data = os.urandom(
                rng.choice([16, 24, 32]) * MiB if size == "full" else rng.choice([12, 16]) * MiB
            )
            key = f"cc/{i}"
            r.put("gcp_gcs", GCS_SRC, key, data)
            expected[key] = sha(data)
            events.append(
                make_event(("gcp_gcs", GCS_SRC, key), ("aws_s3", S3_DST, key), maxRetries=10)
            )
        submit_to(root, env, queue, [body(e) for e in events])
        args = (
            "--queue",
            queue,
            "--dead-letter",
            dlq,
            "--concurrency",
            "2",
            "--part-size",
            str(5 * MiB),
            "--visibility-timeout",
            "4",
            "--max-retries",
            "10",
        )
        # a little latency on every storage request stretches the transfers so kills land inside
        r.s3_proxy.latency = r.gcs_proxy.latency = 0.4
        r.s3_proxy.set_rates({"latency": 1.0})
        r.gcs_proxy.set_rates({"latency": 1.0})
        workers: list[WorkerProcess] = []
        kills, kills_with_upload = 0, 0
        started = time.monotonic()
        deadline = started + (300 if size == "small" else 1500)
        with S3Watcher(
            r, S3_DST, lambda key: {expected[key]} if key in expected else None
        ) as watcher:

            def done() -> int:
                return sum(
                    1 for key in expected if r.digest("aws_s3", S3_DST, key) == expected[key]
                )

            while done() < k and kills < max_kills and time.monotonic() < deadline:
                worker = WorkerProcess(root, work / "logs", f"cc-{len(workers)}", *args, env=env)
                workers.append(worker)
                threading.Event().wait(rng.uniform(2.5, 6.0))
                uploads = len(r.s3.list_multipart_uploads(Bucket=S3_DST).get("Uploads", []))
                if worker.alive():
                    worker.kill()
                    worker.wait(10)
                    kills += 1
                    kills_with_upload += 1 if uploads else 0
            r.s3_proxy.set_rates({})
            r.gcs_proxy.set_rates({})
            final = WorkerProcess(root, work / "logs", "cc-final", *args, env=env)
            workers.append(final)
            with contextlib.suppress(TimeoutError):
                wait_until(
                    lambda: done() >= k, max(30.0, deadline - time.monotonic()), "all done", 1.0
                )
            final.stop(40)
        elapsed = time.monotonic() - started
        dead: list[dict[str, Any]] = []
        drain_sqs_dlq(r, dlq, dead)
        results = {key: r.digest("aws_s3", S3_DST, key) for key in expected}
        open_uploads = r.s3.list_multipart_uploads(Bucket=S3_DST).get("Uploads", [])
    lost = [key for key, d in results.items() if d is None]
    corrupt = [key for key, d in results.items() if d is not None and d != expected[key]]
    defects = []
    if lost:
        defects.append(f"not completed: {lost}")
    if corrupt or watcher.bad:
        defects.append(f"corrupt {corrupt}; partial/wrong visible {watcher.bad[:5]}")
    if dead:
        defects.append(f"dead-lettered: {[e.get('reason') for e in dead]}")
    if open_uploads:
        defects.append(
            f"{len(open_uploads)} multipart uploads left open: "
            f"{[u['Key'] for u in open_uploads][:10]}"
        )
    defects += internal_errors(workers)
    ok = not defects
    summary = (
        f"crashes-cloud[{size}]: {'PASS' if ok else 'FAIL'} {k} GCS->S3 multipart transfers, "
        f"{kills} kill -9 ({kills_with_upload} with a multipart upload open), {len(workers)} "
        f"worker starts in {elapsed:.0f} s: lost {len(lost)}, corrupt {len(corrupt)}, "
        f"partial/wrong visible {len(watcher.bad)} of {watcher.hashed} versions, open multipart "
        f"uploads at the end {len(open_uploads)}"
    )
    md = f"""## Crashes on S3 multipart uploads ({size})

- Command: `python -m tests.campaigns.run --size {size} --only crashes-cloud`
- Size: {k} GCS->S3 transfers of {"12-16" if size == "small" else "16-32"} MiB through SQS,
  `--part-size 5 MiB`, concurrency 2, visibility timeout 4 s, maxRetries 10; 400 ms latency
  added to every storage request (fault proxy) so each transfer lasts seconds; each worker is
  killed with SIGKILL after a random 2.5-6 s and a new one started; a watcher lists and hashes
  every S3 object version (ETag) every 100 ms.
- Result: **{"PASS" if ok else "FAIL"}** in {elapsed:.0f} s: {kills} kills ({kills_with_upload}
  with a multipart upload open at the kill), {len(workers)} worker starts. Lost {len(lost)},
  corrupt {len(corrupt)}, partial or wrong objects ever visible {len(watcher.bad)}
  ({watcher.hashed} versions hashed), dead-lettered {len(dead)}, multipart uploads still open at
  the end (`list_multipart_uploads`) {len(open_uploads)}.
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects)}
"""
    return Result("crashes-cloud", ok, summary, md, defects)


# =================================================================================================
# drain on SQS and Pub/Sub
# =================================================================================================


def campaign_drain_cloud(size: str, work: Path) -> Result:
    n = 24 if size == "small" else 200
    drain_timeout = 3
    rng = random.Random(61)
    rows = []
    defects: list[str] = []
    with rig(seed=61, rates={}) as r:
        root = work / "root"
        env = r.worker_env(root)
        # 200 ms on every storage request: transfers last long enough to be cut by the drain
        r.s3_proxy.latency = r.gcs_proxy.latency = 0.2
        r.s3_proxy.set_rates({"latency": 1.0})
        r.gcs_proxy.set_rates({"latency": 1.0})
        for kind in ("sqs", "pubsub"):
            if kind == "sqs":
                target, dlq_arg = r.sqs_pair()
                queue_arg, dlq_sub = target, None
            else:
                target, queue_arg, dlq_arg, dlq_sub = r.pubsub_pair(ack_deadline=20)
            planned = plan_events(r, n, [256 * KiB, 1 * MiB, 6 * MiB], rng, (kind,), f"dr-{kind}")
            submit_to(root, env, target, [body(p.event) for p in planned])
            args = ("--queue", queue_arg, "--dead-letter", dlq_arg, "--concurrency", "4")
            first = WorkerProcess(
                root,
                work / "logs",
                f"dr-{kind}-1",
                *args,
                "--drain-timeout",
                str(drain_timeout),
                env=env,
            )
            ids = {p.event["eventId"] for p in planned}
            with contextlib.suppress(TimeoutError):
                wait_until(
                    lambda first=first: len(success_counts([first])) >= max(2, n // 6),
                    120,
                    "a sixth of the load",
                    0.2,
                )
            before = len(success_counts([first]))
            signalled = time.monotonic()
            first.terminate()
            code = first.wait(drain_timeout + 40)
            drain_seconds = time.monotonic() - signalled
            if code is None:
                first.kill()
            handed_back = sum(
                int(line.get("count", 0))
                for line in first.logs()
                if str(line.get("message", "")).startswith("Drain timeout passed")
            )
            second = WorkerProcess(root, work / "logs", f"dr-{kind}-2", *args, env=env)
            takeover = time.monotonic()
            # The next worker gets 60 s: released messages must be available at once, not when
            # a lease of the stopped worker runs out (visibility timeout, 300 s by default).
            with contextlib.suppress(TimeoutError):
                wait_until(
                    lambda ids=ids, pair=(first, second): ids <= set(success_counts(pair)),
                    60 if size == "small" else 900,
                    "all events",
                    0.5,
                )
            takeover_seconds = time.monotonic() - takeover
            second.stop(40)
            late = len(ids - set(success_counts([first, second])))
            if late:
                defects.append(
                    f"{kind}: {late} events not completed by the next worker within "
                    f"{takeover_seconds:.0f} s of its start (released messages still leased?)"
                )
            dead: list[dict[str, Any]] = []
            if kind == "sqs":
                drain_sqs_dlq(r, dlq_arg, dead)
            elif dlq_sub:
                drain_pubsub_dlq(dlq_sub, dead)
            state, _ = verify(r, planned, dead)
            writes = success_counts([first, second])
            dupes = sum(1 for v in writes.values() if v > 1)
            if state["corrupt"] or dead or (state["missing"] and not late):
                defects.append(
                    f"{kind}: missing {len(state['missing'])}, corrupt {len(state['corrupt'])}, "
                    f"dead-lettered {len(dead)}"
                )
            if code != 0:
                defects.append(f"{kind}: first worker exit code {code} after SIGTERM")
            defects += internal_errors([first, second])
            rows.append(
                (kind, before, drain_seconds, handed_back, len(state["transferred"]), dupes, late)
            )
    ok = not defects
    summary = f"drain-cloud[{size}]: {'PASS' if ok else 'FAIL'} {n} events per queue: " + "; ".join(
        f"{k}: SIGTERM after {b} done, exit after {d:.1f} s, {h} handed back, "
        f"{t}/{n} transferred, not taken over within 60 s {late}, written twice {dup}"
        for k, b, d, h, t, dup, late in rows
    )
    table = "\n".join(
        f"| {k} | {b} | {d:.1f} s | {h} | {t} of {n} | {late} | {dup} |"
        for k, b, d, h, t, dup, late in rows
    )
    md = f"""## Drain on SQS and Pub/Sub ({size})

- Command: `python -m tests.campaigns.run --size {size} --only drain-cloud`
- Size: {n} events of 256 KiB to 6 MiB per queue, S3<->GCS, 200 ms added to every storage
  request; worker 1 (concurrency 4, `--drain-timeout {drain_timeout}`) gets SIGTERM once a sixth of
  the events are done, worker 2 then takes the rest. "Exit after" is SIGTERM to process exit;
  on SQS it includes finishing the current long poll (up to 20 s, `receive_wait`). Worker 2
  gets 60 s to finish everything (default visibility timeout 300 s, so a message the first
  worker failed to release would still be leased).

| queue | done first | SIGTERM to exit | handed back | transferred | late (> 60 s) | twice |
|---|---|---|---|---|---|---|
{table}

- Result: **{"PASS" if ok else "FAIL"}**.
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects)}
"""
    return Result("drain-cloud", ok, summary, md, defects)


# =================================================================================================
# events racing on a few keys
# =================================================================================================

RACE_KEYS = ("race/plain", "race/café ünï", "race/Жёлтый 漢字", "race/😀 a+b%20#?")


def plan_races(rig: Rig, n: int, rng: random.Random) -> tuple[list[dict[str, Any]], dict]:
    """n events on RACE_KEYS, each copying its own source object (S3 or GCS) at a distinct
    time; returns the events and, per destination key, every event's (time, digest)."""
    import datetime as dt

    sizes = [1 * KiB, 64 * KiB, 1 * MiB, 5 * MiB + 1, 11 * MiB]
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    events, by_key = [], {key: [] for key in RACE_KEYS}
    for i, offset in enumerate(rng.sample(range(100_000), n)):
        data = rng.randbytes(rng.choice(sizes))
        src = ("aws_s3", S3_SRC) if i % 2 else ("gcp_gcs", GCS_SRC)
        key = RACE_KEYS[rng.randrange(len(RACE_KEYS))]
        rig.put(*src, f"races/é-ключ-{i}", data)
        stamp = (base + dt.timedelta(seconds=offset)).isoformat().replace("+00:00", "Z")
        events.append(
            make_event((*src, f"races/é-ключ-{i}"), ("aws_s3", S3_DST, key), timestamp=stamp)
        )
        by_key[key].append((offset, sha(data)))
    return events, by_key


def campaign_races_cloud(size: str, work: Path) -> Result:
    n = 40 if size == "small" else 300
    rng = random.Random(71)
    with rig(seed=71, rates={}, with_pubsub=False) as r:
        root = work / "root"
        env = r.worker_env(root)
        queue, dlq = r.sqs_pair()
        events, by_key = plan_races(r, n, rng)
        duplicates = [e for e in events if rng.random() < 0.2]
        bodies = [body(e) for e in events + duplicates]
        rng.shuffle(bodies)
        known = {key: {digest for _, digest in versions} for key, versions in by_key.items()}
        args = ("--queue", queue, "--dead-letter", dlq, "--concurrency", "4")
        args += ("--part-size", str(5 * MiB), "--max-retries", "10")
        started = time.monotonic()
        with S3Watcher(r, S3_DST, known.get) as watcher:
            submit_to(root, env, queue, bodies)
            workers = [
                WorkerProcess(root, work / "logs", f"race-{i}", *args, env=env) for i in range(3)
            ]

            def settled() -> bool:
                attributes = r.sqs.get_queue_attributes(
                    QueueUrl=queue,
                    AttributeNames=[
                        "ApproximateNumberOfMessages",
                        "ApproximateNumberOfMessagesNotVisible",
                    ],
                )["Attributes"]
                return all(int(v) == 0 for v in attributes.values())

            with contextlib.suppress(TimeoutError):
                wait_until(settled, 300 if size == "small" else 1500, "queue drained", 1.0)
            for worker in workers:
                worker.stop(40)
        elapsed = time.monotonic() - started
        dead: list[dict[str, Any]] = []
        drain_sqs_dlq(r, dlq, dead)
        finals = {key: r.digest("aws_s3", S3_DST, key) for key in RACE_KEYS}
        open_uploads = r.s3.list_multipart_uploads(Bucket=S3_DST).get("Uploads", [])
    wrong = [
        f"{key} (newest of {len(versions)} is {max(versions)[1][:8]}, holds {str(finals[key])[:8]})"
        for key, versions in by_key.items()
        if versions and finals[key] != max(versions)[1]
    ]
    writes = sum(success_counts(workers).values())
    defects = []
    if wrong:
        defects.append(f"keys not holding their newest event's bytes: {wrong}")
    if watcher.bad:
        defects.append(f"visible bytes of no event: {watcher.bad[:5]}")
    if dead:
        defects.append(f"dead-lettered: {Counter(e.get('reason') for e in dead)}")
    if open_uploads:
        defects.append(f"{len(open_uploads)} multipart uploads left open")
    defects += internal_errors(workers)
    ok = not defects
    summary = (
        f"races-cloud[{size}]: {'PASS' if ok else 'FAIL'} {n} events (+{len(duplicates)} "
        f"duplicates) on {len(RACE_KEYS)} keys, 3 workers, {elapsed:.0f} s: {writes} writes, "
        f"{len(wrong)} keys not newest, {len(watcher.bad)} foreign versions seen "
        f"of {watcher.hashed}, "
        f"{len(dead)} dead-lettered, {len(open_uploads)} open uploads"
    )
    md = f"""## Events racing on a few keys, S3 destination (moto) ({size})

- Command: `python -m tests.campaigns.run --size {size} --only races-cloud`
- Size: {n} events, each its own source object (S3 and GCS sources, 1 KiB to 11 MiB, part size
  5 MiB), onto {len(RACE_KEYS)} S3 destination keys (accents, Cyrillic, CJK, emoji, `+`, `%`,
  `#`, `?`), at distinct random times, submitted in random order with {len(duplicates)} duplicate
  deliveries, 3 worker processes (concurrency 4 each) on one SQS queue. A watcher lists and
  hashes every destination version it can see.
- Result: **{"PASS" if ok else "FAIL"}** in {elapsed:.0f} s: {writes} destination writes;
  {len(wrong)} keys not holding their newest event's bytes at the end; {len(watcher.bad)} versions
  seen that are bytes of no event, of {watcher.hashed} hashed; {len(dead)} dead-lettered;
  {len(open_uploads)} multipart uploads left open.
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects)}
"""
    return Result("races-cloud", ok, summary, md, defects)


# =================================================================================================
# the AWS endpoint refusing connections mid-run
# =================================================================================================


def refuse_for(proxies: list[FaultProxy], seconds: float, upstream: str) -> None:
    """Stop every proxy (its port now refuses connections) for ``seconds``, then put a new one
    on each port, in place in ``proxies``."""
    ports = [int(p.url.rsplit(":", 1)[1]) for p in proxies]
    for proxy in proxies:
        proxy.stop()
    threading.Event().wait(seconds)
    proxies[:] = [FaultProxy(upstream, port=port, max_connections=128).start() for port in ports]


def campaign_outage_cloud(size: str, work: Path) -> Result:
    n, outages = (40, 1) if size == "small" else (300, 3)
    rng = random.Random(83)
    with rig(seed=83, rates={}, with_pubsub=False) as r:
        root = work / "root"
        sqs_proxy = FaultProxy(r.moto_url, max_connections=128).start()
        env = {**r.worker_env(root), "AWS_ENDPOINT_URL_SQS": sqs_proxy.url}
        queue, dlq = r.sqs_pair()
        planned = plan_events(r, n, _sizes("small"), rng, ("sqs",), "o")
        submit_to(root, env, queue, [body(p.event) for p in planned])
        port = free_port()
        args = ("--queue", queue, "--dead-letter", dlq, "--concurrency", "4")
        args += ("--backoff-initial", "0.5", "--backoff-max", "2", "--visibility-timeout", "10")
        worker = WorkerProcess(root, work / "logs", "outage", *args, http_port=port, env=env)
        proxies = [r.s3_proxy, sqs_proxy]
        started = time.monotonic()
        not_ready_seen = 0
        dead: list[dict[str, Any]] = []
        try:
            worker.wait_http(60)
            for number in range(outages):
                target = (number + 1) * n // (outages + 1)
                wait_until(
                    lambda target=target: len(verify(r, planned, dead)[0]["transferred"]) >= target,
                    300,
                    "transfers before the outage",
                    0.5,
                )
                outage = threading.Thread(target=refuse_for, args=(proxies, 8.0, r.moto_url))
                outage.start()
                while outage.is_alive():
                    not_ready_seen += worker.http("/ready")[0] == 503
                    threading.Event().wait(0.5)
            deadline = time.monotonic() + (300 if size == "small" else 1500)
            while time.monotonic() < deadline and worker.alive():
                drain_sqs_dlq(r, dlq, dead)
                if not verify(r, planned, dead)[0]["missing"]:
                    break
                threading.Event().wait(1.0)
            elapsed = time.monotonic() - started
            alive = worker.alive()
            metrics = worker.http("/metrics")[1].decode() if alive else ""
        finally:
            code = worker.stop(40)
            for proxy in proxies:
                proxy.stop()
        drain_sqs_dlq(r, dlq, dead)
        state, reasons = verify(r, planned, dead)
    queue_errors = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("queue_errors_total{")
    )
    streaks = [
        entry
        for entry in worker.logs()
        if str(entry.get("message")).startswith("Queue unreachable")
    ]
    defects = []
    if not alive or code != 0:
        defects.append(f"the worker did not ride out the outage (alive {alive}, exit {code})")
    if state["missing"] or state["corrupt"]:
        defects.append(f"lost {len(state['missing'])}, corrupt {len(state['corrupt'])}")
    if dead:
        defects.append(f"dead-lettered: {dict(reasons)}")
    if not not_ready_seen:
        defects.append("/ready never answered 503 during an outage")
    defects += internal_errors([worker])
    ok = not defects
    summary = (
        f"outage-cloud[{size}]: {'PASS' if ok else 'FAIL'} {n} events, {outages} x 8 s of "
        f"connection refused on S3 and SQS, {elapsed:.0f} s: transferred "
        f"{len(state['transferred'])}, dead-lettered {len(dead)}, lost {len(state['missing'])}; "
        f"worker alive {alive}, exit {code}; {len(streaks)} 'Queue unreachable' lines, "
        f"queue_errors_total {queue_errors:.0f}, /ready 503 seen {not_ready_seen} times"
    )
    md = f"""## The AWS endpoint refusing connections mid-run (SQS and S3) ({size})

- Command: `python -m tests.campaigns.run --size {size} --only outage-cloud`
- Size: {n} events (S3->GCS and GCS->S3, 1 KiB to 8 MiB) on one SQS queue (moto), one worker
  (concurrency 4, backoff 0.5 s to 2 s, visibility timeout 10 s). {outages} time(s) during the
  run, both the SQS and the S3 endpoint stop listening for 8 s (connection refused), then come
  back on the same ports.
- Result: **{"PASS" if ok else "FAIL"}** in {elapsed:.0f} s: transferred
  {len(state["transferred"])}, dead-lettered {len(dead)}, lost {len(state["missing"])}, corrupt
  {len(state["corrupt"])}; the worker stayed up (exit {code}); {len(streaks)} "Queue
  unreachable" line(s) (one per streak), `queue_errors_total` {queue_errors:.0f}, `/ready`
  answered 503 in {not_ready_seen} probes during the outages.
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects)}
"""
    return Result("outage-cloud", ok, summary, md, defects)


CLOUD_CAMPAIGNS: dict[str, Callable[[str, Path], Result]] = {
    "outage-cloud": campaign_outage_cloud,
    "races-cloud": campaign_races_cloud,
    "faults": campaign_faults,
    "scaleout-cloud": campaign_scaleout_cloud,
    "crashes-cloud": campaign_crashes_cloud,
    "drain-cloud": campaign_drain_cloud,
}
