"""The edit, in one place: trainable parameters per kind, and the hooks that apply them.

Every kind maps to one low-rank affine edit of the residual stream leaving a decoder
block (docs/patch-format.md and ``reft_edge.runtime.patch.affine_from_params``)::

    h <- h + ((h B^T + c) * m) A        A, B: [rank, hidden]   c: [rank]   m: 0/1 per token and rank-row

``low_rank_edit`` computes it; training and the exported ONNX graph both call it.

Example::

    params = InterventionParams("loreft", hidden_size=576, rank=4)
    A, B, c = params.affine()
    slots = EditSlots()
    with attach_edits({15: layers[15]}, slots):
        slots.set(15, A[None], B[None], c[None], mask)   # mask [batch, seq, rank]
        model(input_ids)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from reft_edge.runtime.patch import KIND_TENSORS, affine_from_params

ORTHONORMAL_KINDS = ("loreft", "direft", "consreft", "lobireft")


def low_rank_edit(
    h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, c: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """h [batch, seq, hidden]; A, B [batch, rank, hidden]; c [batch, rank]; mask [batch, seq, rank].

    Zero rank or an all-zero mask returns h unchanged (h + 0).
    """
    coefficients = (torch.matmul(h, B.transpose(-1, -2)) + c.unsqueeze(-2)) * mask
    return h + torch.matmul(coefficients, A).to(h.dtype)


def orthonormal_rows(free: torch.Tensor) -> torch.Tensor:
    """R [rank, hidden] with orthonormal rows from a free [hidden, rank] matrix (QR, signs fixed).

    Unlike torch's Householder ``orthogonal`` parametrisation this cannot collapse
    under weight decay (AdamW's default decay moves its stored diagonal signs from 1.0 to
    0.99996, which it truncates to 0, so R becomes all zeros after one step): any full-rank
    free matrix maps to an orthonormal R.
    """
    q, r = torch.linalg.qr(free)
    signs = torch.sign(torch.diagonal(r))
    return (q * torch.where(signs == 0, torch.ones_like(signs), signs)).T


class InterventionParams(nn.Module):
    """One intervention's trainable parameters, in its kind's natural parametrisation."""

    def __init__(self, kind: str, hidden_size: int, rank: int):
        super().__init__()
        self.kind = kind
        # nn.Linear's init range for every matrix. For R_free the scale matters even though
        # QR ignores it: Adam's steps have a fixed size, so small entries let R turn quickly.
        bound = 1.0 / math.sqrt(hidden_size)
        for name in KIND_TENSORS[kind]:
            if name == "R":
                self.R_free = nn.Parameter(torch.empty(hidden_size, rank).uniform_(-bound, bound))
            elif name == "b":
                self.b = nn.Parameter(torch.zeros(rank))
            else:
                setattr(self, name, nn.Parameter(torch.empty(rank, hidden_size).uniform_(-bound, bound)))

    def avoid(self, directions: torch.Tensor) -> None:
        """Keep R's rows orthogonal to ``directions`` [k, hidden] (partners' rows at this layer):
        R_free is projected onto their orthogonal complement before QR."""
        basis = torch.linalg.qr(directions.T.to(torch.float32))[0]  # [hidden, k], orthonormal columns
        self.register_buffer("avoided", basis)

    def natural(self) -> dict[str, torch.Tensor]:
        """The tensors a patch file stores for this kind (R materialised as orthonormal rows)."""
        return {
            name: orthonormal_rows(self._free_R()) if name == "R" else getattr(self, name)
            for name in KIND_TENSORS[self.kind]
        }

    def _free_R(self) -> torch.Tensor:
        avoided = getattr(self, "avoided", None)
        if avoided is None:
            return self.R_free
        return self.R_free - avoided @ (avoided.T @ self.R_free)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return affine_from_params(self.kind, self.natural())


class EditSlots:
    """Per-layer (A, B, c, mask) that the attached hooks read when their layer runs."""

    def __init__(self) -> None:
        self.values: dict[int, tuple[torch.Tensor, ...]] = {}

    def set(self, layer: int, A: torch.Tensor, B: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> None:
        self.values[layer] = (A, B, c, mask)

    def clear(self) -> None:
        self.values.clear()


@contextlib.contextmanager
def attach_edits(modules: Mapping[int, nn.Module], slots: EditSlots) -> Iterator[EditSlots]:
    """Register a forward hook per layer module that edits its output; remove exactly those hooks."""

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple, output):
            edit = slots.values.get(layer)
            if edit is None:
                return output
            if isinstance(output, tuple):
                return (low_rank_edit(output[0], *edit), *output[1:])
            return low_rank_edit(output, *edit)

        return hook

    handles = [module.register_forward_hook(make_hook(layer)) for layer, module in modules.items()]
    try:
        yield slots
    finally:
        for handle in handles:
            handle.remove()
