"""Patches -> the graph's slot inputs: one low-rank affine edit per slot layer, per batch row.

Example::

    from reft_edge.runtime import Patch
    from reft_edge.runtime.slots import resolve_edits, slot_arrays
    edits = resolve_edits([Patch.from_file("alice.reft")], weights=None, slot_layers=[15])
    slots = slot_arrays([edits], num_slots=1, hidden_size=576)   # SlotArrays, constant for the generation

Slot k edits decoder layer ``slot_layers[k]``: ``h <- h + ((h B^T + c) * m) A``. Several
patches (and a patch's prefix/suffix interventions) at one layer are concatenated along
the rank (``contract.position_rows`` is that layout); each rank row carries its own
positions (first, last, after, generated), from which the graph computes the mask ``m``
of every token itself (``contract.token_mask``). So the inputs stay the same for a whole
generation. When no row edits generated tokens, the runtime's decode steps bind rank-0
slots (the graph's slot-free path). Unused rank rows are zero: an exact identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reft_edge.errors import UsageError
from reft_edge.runtime.contract import GENERATED, POSITION_LINES, position_rows, token_mask
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
    positions [slots, batch, 4, rank] int64 (contract.row_positions per rank row)."""

    A: np.ndarray
    B: np.ndarray
    c: np.ndarray
    positions: np.ndarray

    @classmethod
    def empty(cls, num_slots: int, batch: int, hidden: int) -> SlotArrays:
        """Rank 0 everywhere: no edit."""
        matrix = np.zeros((num_slots, batch, 0, hidden), np.float32)
        return cls(
            matrix,
            matrix,
            np.zeros((num_slots, batch, 0), np.float32),
            np.zeros((num_slots, batch, POSITION_LINES, 0), np.int64),
        )

    @classmethod
    def stack(cls, rows: Sequence[SlotArrays]) -> SlotArrays:
        """Several batches' arrays as one batch, each zero-padded to the largest rank (an exact identity)."""
        rank = max(r.A.shape[2] for r in rows)
        pad = (  # noqa: E731
            lambda array, axis: np.concatenate(
                [
                    array,
                    np.zeros((*array.shape[:axis], rank - array.shape[axis], *array.shape[axis + 1 :]), array.dtype),
                ],
                axis=axis,
            )
        )
        return cls(
            *(
                np.concatenate([pad(getattr(r, name), axis) for r in rows], axis=1)
                for name, axis in (("A", 2), ("B", 2), ("c", 2), ("positions", 3))
            )
        )

    @property
    def edits_generated(self) -> bool:
        return bool(self.positions[:, :, GENERATED].any())

    def masks(self, t: np.ndarray, prompt_lens: np.ndarray, real: np.ndarray) -> np.ndarray:
        """[slots, batch, seq, rank] float32: the per-token masks the graph computes (for torch references)."""
        masks = [token_mask(p, t, prompt_lens, real) for p in self.positions]
        slots, batch, _, rank = self.positions.shape
        return np.array(masks, np.float32).reshape(slots, batch, t.shape[-1], rank)  # no slots: still 4-d

    def rows(self, rows: slice) -> SlotArrays:
        """The batch rows ``rows`` only."""
        return SlotArrays(self.A[:, rows], self.B[:, rows], self.c[:, rows], self.positions[:, rows])


def check_weights(patches: Sequence[Patch], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(patches)
    weights = [float(w) for w in weights]
    if len(weights) != len(patches):
        raise UsageError(f"{len(weights)} weight(s) for {len(patches)} patch(es); give one weight per patch")
    if not all(np.isfinite(weights)):
        raise UsageError(f"weights {weights} must be finite numbers (1.0 applies a patch as trained)")
    return weights


def resolve_edits(
    patches: Sequence[Patch], weights: Sequence[float] | None, slot_layers: Sequence[int]
) -> list[SlotEdit]:
    """Every intervention of every patch as a SlotEdit; patches must already be checked against the bundle."""
    slot_of = {layer: k for k, layer in enumerate(slot_layers)}
    edits = []
    for patch, weight in zip(patches, check_weights(patches, weights)):
        if weight == 0.0:  # off: no rows at all, so the request runs exactly as without this patch
            continue
        for edit in patch.affine_edits():
            if edit.A.shape[0]:  # every skill of the patch switched off leaves no rows
                # Scaling A scales the whole edit ((h B^T + c) * m) A linearly, for any kind
                with np.errstate(over="ignore"):
                    scaled = np.float32(weight) * edit.A
                if not np.isfinite(scaled).all():  # a finite weight can still overflow float32 times A
                    raise UsageError(
                        f"weight {weight:g} makes patch {patch.name!r}'s edit overflow float32; "
                        "give a smaller --weight (1.0 applies the patch as trained)"
                    )
                edits.append(SlotEdit(slot_of[edit.layer], patch.positions, edit.where, scaled, edit.B, edit.c))
    return edits


def slot_rank(rows: Sequence[Sequence[SlotEdit]], num_slots: int) -> int:
    """The rank every slot is padded to: the most rank rows any (slot, row) pair needs."""
    needed = [sum(e.A.shape[0] for e in edits if e.slot == k) for edits in rows for k in range(num_slots)]
    return max(needed, default=0)


def slot_arrays(rows: Sequence[Sequence[SlotEdit]], num_slots: int, hidden_size: int) -> SlotArrays:
    """A, B, c and positions for a batch: each row's edits of a slot concatenated along the rank
    (contract.position_rows), then zero-padded to the batch's largest rank."""
    batch, rank = len(rows), slot_rank(rows, num_slots)
    A = np.zeros((num_slots, batch, rank, hidden_size), np.float32)
    B = np.zeros_like(A)
    c = np.zeros((num_slots, batch, rank), np.float32)
    positions = np.zeros((num_slots, batch, POSITION_LINES, rank), np.int64)
    for row, edits in enumerate(rows):
        for k in range(num_slots):
            here = [edit for edit in edits if edit.slot == k]
            used = sum(edit.A.shape[0] for edit in here)
            if here:
                A[k, row, :used] = np.concatenate([edit.A for edit in here])
                B[k, row, :used] = np.concatenate([edit.B for edit in here])
                c[k, row, :used] = np.concatenate([edit.c for edit in here])
                positions[k, row, :, :used] = position_rows([(e.positions, e.where, e.A.shape[0]) for e in here])
    return SlotArrays(A, B, c, positions)
