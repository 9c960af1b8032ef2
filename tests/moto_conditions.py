"""S3's conditions on CompleteMultipartUpload for moto's in-process server, where moto 5.2 falls
short of S3: it ignores ``If-Match`` there, and its ``If-None-Match: *`` check is not atomic with
the completion (two threads of the threaded server can both pass it).

S3 completes an upload only if the object is still the one named by ``If-Match`` (412
PreconditionFailed otherwise, 404 NoSuchKey when there is none), and checks and writes atomically.
``enforce()`` wraps moto's handler of the completing POST so that it does the same: both checks and
the completion under one lock. The worker's own code is unchanged; this only makes the emulator
behave like the service for the race tests and campaigns (README, "Emulators in the tests")."""

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
                return original(self, request, body, bucket_name, query, key_name)

        responses.S3Response._key_response_post = key_response_post
        _PATCHED = True


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
