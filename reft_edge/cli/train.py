"""``reft-edge train``, ``train-many`` and ``import``: the training stage's commands.

Example::

    reft-edge train --data alice.jsonl --out alice.reft
    reft-edge train --skill caps=caps.jsonl --skill sea=sea.jsonl --out skills.reft
    reft-edge train-many --jobs people.jsonl --out-dir patches/
    reft-edge import pyreft my_reft_folder --positions l1 --model default --out mine.reft
    reft-edge import control-vector happy.gguf --scale 0.8 --layers 10-20 --out happy.reft

Only click and the torch-free TrainConfig are imported at module level: every option and its
default comes from TrainConfig (the one source of truth); torch loads when a command runs.
"""

from __future__ import annotations

import re
from dataclasses import fields

import click

from reft_edge.cli.common import parse_layers
from reft_edge.constants import KINDS, SAVE_DTYPES
from reft_edge.errors import UsageError
from reft_edge.params import FINITE_FLOAT, FLOAT32, SEED
from reft_edge.train.config import DEFAULT_LAYERS_HELP, DEFAULT_STEPS, ManyConfig, TrainConfig

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
        click.option(
            "--model", default=None, help="Hugging Face folder or id; default: the embedded SmolLM2-135M-Instruct."
        ),
        click.option("--layers", default=None, help=f"Comma list of layers to edit; default: {DEFAULT_LAYERS_HELP}."),
        click.option("--rank", default=_default("rank"), show_default=True, type=int, help="Rank per intervention."),
        click.option(
            "--positions",
            default=_default("positions"),
            show_default=True,
            help="Tokens to edit, joined by '+': f<p> first p prompt tokens, l<s> last s, p every prompt "
            "token, g every generated token; 'all' = p+g.",
        ),
        click.option(
            "--share-weights/--no-share-weights",
            default=_default("share_weights"),
            show_default=True,
            help="Untied: a separate intervention per position group (prefix, suffix, generated).",
        ),
        click.option("--kind", default=_default("kind"), show_default=True, type=click.Choice(list(KINDS))),
        click.option(
            "--steps",
            default=_default("steps"),
            type=int,
            help=f"Optimizer steps (default {DEFAULT_STEPS} unless --epochs).",
        ),
        click.option("--epochs", default=_default("epochs"), type=int),
        click.option("--lr", default=_default("lr"), show_default=True, type=FINITE_FLOAT),
        click.option("--batch-size", default=_default("batch_size"), show_default=True, type=int),
        click.option(
            "--retain-weight",
            default=_default("retain_weight"),
            show_default=True,
            type=FINITE_FLOAT,
            help="Keep the base's knowledge: weight of the base's own answers to general prompts, "
            "trained with the patch on (0 is off).",
        ),
        click.option("--seed", default=_default("seed"), show_default=True, type=SEED),
        click.option(
            "--val-fraction",
            default=_default("val_fraction"),
            type=FINITE_FLOAT,
            help="Hold out this share of the data for validation (seeded).",
        ),
        click.option(
            "--eval-every", default=_default("eval_every"), show_default=True, type=int, help="Validate every N steps."
        ),
        click.option(
            "--patience",
            default=_default("patience"),
            show_default=True,
            type=int,
            help="Stop after N validations without improvement.",
        ),
        click.option(
            "--device", default=_default("device"), show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
        ),
        click.option(
            "--save-dtype", default=_default("save_dtype"), show_default=True, type=click.Choice(list(SAVE_DTYPES))
        ),
        click.option("--chat-template/--no-chat-template", default=_default("chat_template"), show_default=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("train")
@click.option("--data", default=None, help='JSONL file: {"prompt", "response"} or {"messages"} per line.')
@click.option(
    "--skill",
    "skills",
    multiple=True,
    metavar="NAME=DATA",
    help="Train one patch with a named skill per data file (repeat); switch skills per request "
    "with reft-edge run --skill. Instead of --data.",
)
@click.option(
    "--compose-with",
    "compose_with",
    multiple=True,
    type=click.Path(),
    help="A patch (same base) the new one must also work beside; repeat for several.",
)
@click.option(
    "--compose-steps",
    default=_default("compose_steps"),
    show_default=True,
    type=int,
    help="Steps of the composition phase (with several skills or --compose-with).",
)
@click.option(
    "--orthogonal-to-partners/--no-orthogonal-to-partners",
    default=_default("orthogonal_to_partners"),
    show_default=True,
    help="With --compose-with: keep the new patch's R rows orthogonal to its partners' rows at each layer.",
)
@click.option("--out", required=True, help="Patch file to write (e.g. alice.reft).")
@recipe_options
@click.option(
    "--val-data", default=None, help="JSONL of held-out pairs: validation loss, early stopping, best step kept."
)
@click.option("--name", default=None, help="Patch name stored in the file (default: the file's stem).")
@click.option(
    "--record-time", is_flag=True, help="Store training seconds in the patch (the bytes then differ run to run)."
)
@click.option(
    "--checkpoint-every", default=None, type=int, help="Write OUT.ckpt every N steps (optimizer state included)."
)
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt if a killed run left one.")
@click.option(
    "--auto",
    is_flag=True,
    help="Search layers, rank, positions and lr on a validation split (Optuna); keep the best patch.",
)
@click.option("--budget-minutes", default=10.0, show_default=True, type=FINITE_FLOAT, help="Time budget of --auto.")
def train_command(
    layers: str | None,
    skills: tuple[str, ...],
    compose_with: tuple[str, ...],
    auto: bool,
    budget_minutes: float,
    **options,
) -> None:
    """Learn a LoReFT patch from examples."""
    config = TrainConfig(layers=parse_layers(layers), skills=parse_skills(skills), compose_with=compose_with, **options)
    if auto and (config.skills or config.compose_with):
        raise UsageError("--auto searches single-skill recipes; drop --skill/--compose-with or --auto")
    if auto:
        from reft_edge.train.auto import train_auto

        train_auto(config, budget_minutes=budget_minutes)
        return
    from reft_edge.train.recipe import train

    train(config)


@click.command("train-many")
@click.option(
    "--jobs", required=True, help='JSONL, one person per line: {"id", "data"} and any training option to override.'
)
@click.option("--out-dir", required=True, help="Folder for the patches (<id>.reft) and summary.json.")
@click.option(
    "--max-rows",
    default=_MANY_DEFAULTS["max_rows"],
    show_default=True,
    type=int,
    help="Rows per mixed batch (several people's batches together); bounds memory.",
)
@click.option(
    "--compose-with",
    "compose_with",
    multiple=True,
    type=click.Path(),
    help="A shared patch (e.g. a house style) every person's patch must work beside; repeat for several.",
)
@recipe_options
def train_many_command(
    jobs: str,
    out_dir: str,
    max_rows: int,
    compose_with: tuple[str, ...],
    model: str | None,
    device: str,
    layers: str | None,
    **options,
) -> None:
    """Train many people's patches in one job: one backbone, mixed batches (torchrun shards people)."""
    from reft_edge.train.many import train_many

    recipe = {**options, "layers": parse_layers(layers)}
    results = train_many(
        ManyConfig(
            jobs=jobs,
            out_dir=out_dir,
            model=model,
            device=device,
            max_rows=max_rows,
            defaults=recipe,
            compose_with=compose_with,
        )
    )
    failed = [result for result in results if result.status == "failed"]
    if failed:
        raise UsageError(
            f"{len(failed)} of {len(results)} people failed, the first {failed[0].id}: "
            f"{failed[0].message} "
            f"(the others' patches are written; {out_dir}/summary.json lists all)"
        )


# -- reft-edge import: patches from pyreft folders and llama.cpp control vectors (docs/interop.md) --

MODEL_HELP = "The model the patch was made for: Hugging Face folder or id; default: the embedded SmolLM2-135M-Instruct."


@click.group("import")
def import_command() -> None:
    """Turn a patch made elsewhere (pyreft, llama.cpp) into a .reft patch."""


@import_command.command("pyreft")
@click.argument("folder", type=click.Path())
@click.option(
    "--positions",
    required=True,
    help="Tokens to edit (pyreft does not save them): e.g. l1 (pyreft's quick start: the last prompt "
    "token), f1+l1, l1+g, all.",
)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(), help="Patch file to write (e.g. mine.reft).")
@click.option(
    "--act-fn",
    default="linear",
    show_default=True,
    help="The act_fn the interventions were made with (pyreft does not save it); only linear imports.",
)
@click.option("--name", default=None, help="Patch name stored in the file (default: the folder's name).")
def import_pyreft_command(
    folder: str, positions: str, model: str | None, out: str, act_fn: str, name: str | None
) -> None:
    """Import FOLDER, written by pyreft's ReftModel.save (config.json, intkey_*.bin)."""
    from reft_edge.train.interop import import_pyreft

    patch = import_pyreft(folder, positions=positions, model=model, out=out, act_fn=act_fn, name=name)
    click.echo(
        f"wrote {out}: {patch.kind}, rank {patch.rank}, layers {patch.layers}, positions {patch.positions}, "
        f"{len(patch.interventions)} intervention(s), {patch.size_bytes} bytes"
    )


def parse_layer_range(text: str | None) -> tuple[int, int] | None:
    """'10-20' -> (10, 20), '15' -> (15, 15); both ends included, as llama.cpp's --control-vector-layer-range."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
        raise UsageError(
            f"--layers {text!r} is malformed; expected A-B with A <= B (both included) or one layer, "
            "e.g. --layers 10-20"
        )
    return int(match.group(1)), int(match.group(2) or match.group(1))


@import_command.command("control-vector")
@click.argument("file", type=click.Path())
@click.option(
    "--scale", default=1.0, show_default=True, type=FLOAT32, help="Strength, as llama.cpp's --control-vector-scaled."
)
@click.option("--layers", default=None, help="Layer range A-B (both included); default: every direction in the file.")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(), help="Patch file to write (e.g. happy.reft).")
@click.option("--name", default=None, help="Patch name stored in the file (default: the file's stem).")
def import_control_vector_command(
    file: str, scale: float, layers: str | None, model: str | None, out: str, name: str | None
) -> None:
    """Import FILE, a llama.cpp control vector (GGUF, direction.N per layer), as an every-token edit."""
    from reft_edge.train.interop import import_control_vector

    patch = import_control_vector(file, scale=scale, layers=parse_layer_range(layers), model=model, out=out, name=name)
    click.echo(
        f"wrote {out}: steering at layers {patch.layers}, every token (positions all), scale {scale}, "
        f"{patch.size_bytes} bytes"
    )
