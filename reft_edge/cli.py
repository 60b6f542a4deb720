"""The ``reft-edge`` command. Each subcommand imports its stage only when it runs, so
``reft-edge run`` never imports torch, and ``reft-edge --help`` works with only click installed
(nothing here imports numpy at module level; tests/test_cli.py checks it).

Errors the user can cause print one line (what, where, fix) and exit 2; anything
unexpected prints a short message and where the full traceback was written (exit 1);
``--verbose`` shows tracebacks.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import traceback
from dataclasses import fields
from pathlib import Path

import click

from reft_edge import __version__
from reft_edge.constants import KINDS, SAVE_DTYPES
from reft_edge.errors import ReftEdgeError, UsageError
from reft_edge.params import FINITE_FLOAT, SEED
from reft_edge.train.config import DEFAULT_LAYERS_HELP, DEFAULT_STEPS, ManyConfig, TrainConfig


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except ReftEdgeError as exc:
            if ctx.meta.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except OSError as exc:
            if exc.filename is None or not exc.strerror:
                _internal_error(ctx, exc)
            # a full disk, a folder made read-only meanwhile: the system's fault or the user's, never ours
            if ctx.meta.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: {exc.filename}: {exc.strerror}; free space or fix the permissions there, "
                       "or choose another path", err=True)
            ctx.exit(2)
        except Exception as exc:
            _internal_error(ctx, exc)


def _internal_error(ctx: click.Context, exc: Exception) -> None:
    """An internal error: keep the terminal readable, keep the details; exit 1."""
    if ctx.meta.get("verbose"):
        traceback.print_exc()
    else:
        with tempfile.NamedTemporaryFile("w", prefix="reft-edge-crash-", suffix=".txt", delete=False) as log:
            traceback.print_exc(file=log)
        click.echo(f"internal error: {type(exc).__name__}: {exc} (traceback in {log.name}; "
                   "--verbose prints it)", err=True)
    ctx.exit(1)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="reft-edge")
@click.option("--verbose", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Personalise one frozen language model with kilobyte LoReFT patches."""
    ctx.meta["verbose"] = verbose


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """'15' or '10,20' -> (10, 20); anything else is an error naming the bad part."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UsageError(f"--layers {text!r} is malformed; give layer numbers separated by commas, e.g. --layers 10,20")
    return tuple(int(p) for p in parts)


_TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
_MANY_DEFAULTS = {f.name: f.default for f in fields(ManyConfig)}


def _default(name: str):
    """A training option's default, read from TrainConfig (the one source of truth)."""
    return _TRAIN_DEFAULTS[name]


def parse_skills(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """('caps=caps.jsonl', ...) -> (('caps', 'caps.jsonl'), ...); anything else names the bad value."""
    pairs = []
    for value in values:
        name, sep, data = value.partition("=")
        if not sep or not name or not data:
            raise UsageError(f"--skill {value!r} is malformed; give NAME=DATA, e.g. --skill caps=caps.jsonl")
        pairs.append((name, data))
    return tuple(pairs)


def recipe_options(command):
    """The options train and train-many share (defaults from TrainConfig): the model and device,
    and everything that decides a recipe."""
    options = [
        click.option("--model", default=None,
                     help="Hugging Face folder or id; default: the embedded SmolLM2-135M-Instruct."),
        click.option("--layers", default=None, help=f"Comma list of layers to edit; default: {DEFAULT_LAYERS_HELP}."),
        click.option("--rank", default=_default("rank"), show_default=True, type=int, help="Rank per intervention."),
        click.option("--positions", default=_default("positions"), show_default=True,
                     help="Tokens to edit, joined by '+': f<p> first p prompt tokens, l<s> last s, p every prompt "
                          "token, g every generated token; 'all' = p+g."),
        click.option("--share-weights/--no-share-weights", default=_default("share_weights"), show_default=True,
                     help="Untied: a separate intervention per position group (prefix, suffix, generated)."),
        click.option("--kind", default=_default("kind"), show_default=True, type=click.Choice(list(KINDS))),
        click.option("--steps", default=_default("steps"), type=int,
                     help=f"Optimizer steps (default {DEFAULT_STEPS} unless --epochs)."),
        click.option("--epochs", default=_default("epochs"), type=int),
        click.option("--lr", default=_default("lr"), show_default=True, type=FINITE_FLOAT),
        click.option("--batch-size", default=_default("batch_size"), show_default=True, type=int),
        click.option("--retain-weight", default=_default("retain_weight"), show_default=True, type=FINITE_FLOAT,
                     help="Keep the base's knowledge: weight of the base's own answers to general prompts, "
                          "trained with the patch on (0 is off)."),
        click.option("--seed", default=_default("seed"), show_default=True, type=SEED),
        click.option("--val-fraction", default=_default("val_fraction"), type=FINITE_FLOAT,
                     help="Hold out this share of the data for validation (seeded)."),
        click.option("--eval-every", default=_default("eval_every"), show_default=True, type=int,
                     help="Validate every N steps."),
        click.option("--patience", default=_default("patience"), show_default=True, type=int,
                     help="Stop after N validations without improvement."),
        click.option("--device", default=_default("device"), show_default=True,
                     type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--save-dtype", default=_default("save_dtype"), show_default=True,
                     type=click.Choice(list(SAVE_DTYPES))),
        click.option("--chat-template/--no-chat-template", default=_default("chat_template"), show_default=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.option("--data", default=None, help="JSONL file: {\"prompt\", \"response\"} or {\"messages\"} per line.")
@click.option("--skill", "skills", multiple=True, metavar="NAME=DATA",
              help="Train one patch with a named skill per data file (repeat); switch skills per request "
                   "with reft-edge run --skill. Instead of --data.")
@click.option("--compose-with", "compose_with", multiple=True, type=click.Path(),
              help="A patch (same base) the new one must also work beside; repeat for several.")
@click.option("--compose-steps", default=_default("compose_steps"), show_default=True, type=int,
              help="Steps of the composition phase (with several skills or --compose-with).")
@click.option("--orthogonal-to-partners/--no-orthogonal-to-partners", default=_default("orthogonal_to_partners"),
              show_default=True, help="With --compose-with: keep the new patch's R rows orthogonal to its "
                                      "partners' rows at each layer.")
@click.option("--out", required=True, help="Patch file to write (e.g. alice.reft).")
@recipe_options
@click.option("--val-data", default=None,
              help="JSONL of held-out pairs: validation loss, early stopping, best step kept.")
@click.option("--name", default=None, help="Patch name stored in the file (default: the file's stem).")
@click.option("--record-time", is_flag=True,
              help="Store training seconds in the patch (the bytes then differ run to run).")
@click.option("--checkpoint-every", default=None, type=int,
              help="Write OUT.ckpt every N steps (optimizer state included).")
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt if a killed run left one.")
@click.option("--auto", is_flag=True,
              help="Search layers, rank, positions and lr on a validation split (Optuna); keep the best patch.")
@click.option("--budget-minutes", default=10.0, show_default=True, type=FINITE_FLOAT, help="Time budget of --auto.")
def train(layers: str | None, skills: tuple[str, ...], compose_with: tuple[str, ...], auto: bool,
          budget_minutes: float, **options) -> None:
    """Learn a LoReFT patch from examples."""
    config = TrainConfig(layers=parse_layers(layers), skills=parse_skills(skills), compose_with=compose_with,
                         **options)
    if auto and (config.skills or config.compose_with):
        raise UsageError("--auto searches single-skill recipes; drop --skill/--compose-with or --auto")
    if auto:
        from reft_edge.train.auto import train_auto

        train_auto(config, budget_minutes=budget_minutes)
        return
    from reft_edge.train.recipe import train as run_training

    run_training(config)


@main.command("train-many")
@click.option("--jobs", required=True,
              help="JSONL, one person per line: {\"id\", \"data\"} and any training option to override.")
@click.option("--out-dir", required=True, help="Folder for the patches (<id>.reft) and summary.json.")
@click.option("--max-rows", default=_MANY_DEFAULTS["max_rows"], show_default=True, type=int,
              help="Rows per mixed batch (several people's batches together); bounds memory.")
@click.option("--compose-with", "compose_with", multiple=True, type=click.Path(),
              help="A shared patch (e.g. a house style) every person's patch must work beside; repeat for several.")
@recipe_options
def train_many(jobs: str, out_dir: str, max_rows: int, compose_with: tuple[str, ...], model: str | None, device: str,
               layers: str | None, **options) -> None:
    """Train many people's patches in one job: one backbone, mixed batches (torchrun shards people)."""
    from reft_edge.train.many import ManyConfig, train_many as run_many

    recipe = {**options, "layers": parse_layers(layers)}
    results = run_many(ManyConfig(jobs=jobs, out_dir=out_dir, model=model, device=device, max_rows=max_rows,
                                  defaults=recipe, compose_with=compose_with))
    failed = [result for result in results if result.status == "failed"]
    if failed:
        raise UsageError(f"{len(failed)} of {len(results)} people failed, the first {failed[0].id}: "
                         f"{failed[0].message} "
                         f"(the others' patches are written; {out_dir}/summary.json lists all)")


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(path: str, as_json: bool) -> None:
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
    click.echo(f"  kind {summary['kind']}, rank {summary['rank']}, layers {summary['layers']}, "
               f"positions {summary['positions']}, {'shared' if summary['share_weights'] else 'untied'} weights")
    click.echo(f"  base {summary['base_fingerprint'][:16]}, hidden size {summary['hidden_size']}")
    imported = training.get("imported_from")
    if isinstance(imported, dict):
        click.echo(f"  imported from {imported.get('format')}: {imported.get('folder') or imported.get('file')}")
        return
    click.echo(f"  trained {training.get('steps')} steps on {training.get('examples')} examples, "
               f"final loss {training.get('final_loss')}")


# C0/C1 controls (newline, ESC of ANSI sequences) and the bidi overrides that reorder what follows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(value):
    """``value`` with every string in it (nested too) safe for a terminal: a patch or manifest is
    someone else's file, and its name must not move the cursor, recolour or rewrite the screen."""
    if isinstance(value, str):
        return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], value)
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    return value


def inspect_bundle(path: str, as_json: bool) -> None:
    from reft_edge.runtime.bundle import Manifest

    manifest = Manifest.from_dir(path)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
        return
    checked = manifest.verification
    click.echo(f"bundle {Path(path).name} ({manifest.precision}, {manifest.size_bytes} bytes, "
               f"exported by reft-edge {printable(manifest.tool_version)})")
    click.echo(f"  model {printable(manifest.source_model)} ({printable(manifest.architecture)}, "
               f"{manifest.graph} graph), "
               f"{manifest.num_layers} layers, hidden size {manifest.hidden_size}, vocab {manifest.vocab_size}, "
               f"context {manifest.context_length}")
    click.echo(f"  base {manifest.base_fingerprint[:16]}, slot layers {manifest.slot_layers}")
    if checked:
        click.echo(f"  verified: max |logit diff| {checked.get('max_abs_logit_diff')}, greedy tokens "
                   f"agreement {checked.get('greedy_tokens_agreement')}")
        blocks = checked.get("weight_blocks")
        if blocks:
            kept = ", ".join(f"{count} {kind}" for kind, count in sorted(blocks.items()) if kind != "requantized")
            click.echo(f"  weights: {kept or 'no'} exact GGUF blocks, {blocks.get('requantized', 0)} re-quantized")
    else:
        click.echo("  not verified (exported with --no-verify)")


# The stage commands' modules import only click; each stage loads when its command runs.
from reft_edge.export.cli import export_command  # noqa: E402
from reft_edge.runtime.cli import chat_command, run_command  # noqa: E402
from reft_edge.runtime.convert_cli import convert_command  # noqa: E402
from reft_edge.runtime.eval_cli import eval_command  # noqa: E402
from reft_edge.runtime.serve_cli import serve_command  # noqa: E402
from reft_edge.runtime.web_cli import serve_web_command  # noqa: E402
from reft_edge.train.interop_cli import import_command  # noqa: E402

for _command in (export_command, run_command, chat_command, eval_command, convert_command, import_command,
                 serve_web_command, serve_command):
    main.add_command(_command)


if __name__ == "__main__":
    sys.exit(main())
