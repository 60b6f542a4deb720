"""Examples cannot rot: the demo runs end to end in fast mode (tiny model, few steps)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from reft_edge.train.data import read_jsonl


def test_persona_data_files_parse():
    for persona in ("emoji", "pirate"):
        assert 10 <= len(read_jsonl(ROOT / "examples" / persona / "train.jsonl")) <= 20


def test_demo_runs_in_fast_mode(tiny_model_dir, tmp_path):
    args = [
        "--model",
        str(tiny_model_dir("llama")),
        "--steps",
        "3",
        "--precision",
        "fp32",
        "--max-new-tokens",
        "4",
        "--work",
        str(tmp_path),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for expected in ("alice  |", "base   |", "generate_batch", "patch size", "Try next:"):
        assert expected in result.stdout
    again = subprocess.run(
        [sys.executable, "-m", "examples.demo", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert "training the" not in again.stdout and "up to date" in again.stdout  # warm run reuses everything
