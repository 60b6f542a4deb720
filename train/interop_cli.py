"""``reft-edge import``: patches from pyreft folders and llama.cpp control vectors (docs/interop.md).

Example::

    reft-edge import pyreft my_reft_folder --positions l1 --model default --out mine.reft
    reft-edge import control-vector happy.gguf --scale 0.8 --layers 10-20 --out happy.reft

Only click is imported at module level; torch and gguf load when a command runs.
"""

from __future__ import annotations

import re

import click

from reft_edge.params import FLOAT32

MODEL_HELP = "The model the patch was made for: Hugging Face folder or id; default: the embedded SmolLM2-135M-Instruct."


@click.group("import")
def import_command() -> None:
    """Turn a patch made elsewhere (pyreft, llama.cpp) into a .reft patch."""


@import_command.command("pyreft")
@click.argument("folder", type=click.Path())
@click.option("--positions", required=True,
              help="Tokens to edit (pyreft does not save them): e.g. l1 (pyreft's quick start: the last prompt "
                   "token), f1+l1, l1+g, all.")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(), help="Patch file to write (e.g. mine.reft).")
@click.option("--act-fn", default="linear", show_default=True,
              help="The act_fn the interventions were made with (pyreft does not save it); only linear imports.")
@click.option("--name", default=None, help="Patch name stored in the file (default: the folder's name).")
def import_pyreft_command(folder: str, positions: str, model: str | None, out: str, act_fn: str,
                          name: str | None) -> None:
    """Import FOLDER, written by pyreft's ReftModel.save (config.json, intkey_*.bin)."""
    from reft_edge.train.interop import import_pyreft

    patch = import_pyreft(folder, positions=positions, model=model, out=out, act_fn=act_fn, name=name)
    click.echo(f"wrote {out}: {patch.kind}, rank {patch.rank}, layers {patch.layers}, positions {patch.positions}, "
               f"{len(patch.interventions)} intervention(s), {patch.size_bytes} bytes")


def parse_layer_range(text: str | None) -> tuple[int, int] | None:
    """'10-20' -> (10, 20), '15' -> (15, 15); both ends included, as llama.cpp's --control-vector-layer-range."""
    from reft_edge.errors import UsageError

    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
        raise UsageError(f"--layers {text!r} is malformed; expected A-B with A <= B (both included) or one layer, "
                         "e.g. --layers 10-20")
    return int(match.group(1)), int(match.group(2) or match.group(1))


@import_command.command("control-vector")
@click.argument("file", type=click.Path())
@click.option("--scale", default=1.0, show_default=True, type=FLOAT32,
              help="Strength, as llama.cpp's --control-vector-scaled.")
@click.option("--layers", default=None, help="Layer range A-B (both included); default: every direction in the file.")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(), help="Patch file to write (e.g. happy.reft).")
@click.option("--name", default=None, help="Patch name stored in the file (default: the file's stem).")
def import_control_vector_command(file: str, scale: float, layers: str | None, model: str | None, out: str,
                                  name: str | None) -> None:
    """Import FILE, a llama.cpp control vector (GGUF, direction.N per layer), as an every-token edit."""
    from reft_edge.train.interop import import_control_vector

    patch = import_control_vector(file, scale=scale, layers=parse_layer_range(layers), model=model, out=out,
                                  name=name)
    click.echo(f"wrote {out}: steering at layers {patch.layers}, every token (positions all), scale {scale}, "
               f"{patch.size_bytes} bytes")
