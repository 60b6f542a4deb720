"""Bring patches from elsewhere: pyreft checkpoints and llama.cpp control vectors.

Example::

    from reft_edge.train.interop import import_control_vector, import_pyreft
    patch = import_pyreft("my_reft_folder", positions="l1", model="default", out="mine.reft")
    steer = import_control_vector("happy.gguf", scale=0.8, layers=(10, 20), model="default", out="happy.reft")
    print(patch.kind, patch.layers, patch.training["imported_from"]["format"])

pyreft (pyvene) saves a folder: ``config.json`` (an IntervenableConfig: ``representations``
as arrays ``[layer, component, unit, max_units, low_rank_dimension, ...]``,
``intervention_types`` as class strings) and one ``intkey_<key>.bin`` torch state dict per
intervention. Those files are read with ``torch.load(weights_only=True)`` only, so nothing in
them can run code. Each intervention becomes this project's tensors of the same kind
(docs/patch-format.md): R recovered from torch's orthogonal parametrisation where pyreft
kept it in that form, and checked to have orthonormal rows. pyreft's ``block_output`` of
layer l is the residual stream leaving decoder block l, the slot the patch edits.

A llama.cpp control vector is a GGUF file with one F32 vector ``direction.N`` per layer N,
added to the output of block N at every token. It becomes a rank-1 ``lobireft`` edit per
layer with positions ``all``: for w = scale * v, R = w/|w| and b = |w|, so h + b R = h + scale * v.

docs/interop.md says what is kept, what must be given, and the limits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reft_edge import __version__
from reft_edge.errors import ForeignPatchError
from reft_edge.files import check_output_path
from reft_edge.runtime.patch import Intervention, Patch
from reft_edge.runtime.positions import Positions

# pyreft's intervention classes -> this project's kinds (same formulas, docs/patch-format.md)
PYREFT_CLASSES = {
    "LoreftIntervention": "loreft",
    "DireftIntervention": "direft",
    "NoreftIntervention": "noreft",
    "NodireftIntervention": "nodireft",
    "ConsreftIntervention": "consreft",
    "LobireftIntervention": "lobireft",
}
LINEAR_ACTS = ("linear", "identity", "none")
ORTHONORMAL_TOLERANCE = 1e-4
MAX_FOREIGN_BYTES = 1 << 30  # a state dict of a d x d buffer for d = 16k is 1 GiB; nothing real is bigger
MAX_CONFIG_BYTES = 4 << 20
_ORIGINAL = "rotate_layer.parametrizations.weight.original"
_BASE = "rotate_layer.parametrizations.weight.0.base"
_BOOKKEEPING = ("embed_dim", "interchange_dim")  # pyvene's int64 scalars, no weights


# -- pyreft ---------------------------------------------------------------------------------------


def import_pyreft(
    folder: str | Path,
    *,
    positions: str,
    model: str | None = None,
    out: str | Path | None = None,
    act_fn: str = "linear",
    name: str | None = None,
    backbone: Any = None,
) -> Patch:
    """Read a folder saved by pyreft's ``ReftModel.save`` and return (and write to ``out``) a patch."""
    folder = Path(folder)
    check_linear_act(act_fn)
    if out is not None:
        check_output_path(out)
    parsed = Positions.parse(positions)
    representations = read_pyvene_config(folder)
    items = [read_intervention(folder, rep) for rep in representations]
    if backbone is None:
        from reft_edge.train.backbone import load_backbone

        backbone = load_backbone(model)
    kind, rank = check_uniform(items, folder)
    check_fits_model(items, backbone, folder)
    interventions, share = assign_groups(items, parsed, folder)
    training = {
        "imported_from": {
            "format": "pyreft",
            "folder": str(folder.resolve()),
            "config_sha256": sha256_file(folder / "config.json"),
            "files": {item["file"]: sha256_file(folder / item["file"]) for item in items},
            "classes": [item["class"] for item in items],
            "act_fn": act_fn,
            "source_dtype": sorted({item["dtype"] for item in items}),
        },
        "library_version": __version__,
        "model": backbone.source,
    }
    patch = Patch(
        name=name or folder.resolve().name,
        kind=kind,
        positions=parsed,
        share_weights=share,
        rank=rank,
        hidden_size=backbone.hidden_size,
        base_fingerprint=backbone.fingerprint,
        interventions=tuple(interventions),
        training=training,
    )
    fix = "the pyreft weights are too large for float32; check the folder holds a trained intervention"
    patch.check_finite(str(folder), fix)
    return patch.to_file(out, fix=fix) if out is not None else Patch.from_bytes(patch.to_bytes(), source=str(folder))


def check_linear_act(act_fn: str) -> None:
    if str(act_fn).lower() not in LINEAR_ACTS:
        raise ForeignPatchError(
            f"--act-fn {act_fn}: a non-linear activation cannot be imported; found act_fn {act_fn!r}, expected "
            "'linear' (pyreft's default): the exported graph computes one low-rank affine edit, "
            "h + ((h Bᵀ + c) ⊙ m) A, and act(W h + b) is not affine; retrain with act_fn=None"
        )


def read_pyvene_config(folder: Path) -> list[dict[str, Any]]:
    """The representations of config.json, one dict per intervention, with its class name."""
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise ForeignPatchError(
            f"{folder}: not a folder; pass the folder pyreft's ReftModel.save wrote (config.json and intkey_*.bin)"
        )
    config = read_json(config_path, "pyvene's IntervenableConfig")
    reps, types = config.get("representations"), config.get("intervention_types")
    if not isinstance(reps, list) or not reps or not isinstance(types, list) or len(types) != len(reps):
        raise ForeignPatchError(
            f"{config_path}: found {len(reps) if isinstance(reps, list) else 'no'} representations and "
            f"{len(types) if isinstance(types, list) else 'no'} intervention_types, expected one type per "
            "representation; pass a folder written by pyreft's ReftModel.save"
        )
    parsed, counters = [], {}
    for index, (rep, type_string) in enumerate(zip(reps, types)):
        entry = parse_representation(rep, config_path, index)
        entry["class"] = class_name(type_string, config_path)
        proposal = (entry["layer"], entry["component"], entry["unit"], entry["max_units"])
        entry["collision"] = counters[proposal] = counters.get(proposal, -1) + 1
        parsed.append(entry)
    return parsed


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ForeignPatchError(f"{path}: missing; expected {what} here (pyreft's ReftModel.save writes it)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ForeignPatchError(f"{path}: {path.stat().st_size} bytes is too large for {what}; pass pyreft's folder")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ForeignPatchError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); expected {what}") from None
    if not isinstance(value, dict):
        raise ForeignPatchError(f"{path}: found a JSON {type(value).__name__}, expected {what} (an object)")
    return value


def parse_representation(rep: Any, source: Path, index: int) -> dict[str, Any]:
    """pyvene's RepresentationConfig, saved as an array (or, by hand, an object)."""
    fields = (
        "layer",
        "component",
        "unit",
        "max_number_of_units",
        "low_rank_dimension",
        "intervention_type",
        "intervention",
        "subspace_partition",
        "group_key",
        "intervention_link_key",
    )
    if isinstance(rep, list):
        rep = dict(zip(fields, rep))
    if not isinstance(rep, dict):
        raise ForeignPatchError(
            f"{source}: representation {index} is {rep!r}, expected an array "
            "[layer, component, unit, max_units, low_rank_dimension, ...]"
        )
    layer, component = rep.get("layer"), rep.get("component", "block_output")
    unit, max_units, rank = rep.get("unit", "pos"), rep.get("max_number_of_units", 1), rep.get("low_rank_dimension")
    if type(layer) is not int or layer < 0 or type(rank) is not int or rank < 1:
        raise ForeignPatchError(
            f"{source}: representation {index} has layer {layer!r} and low_rank_dimension "
            f"{rank!r}, expected whole numbers (layer >= 0, rank >= 1)"
        )
    if component != "block_output":
        raise ForeignPatchError(
            f"{source}: representation {index} edits component {component!r}; only 'block_output' can be imported: "
            "the exported graph edits the residual stream leaving a decoder block, nothing inside it"
        )
    if unit != "pos" or rep.get("subspace_partition") is not None:
        raise ForeignPatchError(
            f"{source}: representation {index} has unit {unit!r} and subspace_partition "
            f"{rep.get('subspace_partition')!r}, expected unit 'pos' and no partition: per-head or subspace "
            "interventions have no slot in the exported graph"
        )
    return {"layer": layer, "component": component, "unit": unit, "max_units": max_units, "rank": rank}


def class_name(type_string: Any, source: Path) -> str:
    """ "<class 'pyreft.interventions.LoreftIntervention'>" (or a bare class name) -> LoreftIntervention."""
    match = re.fullmatch(r"(?:<class ')?(?:[\w.]*\.)?(\w+)(?:'>)?", str(type_string).strip())
    name = match.group(1) if match else str(type_string)
    if name not in PYREFT_CLASSES:
        raise ForeignPatchError(
            f"{source}: intervention type {str(type_string)!r} is not importable; expected one of "
            f"{', '.join(PYREFT_CLASSES)} (pyreft's six kinds); custom interventions cannot be translated"
        )
    return name


def key_names(rep: Mapping[str, Any]) -> list[str]:
    """The intervention's key in pyvene's current style, then the older dotted style."""
    layer, component, unit, n, i = rep["layer"], rep["component"], rep["unit"], rep["max_units"], rep["collision"]
    return [
        f"layer_{layer}_comp_{component}_unit_{unit.replace('.', '_')}_nunit_{n}#{i}",
        f"layer.{layer}.comp.{component}.unit.{unit}.nunit.{n}#{i}",
    ]


def read_intervention(folder: Path, rep: dict[str, Any]) -> dict[str, Any]:
    """One representation's state dict -> {layer, kind, params (this project's tensors), ...}."""
    candidates = [f"intkey_{key}.bin" for key in key_names(rep)]
    file = next((c for c in candidates if (folder / c).is_file()), None)
    if file is None:
        raise ForeignPatchError(
            f"{folder}: missing {candidates[0]} (or the older {candidates[1]}) for the "
            f"intervention at layer {rep['layer']}; copy the whole folder pyreft saved"
        )
    state = load_state_dict(folder / file)
    kind = PYREFT_CLASSES[rep["class"]]
    source = f"{folder / file}"
    params = natural_params(kind, state, rep["rank"], source)
    dtype = sorted({str(v.dtype).removeprefix("torch.") for k, v in state.items() if k not in _BOOKKEEPING})
    return {**rep, "kind": kind, "file": file, "params": params, "dtype": ",".join(dtype)}


def load_state_dict(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True (no code runs); the result must be a flat name -> tensor dict."""
    import pickle

    import torch

    size = path.stat().st_size
    if size > MAX_FOREIGN_BYTES:
        raise ForeignPatchError(
            f"{path}: {size} bytes is larger than any intervention ({MAX_FOREIGN_BYTES} at most)"
            "; pass the folder pyreft saved"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        UnicodeDecodeError,
        OSError,
    ) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ForeignPatchError(
            f"{path}: not a plain torch state dict ({first}); expected a file torch.save wrote from a dict of "
            "tensors; only such files are read (weights_only=True), so nothing in them runs"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ForeignPatchError(
            f"{path}: found a {type(state).__name__} that is not a name -> tensor dict, "
            "expected a state dict (pyvene saves intervention.state_dict())"
        )
    return state


def natural_params(kind: str, state: Mapping[str, Any], rank: int, source: str) -> dict[str, np.ndarray]:
    """pyreft's tensors -> this project's (R [r,d], W/W1/W2 [r,d], b [r]) in float64."""
    import torch

    hidden = hidden_size_of(state, source)
    taken: set[str] = set(_BOOKKEEPING)

    def get(name: str, shape: tuple[int, ...], optional: bool = False):
        tensor = state.get(name)
        if tensor is None:
            if optional:
                return None
            raise ForeignPatchError(
                f"{source}: missing tensor {name!r} for a {kind} intervention; found "
                f"{sorted(state)}; pass the file pyreft saved, unchanged"
            )
        if tuple(tensor.shape) != shape:
            raise ForeignPatchError(
                f"{source}: tensor {name!r} has shape {list(tensor.shape)}, expected "
                f"{list(shape)} (rank {rank}, hidden size {hidden}); the file is damaged"
            )
        taken.add(name)
        array = tensor.detach().to(dtype=torch.float64).numpy()
        if not np.isfinite(array).all():
            raise ForeignPatchError(f"{source}: tensor {name!r} holds NaN or infinite values; the training diverged")
        return array

    if kind in ("loreft", "direft", "consreft", "lobireft"):
        if "rotate_layer" in state:  # LoReFT's own state_dict: the parametrised weight, [d, r]
            R = get("rotate_layer", (hidden, rank)).T
        else:
            R = orthogonal_weight(get(_ORIGINAL, (hidden, rank)), get(_BASE, (hidden, hidden), optional=True)).T
        check_orthonormal(R, source)
        if kind in ("loreft", "direft"):
            prefix = "" if "weight" in state else "learned_source."
            params = {"R": R, "W": get(prefix + "weight", (rank, hidden)), "b": get(prefix + "bias", (rank,))}
        else:
            params = {"R": R, "b": get("learned_source", (rank,))}
    else:
        W1, b1 = get("learned_source.weight", (rank, hidden)), get("learned_source.bias", (rank,))
        W2 = get("proj_layer.weight", (rank, hidden))
        b2 = get("proj_layer.bias", (rank,), optional=True)
        # NoReFT subtracts proj_layer(h), its bias included; NodiReFT uses proj_layer's weight only
        b = b1 - b2 if kind == "noreft" and b2 is not None else b1
        params = {"W1": W1, "W2": W2, "b": b}
    unexpected = sorted(set(state) - taken - {"proj_layer.bias"})
    if unexpected:
        raise ForeignPatchError(
            f"{source}: unexpected tensors {unexpected[:4]} for a {kind} intervention; "
            "this is not pyreft's layout (custom act, subspaces?) and cannot be translated"
        )
    return params


def hidden_size_of(state: Mapping[str, Any], source: str) -> int:
    for name, axis in (("rotate_layer", 0), (_ORIGINAL, 0), ("weight", 1), ("learned_source.weight", 1)):
        if name in state and getattr(state[name], "dim", lambda: 0)() == 2:
            return int(state[name].shape[axis])
    raise ForeignPatchError(
        f"{source}: found tensors {sorted(state)[:6]}, none gives the hidden size; expected "
        "pyreft's rotate_layer or learned_source weights"
    )


def orthogonal_weight(original: np.ndarray, base: np.ndarray | None) -> np.ndarray:
    """The weight [d, r] torch's ``orthogonal`` parametrisation computes from ``original`` (and its
    ``base`` buffer when trivialised), with torch's default map: Householder for a tall matrix,
    the matrix exponential for a square one (torch.nn.utils.parametrizations._Orthogonal.forward)."""
    import torch

    X = torch.from_numpy(original)
    n, k = X.shape
    if n == k:
        A = X.tril()
        Q = torch.matrix_exp(A - A.T)
    else:
        A = X.tril(diagonal=-1)
        tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
        Q = torch.linalg.householder_product(A, tau)
        Q = Q * X.diagonal().int().unsqueeze(-2)  # +-1 as torch set them; a decayed diagonal truncates to 0
    if base is not None:
        Q = torch.from_numpy(base) @ Q
    return Q.numpy()


def check_orthonormal(R: np.ndarray, source: str) -> None:
    error = float(np.abs(R @ R.T - np.eye(R.shape[0])).max())
    if not error <= ORTHONORMAL_TOLERANCE:
        raise ForeignPatchError(
            f"{source}: the rotation R is not orthonormal (found max |R Rᵀ − I| = {error:.3g}, expected at most "
            f"{ORTHONORMAL_TOLERANCE}); torch's orthogonal parametrisation has collapsed (weight decay on its "
            "diagonal?) or the file is damaged; retrain without weight decay on rotate_layer"
        )


def check_uniform(items: list[dict[str, Any]], folder: Path) -> tuple[str, int]:
    kinds, ranks = {i["kind"] for i in items}, {i["rank"] for i in items}
    if len(kinds) > 1 or len(ranks) > 1:
        raise ForeignPatchError(
            f"{folder}: found kinds {sorted(kinds)} and ranks {sorted(ranks)}, expected one kind "
            "and one rank per patch; save each kind or rank in its own pyreft folder"
        )
    return kinds.pop(), ranks.pop()


def check_fits_model(items: list[dict[str, Any]], backbone: Any, folder: Path) -> None:
    for item in items:
        hidden = next(v for v in item["params"].values() if v.ndim == 2).shape[1]
        if hidden != backbone.hidden_size or item["layer"] >= backbone.num_layers:
            raise ForeignPatchError(
                f"{folder}: intervention at layer {item['layer']} with hidden size {hidden}, but --model "
                f"{backbone.source} has {backbone.num_layers} layers of size {backbone.hidden_size}; pass the model "
                "the pyreft folder was trained on with --model"
            )


def assign_groups(items: list[dict[str, Any]], positions: Positions, folder: Path) -> tuple[list[Intervention], bool]:
    """One intervention per layer: shared weights on every position group. Several per layer
    (pyreft's untied weights, keys #0, #1, ...): one per group of --positions, in order."""
    per_layer: dict[int, list[dict[str, Any]]] = {}
    for item in items:
        per_layer.setdefault(item["layer"], []).append(item)
    counts = {len(group) for group in per_layer.values()}
    groups = positions.groups()
    if counts == {1}:
        return [Intervention(i["layer"], "both", as_float32(i["params"])) for i in items], True
    if counts != {len(groups)}:
        raise ForeignPatchError(
            f"{folder}: found {sorted(counts)} interventions per layer, but --positions {positions} has "
            f"{len(groups)} group(s) {list(groups)}; expected 1 per layer (shared weights) or one per group "
            "(untied: #0 prefix, #1 suffix, as pyreft's share_weights=False trains them)"
        )
    ordered = sorted(items, key=lambda i: (i["collision"], i["layer"]))
    return [Intervention(i["layer"], groups[i["collision"]], as_float32(i["params"])) for i in ordered], False


def as_float32(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in params.items()}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- llama.cpp control vectors --------------------------------------------------------------------


def import_control_vector(
    path: str | Path,
    *,
    scale: float = 1.0,
    layers: tuple[int, int] | None = None,
    model: str | None = None,
    out: str | Path | None = None,
    name: str | None = None,
    backbone: Any = None,
) -> Patch:
    """A llama.cpp control vector (GGUF, ``direction.N``) as an every-position rank-1 patch."""
    path = Path(path)
    if out is not None:
        check_output_path(out)
    directions, hint = read_control_vector(path)
    if layers is not None:
        directions = {n: v for n, v in directions.items() if layers[0] <= n <= layers[1]}
    directions = {n: v * np.float64(scale) for n, v in directions.items() if np.linalg.norm(v) > 0}
    if not directions or scale == 0:
        raise ForeignPatchError(
            f"{path}: no non-zero direction left (layers {layers}, scale {scale}); expected "
            "direction.N tensors in the range; widen --layers or use a non-zero --scale"
        )
    if backbone is None:
        from reft_edge.train.backbone import load_backbone

        backbone = load_backbone(model)
    sizes = {v.shape[0] for v in directions.values()}
    if sizes != {backbone.hidden_size} or max(directions) >= backbone.num_layers:
        raise ForeignPatchError(
            f"{path}: directions of size {sorted(sizes)} at layers {sorted(directions)}, but --model "
            f"{backbone.source} has {backbone.num_layers} layers of size {backbone.hidden_size}; pass the model "
            "the control vector was made for with --model"
        )
    interventions = tuple(Intervention(n, "both", steering_params(v)) for n, v in sorted(directions.items()))
    training = {
        "imported_from": {
            "format": "llama.cpp-control-vector",
            "file": str(path.resolve()),
            "sha256": sha256_file(path),
            "scale": scale,
            "layers": sorted(directions),
            "model_hint": hint,
        },
        "library_version": __version__,
        "model": backbone.source,
    }
    patch = Patch(
        name=name or path.stem,
        kind="lobireft",
        positions=Positions.parse("all"),
        share_weights=True,
        rank=1,
        hidden_size=backbone.hidden_size,
        base_fingerprint=backbone.fingerprint,
        interventions=interventions,
        training=training,
    )
    fix = f"--scale {scale} makes the steering vector too large for float32; give a smaller --scale"
    patch.check_finite(str(path), fix)
    return patch.to_file(out, fix=fix) if out is not None else Patch.from_bytes(patch.to_bytes(), source=str(path))


def steering_params(vector: np.ndarray) -> dict[str, np.ndarray]:
    """h + v as a rank-1 LoBiReFT edit: R = v/|v| (orthonormal), b = |v|, so h + b R = h + v."""
    norm = float(np.linalg.norm(vector))
    with np.errstate(over="ignore"):  # too large for float32: Patch.check_finite says so, naming --scale
        return {"R": (vector / norm)[None].astype(np.float32), "b": np.array([norm], np.float32)}


def read_control_vector(path: Path) -> tuple[dict[int, np.ndarray], str | None]:
    """{N: direction.N as float64}, the file's controlvector.model_hint. llama.cpp never applies
    direction.0 (it starts at layer 1), so neither does this."""
    if not path.is_file():
        raise ForeignPatchError(f"{path}: no such file; pass a llama.cpp control vector (.gguf)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the gguf library raises ValueError, struct errors, IndexError, ... on bad files
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ForeignPatchError(
            f"{path}: not a readable GGUF file ({first}); expected a llama.cpp control vector (direction.N tensors)"
        ) from None
    directions = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if match is None:
            continue
        if tensor.tensor_type.name != "F32" or len([d for d in tensor.shape if d != 1]) > 1:
            raise ForeignPatchError(
                f"{path}: tensor {tensor.name} is {tensor.tensor_type.name} of shape "
                f"{list(tensor.shape)}, expected one F32 vector per layer"
            )
        vector = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
        if not np.isfinite(vector).all():
            raise ForeignPatchError(f"{path}: {tensor.name} holds NaN or infinite values; the file is damaged")
        if int(match.group(1)) > 0:
            directions[int(match.group(1))] = vector
    if not directions:
        raise ForeignPatchError(
            f"{path}: found tensors {[t.name for t in reader.tensors][:4]}, expected "
            "direction.N (N >= 1), as llama.cpp's control vectors hold"
        )
    field = reader.fields.get("controlvector.model_hint")
    hint = None
    if field is not None and field.data:
        hint = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return directions, hint
