"""``reft-edge export``: the command-line face of ``reft_edge.export.export_bundle``.

Example::

    reft-edge export --out bundle --precision int8
    reft-edge inspect bundle --json

Only click and the export options (``reft_edge.export.config``: the precisions and every default
come from ``ExportConfig``, the one source of truth) are imported at module level, so
``reft-edge --help`` stays fast; the exporter (torch, onnx) loads when the command runs.
"""

from __future__ import annotations

from dataclasses import fields

import click

from reft_edge.errors import UsageError
from reft_edge.export.config import PRECISIONS, ExportConfig

_DEFAULTS = {f.name: f.default for f in fields(ExportConfig)}


@click.command("export")
@click.option("--out", required=True, help="Bundle folder to write (replaced whole, only when complete).")
@click.option(
    "--model",
    default=_DEFAULTS["model"],
    help="Hugging Face folder or id; default: the embedded SmolLM2-135M-Instruct.",
)
@click.option(
    "--precision",
    default=_DEFAULTS["precision"],
    show_default=True,
    type=click.Choice(list(PRECISIONS)),
    help="Weights: fp32, fp16 (for CUDA), int8 and int4 (weight-only blocks).",
)
@click.option(
    "--slot-layers",
    default="all",
    show_default=True,
    help="Layers whose output a patch may edit: 'all', a comma list (e.g. 10,15), or 'none' (base only).",
)
@click.option(
    "--force", is_flag=True, default=_DEFAULTS["force"], help="Export even if an identical bundle is already there."
)
@click.option(
    "--verify/--no-verify",
    default=_DEFAULTS["verify"],
    show_default=True,
    help="Compare the graph with torch on a random patch (fp32 fails on a mismatch).",
)
def export_command(out: str, model: str | None, precision: str, slot_layers: str, force: bool, verify: bool) -> None:
    """Export the frozen base model once, as an ONNX bundle with patch slots."""
    from reft_edge.export.build import export_bundle

    export_bundle(
        ExportConfig(
            out=out,
            model=model,
            precision=precision,
            slot_layers=parse_slot_layers(slot_layers),
            force=force,
            verify=verify,
        )
    )


def parse_slot_layers(text: str) -> tuple[int, ...] | None:
    """'all' -> None (every layer); '10,15' -> (10, 15); 'none' -> () (no slots: the base model only)."""
    if text.strip() == "all":
        return None
    if text.strip() == "none":
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UsageError(
            f"--slot-layers {text!r} is malformed; pass 'all', 'none' or layer numbers separated by "
            "commas, e.g. --slot-layers 10,15"
        )
    return tuple(int(p) for p in parts)
