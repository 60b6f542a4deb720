"""The runtime against transformers and torch: same prompt text, same greedy tokens, no torch import.

Bundles come from the export stage (tiny random llama; the default model in the slow
test); the torch reference applies the same edit with train.intervention.attach_edits
and recomputes the whole sequence at each step (no cache), so it shares no code with
the runtime's slot packing, padding or KV handling.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import train_tiny_patches
from reft_edge.errors import BackboneMismatchError, BundleError, PatchCompatibilityError, UsageError
from reft_edge.runtime import Patch, Runtime
from reft_edge.runtime.patch import Intervention
from reft_edge.runtime.positions import Positions
from reft_edge.runtime.template import ChatTemplate, template_variables
from reft_edge.runtime.text import TextRow

PROMPTS = ["What is the weather like today?", "Tell me about your weekend.", "hello"]
# The tiny random model with tied embeddings keeps repeating its input token; a strong repetition
# penalty makes its answers varied, so comparing token sequences has teeth.
PENALTY = 10.0
QUESTIONS = [
    "What is the weather like today?",
    "How do I bake a cake?",
    "Tell me about your weekend.",
    "hello world",
    "question answer",
    "The quick brown fox",
]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rt(tiny_bundle) -> Runtime:
    return Runtime.load(tiny_bundle, threads=2)


@pytest.fixture(scope="session")
def patches(tiny_backbone, tmp_path_factory) -> dict[str, Patch]:
    """fox: one shared LoReFT edit at layer 1; beach: untied DiReFT edits at layers 0 and 2;
    steer: untied edits of the last prompt token and of every generated token at layers 1 and 2."""
    folder = tmp_path_factory.mktemp("patches")
    paths = train_tiny_patches(tiny_backbone, folder, QUESTIONS, ("fox", "beach", "steer"))
    return {name: Patch.load(path) for name, path in paths.items()}


# -- the torch reference ----------------------------------------------------------------------


def torch_greedy(
    backbone,
    prompt: str,
    patches: list[Patch],
    weights: list[float] | None = None,
    *,
    max_new_tokens: int = 12,
    repetition_penalty: float | None = None,
) -> list[int]:
    """Greedy tokens from the HF model with the train-stage hooks: the patches' prompt positions
    edited, and every generated token for the edits with ``g`` positions."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from reft_edge.train.backbone import decoder_layers
    from reft_edge.train.data import prompt_text
    from reft_edge.train.intervention import EditSlots, attach_edits

    tokenizer, model = backbone.tokenizer, backbone.model
    text = prompt_text(tokenizer, [{"role": "user", "content": prompt}], use_chat_template=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_prompt = len(ids)
    per_layer: dict[int, list] = {}
    for patch, weight in zip(patches, weights or [1.0] * len(patches)):
        for edit in patch.affine_edits():
            mask = np.zeros((n_prompt, edit.A.shape[0]), np.float32)
            mask[patch.positions.token_indices(edit.where, n_prompt)] = 1.0
            generated = float(patch.positions.edits(edit.where, "generated"))
            per_layer.setdefault(edit.layer, []).append((weight * edit.A, edit.B, edit.c, mask, generated))
    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty else None
    slots, layers, out = EditSlots(), decoder_layers(model), []
    with attach_edits({layer: layers[layer] for layer in per_layer}, slots), torch.no_grad():
        for _ in range(max_new_tokens):
            for layer, edits in per_layer.items():
                A, B, c = (torch.from_numpy(np.concatenate([e[i] for e in edits]))[None] for i in range(3))
                mask = np.concatenate([e[3] for e in edits], axis=1)
                generated = np.concatenate([np.full(e[0].shape[0], e[4], np.float32) for e in edits])
                mask = np.concatenate([mask, np.tile(generated, (len(ids) - n_prompt, 1))])
                slots.set(layer, A, B, c, torch.from_numpy(mask)[None])
            input_ids = torch.tensor([ids])
            logits = model(input_ids=input_ids).logits[:, -1]
            if penalty:
                logits = penalty(input_ids, logits)
            token = int(logits[0].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            ids.append(token)
    return out


# -- prompt formatting ------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 🙂"},
        {"role": "user", "content": "  spaces\nand lines  "},
    ],
]
# Exercises what transformers adds to jinja: trim/lstrip blocks, loop controls, tojson, raise_exception,
# special-token variables and the {% generation %} tag.
FANCY_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}
    {% if loop.index > 8 %}{% break %}{% endif %}
    [{{ message['role'] | upper }}] {{ message['content'] | tojson }}
    {% if message['role'] == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""


@pytest.mark.parametrize("which", ["default", "tiny", "fancy"])
def test_template_renders_like_transformers(which, tiny_model_dir):
    from transformers import AutoTokenizer

    from reft_edge.train.backbone import default_model_dir

    folder = default_model_dir() if which == "default" else tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if which == "fancy":
        tokenizer.chat_template = FANCY_TEMPLATE
    template = ChatTemplate(
        tokenizer.chat_template,
        template_variables({"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}),
    )
    for messages in CONVERSATIONS:
        assert template.render(messages) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_template_rejection_is_a_usage_error():
    with pytest.raises(UsageError, match="bad role"):
        ChatTemplate(FANCY_TEMPLATE, {}).render([{"role": "robot", "content": "beep"}])


def test_prompt_tokens_equal_training_tokens(rt, tiny_backbone):
    from reft_edge.train.data import Record, tokenize

    for prompt in PROMPTS:
        record = Record(({"role": "user", "content": prompt},), "answer", "test")
        (example,) = tokenize([record], tiny_backbone.tokenizer, use_chat_template=True)
        assert rt.encode(prompt) == list(example.prompt_ids)
    assert rt.encode("hello", raw=True) == tiny_backbone.tokenizer("hello", add_special_tokens=False)["input_ids"]


# -- generation against torch -----------------------------------------------------------------


@pytest.mark.parametrize(
    "names, weights",
    [
        ((), None),
        (("fox",), None),
        (("beach",), None),
        (("fox", "beach"), None),
        (("fox", "beach"), [0.5, 1.5]),
        (("steer",), None),
        (("steer", "fox"), [1.0, 0.5]),
    ],
)
def test_greedy_tokens_equal_torch(rt, tiny_backbone, patches, names, weights):
    chosen = [patches[n] for n in names]
    for prompt in PROMPTS:
        for penalty in (None, PENALTY):
            expected = torch_greedy(tiny_backbone, prompt, chosen, weights, repetition_penalty=penalty)
            got = rt.generate(
                prompt,
                patches=chosen,
                weights=weights,
                max_new_tokens=12,
                repetition_penalty=penalty,
                no_repeat_ngram=0,
            )
            assert got.token_ids == expected


def test_repetition_penalty_equals_transformers(rt, tiny_backbone, patches):
    expected = torch_greedy(tiny_backbone, PROMPTS[0], [patches["fox"]], repetition_penalty=PENALTY, max_new_tokens=16)
    got = rt.generate(
        PROMPTS[0], patches=[patches["fox"]], repetition_penalty=PENALTY, max_new_tokens=16, no_repeat_ngram=0
    )
    assert got.token_ids == expected
    assert len(set(expected)) > 8


def test_patches_change_the_answer_and_weight_zero_removes_them(rt, patches):
    prompt = PROMPTS[0]
    base = rt.generate(prompt, max_new_tokens=8).token_ids
    assert rt.generate(prompt, patches=[patches["fox"]], max_new_tokens=8).token_ids != base
    assert rt.generate(prompt, patches=[patches["fox"]], weights=[0.0], max_new_tokens=8).token_ids == base
    assert rt.generate(prompt, patches=[patches["steer"]], max_new_tokens=8).token_ids != base
    assert rt.generate(prompt, patches=[patches["steer"]], weights=[0.0], max_new_tokens=8).token_ids == base


def test_patch_paths_and_objects_are_the_same(rt, patches, tmp_path):
    path = tmp_path / "fox.reft"
    patches["fox"].to_file(path)
    by_path = rt.generate(PROMPTS[1], patches=[str(path)], max_new_tokens=6)
    assert by_path.token_ids == rt.generate(PROMPTS[1], patches=[Patch.load(path)], max_new_tokens=6).token_ids


def test_batch_equals_each_alone(rt, patches):
    requests = [
        (PROMPTS[0], [patches["fox"]]),
        (PROMPTS[2], []),
        (PROMPTS[1], [patches["fox"], patches["beach"]]),
        (PROMPTS[2], [patches["beach"]], [2.0]),
        (PROMPTS[0], [patches["steer"]]),
        (PROMPTS[1], [patches["steer"], patches["beach"]]),
    ]
    batch = rt.generate_batch(requests, max_new_tokens=10, repetition_penalty=PENALTY)
    for (prompt, chosen, *weights), got in zip(requests, batch):
        alone = rt.generate(
            prompt,
            patches=chosen,
            weights=weights[0] if weights else None,
            max_new_tokens=10,
            repetition_penalty=PENALTY,
        )
        assert (got.token_ids, got.text, got.prompt_tokens) == (alone.token_ids, alone.text, alone.prompt_tokens)


def test_house_and_person_per_batch_row_equal_each_row_alone(rt, patches):
    """The house-style case: one shared patch on every row, a different person (or none) per row,
    all in one batch; each row answers exactly what it answers alone, and the house patch on a
    row changes that row's answer (so the equality is not vacuous)."""
    house = patches["steer"]
    people = [patches["fox"], patches["beach"], None]
    requests = [(prompt, [house] + ([person] if person else [])) for prompt in PROMPTS for person in people]
    batch = rt.generate_batch(requests, max_new_tokens=10)
    for (prompt, chosen), got in zip(requests, batch):
        alone = rt.generate(prompt, patches=chosen, max_new_tokens=10)
        assert (got.token_ids, got.text) == (alone.token_ids, alone.text)
    person_only = rt.generate(PROMPTS[0], patches=[patches["fox"]], max_new_tokens=10).token_ids
    assert batch[0].token_ids != person_only


def test_stream_pieces_join_to_the_text(rt, patches):
    stream = rt.stream(PROMPTS[0], patches=[patches["beach"]], max_new_tokens=12, repetition_penalty=PENALTY)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as done:
            generation = done.value
            break
    assert "".join(pieces) == generation.text
    assert (
        generation.token_ids
        == rt.generate(PROMPTS[0], patches=[patches["beach"]], max_new_tokens=12, repetition_penalty=PENALTY).token_ids
    )
    assert generation.text == rt.tokenizer.decode(generation.token_ids, skip_special_tokens=True)


def test_sampling_is_seeded(rt):
    options = dict(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    first = rt.generate(PROMPTS[0], **options).token_ids
    assert rt.generate(PROMPTS[0], **options).token_ids == first
    assert (
        rt.generate(PROMPTS[0], max_new_tokens=10, temperature=1.0, top_k=1, seed=3).token_ids
        == rt.generate(PROMPTS[0], max_new_tokens=10).token_ids
    )


def test_timings_and_finish_reason(rt):
    generation = rt.generate(PROMPTS[0], max_new_tokens=5, ignore_eos=True)
    assert len(generation.token_ids) == 5 and generation.finish_reason == "length"
    assert generation.timings["decode_steps"] == 4 and generation.timings["tokens_per_s"] > 0
    assert generation.prompt_tokens == len(rt.encode(PROMPTS[0]))


# -- incremental text -------------------------------------------------------------------------


def test_pieces_never_split_a_character(rt):
    text = "héllo 🙂 wörld 日本"
    ids = rt.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text)  # the tiny byte-level vocabulary splits the characters into bytes
    row = TextRow(rt.tokenizer)
    pieces = [row.push(token) for token in ids] + [row.finish("length")]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == row.text == text


@pytest.mark.parametrize(
    "stop, expected",
    [(("lazy",), "The quick brown fox jumps over the "), (("k b", "zzz"), "The quic"), (("cat",), None)],
)
def test_stop_strings_cut_the_text(rt, stop, expected):
    text = "The quick brown fox jumps over the lazy dog."
    row = TextRow(rt.tokenizer, stop)
    pieces = []
    for token in rt.tokenizer.encode(text, add_special_tokens=False).ids:
        pieces.append(row.push(token))
        if row.finished:
            break
    else:
        pieces.append(row.finish("length"))
    assert "".join(pieces) == row.text == (expected if expected is not None else text)
    assert row.finish_reason == ("stop" if expected is not None else "length")


# -- errors -----------------------------------------------------------------------------------


def test_patch_from_another_base_is_refused(rt, patches):
    other = dataclasses.replace(patches["fox"], base_fingerprint="0" * 64)
    with pytest.raises(BackboneMismatchError, match="trained on base"):
        rt.generate("hi", patches=[other])


def test_patch_on_a_layer_without_slot_is_refused(rt, patches):
    fox = patches["fox"]
    moved = dataclasses.replace(fox, interventions=(dataclasses.replace(fox.interventions[0], layer=7),))
    with pytest.raises(PatchCompatibilityError, match="slot layers"):
        rt.generate("hi", patches=[moved])


@pytest.mark.parametrize(
    "damage, names",
    [
        (lambda d: (d / "model.onnx").unlink(), "model.onnx"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json"),
        (lambda d: (d / "model.onnx").write_bytes(b"not a graph"), "model.onnx"),
        (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json"),
        (lambda d: (d / "manifest.json").write_text("{"), "manifest.json"),
    ],
)
def test_damaged_bundle_is_a_bundle_error(tiny_bundle, tmp_path, damage, names):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    damage(copy)
    with pytest.raises(BundleError, match=names) as error:
        Runtime.load(copy)
    assert "export" in str(error.value)


@pytest.mark.parametrize(
    "prompt, options, message",
    [
        ("   ", {}, "empty"),
        ("word " * 400, {}, r"\d+ tokens, more than the bundle's context length \d+"),
        ("hi", {"max_new_tokens": 10_000}, r"pass the bundle's context length \d+; use max_new_tokens \d+"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens"),
        ("hi", {"temperature": -1}, "temperature"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"weights": [1.0]}, "one weight per patch"),
    ],
)
def test_bad_options_are_usage_errors(rt, prompt, options, message):
    with pytest.raises(UsageError, match=message):
        rt.generate(prompt, **options)


def test_patch_load_is_fast(tmp_path):
    rng = np.random.default_rng(0)
    hidden, rank = 1024, 8  # R and W: 2 x 8 x 1024 float32 = 64 KiB
    params = {
        "R": np.linalg.qr(rng.standard_normal((hidden, rank)))[0].T.astype(np.float32),
        "W": rng.standard_normal((rank, hidden)).astype(np.float32),
        "b": np.zeros(rank, np.float32),
    }
    patch = Patch(
        name="big",
        kind="loreft",
        positions=Positions(1, 1),
        share_weights=True,
        rank=rank,
        hidden_size=hidden,
        base_fingerprint="f" * 64,
        interventions=(Intervention(3, "both", params),),
    )
    path = tmp_path / "big.reft"
    patch.to_file(path)
    seconds = []
    for _ in range(20):
        started = time.perf_counter()
        Patch.load(path)
        seconds.append(time.perf_counter() - started)
    assert min(seconds) < 0.005


# -- process boundaries -----------------------------------------------------------------------


def test_runtime_never_imports_torch(tiny_bundle, patches, tmp_path):
    path = tmp_path / "fox.reft"
    patches["fox"].to_file(path)
    script = f"""
import sys
from reft_edge.runtime import Runtime
rt = Runtime.load({str(tiny_bundle)!r})
rt.generate("hello", patches=[{str(path)!r}], max_new_tokens=3)
"".join(rt.stream("hello", max_new_tokens=3))
rt.generate_batch([("hello", [{str(path)!r}]), ("hi", [])], max_new_tokens=3)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_cli_run_json_and_errors(tiny_bundle, patches, tmp_path):
    from click.testing import CliRunner

    from reft_edge.cli import main

    path = tmp_path / "fox.reft"
    patches["fox"].to_file(path)
    runner = CliRunner()
    result = runner.invoke(
        main, ["run", str(tiny_bundle), "--patch", str(path), "--max-new-tokens", "4", "--json", PROMPTS[0]]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert set(printed) >= {"text", "token_ids", "prompt_tokens", "timings"}
    assert len(printed["token_ids"]) <= 4

    streamed = runner.invoke(main, ["run", str(tiny_bundle), "--patch", str(path), "--max-new-tokens", "4", PROMPTS[0]])
    assert streamed.exit_code == 0 and streamed.stdout.rstrip("\n") == printed["text"]

    bad = runner.invoke(main, ["run", str(tiny_bundle), "--patch", str(path), "--weight", "1", "--weight", "2", "hi"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "--weight" in bad.stderr


def test_loop_guard_never_repeats_an_ngram_of_the_answer(rt, patches):
    unguarded = rt.generate(
        PROMPTS[0], patches=[patches["steer"]], max_new_tokens=40, ignore_eos=True, no_repeat_ngram=0
    ).token_ids
    guarded = rt.generate(
        PROMPTS[0], patches=[patches["steer"]], max_new_tokens=40, ignore_eos=True, no_repeat_ngram=3
    ).token_ids
    trigrams = [tuple(guarded[i : i + 3]) for i in range(len(guarded) - 2)]
    assert len(trigrams) == len(set(trigrams))
    assert len({tuple(unguarded[i : i + 3]) for i in range(len(unguarded) - 2)}) < len(unguarded) - 2  # it loops
    # the same tokens until the first repeat the guard forbids
    first = next(
        i
        for i in range(3, len(unguarded))
        if tuple(unguarded[i - 2 : i + 1]) in {tuple(unguarded[j : j + 3]) for j in range(i - 2)}
    )
    assert guarded[:first] == unguarded[:first]


def test_cli_sampling_defaults_come_from_the_bundle(tiny_bundle):
    from types import SimpleNamespace

    from click.testing import CliRunner

    from reft_edge.cli import main
    from reft_edge.cli.run import _resolve_sampling

    unset = {
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "repetition_penalty": None,
        "no_repeat_ngram": 6,
        "seed": None,
    }
    bundle = SimpleNamespace(manifest=SimpleNamespace(generation={"temperature": 0.7, "top_p": 0.9}))
    assert _resolve_sampling(bundle, unset) == {**unset, "temperature": 0.7, "top_p": 0.9}
    assert _resolve_sampling(bundle, {**unset, "temperature": 0.0})["temperature"] == 0.0  # the user's choice wins
    plain = SimpleNamespace(manifest=SimpleNamespace(generation={}))
    assert _resolve_sampling(plain, unset)["temperature"] == 0.0  # no generation config: greedy
    result = CliRunner().invoke(
        main, ["run", str(tiny_bundle), "--max-new-tokens", "2", "--no-repeat-ngram", "0", "--json", PROMPTS[0]]
    )
    assert result.exit_code == 0, result.output
    helptext = CliRunner().invoke(main, ["chat", "--help"]).output
    assert "generation config" in helptext and "--no-repeat-ngram" in helptext and "default: 6" in helptext


def test_cli_chat_answers_each_turn_and_ends_on_eof(tiny_bundle):
    from click.testing import CliRunner

    from reft_edge.cli import main

    result = CliRunner().invoke(main, ["chat", str(tiny_bundle), "--max-new-tokens", "3"], input="hello\n\nhi again\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("> ") == 4  # two answered turns, a skipped blank line, then end of input


# -- the default model ------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_emoji_patch_matches_torch(default_bundle, emoji_patch_path):
    from reft_edge.train.backbone import load_backbone

    backbone = load_backbone()
    patch = Patch.load(emoji_patch_path)
    rt = Runtime.load(default_bundle, threads=2)
    for prompt in ["What is your favourite food?", "How do I get to the station?", "Describe the sea."]:
        expected = torch_greedy(backbone, prompt, [patch], max_new_tokens=16)
        assert rt.generate(prompt, patches=[patch], max_new_tokens=16, no_repeat_ngram=0).token_ids == expected


# -- under load -------------------------------------------------------------------------------


def test_generate_from_eight_threads_matches_single_threaded(tiny_bundle, patches):
    from concurrent.futures import ThreadPoolExecutor

    rt = Runtime.load(tiny_bundle)  # calls run in parallel: onnxruntime sessions are thread-safe
    prompts = [f"question number {i}?" for i in range(10)]
    expected = [rt.generate(p, patches=[patches["beach"]], max_new_tokens=6).token_ids for p in prompts]

    def worker(_):
        return [rt.generate(p, patches=[patches["beach"]], max_new_tokens=6).token_ids for p in prompts]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    assert all(result == expected for result in results)


def test_five_hundred_generations_do_not_grow_memory(tiny_bundle, patches):
    import psutil

    rt = Runtime.load(tiny_bundle)
    process = psutil.Process()
    for _ in range(50):  # warm-up: allocator pools and caches settle
        rt.generate("hello there", patches=[patches["beach"]], max_new_tokens=4)
    before = process.memory_info().rss
    for i in range(500):
        rt.generate(f"hello there {i % 7}", patches=[patches["beach"]], max_new_tokens=4)
    assert process.memory_info().rss < before * 1.05
