"""The code is in the house style: ``ruff check`` and ``ruff format --check`` are clean.

ruff comes with the ``test`` extra (pinned to one minor version in pyproject.toml,
since its formatting changes between minor versions), so CI enforces what the
README's "Dependencies" table says ruff is for. Without ruff the test skips.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    probe = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if probe.returncode:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")], ids=" ".join)
def test_ruff_is_clean(args):
    result = ruff(*args)
    assert result.returncode == 0, f"ruff {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_ruff_finds_a_violation(tmp_path):
    # The check can fail: an unused import in a file under the project's settings.
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    result = ruff("check", "--config", str(ROOT / "pyproject.toml"), str(bad))
    assert result.returncode == 1 and "F401" in result.stdout
