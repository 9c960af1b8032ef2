"""Two small newcomer findings: `dlq --reason` with a reason that does not exist is refused
(it used to list nothing and redrive nothing, exit 0), and a missing source BUCKET is named as
the bucket, not as a key that happens to be absent (moto server and the local store)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import transfer_worker as tw

HERE = Path(__file__).resolve().parent.parent
SCRIPT = str(HERE / "transfer_worker.py")

pytestmark = pytest.mark.timeout(120)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=HERE, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("action", ["list", "redrive"])
def test_an_unknown_dlq_reason_is_an_error_naming_the_known_ones(
    tmp_path: Path, action: str
) -> None:
    result = cli("dlq", action, "--local-root", str(tmp_path), "--reason", "sourcenotfound")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown --reason sourcenotfound" in result.stderr
    for known in ("source_not_found", "queue_delivery_limit", "malformed_envelope", "forbidden"):
        assert known in result.stderr
    assert "Traceback" not in result.stderr


def test_a_known_dlq_reason_is_still_accepted(tmp_path: Path) -> None:
    result = cli("dlq", "list", "--local-root", str(tmp_path), "--reason", "source_not_found")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_every_reason_the_worker_raises_is_a_known_dlq_reason() -> None:
    """The literal reasons in the module (reason="..." and default_reason) that can end in a
    dead letter: a reason added later without DEAD_LETTER_REASONS would be refused by dlq."""
    import ast

    retry_only = {tw.THROTTLED, tw.UNAVAILABLE, tw.NETWORK, tw.TIMEOUT, tw.CREDENTIALS}
    retry_only |= {tw.UNREACHABLE, tw.DAMAGED, tw.CLOCK_SKEW, tw.TRANSIENT, "source_changed"}
    retry_only |= {"commit_refused", "same_content"}  # re-plans; a skip's reason
    tree = ast.parse(Path(tw.__file__).read_text())
    literal = {
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, (ast.keyword, ast.Assign))
        and getattr(node, "arg", None) in ("reason", None)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        and (isinstance(node, ast.keyword) or _names(node) == {"default_reason"})
    }
    assert literal - retry_only - tw.DEAD_LETTER_REASONS == set()


def _names(node: object) -> set[str]:
    targets = getattr(node, "targets", [])
    return {t.id for t in targets if hasattr(t, "id")}


def event_from(bucket: str, provider: str) -> tw.TransferEvent:
    source = tw.ObjectRef(provider, bucket, "in/a.bin")
    return tw.TransferEvent(
        event_id=str(uuid.uuid4()),
        correlation_id=str(uuid.uuid4()),
        timestamp=dt.datetime.now(dt.UTC),
        source=source,
        destination=tw.ObjectRef(provider, bucket, "out/a.bin"),
        content_type=None,
        checksum_sha256=None,
        max_retries=0,
        priority="normal",
    )


def plan_error(store: tw.ObjectStore, event: tw.TransferEvent) -> tw.PermanentError:
    with pytest.raises(tw.PermanentError) as caught:
        tw.TransferEngine._plan(event, store, store)
    assert caught.value.reason == "source_not_found"
    return caught.value


def test_a_missing_s3_source_bucket_is_named_as_the_bucket(aws_env: str) -> None:
    import boto3

    store = tw.S3Store()
    error = plan_error(store, event_from("no-such-src-bucket", "aws_s3"))
    assert str(error) == "source bucket s3://no-such-src-bucket does not exist"
    bucket = f"src-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    error = plan_error(store, event_from(bucket, "aws_s3"))  # the bucket is there: the key is not
    assert str(error) == f"source s3://{bucket}/in/a.bin does not exist"


def test_a_missing_local_source_bucket_is_named_as_the_bucket(tmp_path: Path) -> None:
    store = tw.LocalObjectStore(tmp_path, "aws_s3")
    error = plan_error(store, event_from("no-such-src-bucket", "aws_s3"))
    assert str(error) == "source bucket s3://no-such-src-bucket does not exist"
    store.bucket_dir("here").mkdir(parents=True)
    error = plan_error(store, event_from("here", "aws_s3"))
    assert str(error) == "source s3://here/in/a.bin does not exist"


def test_a_missing_gcs_source_bucket_is_named_as_the_bucket(gcs_env: str) -> None:
    store = tw.GCSStore()
    error = plan_error(store, event_from("no-such-src-bucket", "gcp_gcs"))
    assert str(error) == "source bucket gs://no-such-src-bucket does not exist"
    bucket = f"src-{uuid.uuid4().hex[:8]}"
    store.client.create_bucket(bucket)
    error = plan_error(store, event_from(bucket, "gcp_gcs"))
    assert str(error) == f"source gs://{bucket}/in/a.bin does not exist"
