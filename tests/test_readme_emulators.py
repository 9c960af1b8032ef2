"""README "The emulators by hand": its gcloud block, run literally against the Pub/Sub emulator
fixture (its port for 8085), creates the topics and the subscription and publishes the example
event, and its worker block then transfers that event. The docs cannot rot unnoticed."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from tests.conftest import _unavailable, wait_for

ROOT = Path(__file__).resolve().parent.parent
HEADING = "### The emulators by hand"
TIMEOUT = 60.0


def readme_blocks(heading: str) -> list[str]:
    """The ```bash blocks between ``heading`` and the next heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").split(heading, 1)[1]
    section = re.split(r"\n#{1,3} ", text, maxsplit=1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def clone_dir(tmp_path: Path) -> Path:
    """A clone's layout: .venv (this one), examples/, the first transfer's source file."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    source = tmp_path / "storage_simulator/aws_s3/source-data-bucket/data/2024/01/file.parquet"
    source.parent.mkdir(parents=True)
    source.write_bytes(os.urandom(5000))
    return tmp_path


def shell_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell without emulator variables; gcloud's config in tmp; a free metrics port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUBSUB_", "CLOUDSDK_"))}
    env["CLOUDSDK_CONFIG"] = str(tmp_path / "gcloud-config")
    return {**env, "TRANSFER_WORKER_HTTP_PORT": "0"}


def test_readme_gcloud_block_publishes_and_the_worker_block_transfers(
    pubsub_emulator: str, tmp_path: Path
) -> None:
    if shutil.which("gcloud") is None:
        _unavailable("the README's block runs gcloud: not on PATH")
    make, gcloud, worker, _aws = readme_blocks(HEADING)
    assert "make pubsub-emulator PORT=8085" in make
    port = pubsub_emulator.rsplit(":", 1)[1]
    clone = clone_dir(tmp_path)
    env = shell_env(tmp_path)
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
    copy = clone / "storage_simulator/gcp_gcs/destination-data-bucket/imports/2024/01/file.parquet"
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
    assert code == 0, (tmp_path / "worker.log").read_text()[-4000:]
    source = clone / "storage_simulator/aws_s3/source-data-bucket/data/2024/01/file.parquet"
    assert copy.read_bytes() == source.read_bytes()
