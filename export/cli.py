"""``reft-edge export``: the command-line face of ``reft_edge.export.export_bundle``.

Example::

    reft-edge export --out bundle --precision int8
    reft-edge inspect bundle --json

Only click is imported at module level, so ``reft-edge --help`` stays fast.
"""

from __future__ import annotations

import click


@click.command("export")
@click.option("--out", required=True, help="Bundle folder to write (replaced whole, only when complete).")
@click.option("--model", default=None, help="Hugging Face folder or id; default: the embedded SmolLM2-135M-Instruct.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8", "int4"]),
              help="Weights: fp32, fp16 (for CUDA), int8 and int4 (weight-only blocks).")
@click.option("--slot-layers", default="all", show_default=True,
              help="Layers whose output a patch may edit: 'all', a comma list (e.g. 10,15), or 'none' (base only).")
@click.option("--force", is_flag=True, help="Export even if an identical bundle is already there.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare the graph with torch on a random patch (fp32 fails on a mismatch).")
def export_command(out: str, model: str | None, precision: str, slot_layers: str, force: bool, verify: bool) -> None:
    """Export the frozen base model once, as an ONNX bundle with patch slots."""
    from reft_edge.export import ExportConfig, export_bundle

    export_bundle(ExportConfig(out=out, model=model, precision=precision, slot_layers=parse_slot_layers(slot_layers),
                               force=force, verify=verify))


def parse_slot_layers(text: str) -> tuple[int, ...] | None:
    """'all' -> None (every layer); '10,15' -> (10, 15); 'none' -> () (no slots: the base model only)."""
    from reft_edge.errors import UsageError

    if text.strip() == "all":
        return None
    if text.strip() == "none":
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UsageError(f"--slot-layers {text!r} is malformed; pass 'all', 'none' or layer numbers separated by "
                         "commas, e.g. --slot-layers 10,15")
    return tuple(int(p) for p in parts)
