"""Adversarial review of 2e2ab8d (a GCS destination records the source's CRC32C instead of a
SHA-256 for a large object without checksumSHA256). Each test is a finding: it
failed on the code under review and passes on the fix."""

from __future__ import annotations

import dataclasses

import transfer_worker as tw
from tests.test_commits import event_for

JUN = "2026-06-01T00:00:00Z"


def test_duplicate_after_a_source_metadata_update_is_already_applied() -> None:
    """The destination as 2e2ab8d records it (CRC32C, source generation and metageneration 1);
    the same event again, the source's bytes (generation) unchanged, its metadata patched since
    (real GCS bumps metageneration to 2; fake-gcs-server does not, and gcp-storage-emulator
    stalls a large copy within one store, so this is decided on plan_skip, the engine's rule).
    With a SHA-256 record (before 2e2ab8d) the duplicate is already_applied."""
    src_ref = tw.ObjectRef("gcp_gcs", "srcbucket", "src/a")
    event = event_for(src_ref, tw.ObjectRef("gcp_gcs", "dstbucket", "out"), JUN)
    revision = {"generation": "7", "metageneration": "1"}
    src = tw.ObjectInfo(size=10, version="7", checksums={"crc32c": "af132670"}, revision=revision)
    record = tw.TransferEngine._metadata(event, None, src)
    dst = tw.ObjectInfo(size=10, version="9", metadata=record)
    assert tw.plan_skip(event, dst, None, "always", src=src) == "already_applied"
    patched = dataclasses.replace(src, revision={**revision, "metageneration": "2"})
    assert tw.plan_skip(event, dst, None, "always", src=patched) == "already_applied"
