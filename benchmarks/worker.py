"""One benchmark configuration, measured in a fresh process so that its peak RSS is its own.

    python -m benchmarks.worker '{"engine": "runtime", "path": "...", "patch": null, ...}'

``benchmarks.run`` starts one of these per configuration and repetition and reads the
JSON line it prints last. Engines: ``runtime`` (a reft-edge bundle), ``transformers``
(the Hugging Face model in eager PyTorch, the patch applied by the training stage's
hooks) and ``genai`` (an onnxruntime-genai model folder, no patch). Every engine does a
short warm-up, then one timed first token and one timed greedy generation of
``new_tokens`` tokens, EOS ignored, from the same chat-formatted prompt.

Measured: start-up (library imports plus model load, from this process's entry), patch
load, prefill (the prompt's forward pass and the first token's pick), time to first
token (the same plus chat template, tokenization and patch placement, from a text
prompt), decode tokens per second (steps after the first token) and peak RSS.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

WARMUP_TOKENS = 8


def main() -> None:
    started = time.perf_counter()
    spec = json.loads(sys.argv[1])
    measure = ENGINES[spec["engine"]]
    result = measure(spec, started)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


def peak_rss_bytes() -> int:
    """VmHWM, the high-water mark of this process image. Not getrusage's ru_maxrss: Linux carries
    that across fork and exec, so a worker would report its parent's peak when that is larger."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    tick = time.perf_counter()
    value = call()
    return value, time.perf_counter() - tick


def load_patch(spec: dict) -> tuple[Any, float | None]:
    if not spec["patch"]:
        return None, None
    from reft_edge.runtime import Patch

    patch, seconds = timed(lambda: Patch.load(spec["patch"]))
    return patch, seconds * 1000


def result(
    startup_s: float,
    patch_ms: float | None,
    prompt_tokens: int,
    prefill_s: float,
    ttft_s: float,
    decode_steps: int,
    decode_s: float,
    tokens: list[int],
) -> dict[str, Any]:
    return {
        "startup_s": startup_s,
        "patch_load_ms": patch_ms,
        "prompt_tokens": prompt_tokens,
        "prefill_ms": prefill_s * 1000,
        "ttft_ms": ttft_s * 1000,
        "decode_steps": decode_steps,
        "decode_tok_s": decode_steps / decode_s,
        "tokens": tokens,
    }


# -- reft-edge runtime ---------------------------------------------------------------------------


def measure_runtime(spec: dict, started: float) -> dict[str, Any]:
    from reft_edge.runtime import Runtime

    runtime = Runtime.load(spec["path"], threads=spec["threads"])
    startup_s = time.perf_counter() - started
    patch, patch_ms = load_patch(spec)
    patches = [patch] if patch else []

    def generate(n: int):
        # no loop guard: the torch and genai references have none, so each step does the same work
        return runtime.generate(spec["prompt"], patches=patches, max_new_tokens=n, ignore_eos=True, no_repeat_ngram=0)

    generate(WARMUP_TOKENS)
    _, ttft_s = timed(lambda: generate(1))
    out = generate(spec["new_tokens"])
    t = out.timings
    return result(
        startup_s, patch_ms, out.prompt_tokens, t["prefill_s"], ttft_s, t["decode_steps"], t["decode_s"], out.token_ids
    )


# -- transformers, eager PyTorch -----------------------------------------------------------------


def measure_transformers(spec: dict, started: float) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reft_edge.train.backbone import decoder_layers
    from reft_edge.train.intervention import EditSlots, attach_edits

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["path"])
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
    startup_s = time.perf_counter() - started
    patch, patch_ms = load_patch(spec)
    slots = EditSlots()
    layers = decoder_layers(model)
    hooked = {edit.layer: layers[edit.layer] for edit in patch.affine_edits()} if patch else {}

    def generate(n: int) -> tuple[list[int], int, float, float]:
        """Greedy tokens, prompt length, prefill seconds, decode seconds."""
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": spec["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        if patch:
            place_patch(slots, patch, ids.shape[1])
        tick = time.perf_counter()
        # logits_to_keep=1: only the last position's logits, as transformers' own generate() asks for
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill_s = time.perf_counter() - tick
        if patch:
            place_patch(slots, patch, 0)  # generated tokens are not edited (zero mask, as in the graph)
        tokens, tick = [int(token)], time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        return tokens, ids.shape[1], prefill_s, time.perf_counter() - tick

    with attach_edits(hooked, slots), torch.inference_mode():
        generate(WARMUP_TOKENS)
        (_, prompt_tokens, prefill_s, _), ttft_s = timed(lambda: generate(1))
        tokens, _, _, decode_s = generate(spec["new_tokens"])
    return result(startup_s, patch_ms, prompt_tokens, prefill_s, ttft_s, len(tokens) - 1, decode_s, tokens)


def place_patch(slots: Any, patch: Any, prompt_len: int) -> None:
    """Set each edited layer's (A, B, c, mask) as tests/test_runtime.py's torch reference does;
    prompt_len 0 gives the one-token zero mask of a decode step."""
    import numpy as np
    import torch

    per_layer: dict[int, list] = {}
    for edit in patch.affine_edits():
        mask = np.zeros((max(prompt_len, 1), edit.A.shape[0]), np.float32)
        if prompt_len:
            mask[patch.positions.token_indices(edit.where, prompt_len)] = 1.0
        per_layer.setdefault(edit.layer, []).append((edit.A, edit.B, edit.c, mask))
    for layer, edits in per_layer.items():
        A, B, c = (torch.from_numpy(np.concatenate([e[i] for e in edits]))[None] for i in range(3))
        mask = torch.from_numpy(np.concatenate([e[3] for e in edits], axis=1))[None]
        slots.set(layer, A, B, c, mask)


# -- onnxruntime-genai ---------------------------------------------------------------------------


def measure_genai(spec: dict, started: float) -> dict[str, Any]:
    import onnxruntime_genai as og

    config = og.Config(spec["path"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": spec["threads"]}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    startup_s = time.perf_counter() - started

    def generate(n: int) -> tuple[list[int], int, float, float]:
        """Greedy tokens, prompt length, prefill seconds, decode seconds."""
        ids = tokenizer.encode(spec["prompt_text"])
        params = og.GeneratorParams(model)
        # min_length = max_length: EOS cannot end the run early (the others use ignore_eos)
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
        generator = og.Generator(model, params)
        tick = time.perf_counter()
        generator.append_tokens(ids)  # the prompt's forward pass
        generator.generate_next_token()  # picks from the prompt's logits, no forward pass
        prefill_s = time.perf_counter() - tick
        tick = time.perf_counter()
        for _ in range(n - 1):
            generator.generate_next_token()
        decode_s = time.perf_counter() - tick
        return [int(t) for t in generator.get_sequence(0)[len(ids) :]], len(ids), prefill_s, decode_s

    generate(WARMUP_TOKENS)
    (_, prompt_tokens, prefill_s, _), ttft_s = timed(lambda: generate(1))
    tokens, _, _, decode_s = generate(spec["new_tokens"])
    return result(startup_s, None, prompt_tokens, prefill_s, ttft_s, len(tokens) - 1, decode_s, tokens)


ENGINES = {"runtime": measure_runtime, "transformers": measure_transformers, "genai": measure_genai}

if __name__ == "__main__":
    main()
