"""Objects arrive as the source had them (issue 12): the standard fields and user metadata cross
in every direction, through the real CLI against moto and gcp-storage-emulator and in local mode,
checked with boto3 and google-cloud-storage as a user would; the worker's own record lives under
the reserved prefix and records the source version; what a destination cannot hold dead-letters
``metadata_unrepresentable`` naming the field; --metadata, storage class and encryption reach
the servers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import json
import random
import urllib.parse
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

import transfer_worker as tw
from tests.faultproxy import FaultProxy
from tests.test_cloud import Buckets, SQSChannel, WorkerProcess
from tests.test_keys import PART, decoded, event, local_dead_letters, run_local, submit

pytestmark = pytest.mark.timeout(240)

DIRECTIONS = {
    "s3_to_gcs": ("aws_s3", "gcp_gcs"),
    "gcs_to_s3": ("gcp_gcs", "aws_s3"),
    "s3_to_s3": ("aws_s3", "aws_s3"),
    "gcs_to_gcs": ("gcp_gcs", "gcp_gcs"),
}
PAGE = gzip.compress(b"<html><body>" + b"hello, world " * 2000 + b"</body></html>", mtime=0)
# Incompressible, so over one part: S3 multipart and a GCS resumable upload
LARGE = gzip.compress(random.Random(12).randbytes(PART + 4096), mtime=0)
assert len(LARGE) > PART
FIELDS = {
    # no "; charset=..." parameter: gcp-storage-emulator drops it on a single-request upload
    # (real GCS and its resumable path keep it), whoever writes
    "content-type": "text/html",
    "cache-control": "public, max-age=3600",
    "content-disposition": 'attachment; filename="page.html"',
    "content-encoding": "gzip",
    "content-language": "fr-CA",
}
USER = {"owner": "team-a", "note": "café crème", "x.y_z": "1"}  # é is latin-1: see test_keys
EXPIRES = "Wed, 21 Oct 2037 07:28:00 GMT"
CUSTOM_TIME = "2030-01-02T03:04:05.000Z"


@pytest.fixture
def cloud_env(aws_env: str, gcs_env: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": aws_env, "STORAGE_EMULATOR_HOST": gcs_env}


# -- putting sources and reading destinations with independent clients ----------------------


def put_source(
    buckets: Buckets, provider: str, key: str, data: bytes, user: dict[str, str] | None = None
) -> None:
    """An object with every standard field and user metadata, written as a user would."""
    user = USER if user is None else user
    bucket = buckets.names[provider]
    if provider == "aws_s3":
        buckets.s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            ContentType=FIELDS["content-type"],
            CacheControl=FIELDS["cache-control"],
            ContentDisposition=FIELDS["content-disposition"],
            ContentEncoding=FIELDS["content-encoding"],
            ContentLanguage=FIELDS["content-language"],
            Expires=dt.datetime(2037, 10, 21, 7, 28, tzinfo=dt.UTC),
            Metadata={name: tw._encoded_word(value) for name, value in user.items()},
        )
        return
    blob = buckets.gcs.bucket(bucket).blob(key)
    blob.cache_control = FIELDS["cache-control"]
    blob.content_disposition = FIELDS["content-disposition"]
    blob.content_encoding = FIELDS["content-encoding"]
    blob.content_language = FIELDS["content-language"]
    blob._patch_property("customTime", CUSTOM_TIME)
    blob.metadata = user
    blob.upload_from_string(data, content_type=FIELDS["content-type"])


def seen(buckets: Buckets, provider: str, key: str) -> dict[str, Any]:
    """What a user sees at the destination: fields, decoded user metadata, raw bytes, version."""
    bucket = buckets.names[provider]
    if provider == "aws_s3":
        head = buckets.s3.head_object(Bucket=bucket, Key=key)
        body = buckets.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return {
            "fields": {name: head.get(param) for name, param in S3_PARAMS.items()},
            "expires": head.get("ExpiresString"),
            "metadata": {name: decoded(value) for name, value in head["Metadata"].items()},
            "body": body,
            "revision": {"etag": head["ETag"]},
            "head": head,
        }
    blob = buckets.gcs.bucket(bucket).blob(key)
    blob.reload()
    return {
        "fields": {name: getattr(blob, attr) for name, attr in GCS_ATTRS.items()},
        "custom_time": blob._properties.get("customTime"),
        "metadata": dict(blob.metadata or {}),
        # raw: no decompressive transcoding, the gzip bytes as stored
        "body": buckets.gcs.bucket(bucket).blob(key).download_as_bytes(raw_download=True),
        "revision": {
            "generation": str(blob.generation),
            "metageneration": str(blob.metageneration),
        },
        "blob": blob,
    }


S3_PARAMS = {
    "content-type": "ContentType",
    "cache-control": "CacheControl",
    "content-disposition": "ContentDisposition",
    "content-encoding": "ContentEncoding",
    "content-language": "ContentLanguage",
}
GCS_ATTRS = {
    "content-type": "content_type",
    "cache-control": "cache_control",
    "content-disposition": "content_disposition",
    "content-encoding": "content_encoding",
    "content-language": "content_language",
}


def run_worker(env: dict[str, str], channel: SQSChannel, *args: str) -> WorkerProcess:
    worker = WorkerProcess(env, channel, "--part-size", str(PART), *args, once=True)
    assert worker.wait() == 0, worker.log_text()
    return worker


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- every field, every direction --------------------------------------------------------------


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_every_field_survives_every_direction(
    cloud_env: dict[str, str], tmp_path: Path, direction: str
) -> None:
    src, dst = DIRECTIONS[direction]
    source, target = Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    objects = {"page.html.gz": PAGE}
    if direction != "gcs_to_gcs":  # the emulator serves one request at a time (test_keys)
        objects["large.bin.gz"] = LARGE
    events = {}
    for key, data in objects.items():
        put_source(source, src, key, data)
        events[key] = event(src, source.names[src], dst, target.names[dst], key)
    submit(list(events.values()), tmp_path, "--to", channel.queue)

    worker = run_worker(cloud_env, channel)

    assert len(worker.outcomes("success")) == len(objects), worker.log_text()
    for key, data in objects.items():
        before, after = seen(source, src, key), seen(target, dst, key)
        assert after["body"] == data, key  # the gzip bytes, byte for byte
        assert after["fields"] == FIELDS, key
        user = {name: value for name, value in after["metadata"].items()}
        assert {name: user[name] for name in USER} == USER, key
        if (src, dst, key) == ("gcp_gcs", "aws_s3", "large.bin.gz"):  # read once (ADR 6)
            assert user[tw.META_CRC32C] == google_crc32c.Checksum(data).digest().hex()
        else:
            assert user[tw.META_SHA256] == sha(data)
        assert user[tw.META_EVENT_ID] == events[key]["eventId"]
        assert decoded(user[tw.META_SOURCE]) == f"{tw.URI_SCHEMES[src]}://{source.names[src]}/{key}"
        for name, value in before["revision"].items():  # the source version, next to the sha
            assert user[tw.META_SOURCE_ATTRIBUTE + name] == value, (key, name)
        assert not any(name in user for name in tw.LEGACY_META.values())  # only the new names
        expires_at_s3 = dst == "aws_s3" and src == "aws_s3"
        if dst == "aws_s3":
            assert after["expires"] == (EXPIRES if expires_at_s3 else None), key
        if dst == "gcp_gcs":
            assert after["custom_time"] == (CUSTOM_TIME if src == "gcp_gcs" else None), key
        # a field the destination has no place for is recorded under the reserved prefix
        if (src, dst) == ("aws_s3", "gcp_gcs"):
            assert user[tw.META_SOURCE_ATTRIBUTE + "expires"] == EXPIRES
        if (src, dst) == ("gcp_gcs", "aws_s3"):
            assert user[tw.META_SOURCE_ATTRIBUTE + "custom-time"] == CUSTOM_TIME
    assert channel.is_empty()


# -- local mode ---------------------------------------------------------------------------------

LOCAL_FIELDS = {
    **{name: value for name, value in FIELDS.items() if name != "content-type"},
    "expires": EXPIRES,
    "custom-time": CUSTOM_TIME,
}


def test_every_field_survives_every_direction_in_local_mode(tmp_path: Path) -> None:
    """Local sources get their metadata as a destination does (metadata.db); local mode keeps
    every field, Expires and custom time both."""
    root = tmp_path / "root"
    events = []
    for src, dst in DIRECTIONS.values():
        store = tw.LocalObjectStore(root, src)
        ref = tw.ObjectRef(src, f"src-{src[:3]}", f"to-{dst}/page.html.gz")
        upload = store.open_write(
            ref,
            size=len(PAGE),
            content_type=FIELDS["content-type"],
            metadata=USER,
            fields=LOCAL_FIELDS,
        )
        upload.write(PAGE)
        upload.commit(USER)
        events.append(event(src, ref.bucket, dst, f"dst-{src[:3]}", ref.key))
    submit(events, tmp_path, "--local-root", str(root))

    run_local(root)

    assert local_dead_letters(root) == []
    for e in events:
        dst = e["destination"]
        path = root / dst["provider"] / dst["bucket"] / dst["key"]
        assert path.read_bytes() == PAGE
        record = local_record(root, dst["provider"], dst["bucket"], dst["key"])
        assert record["fields"] == {**LOCAL_FIELDS, "content-type": FIELDS["content-type"]}
        assert {name: record["metadata"][name] for name in USER} == USER
        assert record["metadata"][tw.META_SHA256] == sha(PAGE)
        assert record["metadata"][tw.META_SOURCE_ATTRIBUTE + "stat"]  # the source's version


def local_record(root: Path, provider: str, bucket: str, key: str) -> dict[str, Any]:
    """The destination's record in metadata.db, read with sqlite3 rather than the worker."""
    import sqlite3

    db = sqlite3.connect(root / "metadata.db")
    try:
        [(text,)] = db.execute(
            "SELECT metadata FROM versions WHERE provider=? AND bucket=? AND key=?",
            (provider, bucket, key),
        ).fetchall()
    finally:
        db.close()
    return dict(json.loads(text))


def test_a_local_record_written_before_standard_fields_is_still_read(tmp_path: Path) -> None:
    """metadata.db rows of earlier versions are one flat dict with content-type and the
    unprefixed keys: head() still finds the content type and the worker's record."""
    root = tmp_path / "root"
    path = root / "gcp_gcs" / "b" / "k"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"data")
    store = tw.LocalObjectStore(root, "gcp_gcs")
    ref = tw.ObjectRef("gcp_gcs", "b", "k")
    version = tw._stat_version(path.stat())
    import sqlite3  # the one-row-per-key table of earlier versions, as they wrote it

    with contextlib.closing(sqlite3.connect(root / "metadata.db")) as db, db:
        db.execute(
            "INSERT INTO objects VALUES (?,?,?,?,?)",
            (
                "gcp_gcs",
                "b",
                "k",
                version,
                json.dumps({"content-type": "a/b", "sha256": sha(b"data")}),
            ),
        )

    info = store.head(ref)

    assert info is not None and info.content_type == "a/b" and info.fields == {}
    assert info.recorded(tw.META_SHA256) == sha(b"data")
    assert info.checksums == {"sha256": sha(b"data")}


# -- what cannot cross, and the reserved prefix -------------------------------------------------

# key -> (source provider, user metadata, a standard field to set, what the error must name)
REFUSED = {
    "over-2kb": ("gcp_gcs", {"big": "x" * 1900, "small": "y"}, {}, "'big'"),
    "not-a-header-name": ("gcp_gcs", {"ключ": "v"}, {}, "'ключ'"),
    "space-in-name": ("gcp_gcs", {"my key": "v"}, {}, "'my key'"),
    "case-twins": ("gcp_gcs", {"Foo": "1", "foo": "2"}, {}, "differs from another only in case"),
    "non-ascii-disposition": (
        "gcp_gcs",
        {},
        {"content_disposition": 'attachment; filename="résumé.pdf"'},
        "content-disposition",
    ),
    "reserved-prefix": ("aws_s3", {"transfer-worker-mine": "v"}, {}, "'transfer-worker-mine'"),
    "reserved-prefix-case": (
        "gcp_gcs",
        {"Transfer-Worker-SHA256": "0" * 64},
        {},
        "'Transfer-Worker-SHA256'",
    ),
}


def put_plain(
    buckets: Buckets, provider: str, key: str, user: dict[str, str], **attrs: str
) -> None:
    bucket = buckets.names[provider]
    if provider == "aws_s3":
        metadata = {name: tw._encoded_word(value) for name, value in user.items()}
        buckets.s3.put_object(Bucket=bucket, Key=key, Body=b"data", Metadata=metadata)
        return
    blob = buckets.gcs.bucket(bucket).blob(key)
    blob.metadata = user
    for name, value in attrs.items():
        setattr(blob, name, value)
    blob.upload_from_string(b"data")


def test_metadata_s3_cannot_hold_is_dead_lettered_naming_the_field(
    cloud_env: dict[str, str], tmp_path: Path
) -> None:
    source, target = Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    events = {}
    for key, (src, user, attrs, _) in REFUSED.items():
        put_plain(source, src, key, user, **attrs)
        events[key] = event(src, source.names[src], "aws_s3", target.names["aws_s3"], key)
    submit(list(events.values()), tmp_path, "--to", channel.queue)

    worker = run_worker(cloud_env, channel)

    envelopes = {e["event_id"]: e for e in channel.dead_letters(expected=len(REFUSED))}
    for key, (_, _, _, named) in REFUSED.items():
        envelope = envelopes[events[key]["eventId"]]
        assert envelope["reason"] == "metadata_unrepresentable", (key, envelope)
        assert named in envelope["error"], (key, envelope["error"])
    assert target.keys("aws_s3") == []  # nothing written, nothing cut
    assert worker.outcomes("success") == []


def test_metadata_over_gcs_8_kib_is_dead_lettered(
    cloud_env: dict[str, str], tmp_path: Path
) -> None:
    """A GCS source may hold up to 8 KiB of custom metadata; with the worker's record added it
    no longer fits a GCS destination, and is refused rather than cut."""
    source, target = Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    put_plain(source, "gcp_gcs", "k", {"a": "x" * 4000, "b": "y" * 4000})
    e = event("gcp_gcs", source.names["gcp_gcs"], "gcp_gcs", target.names["gcp_gcs"], "k")
    submit([e], tmp_path, "--to", channel.queue)

    run_worker(cloud_env, channel)

    [envelope] = channel.dead_letters()
    assert envelope["reason"] == "metadata_unrepresentable"
    assert "over GCS's 8192-byte limit" in envelope["error"]
    assert target.keys("gcp_gcs") == []


def test_a_source_cannot_spoof_the_workers_record(
    cloud_env: dict[str, str], tmp_path: Path
) -> None:
    """A source carrying the worker's own keys (it was a destination once, or pretends to be):
    this transfer's record replaces them, so a far-future event time or a wrong SHA-256 never
    reaches the destination."""
    source, target = Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    forged = {
        tw.META_EVENT_TIME: "2099-01-01T00:00:00+00:00",
        tw.META_SHA256: "0" * 64,
        tw.META_EVENT_ID: "forged",
        tw.META_SOURCE_ATTRIBUTE + "etag": "forged",
        "kept": "yes",
    }
    put_plain(source, "aws_s3", "k", forged)
    e = event("aws_s3", source.names["aws_s3"], "gcp_gcs", target.names["gcp_gcs"], "k")
    submit([e], tmp_path, "--to", channel.queue)

    run_worker(cloud_env, channel)

    after = seen(target, "gcp_gcs", "k")["metadata"]
    assert after["kept"] == "yes"
    assert after[tw.META_SHA256] == sha(b"data")
    assert after[tw.META_EVENT_ID] == e["eventId"]
    assert after[tw.META_EVENT_TIME] != forged[tw.META_EVENT_TIME]
    assert (
        after[tw.META_SOURCE_ATTRIBUTE + "etag"] == seen(source, "aws_s3", "k")["revision"]["etag"]
    )


def test_destinations_written_before_the_prefix_are_still_recognised(
    aws_env: str, fake_gcs_env: str, tmp_path: Path
) -> None:
    """Objects an earlier version wrote carry the unprefixed keys: a duplicate of their event is
    still already_applied. Once an object has the prefixed record, an unprefixed key (a source's
    user metadata copied along) means nothing: a transfer-event-time in it, a minute ahead (within
    --clock-skew), does not make a newer event stale. On fake-gcs-server, which refuses the
    first, absent-key commit (gcp-storage-emulator ignores ifGenerationMatch)."""
    cloud_env = {"AWS_ENDPOINT_URL": aws_env, "STORAGE_EMULATOR_HOST": fake_gcs_env}
    source, target = Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    dst_bucket = target.names["gcp_gcs"]
    old = event("aws_s3", source.names["aws_s3"], "gcp_gcs", dst_bucket, "old")
    put_plain(source, "aws_s3", "old", {})
    put_plain(
        target, "gcp_gcs", "old", {"sha256": sha(b"data"), "transfer-event-id": old["eventId"]}
    )
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)).isoformat()
    new = event("aws_s3", source.names["aws_s3"], "gcp_gcs", dst_bucket, "new")
    put_plain(source, "aws_s3", "new", {})
    put_plain(
        target,
        "gcp_gcs",
        "new",
        {tw.META_EVENT_TIME: "2020-01-01T00:00:00+00:00", "transfer-event-time": soon},
    )
    submit([old, new], tmp_path, "--to", channel.queue)

    worker = run_worker(cloud_env, channel)

    [skipped] = worker.outcomes("skipped")
    assert (skipped["event_id"], skipped["reason"]) == (old["eventId"], "already_applied")
    [success] = worker.outcomes("success")
    assert success["event_id"] == new["eventId"]


# -- --metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["standard", "none"])
def test_metadata_mode_limits_what_is_carried(
    cloud_env: dict[str, str], tmp_path: Path, mode: str
) -> None:
    """standard: the fields without user metadata; none: neither (Content-Type is the event's,
    else application/octet-stream). The worker's record is always there."""
    source, target = Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    put_source(source, "aws_s3", "page", PAGE)
    e = event("aws_s3", source.names["aws_s3"], "gcp_gcs", target.names["gcp_gcs"], "page")
    submit([e], tmp_path, "--to", channel.queue)

    run_worker(cloud_env, channel, "--metadata", mode)

    after = seen(target, "gcp_gcs", "page")
    assert after["body"] == PAGE
    assert not set(USER) & set(after["metadata"])
    assert after["metadata"][tw.META_SHA256] == sha(PAGE)
    if mode == "standard":
        assert after["fields"] == FIELDS
        assert after["metadata"][tw.META_SOURCE_ATTRIBUTE + "expires"] == EXPIRES
    else:
        assert after["fields"] == {
            **dict.fromkeys(FIELDS),
            "content-type": "application/octet-stream",
        }
        assert tw.META_SOURCE_ATTRIBUTE + "expires" not in after["metadata"]


# -- storage class and encryption reach the servers -------------------------------------------


class HeaderRecordingRelay(FaultProxy):
    """Forwards everything unchanged and keeps (method, path, headers) of every request."""

    def __init__(self, upstream_url: str) -> None:
        super().__init__(upstream_url)
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    def _make_server(self, port: int) -> Any:
        server = super()._make_server(port)
        base, relay = server.RequestHandlerClass, self

        class Handler(base):  # type: ignore[valid-type, misc]
            def _proxy(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                relay.seen.append((self.command, self.path, headers))
                super()._proxy()

        server.RequestHandlerClass = Handler
        return server


def test_s3_storage_class_and_sse_kms_reach_s3(cloud_env: dict[str, str], tmp_path: Path) -> None:
    """PutObject (small) and CreateMultipartUpload (large) both carry them: moto records them,
    except BucketKeyEnabled of a multipart upload, which a relay in front of moto shows was
    sent. Verification stays SHA-256: an ETag under KMS is never compared as an MD5."""
    import boto3

    key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
    source, target = Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    objects = {"small": PAGE, "large": LARGE}
    events = []
    for key, data in objects.items():
        put_source(source, "aws_s3", key, data)
        events.append(
            event("aws_s3", source.names["aws_s3"], "aws_s3", target.names["aws_s3"], key)
        )
    submit(events, tmp_path, "--to", channel.queue)

    flags = ["--s3-storage-class", "STANDARD_IA", "--s3-kms-key-id", key_id]
    with HeaderRecordingRelay(cloud_env["AWS_ENDPOINT_URL"]) as relay:
        env = {**cloud_env, "AWS_ENDPOINT_URL_S3": relay.url}
        worker = run_worker(env, channel, *flags, "--s3-bucket-key", "on")

    assert len(worker.outcomes("success")) == 2, worker.log_text()
    for key, data in objects.items():
        after = seen(target, "aws_s3", key)
        assert after["body"] == data
        head = after["head"]
        assert head["StorageClass"] == "STANDARD_IA", key
        assert head["ServerSideEncryption"] == "aws:kms", key
        assert key_id in head["SSEKMSKeyId"], key
        # moto keeps BucketKeyEnabled of a PutObject only, not of a multipart upload
        assert key == "large" or head["BucketKeyEnabled"] is True, key
    writes = {
        path.split("?")[1] if "?" in path else "put": headers
        for method, path, headers in relay.seen
        if (method, path.split("?")[1:]) in (("POST", ["uploads"]), ("PUT", []))
        and f"/{target.names['aws_s3']}/" in path
    }
    assert set(writes) == {"uploads", "put"}, relay.seen  # CreateMultipartUpload, PutObject
    for headers in writes.values():
        assert headers["x-amz-server-side-encryption"] == "aws:kms"
        assert headers["x-amz-server-side-encryption-aws-kms-key-id"] == key_id
        assert headers["x-amz-server-side-encryption-bucket-key-enabled"] == "true"
        assert headers["x-amz-storage-class"] == "STANDARD_IA"


def test_s3_sse_s3_reaches_s3(cloud_env: dict[str, str], tmp_path: Path) -> None:
    source, target = Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    put_source(source, "gcp_gcs", "k", PAGE)
    e = event("gcp_gcs", source.names["gcp_gcs"], "aws_s3", target.names["aws_s3"], "k")
    submit([e], tmp_path, "--to", channel.queue)

    run_worker(cloud_env, channel, "--s3-sse", "AES256")

    head = seen(target, "aws_s3", "k")["head"]
    assert head["ServerSideEncryption"] == "AES256"
    assert "StorageClass" not in head  # the bucket's own (STANDARD) when none is set


def test_gcs_storage_class_and_cmek_reach_gcs(cloud_env: dict[str, str], tmp_path: Path) -> None:
    """The emulator ignores kmsKeyName: a recording relay in front of it shows that both the
    single-request upload and the resumable session's start carried it."""
    kms_key = "projects/p/locations/global/keyRings/r/cryptoKeys/k"
    requests_seen: list[tuple[str, str]] = []

    def record(method: str, path: str) -> bool:
        requests_seen.append((method, path))
        return False  # no fault: only recording

    source, target = Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    objects = {"small": PAGE, "large": LARGE}
    events = []
    for key, data in objects.items():
        put_source(source, "aws_s3", key, data)
        events.append(
            event("aws_s3", source.names["aws_s3"], "gcp_gcs", target.names["gcp_gcs"], key)
        )
    submit(events, tmp_path, "--to", channel.queue)

    with FaultProxy(cloud_env["STORAGE_EMULATOR_HOST"], dialect="gcs", applies=record) as relay:
        env = {**cloud_env, "STORAGE_EMULATOR_HOST": relay.url}
        flags = ["--gcs-storage-class", "NEARLINE", "--gcs-kms-key", kms_key]
        worker = run_worker(env, channel, *flags)

    assert len(worker.outcomes("success")) == 2, worker.log_text()
    uploads = [path for method, path in requests_seen if method == "POST" and "/upload/" in path]
    for kind in ("multipart", "resumable"):
        [path] = [p for p in uploads if f"uploadType={kind}" in p]
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
        assert query["kmsKeyName"] == kms_key, path
    for key, data in objects.items():
        after = seen(target, "gcp_gcs", key)
        assert after["body"] == data
        assert after["blob"].storage_class == "NEARLINE", key


def test_a_kms_key_with_sse_s3_is_refused_at_start() -> None:
    config = tw.Config(s3_sse="AES256", s3_kms_key_id="alias/k")
    with pytest.raises(ValueError, match="need --s3-sse aws:kms"):
        config.validate(running=False)
    options = tw.WriteOptions.from_config(tw.Config(s3_kms_key_id="alias/k"))
    assert (options.s3_sse, options.s3_kms_key_id) == ("aws:kms", "alias/k")


def test_fixed_metadata_is_added_over_the_sources_and_may_not_use_the_prefix(
    tmp_path: Path,
) -> None:
    """A route's fixed metadata (WriteOptions today, routes later) wins over a source key."""
    with pytest.raises(ValueError, match="reserved"):
        tw.WriteOptions(fixed_metadata={"Transfer-Worker-Sha256": "x"})
    root = tmp_path / "root"
    stores = {p: tw.LocalObjectStore(root, p) for p in tw.PROVIDERS}
    src = tw.ObjectRef("aws_s3", "src", "k")
    upload = stores["aws_s3"].open_write(src, size=4, content_type="a/b", metadata={})
    upload.write(b"data")
    upload.commit({"team": "source", "kept": "1"})
    options = tw.WriteOptions(fixed_metadata={"team": "route"})
    engine = tw.TransferEngine(stores, options=options)
    body = json.dumps(event("aws_s3", "src", "gcp_gcs", "dst", "k")).encode()

    engine.transfer(tw.parse_event(body, tw.load_validator()))

    info = stores["gcp_gcs"].head(tw.ObjectRef("gcp_gcs", "dst", "k"))
    assert info is not None
    assert (info.metadata["team"], info.metadata["kept"]) == ("route", "1")


class GzipServingRelay(FaultProxy):
    """What real GCS does and gcp-storage-emulator does not: a download of an object stored with
    Content-Encoding gzip carries that header, so a client that decodes it (decompressive
    transcoding on the client side) would hand over the decompressed bytes."""

    def _make_server(self, port: int) -> Any:
        server = super()._make_server(port)
        base = server.RequestHandlerClass

        class Handler(base):  # type: ignore[valid-type, misc]
            def end_headers(self) -> None:
                if self.command == "GET" and "alt=media" in self.path:
                    self.send_header("Content-Encoding", "gzip")
                super().end_headers()

        server.RequestHandlerClass = Handler
        return server


def test_a_gzip_encoded_gcs_source_is_read_raw(cloud_env: dict[str, str], tmp_path: Path) -> None:
    source, target = Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    put_source(source, "gcp_gcs", "page.html.gz", PAGE)
    e = event("gcp_gcs", source.names["gcp_gcs"], "aws_s3", target.names["aws_s3"], "page.html.gz")
    submit([e], tmp_path, "--to", channel.queue)

    with GzipServingRelay(cloud_env["STORAGE_EMULATOR_HOST"], dialect="gcs") as relay:
        run_worker({**cloud_env, "STORAGE_EMULATOR_HOST": relay.url}, channel)

    after = seen(target, "aws_s3", "page.html.gz")
    assert after["body"] == PAGE  # the gzip bytes, not the page they decompress to
    assert after["fields"]["content-encoding"] == "gzip"


def test_a_field_recorded_on_the_way_is_restored_on_the_way_back(
    cloud_env: dict[str, str], tmp_path: Path
) -> None:
    """S3 to GCS records Expires (GCS has none); GCS to S3 makes it Expires again. Likewise a
    custom time GCS to S3 to GCS."""
    s3, gcs, back = Buckets(cloud_env), Buckets(cloud_env), Buckets(cloud_env)
    channel = SQSChannel(cloud_env)
    put_source(s3, "aws_s3", "from-s3", PAGE)
    put_source(gcs, "gcp_gcs", "from-gcs", PAGE)
    there = [
        event("aws_s3", s3.names["aws_s3"], "gcp_gcs", gcs.names["gcp_gcs"], "from-s3"),
        event("gcp_gcs", gcs.names["gcp_gcs"], "aws_s3", s3.names["aws_s3"], "from-gcs"),
    ]
    submit(there, tmp_path, "--to", channel.queue)
    run_worker(cloud_env, channel)
    home = [
        event("gcp_gcs", gcs.names["gcp_gcs"], "aws_s3", back.names["aws_s3"], "from-s3"),
        event("aws_s3", s3.names["aws_s3"], "gcp_gcs", back.names["gcp_gcs"], "from-gcs"),
    ]
    submit(home, tmp_path, "--to", channel.queue)
    run_worker(cloud_env, channel)

    assert seen(back, "aws_s3", "from-s3")["expires"] == EXPIRES
    assert seen(back, "gcp_gcs", "from-gcs")["custom_time"] == CUSTOM_TIME
