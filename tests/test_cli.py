"""The command line as a newcomer meets it (issue 13): the installed `transfer-worker` command,
its help and messages, and `submit --wait`."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.installed import ROOT, install_worker

EXAMPLE = ROOT / "examples" / "event.json"
TIMEOUT = 60.0


def outside_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would make the clone importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_worker(tmp_path_factory.mktemp("installed"))


def run_installed(
    bin_dir: Path, *args: str, cwd: Path, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(bin_dir / "transfer-worker"), *args],
        cwd=cwd,
        env=outside_env(TRANSFER_WORKER_LOCAL_ROOT=str(cwd / "storage")),
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return result


# -------------------------------------------------------------------------------------------------
# 1. Installed like any Python tool
# -------------------------------------------------------------------------------------------------


def test_installed_command_validates_from_outside_the_clone(
    installed: Path, tmp_path: Path
) -> None:
    good = run_installed(installed, "validate", str(EXAMPLE), cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == "ok: 1 valid event(s)"
    # The schema really is read: a schema violation is reported by the installed copy.
    event = json.loads(EXAMPLE.read_text())
    event["source"]["provider"] = "azure_blob"
    bad = run_installed(installed, "validate", "-", cwd=tmp_path, stdin=json.dumps(event).encode())
    assert bad.returncode == 2
    assert "$.source.provider" in bad.stderr


def test_installed_copy_finds_its_schema_in_the_venv(installed: Path, tmp_path: Path) -> None:
    probe = "import transfer_worker as t; print(t.__file__); print(t.SCHEMA_PATH)"
    result = subprocess.run(
        [str(installed / "python"), "-c", probe],
        cwd=tmp_path,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    module, schema = (Path(line) for line in result.stdout.split())
    venv = installed.parent
    assert module.is_relative_to(venv / "lib"), module  # site-packages, not the clone
    assert schema == venv / "share" / "transfer-worker" / "event_schema.json"
    assert schema.read_bytes() == (ROOT / "event_schema.json").read_bytes()


def test_installed_help_names_the_command(installed: Path, tmp_path: Path) -> None:
    result = run_installed(installed, "submit", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: transfer-worker submit")


COMMAND_WORDS = r"(?:run|submit|validate|dlq)\b"


@pytest.mark.parametrize(
    "relative",
    [
        "README.md",
        "Dockerfile",
        "Makefile",
        "ops_profile.json",
        "docs/authentication.md",
        *sorted(
            str(p.relative_to(ROOT))
            for p in [*(ROOT / "deploy").rglob("*.yaml"), *(ROOT / "monitoring").rglob("*.yaml")]
        ),
    ],
)
def test_documents_spell_the_command_transfer_worker(relative: str) -> None:
    """A reader copies commands from these: `transfer_worker.py dlq list` fails in the image and
    outside the venv, `transfer-worker dlq list` works wherever the package is installed."""
    text = (ROOT / relative).read_text(encoding="utf-8")
    assert not re.findall(rf"transfer_worker\.py\s+{COMMAND_WORDS}", text)
    assert not re.findall(r"\"transfer_worker\.py\"", text)
