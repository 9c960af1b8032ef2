"""README "The emulators by hand": its gcloud block, run literally against the Pub/Sub emulator
fixture (its port for 8085), creates the topics and the subscription and publishes its example
event, and its worker block then transfers that event, in README order: after the first
transfer (its copy already there) and next to `make run` (holding the default HTTP port). The
docs cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
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
    make_run = socket.socket()
    make_run.bind(("127.0.0.1", 0))
    make_run.listen()
    env = shell_env(tmp_path, make_run.getsockname()[1])
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
    with (tmp_path / "worker.log").open("wb") as log:
        run = subprocess.Popen(
            ["bash", "-e", "-c", worker.replace("8085", port)],
            cwd=clone,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # killpg reaches the worker under bash
        )
    try:
        wait_for(copy.is_file, TIMEOUT, message="the worker's copy of the published event")
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        code = run.wait(timeout=TIMEOUT)
        make_run.close()
    log = (tmp_path / "worker.log").read_text()
    assert code == 0, log[-4000:]
    assert "Transfer completed successfully" in log and "Transfer skipped" not in log
    source = clone / "storage_simulator/aws_s3/source-data-bucket/data/2024/01/file.parquet"
    assert copy.read_bytes() == source.read_bytes()
