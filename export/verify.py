"""Check an exported graph against the torch model it came from, with a random patch applied.

Example::

    from reft_edge.train.backbone import load_backbone
    from reft_edge.export.verify import verify_graph
    backbone = load_backbone()
    figures = verify_graph("bundle/model.onnx", backbone.model, slot_layers=list(range(30)), graph="fused")
    print(figures["max_abs_logit_diff"], figures["greedy_tokens_match"])

Both sides see the same batch of two prompts of different lengths and the same per-row
patch: onnxruntime runs the graph through the runtime's own engine (padded as the graph
wants it); torch runs the Hugging Face model, left-padded, with the training stage's
edit hooks (``train.intervention.attach_edits``). Compared: logits of the
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
from reft_edge.runtime.bundle import KVLayout, past_names
from reft_edge.runtime.engine import Engine
from reft_edge.runtime.slots import SlotArrays
from reft_edge.train.backbone import decoder_layers
from reft_edge.train.intervention import EditSlots, attach_edits

PROMPT_LENGTHS = (5, 8)  # random prompts when none are given: row 0 has 3 pads
PREFIX, SUFFIX = 2, 2  # untied positions: rank rows 0-1 edit the first 2 prompt tokens, rows 2-3 the last 2
GENERATED_ROWS = slice(3, 4)  # and in batch row 1, rank row 3 edits every generated token too
RANK = 4
DECODE_STEPS = 4
GREEDY_TOKENS = 32


@dataclass
class Batch:
    """Prompts of different lengths and a patch per row (slot arrays in prompt coordinates)."""

    prompts: list[list[int]]
    slots: SlotArrays

    def without_edit(self) -> "Batch":
        """The same patch with an all-zero mask: must be exactly the identity."""
        s = self.slots
        return Batch(self.prompts, SlotArrays(s.A, s.B, s.c, np.zeros_like(s.mask), np.zeros_like(s.decode_mask)))

    def left_padded(self, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """torch's feed: (input_ids, attention_mask, position_ids, slot mask), rows left-padded."""
        rows, seq = len(self.prompts), self.slots.mask.shape[2]
        input_ids = np.full((rows, seq), pad_id, dtype=np.int64)
        attention_mask = np.zeros((rows, seq), dtype=np.int64)
        position_ids = np.ones((rows, seq), dtype=np.int64)  # pads get position 1, as Hugging Face does
        mask = np.zeros_like(self.slots.mask)
        for row, prompt in enumerate(self.prompts):
            start = seq - len(prompt)
            input_ids[row, start:], attention_mask[row, start:] = prompt, 1
            position_ids[row, start:] = np.arange(len(prompt))
            mask[:, row, start:] = self.slots.mask[:, row, :len(prompt)]
        return input_ids, attention_mask, position_ids, mask


def random_batch(vocab_size: int, hidden: int, num_slots: int, edited_slots: list[int], seed: int = 0,
                 prompts: list[list[int]] | None = None) -> Batch:
    """``prompts`` (else two random ones of different lengths); at ``edited_slots`` a random patch per row.

    Row 1 uses all RANK rows, one of them also on generated tokens; row 0 only RANK - 1 (its
    last row is zero-padded, as the runtime pads a smaller patch) and no generated tokens, so
    rows of one batch differ in rank, values and positions.
    """
    rng = np.random.default_rng(seed)
    prompts = prompts or [[int(t) for t in rng.integers(0, vocab_size, n)] for n in PROMPT_LENGTHS]
    batch, seq = len(prompts), max(len(p) for p in prompts)
    mask = np.zeros((num_slots, batch, seq, RANK), dtype=np.float32)
    decode_mask = np.zeros((num_slots, batch, 1, RANK), dtype=np.float32)
    decode_mask[edited_slots, min(1, batch - 1), :, GENERATED_ROWS] = 1.0
    for row, prompt in enumerate(prompts):
        used = RANK - 1 if row == 0 else RANK
        for slot in edited_slots:
            mask[slot, row, :PREFIX, :min(PREFIX, used)] = 1.0
            mask[slot, row, len(prompt) - SUFFIX:len(prompt), PREFIX:used] = 1.0
    A = rng.standard_normal((num_slots, batch, RANK, hidden)).astype(np.float32)
    A /= np.linalg.norm(A, axis=-1, keepdims=True)
    B = (rng.standard_normal((num_slots, batch, RANK, hidden)) / np.sqrt(hidden)).astype(np.float32)
    c = rng.standard_normal((num_slots, batch, RANK)).astype(np.float32)
    unused = np.ones((num_slots, batch, RANK, 1), dtype=np.float32)
    unused[:, 0, RANK - 1] = 0.0  # row 0: rank 3
    unused[[s for s in range(num_slots) if s not in edited_slots]] = 0.0
    return Batch(prompts, SlotArrays(A * unused, B * unused, c * unused[..., 0], mask, decode_mask))


def open_engine(path: str | Path, *, graph: str, kv: KVLayout, slot_layers: list[int], pad_id: int) -> Engine:
    """The runtime's engine over the graph, on the CPU, its threads not spinning between steps
    (torch runs in between and would lose its cores to them)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Engine(session, graph=graph, kv=kv, slot_layers=slot_layers, device="cpu", pad_id=pad_id)


def kv_layout(model: nn.Module, path: str | Path) -> KVLayout:
    """The KV layout of ``model``'s graph at ``path`` (float16 KV in fp16 graphs)."""
    import onnx

    inputs = onnx.load(str(path), load_external_data=False).graph.input
    kv_type = next(i.type.tensor_type.elem_type for i in inputs if i.name == past_names(0)[0])
    kv_heads, head_dim = kv_shape(model.config)
    return KVLayout(len(decoder_layers(model)), kv_heads, head_dim,
                    "float16" if kv_type == onnx.TensorProto.FLOAT16 else "float32")


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
             slots: SlotArrays, mask: np.ndarray) -> np.ndarray:
        self.slots.clear()
        for k, layer in enumerate(self.slot_layers):
            if mask[k].any():  # an all-zero mask is the identity; leaving the slot empty keeps torch exact
                self.slots.set(layer, *(torch.from_numpy(x[k]) for x in (slots.A, slots.B, slots.c, mask)))
        out = self.model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                         position_ids=torch.from_numpy(position_ids), cache=cache, use_cache=True)
        return out.logits[:, -1].float().numpy()


def run_both(engine: Engine, reference: TorchReference, batch: Batch, steps: int, *, pad_id: int = 0,
             greedy_from: str = "torch") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Prefill then ``steps`` decode steps on both; the next token is the argmax of
    ``greedy_from``'s logits ("torch" = teacher forcing both alike, "own" = each its own)."""
    from transformers import DynamicCache

    run = engine.start(batch.prompts, batch.slots, steps + 1)
    cache = DynamicCache()
    ids, attention, positions, mask = batch.left_padded(pad_id)
    rows = len(batch.prompts)
    got = run.prefill()
    want = reference.step(ids, attention, positions, cache, batch.slots, mask)
    ort_logits, torch_logits = [got], [want]
    for _ in range(steps):
        torch_next = want.argmax(-1)
        ort_next = got.argmax(-1) if greedy_from == "own" else torch_next
        attention = np.concatenate([attention, np.ones((rows, 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        got = run.decode(ort_next)
        want = reference.step(torch_next[:, None].astype(np.int64), attention, positions, cache, batch.slots,
                              batch.slots.decode_mask)
        ort_logits.append(got)
        torch_logits.append(want)
    return ort_logits, torch_logits


def pick_edited_slots(num_slots: int) -> list[int]:
    """Edit the first and last slot (two layers apart when there are two or more; none without slots)."""
    return sorted({0, num_slots - 1}) if num_slots else []


def verify_graph(path: str | Path, model: nn.Module, slot_layers: list[int], *, graph: str, pad_id: int = 0,
                 prompts: list[list[int]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Figures for the manifest's ``verification`` entry (see docs/bundle-format.md).

    ``prompts``: two token lists of different lengths (real text makes the greedy
    agreement of quantized graphs meaningful); default: random tokens.
    """
    config = model.config
    engine = open_engine(path, graph=graph, kv=kv_layout(model, path), slot_layers=slot_layers, pad_id=pad_id)
    reference = TorchReference(model, slot_layers)
    edited = pick_edited_slots(len(slot_layers))
    batch = random_batch(config.vocab_size, config.hidden_size, len(slot_layers), edited, seed, prompts)
    with reference.attached():
        patched = run_both(engine, reference, batch, DECODE_STEPS, pad_id=pad_id)
        zero = run_both(engine, reference, batch.without_edit(), DECODE_STEPS, pad_id=pad_id)
        greedy = run_both(engine, reference, batch, GREEDY_TOKENS - 1, pad_id=pad_id, greedy_from="own")
    ort_tokens = np.stack([logits.argmax(-1) for logits in greedy[0]], axis=1)
    torch_tokens = np.stack([logits.argmax(-1) for logits in greedy[1]], axis=1)
    return {
        "max_abs_logit_diff": _max_diff(*patched),
        "zero_patch_max_abs_diff": _max_diff(*zero),
        "patch_effect_max_abs": _max_diff(patched[1][:1], zero[1][:1]),
        "identity_bit_exact": identity_is_exact(engine, batch),
        "greedy_tokens_match": bool((ort_tokens == torch_tokens).all()),
        "greedy_tokens_agreement": float((ort_tokens == torch_tokens).mean()),
        "greedy_tokens": int(ort_tokens.size),
        # how long the two agree before the first difference (per row; a quantized graph drifts apart)
        "greedy_tokens_before_divergence": [int(np.argmin(row)) if not row.all() else int(row.size)
                                            for row in ort_tokens == torch_tokens],
        "decode_steps": DECODE_STEPS,
        "edited_slot_layers": [slot_layers[k] for k in edited],
        "batch": len(batch.prompts),
        "rank": RANK,
        "positions": f"f{PREFIX}+l{SUFFIX} (untied); row 1: rank row {GENERATED_ROWS.start} also g",
        "prompt_tokens": [len(p) for p in batch.prompts],
        "seed": seed,
    }


def identity_is_exact(engine: Engine, batch: Batch) -> bool:
    """A zero mask and an empty (rank 0) patch must give bit-equal logits from the graph."""
    num_slots, rows, seq, _ = batch.slots.mask.shape
    zero_mask = engine.start(batch.prompts, batch.without_edit().slots, 1).prefill()
    rank_zero = engine.start(batch.prompts, SlotArrays.empty(num_slots, rows, seq, batch.slots.A.shape[-1]), 1)
    return bool(np.array_equal(zero_mask, rank_zero.prefill()))


def _max_diff(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    return float(max(np.abs(a.astype(np.float64) - b).max() for a, b in zip(first, second)))
