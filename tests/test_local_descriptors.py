"""The local store reaches a key through its directories' descriptors on the read side too, and a
commit syncs the entry of each directory it makes in that directory's parent (review wave 2,
findings E and A; the reviewer's own tests are in test_review_wave2.py)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_queue_outage import Rig, copied, submit

SRC = tw.ObjectRef("aws_s3", "src", "in/data.bin")
SECRET = b"SECRET, outside every bucket"


@pytest.fixture
def rooted(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): a source file at SRC, and a directory outside every bucket."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "data.bin").write_bytes(SECRET)
    (root / "aws_s3" / "src" / "in").mkdir(parents=True)
    (root / "aws_s3" / "src" / "in" / "data.bin").write_bytes(b"public bytes")
    return root, outside


def swap_after_path_checks(monkeypatch: pytest.MonkeyPatch, directory: Path, target: Path) -> None:
    """Whoever can write the bucket replaces ``directory`` with a symlink to ``target`` right
    after the store has checked the key (as a loop of rename() would, at some point)."""
    original = tw.LocalObjectStore._path

    def racing_path(store: tw.LocalObjectStore, ref: tw.ObjectRef) -> str:
        path = original(store, ref)
        if not directory.is_symlink():
            directory.rename(directory.with_name("parked"))
            directory.symlink_to(target, target_is_directory=True)
        return path

    monkeypatch.setattr(tw.LocalObjectStore, "_path", racing_path)


def read_all(store: tw.LocalObjectStore, info: tw.ObjectInfo) -> bytes:
    with store.open_read(SRC, info) as chunks:
        return b"".join(chunks)


@pytest.mark.parametrize("use", ["head", "open_read"])
def test_a_directory_swapped_after_the_key_check_is_refused_not_followed(
    rooted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, use: str
) -> None:
    """Each use on its own (the reviewer's test stops at head()): the swap comes after the check,
    and the use refuses the key as a symlinked directory is refused, invalid_key, instead of
    reading the file outside the bucket."""
    root, outside = rooted
    store = tw.LocalObjectStore(root, "aws_s3")
    info = store.head(SRC)
    assert info is not None
    swap_after_path_checks(monkeypatch, root / "aws_s3" / "src" / "in", outside)
    with pytest.raises(tw.InvalidEvent) as refused:
        store.head(SRC) if use == "head" else read_all(store, info)
    assert refused.value.reason == "invalid_key"
    assert str(refused.value) == str(tw._symlink_error(SRC))


def test_a_read_through_missing_or_file_directories_says_absent_or_changed(
    rooted: tuple[Path, Path],
) -> None:
    """Without its mkdir the walk makes nothing: a missing directory or bucket is an absent key
    to head() and a vanished source to open_read(), as they were by path."""
    root, _ = rooted
    store = tw.LocalObjectStore(root, "aws_s3")
    info = store.head(SRC)
    assert info is not None
    for key in ("nowhere/data.bin", "in/data.bin/below"):
        assert store.head(tw.ObjectRef("aws_s3", "src", key)) is None
    assert store.head(tw.ObjectRef("aws_s3", "no-bucket", "in/data.bin")) is None
    (root / "aws_s3" / "src" / "in" / "data.bin").unlink()
    (root / "aws_s3" / "src" / "in").rmdir()
    with pytest.raises(tw.SourceChanged, match="disappeared"):
        read_all(store, info)
    assert not (root / "aws_s3" / "src" / "in").exists()


def recording_fsync(monkeypatch: pytest.MonkeyPatch, fail: Callable[[str], bool]) -> list[str]:
    """What os.fsync is called on, by path, in order; ``fail(path)`` makes that one raise EIO."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append(path)
        if fail(path):
            raise OSError(errno.EIO, "Input/output error", path)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def commit(store: tw.LocalObjectStore, ref: tw.ObjectRef, data: bytes) -> tw.LocalUpload:
    upload = store.open_write(ref, size=len(data), content_type="text/plain", metadata={})
    upload.write(data)
    upload.commit({})
    return upload


def without_temp(synced: list[str]) -> Iterator[str]:
    return (path for path in synced if "/.tmp/" not in path)


def test_a_commit_syncs_each_directory_it_made_in_its_parent_before_the_key_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a root with nothing below it, the commit makes gcp_gcs, the bucket, a and a/b: each
    one's parent is synced right after its mkdir (before the link), then a/b for the link."""
    store = tw.LocalObjectStore(tmp_path, "gcp_gcs")
    synced = recording_fsync(monkeypatch, lambda path: False)
    upload = commit(store, tw.ObjectRef("gcp_gcs", "dst", "a/b/key"), b"new")
    bucket = tmp_path / "gcp_gcs" / "dst"
    made_in = [tmp_path, tmp_path / "gcp_gcs", bucket, bucket / "a", bucket / "a" / "b"]
    assert list(without_temp(synced)) == [str(d) for d in made_in]
    assert upload.unsynced is None and (bucket / "a" / "b" / "key").read_bytes() == b"new"


def test_a_commit_into_existing_directories_syncs_only_the_file_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cost of the fix is paid once per new directory, never by later commits."""
    store = tw.LocalObjectStore(tmp_path, "gcp_gcs")
    commit(store, tw.ObjectRef("gcp_gcs", "dst", "a/b/first"), b"1")
    synced = recording_fsync(monkeypatch, lambda path: False)
    commit(store, tw.ObjectRef("gcp_gcs", "dst", "a/b/second"), b"2")
    assert len(synced) == 2 and "/.tmp/upload-" in synced[0]
    assert synced[1] == str(tmp_path / "gcp_gcs" / "dst" / "a" / "b")


def test_a_failed_sync_of_a_new_directory_is_kept_logged_and_counted_and_the_commit_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ADR 10's decision for the key directory's fsync holds for the parents' too: the bytes are
    in place and acknowledged, the error is on the upload, one WARNING and one count."""
    bucket = tmp_path / "gcp_gcs" / "dst"
    recording_fsync(monkeypatch, lambda path: path == str(bucket))  # the parent of the new copy/
    rig = Rig(tmp_path)
    submit(rig, b"p" * 3000)
    rig.worker.run(once=True)
    assert copied(tmp_path, "in/data.bin") == b"p" * 3000
    assert rig.queue.depth() == 0 and rig.dead_letters() == []
    [warning] = rig.logs("Committed, but the directory fsync failed")
    assert "Input/output error" in warning["error"] and str(bucket) in warning["error"]
    assert rig.metric("local_fsync_failures_total") == 1
    assert rig.logs("Transfer completed successfully")


def test_a_failed_parent_sync_and_a_failed_key_directory_sync_keep_the_first_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transfer, one report: the first failure is the one kept. The bucket was made by
    hand, unsynced: the commit's first sync is gcp_gcs's entry in the root (wave 2b, finding 3),
    then the bucket's, new/'s and the key directory's, all failing."""
    store = tw.LocalObjectStore(tmp_path, "gcp_gcs")
    store.bucket_dir("dst").mkdir(parents=True)
    synced = recording_fsync(monkeypatch, lambda path: "/.tmp/" not in path)
    upload: Any = commit(store, tw.ObjectRef("gcp_gcs", "dst", "new/key"), b"k")
    bucket = store.bucket_dir("dst")
    assert list(without_temp(synced)) == [str(tmp_path / d) for d in ("", "gcp_gcs")] + [
        str(bucket),
        str(bucket / "new"),
    ]
    assert upload.unsynced.filename == str(tmp_path)
    assert (store.bucket_dir("dst") / "new" / "key").read_bytes() == b"k"
