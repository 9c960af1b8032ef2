"""Adversarial review of conditional commits: scenarios that break the promises (the newest event
wins, a duplicate or late event changes nothing, every event ends transferred or dead-lettered
with its real reason). Each test here FAILS on the code under review; the docstring says what it
shows and why it matters.

Interleavings are made deterministic the way tests/test_commits.py does it: the second transfer
runs from inside the first one's stream (its progress callback), to its end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_commits import LARGE, SMALL, event_for, local_side, s3_side

JAN, FEB, JUN = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-06-01T00:00:00Z"


def meanwhile(engine: tw.TransferEngine, event: tw.TransferEvent, done: dict[str, Any]) -> Any:
    """A progress callback that runs ``event`` to its end the first time it is called."""

    def run(_: int) -> None:
        if "result" not in done:
            done["result"] = engine.transfer(event)

    return run


# -- S3: an ETag names bytes, not a write ----------------------------------------------------------


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["one-request", "multipart"])
def test_s3_identical_bytes_written_again_get_another_etag(aws_env: str, size: int) -> None:
    """The rewrite a newer event with the same bytes makes (so that it is on record) must not
    leave the ETag another writer may have planned on: one request becomes one part of a
    multipart upload, a multipart upload takes parts one MiB larger."""
    side = s3_side()
    side.put("src/x", os.urandom(size))
    engine = tw.TransferEngine({side.provider: side.store})
    dst = side.ref("out")
    assert engine.transfer(event_for(side.ref("src/x"), dst, JAN)).outcome == "success"
    before = side.store.head(dst)
    assert engine.transfer(event_for(side.ref("src/x"), dst, JUN)).outcome == "success"
    after = side.store.head(dst)
    assert after.version != before.version
    assert after.recorded(tw.META_EVENT_TIME).startswith("2026-06-01")


@pytest.mark.parametrize(
    ("size", "on_call"),
    [(SMALL, 2), (LARGE, 1)],
    ids=["one-request-replanned", "multipart-planned"],
)
def test_s3_an_older_event_never_overwrites_a_newer_one_that_rewrote_identical_bytes(
    aws_env: str, size: int, on_call: int
) -> None:
    """E0 (January) wrote X. E1 (February) plans on E0's ETag: a multipart object reads the
    destination first; a one-request object is refused on "absent" and re-plans. While E1
    streams, E3 (June) writes X again (the same bytes, written again so that June is on
    record). S3's ETag of the same bytes is the same (the MD5 of a single PutObject), so E1's
    If-Match still held: E1 committed over June's object, and E3 was acknowledged, so nothing
    repaired it. Now a rewrite that would keep the planned ETag is made in another shape (one
    part of a multipart upload), so E1 is refused and re-plans to stale_event."""
    side = s3_side()
    x, a = os.urandom(SMALL), os.urandom(size)
    side.put("src/x", x)
    side.put("src/a", a)
    engine = tw.TransferEngine({side.provider: side.store})
    dst = side.ref("out")
    assert engine.transfer(event_for(side.ref("src/x"), dst, JAN)).outcome == "success"
    planned = side.store.head(dst)
    newest = event_for(side.ref("src/x"), dst, JUN)
    seen: dict[str, Any] = {"calls": 0}

    def newest_meanwhile(_: int) -> None:  # on_call: the first chunk of the stream that commits
        seen["calls"] += 1
        if seen["calls"] == on_call:
            seen["result"] = engine.transfer(newest)
            seen["after"] = side.store.head(dst)

    older = engine.transfer(event_for(side.ref("src/a"), dst, FEB), on_progress=newest_meanwhile)
    assert seen["result"].outcome == "success"  # June's event was written (and would be acked)
    assert seen["after"].metadata[tw.META_EVENT_TIME].startswith("2026-06-01")
    # the same bytes kept their ETag, so E1's If-Match held; the rewrite now changes it
    assert seen["after"].version != planned.version
    assert (older.outcome, older.reason) == ("skipped", "stale_event")
    assert side.read("out") == x


def test_s3_two_multipart_deliveries_of_one_event_abort_each_other(aws_env: str) -> None:
    """Two deliveries of one large event at once (a lease that lapsed under a long transfer):
    the second delivery's CreateMultipartUpload aborts the first's upload (_abort_others), so the
    first's parts fail (S3: 404 NoSuchUpload; moto answers 500): a failed attempt
    (RetryableError, backoff, retry budget), not a refused commit that re-plans and finds the
    event applied. With max_retries 0 that attempt is dead-lettered although its object is
    written; with deliveries that each take longer than the backoff, every new attempt aborts
    the one in flight."""
    side = s3_side()
    side.put("src/a", os.urandom(LARGE))
    engine = tw.TransferEngine({side.provider: side.store})
    event = event_for(side.ref("src/a"), side.ref("out"), JUN)
    done: dict[str, Any] = {}
    try:
        first = engine.transfer(event, on_progress=meanwhile(engine, event, done))
    except tw.TransferError as exc:
        raise AssertionError(f"the first delivery failed its attempt: {exc.reason}: {exc}") from exc
    assert done["result"].outcome == "success"
    assert (first.outcome, first.reason) == ("skipped", "already_applied")


class SecondDeliveryInStream:
    """A local source store that, once the first chunk of its ``read``-th read is read, runs
    ``hook`` (another delivery of the same event) to its end: the interleaving of two workers on
    one message. The first read of a large object without a stated SHA-256 is hash_source's,
    before the upload exists; the second is the stream into the upload."""

    def __init__(self, inner: tw.LocalObjectStore, read: int) -> None:
        self.inner, self.reads_left = inner, read
        self.hook: Any = None

    def open_read(self, ref: tw.ObjectRef, info: tw.ObjectInfo) -> Any:
        import contextlib

        self.reads_left -= 1
        armed = self.reads_left == 0

        @contextlib.contextmanager
        def reading() -> Any:
            with self.inner.open_read(ref, info) as chunks:
                yield self._chunks(chunks) if armed else chunks

        return reading()

    def _chunks(self, chunks: Any) -> Any:
        for chunk in chunks:
            yield chunk
            hook, self.hook = self.hook, None
            if hook:
                hook()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_s3_a_delivery_aborted_by_a_concurrent_one_is_dead_lettered_with_max_retries_0(
    aws_env: str, tmp_path: Path
) -> None:
    """The same race through the worker with a budget of one attempt. moto dates every upload
    2010, so the second delivery takes the first's upload for dead and aborts it (on S3 a young
    upload is left alone). The first then meets NoSuchUpload: it was a failed attempt, so the
    event, written by the other delivery, was dead-lettered retries_exhausted. Now it re-plans,
    as after a refused commit, and finds the event already applied."""
    import io
    import json

    local = tw.LocalObjectStore(tmp_path, "gcp_gcs")
    (tmp_path / "gcp_gcs" / "src").mkdir(parents=True)
    (tmp_path / "gcp_gcs" / "src" / "a").write_bytes(os.urandom(LARGE))
    source = SecondDeliveryInStream(local, read=2)
    s3 = s3_side()
    stores: dict[str, Any] = {"gcp_gcs": source, "aws_s3": s3.store}
    engine = tw.TransferEngine(stores)
    event = event_for(tw.ObjectRef("gcp_gcs", "src", "a"), s3.ref("out"), JUN)
    done: dict[str, Any] = {}
    source.hook = lambda: done.setdefault("result", engine.transfer(event))
    queue = tw.LocalQueue(tmp_path / "queue.db", poll_interval=0.01)
    config = tw.Config(local_root=str(tmp_path), http_port=0, max_retries=0)
    log = io.StringIO()
    worker = tw.Worker(
        config, queue, engine, tw.Metrics(), tw.make_logger("DEBUG", log), sleep=lambda _: None
    )
    queue.publish(json.dumps(_document(event)).encode())
    worker.run(once=True)
    assert done["result"].outcome == "success"
    assert queue.dead_letters() == []


def _document(event: tw.TransferEvent) -> dict[str, Any]:
    return {
        "schemaVersion": "1.0.0",
        "eventId": event.event_id,
        "correlationId": event.correlation_id,
        "timestamp": event.timestamp.isoformat(),
        "source": {
            "provider": event.source.provider,
            "bucket": event.source.bucket,
            "key": event.source.key,
        },
        "destination": {
            "provider": event.destination.provider,
            "bucket": event.destination.bucket,
            "key": event.destination.key,
        },
    }


# -- event times -----------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["a", "b"])
def test_events_tied_in_time_converge_on_one_and_duplicates_change_nothing(
    tmp_path: Path, first: str
) -> None:
    """Two events with the same timestamp (producers stamping milliseconds tie often) for one
    key, applied in either order, then a duplicate of each. Before, nothing ordered two events of
    one instant: a duplicate of A after B was neither stale nor the same content, so it wrote A
    again, and B's redelivery flipped it back. Now the event id breaks the tie: every order ends
    with the same event's bytes, and duplicates are skipped."""
    side = local_side(tmp_path)
    data = {"a": os.urandom(SMALL), "b": os.urandom(SMALL)}
    for name, payload in data.items():
        side.put(f"src/{name}", payload)
    engine = tw.TransferEngine({side.provider: side.store})
    when = "2026-06-01T00:00:00.123Z"
    events = {n: event_for(side.ref(f"src/{n}"), side.ref("out"), when) for n in data}
    newest = max(data, key=lambda n: events[n].event_id)
    order = [first, "b" if first == "a" else "a"]
    for name in order:
        engine.transfer(events[name])
    assert side.read("out") == data[newest]
    for name in order:
        duplicate = engine.transfer(events[name])
        assert duplicate.outcome == "skipped", duplicate
    assert side.read("out") == data[newest]


# -- local store -----------------------------------------------------------------------------------


def test_local_a_directory_at_the_destination_is_a_destination_error_read_once(
    tmp_path: Path,
) -> None:
    """A directory where the key's file should be. Before conditional commits the rename failed
    with IsADirectoryError: PermanentError destination_error after one read. Without
    _refuse_non_file the no-replace link answers EEXIST, read as a refused commit; the
    re-plan's head() says "absent" (not a regular file), so the same commit is tried again:
    MAX_REPLANS full reads of the source, then RetryableError "conflict", which the worker
    retries with backoff (max_retries + 1 times the 8 reads) and dead-letters as
    retries_exhausted (conflict), not as the destination error it is."""
    side = local_side(tmp_path)
    data = os.urandom(SMALL)
    side.put("src/a", data)
    (tmp_path / "gcp_gcs" / "bucket" / "out" / "inside").mkdir(parents=True)
    engine = tw.TransferEngine({side.provider: side.store})
    moved: list[int] = []
    with pytest.raises(tw.TransferError) as caught:
        engine.transfer(
            event_for(side.ref("src/a"), side.ref("out"), JUN), on_progress=moved.append
        )
    assert (type(caught.value), caught.value.reason) == (tw.PermanentError, "destination_error")
    assert sum(moved) == len(data)


KILL_AFTER_RENAME = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import transfer_worker as tw
    from tests.test_commits import event_for, local_side
    from pathlib import Path

    side = local_side(Path(sys.argv[2]))
    engine = tw.TransferEngine({side.provider: side.store})
    # The file is in place (renamed / linked); the process dies before SQLite's COMMIT. The
    # key directory's sync is the one by descriptor: the syncs by path before the link are of
    # the bucket's and its parent's entries, which this process had not synced yet.
    real_fsync_dir = tw._fsync_dir
    tw._fsync_dir = lambda path: os._exit(9) if isinstance(path, int) else real_fsync_dir(path)
    engine.transfer(event_for(side.ref("src/new"), side.ref("out"), sys.argv[3]))
    """
)


def test_local_a_kill_between_the_rename_and_the_metadata_commit_lets_an_older_event_win(
    tmp_path: Path,
) -> None:
    """A worker is killed after its file is in place but before the commit lock's transaction
    (the metadata record) commits: the newest bytes are visible with no record of their event.
    A late older event then finds nothing to be stale against and replaces them: the destination
    shows the older event's bytes until the killed event is redelivered (if its queue still
    has it). The rename and the record are not one atomic step."""
    side = local_side(tmp_path)
    newest, older = os.urandom(SMALL), os.urandom(SMALL)
    side.put("src/new", newest)
    side.put("src/old", older)
    repo = str(Path(tw.__file__).parent)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_RENAME, repo, str(tmp_path), JUN],
        cwd=repo,
        timeout=60,
        check=False,
    )
    assert killed.returncode == 9
    assert side.read("out") == newest  # visible: the kill came after the link
    engine = tw.TransferEngine({side.provider: side.store})
    late = engine.transfer(event_for(side.ref("src/old"), side.ref("out"), JAN))
    assert (late.outcome, late.reason) == ("skipped", "stale_event")
    assert side.read("out") == newest


PAUSE_AFTER_RENAME = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import transfer_worker as tw
    from tests.test_commits import event_for, local_side
    from pathlib import Path

    root = Path(sys.argv[2])
    side = local_side(root)
    engine = tw.TransferEngine({side.provider: side.store})
    fsync_dir = tw._fsync_dir

    def paused(path):
        # The key directory's sync (by descriptor; those by path before the link are of the
        # bucket's entries): the file is in place, the commit lock is held, the record is not
        # committed yet.
        if isinstance(path, int):
            (root / "renamed").touch()
            deadline = time.monotonic() + 30
            while not (root / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        fsync_dir(path)

    tw._fsync_dir = paused
    print(engine.transfer(event_for(side.ref("src/new"), side.ref("out"), sys.argv[3])).outcome)
    """
)


def wait_for(path: Path, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


class OtherProcessCommitsBeforeReplan:
    """The destination store of a worker process whose refused commit re-plans while a worker in
    another process on the same root is inside its commit: renamed, not yet recorded."""

    def __init__(self, inner: tw.LocalObjectStore, start_other: Any, root: Path) -> None:
        self.inner, self.start_other, self.root = inner, start_other, root
        self.other: Any = None
        self.seen: tw.ObjectInfo | None = None

    def head(self, ref: tw.ObjectRef) -> tw.ObjectInfo | None:
        if ref.key == "out" and self.other is None:
            self.other = self.start_other()
            wait_for(self.root / "renamed")
            self.seen = self.inner.head(ref)
            return self.seen
        return self.inner.head(ref)

    def open_write(self, ref: tw.ObjectRef, **kwargs: Any) -> Any:
        if self.other is not None:
            (self.root / "go").touch()  # the other process may now commit its record
        return self.inner.open_write(ref, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_local_two_processes_a_replan_during_the_others_commit_lets_an_older_event_win(
    tmp_path: Path,
) -> None:
    """Two worker processes on one root. The destination holds E0 (January). Process P (E1,
    February) is refused (the key exists) and re-plans; its head() runs while process Q (E3,
    June) is inside its commit: Q's file is renamed into place, its record not yet committed.
    head() reads metadata.db outside the commit lock, so P sees Q's file with no record: not
    stale. P's commit is conditional on that file's stat, which has not changed when P gets the
    lock after Q's COMMIT, so P replaces June's bytes with February's. Within one process the
    threading lock around metadata.get hides this; across processes nothing does."""
    side = local_side(tmp_path)
    oldest, older, newest = os.urandom(SMALL), os.urandom(SMALL), os.urandom(SMALL)
    side.put("src/oldest", oldest)
    side.put("src/old", older)
    side.put("src/new", newest)
    engine = tw.TransferEngine({side.provider: side.store})
    assert engine.transfer(event_for(side.ref("src/oldest"), side.ref("out"), JAN)).outcome == (
        "success"
    )
    repo = str(Path(tw.__file__).parent)

    def start_other() -> Any:
        return subprocess.Popen(
            [sys.executable, "-c", PAUSE_AFTER_RENAME, repo, str(tmp_path), JUN],
            cwd=repo,
            stdout=subprocess.PIPE,
            text=True,
        )

    dst = OtherProcessCommitsBeforeReplan(side.store, start_other, tmp_path)
    p_engine = tw.TransferEngine({side.provider: dst})
    result = p_engine.transfer(event_for(side.ref("src/old"), side.ref("out"), FEB))
    out, _ = dst.other.communicate(timeout=60)
    assert out.strip() == "success"  # Q wrote June's event
    # P's re-plan ran while Q's file was in place and Q held the commit lock: it saw Q's record
    # (before, it saw the file unrecorded, {}: a record is now written before its file appears)
    assert dst.seen is not None and (dst.seen.recorded(tw.META_EVENT_TIME) or "").startswith(
        "2026-06"
    )
    assert (result.outcome, result.reason) == ("skipped", "stale_event")
    assert side.read("out") == newest


def test_local_a_commit_lock_held_past_the_busy_timeout_is_retryable_not_internal_error(
    tmp_path: Path,
) -> None:
    """Another process holds metadata.db's write lock (its commit stalled on a slow disk, or the
    process is stopped: SIGSTOP, a frozen container) for longer than the busy timeout. BEGIN
    IMMEDIATE raises sqlite3.OperationalError "database is locked", which is no OSError and no
    TransferError: without LocalMetadata._begin_immediate it escapes the engine, and the worker
    dead-letters the event internal_error on its first attempt. A lock that will be released is
    a retryable condition. (The busy timeout is 30 s in open_sqlite; the test shortens it on the
    store's connection to 50 ms.)"""
    import sqlite3

    side = local_side(tmp_path)
    side.put("src/a", os.urandom(SMALL))
    engine = tw.TransferEngine({side.provider: side.store})
    side.store.metadata._db.execute("PRAGMA busy_timeout=50")
    holder = sqlite3.connect(tmp_path / "metadata.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(Exception) as caught:
            engine.transfer(event_for(side.ref("src/a"), side.ref("out"), JUN))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert isinstance(caught.value, tw.RetryableError), repr(caught.value)
    assert caught.value.reason == "conflict"
    assert list((tmp_path / ".tmp").iterdir()) == []  # the upload's temp file is gone
    assert side.read("out") is None


class SwapsParentForSymlinkAtCommit(tw.LocalMetadata):
    """Metadata of a root where, when a commit takes the lock (after LocalUpload.commit's
    symlink re-check of the key's directories), someone with write access to the bucket replaces
    a directory of the key with a symlink to elsewhere."""

    def __init__(self, root: Path, directory: Path, target: Path) -> None:
        super().__init__(root)
        self.directory, self.target = directory, target

    def committing(self, ref: tw.ObjectRef) -> Any:
        self.directory.rename(self.directory.with_name("moved-away"))
        self.directory.symlink_to(self.target, target_is_directory=True)
        return super().committing(ref)


def test_local_a_directory_swapped_for_a_symlink_before_the_link_writes_outside_the_bucket(
    tmp_path: Path,
) -> None:
    """_path() refuses a key whose directories are symlinks, and commit() checks again before it
    takes the lock; the link itself (os.link / os.replace on a path string) then follows a
    symlinked directory that appeared in between, so the object is written outside the bucket.
    The check and the use are separate steps on a path; the commit lock does not cover people."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    directory = root / "gcp_gcs" / "bucket" / "sub"
    directory.mkdir(parents=True)
    metadata = SwapsParentForSymlinkAtCommit(root, directory, outside)
    store = tw.LocalObjectStore(root, "gcp_gcs", metadata=metadata)
    (root / "gcp_gcs" / "bucket" / "src").write_bytes(os.urandom(SMALL))
    engine = tw.TransferEngine({"gcp_gcs": store})
    src, dst = (
        tw.ObjectRef("gcp_gcs", "bucket", "src"),
        tw.ObjectRef("gcp_gcs", "bucket", "sub/out"),
    )
    with contextlib.suppress(tw.TransferError):
        engine.transfer(event_for(src, dst, JUN))
    assert list(outside.iterdir()) == []


def test_an_event_stamped_in_the_future_freezes_the_key(tmp_path: Path) -> None:
    """A producer whose clock is a year ahead sends one event; it is accepted and recorded. Every
    later event for that key, for a year, is skipped as stale_event: acknowledged, counted as a
    skip, and its bytes never land. No bound on how far ahead of the worker's clock an event may
    be (a design question: the promise "nothing is lost" fails silently here)."""
    import datetime as dt

    side = local_side(tmp_path)
    skewed, real = os.urandom(SMALL), os.urandom(SMALL)
    side.put("src/skewed", skewed)
    side.put("src/real", real)
    engine = tw.TransferEngine({side.provider: side.store})
    now = dt.datetime.now(dt.UTC)
    ahead = (now + dt.timedelta(days=365)).isoformat()
    with contextlib.suppress(tw.TransferError):
        engine.transfer(event_for(side.ref("src/skewed"), side.ref("out"), ahead))
    later = engine.transfer(
        event_for(
            side.ref("src/real"), side.ref("out"), (now + dt.timedelta(seconds=1)).isoformat()
        )
    )
    assert side.read("out") == real, later


# -- what held (kept as regression guards) ---------------------------------------------------------


@pytest.mark.parametrize("provider", ["local", "aws_s3", "gcp_gcs"])
def test_held_always_an_older_large_event_never_overwrites_a_newer_one(
    request: pytest.FixtureRequest, tmp_path: Path, provider: str
) -> None:
    """--overwrite always still refuses stale events: the race of test_commits under always."""
    from tests.test_commits import gcs_side, race

    if provider == "local":
        side = local_side(tmp_path)
    elif provider == "aws_s3":
        request.getfixturevalue("aws_env")
        side = s3_side()
    else:
        request.getfixturevalue("fake_gcs_env")
        side = gcs_side()
    size = SMALL if provider == "gcp_gcs" else LARGE  # bundled fake-gcs: see FINALISE_UNCHECKED
    side.put("out", b"there before")
    newer = os.urandom(SMALL)
    result_a, result_b = race(side, a=(FEB, os.urandom(size)), b=(JUN, newer), overwrite="always")
    assert result_b.outcome == "success"
    assert (result_a.outcome, result_a.reason) == ("skipped", "stale_event")
    assert side.read("out") == newer


def test_held_local_a_hard_link_at_the_destination_is_replaced_not_written_through(
    tmp_path: Path,
) -> None:
    """The destination is a hard link to the source file: the commit replaces the name (rename
    of a new inode), so the source keeps its bytes."""
    side = local_side(tmp_path)
    original, data = os.urandom(SMALL), os.urandom(SMALL)
    side.put("other", original)
    side.put("src/a", data)
    bucket = tmp_path / "gcp_gcs" / "bucket"
    os.link(bucket / "other", bucket / "out")
    engine = tw.TransferEngine({side.provider: side.store})
    assert engine.transfer(event_for(side.ref("src/a"), side.ref("out"), JUN)).outcome == "success"
    assert side.read("out") == data and side.read("other") == original


@pytest.mark.parametrize("provider", ["local", "aws_s3", "gcp_gcs"])
def test_held_a_duplicate_after_a_kill_between_commit_and_ack_changes_nothing(
    request: pytest.FixtureRequest, tmp_path: Path, provider: str
) -> None:
    """Delivery 1 committed and died before its ack; a newer event then committed; delivery 2 of
    the first event (small: written first on "absent", refused, re-planned) is stale."""
    from tests.test_commits import gcs_side

    if provider == "local":
        side = local_side(tmp_path)
    elif provider == "aws_s3":
        request.getfixturevalue("aws_env")
        side = s3_side()
    else:
        request.getfixturevalue("fake_gcs_env")
        side = gcs_side()
    side.put("src/a", os.urandom(SMALL))
    side.put("src/b", newer := os.urandom(SMALL))
    engine = tw.TransferEngine({side.provider: side.store})
    first = event_for(side.ref("src/a"), side.ref("out"), FEB)
    assert engine.transfer(first).outcome == "success"
    assert engine.transfer(event_for(side.ref("src/b"), side.ref("out"), JUN)).outcome == "success"
    again = engine.transfer(first)
    assert (again.outcome, again.reason) == ("skipped", "stale_event")
    assert side.read("out") == newer


# -- answers the emulators never give, from a relay ----------------------------------------------


def answering_proxy(
    upstream: str, status: int, payload: bytes, nth: int, method: str, part: str
) -> Any:
    """test_cloud's relay, answering the ``nth`` request of ``method`` whose path contains
    ``part`` with ``status`` and ``payload`` (what the service would say) instead of forwarding
    it."""
    from tests.test_cloud import FaultProxy

    class Answering(FaultProxy):
        def _handler(self) -> Any:
            base, relay = super()._handler(), self

            class Handler(base):  # type: ignore[misc, valid-type]
                def _fail(self) -> None:
                    self.send_response(relay.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            return Handler

    proxy = Answering(upstream, status=status, failures=1)
    seen = [0]

    def match(verb: str, path: str) -> bool:
        if verb != method or part not in path:
            return False
        seen[0] += 1
        return seen[0] == nth

    proxy.match = match
    return proxy


@pytest.mark.parametrize("nth", [1, 2], ids=["streamed-request", "finalising-request"])
def test_held_gcs_a_412_when_the_resumable_session_is_finalised_replans(
    fake_gcs_env: str, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    """What the bundled fake-gcs-server cannot show (test_commits' FINALISE_UNCHECKED): GCS
    checks a resumable session's ifGenerationMatch again when the final request arrives. A
    newer event commits while an older multipart one streams; the relay answers the older one's
    finalising PUT (or, in case GCS ever checks it there, the streamed request before it) with
    412, as GCS would. The older event re-plans and skips as stale."""
    from tests.test_commits import gcs_side, relayed_store

    side = gcs_side()
    side.put("src/a", os.urandom(LARGE))
    side.put("src/b", newer := os.urandom(SMALL))
    proxy = answering_proxy(fake_gcs_env, 412, b"{}", nth=nth, method="PUT", part="upload_id=")
    try:
        relayed = relayed_store(monkeypatch, "gcp_gcs", proxy.url)
        engine = tw.TransferEngine({"gcp_gcs": relayed})
        direct = tw.TransferEngine({"gcp_gcs": side.store})
        done: dict[str, Any] = {}
        older = engine.transfer(
            event_for(side.ref("src/a"), side.ref("out"), FEB),
            on_progress=meanwhile(direct, event_for(side.ref("src/b"), side.ref("out"), JUN), done),
        )
    finally:
        proxy.close()
    assert proxy.injected == 1  # the session's nth PUT was answered 412
    assert done["result"].outcome == "success"
    assert (older.outcome, older.reason) == ("skipped", "stale_event")
    assert side.read("out") == newer


S3_CONFLICT = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code>'
    b"<Message>A conflicting conditional operation is currently in progress against this "
    b"resource. Please try again.</Message></Error>"
)


def test_s3_a_409_conditional_request_conflict_replans_like_a_refusal(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two conditional writes of one key overlap: S3 answers the loser 409
    ConditionalRequestConflict (moto never does; the relay answers the first PutObject so). The
    loser's attempt fails (RetryableError conflict: backoff, one of the event's retries; with
    maxRetries 0 the event is dead-lettered) where a 412 would have re-planned at no cost. ADR 10
    documents the 409 as retryable; the test states the cheaper behaviour it could have."""
    from tests.test_commits import relayed_store

    side = s3_side()
    side.put("src/a", data := os.urandom(SMALL))
    proxy = answering_proxy(aws_env, 409, S3_CONFLICT, nth=1, method="PUT", part="/out")
    try:
        store = relayed_store(monkeypatch, "aws_s3", proxy.url)
        engine = tw.TransferEngine({"aws_s3": store})
        try:
            result = engine.transfer(event_for(side.ref("src/a"), side.ref("out"), JUN))
        except tw.TransferError as exc:
            raise AssertionError(f"the attempt failed: {exc.reason}: {exc}") from exc
    finally:
        proxy.close()
    assert proxy.injected == 1
    assert result.outcome == "success" and side.read("out") == data


def test_local_an_error_after_the_rename_dead_letters_an_event_whose_bytes_are_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory fsync after the rename fails (EIO). commit() aborts and raises
    PermanentError destination_error (the worker dead-letters the event), the metadata record is
    rolled back, but the file is already in place: the destination shows bytes of a
    dead-lettered event, with no record, which any older event may then replace."""
    import errno

    side = local_side(tmp_path)
    side.put("src/a", data := os.urandom(SMALL))
    engine = tw.TransferEngine({side.provider: side.store})

    def failing_fsync(path: str) -> None:
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(tw, "_fsync_dir", failing_fsync)
    event = event_for(side.ref("src/a"), side.ref("out"), JUN)
    # Now: the bytes are in place with their record, so the commit happened and is reported so
    # (not dead-lettered); a duplicate delivery sees it applied.
    assert engine.transfer(event).outcome == "success"
    assert side.read("out") == data
    assert side.store.head(side.ref("out")).recorded(tw.META_EVENT_ID) == event.event_id
    again = engine.transfer(event)
    assert (again.outcome, again.reason) == ("skipped", "already_applied")


def test_local_a_root_on_a_filesystem_without_hard_links_can_still_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The no-replace commit of a new key is os.link. Filesystems without hard links (FAT and
    exFAT, gcsfuse and other FUSE mounts) answer EPERM or ENOTSUP; before conditional commits a
    rename worked there. Every new key is now dead-lettered destination_error. (os.link is made
    to answer as such a filesystem does: there is none to mount here.)"""
    import errno

    side = local_side(tmp_path)
    side.put("src/a", data := os.urandom(SMALL))
    engine = tw.TransferEngine({side.provider: side.store})

    def no_hard_links(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", str(dst))

    monkeypatch.setattr(os, "link", no_hard_links)
    try:
        result = engine.transfer(event_for(side.ref("src/a"), side.ref("out"), JUN))
    except tw.TransferError as exc:
        raise AssertionError(f"dead-lettered: {exc.reason}: {exc}") from exc
    assert result.outcome == "success" and side.read("out") == data


def dropping_proxy(upstream: str, method: str, part: str) -> Any:
    """test_cloud's relay, forwarding the first ``method`` request whose path contains ``part``
    and then closing the connection without its answer: the write applied, its answer lost."""
    import http.client
    import socket
    import urllib.parse

    from tests.test_cloud import FaultProxy

    target = urllib.parse.urlsplit(upstream)

    class Dropping(FaultProxy):
        def _handler(self) -> Any:
            base, relay = super()._handler(), self

            class Handler(base):  # type: ignore[misc, valid-type]
                def _fail(self) -> None:
                    up = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    up.request(self.command, self.path, body=self.body or None, headers=headers)
                    relay.applied = up.getresponse().status
                    up.close()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

                def _any(self) -> None:
                    length = int(self.headers.get("Content-Length") or 0)
                    self.body = self.rfile.read(length) if length else b""
                    fail, _ = relay._decide(self.command, self.path)
                    return self._fail() if fail else self._forward(self.body)

                do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

            return Handler

    proxy = Dropping(upstream, failures=1)
    proxy.applied = 0
    proxy.match = lambda verb, path: verb == method and part in path
    return proxy


@pytest.mark.parametrize("provider", ["aws_s3", "gcp_gcs"])
def test_held_a_commit_whose_answer_is_lost_ends_applied_not_dead_lettered(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, provider: str
) -> None:
    """The conditional write of a new key reaches the service and its answer is lost. botocore
    sends the PUT again (If-None-Match: *: 412), and the object there is this commit's (our
    body's MD5, this event on record): transferred, in this attempt (test_review_wave2's
    finding F; before, it re-planned to already_applied). GCS's upload (retry=None) fails the
    attempt, and the worker's next attempt is refused on ifGenerationMatch=0 and re-plans to
    already_applied. Either way: written once, no error left for the worker to dead-letter."""
    from tests.test_commits import gcs_side, relayed_store

    upstream = request.getfixturevalue("aws_env" if provider == "aws_s3" else "fake_gcs_env")
    side = s3_side() if provider == "aws_s3" else gcs_side()
    side.put("src/a", data := os.urandom(SMALL))
    method, part = ("PUT", "/out") if provider == "aws_s3" else ("POST", "uploadType=multipart")
    proxy = dropping_proxy(upstream, method, part)
    outcomes = []
    try:
        engine = tw.TransferEngine({provider: relayed_store(monkeypatch, provider, proxy.url)})
        event = event_for(side.ref("src/a"), side.ref("out"), JUN)
        for _ in range(2):  # the worker's retry
            try:
                result = engine.transfer(event)
            except tw.RetryableError as exc:
                outcomes.append(exc.reason)
                continue
            outcomes.append((result.outcome, result.reason))
            break
    finally:
        proxy.close()
    assert proxy.injected == 1 and proxy.applied == 200
    if provider == "aws_s3":
        assert outcomes == [("success", None)], outcomes
    else:
        assert outcomes[-1] == ("skipped", "already_applied"), outcomes
    assert side.read("out") == data


class SourceRewrittenAtReplan:
    """A store whose head of ``out`` (the re-plan after a refusal) first rewrites the source."""

    def __init__(self, inner: Any, rewrite: Any) -> None:
        self.inner, self.rewrite = inner, rewrite

    def head(self, ref: tw.ObjectRef) -> tw.ObjectInfo | None:
        if ref.key == "out" and self.rewrite:
            self.rewrite, rewrite = None, self.rewrite
            rewrite()
        return self.inner.head(ref)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("provider", ["local", "aws_s3"])
def test_held_the_sha256_learned_before_a_refusal_is_not_held_against_a_changed_source(
    request: pytest.FixtureRequest, tmp_path: Path, provider: str
) -> None:
    """The refused attempt learned the SHA-256 of the source it read; the source is rewritten
    before the re-plan streams it again. The re-read is pinned to the planned version, so it
    fails as source_changed (retryable), never as checksum_mismatch against the learned digest
    (permanent); the next attempt plans afresh and writes the new bytes."""
    if provider == "local":
        side = local_side(tmp_path)
    else:
        request.getfixturevalue("aws_env")
        side = s3_side()
    side.put("src/a", os.urandom(SMALL))
    side.put("out", b"there before")
    rewritten = os.urandom(SMALL)
    store = SourceRewrittenAtReplan(side.store, lambda: side.put("src/a", rewritten))
    engine = tw.TransferEngine({side.provider: store})
    event = event_for(side.ref("src/a"), side.ref("out"), JUN)
    with pytest.raises(tw.RetryableError) as caught:
        engine.transfer(event)
    assert caught.value.reason == "source_changed"
    assert engine.transfer(event).outcome == "success"
    assert side.read("out") == rewritten
