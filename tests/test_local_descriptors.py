"""The local store reaches a key through its directories' descriptors on the read side too
(review wave 2, finding E; the reviewer's own test is in test_review_wave2.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import transfer_worker as tw

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
