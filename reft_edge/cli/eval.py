"""``reft-edge eval``: how well patches do on held-out data, from the terminal.

Example::

    reft-edge eval bundle-int8 --patch emoji.reft --data heldout.jsonl --judge no-letters
    reft-edge eval --model default --patch emoji.reft --data prompts.txt --judge no-letters --json

Only click is imported at module level; the runtime loads when the command runs, and
torch only with ``--model`` (``reft_edge.evaluate`` picks training's torch backend then).
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import click

from reft_edge.cli.common import patch_weights
from reft_edge.params import FLOAT32


@click.command("eval")
@click.argument("bundle", required=False, type=click.Path())
@click.option(
    "--model",
    default=None,
    help="Evaluate on a Hugging Face model folder or id (or 'default') with torch instead of a bundle.",
)
@click.option("--patch", "patches", multiple=True, type=click.Path(), help="A .reft patch; repeat to compose several.")
@click.option("--weight", "weights", multiple=True, type=FLOAT32, help="Scale of each --patch's edit (default 1).")
@click.option(
    "--data",
    required=True,
    type=click.Path(),
    help="Held-out JSONL (prompt/response or messages, like training data) or a .txt of prompts, one a line.",
)
@click.option(
    "--judge",
    default=None,
    help="Adherence test of each answer: regex:PATTERN, no-letters, all-caps, "
    "ends-with:TEXT, contains:TEXT or module:function.",
)
@click.option("--max-new-tokens", default=48, show_default=True, type=int, help="Greedy tokens per answer.")
@click.option(
    "--facts/--no-facts",
    default=True,
    show_default=True,
    help="Measure the share of facts the base knows that the patched model still answers.",
)
@click.option("--facts-file", default=None, type=click.Path(), help="Facts JSONL (default: the built-in list).")
@click.option("--samples", default=3, show_default=True, type=int, help="Prompts shown with both answers.")
@click.option("--threads", default=None, type=int, help="CPU threads for a bundle (default: onnxruntime's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(
    bundle: str | None,
    model: str | None,
    patches: tuple[str, ...],
    weights: tuple[float, ...],
    data: str,
    judge: str | None,
    max_new_tokens: int,
    facts: bool,
    facts_file: str | None,
    samples: int,
    threads: int | None,
    as_json: bool,
) -> None:
    """Evaluate patches on BUNDLE (or --model) with held-out --data: held-out loss, adherence to
    --judge, facts kept, and side-by-side samples."""
    from reft_edge.evaluate import evaluate  # picks training's torch backend for --model

    report = evaluate(
        bundle,
        data=data,
        model=model,
        patches=patches,
        weights=patch_weights(patches, weights),
        judge=judge,
        max_new_tokens=max_new_tokens,
        facts=facts,
        facts_file=facts_file,
        samples=samples,
        threads=threads,
        progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        click.echo(render(report))


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def render(report: Any) -> str:
    """The report as a small table, then the samples."""
    patches = ", ".join(f"{name} ({weight:g})" for name, weight in zip(report.patches, report.weights)) or "none"
    lines = [
        f"eval {report.source} ({report.kind}, {report.precision}, base {report.base_fingerprint[:16]})",
        f"  patches: {patches}; data: {report.data} ({report.prompts} prompts); {report.seconds:.1f} s",
        "",
        f"  {'':<16}{'base':>10}{'patched':>10}",
    ]
    if report.loss:
        loss = report.loss
        lines.append(
            f"  {'held-out loss':<16}{_number(loss.base):>10}{_number(loss.patched):>10}"
            f"   mean NLL of {loss.tokens} response tokens, {loss.examples} examples"
        )
    else:
        lines.append(f"  {'held-out loss':<16}{'-':>10}{'-':>10}   the data has no responses")
    if report.adherence:
        adherence = report.adherence
        lines.append(
            f"  {'adherence':<16}{_share(adherence.base):>10}{_share(adherence.patched):>10}"
            f"   judge {adherence.judge}, {adherence.prompts} prompts"
        )
    else:
        lines.append(f"  {'adherence':<16}{'-':>10}{'-':>10}   give --judge to measure it")
    if report.retention:
        kept = report.retention
        what = (
            f"{kept.kept} of the {kept.base_correct} (of {kept.facts}) facts the base answers"
            if kept.base_correct
            else f"the base answers none of the {kept.facts} facts"
        )
        lines.append(f"  {'facts kept':<16}{'-':>10}{_share(kept.fraction):>10}   {what}")
    else:
        lines.append(
            f"  {'facts kept':<16}{'-':>10}{'-':>10}   {'no patch to compare' if not report.patches else '--no-facts'}"
        )
    for sample in report.samples:
        lines += ["", f"  prompt:  {_one_line(sample.prompt)}", f"  base:    {_one_line(sample.base)}"]
        if sample.patched is not None:
            lines.append(f"  patched: {_one_line(sample.patched)}")
    return "\n".join(lines)


def _one_line(text: str, width: int = 100) -> str:
    if not text.strip():
        return "(only whitespace)" if text else "(empty)"
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ...")
