"""S3's conditions on CompleteMultipartUpload for moto's in-process server, where moto 5.2 falls
short of S3: it ignores ``If-Match`` there, and its ``If-None-Match: *`` check is not atomic with
the completion (two threads of the threaded server can both pass it).

S3 completes an upload only if the object is still the one named by ``If-Match`` (412
PreconditionFailed otherwise, 404 NoSuchKey when there is none), and checks and writes atomically.
``enforce()`` wraps moto's handler of the completing POST so that it does the same: both checks and
the completion under one lock. The worker's own code is unchanged; this only makes the emulator
behave like the service for the race tests and campaigns (README, "Emulators in the tests").
It also answers an UploadPart to an aborted upload with S3's 404 NoSuchUpload, not a 500, and
computes CRC32C as S3 does: moto falls back to plain CRC32 without the optional ``crc32c``
package (so every "CRC32C" it publishes is wrong), and it completes an upload whatever full-object
CRC32C the completion names, where S3 refuses one that differs from the parts put together."""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.RLock()
_PATCHED = False


def enforce() -> None:
    """Idempotent: patch moto's S3Response once per process."""
    global _PATCHED
    with _LOCK:
        if _PATCHED:
            return
        from moto.s3 import responses

        original = responses.S3Response._key_response_post

        def key_response_post(
            self: Any, request: Any, body: bytes, bucket_name: str, query: Any, key_name: str
        ) -> Any:
            if "uploadId" not in query:
                return original(self, request, body, bucket_name, query, key_name)
            with _LOCK:
                _check_if_match(self, request, bucket_name, key_name)
                _check_full_object_crc32c(self, request, bucket_name, query)
                return original(self, request, body, bucket_name, query, key_name)

        responses.S3Response._key_response_post = key_response_post
        _answer_no_such_upload()
        _real_crc32c()
        _PATCHED = True


def _answer_no_such_upload() -> None:
    """moto looks an UploadPart's upload id up in a dict and answers a KeyError (500) for one
    that was aborted; S3 answers 404 NoSuchUpload, which the worker acts on."""
    from moto.s3 import models
    from moto.s3.exceptions import NoSuchUpload

    original = models.S3Backend.upload_part

    def upload_part(self: Any, bucket_name: str, multipart_id: str, *args: Any) -> Any:
        if multipart_id not in self.get_bucket(bucket_name).multiparts:
            raise NoSuchUpload(upload_id=multipart_id)
        return original(self, bucket_name, multipart_id, *args)

    models.S3Backend.upload_part = upload_part


def _check_if_match(response: Any, request: Any, bucket_name: str, key_name: str) -> None:
    from moto.s3.exceptions import MissingKey, PreconditionFailed

    wanted = request.headers.get("If-Match")
    if not wanted:
        return
    existing = response.backend.get_object(bucket_name, key_name)
    if existing is None:
        raise MissingKey(key=key_name)
    if wanted.strip('"') != existing.etag.strip('"'):
        raise PreconditionFailed("If-Match")


def _crc32c_b64(data: bytes) -> str:
    import base64

    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(bytes(data)).digest()).decode()


def _real_crc32c() -> None:
    """moto.s3 computes "CRC32C" as CRC32 unless the ``crc32c`` package is installed."""
    from moto.s3 import models, responses, utils

    original = utils.compute_checksum

    def compute_checksum(body: bytes, algorithm: str, encode_base64: bool = True) -> bytes:
        if algorithm != "CRC32C":
            return original(body, algorithm, encode_base64)
        import base64

        encoded = _crc32c_b64(body).encode()
        return encoded if encode_base64 else base64.b64decode(encoded)

    for module in (utils, models, responses):
        module.compute_checksum = compute_checksum  # type: ignore[attr-defined]


def _check_full_object_crc32c(response: Any, request: Any, bucket_name: str, query: Any) -> None:
    """S3 refuses (400 BadDigest) a completion whose full-object CRC32C is not the CRC32C of
    the parts put together, and the object never exists."""
    from moto.s3.exceptions import S3ClientError

    named = request.headers.get("x-amz-checksum-crc32c")
    if not named or request.headers.get("x-amz-checksum-type", "").upper() != "FULL_OBJECT":
        return
    multipart = response.backend.get_bucket(bucket_name).multiparts.get(query["uploadId"][0])
    if multipart is None:
        return  # moto's own answer: complete already (idempotent), or NoSuchUpload
    whole = b"".join(bytes(multipart.parts[number].value) for number in multipart.partlist)
    if _crc32c_b64(whole) != named:
        error = S3ClientError("BadDigest", "The CRC32C you specified did not match the object.")
        error.code = "BadDigest"
        raise error
