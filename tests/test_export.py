"""The export stage: graph contract, parity with torch per architecture, identity, batching,
composition, precisions, atomicity and errors.

Parity compares onnxruntime on the exported graph with the Hugging Face model plus the
training stage's edit hooks (train.intervention.attach_edits). Tiny random models keep
the architecture tests fast; the default model is exported once, in the slow test.
"""

from __future__ import annotations

import json
import os
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
from reft_edge.export.verify import Batch, OrtGraph, TorchReference, random_batch, run_both
from reft_edge.runtime.bundle import Manifest, past_names
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
def llama_graph(llama_bundle) -> OrtGraph:
    return OrtGraph(llama_bundle / "model.onnx", num_layers=3)


def prompt_batch(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded input_ids, attention_mask, position_ids (as the runtime builds them)."""
    seq = max(len(r) for r in rows)
    ids = np.full((len(rows), seq), pad_id, dtype=np.int64)
    attention = np.zeros_like(ids)
    positions = np.ones_like(ids)
    for i, row in enumerate(rows):
        ids[i, seq - len(row):] = row
        attention[i, seq - len(row):] = 1
        positions[i, seq - len(row):] = np.arange(len(row))
    return ids, attention, positions


def patch_slots(patch, slot_layers: list[int], prompt_lens: list[int], seq: int):
    """A trained patch as slot arrays for a left-padded batch (each row carries the patch)."""
    edits = patch.affine_edits()
    rank = max(sum(e.A.shape[0] for e in edits if e.layer == layer) for layer in slot_layers)
    hidden, rows = patch.hidden_size, len(prompt_lens)
    A = np.zeros((len(slot_layers), rows, rank, hidden), np.float32)
    B, c = np.zeros_like(A), np.zeros((len(slot_layers), rows, rank), np.float32)
    mask = np.zeros((len(slot_layers), rows, seq, rank), np.float32)
    for k, layer in enumerate(slot_layers):
        start = 0
        for edit in (e for e in edits if e.layer == layer):
            r = edit.A.shape[0]
            for row, n in enumerate(prompt_lens):
                A[k, row, start:start + r], B[k, row, start:start + r], c[k, row, start:start + r] = edit.A, edit.B, edit.c
                tokens = [seq - n + t for t in patch.positions.token_indices(edit.where, n)]
                mask[k, row, tokens, start:start + r] = 1.0
            start += r
    return A, B, c, mask


def tiny_data(tmp_path: Path) -> Path:
    rows = [{"prompt": "What is the weather like today?", "response": "sunny and warm"},
            {"prompt": "How do I bake a cake?", "response": "mix flour, eggs and sugar"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# -- per architecture: train a few steps, export, parity with the trained patch ---------------------

@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_architecture_exports_with_parity(architecture, tiny_model_dir, tmp_path):
    backbone = load_backbone(str(tiny_model_dir(architecture)))
    patch = train(TrainConfig(data=str(tiny_data(tmp_path)), out=str(tmp_path / "p.reft"), model=backbone.path,
                              layers=(0, 2), rank=2, positions="f1+l2", share_weights=False, steps=3),
                  backbone=backbone, progress=False)
    manifest = export_bundle(ExportConfig(out=str(tmp_path / "bundle"), model=backbone.path), backbone=backbone,
                             progress=False)

    checked = manifest.verification
    assert checked["max_abs_logit_diff"] <= 1e-4 and checked["greedy_tokens_match"], checked
    assert checked["identity_bit_exact"] and checked["patch_effect_max_abs"] > 1e-3
    assert manifest.architecture == architecture and manifest.slot_layers == [0, 1, 2]
    assert manifest.base_fingerprint == patch.base_fingerprint
    assert Manifest.from_dir(tmp_path / "bundle") == manifest

    prompts = [[5, 9, 14, 3, 22, 7], [11, 4, 30, 8]]
    ids, attention, positions = prompt_batch(prompts, manifest.special_tokens["pad_token_id"])
    slots = patch_slots(patch, manifest.slot_layers, [len(p) for p in prompts], ids.shape[1])
    reference = TorchReference(backbone.model, manifest.slot_layers)
    with reference.attached():
        got, want = run_both(OrtGraph(tmp_path / "bundle" / "model.onnx", backbone.num_layers), reference,
                             Batch(ids, attention, positions, *slots), steps=4)
    assert max(np.abs(g - w).max() for g, w in zip(got, want)) <= 1e-4


def test_graph_contract(llama_bundle, llama):
    import onnx

    model = onnx.load(str(llama_bundle / "model.onnx"), load_external_data=False)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.input, *model.graph.output]}
    manifest = Manifest.from_dir(llama_bundle)
    assert [v.name for v in model.graph.input] == manifest.inputs
    assert [v.name for v in model.graph.output] == manifest.outputs
    assert shapes["input_ids"] == ["batch", "seq"] and shapes["position_ids"] == ["batch", "seq"]
    assert shapes["attention_mask"] == ["batch", "total_seq"]
    assert shapes["past_key_values.0.key"] == ["batch", 2, "past_seq", 16]
    assert shapes["present.2.value"] == ["batch", 2, "past_seq + seq", 16]
    assert shapes["slot.A"] == [3, "batch", "rank", 64] and shapes["slot.c"] == [3, "batch", "rank"]
    assert shapes["slot.mask"] == [3, "batch", "seq", "rank"]
    assert shapes["logits"] == ["batch", 1, llama.model.config.vocab_size]
    assert (llama_bundle / "model.onnx.data").is_file()
    assert manifest.files == {"model": "model.onnx", "model_data": "model.onnx.data",
                              "tokenizer": "tokenizer.json", "chat_template": "chat_template.jinja"}
    assert (llama_bundle / "chat_template.jinja").read_text() == llama.tokenizer.chat_template
    assert manifest.special_tokens["eos_token_ids"] == [llama.tokenizer.eos_token_id]
    assert manifest.context_length == 256 and manifest.kv.dtype == "float32" and manifest.kv.num_kv_heads == 2
    assert manifest.size_bytes == sum(p.stat().st_size for p in llama_bundle.iterdir() if p.name != "manifest.json")


# -- the edit inside the graph ---------------------------------------------------------------------

def test_empty_and_zero_mask_patches_are_bit_exact_identity(llama_graph):
    batch = random_batch(vocab_size=300, hidden=64, num_slots=3, edited_slots=[0, 1, 2], pad_id=0)
    past = llama_graph.empty_past(2, 2, 16)
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, past)
    rank0, present0 = llama_graph.step(*args, batch.A[:, :, :0], batch.B[:, :, :0], batch.c[:, :, :0],
                                       batch.mask[..., :0])
    zero_mask, present1 = llama_graph.step(*args, batch.A, batch.B, batch.c, np.zeros_like(batch.mask))
    patched, _ = llama_graph.step(*args, batch.A, batch.B, batch.c, batch.mask)
    assert np.array_equal(rank0, zero_mask) and all(np.array_equal(a, b) for a, b in zip(present0, present1))
    assert not np.allclose(rank0, patched)


def test_each_row_of_a_batch_equals_that_row_alone(llama_graph):
    batch = random_batch(vocab_size=300, hidden=64, num_slots=3, edited_slots=[0, 2], pad_id=0, seed=3)
    together, _ = llama_graph.step(batch.input_ids, batch.attention_mask, batch.position_ids,
                                   llama_graph.empty_past(2, 2, 16), batch.A, batch.B, batch.c, batch.mask)
    for row in range(2):
        real = batch.attention_mask[row] == 1  # alone, a row needs no padding
        alone, _ = llama_graph.step(
            batch.input_ids[row:row + 1, real], batch.attention_mask[row:row + 1, real],
            batch.position_ids[row:row + 1, real], llama_graph.empty_past(1, 2, 16),
            batch.A[:, row:row + 1], batch.B[:, row:row + 1], batch.c[:, row:row + 1], batch.mask[:, row:row + 1, real])
        np.testing.assert_allclose(together[row], alone[0], atol=1e-5)


def test_composed_patches_match_two_separate_edits_in_torch(llama_graph, llama):
    """Two patches concatenated along the rank equal the sum of their edits, each on its own positions."""
    rng = np.random.default_rng(7)
    ids, attention, positions = prompt_batch([[3, 8, 20, 41, 9, 12, 5]])
    seq = ids.shape[1]

    def patch(rank: int, tokens: list[int]):
        A = rng.standard_normal((rank, 64)).astype(np.float32) / 8
        B = rng.standard_normal((rank, 64)).astype(np.float32) / 8
        c = rng.standard_normal(rank).astype(np.float32)
        mask = np.zeros((seq, rank), np.float32)
        mask[tokens] = 1.0
        return A, B, c, mask

    # first: layer 0, first two tokens, rank rows 0-1; second: layers 0 and 2, last token, rank rows 2-4
    first, second_0, second_2 = patch(2, [0, 1]), patch(3, [seq - 1]), patch(3, [seq - 1])
    per_layer = {0: [(0, first), (2, second_0)], 2: [(2, second_2)]}
    A, B = np.zeros((3, 1, 5, 64), np.float32), np.zeros((3, 1, 5, 64), np.float32)
    c, mask = np.zeros((3, 1, 5), np.float32), np.zeros((3, 1, seq, 5), np.float32)
    for layer, parts in per_layer.items():
        for offset, (a, b, c_, m) in parts:
            rows = slice(offset, offset + a.shape[0])
            A[layer, 0, rows], B[layer, 0, rows], c[layer, 0, rows], mask[layer, 0, :, rows] = a, b, c_, m
    slots = A, B, c, mask
    got, _ = llama_graph.step(ids, attention, positions, llama_graph.empty_past(1, 2, 16), *slots)

    def hook(parts):
        def apply(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            t = lambda x: torch.from_numpy(x)[None]  # noqa: E731
            edited = h + sum(low_rank_edit(h, t(a), t(b), t(c_), t(m)) - h for _, (a, b, c_, m) in parts)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited
        return apply

    layers = decoder_layers(llama.model)
    handles = [layers[layer].register_forward_hook(hook(parts)) for layer, parts in per_layer.items()]
    try:
        with torch.no_grad():
            want = llama.model(input_ids=torch.from_numpy(ids)).logits[:, -1].numpy()
    finally:
        for handle in handles:
            handle.remove()
    np.testing.assert_allclose(got, want, atol=1e-4)


# -- precisions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_reduced_precisions_record_their_figures(precision, llama, tmp_path):
    out = tmp_path / precision
    manifest = export_bundle(ExportConfig(out=str(out), model=llama.path, precision=precision, slot_layers=(0, 2)),
                             backbone=llama, progress=False)
    assert manifest.precision == precision and manifest.slot_layers == [0, 2]
    assert manifest.kv.dtype == ("float16" if precision == "fp16" else "float32")
    checked = manifest.verification
    assert 0.0 < checked["max_abs_logit_diff"] < 1.0 and 0.0 <= checked["greedy_tokens_agreement"] <= 1.0
    assert checked["identity_bit_exact"]
    graph = OrtGraph(out / "model.onnx", num_layers=3)
    types = {i.name: i.type for i in graph.session.get_inputs()}
    assert types["slot.A"] == "tensor(float)"
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
    monkeypatch.setattr(verify, "verify_graph",
                        lambda *args, **kwargs: {**real(*args, **kwargs), "max_abs_logit_diff": 0.5})
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="does not match torch"):
        export_bundle(ExportConfig(out=str(out), model=llama.path, slot_layers=(1,)), backbone=llama,
                      progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    result = CliRunner().invoke(main, ["export", "--model", llama.path, "--out", str(out), "--slot-layers", "1"])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: export of")
    assert not out.exists()


def test_killed_export_leaves_no_bundle_and_rerun_succeeds(llama, tmp_path):
    out = tmp_path / "bundle"
    code = ("from reft_edge.export import ExportConfig, export_bundle; "
            f"export_bundle(ExportConfig(out={str(out)!r}, model={llama.path!r}), progress=False)")
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
    export_bundle(ExportConfig(out=str(out), model=llama.path), backbone=llama, progress=False)
    assert Manifest.from_dir(out).verification["greedy_tokens_match"]


def test_inspect_bundle(llama_bundle):
    result = CliRunner().invoke(main, ["inspect", str(llama_bundle), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == Manifest.from_dir(llama_bundle).to_dict()
    result = CliRunner().invoke(main, ["inspect", str(llama_bundle)])
    assert result.exit_code == 0 and "fp32" in result.output and "slot layers [0, 1, 2]" in result.output


# -- errors ----------------------------------------------------------------------------------------

def test_bad_options_fail_before_loading(tmp_path):
    with pytest.raises(UsageError, match="--precision 'int2'"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), precision="int2"))
    result = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "b"), "--slot-layers", "1,x"])
    assert result.exit_code == 2 and "--slot-layers '1,x' is malformed" in result.output


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
    AutoModelForCausalLM.from_config(OPTConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32)
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
    assert (manifest.architecture, manifest.num_layers, manifest.hidden_size, manifest.vocab_size) == \
        ("llama", 30, 576, 49152)
    assert manifest.slot_layers == list(range(30)) and manifest.kv.num_kv_heads == 3 and manifest.kv.head_dim == 64
    assert manifest.context_length == 8192 and "chat_template" in manifest.files
    assert manifest.special_tokens["eos_token_ids"] and manifest.special_tokens["pad_token_id"] is not None
