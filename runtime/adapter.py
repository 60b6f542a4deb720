"""Patches -> an onnxruntime adapter file (``.onnx_adapter``) that onnxruntime-genai feeds to a bundle.

Example (``reft-edge convert`` calls exactly this)::

    from reft_edge.runtime.adapter import convert_patches
    convert_patches("bundle/", ["alice.reft", "bob.reft"], weights=[1.0, 0.5], out="alice+bob.onnx_adapter")
    convert_patches("bundle/", [], out="base.onnx_adapter")       # no patch: rank-0 slots

An adapter file holds named tensors (onnxruntime.AdapterFormat); genai's
``Adapters.load`` + ``Generator.set_active_adapter`` feeds each as the graph input of that
name at every step, prefill and decode. This one holds every slot input of the bundle
(``contract.slot_names``) with batch 1: the patches' A (their weights folded in, as the
runtime folds them), B, c and positions, composed along the rank exactly as the runtime
composes them (``slots.slot_arrays``); layers no patch edits get zero rows. Contract v3
makes these inputs constant for a generation, so a stock loop applies the patch the way
the runtime does. Without patches every slot has rank 0, which the fused graph runs on its
slot-free path: genai needs that file to run the bundle without a patch, since the slot
inputs are required.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reft_edge.errors import UsageError
from reft_edge.runtime.bundle import Manifest
from reft_edge.runtime.contract import slot_names
from reft_edge.runtime.patch import Patch
from reft_edge.runtime.slots import SlotArrays, resolve_edits, slot_arrays


def adapter_arrays(
    manifest: Manifest, patches: Sequence[Patch | str | Path], weights: Sequence[float] | None
) -> dict[str, np.ndarray]:
    """Every slot input of the bundle's graph, batch 1, for these patches (checked against the bundle)."""
    num_slots, hidden = len(manifest.slot_layers), manifest.hidden_size
    edits = resolve_edits(manifest.load_patches(patches), weights, manifest.slot_layers)
    slots = slot_arrays([edits], num_slots, hidden) if patches else SlotArrays.empty(num_slots, 1, hidden)
    arrays = {}
    for k, layer in enumerate(manifest.slot_layers):
        a, b, c, positions = slot_names(layer)
        arrays.update({a: slots.A[k], b: slots.B[k], c: slots.c[k][:, None, :], positions: slots.positions[k]})
    return {name: np.ascontiguousarray(array) for name, array in arrays.items()}


def write_adapter(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The arrays as an onnxruntime adapter file, written atomically."""
    import onnxruntime as ort

    from reft_edge.files import atomic_file

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()})
    with atomic_file(path) as tmp:
        adapter.export_adapter(str(tmp))


def convert_patches(
    bundle_dir: str | Path,
    patches: Sequence[Patch | str | Path],
    *,
    weights: Sequence[float] | None = None,
    out: str | Path,
) -> dict[str, np.ndarray]:
    """Write ``out`` for ``patches`` composed with ``weights`` (none: the no-patch adapter); returns its arrays."""
    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")
    manifest = Manifest.from_dir(bundle_dir)
    if not manifest.slot_layers:
        raise UsageError(
            f"bundle {bundle_dir} has no slot layers, so its graph takes no adapter; "
            "run it without one, or re-export it with --slot-layers"
        )
    arrays = adapter_arrays(manifest, patches, weights)
    write_adapter(out, arrays)
    return arrays
