"""The protocol servers the cloud campaigns need, outside pytest: moto (S3 + SQS), the
gcp-storage-emulator and the Cloud Pub/Sub emulator, all on 127.0.0.1, every start bounded.

The helpers of conftest.py are reused (free ports, bounded waits, the GCS start with retries) and
the Pub/Sub emulator is tools/pubsub_emulator.py's, patched against its streaming-pull-cancel
defect, as in the tests and for a user."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from tests import conftest as ct
from tools import pubsub_emulator

HOST = ct.HOST
PROJECT = ct.GCP_PROJECT
REGION = ct.AWS_REGION


@contextlib.contextmanager
def moto() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    from tests import moto_conditions

    moto_conditions.enforce()  # S3's If-Match on CompleteMultipartUpload, which moto ignores

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    ct._run_bounded(server.start, ct.MOTO_START_TIMEOUT, "moto server")
    url = f"http://{HOST}:{server.get_host_and_port()[1]}"
    try:
        ct.wait_for(
            lambda: ct._http_status(f"{url}/moto-api/config") in (200, 201), 30, message="moto"
        )
        yield url
    finally:
        stopper = threading.Thread(target=server.stop, name="stop-moto", daemon=True)
        stopper.start()
        stopper.join(10)


@contextlib.contextmanager
def gcs() -> Iterator[str]:
    from gcp_storage_emulator.server import create_server

    server, url = ct._start_gcs_emulator(create_server)
    try:
        yield url
    finally:
        ct._stop_gcs_emulator(server)


@contextlib.contextmanager
def pubsub() -> Iterator[str]:
    """The patched Pub/Sub emulator (tools/pubsub_emulator.py); yields "127.0.0.1:PORT"."""
    log_dir = Path(tempfile.mkdtemp(prefix="tw-pubsub-"))
    for attempt in range(3):  # the free port may be taken meanwhile
        with contextlib.suppress(pubsub_emulator.PortTaken):
            emulator = pubsub_emulator.start(ct.free_port(), log_path=log_dir / f"{attempt}.log")
            break
    else:
        raise RuntimeError(f"Pub/Sub emulator did not start; logs in {log_dir}")
    try:
        yield emulator.host_port
    finally:
        emulator.stop()


def aws_env(moto_url: str, s3_endpoint: str | None = None) -> dict[str, str]:
    """Environment for a worker: SQS (and STS) at moto, S3 at ``s3_endpoint`` (the fault proxy)."""
    return {
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ENDPOINT_URL_S3": s3_endpoint or moto_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def gcp_env(gcs_url: str, pubsub_host: str | None = None) -> dict[str, str]:
    env = {"STORAGE_EMULATOR_HOST": gcs_url, "GOOGLE_CLOUD_PROJECT": PROJECT}
    if pubsub_host:
        env["PUBSUB_EMULATOR_HOST"] = pubsub_host
    return env


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment minus real cloud credentials, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "GOOGLE_", "CLOUDSDK_", "PUBSUB_", "STORAGE_EMULATOR"))
    }
    env.update(extra)
    return env
