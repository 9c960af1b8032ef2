"""Campaigns that run in local mode (filesystem buckets, SQLite queue), through the real CLI in
subprocesses: poison, drain, crashes, scale-out, source changes + checksum mismatch. Each returns a
Result (one summary line, a markdown section, pass/fail). Every wait is bounded; every process
started here is stopped here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tests.campaigns.common import (
    REPO,
    KiB,
    MiB,
    WorkerProcess,
    body,
    dlq_list,
    fmt_rate,
    fmt_seconds,
    free_port,
    make_event,
    put_local,
    sha,
    slo_figures,
    wait_until,
)

sys.path.insert(0, str(REPO))
import transfer_worker as tw

SRC_BUCKET = ("aws_s3", "campaign-src")
DST_BUCKET = ("gcp_gcs", "campaign-dst")
ALLOWED = "aws_s3:campaign-src,gcp_gcs:campaign-dst,aws_s3:campaign-dst2,gcp_gcs:campaign-src2"
KNOWN_REASONS = {
    "invalid_event",
    "invalid_key",
    "forbidden",
    "source_not_found",
    "access_denied",
    "checksum_mismatch",
    "destination_error",
    "retries_exhausted",
    "message_too_large",
}


@dataclasses.dataclass
class Result:
    name: str
    ok: bool
    summary: str
    markdown: str
    defects: list[str] = dataclasses.field(default_factory=list)


def queue_for(root: Path) -> tw.LocalQueue:
    return tw.LocalQueue(root / "queue.db")


def publish_all(root: Path, bodies: Iterable[bytes]) -> int:
    queue = queue_for(root)
    count = 0
    for raw in bodies:
        queue.publish(raw, priority=tw.peek_priority(raw))
        count += 1
    return count


def success_counts(workers: Iterable[WorkerProcess]) -> Counter[str]:
    """Destination writes per event id: 'Transfer completed successfully' lines in the logs."""
    counts: Counter[str] = Counter()
    for worker in workers:
        for line in worker.logs():
            if line.get("outcome") == "success" and line.get("event_id"):
                counts[line["event_id"]] += 1
    return counts


def settled_ids(workers: Iterable[WorkerProcess]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for worker in workers:
        for line in worker.logs():
            if line.get("outcome") in ("success", "skipped") and line.get("event_id"):
                counts[line["event_id"]] += 1
    return counts


def internal_errors(workers: Iterable[WorkerProcess]) -> list[str]:
    found = []
    for worker in workers:
        text = worker.stderr_path.read_text(errors="replace")
        if "Traceback" in text:
            found.append(f"{worker.name}: traceback on stderr: {text[-400:]!r}")
    return found


class Watcher:
    """Polls a destination directory and hashes every object it can see (once per version);
    records anything whose bytes are not the expected object's."""

    def __init__(self, directory: Path, expected: Callable[[str], set[str]]) -> None:
        self.directory, self.expected = directory, expected
        self.stop_event = threading.Event()
        self.seen: dict[str, tuple[int, int, int]] = {}
        self.hashed = 0
        self.bad: list[str] = []
        self.thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(30)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            self.scan()
            self.stop_event.wait(0.05)
        self.scan()

    def scan(self) -> None:
        if not self.directory.exists():
            return
        for path in self.directory.rglob("*"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                if not path.is_file():
                    continue
                key = str(path.relative_to(self.directory))
                version = (st.st_ino, st.st_size, st.st_mtime_ns)
                if self.seen.get(key) == version:
                    continue
                digest = sha(path.read_bytes())
                self.seen[key] = version
                self.hashed += 1
                if digest not in self.expected(key):
                    self.bad.append(f"{key}: sha256 {digest[:12]} size {st.st_size}")


# =================================================================================================
# poison
# =================================================================================================


def poison_messages(n: int, seed: int = 5) -> list[tuple[str, bytes, bool]]:
    """(category, body, must_dead_letter) for n messages drawn by hypothesis, derandomized."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    uuids = st.uuids().map(str)
    key_chars = st.characters(blacklist_categories=("Cs",))

    def event_doc(src_key: str, dst_key: str, **over: Any) -> dict[str, Any]:
        doc = make_event((*SRC_BUCKET, src_key), (*DST_BUCKET, dst_key))
        doc.update(over)
        return doc

    json_scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
    )
    wrong_types = st.builds(
        lambda field, value: (field, value),
        st.sampled_from(
            ["schemaVersion", "eventId", "correlationId", "timestamp", "source", "destination"]
        ),
        st.one_of(json_scalars, st.lists(json_scalars, max_size=3)),
    )
    traversal = st.sampled_from(
        ["../x", "a/../../x", "/abs", "a/./b", "..", ".", "a\\b", "x/..", "../../../../etc/passwd"]
    )
    unicode_key = st.text(key_chars, min_size=1, max_size=60)
    controls = st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=3)

    @st.composite
    def message(draw: Any) -> tuple[str, bytes, bool]:
        kind = draw(
            st.sampled_from(
                [
                    "valid",
                    "valid",
                    "valid",
                    "broken_json",
                    "not_utf8",
                    "not_object",
                    "wrong_type",
                    "missing_field",
                    "huge_field",
                    "huge_key",
                    "unicode_key",
                    "control_key",
                    "traversal_key",
                    "unknown_bucket",
                    "bad_version",
                    "bad_checksum_format",
                    "lone_surrogate",
                    "missing_source",
                ]
            )
        )
        dst = "p/" + draw(uuids)
        if kind == "valid":
            return kind, body(event_doc(draw(st.sampled_from(VALID_SOURCES)), dst)), False
        if kind == "broken_json":
            text = json.dumps(event_doc("v/a", dst))
            cut = draw(st.integers(1, len(text) - 1))
            junk = draw(st.text(st.sampled_from('{}[],:"\\'), max_size=3))
            return kind, (text[:cut] + junk).encode(), True
        if kind == "not_utf8":
            return kind, draw(st.binary(min_size=1, max_size=64)) + b"\xff\xfe", True
        if kind == "not_object":
            return (
                kind,
                json.dumps(draw(st.one_of(json_scalars, st.lists(json_scalars)))).encode(),
                True,
            )
        if kind == "wrong_type":
            field, value = draw(wrong_types)
            return kind, body(event_doc("v/a", dst, **{field: value})), True
        if kind == "missing_field":
            doc = event_doc("v/a", dst)
            doc.pop(draw(st.sampled_from(sorted(doc))))
            if "metadata" not in doc or len(doc) == 7:  # only metadata missing: still valid
                doc.pop("eventId", None)
            return kind, body(doc), True
        if kind == "huge_field":
            size = draw(st.sampled_from([300 * KiB, 1 * MiB]))
            return kind, body({**event_doc("v/a", dst), "pad": "x" * size}), True
        if kind == "huge_key":
            return kind, body(event_doc("v/a", "k" * draw(st.integers(1025, 5000)))), True
        if kind == "unicode_key":
            # may be valid (then it completes) or not (then it is dead-lettered): either is fine
            return (
                kind,
                body(event_doc(draw(st.sampled_from(VALID_SOURCES)), draw(unicode_key))),
                False,
            )
        if kind == "control_key":
            key = draw(st.text(max_size=5)) + draw(controls) + draw(st.text(max_size=5))
            return kind, body(event_doc("v/a", key)), True
        if kind == "traversal_key":
            side = draw(st.booleans())
            key = draw(traversal)
            return kind, body(event_doc(key, dst) if side else event_doc("v/a", key)), True
        if kind == "unknown_bucket":
            doc = event_doc("v/a", dst)
            doc["destination"]["bucket"] = "zz-" + draw(
                st.text("abcdefghij", min_size=3, max_size=10)
            )
            return kind, body(doc), True
        if kind == "bad_version":
            version = draw(st.sampled_from(["2.0.0", "0.9.0", "1", "1.0", "v1.0.0", ""]))
            return kind, body(event_doc("v/a", dst, schemaVersion=version)), True
        if kind == "bad_checksum_format":
            doc = event_doc("v/a", dst)
            doc["metadata"]["checksumSHA256"] = draw(st.text(max_size=70))
            return kind, body(doc), True
        if kind == "lone_surrogate":
            raw = body(event_doc("v/a", "SURROGATE")).replace(b"SURROGATE", b"bad\\ud800key")
            return kind, raw, True
        return kind, body(event_doc("v/missing-" + draw(uuids), dst)), True

    collected: list[tuple[str, bytes, bool]] = []

    @settings(
        max_examples=n,
        database=None,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(message())
    def collect(item: tuple[str, bytes, bool]) -> None:
        collected.append(item)

    collect()
    random.Random(seed).shuffle(collected)
    return collected[:n]


VALID_SOURCES = [f"v/src-{i}" for i in range(8)]


def campaign_poison(size: str, work: Path) -> Result:
    n = 150 if size == "small" else 1000
    root = work / "root"
    sources = {}
    for i, key in enumerate(VALID_SOURCES):
        data = os.urandom(1 * KiB * (1 + i * 7))
        sources[key] = sha(data)
        put_local(root, *SRC_BUCKET, key, data)
    put_local(root, *SRC_BUCKET, "v/a", b"a")
    messages = poison_messages(n)
    publish_all(root, (raw for _, raw, _ in messages))
    port = free_port()
    started = time.monotonic()
    worker = WorkerProcess(
        root,
        work / "logs",
        "poison",
        "--allowed-buckets",
        ALLOWED,
        "--concurrency",
        "4",
        http_port=port,
    )
    defects: list[str] = []
    stalled = False
    try:
        worker.wait_http(60)
        queue = queue_for(root)
        last_depth, last_change = queue.depth(), time.monotonic()
        deadline = time.monotonic() + (120 if size == "small" else 600)
        while queue.depth() > 0 or int(float(_in_flight(worker))) > 0:
            depth = queue.depth()
            if depth != last_depth:
                last_depth, last_change = depth, time.monotonic()
            if time.monotonic() - last_change > 30 or time.monotonic() > deadline:
                stalled = True
                break
            if not worker.alive():
                break
            threading.Event().wait(0.2)
        elapsed = time.monotonic() - started
        health = worker.http("/health")[0]
        metrics_text = worker.http("/metrics")[1].decode()
        alive = worker.alive()
    finally:
        code = worker.stop()
    envelopes = dlq_list(root)
    dead = Counter(tw.envelope_body(e) for e in envelopes)
    reasons = Counter(e["reason"] for e in envelopes)
    completed = settled_ids([worker])
    by_kind: dict[str, Counter[str]] = {}
    lost = 0
    bad_not_dead = 0
    valid_not_completed = 0
    for kind, raw, must_dead_letter in messages:
        tally = by_kind.setdefault(kind, Counter())
        tally["n"] += 1
        event_id = _event_id(raw)
        if dead[raw] > 0:
            dead[raw] -= 1
            tally["dead_lettered"] += 1
            continue
        if event_id and completed.get(event_id):
            tally["completed"] += 1
            if must_dead_letter:
                bad_not_dead += 1
                defects.append(
                    f"{kind} message completed instead of being dead-lettered: {raw[:120]!r}"
                )
            continue
        lost += 1
        tally["lost"] += 1
        defects.append(f"{kind} message neither completed nor dead-lettered: {raw[:120]!r}")
    for kind, raw, _ in messages:
        if kind == "valid" and not completed.get(_event_id(raw) or ""):
            valid_not_completed += 1
    unknown_reasons = {r: c for r, c in reasons.items() if r not in KNOWN_REASONS}
    if unknown_reasons:
        defects.append(f"dead-letter reasons outside the documented set: {unknown_reasons}")
    if stalled:
        defects.append(
            "the worker stalled (queue depth unchanged for 30 s) or ran past the deadline"
        )
    if not alive or code != 0:
        defects.append(f"the worker died or exited {code}")
    defects += internal_errors([worker])
    ok = not defects and valid_not_completed == 0 and health == 200
    kinds = ", ".join(f"{k} {v['n']}" for k, v in sorted(by_kind.items()))
    slo = slo_figures(metrics_text)
    completed_n = sum(1 for _, r, b in messages if not b and completed.get(_event_id(r) or ""))
    summary = (
        f"poison[{size}]: {'PASS' if ok else 'FAIL'} {n} messages in {elapsed:.1f} s: "
        f"{sum(reasons.values())} dead-lettered, {completed_n} completed, "
        f"{lost} lost, valid not completed {valid_not_completed}, reasons {dict(reasons)}"
    )
    md = f"""## Poison ({size})

- Command: `python -m tests.campaigns.run --size {size} --only poison`
- Size: {n} messages drawn by hypothesis (derandomized), one worker, concurrency 4, local mode.
- Mix: {kinds}.
- Result: **{"PASS" if ok else "FAIL"}** in {elapsed:.1f} s. Dead-lettered {sum(reasons.values())},
  lost {lost}, bad messages that completed {bad_not_dead}, valid messages not completed
  {valid_not_completed}; worker alive to the end: {alive}, exit code {code}, /health {health}.
- Dead-letter reasons: {dict(sorted(reasons.items()))}.
- /metrics: success {slo["success"]}, failure {slo["failure"]}, P99 {fmt_seconds(slo["p99"])}.
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects[:10])}
"""
    return Result("poison", ok, summary, md, defects)


def _in_flight(worker: WorkerProcess) -> str:
    for line in worker.http("/metrics")[1].decode().splitlines():
        if line.startswith("transfers_in_flight "):
            return line.split()[1]
    return "0"


def _event_id(raw: bytes) -> str | None:
    with contextlib.suppress(Exception):
        value = json.loads(raw)["eventId"]
        return value.lower() if isinstance(value, str) else None
    return None


# =================================================================================================
# drain
# =================================================================================================


def campaign_drain(size: str, work: Path) -> Result:
    n = 24 if size == "small" else 200
    drain_timeout = 2
    rng = random.Random(3)
    root = work / "root"
    expected: dict[str, str] = {}
    events = []
    for i in range(n):
        data = os.urandom(rng.choice([256 * KiB, 1 * MiB, 2 * MiB, 4 * MiB]))
        put_local(root, *SRC_BUCKET, f"d/{i}", data)
        expected[f"d/{i}"] = sha(data)
        events.append(make_event((*SRC_BUCKET, f"d/{i}"), (*DST_BUCKET, f"d/{i}")))
    publish_all(root, (body(e) for e in events))
    slow_env = {"TEST_CHUNK_DELAY": "0.06", "TEST_CHUNK_SIZE": str(64 * KiB)}
    first = WorkerProcess(
        root,
        work / "logs",
        "drain-first",
        "--concurrency",
        "4",
        "--drain-timeout",
        str(drain_timeout),
        slow=True,
        env=slow_env,
    )
    dst = root / DST_BUCKET[0] / DST_BUCKET[1]
    with Watcher(dst, lambda key: {expected.get(key, "?")}) as watcher:
        try:
            wait_until(lambda: _count_files(dst) >= max(2, n // 6), 120, "a quarter of the load")
            signalled = time.monotonic()
            first.terminate()
            code_first = first.wait(drain_timeout + 30)
            drain_seconds = time.monotonic() - signalled
        finally:
            if first.alive():
                first.kill()
        done_before = _count_files(dst)
        released = sum(
            1
            for line in first.logs()
            if line.get("message", "").startswith("Drain timeout passed")
            for _ in range(int(line.get("count", 0)))
        )
        interrupted = sum(1 for line in first.logs() if line.get("outcome") == "released")
        second = WorkerProcess(root, work / "logs", "drain-second", "--once", "--concurrency", "4")
        code_second = second.wait(300)
        if code_second is None:
            second.kill()
    results = {k: sha((dst / k).read_bytes()) for k in expected if (dst / k).exists()}
    lost = [k for k in expected if k not in results]
    corrupt = [k for k in results if results[k] != expected[k]]
    dead = dlq_list(root)
    depth = queue_for(root).depth()
    writes = success_counts([first, second])
    duplicates = {k: v for k, v in writes.items() if v > 1}
    defects = []
    if lost:
        defects.append(f"lost: {lost}")
    if corrupt or watcher.bad:
        defects.append(f"corrupt: {corrupt} visible: {watcher.bad[:5]}")
    if dead:
        defects.append(f"dead-lettered: {[e['reason'] for e in dead]}")
    if code_first != 0 or code_second != 0:
        defects.append(f"exit codes {code_first}, {code_second}")
    if drain_seconds > drain_timeout + 5:
        defects.append(f"drain took {drain_seconds:.1f} s with --drain-timeout {drain_timeout}")
    defects += internal_errors([first, second])
    ok = not defects and depth == 0
    summary = (
        f"drain[{size}]: {'PASS' if ok else 'FAIL'} {n} events, SIGTERM after {done_before} done: "
        f"drained in {drain_seconds:.2f} s (timeout {drain_timeout} s), {released} handed back at "
        f"the timeout, {interrupted} released from backoff, next worker completed the rest; "
        f"lost {len(lost)}, corrupt {len(corrupt)}, duplicates {len(duplicates)}"
    )
    md = f"""## Drain ({size})

- Command: `python -m tests.campaigns.run --size {size} --only drain`
- Size: {n} events of 256 KiB to 4 MiB, local mode; the first worker reads 64 KiB every 60 ms
  (`tests/slow_worker.py`) with concurrency 4 and `--drain-timeout {drain_timeout}`, gets SIGTERM
  once a sixth of the load is written; a second worker (`run --once`) takes over.
- Result: **{"PASS" if ok else "FAIL"}**. Exit codes {code_first} / {code_second}; time from SIGTERM
  to exit {drain_seconds:.2f} s; {done_before} objects written before the second worker;
  {released} transfers handed back at the drain timeout and completed by the next worker.
- Lost {len(lost)}, corrupt {len(corrupt)}, partial or wrong objects ever visible
  {len(watcher.bad)} ({watcher.hashed} versions hashed), dead-lettered {len(dead)}, queue depth at
  the end {depth}, events written twice {len(duplicates)}.
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects)}
"""
    return Result("drain", ok, summary, md, defects)


def _count_files(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.is_file()) if directory.exists() else 0


# =================================================================================================
# crashes
# =================================================================================================


def campaign_crashes(size: str, work: Path) -> Result:
    k = 4 if size == "small" else 20
    max_kills = 8 if size == "small" else 40
    rng = random.Random(11)
    root = work / "root"
    expected: dict[str, str] = {}
    events = []
    sizes_seen: list[int] = []
    for i in range(k):
        mib = rng.choice([8, 12, 16, 24, 32] if size == "full" else [6, 8, 12])
        data = os.urandom(mib * MiB)
        sizes_seen.append(len(data))
        put_local(root, *SRC_BUCKET, f"c/{i}", data)
        expected[f"c/{i}"] = sha(data)
        events.append(make_event((*SRC_BUCKET, f"c/{i}"), (*DST_BUCKET, f"c/{i}"), maxRetries=10))
    publish_all(root, (body(e) for e in events))
    slow_env = {"TEST_CHUNK_DELAY": "0.01", "TEST_CHUNK_SIZE": str(64 * KiB)}
    args = ("--concurrency", "2", "--visibility-timeout", "3", "--max-retries", "10")
    dst = root / DST_BUCKET[0] / DST_BUCKET[1]
    workers: list[WorkerProcess] = []
    kills = 0
    kills_mid_transfer = 0
    started = time.monotonic()
    deadline = started + (240 if size == "small" else 1200)
    with Watcher(dst, lambda key: {expected.get(key, "?")}) as watcher:
        while _count_files(dst) < k and kills < max_kills and time.monotonic() < deadline:
            worker = WorkerProcess(
                root, work / "logs", f"crash-{len(workers)}", *args, slow=True, env=slow_env
            )
            workers.append(worker)
            threading.Event().wait(rng.uniform(0.8, 3.5))
            temp_files = list((root / ".tmp").glob("upload-*")) if (root / ".tmp").exists() else []
            if worker.alive():
                worker.kill()
                worker.wait(10)
                kills += 1
                kills_mid_transfer += 1 if temp_files else 0
        final = WorkerProcess(root, work / "logs", "crash-final", "--once", *args)
        workers.append(final)
        code = final.wait(max(30.0, deadline - time.monotonic()))
        if code is None:
            final.kill()
        # messages of killed workers become visible after the 3 s visibility timeout
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: _count_files(dst) >= k, 5, "all objects")
        if _count_files(dst) < k and queue_for(root).depth() > 0:
            again = WorkerProcess(root, work / "logs", "crash-final-2", "--once", *args)
            workers.append(again)
            threading.Event().wait(4)
            again.wait(120)
    elapsed = time.monotonic() - started
    results = {key: sha((dst / key).read_bytes()) for key in expected if (dst / key).exists()}
    lost = [key for key in expected if key not in results]
    corrupt = [key for key in results if results[key] != expected[key]]
    orphans = list((root / ".tmp").glob("upload-*")) if (root / ".tmp").exists() else []
    dead = dlq_list(root)
    defects = []
    if lost:
        defects.append(f"lost: {lost}")
    if corrupt or watcher.bad:
        defects.append(f"corrupt: {corrupt}; visible partial/wrong: {watcher.bad[:5]}")
    if dead:
        defects.append(f"dead-lettered: {[e['reason'] for e in dead]}")
    ok = not defects
    sizes_text = ", ".join(sorted({f"{length // MiB} MiB" for length in sizes_seen}))
    summary = (
        f"crashes[{size}]: {'PASS' if ok else 'FAIL'} {k} large transfers, {kills} kill -9 "
        f"({kills_mid_transfer} with an upload in progress), {len(workers)} worker starts in "
        f"{elapsed:.1f} s: lost {len(lost)}, corrupt {len(corrupt)}, partial/wrong visible "
        f"{len(watcher.bad)} of {watcher.hashed} versions hashed, temp files left {len(orphans)}"
    )
    md = f"""## Crashes ({size})

- Command: `python -m tests.campaigns.run --size {size} --only crashes`
- Size: {k} transfers of {sizes_text},
  local mode, concurrency 2, visibility timeout 3 s, maxRetries 10; each worker reads 64 KiB every
  10 ms and is killed with SIGKILL after a random 0.8-3.5 s, then a new one starts; a watcher
  thread hashes every object version visible in the destination bucket every 50 ms.
- Result: **{"PASS" if ok else "FAIL"}** in {elapsed:.1f} s: {kills} kills ({kills_mid_transfer}
  with an upload temp file present), {len(workers)} worker starts. Lost {len(lost)}, corrupt
  {len(corrupt)}, partial or wrong objects ever visible {len(watcher.bad)} ({watcher.hashed}
  versions hashed), dead-lettered {len(dead)}.
- Orphans: {len(orphans)} upload temp files of killed workers left in `<root>/.tmp` (local mode's
  counterpart of an unfinished multipart upload; by design they are swept at start-up once older
  than max(1 h, 2 x visibility timeout), so a quick restart leaves them).
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects)}
"""
    return Result("crashes", ok, summary, md, defects)


# =================================================================================================
# scale-out
# =================================================================================================


def campaign_scaleout(size: str, work: Path) -> Result:
    n = 200 if size == "small" else 2000
    rng = random.Random(17)
    runs = {}
    defects = []
    for processes in (3, 1):
        root = work / f"root-{processes}"
        events = []
        for i in range(n):
            data = os.urandom(rng.choice([1, 4, 16, 64]) * KiB)
            put_local(root, *SRC_BUCKET, f"s/{i}", data)
            events.append(make_event((*SRC_BUCKET, f"s/{i}"), (*DST_BUCKET, f"s/{i}")))
        publish_all(root, (body(e) for e in events))
        started = time.monotonic()
        workers = [
            WorkerProcess(
                root, work / "logs", f"scale{processes}-{i}", "--once", "--concurrency", "4"
            )
            for i in range(processes)
        ]
        codes = [w.wait(600) for w in workers]
        elapsed = time.monotonic() - started
        for w in workers:
            if w.alive():
                w.kill()
        writes = success_counts(workers)
        ids = {e["eventId"] for e in events}
        missing = ids - set(writes)
        dupes = {k: v for k, v in writes.items() if v > 1}
        per_worker = [sum(success_counts([w]).values()) for w in workers]
        dead = dlq_list(root)
        if missing or dead or any(c != 0 for c in codes):
            defects.append(
                f"{processes} proc: missing {len(missing)}, dead {len(dead)}, codes {codes}"
            )
        if dupes:
            defects.append(f"{processes} proc: events written more than once: {len(dupes)}")
        defects += internal_errors(workers)
        runs[processes] = {
            "elapsed": elapsed,
            "rate": n / elapsed,
            "missing": len(missing),
            "dupes": len(dupes),
            "per_worker": per_worker,
            "writes": sum(writes.values()),
        }
    ok = not defects
    r3, r1 = runs[3], runs[1]
    summary = (
        f"scale-out[{size}]: {'PASS' if ok else 'FAIL'} {n} events: "
        f"3 processes {r3['elapsed']:.1f} s "
        f"({r3['rate']:.0f}/s, split {r3['per_worker']}), 1 process {r1['elapsed']:.1f} s "
        f"({r1['rate']:.0f}/s), speed-up x{r3['rate'] / r1['rate']:.2f}; missing "
        f"{r3['missing']}+{r1['missing']}, written twice {r3['dupes']}+{r1['dupes']}"
    )
    md = f"""## Scale-out, local SQLite queue ({size})

- Command: `python -m tests.campaigns.run --size {size} --only scaleout`
- Size: {n} events of 1-64 KiB on one SQLite queue; 3 worker processes (`run --once`,
  concurrency 4 each), then the same load on a fresh root with 1 process. Time includes process
  start-up (about 0.5 s) and ends when every process has exited.
- Result: **{"PASS" if ok else "FAIL"}**. 3 processes: {r3["elapsed"]:.1f} s, {r3["rate"]:.0f}
  events/s, events per process {r3["per_worker"]}, destination writes {r3["writes"]} for {n}
  events, events written more than once {r3["dupes"]}, missing {r3["missing"]}. 1 process:
  {r1["elapsed"]:.1f} s, {r1["rate"]:.0f} events/s. Throughput x{r3["rate"] / r1["rate"]:.2f} with 3
  processes on {os.cpu_count()} CPUs (SQLite's single writer lock serialises receive/ack).
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects)}
"""
    return Result("scaleout", ok, summary, md, defects)


# =================================================================================================
# source changes and checksum mismatch under load
# =================================================================================================


def campaign_changes(size: str, work: Path) -> Result:
    n = 40 if size == "small" else 300
    rng = random.Random(23)
    root = work / "root"
    plans: dict[str, dict[str, Any]] = {}
    events = []
    for i in range(n):
        key = f"m/{i}"
        data = os.urandom(rng.choice([512 * KiB, 1 * MiB, 2 * MiB]))
        put_local(root, *SRC_BUCKET, key, data)
        role = rng.choice(["plain", "plain", "change", "change", "mismatch", "checksum_ok"])
        plan = {"role": role, "versions": {sha(data)}, "size": len(data)}
        checksum = None
        if role == "mismatch":
            checksum = sha(data + b"!")
        elif role == "checksum_ok":
            checksum = sha(data)
        plans[key] = plan
        events.append(make_event((*SRC_BUCKET, key), (*DST_BUCKET, key), checksum=checksum))
    publish_all(root, (body(e) for e in events))
    port = free_port()
    slow_env = {"TEST_CHUNK_DELAY": "0.01", "TEST_CHUNK_SIZE": str(64 * KiB)}
    worker = WorkerProcess(
        root,
        work / "logs",
        "changes",
        "--concurrency",
        "4",
        "--max-retries",
        "5",
        http_port=port,
        slow=True,
        env={**slow_env, "TRANSFER_WORKER_BACKOFF_INITIAL": "0.2"},
    )
    changing = [k for k, p in plans.items() if p["role"] == "change"]
    changes_made = 0
    dst = root / DST_BUCKET[0] / DST_BUCKET[1]
    lock = threading.Lock()

    def versions(key: str) -> set[str]:
        with lock:
            return set(plans.get(key, {}).get("versions", set()))

    started = time.monotonic()
    with Watcher(dst, versions) as watcher:
        try:
            worker.wait_http(60)
            # rewrite each "change" source in place once, at a random moment of the run
            schedule = sorted((rng.uniform(0.0, max(2.0, n * 0.08)), key) for key in changing)
            for at, key in schedule:
                threading.Event().wait(max(0.0, at - (time.monotonic() - started)))
                path = root / SRC_BUCKET[0] / SRC_BUCKET[1] / key
                with open(path, "r+b") as handle:
                    handle.seek(plans[key]["size"] // 2)
                    handle.write(os.urandom(4096))
                with lock:
                    plans[key]["versions"].add(sha(path.read_bytes()))
                changes_made += 1
            wait_until(
                lambda: queue_for(root).depth() == 0 and _in_flight(worker) in ("0.0", "0"),
                300,
                "queue empty",
            )
            metrics_text = worker.http("/metrics")[1].decode()
        finally:
            code = worker.stop()
    elapsed = time.monotonic() - started
    dead = {tw.envelope_body(e): e["reason"] for e in dlq_list(root)}
    reasons = Counter(dead.values())
    samples_retry = [
        line for line in metrics_text.splitlines() if line.startswith("retry_count_total{")
    ]
    source_changed_retries = sum(
        float(line.split()[-1]) for line in samples_retry if 'reason="source_changed"' in line
    )
    defects = []
    outcome: Counter[str] = Counter()
    for event in events:
        key = event["source"]["key"]
        plan = plans[key]
        raw = body(event)
        target = dst / key
        if plan["role"] == "mismatch":
            if dead.get(raw) != "checksum_mismatch" or target.exists():
                defects.append(
                    f"{key}: mismatch not dead-lettered as checksum_mismatch ({dead.get(raw)})"
                )
            outcome["mismatch dead-lettered"] += 1
            continue
        if not target.exists():
            defects.append(f"{key} ({plan['role']}): no destination; dead-letter {dead.get(raw)}")
            continue
        digest = sha(target.read_bytes())
        if digest not in plan["versions"]:
            defects.append(f"{key} ({plan['role']}): destination matches no source version")
        final = sha((root / SRC_BUCKET[0] / SRC_BUCKET[1] / key).read_bytes())
        outcome[f"{plan['role']} -> {'final' if digest == final else 'earlier'} version"] += 1
    if watcher.bad:
        defects.append(f"partial/wrong visible: {watcher.bad[:5]}")
    if code != 0:
        defects.append(f"exit code {code}")
    defects += internal_errors([worker])
    slo = slo_figures(metrics_text)
    ok = not defects
    summary = (
        f"changes[{size}]: {'PASS' if ok else 'FAIL'} {n} events in {elapsed:.1f} s, "
        f"{changes_made} sources rewritten mid-run, "
        f"{int(source_changed_retries)} source_changed retries, "
        f"{reasons.get('checksum_mismatch', 0)} checksum_mismatch dead-lettered; wrong objects "
        f"visible {len(watcher.bad)}, defects {len(defects)}"
    )
    md = f"""## Source changes mid-transfer and checksum mismatch under load ({size})

- Command: `python -m tests.campaigns.run --size {size} --only changes`
- Size: {n} events of 512 KiB to 2 MiB, one worker (concurrency 4, 64 KiB read every 10 ms,
  backoff 0.2 s, --max-retries 5); {len(changing)} sources rewritten in place (4 KiB in the
  middle) at random moments; {sum(1 for p in plans.values() if p["role"] == "mismatch")} events
  carry a wrong checksumSHA256, {sum(1 for p in plans.values() if p["role"] == "checksum_ok")} a
  right one.
- Result: **{"PASS" if ok else "FAIL"}** in {elapsed:.1f} s.
  Outcomes: {dict(sorted(outcome.items()))}.
  Retries for source_changed (from /metrics): {int(source_changed_retries)}; dead-letter reasons
  {dict(reasons)}; objects that matched no source version, or partial, ever visible:
  {len(watcher.bad)} ({watcher.hashed} versions hashed).
  Success rate {fmt_rate(slo["success_rate"])}
  (the deliberate mismatches count as failures), P99 {fmt_seconds(slo["p99"])}.
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:300] for d in defects[:10])}
"""
    return Result("changes", ok, summary, md, defects)


def campaign_model(size: str, work: Path) -> Result:
    """The model test (tests/test_model.py) with many more examples than make test runs: random
    interleavings of deliveries, kills, lapsed leases, duplicates and transient errors."""
    examples = 300 if size == "small" else 3000
    env = {**os.environ, "TW_MODEL_EXAMPLES": str(examples)}
    test = str(Path(__file__).resolve().parents[1] / "test_model.py")
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    took = time.monotonic() - started
    ok = run.returncode == 0
    tail = run.stdout.strip().splitlines()[-1:] or ["no output"]
    defects = [] if ok else [run.stdout[-3000:]]
    summary = f"model[{size}]: {'PASS' if ok else 'FAIL'} {examples} examples, {tail[0]}"
    md = f"""## Model: random interleavings against the promises ({size})

- Command: `TW_MODEL_EXAMPLES={examples} python -m pytest tests/test_model.py`
  (or `python -m tests.campaigns.run --size {size} --only model`).
- What it does: a hypothesis state machine drives the real worker, engine, SQLite queue and local
  stores; deliveries stop at every chunk and the machine interleaves them, kills them, lets leases
  lapse (a second delivery while the first runs), delivers duplicates and injects transient store
  errors. Checked after every step: no destination file holds bytes of no event. At the end: each
  key holds its newest event's bytes, every message was acknowledged, nothing dead-lettered, no
  upload file left.
- Result: {"PASS" if ok else "FAIL"}, {examples} examples of up to 25 steps in {took:.0f} s.
- Defects: {len(defects)}{"".join(chr(10) + "  - " + d[:1500] for d in defects)}
"""
    return Result("model", ok, summary, md, defects)


LOCAL_CAMPAIGNS: dict[str, Callable[[str, Path], Result]] = {
    "poison": campaign_poison,
    "drain": campaign_drain,
    "crashes": campaign_crashes,
    "scaleout": campaign_scaleout,
    "changes": campaign_changes,
    "model": campaign_model,
}
