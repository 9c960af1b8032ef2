"""GCS destinations of a large object without checksumSHA256: the source is read once, the record
holds the source's CRC32C and generation, and the finalising request names that CRC32C.

The engine's stores talk to fake-gcs-server through a recording relay (test_crc32c_multipart's
Recording), which counts the bytes GCS served and can change a byte on its way to the session.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_commits import LARGE, event_for, gcs_side, relayed_store
from tests.test_crc32c_multipart import Recording, crc32c_hex

JUN = "2026-06-01T00:00:00Z"


@pytest.fixture(params=["gcs_env", "fake_gcs_env"])
def gcs_to_gcs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Two GCS buckets (gcp-storage-emulator or fake-gcs-server) and a function building an
    engine whose GCS store talks to them through a recording relay (which may damage one
    request to the session)."""
    emulator = request.getfixturevalue(request.param)
    src, dst = gcs_side(), gcs_side()
    relays: list[Recording] = []

    def engine(damage: Any = None) -> tuple[tw.TransferEngine, Recording]:
        relay = Recording(emulator, damage)
        relays.append(relay)
        store = relayed_store(monkeypatch, "gcp_gcs", relay.url)
        return tw.TransferEngine({"gcp_gcs": store}), relay

    yield src, dst, engine
    for relay in relays:
        relay.close()


def head(side: Any, key: str) -> tw.ObjectInfo:
    info = side.store.head(side.ref(key))
    assert info is not None
    return info


def test_gcs_to_gcs_large_reads_the_source_once_and_records_its_crc32c(gcs_to_gcs: Any) -> None:
    """Before, the worker read the whole source twice (a SHA-256 pass for the record fixed at
    the session's creation, then the copy). Now once: the session is created with the source's
    CRC32C and generation in the record, the finalising request names that CRC32C, the
    SHA-256 is computed on the way, and a redelivery is already_applied."""
    src, dst, engine_with = gcs_to_gcs
    src.put("src/a", data := os.urandom(LARGE))
    engine, relay = engine_with()
    event = event_for(src.ref("src/a"), dst.ref("out"), JUN)
    result = engine.transfer(event)
    assert result.outcome == "success", result
    assert relay.served == LARGE  # once, not twice
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    crc = crc32c_hex(data)
    assert len(relay.requests("POST", "uploadType=resumable")) == 1  # one session, one attempt
    [final] = [h for h in relay.requests("PUT", "upload_id=") if "x-goog-hash" in h]
    assert final["x-goog-hash"] == f"crc32c={base64.b64encode(bytes.fromhex(crc)).decode()}"
    again = engine.transfer(event)
    assert (again.outcome, again.reason) == ("skipped", "already_applied")
    assert relay.served == LARGE  # the redelivery read nothing (read the copy after this)
    assert dst.read("out") == data
    record = head(dst, "out").metadata
    generation = head(src, "src/a").revision["generation"]
    assert record["transfer-worker-crc32c"] == crc
    assert record["transfer-worker-source-generation"] == generation
    assert "transfer-worker-sha256" not in record


@pytest.mark.parametrize("gcs_to_gcs", ["gcs_env"], indirect=True)
def test_gcs_to_gcs_a_byte_damaged_on_the_way_to_gcs_is_never_committed(gcs_to_gcs: Any) -> None:
    """The relay flips the last byte of the streamed request to the session, after the worker
    read and checked it. The session was created with the source's CRC32C in the object
    resource (and the finalising request names it in X-Goog-Hash): gcp-storage-emulator checks
    the resource's (not X-Goog-Hash) and refuses the object, "CRC32C doesn't match": damage in
    transit, retryable. No object exists at the key; the next attempt writes the source's
    bytes. Before, the damaged object was finalised and only then found wrong. fake-gcs-server
    checks neither at finalisation, so it is not used here."""
    src, dst, engine_with = gcs_to_gcs
    src.put("src/a", data := os.urandom(LARGE))
    engine, _ = engine_with(damage=("PUT", "upload_id="))
    event = event_for(src.ref("src/a"), dst.ref("out"), JUN)
    with pytest.raises(tw.RetryableError) as refused:
        engine.transfer(event)
    assert refused.value.reason == tw.DAMAGED, refused.value
    assert dst.read("out") is None
    assert engine.transfer(event).outcome == "success"  # the worker's retry
    assert dst.read("out") == data


class DamagingSource:
    """The GCS store with one byte of the source changed as it is read, once."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.damaged = inner, False

    @contextlib.contextmanager
    def open_read(self, ref: tw.ObjectRef, info: tw.ObjectInfo, **kwargs: Any) -> Any:
        with self.inner.open_read(ref, info, **kwargs) as chunks:
            yield self._chunks(chunks)

    def _chunks(self, chunks: Any) -> Any:
        for chunk in chunks:
            if not self.damaged:
                self.damaged, chunk = True, bytes([chunk[0] ^ 1]) + chunk[1:]
            yield chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_gcs_to_gcs_a_byte_damaged_on_the_way_from_gcs_is_never_committed(
    gcs_to_gcs: Any,
) -> None:
    """The worker's own check, on both emulators: the bytes read disagree with the source's
    CRC32C, so the attempt fails as damage in transit before the finalising request; no object
    exists, and the next attempt reads the source again and writes it."""
    src, dst, engine_with = gcs_to_gcs
    src.put("src/a", data := os.urandom(LARGE))
    engine, _ = engine_with()
    engine.stores = {"gcp_gcs": DamagingSource(engine.stores["gcp_gcs"])}
    event = event_for(src.ref("src/a"), dst.ref("out"), JUN)
    with pytest.raises(tw.RetryableError) as refused:
        engine.transfer(event)
    assert refused.value.reason == tw.DAMAGED, refused.value
    assert dst.read("out") is None
    assert engine.transfer(event).outcome == "success"
    assert dst.read("out") == data
