"""Trace a frozen causal LM, with its edit slots, into one ONNX graph for prefill and decode.

Example::

    from reft_edge.train.backbone import load_backbone
    from reft_edge.export.graph import export_onnx
    backbone = load_backbone()                         # SmolLM2-135M-Instruct
    export_onnx(backbone.model, slot_layers=[15], path="/tmp/model.onnx")   # + /tmp/model.onnx.data

The graph's inputs and outputs (names, shapes, dtypes) are the contract in
docs/bundle-format.md; the names live in ``reft_edge.runtime.bundle``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reft_edge.runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    POSITION_LINES,
    past_names,
    present_names,
    slot_names,
    token_mask,
)
from reft_edge.train.backbone import decoder_layers, eager_attention
from reft_edge.train.intervention import EditSlots, attach_edits

OPSET = 18


def kv_shape(config: Any) -> tuple[int, int]:
    """(num_kv_heads, head_dim) of the KV cache, for every supported architecture's config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def input_names(num_layers: int, slot_layers: list[int]) -> list[str]:
    kv = [name for layer in range(num_layers) for name in past_names(layer)]
    slots = (name for layer in slot_layers for name in slot_names(layer))
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *kv, *slots]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, *(name for layer in range(num_layers) for name in present_names(layer))]


class SlotGraph(nn.Module):
    """The HF model with flat KV tensors and per-layer slot tensors as plain inputs.

    A cache object cannot be an export input, so forward builds a DynamicCache from the
    flat tensors and returns its grown contents flat again. Slot inputs
    slot.{l}.A/B/c and the mask that contract.token_mask computes from slot.{l}.positions
    go to the hook on decoder layer l (``attach_slot_hooks``); the hook applies
    train.intervention.low_rank_edit, the function training uses.

        past_key_values.{i}.*  --> DynamicCache --> HF model --> logits[:, -1:], present.{i}.*
        slot.{l}.positions, position_ids, attention_mask --token_mask--> mask
        slot.{l}.A/B/c, mask   --> EditSlots[l] --> hook on block l
    """

    def __init__(self, model: nn.Module, slot_layers: list[int]):
        super().__init__()
        self.model = model
        self.slot_layers = list(slot_layers)
        self.slots = EditSlots()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor],
        slots: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        places = token_places(input_ids, attention_mask, position_ids)
        for k, layer in enumerate(self.slot_layers):
            A, B, c, positions = slots[4 * k : 4 * k + 4]
            self.slots.set(layer, A, B, c[:, 0], token_mask(positions, *places, xp=torch).to(A.dtype))
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.slots.clear()
        return (out.logits, *(t for layer in out.cache.layers for t in (layer.keys, layer.values)))

    @contextlib.contextmanager
    def attach_slot_hooks(self) -> Iterator[None]:
        layers = decoder_layers(self.model)
        with attach_edits({layer: layers[layer] for layer in self.slot_layers}, self.slots):
            yield


def token_places(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, prompt_len, real) for contract.token_mask, from a traced graph's own inputs.

    t: the position ids. The pass is the prompt pass when there is no past (its length, the
    attention mask's width minus this chunk's, is counted as a tensor so that it stays
    dynamic in the trace); then prompt_len is each row's real tokens, else 0. real: this
    chunk's columns of the attention mask (left pads are 0).
    """
    seq = input_ids.shape[1]
    past = torch.ones_like(attention_mask[:1, seq:]).sum()
    prompt_len = torch.where(past == 0, attention_mask.sum(-1), torch.zeros_like(attention_mask[:, 0]))
    return position_ids, prompt_len, attention_mask[:, attention_mask.shape[1] - seq :] != 0


def example_inputs(
    model: nn.Module, num_slots: int, *, batch: int = 2, seq: int = 3, past: int = 4, rank: int = 2
) -> tuple:
    """Example tensors for tracing: every dynamic dimension >= 2, so none is specialised."""
    config = model.config
    kv_heads, head_dim = kv_shape(config)
    hidden, layers = config.hidden_size, len(decoder_layers(model))
    dtype = next(model.parameters()).dtype
    slot = [
        torch.zeros(batch, rank, hidden),
        torch.zeros(batch, rank, hidden),
        torch.zeros(batch, 1, rank),
        torch.zeros(batch, POSITION_LINES, rank, dtype=torch.long),
    ]
    return (
        torch.ones(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).repeat(batch, 1),
        [torch.zeros(batch, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * layers)],
        [tensor.clone() for _ in range(num_slots) for tensor in slot],  # distinct tensors: no aliased inputs
    )


def dynamic_shapes(num_layers: int, num_slots: int) -> tuple:
    """Batch, seq, past, total and rank are dynamic. The attention mask gets its own dimension
    (total): declaring it as past + seq fails in the exporter ("Attempted to add Dim")."""
    dim = torch.export.Dim
    batch, seq, past, total, rank = (dim(name) for name in ("batch", "seq", "past_seq", "total_seq", "rank"))
    kv = {0: batch, 2: past}
    slot = [{0: batch, 1: rank}, {0: batch, 1: rank}, {0: batch, 2: rank}, {0: batch, 2: rank}]
    return (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        [kv] * (2 * num_layers),
        slot * num_slots,
    )


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Hide the exporter's chatter (missing torchvision ops, dimension renames): none of it is actionable."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def export_onnx(model: nn.Module, slot_layers: list[int], path: str | Path) -> None:
    """Trace ``model`` with slots at ``slot_layers`` to ``path`` (+ ``path``.data, weights as external data)."""
    wrapper = SlotGraph(model, slot_layers).eval()
    num_layers = len(decoder_layers(model))
    with eager_attention(model), wrapper.attach_slot_hooks(), torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            wrapper,
            example_inputs(model, len(slot_layers)),
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names(num_layers, slot_layers),
            output_names=output_names(num_layers),
            dynamic_shapes=dynamic_shapes(num_layers, len(slot_layers)),
            external_data=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)
