"""Check an exported graph against the torch model it came from, with a random patch applied.

Example::

    from reft_edge.train.backbone import load_backbone
    from reft_edge.export.verify import verify_graph
    backbone = load_backbone()
    figures = verify_graph("bundle/model.onnx", backbone.model, slot_layers=list(range(30)))
    print(figures["max_abs_logit_diff"], figures["greedy_tokens_match"])

Both sides see the same left-padded batch of two prompts and the same per-row patch:
onnxruntime runs the graph; torch runs the Hugging Face model with the training
stage's edit hooks (``train.intervention.attach_edits``). Compared: logits of the
prefill and of teacher-forced decode steps, the same with a zero patch, and 32
greedily decoded tokens per row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from reft_edge.export.graph import eager_attention, kv_shape
from reft_edge.runtime.bundle import (
    ATTENTION_MASK, INPUT_IDS, POSITION_IDS, SLOT_A, SLOT_B, SLOT_C, SLOT_MASK, past_names,
)
from reft_edge.train.backbone import decoder_layers
from reft_edge.train.intervention import EditSlots, attach_edits

PROMPT_LENGTHS = (5, 8)  # random prompts when none are given: row 0 is left-padded by 3
PREFIX, SUFFIX = 2, 2  # untied positions: rank rows 0-1 edit the first 2 prompt tokens, rows 2-3 the last 2
RANK = 4
DECODE_STEPS = 4
GREEDY_TOKENS = 32


@dataclass
class Batch:
    """A left-padded prompt batch and a patch per row: slot arrays [num_slots, batch, ...]."""

    input_ids: np.ndarray  # [batch, seq] int64
    attention_mask: np.ndarray  # [batch, seq] int64, 0 on left pads
    position_ids: np.ndarray  # [batch, seq] int64, counted from each row's first real token
    A: np.ndarray  # [num_slots, batch, rank, hidden]
    B: np.ndarray
    c: np.ndarray  # [num_slots, batch, rank]
    mask: np.ndarray  # [num_slots, batch, seq, rank]

    def without_edit(self) -> "Batch":
        """The same patch with an all-zero mask: must be exactly the identity."""
        return Batch(self.input_ids, self.attention_mask, self.position_ids, self.A, self.B, self.c,
                     np.zeros_like(self.mask))


def random_batch(vocab_size: int, hidden: int, num_slots: int, edited_slots: list[int], pad_id: int,
                 seed: int = 0, prompts: list[list[int]] | None = None) -> Batch:
    """``prompts`` (else two random ones of different lengths); at ``edited_slots`` a random patch per row.

    Row 1 uses all RANK rows; row 0 only RANK - 1 (its last row is zero-padded, as the
    runtime pads a smaller patch), so rows of one batch differ in rank and values.
    """
    rng = np.random.default_rng(seed)
    prompts = prompts or [list(rng.integers(0, vocab_size, n)) for n in PROMPT_LENGTHS]
    batch, seq = len(prompts), max(len(p) for p in prompts)
    input_ids = np.full((batch, seq), pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, seq), dtype=np.int64)
    position_ids = np.ones((batch, seq), dtype=np.int64)  # pads get position 1, as Hugging Face does
    mask = np.zeros((num_slots, batch, seq, RANK), dtype=np.float32)
    for row, prompt in enumerate(prompts):
        length = len(prompt)
        start = seq - length
        input_ids[row, start:] = prompt
        attention_mask[row, start:] = 1
        position_ids[row, start:] = np.arange(length)
        used = RANK - 1 if row == 0 else RANK
        for slot in edited_slots:
            mask[slot, row, start:start + PREFIX, :min(PREFIX, used)] = 1.0
            mask[slot, row, seq - SUFFIX:, PREFIX:used] = 1.0
    A = rng.standard_normal((num_slots, batch, RANK, hidden)).astype(np.float32)
    A /= np.linalg.norm(A, axis=-1, keepdims=True)
    B = (rng.standard_normal((num_slots, batch, RANK, hidden)) / np.sqrt(hidden)).astype(np.float32)
    c = rng.standard_normal((num_slots, batch, RANK)).astype(np.float32)
    unused = np.ones((num_slots, batch, RANK, 1), dtype=np.float32)
    unused[:, 0, RANK - 1] = 0.0  # row 0: rank 3
    unused[[s for s in range(num_slots) if s not in edited_slots]] = 0.0
    return Batch(input_ids, attention_mask, position_ids, A * unused, B * unused, c * unused[..., 0], mask)


class OrtGraph:
    """One onnxruntime session over the graph, stepping prefill and decode with numpy arrays."""

    def __init__(self, path: str | Path, num_layers: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # torch runs between the graph's steps; spinning onnxruntime threads would steal its cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.num_layers = num_layers
        kv_type = {i.name: i.type for i in self.session.get_inputs()}[past_names(0)[0]]
        self.kv_dtype = np.float16 if kv_type == "tensor(float16)" else np.float32

    def empty_past(self, batch: int, kv_heads: int, head_dim: int) -> list[np.ndarray]:
        return [np.zeros((batch, kv_heads, 0, head_dim), dtype=self.kv_dtype) for _ in range(2 * self.num_layers)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list[np.ndarray], A: np.ndarray, B: np.ndarray, c: np.ndarray,
             mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits [batch, vocab] of the last position, present KV)."""
        feed = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: position_ids,
                SLOT_A: A, SLOT_B: B, SLOT_C: c, SLOT_MASK: mask}
        feed.update({name: array for layer in range(self.num_layers)
                     for name, array in zip(past_names(layer), past[2 * layer:2 * layer + 2])})
        logits, *present = self.session.run(None, feed)
        return logits[:, -1].astype(np.float32), present


class TorchReference:
    """The Hugging Face model with the training stage's edit hooks at the slot layers."""

    def __init__(self, model: nn.Module, slot_layers: list[int]):
        self.model = model
        self.slot_layers = slot_layers
        self.slots = EditSlots()

    @contextlib.contextmanager
    def attached(self) -> Iterator["TorchReference"]:
        layers = decoder_layers(self.model)
        with eager_attention(self.model), torch.no_grad(), \
                attach_edits({layer: layers[layer] for layer in self.slot_layers}, self.slots):
            yield self

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Any,
             A: np.ndarray, B: np.ndarray, c: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.slots.clear()
        for k, layer in enumerate(self.slot_layers):
            if mask[k].any():  # an all-zero mask is the identity; leaving the slot empty keeps torch exact
                self.slots.set(layer, *(torch.from_numpy(x[k]) for x in (A, B, c, mask)))
        out = self.model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                         position_ids=torch.from_numpy(position_ids), cache=cache, use_cache=True)
        return out.logits[:, -1].float().numpy()


def _decode_inputs(batch: Batch, attention_mask: np.ndarray, position_ids: np.ndarray, tokens: np.ndarray):
    """One decode step's inputs: generated tokens are never edited (zero slot mask)."""
    num_slots, rows = batch.mask.shape[:2]
    attention_mask = np.concatenate([attention_mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
    position_ids = position_ids[:, -1:] + 1
    mask = np.zeros((num_slots, rows, 1, batch.mask.shape[-1]), dtype=np.float32)
    return tokens[:, None].astype(np.int64), attention_mask, position_ids, mask


def run_both(graph: OrtGraph, reference: TorchReference, batch: Batch, steps: int, *,
             greedy_from: str = "torch") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Prefill then ``steps`` decode steps on both; the next token is the argmax of
    ``greedy_from``'s logits ("torch" = teacher forcing both alike, "own" = each its own)."""
    from transformers import DynamicCache

    kv_heads, head_dim = kv_shape(reference.model.config)
    rows = batch.input_ids.shape[0]
    past = graph.empty_past(rows, kv_heads, head_dim)
    cache = DynamicCache()
    ids, attention, positions, mask = batch.input_ids, batch.attention_mask, batch.position_ids, batch.mask
    ort_logits, torch_logits = [], []
    ort_ids = torch_ids = ids
    for _ in range(steps + 1):
        got, past = graph.step(ort_ids, attention, positions, past, batch.A, batch.B, batch.c, mask)
        want = reference.step(torch_ids, attention, positions, cache, batch.A, batch.B, batch.c, mask)
        ort_logits.append(got)
        torch_logits.append(want)
        ort_next, torch_next = got.argmax(-1), want.argmax(-1)
        if greedy_from == "torch":
            ort_next = torch_next
        ort_ids, attention, positions, mask = _decode_inputs(batch, attention, positions, ort_next)
        torch_ids = torch_next[:, None].astype(np.int64)
    return ort_logits, torch_logits


def pick_edited_slots(num_slots: int) -> list[int]:
    """Edit the first and last slot (two layers apart when there are two or more)."""
    return sorted({0, num_slots - 1})


def verify_graph(path: str | Path, model: nn.Module, slot_layers: list[int], *, pad_id: int = 0,
                 prompts: list[list[int]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Figures for the manifest's ``verification`` entry (see docs/bundle-format.md).

    ``prompts``: two token lists of different lengths (real text makes the greedy
    agreement of quantized graphs meaningful); default: random tokens.
    """
    config = model.config
    graph = OrtGraph(path, len(decoder_layers(model)))
    reference = TorchReference(model, slot_layers)
    edited = pick_edited_slots(len(slot_layers))
    batch = random_batch(config.vocab_size, config.hidden_size, len(slot_layers), edited, pad_id, seed, prompts)
    with reference.attached():
        patched = run_both(graph, reference, batch, DECODE_STEPS)
        zero = run_both(graph, reference, batch.without_edit(), DECODE_STEPS)
        greedy = run_both(graph, reference, batch, GREEDY_TOKENS - 1, greedy_from="own")
    ort_tokens = np.stack([logits.argmax(-1) for logits in greedy[0]], axis=1)
    torch_tokens = np.stack([logits.argmax(-1) for logits in greedy[1]], axis=1)
    return {
        "max_abs_logit_diff": _max_diff(*patched),
        "zero_patch_max_abs_diff": _max_diff(*zero),
        "patch_effect_max_abs": _max_diff(patched[1][:1], zero[1][:1]),
        "identity_bit_exact": identity_is_exact(graph, batch, kv_shape(config)),
        "greedy_tokens_match": bool((ort_tokens == torch_tokens).all()),
        "greedy_tokens_agreement": float((ort_tokens == torch_tokens).mean()),
        "greedy_tokens": int(ort_tokens.size),
        # how long the two agree before the first difference (per row; a quantized graph drifts apart)
        "greedy_tokens_before_divergence": [int(np.argmin(row)) if not row.all() else int(row.size)
                                            for row in ort_tokens == torch_tokens],
        "decode_steps": DECODE_STEPS,
        "edited_slot_layers": [slot_layers[k] for k in edited],
        "batch": int(batch.input_ids.shape[0]),
        "rank": RANK,
        "positions": f"f{PREFIX}+l{SUFFIX} (untied)",
        "prompt_tokens": [int(n) for n in batch.attention_mask.sum(axis=1)],
        "seed": seed,
    }


def identity_is_exact(graph: OrtGraph, batch: Batch, kv: tuple[int, int]) -> bool:
    """A zero mask and an empty (rank 0) patch must give bit-equal logits from the graph."""
    rows = batch.input_ids.shape[0]
    empty = batch.A[:, :, :0], batch.B[:, :, :0], batch.c[:, :, :0], batch.mask[..., :0]
    past = graph.empty_past(rows, *kv)
    args = batch.input_ids, batch.attention_mask, batch.position_ids, past
    zero_mask, _ = graph.step(*args, batch.A, batch.B, batch.c, np.zeros_like(batch.mask))
    rank_zero, _ = graph.step(*args, *empty)
    return bool(np.array_equal(zero_mask, rank_zero))


def _max_diff(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    return float(max(np.abs(a.astype(np.float64) - b).max() for a, b in zip(first, second)))
