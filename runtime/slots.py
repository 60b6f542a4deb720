"""Patches -> the graph's slot inputs: one low-rank affine edit per slot layer, per batch row.

Example::

    from reft_edge.runtime import Patch
    from reft_edge.runtime.slots import resolve_edits, slot_arrays
    edits = resolve_edits([Patch.from_file("alice.reft")], weights=None, slot_layers=[15])
    slots = slot_arrays([edits], prompt_lens=[12], seq=12, num_slots=1, hidden_size=576)   # SlotArrays

Slot k edits decoder layer ``slot_layers[k]``: ``h <- h + ((h B^T + c) * m) A``. Several
patches (and a patch's prefix/suffix interventions) at one layer are concatenated along
the rank; each group of rank rows has its own mask, so each keeps its own positions.
A row's prompt token j sits at mask column j (the engine moves it where its graph's
padding puts it). Edits of generated tokens (positions with ``g``) have a second mask,
``decode_mask``, fed with every decode step; when no row has one, decode steps run
rank-0 slots (the graph's slot-free path). Unused rank rows are zero with a zero mask:
an exact identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from reft_edge.errors import UsageError
from reft_edge.runtime.patch import Patch
from reft_edge.runtime.positions import Positions


@dataclass(frozen=True)
class SlotEdit:
    """One intervention of one patch, placed in a slot, with the patch's weight folded into A."""

    slot: int
    positions: Positions
    where: str
    A: np.ndarray  # [rank, hidden]
    B: np.ndarray
    c: np.ndarray  # [rank]


@dataclass(frozen=True)
class SlotArrays:
    """Every slot's edit for every row: A, B [slots, batch, rank, hidden], c [slots, batch, rank],
    mask [slots, batch, prompt_len, rank] with column j = the row's prompt token j, and
    decode_mask [slots, batch, 1, rank]: the rank rows that edit every generated token."""

    A: np.ndarray
    B: np.ndarray
    c: np.ndarray
    mask: np.ndarray
    decode_mask: np.ndarray

    @classmethod
    def empty(cls, num_slots: int, batch: int, seq: int, hidden: int) -> "SlotArrays":
        """Rank 0 everywhere: no edit."""
        matrix = np.zeros((num_slots, batch, 0, hidden), np.float32)
        return cls(matrix, matrix, np.zeros((num_slots, batch, 0), np.float32),
                   np.zeros((num_slots, batch, seq, 0), np.float32), np.zeros((num_slots, batch, 1, 0), np.float32))

    @property
    def edits_generated(self) -> bool:
        return bool(self.decode_mask.any())


def check_weights(patches: Sequence[Patch], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(patches)
    weights = [float(w) for w in weights]
    if len(weights) != len(patches):
        raise UsageError(f"{len(weights)} weight(s) for {len(patches)} patch(es); give one weight per patch")
    if not all(np.isfinite(weights)):
        raise UsageError(f"weights {weights} must be finite numbers (1.0 applies a patch as trained)")
    return weights


def resolve_edits(patches: Sequence[Patch], weights: Sequence[float] | None,
                  slot_layers: Sequence[int]) -> list[SlotEdit]:
    """Every intervention of every patch as a SlotEdit; patches must already be checked against the bundle."""
    slot_of = {layer: k for k, layer in enumerate(slot_layers)}
    edits = []
    for patch, weight in zip(patches, check_weights(patches, weights)):
        for edit in patch.affine_edits():
            # Scaling A scales the whole edit ((h B^T + c) * m) A linearly, for any kind
            edits.append(SlotEdit(slot_of[edit.layer], patch.positions, edit.where,
                                  np.float32(weight) * edit.A, edit.B, edit.c))
    return edits


def slot_rank(rows: Sequence[Sequence[SlotEdit]], num_slots: int) -> int:
    """The rank every slot is padded to: the most rank rows any (slot, row) pair needs."""
    needed = [sum(e.A.shape[0] for e in edits if e.slot == k) for edits in rows for k in range(num_slots)]
    return max(needed, default=0)


def slot_arrays(rows: Sequence[Sequence[SlotEdit]], prompt_lens: Sequence[int], seq: int, num_slots: int,
                hidden_size: int) -> SlotArrays:
    """A, B, c and the masks for a batch: each edit's prompt positions, and whether it edits generated tokens."""
    batch, rank = len(rows), slot_rank(rows, num_slots)
    A = np.zeros((num_slots, batch, rank, hidden_size), np.float32)
    B = np.zeros_like(A)
    c = np.zeros((num_slots, batch, rank), np.float32)
    mask = np.zeros((num_slots, batch, seq, rank), np.float32)
    decode_mask = np.zeros((num_slots, batch, 1, rank), np.float32)
    for row, (edits, prompt_len) in enumerate(zip(rows, prompt_lens)):
        used = [0] * num_slots  # next free rank row per slot
        for edit in edits:
            k, start = edit.slot, used[edit.slot]
            stop = start + edit.A.shape[0]
            A[k, row, start:stop], B[k, row, start:stop], c[k, row, start:stop] = edit.A, edit.B, edit.c
            tokens = np.asarray(edit.positions.token_indices(edit.where, prompt_len), dtype=np.int64)
            mask[k, row, tokens, start:stop] = 1.0
            decode_mask[k, row, :, start:stop] = float(edit.positions.edits(edit.where, "generated"))
            used[k] = stop
    return SlotArrays(A, B, c, mask, decode_mask)
