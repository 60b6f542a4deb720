"""ruff (configured in pyproject.toml's [tool.ruff]) finds nothing in the repository, and the tree
is formatted as ``ruff format`` formats it (``ruff format .`` fixes what the second test shows).

The dev extra installs it (``make test`` does); without it these tests skip and say so. The
JavaScript (the web runtime, the browser demo, the benchmarks' .mjs) must parse: ``node --check``,
skipped where node is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
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


def _javascript_files() -> list[Path]:
    """Every .js/.mjs of the web runtime (not its node_modules), the browser demo, and the benchmarks."""
    found = [
        path
        for folder in (ROOT / "runtime" / "web", ROOT / "examples" / "browser")
        for path in sorted(folder.rglob("*"))
        if path.suffix in (".js", ".mjs") and "node_modules" not in path.relative_to(folder).parts
    ]
    return found + sorted((ROOT / "benchmarks").glob("*.mjs"))


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (Node 20 or newer runs the web demo)")
def test_javascript_parses():
    """``node --check`` on every file, each read as the ES module it is (runtime/web's package.json says
    "type": "module", the page loads app.js as a module). Fed on stdin with --input-type=module: given a
    .js path outside such a package, Node 20 guesses the module type and exits 0 even on a syntax error."""
    files = _javascript_files()
    assert ROOT / "runtime" / "web" / "index.js" in files and ROOT / "examples" / "browser" / "app.js" in files
    failed = []
    for path in files:
        with path.open("rb") as source:
            done = subprocess.run(
                ["node", "--input-type=module", "--check"], stdin=source, capture_output=True, text=True, timeout=60
            )
        if done.returncode != 0:
            failed.append(f"{path.relative_to(ROOT)}:\n{done.stderr.strip()}")
    assert not failed, "JavaScript that does not parse:\n" + "\n\n".join(failed)
