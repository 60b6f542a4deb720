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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reft_edge.export.graph import kv_shape
from reft_edge.runtime.bundle import KVLayout
from reft_edge.runtime.contract import past_names
from reft_edge.runtime.engine import Engine
from reft_edge.runtime.positions import Positions
from reft_edge.runtime.slots import SlotArrays, SlotEdit, slot_arrays
from reft_edge.train.backbone import decoder_layers, eager_attention
from reft_edge.train.intervention import EditSlots, attach_edits

PROMPT_LENGTHS = (5, 8)  # random prompts when none are given: row 0 has 3 pads
# Untied f2+l2 in both rows (rank rows 0-1 on the first 2 prompt tokens, row 2 on the last 2);
# row 1 adds rank row 3, an l2+g intervention: the last 2 prompt tokens and every generated one.
PREFIX_SUFFIX, GENERATED = Positions.parse("f2+l2"), Positions.parse("l2+g")
ROW_EDITS = (
    [(PREFIX_SUFFIX, "prefix", 2), (PREFIX_SUFFIX, "suffix", 1)],
    [(PREFIX_SUFFIX, "prefix", 2), (PREFIX_SUFFIX, "suffix", 1), (GENERATED, "both", 1)],
)
RANK = 4
DECODE_STEPS = 4
GREEDY_TOKENS = 32


@dataclass
class Batch:
    """Prompts of different lengths and a patch per row (the runtime's slot arrays)."""

    prompts: list[list[int]]
    slots: SlotArrays

    def without_edit(self) -> Batch:
        """The same A, B, c with all-zero positions (nothing edited): must be exactly the identity."""
        s = self.slots
        return Batch(self.prompts, SlotArrays(s.A, s.B, s.c, np.zeros_like(s.positions)))

    def left_padded(self, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """torch's feed: (input_ids, attention_mask, position_ids, slot masks), rows left-padded;
        the masks are those contract.token_mask gives the graph on the prompt pass."""
        rows, seq = len(self.prompts), max(len(p) for p in self.prompts)
        input_ids = np.full((rows, seq), pad_id, dtype=np.int64)
        attention_mask = np.zeros((rows, seq), dtype=np.int64)
        position_ids = np.ones((rows, seq), dtype=np.int64)  # pads get position 1, as Hugging Face does
        for row, prompt in enumerate(self.prompts):
            start = seq - len(prompt)
            input_ids[row, start:], attention_mask[row, start:] = prompt, 1
            position_ids[row, start:] = np.arange(len(prompt))
        masks = self.slots.masks(position_ids, attention_mask.sum(-1), attention_mask != 0)
        return input_ids, attention_mask, position_ids, masks

    def decode_masks(self) -> np.ndarray:
        """[slots, batch, 1, rank]: what the graph computes on a pass of generated tokens."""
        rows = len(self.prompts)
        return self.slots.masks(np.zeros((rows, 1), np.int64), np.zeros(rows, np.int64), np.ones((rows, 1), bool))


def random_batch(
    vocab_size: int,
    hidden: int,
    num_slots: int,
    edited_slots: list[int],
    seed: int = 0,
    prompts: list[list[int]] | None = None,
) -> Batch:
    """``prompts`` (else two random ones of different lengths); at ``edited_slots`` a random patch per row.

    Row 1 uses all RANK rows, one of them also on generated tokens; row 0 only RANK - 1 (its
    last row is zero-padded, as the runtime pads a smaller patch) and no generated tokens, so
    rows of one batch differ in rank, values and positions. Packed by runtime.slots.slot_arrays.
    """
    rng = np.random.default_rng(seed)
    prompts = prompts or [[int(t) for t in rng.integers(0, vocab_size, n)] for n in PROMPT_LENGTHS]
    rows = []
    for row in range(len(prompts)):
        edits = []
        for slot in edited_slots:
            for positions, where, rank in ROW_EDITS[min(row, 1)]:
                A = rng.standard_normal((rank, hidden)).astype(np.float32)
                A /= np.linalg.norm(A, axis=-1, keepdims=True)
                B = (rng.standard_normal((rank, hidden)) / np.sqrt(hidden)).astype(np.float32)
                edits.append(SlotEdit(slot, positions, where, A, B, rng.standard_normal(rank).astype(np.float32)))
        rows.append(edits)
    return Batch(prompts, slot_arrays(rows, num_slots, hidden))


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
    return KVLayout(
        len(decoder_layers(model)), kv_heads, head_dim, "float16" if kv_type == onnx.TensorProto.FLOAT16 else "float32"
    )


class TorchReference:
    """The Hugging Face model with the training stage's edit hooks at the slot layers."""

    def __init__(self, model: nn.Module, slot_layers: list[int]):
        self.model = model
        self.slot_layers = slot_layers
        self.slots = EditSlots()

    @contextlib.contextmanager
    def attached(self) -> Iterator[TorchReference]:
        layers = decoder_layers(self.model)
        with (
            eager_attention(self.model),
            torch.no_grad(),
            attach_edits({layer: layers[layer] for layer in self.slot_layers}, self.slots),
        ):
            yield self

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: Any,
        slots: SlotArrays,
        mask: np.ndarray,
    ) -> np.ndarray:
        """One pass; ``mask`` [slots, batch, seq, rank] is this pass's per-token edit mask."""
        self.slots.clear()
        for k, layer in enumerate(self.slot_layers):
            if mask[k].any():  # an all-zero mask is the identity; leaving the slot empty keeps torch exact
                self.slots.set(layer, *(torch.from_numpy(x[k]) for x in (slots.A, slots.B, slots.c, mask)))
        out = self.model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            position_ids=torch.from_numpy(position_ids),
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1].float().numpy()


def run_both(
    engine: Engine, reference: TorchReference, batch: Batch, steps: int, *, pad_id: int = 0, greedy_from: str = "torch"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
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
        want = reference.step(
            torch_next[:, None].astype(np.int64), attention, positions, cache, batch.slots, batch.decode_masks()
        )
        ort_logits.append(got)
        torch_logits.append(want)
    return ort_logits, torch_logits


def pick_edited_slots(num_slots: int) -> list[int]:
    """Edit the first and last slot (two layers apart when there are two or more; none without slots)."""
    return sorted({0, num_slots - 1}) if num_slots else []


def verify_graph(
    path: str | Path,
    model: nn.Module,
    slot_layers: list[int],
    *,
    graph: str,
    pad_id: int = 0,
    prompts: list[list[int]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
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
        "logit_max_abs": float(max(np.abs(logits).max() for logits in patched[1])),
        "zero_patch_max_abs_diff": _max_diff(*zero),
        "patch_effect_max_abs": _max_diff(patched[1][:1], zero[1][:1]),
        "identity_bit_exact": identity_is_exact(engine, batch),
        "greedy_tokens_match": bool((ort_tokens == torch_tokens).all()),
        "greedy_tokens_agreement": float((ort_tokens == torch_tokens).mean()),
        "greedy_tokens": int(ort_tokens.size),
        # how long the two agree before the first difference (per row; a quantized graph drifts apart)
        "greedy_tokens_before_divergence": [
            int(np.argmin(row)) if not row.all() else int(row.size) for row in ort_tokens == torch_tokens
        ],
        "decode_steps": DECODE_STEPS,
        "edited_slot_layers": [slot_layers[k] for k in edited],
        "batch": len(batch.prompts),
        "rank": RANK,
        "positions": f"{PREFIX_SUFFIX} (untied, rank rows 0-2); row 1: rank row 3 {GENERATED}",
        "prompt_tokens": [len(p) for p in batch.prompts],
        "seed": seed,
    }


def identity_is_exact(engine: Engine, batch: Batch) -> bool:
    """A patch that edits no position, a patch of weight 0 (its generated-token rows keep the
    decode steps on the slotted path) and an empty (rank 0) patch must give bit-equal logits
    from the graph, at the prefill and at a decode step."""
    num_slots, rows, _, hidden = batch.slots.A.shape
    s = batch.slots
    variants = (batch.without_edit().slots, SlotArrays(np.zeros_like(s.A), s.B, s.c, s.positions))
    empty = engine.start(batch.prompts, SlotArrays.empty(num_slots, rows, hidden), 2)
    want = [empty.prefill()]
    want.append(empty.decode(want[0].argmax(-1)))
    for slots in variants:
        run = engine.start(batch.prompts, slots, 2)
        got = [run.prefill()]
        got.append(run.decode(want[0].argmax(-1)))
        if not all(np.array_equal(g, w) for g, w in zip(got, want)):
            return False
    return True


def _max_diff(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    return float(max(np.abs(a.astype(np.float64) - b).max() for a, b in zip(first, second)))
