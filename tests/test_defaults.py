"""Run-time defaults stated once and agreed on by every runtime."""

from pathlib import Path

from click.testing import CliRunner

from reft_edge.runtime.sampling import NO_REPEAT_NGRAM
from reft_edge.runtime.session import _options

ROOT = Path(__file__).resolve().parent.parent


def test_the_loop_guard_is_on_by_default_in_python_and_the_web():
    assert NO_REPEAT_NGRAM == 6 and _options().sampling.no_repeat_ngram == NO_REPEAT_NGRAM
    assert _options(no_repeat_ngram=0).sampling.no_repeat_ngram == 0  # overridable
    web = (ROOT / "runtime" / "web" / "sampling.js").read_text()
    assert "export const NO_REPEAT_NGRAM = SPEC.defaults.no_repeat_ngram;" in web  # spec.js: tests/test_spec.py
    assert "noRepeatNgram = NO_REPEAT_NGRAM" in web


def test_the_cli_shows_the_same_default():
    from reft_edge.cli import main

    result = CliRunner().invoke(main, ["run", "--help"])
    assert f"[default: {NO_REPEAT_NGRAM}]" in " ".join(result.output.split())
