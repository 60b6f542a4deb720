"""ruff (configured in pyproject.toml's [tool.ruff]) finds nothing in the repository, and the tree
is formatted as ``ruff format`` formats it (``ruff format .`` fixes what the second test shows).

The dev extra installs it (``make test`` does); without it these tests skip and say so.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
needs_ruff = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[dev]' installs it)"
)


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@needs_ruff
def test_ruff_check_is_clean():
    done = _ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert done.returncode == 0, f"ruff check found problems (see pyproject.toml):\n{done.stdout}{done.stderr}"


@needs_ruff
def test_ruff_format_is_clean():
    done = _ruff("format", "--no-cache", "--check", "--diff", ".")
    assert done.returncode == 0, (
        f"not formatted as ruff format formats it; run `ruff format .`:\n{done.stdout}{done.stderr}"
    )
