"""Any key (issue 11, item 4): every UTF-8 key of up to 1,024 bytes is moved with its bytes and its
name exactly as given (no Unicode normalisation), in all four directions, through the real CLI
against moto and gcp-storage-emulator and in local mode; the destination's transfer-source
decodes back to the exact source URI. Plus what cannot be stored (a local file name over 255
bytes) and what cannot be parsed (JSON nested 100,000 deep) dead-letter with their own reasons.
"""

from __future__ import annotations

import email.header
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
import requests

import transfer_worker as tw
from tests.test_cloud import Buckets, SQSChannel, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "transfer_worker.py")
MiB = 1024 * 1024
PART = 5 * MiB  # the smallest part: one object per direction goes multipart / resumable

pytestmark = pytest.mark.timeout(240)


# -- the CLI and local roots ------------------------------------------------------------------


def event(src: str, src_bucket: str, dst: str, dst_bucket: str, key: str) -> dict[str, Any]:
    return {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"provider": src, "bucket": src_bucket, "key": key},
        "destination": {"provider": dst, "bucket": dst_bucket, "key": key},
    }


def uri(provider: str, bucket: str, key: str) -> str:
    return f"{tw.URI_SCHEMES[provider]}://{bucket}/{key}"


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        env={**os.environ, "TRANSFER_WORKER_HTTP_PORT": "0"},
        capture_output=True,
        timeout=180,
        check=False,
    )


def submit(events: list[dict[str, Any]], tmp_path: Path, *args: str) -> None:
    """``transfer_worker.py submit`` of JSON lines, validated as a user's submit is."""
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events), "utf-8")
    result = cli("submit", str(path), *args)
    assert result.returncode == 0, result.stderr.decode()


def put_local(root: Path, provider: str, bucket: str, key: str, data: bytes) -> None:
    path = root / provider / bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def local_dead_letters(root: Path) -> list[dict[str, Any]]:
    result = cli("dlq", "list", "--local-root", str(root))
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def run_local(root: Path) -> None:
    result = cli("run", "--once", "--local-root", str(root))
    assert result.returncode == 0, result.stderr.decode()[-3000:]


# -- JSON nested too deeply ---------------------------------------------------------------------

VALID = event("aws_s3", "src-bkt", "gcp_gcs", "dst-bkt", "k")
DEEP_BODIES = {
    "array": "[" * 100_000 + "]" * 100_000,
    "inside_event": json.dumps(VALID)[:-1]
    + ', "extra": '
    + '{"a":' * 40_000
    + "1"
    + "}" * 40_000
    + "}",
}


@pytest.mark.parametrize("body", list(DEEP_BODIES.values()), ids=list(DEEP_BODIES))
def test_json_nested_too_deeply_is_an_invalid_event(body: str) -> None:
    assert len(body) < 256 * 1024  # within the message size limit: it reaches the parser
    with pytest.raises(tw.InvalidEvent) as raised:
        tw.parse_event(body.encode(), tw.load_validator())
    assert raised.value.reason == "invalid_event"
    assert "nested too deeply" in str(raised.value)
    assert tw.peek_priority(body.encode()) == "normal"
    assert tw._peek_ids(body.encode()) == (None, None)


@pytest.mark.parametrize("command", ["validate", "submit"])
@pytest.mark.parametrize("body", list(DEEP_BODIES.values()), ids=list(DEEP_BODIES))
def test_the_cli_refuses_json_nested_too_deeply_without_a_traceback(
    tmp_path: Path, command: str, body: str
) -> None:
    path = tmp_path / "deep.json"
    path.write_text(body)

    root = ["--local-root", str(tmp_path / "root")] if command == "submit" else []  # validate
    result = cli(command, str(path), *root)  # touches no root and has no --local-root

    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "nested too deeply to parse" in stderr
    assert "Traceback" not in stderr


def test_the_worker_dead_letters_json_nested_too_deeply_as_invalid_event(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name, body in DEEP_BODIES.items():
        path = tmp_path / f"{name}.json"
        path.write_text(body)
        result = cli("submit", "--no-validate", str(path), "--local-root", str(root))
        assert result.returncode == 0, result.stderr.decode()

    run_local(root)

    envelopes = local_dead_letters(root)
    assert sorted(e["body"] for e in envelopes) == sorted(DEEP_BODIES.values())
    assert {e["reason"] for e in envelopes} == {"invalid_event"}
    assert all("nested too deeply" in e["error"] for e in envelopes)


# -- a key local mode cannot store -------------------------------------------------------------


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_key_whose_part_is_too_long_for_a_file_name_is_an_invalid_key(
    tmp_path: Path, side: str
) -> None:
    """1,024 bytes with no '/' is a valid key; a file name is at most 255 bytes, so local mode
    cannot store it and says why (it was ENAMETOOLONG: internal_error for a source,
    destination_error for a destination)."""
    root = tmp_path / "root"
    long_key = "é" * 512  # 1,024 bytes, no '/'
    put_local(root, "aws_s3", "src-bkt", "short", b"data")
    e = event("aws_s3", "src-bkt", "gcp_gcs", "dst-bkt", "short")
    e[side]["key"] = long_key
    submit([e], tmp_path, "--local-root", str(root))

    run_local(root)

    [envelope] = local_dead_letters(root)
    assert envelope["reason"] == "invalid_key"
    assert "1024 bytes between slashes" in envelope["error"]
    assert envelope["event_id"] == e["eventId"]


# -- any key, in every direction ---------------------------------------------------------------

EMOJI_SEGMENT = "😀" * 63  # 252 bytes: a file name local mode can store
KEYS = {
    "accents": "café/résumé naïve.txt",
    "cyrillic": "ключ/файл.bin",
    "cjk": "日本語/中文/한국어.txt",
    "emoji": "😀/🚀 launch 🎉.bin",
    "nfc": "\u00e9cole/caf\u00e9",  # é as one code point ...
    "nfd": "e\u0301cole/cafe\u0301",  # ... and as e + combining acute: a different key
    "spaces": "with space/a b  c ",
    "plus": "a+b/c+d",
    "percent": "100%/a%20b%2Fc",
    "hash": "a#b",
    "question": "a?b",
    "ampersand": "a&b",
    "equals": "a=b",
    "query_like": "q?x=1&y=2#frag+%",
    "encoded_word": "=?UTF-8?B?aGk=?=",  # a key that looks like RFC 2047 stays itself
    "long_slashed": "/".join([EMOJI_SEGMENT] * 4) + "/" + "é" * 6,  # 1,024 bytes
}
LONG_NAMES = {  # 1,023 to 1,024 bytes with no '/': fine in a bucket, too long for a file name
    "long_ascii": "a" * 1024,
    "long_accents": "é" * 512,
    "long_cjk": "日" * 341,
}
MULTIPART_KEY = "multipart/Größe 😀.bin"
assert all(len(key.encode()) == 1024 for key in (KEYS["long_slashed"], LONG_NAMES["long_ascii"]))


def content(key: str) -> bytes:
    size = PART + 1 if key == MULTIPART_KEY else 300
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decoded(value: str) -> str:
    """An S3 metadata value decoded by the standard library, independently of the worker."""
    if not value.startswith("=?"):
        return value
    return "".join(data.decode(charset) for data, charset in email.header.decode_header(value))


# -- S3 metadata in and out -------------------------------------------------------------------


@pytest.mark.parametrize("key", [*KEYS.values(), *LONG_NAMES.values()], ids=[*KEYS, *LONG_NAMES])
def test_every_key_round_trips_through_s3_metadata_as_ascii(key: str) -> None:
    source = uri("aws_s3", "src-bkt", key)
    sent = tw._s3_metadata_out({tw.META_SOURCE: source})
    assert sent[tw.META_SOURCE].isascii()
    assert decoded(sent[tw.META_SOURCE]) == source  # what any RFC 2047 reader makes of it
    assert tw._s3_metadata_in(sent) == {tw.META_SOURCE: source}


def test_the_largest_metadata_the_worker_writes_fits_within_s3s_2_kb() -> None:
    """gs:// + a 222-byte bucket (dotted, the longest GCS allows) + 1,024 bytes of emoji, with
    the other metadata at their longest (microsecond timestamp with an offset, a 19-digit
    generation: an int64)."""
    bucket = ".".join(["b" * 63] * 3) + "." + "c" * 30
    assert len(bucket) == 222
    metadata = {
        tw.META_EVENT_ID: str(uuid.uuid4()),
        tw.META_SOURCE: uri("gcp_gcs", bucket, "😀" * 256),
        tw.META_EVENT_TIME: "2026-12-01T19:01:06.123456+00:00",
        tw.META_SOURCE_ATTRIBUTE + "generation": "9" * 19,
        tw.META_SOURCE_ATTRIBUTE + "metageneration": "9" * 6,
        tw.META_SHA256: "f" * 64,
    }
    sent = tw._s3_metadata_out(metadata)
    assert sum(len(k) + len(v) for k, v in sent.items()) == 2005
    assert tw._s3_metadata_in(sent) == metadata


def test_metadata_over_2_kb_is_refused_not_cut() -> None:
    with pytest.raises(tw.PermanentError) as raised:
        tw._s3_metadata_out({"a": "x" * 2048})
    assert raised.value.reason == "metadata_unrepresentable"  # was metadata_too_large
    assert "'a'" in str(raised.value)


def test_s3_head_decodes_encoded_words_and_keeps_values_that_only_look_like_them(
    aws_env: str,
) -> None:
    """Values as S3 itself (or another tool) may have stored them, read by S3Store.head."""
    import boto3

    stored = {
        "b-word": ("=?UTF-8?B?w6l0w6k=?=", "été"),
        "q-word": ("=?utf-8?q?caf=C3=A9?=", "café"),
        "two-words": ("=?UTF-8?B?0LrQu9GO?= =?UTF-8?B?0Yc=?=", "ключ"),
        "plain": ("s3://b/=?UTF-8?B?aGk=?=", "s3://b/=?UTF-8?B?aGk=?="),
        "bad-base64": ("=?UTF-8?B?a?=", "=?UTF-8?B?a?="),
        "bad-alphabet": ("=?UTF-8?B?!!!?=", "=?UTF-8?B?!!!?="),  # the stdlib would make it ""
        "not-utf8": ("=?UTF-8?B?/w==?=", "=?UTF-8?B?/w==?="),
        "unknown-charset": ("=?x-unknown?B?aGk=?=", "=?x-unknown?B?aGk=?="),
        "trailing-text": ("=?UTF-8?B?aGk=?= and more", "=?UTF-8?B?aGk=?= and more"),
    }
    s3 = boto3.client("s3", endpoint_url=aws_env)
    bucket = f"head-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    raw = {name: value for name, (value, _) in stored.items()}
    s3.put_object(Bucket=bucket, Key="k", Body=b"x", Metadata=raw)

    info = tw.S3Store().head(tw.ObjectRef("aws_s3", bucket, "k"))

    assert info is not None
    assert info.metadata == {name: expected for name, (_, expected) in stored.items()}


# -- four directions through the CLI, against moto and gcp-storage-emulator ------------------

DIRECTIONS = {
    "s3_to_gcs": ("aws_s3", "gcp_gcs"),
    "gcs_to_s3": ("gcp_gcs", "aws_s3"),
    "s3_to_s3": ("aws_s3", "aws_s3"),
    "gcs_to_gcs": ("gcp_gcs", "gcp_gcs"),
}
CLOUD_KEYS = {**KEYS, **LONG_NAMES, "multipart": MULTIPART_KEY}


@pytest.fixture
def cloud_env(aws_env: str, gcs_env: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": aws_env, "STORAGE_EMULATOR_HOST": gcs_env}


def read_destination(buckets: Buckets, provider: str, key: str) -> tuple[bytes | str, dict]:
    """The destination's bytes (or, on GCS, its server-computed MD5 where the emulator cannot
    serve the download) and its user metadata as stored, undecoded."""
    if provider == "aws_s3":
        response = buckets.s3.get_object(Bucket=buckets.names[provider], Key=key)
        return response["Body"].read(), response["Metadata"]
    blob = buckets.gcs.bucket(buckets.names[provider]).get_blob(key)
    assert blob is not None, key
    metadata = dict(blob.metadata or {})
    if not all(value.isascii() or _latin1(value) for value in metadata.values()):
        # gcp-storage-emulator sends custom metadata as latin-1 response headers on a download
        # and drops the connection when a value is not latin-1 (test_gcs_emulator_* below):
        # the stored bytes are checked by the MD5 the emulator computed from them instead.
        return blob.md5_hash, metadata
    fresh = buckets.gcs.bucket(buckets.names[provider]).blob(key)  # no emulator mediaLink
    return fresh.download_as_bytes(), metadata


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def md5_b64(data: bytes) -> str:
    return tw._b64(hashlib.md5(data, usedforsecurity=False).digest())


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_every_key_is_copied_exactly_in_every_direction(
    cloud_env: dict[str, str], tmp_path: Path, direction: str
) -> None:
    src, dst = DIRECTIONS[direction]
    source, target = Buckets(cloud_env), Buckets(cloud_env)  # same provider: two buckets
    channel = SQSChannel(cloud_env)
    keys = dict(CLOUD_KEYS)
    if direction == "gcs_to_gcs":
        # A resumable upload streams while the source is read; the emulator serves one request
        # at a time, so reading and writing the same emulator at once waits forever.
        del keys["multipart"]
    events = {}
    for name, key in keys.items():
        source.put(src, key, content(key))
        events[name] = event(src, source.names[src], dst, target.names[dst], key)
    submit(list(events.values()), tmp_path, "--to", channel.queue)

    worker = WorkerProcess(cloud_env, channel, "--part-size", str(PART), once=True)
    assert worker.wait() == 0, worker.log_text()

    assert len(worker.outcomes("success")) == len(keys), worker.log_text()
    assert sorted(target.keys(dst)) == sorted(keys.values())  # byte-exact names, NFD too
    for name, key in keys.items():
        data, metadata = read_destination(target, dst, key)
        assert data == (content(key) if isinstance(data, bytes) else md5_b64(content(key))), name
        assert decoded(metadata[tw.META_SOURCE]) == uri(src, source.names[src], key), name
        if (src, dst, name) == ("gcp_gcs", "aws_s3", "multipart"):  # read once (ADR 6)
            crc32c = google_crc32c.Checksum(content(key)).digest().hex()
            assert metadata[tw.META_CRC32C] == crc32c, name
        else:
            assert metadata[tw.META_SHA256] == sha(content(key)), name
        assert metadata[tw.META_EVENT_ID] == events[name]["eventId"], name
        assert dst == "gcp_gcs" or all(value.isascii() for value in metadata.values()), name
    assert channel.is_empty()


@pytest.mark.xfail(
    strict=True,
    raises=requests.exceptions.ConnectionError,
    reason="gcp-storage-emulator 2026.7.19 writes custom metadata into x-goog-meta-* headers "
    "of a download with http.server's latin-1 encoding, which raises for '\\u0301'; the "
    "connection is dropped",
)
def test_gcs_emulator_downloads_an_object_whose_metadata_is_not_latin1(gcs_env: str) -> None:
    """The emulator bug read_destination() works around, shown with google-cloud-storage alone
    (no worker involved). Once this passes, read_destination() can drop its MD5 fallback."""
    from google.cloud import storage

    client = storage.Client()
    bucket = client.create_bucket(f"emu-{uuid.uuid4().hex[:10]}")
    blob = bucket.blob("k")
    blob.metadata = {"m": "e\u0301"}
    blob.upload_from_string(b"data")
    stored = bucket.get_blob("k")
    assert stored is not None and stored.metadata == {"m": "e\u0301"}  # the JSON API is right
    assert bucket.blob("k").download_as_bytes(retry=None, timeout=10) == b"data"


# -- every key in local mode -----------------------------------------------------------------


def local_event(src: str, dst: str, key: str) -> dict[str, Any]:
    return event(src, f"src-{src[:3]}", dst, f"dst-{src[:3]}-{dst[:3]}", key)


def test_every_key_is_copied_exactly_in_local_mode(tmp_path: Path) -> None:
    root = tmp_path / "root"
    events = []
    for src, dst in DIRECTIONS.values():
        for key in KEYS.values():
            put_local(root, src, f"src-{src[:3]}", key, content(key))
            events.append(local_event(src, dst, key))
    submit(events, tmp_path, "--local-root", str(root))

    run_local(root)

    assert local_dead_letters(root) == []
    for e in events:
        src, dst = e["source"], e["destination"]
        store = tw.LocalObjectStore(root, dst["provider"])
        bucket = store.bucket_dir(dst["bucket"])
        if src["key"] == KEYS["accents"]:  # once per direction
            found = sorted(str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file())
            assert found == sorted(KEYS.values())  # as given: the NFC and the NFD key both
        info = store.head(tw.ObjectRef(dst["provider"], dst["bucket"], dst["key"]))
        assert info is not None
        assert (bucket / dst["key"]).read_bytes() == content(src["key"])
        assert info.metadata[tw.META_SOURCE] == uri(src["provider"], src["bucket"], src["key"])
