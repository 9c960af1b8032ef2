"""The local store's memory of directory entries it synced (review wave 2b, finding 3): bounded,
and a directory made by someone else is synced once per process, not on every commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import transfer_worker as tw


def test_synced_entries_forget_everything_past_their_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded memory: past LIMIT the set starts over, so a directory is synced once more."""
    monkeypatch.setattr(tw.SyncedEntries, "LIMIT", 2)
    entries = tw.SyncedEntries()
    stats = []
    for name in "abc":
        (tmp_path / name).mkdir()
        stats.append(os.stat(tmp_path / name))
    assert [entries.first_use(st) for st in stats[:2]] == [True, True]
    assert entries.first_use(stats[0]) is False
    assert entries.first_use(stats[2]) is True  # the third: all forgotten, then remembered
    assert entries.first_use(stats[0]) is True


def test_a_directory_made_by_another_process_is_synced_by_the_first_commit_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tw.LocalObjectStore(tmp_path, "gcp_gcs")
    bucket = store.bucket_dir("dst")
    (bucket / "shared").mkdir(parents=True)  # another's mkdirs, perhaps never synced
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for key in ("shared/one", "shared/two"):
        upload = store.open_write(
            tw.ObjectRef("gcp_gcs", "dst", key), size=1, content_type="text/plain", metadata={}
        )
        upload.write(b"x")
        upload.commit({})
    directories = [path for path in synced if "/.tmp/" not in path]
    first = [str(tmp_path), str(tmp_path / "gcp_gcs"), str(bucket), str(bucket / "shared")]
    assert directories == [*first, str(bucket / "shared")]
