"""``reft-edge run``, ``chat``, ``inspect`` and ``convert``: a bundle plus patches, from the terminal.

Example::

    reft-edge run bundle/ --patch alice.reft "What should I cook tonight?"
    reft-edge run bundle/ --patch alice.reft --patch formal.reft --weight 1 --weight 0.5 --json "Hi"
    reft-edge run bundle/ --patch skills.reft --skill caps --skill meow=0.5 "Hi"
    reft-edge chat bundle/ --patch alice.reft          # Ctrl-D or Ctrl-C to leave
    reft-edge inspect alice.reft                       # a patch's metadata; a folder: a bundle's manifest
    reft-edge convert alice.reft --bundle bundle-int4 --to onnx-adapter --out alice.onnx_adapter
    reft-edge convert --none --bundle bundle-int4 --to onnx-adapter --out base.onnx_adapter

``convert`` writes patches (weights folded in) as an onnxruntime adapter file for
onnxruntime-genai (docs/genai.md).

Only click is imported at module level: the runtime (onnxruntime, numpy, tokenizers)
loads when a command runs, and torch never does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from reft_edge.cli.common import patch_weights, printable
from reft_edge.constants import NO_REPEAT_NGRAM
from reft_edge.errors import UsageError
from reft_edge.params import FINITE_FLOAT, FLOAT32, SEED

_patch_option = click.option(
    "--patch", "patches", multiple=True, type=click.Path(), help="A .reft patch; repeat to compose several."
)
_threads_option = click.option("--threads", default=None, type=int, help="CPU threads (default: onnxruntime's choice).")


def _sampling_options(function):
    """Sampling options shared by run and chat. Unset ones come from the bundle's generation
    config (the model's generation_config.json, recorded at export), else greedy; the loop
    guard is on unless --no-repeat-ngram 0."""
    for option in reversed(
        [
            click.option(
                "--temperature",
                default=None,
                type=FINITE_FLOAT,
                help="0 is greedy. [default: the bundle's generation config, else 0]",
            ),
            click.option(
                "--top-p", default=None, type=FINITE_FLOAT, help="[default: the bundle's generation config, else off]"
            ),
            click.option("--top-k", default=None, type=int, help="[default: the bundle's generation config, else off]"),
            click.option(
                "--repetition-penalty",
                default=None,
                type=FINITE_FLOAT,
                help="1.0 is none. [default: the bundle's generation config, else none]",
            ),
            click.option(
                "--no-repeat-ngram",
                default=NO_REPEAT_NGRAM,
                show_default=True,
                type=int,
                help="Loop guard: never repeat an n-gram of the answer; 0 turns it off.",
            ),
            click.option("--seed", default=None, type=SEED),
        ]
    ):
        function = option(function)
    return function


def _resolve_sampling(rt: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The user's sampling options over the bundle's generation defaults."""
    defaults = rt.manifest.generation or {}
    resolved = {
        key: options[key] if options[key] is not None else defaults.get(key)
        for key in ("temperature", "top_p", "top_k", "repetition_penalty")
    }
    resolved["temperature"] = resolved["temperature"] or 0.0
    return {**resolved, "no_repeat_ngram": options["no_repeat_ngram"], "seed": options["seed"]}


_skill_option = click.option(
    "--skill",
    "skills",
    multiple=True,
    metavar="NAME[=WEIGHT]",
    help="Switch on only these skills of the patches that have skills (repeat); "
    "a weight scales a skill's edit (0: off).",
)


def _chosen_patches(rt: Any, patches: tuple[str, ...], skills: tuple[str, ...]) -> list[Any]:
    """The patches, read and checked once, with the --skill choice applied."""
    from reft_edge.runtime.patch import choose_skills, parse_skill_choice

    return choose_skills(rt.load_patches(patches), parse_skill_choice(skills))


@click.command("run")
@click.argument("bundle", type=click.Path())
@click.argument("prompt")
@_patch_option
@click.option("--weight", "weights", multiple=True, type=FLOAT32, help="Scale of each --patch's edit (default 1).")
@_skill_option
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@_sampling_options
@_threads_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, token_ids, prompt_tokens, timings.")
def run_command(
    bundle: str,
    prompt: str,
    patches: tuple[str, ...],
    weights: tuple[float, ...],
    skills: tuple[str, ...],
    max_new_tokens: int,
    threads: int | None,
    as_json: bool,
    **sampling: Any,
) -> None:
    """Answer PROMPT with the base model in BUNDLE, edited by the given patches."""
    from reft_edge.runtime import Runtime

    weights_list = patch_weights(patches, weights)
    rt = Runtime.load(bundle, threads=threads)
    options = dict(
        patches=_chosen_patches(rt, patches, skills),
        weights=weights_list,
        max_new_tokens=max_new_tokens,
        **_resolve_sampling(rt, sampling),
    )
    if as_json:
        click.echo(json.dumps(rt.generate(prompt, **options).to_dict(), ensure_ascii=False))
        return
    generation = print_stream(rt.stream(prompt, **options))
    timings = generation.timings
    click.echo(
        f"[{len(generation.token_ids)} tokens, {timings['tokens_per_s']} tok/s, "
        f"prefill {timings['prefill_s'] * 1000:.0f} ms, {generation.finish_reason}]",
        err=True,
    )


def print_stream(stream: Iterator[str]) -> Any:
    """Print a stream's pieces as they come; returns its Generation."""
    while True:
        try:
            piece = next(stream)
        except StopIteration as done:
            click.echo()
            return done.value
        click.echo(piece, nl=False)
        sys.stdout.flush()


@click.command("chat")
@click.argument("bundle", type=click.Path())
@_patch_option
@click.option("--weight", "weights", multiple=True, type=FLOAT32, help="Scale of each --patch's edit (default 1).")
@_skill_option
@click.option("--max-new-tokens", default=256, show_default=True, type=int)
@_sampling_options
@_threads_option
def chat_command(
    bundle: str,
    patches: tuple[str, ...],
    weights: tuple[float, ...],
    skills: tuple[str, ...],
    max_new_tokens: int,
    threads: int | None,
    **sampling: Any,
) -> None:
    """Talk with the base model in BUNDLE, edited by the given patches (Ctrl-D or Ctrl-C ends)."""
    from reft_edge.runtime import Runtime

    weights_list = patch_weights(patches, weights)
    rt = Runtime.load(bundle, threads=threads)
    loaded = _chosen_patches(rt, patches, skills)  # read once, checked once, reused every turn
    options = _resolve_sampling(rt, sampling)
    click.echo(f"chat with {rt.manifest.source_model} ({len(loaded)} patch(es)); Ctrl-D or Ctrl-C to leave", err=True)
    history: list[dict[str, str]] = []
    try:
        while True:
            try:
                line = input("> ")
            except UnicodeDecodeError as exc:  # bytes the terminal's encoding cannot decode: say so, keep chatting
                click.echo(
                    f"error: the line is not valid {exc.encoding} text (byte {exc.start + 1}); type it again", err=True
                )
                continue
            if not line.strip():
                continue
            try:
                history = _fit_history(rt, [*history, {"role": "user", "content": line}], max_new_tokens)
            except UsageError as exc:  # one message too long for the context: say so, keep chatting
                click.echo(f"error: {exc}", err=True)
                continue
            budget = min(max_new_tokens, rt.manifest.context_length - len(rt.encode(history)))
            reply = print_stream(
                rt.stream(history, patches=loaded, weights=weights_list, max_new_tokens=budget, **options)
            )
            history.append({"role": "assistant", "content": reply.text})
    except (EOFError, KeyboardInterrupt):
        click.echo()


def _fit_history(rt, history: list[dict[str, str]], max_new_tokens: int) -> list[dict[str, str]]:
    """Drop the oldest turns until the conversation leaves room for an answer; the newest message stays."""
    room = min(max_new_tokens, rt.manifest.context_length // 2)
    while len(history) > 1 and len(rt.encode(history)) + room > rt.manifest.context_length:
        history = history[2:]  # one user/assistant exchange; the history always ends with the user
    if len(rt.encode(history)) >= rt.manifest.context_length:
        raise UsageError(
            f"the message alone is longer than the bundle's context length "
            f"{rt.manifest.context_length} tokens; send a shorter one"
        )
    return history


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_command(path: str, as_json: bool) -> None:
    """Show a patch's metadata, or a bundle's manifest (PATH is a folder)."""
    if Path(path).is_dir():
        inspect_bundle(path, as_json)
        return
    from reft_edge.runtime.patch import Patch

    summary = Patch.from_file(path).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    summary = {key: printable(value) for key, value in summary.items()}
    training = summary["training"] if isinstance(summary["training"], dict) else {}
    click.echo(f"patch {summary['name']} ({Path(path).name}, {summary['size_bytes']} bytes, {summary['dtype']})")
    click.echo(
        f"  kind {summary['kind']}, rank {summary['rank']}, layers {summary['layers']}, "
        f"positions {summary['positions']}, {'shared' if summary['share_weights'] else 'untied'} weights"
    )
    click.echo(f"  base {summary['base_fingerprint'][:16]}, hidden size {summary['hidden_size']}")
    imported = training.get("imported_from")
    if isinstance(imported, dict):
        click.echo(f"  imported from {imported.get('format')}: {imported.get('folder') or imported.get('file')}")
        return
    click.echo(
        f"  trained {training.get('steps')} steps on {training.get('examples')} examples, "
        f"final loss {training.get('final_loss')}"
    )


def inspect_bundle(path: str, as_json: bool) -> None:
    from reft_edge.runtime.bundle import Manifest

    manifest = Manifest.from_dir(path)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
        return
    checked = manifest.verification
    click.echo(
        f"bundle {Path(path).name} ({manifest.precision}, {manifest.size_bytes} bytes, "
        f"exported by reft-edge {printable(manifest.tool_version)})"
    )
    click.echo(
        f"  model {printable(manifest.source_model)} ({printable(manifest.architecture)}, "
        f"{manifest.graph} graph), "
        f"{manifest.num_layers} layers, hidden size {manifest.hidden_size}, vocab {manifest.vocab_size}, "
        f"context {manifest.context_length}"
    )
    click.echo(f"  base {manifest.base_fingerprint[:16]}, slot layers {manifest.slot_layers}")
    if checked:
        click.echo(
            f"  verified: max |logit diff| {checked.get('max_abs_logit_diff')}, greedy tokens "
            f"agreement {checked.get('greedy_tokens_agreement')}"
        )
        blocks = checked.get("weight_blocks")
        if blocks:
            kept = ", ".join(f"{count} {kind}" for kind, count in sorted(blocks.items()) if kind != "requantized")
            click.echo(f"  weights: {kept or 'no'} exact GGUF blocks, {blocks.get('requantized', 0)} re-quantized")
    else:
        click.echo("  not verified (exported with --no-verify)")


ADAPTER_FORMATS = ("onnx-adapter",)


@click.command("convert")
@click.argument("patches", nargs=-1, type=click.Path())
@click.option("--bundle", required=True, type=click.Path(), help="The bundle the adapter is for (checked against).")
@click.option("--to", "to", required=True, type=click.Choice(ADAPTER_FORMATS), help="Output format.")
@click.option("--out", required=True, type=click.Path(), help="File to write, e.g. alice.onnx_adapter.")
@click.option("--weight", "weights", multiple=True, type=FLOAT32, help="Scale of each PATCH's edit (default 1).")
@click.option(
    "--none",
    "no_patch",
    is_flag=True,
    help="Write the no-patch adapter (rank-0 slots) that runs the bundle as the base model.",
)
def convert_command(
    patches: tuple[str, ...], bundle: str, to: str, out: str, weights: tuple[float, ...], no_patch: bool
) -> None:
    """Compose PATCH files (weights folded in) into one file that onnxruntime-genai loads."""
    from reft_edge.runtime.adapter import convert_patches

    if bool(patches) == no_patch:
        raise UsageError(
            "give PATCH files to convert or --none for the no-patch adapter, not both or neither; "
            "e.g. reft-edge convert alice.reft --bundle B --to onnx-adapter --out alice.onnx_adapter"
        )
    arrays = convert_patches(bundle, list(patches), weights=patch_weights(patches, weights), out=out)
    rank = next(iter(arrays.values())).shape[1]
    what = f"{len(patches)} patch(es)" if patches else "no patch"
    click.echo(f"wrote {out}: {what}, {len(arrays) // 4} slot layers, rank {rank}")
