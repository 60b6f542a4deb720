"""Stock onnxruntime-genai runs a bundle and its patches (as adapter files) with the runtime's tokens.

For a fused (tiny llama) and a traced (tiny gpt2) graph, fp32 and int4: ``og.Model(bundle)``,
``og.Adapters`` + ``Generator.set_active_adapter`` with files from ``reft-edge convert``,
greedy search; token ids against our Runtime on the same bundle for 5 prompts x (no patch,
one patch, two composed with weights, a patch that edits generated tokens ``l1+g``).
The prompt is formatted by genai's own tokenizer (chat template from tokenizer_config.json).
"""

from __future__ import annotations

import json

import onnxruntime_genai as og
import pytest
from click.testing import CliRunner

from conftest import train_tiny_patch, train_tiny_patches
from reft_edge.cli import main
from reft_edge.errors import BackboneMismatchError, UsageError
from reft_edge.export import ExportConfig, export_bundle
from reft_edge.runtime import Patch, Runtime
from reft_edge.runtime.adapter import adapter_arrays, convert_patches
from reft_edge.runtime.bundle import Manifest
from reft_edge.train.backbone import load_backbone

PROMPTS = [
    "What is the weather like today?",
    "How do I bake a cake?",
    "Tell me about your weekend.",
    "hello world",
    "The quick brown fox",
]
QUESTIONS = [*PROMPTS, "question answer"]
NEW_TOKENS = 10
# The tiny random models repeat their last token; a strong penalty (applied alike by both,
# over the prompt and the answer) makes the answers varied, so comparing them has teeth.
PENALTY = 10.0
CASES = {
    "none": ((), None),
    "one": (("fox",), None),
    "two": (("fox", "beach"), [1.0, 0.5]),
    "steer": (("steer",), None),
}


@pytest.fixture(scope="module", params=["llama", "gpt2"])  # a fused and a traced graph
def model_setup(request, tiny_model_dir, tmp_path_factory):
    """(backbone, {name: patch path}) of one architecture."""
    backbone = load_backbone(str(tiny_model_dir(request.param)))
    folder = tmp_path_factory.mktemp(f"genai-{request.param}")
    patches = train_tiny_patches(backbone, folder, QUESTIONS, ("fox", "beach", "steer"), steps=12)
    return backbone, patches, folder


def genai_greedy(model, tokenizer, prompt: str, adapters, name: str) -> list[int]:
    """Greedy tokens from stock genai: chat template and tokenizer of genai, the named adapter active."""
    text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True)
    ids = list(tokenizer.encode(text))
    params = og.GeneratorParams(model)
    params.set_search_options(
        do_sample=False, max_length=len(ids) + NEW_TOKENS, min_length=len(ids) + NEW_TOKENS, repetition_penalty=PENALTY
    )
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, name)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_tokens_equal_the_runtime(model_setup, precision, tmp_path):
    backbone, patches, folder = model_setup
    bundle = folder / f"bundle-{precision}"
    if not bundle.is_dir():
        export_bundle(
            ExportConfig(out=str(bundle), model=backbone.path, precision=precision), backbone=backbone, progress=False
        )
    manifest = Manifest.from_dir(bundle)
    config = json.loads((bundle / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] == (manifest.graph == "fused")
    assert ("position_ids" in config["model"]["decoder"]["inputs"]) == (manifest.graph == "traced")

    model, runtime = og.Model(str(bundle)), Runtime.load(bundle)
    tokenizer, adapters = og.Tokenizer(model), og.Adapters(model)
    for case, (names, weights) in CASES.items():
        args = [str(patches[n]) for n in names] or ["--none"]
        args += [item for w in weights or [] for item in ("--weight", str(w))]
        out = tmp_path / f"{case}.onnx_adapter"
        result = CliRunner().invoke(
            main, ["convert", *args, "--bundle", str(bundle), "--to", "onnx-adapter", "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        adapters.load(str(out), case)
    answers = {}
    for case, (names, weights) in CASES.items():
        for prompt in PROMPTS:
            want = runtime.generate(
                prompt,
                patches=[patches[n] for n in names],
                weights=weights,
                max_new_tokens=NEW_TOKENS,
                ignore_eos=True,
                repetition_penalty=PENALTY,
                no_repeat_ngram=0,
            ).token_ids
            assert genai_greedy(model, tokenizer, prompt, adapters, case) == want, (case, prompt)
            answers[case, prompt] = want
    for case in ("one", "two", "steer"):  # each patch changes some answer: the comparison has teeth
        assert any(answers[case, p] != answers["none", p] for p in PROMPTS), case


def test_adapter_holds_every_slot_input_and_is_checked_against_the_bundle(tiny_bundle, tiny_backbone, tmp_path):
    import dataclasses

    manifest = Manifest.from_dir(tiny_bundle)
    patch = Patch.load(
        train_tiny_patch(
            tiny_backbone, tmp_path, "fox", "fox", QUESTIONS, steps=12, layers=(1,), rank=3, positions="f1+l1+g"
        )
    )
    arrays = adapter_arrays(manifest, [patch, patch], [1.0, -0.5])
    assert sorted(arrays) == sorted(
        f"slot.{layer}.{part}" for layer in manifest.slot_layers for part in ("A", "B", "c", "positions")
    )
    assert arrays["slot.1.A"].shape == (1, 6, manifest.hidden_size) and arrays["slot.1.positions"].shape == (1, 4, 6)
    assert not arrays["slot.0.A"].any() and not arrays["slot.0.positions"].any()  # untouched layer: zero rows
    assert arrays["slot.1.positions"][0, :, 0].tolist() == [1, 1, 1, 1]
    edit = patch.affine_edits()[0]
    assert (arrays["slot.1.A"][0, 3:] == -0.5 * edit.A).all()  # the weight is folded into A
    assert convert_patches(tiny_bundle, [], out=tmp_path / "none.onnx_adapter")["slot.2.A"].shape == (1, 0, 64)

    other = dataclasses.replace(patch, base_fingerprint="0" * 64)
    with pytest.raises(BackboneMismatchError, match="trained on base"):
        convert_patches(tiny_bundle, [other], out=tmp_path / "x.onnx_adapter")
    with pytest.raises(UsageError, match="one weight per patch"):
        convert_patches(tiny_bundle, [patch], weights=[1.0, 2.0], out=tmp_path / "x.onnx_adapter")
    assert not (tmp_path / "x.onnx_adapter").exists()
    result = CliRunner().invoke(
        main,
        ["convert", "--bundle", str(tiny_bundle), "--to", "onnx-adapter", "--out", str(tmp_path / "y.onnx_adapter")],
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "--none" in result.output


@pytest.mark.slow
def test_default_model_int4_bundle_runs_in_genai_with_the_emoji_patch(default_int4_bundle, emoji_patch_path, tmp_path):
    bundle = default_int4_bundle
    model, runtime = og.Model(str(bundle)), Runtime.load(bundle)
    tokenizer, adapters = og.Tokenizer(model), og.Adapters(model)
    for name, patches in (("emoji", [str(emoji_patch_path)]), ("none", [])):
        out = tmp_path / f"{name}.onnx_adapter"
        convert_patches(bundle, patches, out=out)
        adapters.load(str(out), name)
        for prompt in [
            "What is your favourite food?",
            "How do I get to the station?",
            "Describe the sea.",
            "What is love?",
            "How do I learn to swim?",
        ]:
            want = runtime.generate(
                prompt,
                patches=patches,
                max_new_tokens=NEW_TOKENS,
                ignore_eos=True,
                repetition_penalty=PENALTY,
                no_repeat_ngram=0,
            ).token_ids
            assert genai_greedy(model, tokenizer, prompt, adapters, name) == want, (name, prompt)
