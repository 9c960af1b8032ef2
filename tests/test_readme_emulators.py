"""README "The emulators by hand": its gcloud block, run literally against the Pub/Sub emulator
fixture (its port for 8085), creates the topics and the subscription and publishes its example
event, and its worker block then transfers that event; its SQS block, against the moto fixture,
sends its event and transfers it. Both in README order: after the first transfer (its copy
already there) and next to `make run` (holding the default HTTP port). The docs cannot rot
unnoticed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import _unavailable, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
HEADING = "### The emulators by hand"
TIMEOUT = 60.0


def readme_blocks(heading: str) -> list[str]:
    """The ```bash blocks between ``heading`` and the next heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").split(heading, 1)[1]
    section = re.split(r"\n#{1,3} ", text, maxsplit=1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


FIRST = "storage_simulator/gcp_gcs/destination-data-bucket/imports/2024/01/file.parquet"


def clone_dir(tmp_path: Path) -> Path:
    """A clone's layout after the first transfer: .venv (this one), examples/, the first
    transfer's source file and its copy."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    source = tmp_path / "storage_simulator/aws_s3/source-data-bucket/data/2024/01/file.parquet"
    source.parent.mkdir(parents=True)
    source.write_bytes(os.urandom(5000))
    (tmp_path / FIRST).parent.mkdir(parents=True)
    (tmp_path / FIRST).write_bytes(source.read_bytes())
    return tmp_path


def shell_env(tmp_path: Path, http_port: int) -> dict[str, str]:
    """A user's shell without emulator variables; gcloud's config in tmp; `make run`'s HTTP
    port, taken, as what a worker without its own --http-port would listen on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUBSUB_", "CLOUDSDK_"))}
    env["CLOUDSDK_CONFIG"] = str(tmp_path / "gcloud-config")
    return {**env, "TRANSFER_WORKER_HTTP_PORT": str(http_port)}


def published_destination(block: str, clone: Path) -> Path:
    """Where the event the block publishes puts its copy: not the first transfer's."""
    [name] = re.findall(r"examples/[\w-]+\.json", block)
    destination = json.loads((clone / name).read_text())["destination"]
    assert destination["provider"] == "gcp_gcs"
    path = f"storage_simulator/gcp_gcs/{destination['bucket']}/{destination['key']}"
    assert path != FIRST, "the first transfer's copy is there: the worker would skip it"
    return clone / path


@contextlib.contextmanager
def make_run_port() -> Iterator[int]:
    """A port taken as `make run` takes 8080: the default a worker without --http-port gets."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def run_until_copied(block: str, clone: Path, env: dict[str, str], copy: Path) -> None:
    """The worker block run until ``copy`` appears, then SIGTERM: it exits 0, having logged a
    transfer (not a skip), and the copy is the first transfer's source, byte for byte."""
    with (clone / "worker.log").open("wb") as sink:
        run = subprocess.Popen(
            ["bash", "-e", "-c", block],
            cwd=clone,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # killpg reaches the worker under bash
        )
    try:
        wait_for(copy.is_file, TIMEOUT, message="the worker's copy of the example event")
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        code = run.wait(timeout=TIMEOUT)
    log = (clone / "worker.log").read_text()
    assert code == 0, log[-4000:]
    assert "Transfer completed successfully" in log and "Transfer skipped" not in log
    source = clone / "storage_simulator/aws_s3/source-data-bucket/data/2024/01/file.parquet"
    assert copy.read_bytes() == source.read_bytes()


def test_readme_gcloud_block_publishes_and_the_worker_block_transfers(
    pubsub_emulator: str, tmp_path: Path
) -> None:
    if shutil.which("gcloud") is None:
        _unavailable("the README's block runs gcloud: not on PATH")
    make, gcloud, worker, _aws = readme_blocks(HEADING)
    assert "make pubsub-emulator PORT=8085" in make
    port = pubsub_emulator.rsplit(":", 1)[1]
    assert "--http-port 8081" in worker
    worker = worker.replace("--http-port 8081", f"--http-port {free_port()}")
    clone = clone_dir(tmp_path)
    with make_run_port() as taken:
        env = shell_env(tmp_path, taken)
        published = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", gcloud.replace("8085", port)],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 2,
            check=False,
        )
        assert published.returncode == 0, published.stdout + published.stderr
        assert "messageIds:" in published.stdout
        copy = published_destination(gcloud, clone)
        run_until_copied(worker.replace("8085", port), clone, env, copy)


def test_readme_sqs_block_sends_and_its_worker_transfers(moto_server: str, tmp_path: Path) -> None:
    """The SQS block against the moto fixture (its URL for 127.0.0.1:5000, queue names of this
    test's own, its --http-port 8082 a free port): the event sent is transferred."""
    if shutil.which("aws") is None:
        _unavailable("the README's block runs the AWS CLI: not on PATH")
    *_, block = readme_blocks(HEADING)
    assert "--http-port 8082" in block
    name = f"transfers-{uuid.uuid4().hex[:8]}"
    block = block.replace("http://127.0.0.1:5000", moto_server.rstrip("/"))
    block = re.sub(r"\btransfers\b", name, block)
    block = block.replace("--http-port 8082", f"--http-port {free_port()}")
    clone = clone_dir(tmp_path)
    with make_run_port() as taken:
        env = {k: v for k, v in shell_env(tmp_path, taken).items() if not k.startswith("AWS_")}
        env["AWS_CONFIG_FILE"] = str(tmp_path / "aws-config")  # nothing of the user's ~/.aws
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "aws-credentials")
        run_until_copied(block, clone, env, published_destination(block, clone))
