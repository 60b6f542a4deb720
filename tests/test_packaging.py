"""Packaging: the wheel installs one import package, and the CLI stays light until a stage runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import click
import pytest

from conftest import ROOT

COMMANDS = (
    "chat",
    "convert",
    "eval",
    "export",
    "import",
    "inspect",
    "run",
    "serve",
    "serve-web",
    "train",
    "train-many",
)


def _wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from a copy of what the build reads: setuptools builds in ./build,
    and a build/ folder an older build left in the checkout would add its stale modules."""
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("node_modules", "__pycache__", "*.egg-info")
    for folder in ("reft_edge", "train", "export", "runtime"):
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
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
            str(source),
        ],
        check=True,
    )
    return next((tmp_path / "dist").glob("reft_edge-*.whl"))


def test_wheel_installs_only_reft_edge(tmp_path):
    wheel = _wheel(tmp_path)
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
    assert (target / "reft_edge" / "cli" / "__main__.py").is_file()


@pytest.mark.slow
def test_pip_install_without_extras_then_help(tmp_path):
    """`pip install .` (no extras) in a fresh venv, then `reft-edge --help`: the wheel goes in with
    --no-deps and --no-index (offline), and click, the one dependency, comes from a folder on
    PYTHONPATH that holds nothing else; numpy, torch and onnxruntime are not there to import."""
    wheel = _wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, script = env_dir / "bin" / "python", env_dir / "bin" / "reft-edge"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    only_click = tmp_path / "only-click"
    only_click.mkdir()
    (only_click / "click").symlink_to(Path(click.__file__).parent)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONPATH"] = str(only_click)
    missing = subprocess.run(
        [python, "-c", "import numpy"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode != 0 and "No module named 'numpy'" in missing.stderr
    done = subprocess.run([script, "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.split("Commands:", 1)[1].splitlines() if line.strip()}
    assert listed == set(COMMANDS), done.stdout
    for command in ("train", "export", "run", "eval", "serve-web"):
        done = subprocess.run(
            [script, command, "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and "Usage: reft-edge " + command in done.stdout, done.stderr


def test_cli_and_runtime_import_without_torch():
    code = (
        "import sys, reft_edge.cli, reft_edge.runtime; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path("/"))
