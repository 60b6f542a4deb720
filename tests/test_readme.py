"""Every command in README.md runs as written.

``make`` lines must name Makefile targets. Every ``reft-edge`` line is parsed by the
real CLI; the train and export lines are the exact ones the slow fixtures run
(emoji_patch_path, default_int8_bundle), and the run, chat and inspect lines and the
Python block are executed for real in a folder where ``bundle-int8``, ``emoji.reft``
and ``pirate.reft`` are the default model's int8 bundle and emoji patch.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import replace

import click
import pytest
from click.testing import CliRunner

from conftest import EMOJI_TRAIN_ARGS, ROOT
from reft_edge.cli import main
from reft_edge.runtime import Patch

README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
COMMANDS = [
    shlex.split(line)
    for lang, body in BLOCKS
    if lang == "bash"
    for line in body.splitlines()
    if line.strip() and not line.startswith("#")
]
CLI_COMMANDS = [c[1:] for c in COMMANDS if c[0] == ".venv/bin/reft-edge"]


def _strip_comment(args: list[str]) -> list[str]:
    return args[: args.index("#")] if "#" in args else args


def test_readme_has_only_make_and_cli_commands():
    assert COMMANDS and all(c[0] in ("make", ".venv/bin/reft-edge") for c in COMMANDS), COMMANDS


def test_make_lines_name_makefile_targets():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for command in COMMANDS:
        if command[0] == "make":
            assert _strip_comment(command)[1] in targets


@pytest.mark.parametrize("args", CLI_COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_cli_line_parses(args):
    command = main.get_command(click.Context(main), args[0])
    assert command is not None, args
    command.make_context(args[0], list(args[1:]))  # raises on an unknown option or a missing argument


def test_train_line_is_what_the_emoji_fixture_runs():
    train = next(a for a in CLI_COMMANDS if a[0] == "train")
    given = dict(zip(train[1::2], train[2::2]))
    fixture = dict(zip(EMOJI_TRAIN_ARGS[0::2], EMOJI_TRAIN_ARGS[1::2]))
    assert given["--data"] == "examples/emoji/train.jsonl"
    assert {k: v for k, v in given.items() if k in fixture} == {k: v for k, v in fixture.items() if k in given}


@pytest.mark.slow
def test_run_chat_inspect_and_python_as_written(tmp_path, default_int8_bundle, emoji_patch_path, monkeypatch):
    (tmp_path / "bundle-int8").symlink_to(default_int8_bundle, target_is_directory=True)
    (tmp_path / "emoji.reft").symlink_to(emoji_patch_path)
    (tmp_path / "pirate.reft").symlink_to(emoji_patch_path)
    # a sound skills patch for the --skill lines: the emoji patch's rank 4 read as two skills of 2 rows
    emoji = Patch.load(emoji_patch_path)
    replace(emoji, skills=(("opener", 2), ("closing", 2))).to_file(tmp_path / "skills.reft")
    monkeypatch.chdir(tmp_path)
    for args in CLI_COMMANDS:
        if args[0] in ("run", "chat", "inspect"):
            result = CliRunner().invoke(main, args, input="Hello!\n")
            assert result.exit_code == 0, (args, result.output)
    for lang, body in BLOCKS:
        if lang == "python":
            exec(compile(body, "README.md", "exec"), {})
