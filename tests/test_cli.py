"""CLI hygiene: user errors are one line with exit 2; internal errors say where the traceback went."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from reft_edge.cli import main
from reft_edge.runtime.patch import Patch


def _boom(path):
    raise ValueError("boom")


def test_internal_error_is_short_and_keeps_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(Patch, "from_file", _boom)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "x.reft")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "internal error: ValueError: boom" in result.output
    log = Path(re.search(r"traceback in (\S+);", result.output).group(1))
    assert "Traceback" in log.read_text() and "_boom" in log.read_text()
    log.unlink()


def test_verbose_prints_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(Patch, "from_file", _boom)
    result = CliRunner().invoke(main, ["--verbose", "inspect", str(tmp_path / "x.reft")])
    assert result.exit_code == 1 and "Traceback" in result.output


def test_user_error_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.reft")])
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'missing.reft'}: does not exist; pass the path of a .reft patch file\n"


_ONLY_CLICK = """
import sys

class Blocked:  # the base install has click only: these must not be imported for --help
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"numpy", "onnxruntime", "torch", "transformers", "tokenizers", "safetensors",
                                      "jinja2", "onnx", "onnxscript", "gguf"}:
            raise ImportError(f"{name} is not installed (blocked by the test)")

sys.meta_path.insert(0, Blocked())
from reft_edge.cli import main
for command in ([], ["train"], ["export"], ["run"], ["eval"], ["serve-web"]):
    main([*command, "--help"], standalone_mode=False)
"""


def test_help_works_with_only_click_installed():
    """`pip install .` (no extras) then `reft-edge --help`: nothing the CLI imports to list its
    commands and options needs numpy, onnxruntime or torch."""
    done = subprocess.run([sys.executable, "-c", _ONLY_CLICK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train-many" in done.stdout and "--no-repeat-ngram" in done.stdout and "--kind" in done.stdout
