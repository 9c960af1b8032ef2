"""Adversarial review of issue 12 (objects arrive as the source had them): attempts to make a
field arrive altered, or a bad setting surface as a dead-letter storm instead of a start-up
error. Each test names its finding; fixed ones fail on the code before the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from tests.test_cloud import Buckets
from tests.test_keys import PART, event

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def cloud_env(aws_env: str, gcs_env: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": aws_env, "STORAGE_EMULATOR_HOST": gcs_env}


def engine(**options: Any) -> tw.TransferEngine:
    stores = {"aws_s3": tw.S3Store(part_size=PART), "gcp_gcs": tw.GCSStore(part_size=PART)}
    return tw.TransferEngine(stores, options=tw.WriteOptions(**options))


def transfer(eng: tw.TransferEngine, src: str, sb: str, dst: str, db: str, key: str) -> Any:
    body = json.dumps(event(src, sb, dst, db, key)).encode()
    return eng.transfer(tw.parse_event(body, tw.load_validator()))


# -- finding 1: a Content-Type S3 cannot carry ---------------------------------------------------


def test_a_content_type_s3_cannot_hold_is_unrepresentable(
    cloud_env: dict[str, str], tmp_path: Path
) -> None:
    """A Content-Type that is not printable ASCII (GCS and local mode hold any UTF-8) cannot be
    an S3 header. It must be dead-lettered metadata_unrepresentable naming content-type, like
    the other fields: before, é went out as one latin-1 byte (S3 keeps something else) and a
    character beyond latin-1 raised UnicodeEncodeError (internal_error). A local source stands
    for GCS here: gcp-storage-emulator drops the parameter of a single-request upload."""
    buckets = Buckets(cloud_env)
    local = tw.LocalObjectStore(tmp_path / "root", "gcp_gcs")
    ref = tw.ObjectRef("gcp_gcs", "src", "ct")
    upload = local.open_write(ref, size=4, content_type='text/plain; name="résumé"', metadata={})
    upload.write(b"data")
    upload.commit({})
    eng = tw.TransferEngine({"gcp_gcs": local, "aws_s3": tw.S3Store(part_size=PART)})

    with pytest.raises(tw.PermanentError) as caught:
        transfer(eng, "gcp_gcs", "src", "aws_s3", buckets.names["aws_s3"], "ct")

    assert caught.value.reason == tw.UNREPRESENTABLE
    assert "content-type" in str(caught.value)
    assert buckets.keys("aws_s3") == []


# -- finding 2: settings that bypass their choices -------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("metadata", "everything"),
        ("s3_sse", "aws:kms:dsse-typo"),
        ("s3_bucket_key", "yes"),
        ("overwrite", "sometimes"),
    ],
)
def test_a_setting_from_the_environment_outside_its_choices_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    setting: str,
    value: str,
) -> None:
    """argparse checks choices of flags only, not of defaults taken from the environment:
    TRANSFER_WORKER_METADATA=everything ran as if it were 'standard' (carried_metadata carries
    only for 'all', carried_fields drops only for 'none'), silently dropping user metadata."""
    monkeypatch.setenv(tw.ENV_PREFIX + setting.upper(), value)

    (tmp_path / "none.jsonl").write_text("")

    assert tw.main(["validate", str(tmp_path / "none.jsonl")]) == 2

    assert f"--{setting.replace('_', '-')}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("s3_storage_class", "GLACIER_FAST"),
        ("gcs_storage_class", "COOL"),
        ("gcs_kms_key", "my-key"),
    ],
)
def test_a_bad_storage_class_or_gcs_key_is_refused_at_start(setting: str, value: str) -> None:
    """A typo here was accepted and then refused by the server for every event: a dead-letter
    storm (InvalidStorageClass / 400) instead of one error at start."""
    config = tw.Config(**{setting: value})
    with pytest.raises(ValueError, match=f"--{setting.replace('_', '-')}"):
        config.validate(running=False)


def test_good_storage_classes_and_keys_are_accepted() -> None:
    tw.Config(
        s3_storage_class="STANDARD_IA",
        gcs_storage_class="NEARLINE",
        gcs_kms_key="projects/p/locations/us/keyRings/r/cryptoKeys/k",
    ).validate(running=False)


# -- held: the source version is recorded and readable back ----------------------------------------


def test_a_versioned_s3_sources_version_id_is_recorded_even_with_metadata_none(
    cloud_env: dict[str, str],
) -> None:
    """Tried: a versioned S3 bucket (version id next to the ETag), an older version's forged
    record in the source's own metadata, and --metadata none. Held: the destination records
    the version head() saw, never the source's claim."""
    buckets = Buckets(cloud_env)
    s3, bucket = buckets.s3, buckets.names["aws_s3"]
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    forged = {tw.META_SOURCE_ATTRIBUTE + "version-id": "forged", "sha256": "0" * 64}
    put = s3.put_object(Bucket=bucket, Key="v", Body=b"data", Metadata=forged)

    transfer(engine(metadata="none"), "aws_s3", bucket, "gcp_gcs", buckets.names["gcp_gcs"], "v")

    blob = buckets.gcs.bucket(buckets.names["gcp_gcs"]).get_blob("v")
    recorded = dict(blob.metadata)
    assert recorded[tw.META_SOURCE_ATTRIBUTE + "version-id"] == put["VersionId"]
    assert recorded[tw.META_SOURCE_ATTRIBUTE + "etag"] == put["ETag"]
    assert "sha256" not in recorded  # --metadata none: not even the legacy-named key
    info = tw.GCSStore().head(tw.ObjectRef("gcp_gcs", buckets.names["gcp_gcs"], "v"))
    assert (
        info is not None and info.recorded(tw.META_SHA256) == tw.hashlib.sha256(b"data").hexdigest()
    )


# -- finding 3: a recorded field the source never had ---------------------------------------------


@pytest.mark.parametrize("direction", [("aws_s3", "gcp_gcs"), ("aws_s3", "aws_s3")])
def test_only_fields_a_provider_lacks_are_restored_from_the_record(
    cloud_env: dict[str, str], direction: tuple[str, str]
) -> None:
    """transfer-worker-source-<field> exists for Expires and custom time, the fields one side
    has no place for. Any standard field so named in the source's user metadata was restored:
    an object without Content-Encoding arrived labelled gzip (clients then decompress plain
    bytes), one without Cache-Control arrived cacheable. The source had neither."""
    src, dst = direction
    buckets = Buckets(cloud_env)
    claimed = {
        tw.META_SOURCE_ATTRIBUTE + "content-encoding": "gzip",
        tw.META_SOURCE_ATTRIBUTE + "cache-control": "public, max-age=31536000",
    }
    buckets.s3.put_object(Bucket=buckets.names[src], Key="k", Body=b"data", Metadata=claimed)

    transfer(engine(), src, buckets.names[src], dst, buckets.names[dst], "k")

    if dst == "gcp_gcs":
        blob = buckets.gcs.bucket(buckets.names[dst]).get_blob("k")
        seen = (blob.content_encoding, blob.cache_control)
    else:
        head = buckets.s3.head_object(Bucket=buckets.names[dst], Key="k")
        seen = (head.get("ContentEncoding"), head.get("CacheControl"))
    assert seen == (None, None)


# -- finding 4: a variant in case of a recorded source attribute ----------------------------------


def test_a_variant_in_case_of_a_source_attribute_is_refused_not_dropped() -> None:
    """README: a record name in other case is refused, naming it. transfer-worker-source-Expires
    (GCS keeps case) passed for the worker's record and was dropped without a word; every
    name the worker records is lowercase."""
    info = tw.ObjectInfo(size=4, version="1", metadata={"transfer-worker-source-Expires": "x"})

    with pytest.raises(tw.PermanentError, match="'transfer-worker-source-Expires'") as caught:
        tw.carried_metadata(info, tw.WriteOptions())

    assert caught.value.reason == tw.UNREPRESENTABLE
    ours = tw.ObjectInfo(size=4, version="1", metadata={"transfer-worker-source-etag": "e"})
    assert tw.carried_metadata(ours, tw.WriteOptions()) == {}  # the worker's own: replaced
