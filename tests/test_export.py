"""The export stage: graph contract, parity with torch per architecture, identity, batching,
composition, precisions, atomicity and errors.

Parity compares onnxruntime on the exported graph with the Hugging Face model plus the
training stage's edit hooks (train.intervention.attach_edits). Tiny random models keep
the architecture tests fast; the default model is exported once, in the slow test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import ARCHITECTURES
from reft_edge.cli import main
from reft_edge.errors import ExportError, ModelError, UsageError
from reft_edge.export import ExportConfig, export_bundle
from reft_edge.export.verify import Batch, TorchReference, open_engine, random_batch, run_both
from reft_edge.runtime.bundle import Manifest
from reft_edge.runtime.contract import past_names, position_rows, token_mask
from reft_edge.runtime.engine import Engine
from reft_edge.runtime.positions import Positions
from reft_edge.runtime.slots import SlotArrays, resolve_edits, slot_arrays
from reft_edge.train import TrainConfig, train
from reft_edge.train.backbone import decoder_layers, load_backbone
from reft_edge.train.intervention import low_rank_edit

# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama(tiny_backbone):
    return tiny_backbone


@pytest.fixture(scope="session")
def llama_bundle(tiny_bundle) -> Path:
    return tiny_bundle


@pytest.fixture(scope="session")
def llama_engine(llama_bundle) -> Engine:
    return bundle_engine(llama_bundle)


def bundle_engine(bundle: Path) -> Engine:
    manifest = Manifest.from_dir(bundle)
    return open_engine(
        bundle / "model.onnx",
        graph=manifest.graph,
        kv=manifest.kv,
        slot_layers=manifest.slot_layers,
        pad_id=manifest.special_tokens["pad_token_id"],
    )


def prefill(engine: Engine, prompts: list[list[int]], slots: SlotArrays) -> np.ndarray:
    return engine.start(prompts, slots, 1).prefill()


def tiny_data(tmp_path: Path) -> Path:
    rows = [
        {"prompt": "What is the weather like today?", "response": "sunny and warm"},
        {"prompt": "How do I bake a cake?", "response": "mix flour, eggs and sugar"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# -- per architecture: train a few steps, export, parity with the trained patch ---------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_architecture_exports_with_parity(architecture, tiny_model_dir, tmp_path):
    backbone = load_backbone(str(tiny_model_dir(architecture)))
    patch = train(
        TrainConfig(
            data=str(tiny_data(tmp_path)),
            out=str(tmp_path / "p.reft"),
            model=backbone.path,
            layers=(0, 2),
            rank=2,
            positions="f1+l2",
            share_weights=False,
            steps=3,
        ),
        backbone=backbone,
        progress=False,
    )
    manifest = export_bundle(
        ExportConfig(out=str(tmp_path / "bundle"), model=backbone.path), backbone=backbone, progress=False
    )

    checked = manifest.verification
    assert checked["max_abs_logit_diff"] <= 1e-4 and checked["greedy_tokens_match"], checked
    assert checked["logit_diff_limit"] == max(1e-4, 4e-6 * checked["logit_max_abs"])
    assert checked["identity_bit_exact"] and checked["patch_effect_max_abs"] > 1e-3
    assert manifest.architecture == architecture and manifest.slot_layers == [0, 1, 2]
    assert manifest.base_fingerprint == patch.base_fingerprint
    assert Manifest.from_dir(tmp_path / "bundle") == manifest

    assert manifest.graph == ("fused" if architecture in ("llama", "qwen2", "qwen3", "mistral") else "traced")

    prompts = [[5, 9, 14, 3, 22, 7], [11, 4, 30, 8]]
    edits = resolve_edits([patch], None, manifest.slot_layers)
    slots = slot_arrays([edits, edits], 3, backbone.hidden_size)
    reference = TorchReference(backbone.model, manifest.slot_layers)
    with reference.attached():
        got, want = run_both(
            bundle_engine(tmp_path / "bundle"),
            reference,
            Batch(prompts, slots),
            steps=4,
            pad_id=manifest.special_tokens["pad_token_id"],
        )
    assert max(np.abs(g - w).max() for g, w in zip(got, want)) <= 1e-4


def test_sliding_window_attention_matches_torch(tiny_model_dir, tmp_path):
    """Prompts of 13 and 20 tokens and 32 greedy tokens run far past a 4-token window."""
    backbone = load_backbone(str(tiny_model_dir("mistral-window")))
    assert backbone.model.config.sliding_window == 4
    manifest = export_bundle(
        ExportConfig(out=str(tmp_path / "bundle"), model=backbone.path), backbone=backbone, progress=False
    )
    checked = manifest.verification
    assert manifest.graph == "fused" and min(checked["prompt_tokens"]) > 4
    assert checked["max_abs_logit_diff"] <= 1e-4 and checked["greedy_tokens_match"], checked


def test_graph_contract(llama_bundle, llama):
    import onnx

    model = onnx.load(str(llama_bundle / "model.onnx"), load_external_data=False)
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }
    manifest = Manifest.from_dir(llama_bundle)
    assert [v.name for v in model.graph.input] == manifest.inputs
    assert [v.name for v in model.graph.output] == manifest.outputs
    assert manifest.graph == "fused" and "position_ids" not in shapes
    assert shapes["input_ids"] == ["batch", "seq"] and shapes["attention_mask"] == ["batch", "total_seq"]
    assert shapes["past_key_values.0.key"] == ["batch", 2, "max_length", 16]
    assert shapes["present.2.value"] == ["batch", 2, "max_length", 16]
    assert shapes["slot.0.A"] == ["batch", "rank", 64] and shapes["slot.2.c"] == ["batch", 1, "rank"]
    assert shapes["slot.1.positions"] == ["batch", 4, "rank"]
    assert shapes["logits"] == ["batch", 1, llama.model.config.vocab_size]
    assert (llama_bundle / "model.onnx.data").is_file()
    assert manifest.files == {
        "model": "model.onnx",
        "model_data": "model.onnx.data",
        "tokenizer": "tokenizer.json",
        "chat_template": "chat_template.jinja",
        "genai_config": "genai_config.json",
        "tokenizer_config": "tokenizer_config.json",
    }
    genai = json.loads((llama_bundle / "genai_config.json").read_text())["model"]
    assert (genai["type"], genai["context_length"], genai["vocab_size"], genai["pad_token_id"]) == (
        "llama",
        256,
        llama.model.config.vocab_size,
        manifest.special_tokens["pad_token_id"],
    )
    assert (genai["decoder"]["head_size"], genai["decoder"]["num_key_value_heads"]) == (16, 2)
    assert genai["decoder"]["inputs"]["past_key_names"] % 1 == "past_key_values.1.key"
    assert (
        json.loads((llama_bundle / "tokenizer_config.json").read_text())["chat_template"]
        == llama.tokenizer.chat_template
    )
    assert (llama_bundle / "chat_template.jinja").read_text() == llama.tokenizer.chat_template
    assert manifest.special_tokens["eos_token_ids"] == [llama.tokenizer.eos_token_id]
    assert manifest.context_length == 256 and manifest.kv.dtype == "float32" and manifest.kv.num_kv_heads == 2
    assert manifest.size_bytes == sum(p.stat().st_size for p in llama_bundle.iterdir() if p.name != "manifest.json")


# -- the edit inside the graph ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["f1", "l1", "f2+l2", "f3+l3", "f1+l4", "p", "f1+l1+g", "l2+g", "p+g", "g", "f6"])
def test_token_mask_selects_exactly_the_positions_spans(text):
    """contract.token_mask (what both graph kinds compute) against Positions.token_indices, on
    prompts shorter and longer than the positions, two generated tokens and a pad after them."""
    positions = Positions.parse(text)
    for where in ("both", *positions.groups()):
        rows = position_rows([(positions, where, 1)])
        for prompt_len in range(0, 9):
            t = np.arange(prompt_len + 3)[None]
            got = token_mask(rows[None], t, np.array([prompt_len]), t < prompt_len + 2)[0, :, 0]
            want = np.zeros(prompt_len + 3, bool)
            want[positions.token_indices(where, prompt_len)] = True
            want[prompt_len : prompt_len + 2] = positions.edits(where, "generated")
            assert got.tolist() == want.tolist(), (where, prompt_len)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # a fused and a traced graph
def test_short_prompts_cap_positions_in_the_graph(architecture, tiny_model_dir, tmp_path):
    """Prompts of 1 to 4 tokens with f3+l3 (capped so the suffix yields to the prefix) and p+g,
    in one batch: the graph's own masks against torch with contract.token_mask's."""
    from reft_edge.runtime.slots import SlotEdit

    backbone = load_backbone(str(tiny_model_dir(architecture)))
    manifest = export_bundle(
        ExportConfig(out=str(tmp_path / "bundle"), model=backbone.path, verify=False, slot_layers=(1,)),
        backbone=backbone,
        progress=False,
    )
    rng = np.random.default_rng(5)
    hidden = backbone.hidden_size

    def edit(text: str, where: str, rank: int = 2) -> SlotEdit:
        return SlotEdit(
            0,
            Positions.parse(text),
            where,
            rng.standard_normal((rank, hidden)).astype(np.float32) / 4,
            rng.standard_normal((rank, hidden)).astype(np.float32) / 4,
            rng.standard_normal(rank).astype(np.float32),
        )

    rows = [
        [edit("f3+l3", "prefix"), edit("f3+l3", "suffix")],
        [edit("f3+l3", "both")],
        [edit("p+g", "both")],
        [edit("f3+l3", "suffix"), edit("l1+g", "both", 1)],
    ]
    batch = Batch([[7, 3, 9, 4], [5], [8, 2], [6, 1, 3]], slot_arrays(rows, 1, hidden))
    reference = TorchReference(backbone.model, manifest.slot_layers)
    with reference.attached():
        got, want = run_both(
            bundle_engine(tmp_path / "bundle"),
            reference,
            batch,
            steps=3,
            pad_id=manifest.special_tokens["pad_token_id"],
        )
    assert max(np.abs(g - w).max() for g, w in zip(got, want)) <= 1e-4


def test_empty_and_zero_mask_patches_are_bit_exact_identity(llama_engine):
    batch = random_batch(vocab_size=300, hidden=64, num_slots=3, edited_slots=[0, 1, 2])
    rank0 = prefill(llama_engine, batch.prompts, SlotArrays.empty(3, 2, 64))
    zero_mask = prefill(llama_engine, batch.prompts, batch.without_edit().slots)
    patched = prefill(llama_engine, batch.prompts, batch.slots)
    assert np.array_equal(rank0, zero_mask)
    assert not np.allclose(rank0, patched)


def test_each_row_of_a_batch_equals_that_row_alone(llama_engine):
    batch = random_batch(vocab_size=300, hidden=64, num_slots=3, edited_slots=[0, 2], seed=3)
    together = llama_engine.start(batch.prompts, batch.slots, 4)
    alone = [
        llama_engine.start([prompt], batch.slots.rows(slice(row, row + 1)), 4)
        for row, prompt in enumerate(batch.prompts)
    ]
    got, want = together.prefill(), np.concatenate([run.prefill() for run in alone])
    for _ in range(3):  # and every decode step after it
        np.testing.assert_allclose(got, want, atol=1e-5)
        tokens = want.argmax(-1)
        got, want = together.decode(tokens), np.concatenate([run.decode(t[None]) for run, t in zip(alone, tokens)])


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # a fused and a traced graph
def test_composed_patches_match_two_separate_edits_in_torch(architecture, tiny_model_dir, tmp_path):
    """Two patches concatenated along the rank equal the sum of their edits, each on its own positions."""
    backbone = load_backbone(str(tiny_model_dir(architecture)))
    export_bundle(
        ExportConfig(out=str(tmp_path / "bundle"), model=backbone.path, verify=False), backbone=backbone, progress=False
    )
    rng = np.random.default_rng(7)
    prompt = [3, 8, 20, 41, 9, 12, 5]
    seq, hidden = len(prompt), backbone.hidden_size

    def patch(rank: int, positions: str, tokens: list[int]):
        A = rng.standard_normal((rank, hidden)).astype(np.float32) / 8
        B = rng.standard_normal((rank, hidden)).astype(np.float32) / 8
        c = rng.standard_normal(rank).astype(np.float32)
        mask = np.zeros((seq, rank), np.float32)
        mask[tokens] = 1.0
        return A, B, c, position_rows([(Positions.parse(positions), "both", rank)]), mask

    # first: layer 0, first two tokens, rank rows 0-1; second: layers 0 and 2, last token, rank rows 2-4
    first, second_0, second_2 = patch(2, "f2", [0, 1]), patch(3, "l1", [seq - 1]), patch(3, "l1", [seq - 1])
    per_layer = {0: [(0, first), (2, second_0)], 2: [(2, second_2)]}
    A, B = np.zeros((3, 1, 5, hidden), np.float32), np.zeros((3, 1, 5, hidden), np.float32)
    c, positions = np.zeros((3, 1, 5), np.float32), np.zeros((3, 1, 4, 5), np.int64)
    for layer, parts in per_layer.items():
        for offset, (a, b, c_, p, _) in parts:
            rows = slice(offset, offset + a.shape[0])
            A[layer, 0, rows], B[layer, 0, rows], c[layer, 0, rows], positions[layer, 0, :, rows] = a, b, c_, p
    got = prefill(bundle_engine(tmp_path / "bundle"), [prompt], SlotArrays(A, B, c, positions))

    def hook(parts):
        def apply(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            t = lambda x: torch.from_numpy(x)[None]  # noqa: E731
            edited = h + sum(low_rank_edit(h, t(a), t(b), t(c_), t(m)) - h for _, (a, b, c_, _, m) in parts)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return apply

    layers = decoder_layers(backbone.model)
    handles = [layers[layer].register_forward_hook(hook(parts)) for layer, parts in per_layer.items()]
    try:
        with torch.no_grad():
            want = backbone.model(input_ids=torch.tensor([prompt])).logits[:, -1].numpy()
    finally:
        for handle in handles:
            handle.remove()
    np.testing.assert_allclose(got, want, atol=1e-4)


# -- precisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_reduced_precisions_record_their_figures(precision, llama, tmp_path):
    out = tmp_path / precision
    manifest = export_bundle(
        ExportConfig(out=str(out), model=llama.path, precision=precision, slot_layers=(0, 2)),
        backbone=llama,
        progress=False,
    )
    assert manifest.precision == precision and manifest.slot_layers == [0, 2]
    assert manifest.kv.dtype == ("float16" if precision == "fp16" else "float32")
    checked = manifest.verification
    assert 0.0 < checked["max_abs_logit_diff"] < 1.0 and 0.0 <= checked["greedy_tokens_agreement"] <= 1.0
    assert checked["identity_bit_exact"]
    if precision in ("int8", "int4"):  # random float weights: none are GGUF blocks, all re-quantized
        assert set(checked["weight_blocks"]) == {"requantized"} and checked["weight_blocks"]["requantized"] > 0
    types = {i.name: i.type for i in bundle_engine(out).session.get_inputs()}
    assert types["slot.0.A"] == "tensor(float)" and types["slot.2.positions"] == "tensor(int64)"
    assert types[past_names(0)[0]] == ("tensor(float16)" if precision == "fp16" else "tensor(float)")
    assert manifest.size_bytes == sum(p.stat().st_size for p in out.iterdir() if p.name != "manifest.json")


# -- bundle lifecycle ------------------------------------------------------------------------------


def test_identical_bundle_is_not_exported_again(llama, llama_bundle, capsys):
    before = (llama_bundle / "manifest.json").stat().st_mtime_ns
    manifest = export_bundle(ExportConfig(out=str(llama_bundle), model=llama.path), backbone=llama)
    assert "up to date" in capsys.readouterr().out
    assert (llama_bundle / "manifest.json").stat().st_mtime_ns == before
    assert manifest == Manifest.from_dir(llama_bundle)


def test_failed_parity_raises_and_leaves_no_bundle(llama, tmp_path, monkeypatch):
    import reft_edge.export.verify as verify

    real = verify.verify_graph
    monkeypatch.setattr(
        verify, "verify_graph", lambda *args, **kwargs: {**real(*args, **kwargs), "max_abs_logit_diff": 0.5}
    )
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="does not match torch"):
        export_bundle(ExportConfig(out=str(out), model=llama.path, slot_layers=(1,)), backbone=llama, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    result = CliRunner().invoke(main, ["export", "--model", llama.path, "--out", str(out), "--slot-layers", "1"])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: export of")
    assert not out.exists()


def test_killed_export_leaves_no_bundle_and_rerun_succeeds(tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    model = str(tiny_model_dir("gpt2"))  # traced: slow enough to be killed in the middle
    code = (
        "from reft_edge.export import ExportConfig, export_bundle; "
        f"export_bundle(ExportConfig(out={str(out)!r}, model={model!r}), progress=False)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".bundle.*.tmp/.work")):  # the trace is starting
            assert process.poll() is None and time.monotonic() < deadline, "export ended before it was killed"
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the trace (several seconds even for the tiny model)
        assert process.poll() is None, "export ended before it was killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert not out.exists()
    export_bundle(ExportConfig(out=str(out), model=model), progress=False)
    assert Manifest.from_dir(out).verification["greedy_tokens_match"]


def test_export_removes_what_killed_exports_left_a_day_ago(llama, llama_bundle):
    """Hidden temporaries of atomic_dir untouched for over a day go; a live one (recent change inside) stays."""
    stale, live = (llama_bundle.parent / f".{llama_bundle.name}.{tag}.tmp" for tag in ("k1ll3d", "l1v3"))
    for folder in (stale, live):
        (folder / ".work").mkdir(parents=True)
        (folder / ".work" / "model.onnx").write_bytes(b"partial")
    old = time.time() - 2 * 86400
    for path in (stale / ".work" / "model.onnx", stale / ".work", stale, live):
        os.utime(path, (old, old))
    export_bundle(ExportConfig(out=str(llama_bundle), model=llama.path), backbone=llama, progress=False)
    assert not stale.exists() and live.is_dir()  # the live one's newest change is its file, just written
    shutil.rmtree(live)


def test_inspect_bundle(llama_bundle):
    result = CliRunner().invoke(main, ["inspect", str(llama_bundle), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == Manifest.from_dir(llama_bundle).to_dict()
    result = CliRunner().invoke(main, ["inspect", str(llama_bundle)])
    assert result.exit_code == 0 and "fp32" in result.output and "slot layers [0, 1, 2]" in result.output
    assert "(llama, fused graph)" in result.output


# -- errors ----------------------------------------------------------------------------------------


def test_bad_options_fail_before_loading(tmp_path):
    with pytest.raises(UsageError, match="--precision 'int2'"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), precision="int2"))
    result = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "b"), "--slot-layers", "1,x"])
    assert result.exit_code == 2 and "--slot-layers '1,x' is malformed" in result.output


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # a fused and a traced graph
def test_slot_free_bundle_runs_the_base_and_refuses_patches(architecture, tiny_model_dir, tmp_path):
    from reft_edge.errors import PatchCompatibilityError
    from reft_edge.runtime import Runtime

    backbone = load_backbone(str(tiny_model_dir(architecture)))
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["export", "--model", backbone.path, "--out", str(out), "--slot-layers", "none"])
    assert result.exit_code == 0, result.output
    manifest = Manifest.from_dir(out)
    assert manifest.slot_layers == [] and not any(name.startswith("slot.") for name in manifest.inputs)
    assert manifest.verification["max_abs_logit_diff"] <= 1e-4 and manifest.verification["greedy_tokens_match"]
    patch = train(
        TrainConfig(
            data=str(tiny_data(tmp_path)),
            out=str(tmp_path / "p.reft"),
            model=backbone.path,
            layers=(1,),
            rank=2,
            steps=1,
        ),
        backbone=backbone,
        progress=False,
    )
    runtime = Runtime.load(out)
    assert runtime.generate("Hi", max_new_tokens=3, ignore_eos=True).token_ids
    with pytest.raises(
        PatchCompatibilityError,
        match=r"edits layers \[1\], which are not among the bundle's slot "
        r"layers \[\]; re-export with --slot-layers",
    ):
        runtime.generate("Hi", patches=[patch], max_new_tokens=3)


def test_slot_layer_out_of_range(llama, tmp_path):
    with pytest.raises(UsageError, match="outside this model's layers 0..2"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), slot_layers=(3,)), backbone=llama, progress=False)


def test_unsupported_architecture_lists_supported(tmp_path, tiny_model_dir):
    import shutil

    from transformers import AutoModelForCausalLM, OPTConfig

    folder = tmp_path / "opt"
    shutil.copytree(tiny_model_dir("llama"), folder)
    (folder / "config.json").unlink()
    (folder / "model.safetensors").unlink()
    AutoModelForCausalLM.from_config(
        OPTConfig(
            vocab_size=320,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=64,
            word_embed_proj_dim=32,
        )
    ).save_pretrained(folder)
    with pytest.raises(ModelError, match="architecture 'opt' is not supported; supported: gpt2, gpt_neox, llama"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(folder)), progress=False)


def test_config_round_trip():
    config = ExportConfig(out="b", precision="int4", slot_layers=(3, 5), force=True)
    assert ExportConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UsageError, match="unknown export option"):
        ExportConfig.from_dict({"out": "b", "layers": [1]})


# -- the default model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_fp32_bundle(default_bundle):
    manifest = Manifest.from_dir(default_bundle)
    checked = manifest.verification
    assert checked["max_abs_logit_diff"] <= 1e-4 and checked["greedy_tokens_match"] and checked["identity_bit_exact"]
    assert (manifest.architecture, manifest.num_layers, manifest.hidden_size, manifest.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    assert manifest.slot_layers == list(range(30)) and manifest.kv.num_kv_heads == 3 and manifest.kv.head_dim == 64
    assert manifest.context_length == 8192 and "chat_template" in manifest.files
    assert manifest.special_tokens["eos_token_ids"] and manifest.special_tokens["pad_token_id"] is not None
