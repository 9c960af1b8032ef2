"""A model of the promises, checked with random interleavings (issue 11, item 7).

A hypothesis state machine drives the real Worker, TransferEngine, LocalQueue and local stores.
Each event copies its own source object (fixed bytes) to one of two destination keys, at a
timestamp of its own. Deliveries run on threads that stop at every chunk of the source they read,
and the machine decides who moves next: it starts deliveries, moves one a chunk at a time or to its
end, kills one (it stops where it is and settles nothing, as a killed process would), lets a lease
lapse so the message is delivered again while the first delivery still runs, delivers duplicates,
and makes the next requests of a store fail transiently. Commits race each other whenever two
deliveries of one key overlap, so conditional commits are refused and re-planned.

After every step, every destination file holds exactly the bytes of one event (no reader ever sees
a partial object). When everything has settled: every key holds the bytes of its newest event,
every message was acknowledged (nothing is dead-lettered: the budget is larger than the faults the
machine injects), and no upload file is left behind.

``TW_MODEL_EXAMPLES`` sets the number of examples (a longer run in the campaigns).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

import transfer_worker as tw
from conftest import Clock

KEYS = ("k0", "k1")
CHUNK = 4  # bytes per source read: objects of a few chunks give many interleaving points
VISIBILITY = 30.0
WAIT = 10.0  # seconds a step waits for a delivery thread to reach its next stop (never hit)
EXAMPLES = int(os.environ.get("TW_MODEL_EXAMPLES", "30"))


class Killed(BaseException):
    """Raised at a delivery's stop: nothing below catches a BaseException but the engine's abort,
    so the delivery ends unsettled, as a killed worker's would."""


class Delivery:
    """One delivery of one message on its own thread, stopping before every source chunk."""

    def __init__(self, worker: tw.Worker, message: tw.Message, event_index: int) -> None:
        self.message, self.event_index = message, event_index
        self.go = threading.Semaphore(0)
        self.stopped = threading.Event()  # at a stop, or finished
        self.free = False  # runs to its end without stopping
        self.kill = False
        self.done = False
        self.thread = threading.Thread(target=self._run, args=(worker,), daemon=True)

    def start(self) -> None:
        self.thread.start()
        self._wait_stopped()

    def _run(self, worker: tw.Worker) -> None:
        GATE.delivery = self
        try:
            worker.handle(self.message)
        except Killed:
            pass
        finally:
            self.done = True
            self.stopped.set()

    def stop_here(self) -> None:
        """Called by the source store before each chunk, on this delivery's thread."""
        if self.free:
            return
        self.stopped.set()
        self.go.acquire()
        if self.kill:
            raise Killed()

    def step(self, *, kill: bool = False, to_end: bool = False) -> None:
        self.kill, self.free = kill, to_end
        self.stopped.clear()
        self.go.release()
        self._wait_stopped()

    def _wait_stopped(self) -> None:
        assert self.stopped.wait(WAIT), "a delivery did not reach its next stop"
        if to_end_requested(self):
            self.thread.join(WAIT)


def to_end_requested(delivery: Delivery) -> bool:
    return delivery.free or delivery.kill


class _Gate(threading.local):
    delivery: Delivery | None = None


GATE = _Gate()


class GatedStore:
    """The real local store; reads stop at the current thread's delivery before each chunk, and
    the next ``failures`` heads fail as a throttled service would."""

    def __init__(self, inner: tw.LocalObjectStore) -> None:
        self.inner = inner
        self.late_metadata_limit = inner.late_metadata_limit
        self.failures = 0
        self.lock = threading.Lock()

    def head(self, ref: tw.ObjectRef) -> tw.ObjectInfo | None:
        with self.lock:
            fail, self.failures = self.failures > 0, max(0, self.failures - 1)
        if fail:
            raise tw.RetryableError("503 SlowDown (injected)", reason="throttled")
        return self.inner.head(ref)

    def open_read(self, ref: tw.ObjectRef, info: tw.ObjectInfo) -> Any:
        return GatedRead(self.inner.open_read(ref, info))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class GatedRead:
    """A store's read whose chunks stop at the current thread's delivery."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __enter__(self) -> Iterator[bytes]:
        return self._chunks(self.inner.__enter__())

    def __exit__(self, *exc: Any) -> Any:
        return self.inner.__exit__(*exc)

    @staticmethod
    def _chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if GATE.delivery is not None:
                GATE.delivery.stop_here()
            yield chunk


class Promises(RuleBasedStateMachine):
    events = Bundle("events")

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="tw-model-"))
        self.clock = Clock()
        config = tw.Config(local_root=str(self.root), http_port=0, max_retries=10)
        self.queue = tw.LocalQueue(
            self.root / "queue.db", clock=self.clock, visibility_timeout=VISIBILITY
        )
        stores = tw.build_stores(config)
        for store in stores.values():
            store.chunk_size = CHUNK  # type: ignore[attr-defined]
        self.stores = {name: GatedStore(store) for name, store in stores.items()}  # type: ignore[arg-type]
        self.worker = tw.Worker(
            config,
            self.queue,
            tw.TransferEngine(self.stores, overwrite="different"),  # type: ignore[arg-type]
            tw.Metrics(),
            tw.make_logger("WARNING", io.StringIO()),
            clock=self.clock,
            sleep=lambda seconds: None,
        )
        self.sent: list[dict[str, Any]] = []  # index -> event document
        self.data: list[bytes] = []
        self.running: list[Delivery] = []
        self.timestamps: set[int] = set()
        self.injected = 0
        self.lapses = 0

    # -- rules ------------------------------------------------------------------------------------

    @rule(
        target=events,
        key=st.sampled_from(KEYS),
        minute=st.integers(0, 1000),
        size=st.integers(0, 3 * CHUNK),
    )
    def publish(self, key: str, minute: int, size: int) -> int:
        while minute in self.timestamps:  # distinct times: "newest" is then well defined
            minute += 1
        self.timestamps.add(minute)
        index = len(self.sent)
        data = os.urandom(size)
        (self.root / "aws_s3" / "src").mkdir(parents=True, exist_ok=True)
        (self.root / "aws_s3" / "src" / f"e{index}").write_bytes(data)
        document = event_document(index, key, minute)
        self.sent.append(document)
        self.data.append(data)
        self.queue.publish(json.dumps(document).encode())
        return index

    @rule(index=events)
    def publish_duplicate(self, index: int) -> None:
        self.queue.publish(json.dumps(self.sent[index]).encode())

    @precondition(lambda self: len(self.running) < 4)
    @rule()
    def deliver(self) -> None:
        for message in self.queue.receive(1, 0):
            index = json.loads(message.body)["index"]
            delivery = Delivery(self.worker, message, index)
            delivery.start()
            self._keep(delivery)

    @precondition(lambda self: self.running)
    @rule(which=st.integers(0, 3), to_end=st.booleans())
    def step(self, which: int, to_end: bool) -> None:
        delivery = self.running[which % len(self.running)]
        delivery.step(to_end=to_end)
        self._forget_finished()

    @precondition(lambda self: self.running)
    @rule(which=st.integers(0, 3))
    def kill(self, which: int) -> None:
        delivery = self.running[which % len(self.running)]
        delivery.step(kill=True)
        self._forget_finished()

    @precondition(lambda self: self.lapses < 3)  # with the faults, inside the attempt budget
    @rule()
    def lease_lapses(self) -> None:
        """Everything received becomes visible again: running deliveries are now stale ones."""
        self.clock.now += VISIBILITY + 1
        self.lapses += 1

    @precondition(lambda self: self.injected < 5)  # inside the attempt budget: none dead-letters
    @rule(failures=st.integers(1, 2), provider=st.sampled_from(tw.PROVIDERS))
    def store_fails_transiently(self, failures: int, provider: str) -> None:
        self.stores[provider].failures += failures
        self.injected += failures

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def no_partial_or_foreign_object_is_visible(self) -> None:
        everything = set(self.data)
        for key in KEYS:
            path = self.root / "gcp_gcs" / "dst" / key
            if path.exists():
                assert path.read_bytes() in everything, f"{key} holds bytes of no event"

    # -- the end ----------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self._settle()
            self._check_settled()
        finally:
            for delivery in self.running:
                delivery.step(kill=True)
            shutil.rmtree(self.root, ignore_errors=True)

    def _settle(self) -> None:
        for delivery in list(self.running):
            delivery.step(to_end=True)
        self.running = []
        for store in self.stores.values():
            store.failures = 0
        for _ in range(4 * len(self.sent) + 4):
            self.clock.now += VISIBILITY + 1
            messages = self.queue.receive(10, 0)
            if not messages and self.queue.depth() == 0:
                return
            for message in messages:
                delivery = Delivery(self.worker, message, -1)
                delivery.free = True
                delivery.start()

    def _check_settled(self) -> None:
        assert self.queue.depth() == 0, "a message was neither acknowledged nor dead-lettered"
        assert self.queue.dead_letters() == [], self.queue.dead_letters()
        for key in KEYS:
            mine = [i for i, doc in enumerate(self.sent) if doc["destination"]["key"] == key]
            path = self.root / "gcp_gcs" / "dst" / key
            if not mine:
                assert not path.exists()
                continue
            newest = max(mine, key=lambda i: self.sent[i]["timestamp"])
            assert path.read_bytes() == self.data[newest], f"{key}: not the newest event's bytes"
        leftovers = list((self.root / ".tmp").glob("upload-*"))
        assert leftovers == [], f"uploads left open: {leftovers}"

    def _keep(self, delivery: Delivery) -> None:
        if not delivery.done:
            self.running.append(delivery)

    def _forget_finished(self) -> None:
        self.running = [d for d in self.running if not d.done]


def event_document(index: int, key: str, minute: int) -> dict[str, Any]:
    hours, minutes = divmod(minute, 60)
    return {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": f"2026-01-{1 + hours // 24:02d}T{hours % 24:02d}:{minutes:02d}:00Z",
        "source": {"provider": "aws_s3", "bucket": "src", "key": f"e{index}"},
        "destination": {"provider": "gcp_gcs", "bucket": "dst", "key": key},
        "metadata": {"maxRetries": 10},
        "index": index,
    }


Promises.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=25, deadline=None, print_blob=True
)
TestPromises = Promises.TestCase
