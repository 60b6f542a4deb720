"""Packaging: the wheel installs one import package, and the CLI stays light until a stage runs."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

from conftest import ROOT


def test_wheel_installs_only_reft_edge(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next((tmp_path / "dist").glob("reft_edge-*.whl"))
    venv.create(tmp_path / "venv", with_pip=False)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    top_level = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert top_level == ["reft_edge"]
    for stage in ("train", "export", "runtime"):
        assert (target / "reft_edge" / stage / "__init__.py").is_file()
    assert (target / "reft_edge" / "runtime" / "patch.py").is_file()


def test_cli_and_runtime_import_without_torch():
    code = (
        "import sys, reft_edge.cli, reft_edge.runtime; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path("/"))
