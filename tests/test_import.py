"""Patches from elsewhere: pyreft folders and llama.cpp control vectors (reft_edge.train.interop).

The pyreft fixtures (tests/fixtures/pyreft) were written by pyreft 0.1.0 itself with
make_fixtures.py: a tiny random Llama, one saved folder per kind, and pyreft's own logits
and greedy tokens with the last prompt token edited (pyreft's quick start, our ``l1``).
The imported patch must reproduce them through torch (train.intervention hooks) and through
an exported bundle (the onnxruntime runtime). Control vectors are written here with the gguf
library in llama.cpp's layout and checked against the added-vector formula h + scale * v.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from reft_edge.errors import ForeignPatchError, UsageError
from reft_edge.runtime import Patch
from reft_edge.train.interop import import_control_vector, import_pyreft

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pyreft"
KINDS = ("loreft", "direft", "noreft", "nodireft", "consreft", "lobireft")
FOLDERS = (*KINDS, "loreft-untied")  # untied: pyreft's share_weights=False, #0 on the first token, #1 on the last
HIDDEN = 32  # the fixture model's hidden size
LOREFT_KEY = "layer_{layer}_comp_block_output_unit_pos_nunit_1#{i}"


def reference(kind: str) -> tuple[dict, np.ndarray]:
    return (
        json.loads((FIXTURES / kind / "reference.json").read_text()),
        np.load(FIXTURES / kind / "reference.npz")["logits"],
    )


@pytest.fixture(scope="module")
def backbone():
    from reft_edge.train.backbone import load_backbone

    return load_backbone(str(FIXTURES / "model"))


@pytest.fixture(scope="module")
def runtime(backbone, tmp_path_factory):
    from reft_edge.export import ExportConfig, export_bundle
    from reft_edge.runtime import Runtime

    out = tmp_path_factory.mktemp("pyreft-bundle") / "bundle"
    export_bundle(ExportConfig(model=backbone.path, out=str(out)), backbone=backbone, progress=False)
    return Runtime.load(out, threads=1)


# -- torch references -----------------------------------------------------------------------------


def patched_logits(backbone, patch: Patch | None, ids: list[int], n_prompt: int) -> np.ndarray:
    """Logits of the whole sequence with the patch's prompt positions (and, for ``g``, every token
    after the prompt) edited by the training stage's hooks."""
    from reft_edge.train.backbone import decoder_layers
    from reft_edge.train.intervention import EditSlots, attach_edits

    slots, layers = EditSlots(), decoder_layers(backbone.model)
    per_layer: dict[int, list] = {}  # one slot per layer: untied edits of a layer stack along the rank
    for edit in patch.affine_edits() if patch else []:
        mask = np.zeros((len(ids), edit.A.shape[0]), np.float32)
        mask[patch.positions.token_indices(edit.where, n_prompt)] = 1.0
        if patch.positions.edits(edit.where, "generated"):
            mask[n_prompt:] = 1.0
        per_layer.setdefault(edit.layer, []).append((edit.A, edit.B, edit.c, mask))
    with attach_edits({layer: layers[layer] for layer in per_layer}, slots), torch.no_grad():
        for layer, edits in per_layer.items():
            A, B, c, mask = (np.concatenate([e[i] for e in edits], axis=-1 if i == 3 else 0) for i in range(4))
            slots.set(layer, *(torch.from_numpy(x)[None] for x in (A, B, c, mask)))
        return backbone.model(input_ids=torch.tensor([ids])).logits[0].numpy()


def greedy(logits_of, prompt_ids: list[int], steps: int, penalty: float | None = None) -> list[int]:
    """Greedy tokens, recomputing the whole sequence each step (no cache), with transformers'
    repetition penalty over prompt and answer when given (as pyreft's generate applied it)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    ids = list(prompt_ids)
    for _ in range(steps):
        logits = torch.from_numpy(logits_of(ids)[-1:].copy())
        if penalty:
            logits = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits)
        ids.append(int(logits[0].argmax()))
    return ids[len(prompt_ids) :]


def added_vector_logits(backbone, vectors: dict[int, np.ndarray], ids: list[int]) -> np.ndarray:
    """The control-vector formula written out: output of block N += v_N at every token."""
    from reft_edge.train.backbone import decoder_layers

    layers = decoder_layers(backbone.model)

    def hook(vector):
        def add(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h + torch.from_numpy(vector.astype(np.float32))
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return add

    handles = [layers[n].register_forward_hook(hook(v)) for n, v in vectors.items()]
    try:
        with torch.no_grad():
            return backbone.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    finally:
        for handle in handles:
            handle.remove()


# -- pyreft: the real thing -----------------------------------------------------------------------


@pytest.mark.parametrize("folder", FOLDERS)
def test_import_reproduces_pyreft_logits(folder, backbone, tmp_path):
    ref, want = reference(folder)
    patch = import_pyreft(FIXTURES / folder, positions=ref["positions"], backbone=backbone, out=tmp_path / "p.reft")
    assert Patch.from_file(tmp_path / "p.reft") == patch
    shared = len(set(ref["layers"])) == len(ref["layers"])
    assert (patch.kind, patch.layers, patch.rank, patch.share_weights) == (
        ref["kind"],
        sorted(set(ref["layers"])),
        ref["rank"],
        shared,
    )
    assert patch.training["imported_from"]["format"] == "pyreft"
    assert patch.base_fingerprint == backbone.fingerprint
    ids = ref["input_ids"]
    got = patched_logits(backbone, patch, ids, len(ids))
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(patched_logits(backbone, None, ids, len(ids)) - want).max() > 0.1  # the edit matters


@pytest.mark.parametrize("folder", FOLDERS)
def test_torch_greedy_equals_pyreft(folder, backbone):
    ref, _ = reference(folder)
    patch = import_pyreft(FIXTURES / folder, positions=ref["positions"], backbone=backbone)
    n = len(ref["input_ids"])
    steps, penalty = len(ref["greedy_tokens"]), ref["repetition_penalty"]
    tokens = greedy(lambda ids: patched_logits(backbone, patch, ids, n), ref["input_ids"], steps, penalty)
    assert tokens == ref["greedy_tokens"]


def test_pyreft_edits_change_most_greedy_answers(backbone):
    """The greedy comparisons have teeth: most kinds' edit of one token changes the answer."""
    ref, _ = reference("loreft")
    base = greedy(
        lambda ids: patched_logits(backbone, None, ids, len(ids)),
        ref["input_ids"],
        len(ref["greedy_tokens"]),
        ref["repetition_penalty"],
    )
    changed = [kind for kind in KINDS if reference(kind)[0]["greedy_tokens"] != base]
    assert len(changed) >= 4, changed


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS)
def test_bundle_greedy_equals_pyreft(folder, backbone, runtime):
    ref, _ = reference(folder)
    patch = import_pyreft(FIXTURES / folder, positions=ref["positions"], backbone=backbone)
    assert runtime.encode(ref["prompt"], raw=True) == ref["input_ids"]
    got = runtime.generate(
        ref["prompt"],
        patches=[patch],
        raw=True,
        max_new_tokens=len(ref["greedy_tokens"]),
        temperature=0.0,
        no_repeat_ngram=0,
        ignore_eos=True,
        repetition_penalty=ref["repetition_penalty"],
    )
    assert got.token_ids == ref["greedy_tokens"]


def test_cli_import_pyreft(tmp_path):
    from click.testing import CliRunner

    from reft_edge.cli import main

    out = tmp_path / "lobi.reft"
    result = CliRunner().invoke(
        main,
        [
            "import",
            "pyreft",
            str(FIXTURES / "lobireft"),
            "--positions",
            "l1+g",
            "--model",
            str(FIXTURES / "model"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    patch = Patch.from_file(out)
    assert (patch.kind, str(patch.positions), patch.layers) == ("lobireft", "l1+g", [0])
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert "imported from pyreft" in shown.output


# -- pyreft: layouts the fixtures do not cover, against the formulas written out here -------------


def write_folder(
    folder: Path,
    layers: list[int],
    states: list[dict],
    classes: list[str],
    *,
    rank: int = 2,
    old_keys: bool = False,
    component: str = "block_output",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[int, int] = {}
    for layer, state in zip(layers, states):
        i = counts[layer] = counts.get(layer, -1) + 1
        key = LOREFT_KEY.format(layer=layer, i=i)
        if old_keys:
            key = f"layer.{layer}.comp.{component}.unit.pos.nunit.1#{i}"
        torch.save(state, folder / f"intkey_{key}.bin")
    config = {
        "representations": [[layer, component, "pos", 1, rank] + [None] * 9 for layer in layers],
        "intervention_types": [f"<class 'pyreft.interventions.{c}'>" for c in classes],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def loreft_state(hidden: int, rank: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(hidden, rank, generator=generator))
    return {
        "weight": torch.randn(rank, hidden, generator=generator),
        "bias": torch.randn(rank, generator=generator),
        "rotate_layer": q,
    }


def test_untied_old_style_keys_map_to_position_groups(backbone, tmp_path):
    """Two LoReFT interventions at one layer (pyreft's share_weights=False), older dotted keys:
    #0 edits the prefix, #1 the suffix; each edit is h + R^T(W h + b - R h)."""
    states = [loreft_state(HIDDEN, 2, seed) for seed in (1, 2)]
    folder = write_folder(tmp_path / "untied", [1, 1], states, ["LoreftIntervention"] * 2, old_keys=True)
    patch = import_pyreft(folder, positions="f1+l1", backbone=backbone)
    assert not patch.share_weights and [(iv.layer, iv.where) for iv in patch.interventions] == [
        (1, "prefix"),
        (1, "suffix"),
    ]
    h = torch.randn(5, HIDDEN, dtype=torch.float64)
    for edit, state in zip(patch.affine_edits(), states):
        R, W, b = (state[k].double() for k in ("rotate_layer", "weight", "bias"))
        expected = h + ((h @ W.T + b) - h @ R) @ R.T
        A, B, c = (torch.from_numpy(x).double() for x in (edit.A, edit.B, edit.c))
        assert torch.allclose(h + (h @ B.T + c) @ A, expected, atol=1e-5)
    with pytest.raises(ForeignPatchError, match="interventions per layer"):
        import_pyreft(folder, positions="l1", backbone=backbone)


def test_orthogonal_parametrisation_is_torchs(backbone, tmp_path):
    """DiReFT from a state dict torch's own parametrisation wrote: our R is torch's weight, transposed."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.empty(HIDDEN, 2))
    torch.nn.init.orthogonal_(module.weight)
    rotate = torch.nn.utils.parametrizations.orthogonal(module)
    with torch.no_grad():
        rotate.parametrizations.weight.original.add_(torch.randn(HIDDEN, 2).tril(-1) * 0.2)
    state = {f"rotate_layer.{k}": v for k, v in rotate.state_dict().items()}
    state |= {"learned_source.weight": torch.randn(2, HIDDEN), "learned_source.bias": torch.randn(2)}
    folder = write_folder(tmp_path / "direft", [0], [state], ["DireftIntervention"])
    patch = import_pyreft(folder, positions="l1", backbone=backbone)
    assert np.allclose(patch.interventions[0].params["R"], rotate.weight.detach().numpy().T, atol=1e-6)


# -- pyreft: bad inputs end in one-line typed errors, and never run code ---------------------------


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def damaged(tmp_path: Path, change) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(FIXTURES / "loreft", folder)
    change(folder, folder / f"intkey_{LOREFT_KEY.format(layer=0, i=0)}.bin")
    return folder


def set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "case, match",
    [
        ("no-config", "config.json: missing"),
        ("no-bin", "missing intkey_layer_0"),
        ("code", "not a plain torch state dict"),
        ("list", "not a name -> tensor dict"),
        ("shape", "has shape"),
        ("missing-key", "missing tensor 'bias'"),
        ("not-orthonormal", "not orthonormal"),
        ("unknown-kind", "not importable"),
        ("component", "only 'block_output'"),
        ("not-json", "not valid JSON"),
        ("nan", "NaN"),
    ],
)
def test_bad_pyreft_folders(case, match, backbone, tmp_path):
    marker = tmp_path / "code-ran"
    state = loreft_state(HIDDEN, 2, 0)
    changes = {
        "no-config": lambda f, b: (f / "config.json").unlink(),
        "no-bin": lambda f, b: b.unlink(),
        "code": lambda f, b: torch.save({"weight": RunsCode(marker)}, b),
        "list": lambda f, b: torch.save([state["weight"]], b),
        "shape": lambda f, b: torch.save(state | {"rotate_layer": torch.zeros(HIDDEN, 3)}, b),
        "missing-key": lambda f, b: torch.save({k: v for k, v in state.items() if k != "bias"}, b),
        "not-orthonormal": lambda f, b: torch.save(state | {"rotate_layer": state["rotate_layer"] * 2}, b),
        "unknown-kind": lambda f, b: set_config(f, intervention_types=["<class 'mine.Custom'>"] * 2),
        "component": lambda f, b: set_config(f, representations=[[0, "mlp_output", "pos", 1, 2]] * 2),
        "not-json": lambda f, b: (f / "config.json").write_text("{"),
        "nan": lambda f, b: torch.save(state | {"bias": torch.tensor([float("nan"), 0.0])}, b),
    }
    folder = damaged(tmp_path, changes[case])
    with pytest.raises(ForeignPatchError, match=match) as error:
        import_pyreft(folder, positions="l1", backbone=backbone)
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_bfloat16_is_widened_and_the_model_must_fit(backbone, tmp_path):
    state = {k: v.to(torch.bfloat16) if k != "rotate_layer" else v for k, v in loreft_state(HIDDEN, 2, 3).items()}
    folder = write_folder(tmp_path / "bf16", [1], [state], ["LoreftIntervention"])
    patch = import_pyreft(folder, positions="l1", backbone=backbone)
    assert patch.dtype == "float32" and patch.training["imported_from"]["source_dtype"] == ["bfloat16,float32"]
    assert np.array_equal(patch.interventions[0].params["W"], state["weight"].float().numpy())
    small = write_folder(tmp_path / "small", [1], [loreft_state(8, 2, 3)], ["LoreftIntervention"])
    with pytest.raises(ForeignPatchError, match="hidden size 8, but --model"):
        import_pyreft(small, positions="l1", backbone=backbone)
    far = write_folder(tmp_path / "far", [5], [loreft_state(HIDDEN, 2, 3)], ["LoreftIntervention"])
    with pytest.raises(ForeignPatchError, match="has 2 layers"):
        import_pyreft(far, positions="l1", backbone=backbone)


def test_collapsed_householder_diagonal_is_refused(backbone, tmp_path):
    """Weight decay shrinks the parametrisation's +-1 diagonal; torch truncates it to 0: no rotation left."""
    original = torch.randn(HIDDEN, 2).tril(-1) * 0.1
    original.diagonal().fill_(0.98)
    state = {"rotate_layer.parametrizations.weight.original": original, "learned_source": torch.randn(2)}
    folder = write_folder(tmp_path / "collapsed", [0], [state], ["LobireftIntervention"])
    with pytest.raises(ForeignPatchError, match="collapsed"):
        import_pyreft(folder, positions="l1", backbone=backbone)


def test_nonlinear_act_and_bad_positions_are_refused(backbone):
    with pytest.raises(ForeignPatchError, match="non-linear activation"):
        import_pyreft(FIXTURES / "loreft", positions="l1", act_fn="relu", backbone=backbone)
    with pytest.raises(UsageError, match="malformed"):
        import_pyreft(FIXTURES / "loreft", positions="last", backbone=backbone)


def test_cli_error_is_one_line(tmp_path):
    from click.testing import CliRunner

    from reft_edge.cli import main

    result = CliRunner().invoke(
        main,
        [
            "import",
            "pyreft",
            str(tmp_path / "nothing"),
            "--positions",
            "l1",
            "--model",
            str(FIXTURES / "model"),
            "--out",
            str(tmp_path / "x.reft"),
        ],
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert not (tmp_path / "x.reft").exists()


# -- llama.cpp control vectors --------------------------------------------------------------------


def write_control_vector(path: Path, directions: dict[int, np.ndarray], hint: str = "llama") -> Path:
    """A control vector in llama.cpp's layout, as its control-vector-generator (and repeng) write it."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, vector in directions.items():
        writer.add_tensor(f"direction.{layer}", vector.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def directions() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {0: rng.normal(size=HIDDEN) * 3, 1: rng.normal(size=HIDDEN) * 3}


def test_control_vector_is_the_added_vector(backbone, directions, tmp_path):
    path = write_control_vector(tmp_path / "happy.gguf", directions)
    patch = import_control_vector(path, scale=0.5, backbone=backbone, out=tmp_path / "happy.reft")
    assert (patch.kind, str(patch.positions), patch.rank, patch.layers) == ("lobireft", "p+g", 1, [1])
    assert patch.training["imported_from"]["model_hint"] == "llama"
    h = np.random.default_rng(1).normal(size=(4, HIDDEN))
    (edit,) = patch.affine_edits()
    assert np.allclose(h + (h @ edit.B.T + edit.c) @ edit.A, h + 0.5 * directions[1].astype(np.float32), atol=1e-5)
    ids = list(range(3, 12))
    want = added_vector_logits(backbone, {1: 0.5 * directions[1]}, ids)  # llama.cpp never applies direction.0
    assert np.abs(patched_logits(backbone, patch, ids, 5) - want).max() <= 1e-4


@pytest.mark.slow
def test_control_vector_through_a_bundle(backbone, runtime, directions, tmp_path):
    path = write_control_vector(tmp_path / "steer.gguf", directions)
    patch = import_control_vector(path, scale=1.5, backbone=backbone)
    prompt = "How do I bake a cake?"
    ids = runtime.encode(prompt, raw=True)
    expected = greedy(lambda seq: added_vector_logits(backbone, {1: 1.5 * directions[1]}, seq), ids, 10)
    got = runtime.generate(
        prompt, patches=[patch], raw=True, max_new_tokens=10, temperature=0.0, no_repeat_ngram=0, ignore_eos=True
    )
    assert got.token_ids == expected
    base = runtime.generate(prompt, raw=True, max_new_tokens=10, temperature=0.0, no_repeat_ngram=0, ignore_eos=True)
    assert base.token_ids != expected


def test_control_vector_layers_and_cli(directions, tmp_path):
    from click.testing import CliRunner

    from reft_edge.cli import main

    path = write_control_vector(tmp_path / "two.gguf", {1: directions[1], 2: 2 * directions[1]})
    out = tmp_path / "one.reft"
    args = ["import", "control-vector", str(path), "--model", str(FIXTURES / "model"), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--layers", "1-1", "--scale", "2"])
    assert result.exit_code == 0, result.output
    patch = Patch.from_file(out)
    assert patch.layers == [1]
    assert np.allclose(patch.interventions[0].params["b"], 2 * np.linalg.norm(directions[1]), rtol=1e-6)
    result = CliRunner().invoke(main, [*args, "--layers", "1-2"])  # the tiny model has layers 0 and 1 only
    assert result.exit_code == 2 and "has 2 layers" in result.output and result.output.count("\n") == 1
    result = CliRunner().invoke(main, [*args, "--layers", "2-1"])
    assert result.exit_code == 2 and "malformed" in result.output


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "no such file"),
        ("not-gguf", "not a readable GGUF"),
        ("no-directions", "expected direction.N"),
        ("size", "directions of size"),
        ("zero", "no non-zero direction"),
    ],
)
def test_bad_control_vectors(case, match, backbone, tmp_path):
    path = tmp_path / "bad.gguf"
    if case == "not-gguf":
        path.write_bytes(b"GGUF" + os.urandom(64))
    elif case == "no-directions":
        write_control_vector(path, {}, hint="llama")
    elif case == "size":
        write_control_vector(path, {1: np.ones(8)})
    elif case == "zero":
        write_control_vector(path, {1: np.zeros(HIDDEN)})
    with pytest.raises(ForeignPatchError, match=match) as error:
        import_control_vector(path, backbone=backbone)
    assert "\n" not in str(error.value)
