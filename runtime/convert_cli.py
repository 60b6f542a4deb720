r"""``reft-edge convert``: patches as an onnxruntime adapter file for onnxruntime-genai (docs/genai.md).

Example::

    reft-edge convert alice.reft --bundle bundle-int4 --to onnx-adapter --out alice.onnx_adapter
    reft-edge convert alice.reft bob.reft --weight 1 --weight 0.5 --bundle bundle-int4 --to onnx-adapter \
        --out ab.onnx_adapter
    reft-edge convert --none --bundle bundle-int4 --to onnx-adapter --out base.onnx_adapter

Only click is imported at module level; numpy and onnxruntime load when the command runs.
"""

from __future__ import annotations

import click

from reft_edge.params import FLOAT32

FORMATS = ("onnx-adapter",)


@click.command("convert")
@click.argument("patches", nargs=-1, type=click.Path())
@click.option("--bundle", required=True, type=click.Path(), help="The bundle the adapter is for (checked against).")
@click.option("--to", "to", required=True, type=click.Choice(FORMATS), help="Output format.")
@click.option("--out", required=True, type=click.Path(), help="File to write, e.g. alice.onnx_adapter.")
@click.option("--weight", "weights", multiple=True, type=FLOAT32, help="Scale of each PATCH's edit (default 1).")
@click.option("--none", "no_patch", is_flag=True,
              help="Write the no-patch adapter (rank-0 slots) that runs the bundle as the base model.")
def convert_command(patches: tuple[str, ...], bundle: str, to: str, out: str, weights: tuple[float, ...],
                    no_patch: bool) -> None:
    """Compose PATCH files (weights folded in) into one file that onnxruntime-genai loads."""
    from reft_edge.errors import UsageError
    from reft_edge.runtime.adapter import convert_patches
    from reft_edge.runtime.cli import _weights

    if bool(patches) == no_patch:
        raise UsageError("give PATCH files to convert or --none for the no-patch adapter, not both or neither; "
                         "e.g. reft-edge convert alice.reft --bundle B --to onnx-adapter --out alice.onnx_adapter")
    arrays = convert_patches(bundle, list(patches), weights=_weights(patches, weights), out=out)
    rank = next(iter(arrays.values())).shape[1]
    what = f"{len(patches)} patch(es)" if patches else "no patch"
    click.echo(f"wrote {out}: {what}, {len(arrays) // 4} slot layers, rank {rank}")
