"""Any key (issue 11, item 4). What cannot be stored (a local file name over 255 bytes) and what
cannot be parsed (JSON nested 100,000 deep) dead-letter with their own reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "transfer_worker.py")

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

    result = cli(command, str(path), "--local-root", str(tmp_path / "root"))

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
