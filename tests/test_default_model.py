"""End to end on the embedded default model (SmolLM2-135M-Instruct): the training acceptance check."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import EMOJI_TRAIN_ARGS
from reft_edge.cli import main

pytestmark = pytest.mark.slow


def test_emoji_patch_trains_small_and_fits(emoji_patch_path):
    result = CliRunner().invoke(main, ["inspect", str(emoji_patch_path), "--json"])
    shown = json.loads(result.output)
    assert shown["training"]["final_loss"] < 0.3
    assert shown["size_bytes"] <= 64 * 1024
    assert (shown["layers"], shown["rank"], shown["positions"], shown["hidden_size"]) == ([15], 4, "f2+l2", 576)


def test_second_identical_run_gives_same_bytes(emoji_patch_path, emoji_data, tmp_path):
    again = tmp_path / emoji_patch_path.name
    result = CliRunner().invoke(main, ["train", "--data", str(emoji_data), "--out", str(again), *EMOJI_TRAIN_ARGS])
    assert result.exit_code == 0, result.output
    assert again.read_bytes() == emoji_patch_path.read_bytes()
