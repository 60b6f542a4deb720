"""The contract that train, export and runtime share: graph input/output names, the rank-row
layout of a slot, and how a rank row's positions become a per-token edit mask.

Torch-free (numpy only); the training stage and the traced graph call the same functions
with torch tensors (``xp=torch``), and export.fused writes the same formula as ONNX nodes.

>>> from reft_edge.runtime.positions import Positions
>>> slot_names(15)
('slot.15.A', 'slot.15.B', 'slot.15.c', 'slot.15.positions')
>>> rows = position_rows([(Positions.parse("f2+l2"), "prefix", 1), (Positions.parse("l1+g"), "both", 2)])
>>> rows.tolist()            # columns: one per rank row; lines: first, last, after, generated
[[2, 0, 0], [0, 1, 1], [0, 0, 0], [0, 1, 1]]
>>> import numpy as np
>>> t = np.arange(7)[None]    # a prompt of 5 tokens, then 2 generated tokens (as training feeds them)
>>> token_mask(rows[None], t, prompt_len=np.array([5]), real=t < 7)[0].T.astype(int).tolist()
[[1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]]

Positions of rank row r, ``slot.{l}.positions[b, :, r]`` = (first, last, after, generated):
prompt token t of a prompt of L tokens is edited when ``t < min(first, L)`` (the prefix) or
``L - min(last, L - min(after, L)) <= t < L`` (the suffix, which never reaches into the
first ``after`` tokens); every generated token is edited when ``generated`` is 1. This is
``Positions.spans`` exactly: ``after`` is the patch's prefix count, also for an untied
suffix intervention (its suffix is capped by the prefix it does not edit). ``p`` (every
prompt token) is ``first = EVERY_PROMPT_TOKEN``. Zero rows edit nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reft_edge.runtime.positions import Positions

# Graph input and output names (the KV names are the ones optimum and onnxruntime-genai use).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

# The lines of a slot's positions input, per rank row.
FIRST, LAST, AFTER, GENERATED = range(4)
POSITION_LINES = 4
# "every prompt token": a count no prompt reaches (the graph caps it at the prompt's length)
EVERY_PROMPT_TOKEN = 2**31 - 1


def slot_names(layer: int) -> tuple[str, str, str, str]:
    """The edit slot of decoder layer ``layer``: A, B [batch, rank, hidden] float32, c [batch, 1, rank]
    float32, positions [batch, 4, rank] int64 (first, last, after, generated per rank row)."""
    return f"slot.{layer}.A", f"slot.{layer}.B", f"slot.{layer}.c", f"slot.{layer}.positions"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def row_positions(positions: Positions, where: str) -> tuple[int, int, int, int]:
    """(first, last, after, generated) of the rank rows of one intervention on ``where``."""
    prefix = where in ("both", "prefix") and "prefix" in positions.groups()
    suffix = where in ("both", "suffix") and "suffix" in positions.groups()
    first = EVERY_PROMPT_TOKEN if positions.prompt else positions.first
    return (
        first if prefix else 0,
        positions.last if suffix else 0,
        first if suffix else 0,
        int(positions.edits(where, "generated")),
    )


def position_rows(interventions: Sequence[tuple[Positions, str, int]]) -> np.ndarray:
    """[4, total rank] int64: the interventions of one slot, (positions, where, rank) each, one
    after another along the rank. This order is the slot layout: A, B and c rows follow it."""
    columns = [
        np.tile(np.array(row_positions(positions, where), np.int64)[:, None], (1, rank))
        for positions, where, rank in interventions
    ]
    return np.concatenate(columns, axis=1) if columns else np.zeros((POSITION_LINES, 0), np.int64)


def token_mask(positions: Any, t: Any, prompt_len: Any, real: Any, xp: Any = np) -> Any:
    """Which (token, rank row) pairs are edited: bool [batch, seq, rank].

    positions [batch, 4, rank]; t [batch or 1, seq]: each token's position from the
    sequence start; prompt_len [batch]: tokens before it are prompt tokens, from it on
    generated ones (0 on a pass without prompt tokens); real [batch or 1, seq]: False on
    pads. ``xp`` is numpy or torch: the graphs compute exactly this.
    """
    first, last, after, generated = (positions[:, line, None, :] for line in range(POSITION_LINES))
    t, length = t[..., None], prompt_len[:, None, None]
    start = xp.minimum(after, length)
    prefix = t < xp.minimum(first, length)
    suffix = (t >= length - xp.minimum(last, length - start)) & (t < length)
    in_prompt = t < length
    # And/Or rather than where: onnxruntime has no bool Where kernel for the traced graph
    return real[..., None] & ((in_prompt & (prefix | suffix)) | (~in_prompt & (generated != 0)))
