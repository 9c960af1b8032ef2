"""Smoke tests: each server fixture in tests/conftest.py really serves its protocol.

Run: .venv/bin/python -m pytest tests/test_servers.py -v -p no:cacheprovider   (and with CI=true)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import GCP_PROJECT, PubsubResources, ci_strict, free_port, wait_for

KIB = 1024
MIB = 1024 * KIB


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


# --------------------------------------------------------------------------------------------
# helpers in conftest
# --------------------------------------------------------------------------------------------


def test_free_port_and_wait_for_are_bounded() -> None:
    port = free_port()
    assert 0 < port < 65536
    assert wait_for(lambda: 42, timeout=1) == 42
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="never"):
        wait_for(lambda: False, timeout=0.3, message="never")
    assert time.monotonic() - started < 2


def test_missing_tool_skips_locally_and_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import conftest

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        conftest._unavailable("no widget")
    monkeypatch.setenv("CI", "true")
    assert ci_strict()
    with pytest.raises(pytest.fail.Exception, match="no widget"):
        conftest._unavailable("no widget")


# --------------------------------------------------------------------------------------------
# moto: S3, SQS, STS
# --------------------------------------------------------------------------------------------


def _aws_client(service: str, endpoint: str, **kwargs: Any) -> Any:
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        **kwargs,
    )


def test_s3_put_get_checksum_and_conditional_get(moto_server: str) -> None:
    from botocore.exceptions import ClientError

    s3 = _aws_client("s3", moto_server)
    bucket = _unique("src")
    s3.create_bucket(Bucket=bucket)
    body = b"hello transfer-worker\n" * 100
    sha = _b64(hashlib.sha256(body).digest())

    put = s3.put_object(
        Bucket=bucket, Key="dir/obj.txt", Body=body, ChecksumAlgorithm="SHA256", Metadata={"k": "v"}
    )
    assert put["ChecksumSHA256"] == sha
    head = s3.head_object(Bucket=bucket, Key="dir/obj.txt", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == sha
    assert head["Metadata"] == {"k": "v"}
    assert head["ContentLength"] == len(body)

    got = s3.get_object(
        Bucket=bucket, Key="dir/obj.txt", IfMatch=head["ETag"], ChecksumMode="ENABLED"
    )
    assert got["Body"].read() == body
    assert got["ChecksumSHA256"] == sha

    with pytest.raises(ClientError) as err:
        s3.get_object(
            Bucket=bucket, Key="dir/obj.txt", IfMatch='"0123456789abcdef0123456789abcdef"'
        )
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as err:  # conditional write (overwrite=never style)
        s3.put_object(Bucket=bucket, Key="dir/obj.txt", Body=b"other", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as err:
        s3.head_object(Bucket=bucket, Key="missing")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_s3_multipart_upload_and_list_multipart_uploads(moto_server: str) -> None:
    s3 = _aws_client("s3", moto_server)
    bucket = _unique("dst")
    s3.create_bucket(Bucket=bucket)
    part1, part2 = os.urandom(5 * MIB), os.urandom(1234)

    mpu = s3.create_multipart_upload(
        Bucket=bucket, Key="big.bin", ChecksumAlgorithm="SHA256", Metadata={"sha256": "x"}
    )
    upload_id = mpu["UploadId"]
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [("big.bin", upload_id)]

    parts = []
    for number, data in ((1, part1), (2, part2)):
        resp = s3.upload_part(
            Bucket=bucket,
            Key="big.bin",
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm="SHA256",
        )
        assert resp["ChecksumSHA256"] == _b64(hashlib.sha256(data).digest())
        parts.append(
            {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": resp["ChecksumSHA256"]}
        )
    listed = s3.list_parts(Bucket=bucket, Key="big.bin", UploadId=upload_id)["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in listed] == [(1, len(part1)), (2, len(part2))]

    done = s3.complete_multipart_upload(
        Bucket=bucket, Key="big.bin", UploadId=upload_id, MultipartUpload={"Parts": parts}
    )
    assert done["ETag"].strip('"').endswith("-2")
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    got = s3.get_object(Bucket=bucket, Key="big.bin")
    assert got["Body"].read() == part1 + part2
    assert got["Metadata"] == {"sha256": "x"}

    # abort leaves nothing behind
    other = s3.create_multipart_upload(Bucket=bucket, Key="aborted.bin")["UploadId"]
    s3.abort_multipart_upload(Bucket=bucket, Key="aborted.bin", UploadId=other)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_sqs_send_receive_visibility_receive_count_delete(moto_server: str) -> None:
    sqs = _aws_client("sqs", moto_server)
    url = sqs.create_queue(QueueName=_unique("q"), Attributes={"VisibilityTimeout": "30"})[
        "QueueUrl"
    ]
    assert url.startswith(moto_server)
    sqs.send_message(QueueUrl=url, MessageBody='{"eventId": "e1"}')

    def receive() -> list[dict[str, Any]]:
        return sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=1,
            WaitTimeSeconds=1,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        ).get("Messages", [])

    first = receive()
    assert len(first) == 1 and first[0]["Body"] == '{"eventId": "e1"}'
    assert first[0]["Attributes"]["ApproximateReceiveCount"] == "1"
    assert receive() == []  # invisible for 30 s

    sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=first[0]["ReceiptHandle"], VisibilityTimeout=0
    )
    second = receive()
    assert len(second) == 1 and second[0]["MessageId"] == first[0]["MessageId"]
    assert second[0]["Attributes"]["ApproximateReceiveCount"] == "2"

    sqs.delete_message(QueueUrl=url, ReceiptHandle=second[0]["ReceiptHandle"])
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0"
    assert attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_sts_assume_role_with_web_identity(moto_server: str) -> None:
    sts = _aws_client("sts", moto_server)
    resp = sts.assume_role_with_web_identity(
        RoleArn="arn:aws:iam::123456789012:role/transfer-worker",
        RoleSessionName="transfer-worker-test",
        WebIdentityToken="header.payload.signature",  # moto does not verify the token
        DurationSeconds=900,
    )
    creds = resp["Credentials"]
    assert creds["AccessKeyId"].startswith("ASIA")
    assert resp["AssumedRoleUser"]["Arn"].endswith(
        ":assumed-role/transfer-worker/transfer-worker-test"
    )
    import boto3

    s3 = boto3.client(  # the temporary credentials are usable against moto
        "s3",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
    )
    s3.list_buckets()


def test_aws_env_reaches_subprocess_and_web_identity_provider(
    aws_env: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subprocess inherits aws_env; botocore's web-identity provider talks to moto's STS."""
    token = tmp_path / "token"
    token.write_text("header.payload.signature")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/web")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ROLE_SESSION_NAME", "sub-proc")
    code = (
        "import boto3; s=boto3.session.Session(); "
        "print(s.get_credentials().method); "
        "print(boto3.client('sts').get_caller_identity()['Arn']); "
        "print(boto3.client('s3').meta.endpoint_url)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out[0] == "assume-role-with-web-identity"
    assert out[1] == "arn:aws:sts::123456789012:assumed-role/web/sub-proc"
    assert out[2] == aws_env


# --------------------------------------------------------------------------------------------
# GCS: gcp-storage-emulator via google-cloud-storage
# --------------------------------------------------------------------------------------------


def _crc32c_b64(data: bytes) -> str:
    import google_crc32c

    return _b64(google_crc32c.Checksum(data).digest())


def _md5_b64(data: bytes) -> str:
    return _b64(hashlib.md5(data).digest())


def test_gcs_upload_download_metadata_generation(gcs_client: Any) -> None:
    bucket = gcs_client.create_bucket(_unique("gcs"))
    blob = bucket.blob("dir/obj.txt")
    blob.metadata = {"sha256": "abc", "source": "s3://b/k"}
    blob.upload_from_string(b"hello", content_type="text/plain")
    gen1 = blob.generation
    assert isinstance(gen1, int) and gen1 > 0
    assert blob.md5_hash == _md5_b64(b"hello")
    assert blob.crc32c == _crc32c_b64(b"hello")
    # QUIRK: an upload carrying custom metadata starts at metageneration 2 (real GCS: 1),
    # because the emulator applies the metadata as a patch after creating the resource.
    assert blob.metageneration in (1, 2)

    fetched = bucket.get_blob("dir/obj.txt")
    assert fetched.generation == gen1
    assert fetched.metadata == {"sha256": "abc", "source": "s3://b/k"}
    assert fetched.size == 5 and fetched.content_type == "text/plain"
    assert bucket.blob("dir/obj.txt").download_as_bytes() == b"hello"
    assert bucket.blob("dir/obj.txt").download_as_bytes(start=1, end=3) == b"ell"

    meta_gen = fetched.metageneration
    fetched.metadata = {"sha256": "abc", "source": "s3://b/k2"}
    fetched.patch()
    assert fetched.generation == gen1
    assert fetched.metageneration == meta_gen + 1

    again = bucket.blob("dir/obj.txt")
    again.upload_from_string(b"hello again")
    assert again.generation > gen1  # a new write is a new generation
    assert bucket.get_blob("dir/obj.txt").metadata in (None, {})  # metadata not carried over
    assert bucket.get_blob("missing") is None


def test_gcs_resumable_upload_in_chunks(gcs_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gcp_storage_emulator.server")
    bucket = gcs_client.create_bucket(_unique("gcs"))
    chunk = 256 * KIB
    data = os.urandom(2 * chunk + 12345)  # 3 chunks, last one short
    blob = bucket.blob("big.bin", chunk_size=chunk)
    blob.metadata = {"sha256": hashlib.sha256(data).hexdigest()}
    blob.upload_from_file(
        io.BytesIO(data), content_type="application/octet-stream", checksum="crc32c"
    )

    chunk_puts = [r.getMessage() for r in caplog.records if "upload_id=" in r.getMessage()]
    assert len(chunk_puts) == 3, chunk_puts  # really chunked: 308, 308, 200
    assert blob.size == len(data)
    assert blob.md5_hash == _md5_b64(data)
    assert blob.crc32c == _crc32c_b64(data)
    got = bucket.get_blob("big.bin")
    assert got.metadata == {"sha256": hashlib.sha256(data).hexdigest()}
    assert got.download_as_bytes(checksum="crc32c") == data
    buf = io.BytesIO()
    bucket.blob("big.bin", chunk_size=chunk).download_to_file(buf, checksum="md5")  # chunked read
    assert buf.getvalue() == data


def test_gcs_rejects_wrong_md5(gcs_client: Any) -> None:
    from google.api_core.exceptions import BadRequest

    bucket = gcs_client.create_bucket(_unique("gcs"))
    blob = bucket.blob("bad")
    blob.md5_hash = _md5_b64(b"something else")
    with pytest.raises(BadRequest, match="MD5"):
        blob.upload_from_string(b"zzz")
    assert bucket.get_blob("bad") is None


def test_gcs_env_client_without_credentials(gcs_env: str, gcs_client: Any) -> None:
    """With gcs_env a plain storage.Client() (what the worker builds) needs no credentials."""
    from google.cloud import storage

    name = _unique("gcs")
    gcs_client.create_bucket(name)
    client = storage.Client()
    assert client.project == GCP_PROJECT
    client.bucket(name).blob("x").upload_from_string(b"1")
    assert [b.name for b in client.bucket(name).list_blobs()] == ["x"]


# --------------------------------------------------------------------------------------------
# Pub/Sub emulator via google-cloud-pubsub
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def streaming_pull(
    res: PubsubResources, callback: Callable[[Any], None], **kwargs: Any
) -> Iterator[Any]:
    future = res.subscriber.subscribe(res.subscription, callback, **kwargs)
    try:
        yield future
    finally:
        future.cancel()
        with contextlib.suppress(Exception):
            future.result(timeout=10)


def _publish(res: PubsubResources, data: bytes, **attrs: str) -> str:
    return str(res.publisher.publish(res.topic, data, **attrs).result(timeout=10))


@pytest.mark.timeout(60)
def test_pubsub_publish_streaming_pull_ack(
    pubsub_topic_subscription: Callable[..., PubsubResources],
) -> None:
    res = pubsub_topic_subscription()
    message_id = _publish(res, b'{"eventId": "e1"}', origin="test")
    seen: list[Any] = []

    def callback(msg: Any) -> None:
        seen.append(msg)
        msg.ack()

    with streaming_pull(res, callback):
        wait_for(lambda: seen, 15, message="first delivery")
    assert seen[0].message_id == message_id
    assert seen[0].data == b'{"eventId": "e1"}'
    assert seen[0].attributes["origin"] == "test"
    assert seen[0].delivery_attempt is None  # no dead_letter_policy -> not populated

    # acked: nothing left for a synchronous pull
    from google.api_core.exceptions import DeadlineExceeded

    try:
        left = res.subscriber.pull(subscription=res.subscription, max_messages=5, timeout=2)
        assert list(left.received_messages) == []
    except DeadlineExceeded:
        pass  # the emulator holds an empty pull open; the client gave up: nothing there


@pytest.mark.timeout(60)
def test_pubsub_nack_redelivers(pubsub_topic_subscription: Callable[..., PubsubResources]) -> None:
    res = pubsub_topic_subscription()
    message_id = _publish(res, b"nack-me")
    deliveries: list[str] = []

    def callback(msg: Any) -> None:
        deliveries.append(msg.message_id)
        if len(deliveries) == 1:
            msg.nack()
        else:
            msg.ack()

    with streaming_pull(res, callback):
        wait_for(lambda: len(deliveries) >= 2, 15, message="redelivery after nack")
    assert deliveries[:2] == [message_id, message_id]


@pytest.mark.timeout(60)
def test_pubsub_dead_letter_policy_delivery_attempt(
    pubsub_topic_subscription: Callable[..., PubsubResources],
) -> None:
    """The emulator populates delivery_attempt (1, 2, ...) when a dead_letter_policy is set and
    forwards the message to the dead-letter topic after max_delivery_attempts nacks."""
    res = pubsub_topic_subscription(dead_letter=True, max_delivery_attempts=5)
    assert res.dead_letter_subscription is not None
    message_id = _publish(res, b"poison")
    attempts: list[int | None] = []

    def callback(msg: Any) -> None:
        attempts.append(msg.delivery_attempt)
        msg.nack()

    with streaming_pull(res, callback):
        wait_for(lambda: len(attempts) >= 5, 20, message="5 delivery attempts")
        dead: list[Any] = []

        def pulled() -> bool:
            resp = res.subscriber.pull(
                subscription=res.dead_letter_subscription, max_messages=1, timeout=3
            )
            dead.extend(resp.received_messages)
            return bool(dead)

        wait_for(pulled, 20, message="message on the dead-letter topic")
    assert attempts[:5] == [1, 2, 3, 4, 5]
    assert len(attempts) == 5  # not delivered again after being dead-lettered
    msg = dead[0].message
    assert msg.data == b"poison"
    assert msg.attributes["CloudPubSubDeadLetterSourceDeliveryCount"] == "5"
    assert (
        msg.attributes["CloudPubSubDeadLetterSourceSubscription"]
        == res.subscription.rsplit("/", 1)[1]
    )
    assert msg.message_id != message_id  # re-published on the dead-letter topic: new id
    res.subscriber.acknowledge(
        subscription=res.dead_letter_subscription, ack_ids=[dead[0].ack_id], timeout=10
    )


@pytest.mark.timeout(60)
def test_pubsub_cancelled_streaming_pull_then_redelivery(
    pubsub_topic_subscription: Callable[..., PubsubResources],
) -> None:
    """Regression for the emulator 0.8.20 NoSuchMethodError on cancel (see conftest.py).

    Unpatched (TW_PUBSUB_EMULATOR_UNPATCHED=1) the server keeps the cancelled stream as a live
    subscriber: "after-cancel" is handed to the dead stream and never reaches the new one.
    """
    res = pubsub_topic_subscription(ack_deadline_seconds=10)  # 10 s is the minimum
    held_id = _publish(res, b"held")
    first = threading.Event()

    def hold(msg: Any) -> None:  # receive, never ack
        first.set()

    with streaming_pull(res, hold):
        assert first.wait(15), "no first delivery"
    # streaming pull cancelled with "held" un-acked
    cancelled_at = time.monotonic()
    after_id = _publish(res, b"after-cancel")
    got: dict[str, float] = {}

    def callback(msg: Any) -> None:
        got.setdefault(msg.message_id, time.monotonic() - cancelled_at)
        msg.ack()

    with streaming_pull(res, callback):
        wait_for(lambda: after_id in got, 8, message="a message published after the cancel")
        # the un-acked message comes back once its ack deadline (10 s) has expired
        wait_for(lambda: held_id in got, 25, message="redelivery of the un-acked message")
    assert got[held_id] >= 5  # it was leased, not nacked, by the cancelled subscriber
