"""``ruff check`` passes with the repository's configuration (``[tool.ruff]`` in pyproject.toml).

Run as a test so that CI (``.ci/run``: the whole suite, newest and lower-bound releases) lints every change.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The whole repository.
LINTED = ["."]


def ruff_command() -> list[str]:
    """How to run ruff here: its console script, else its module in this interpreter (the ``test`` extra)."""
    script = shutil.which("ruff")
    if script is not None:
        return [script]
    probe = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("ruff is not installed (it is in the `test` extra: pip install -e '.[test]')")
    return [sys.executable, "-m", "ruff"]


def test_ruff_check_is_clean():
    result = subprocess.run([*ruff_command(), "check", "--no-cache", *LINTED], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
