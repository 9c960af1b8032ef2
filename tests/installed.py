"""An installed copy of the worker, as `pip install .` makes it: a fresh virtualenv with the
pinned dependencies (requirements.txt) and the package built from a copy of only the files the
Dockerfile's builder copies (pyproject.toml, the module, its schema), so nothing of the clone is
importable. uv takes the wheels from its cache: about 2 s."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FILES = ("pyproject.toml", "transfer_worker.py", "event_schema.json")
INSTALL_TIMEOUT = 300.0  # a cold uv cache downloads the pins


def install_worker(directory: Path) -> Path:
    """A virtualenv under ``directory`` with the worker installed; returns its bin directory."""
    uv = Path(sys.executable).with_name("uv")
    if not uv.is_file():
        pytest.skip("uv is not installed beside this Python (make install-dev installs it)")
    source = directory / "src"
    source.mkdir(parents=True)
    for name in PACKAGE_FILES:
        shutil.copy2(ROOT / name, source / name)
    venv = directory / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    requirements = str(ROOT / "requirements.txt")
    run(
        [
            str(uv),
            "pip",
            "install",
            "--quiet",
            "--python",
            str(python),
            "-r",
            requirements,
            str(source),
        ]
    )
    return venv / "bin"


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, timeout=INSTALL_TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-4000:]
