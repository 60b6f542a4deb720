"""Training checkpoints: intervention parameters and AdamW state, as safetensors (no pickle).

``reft-edge train --checkpoint-every N`` writes ``<out>.ckpt`` atomically every N steps;
``--resume`` continues from it. A resumed CPU run gives the same patch bytes as an
uninterrupted one: the parameters and Adam moments are restored exactly and the batch
order is a pure function of the seed. The checkpoint is removed once the patch is saved.

Example::

    save_checkpoint(path, step=10, first_loss=3.2, parameters=params, optimizer=opt, identity=identity)
    step, first_loss = load_checkpoint(path, parameters=params, optimizer=opt, identity=identity)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from reft_edge.errors import UsageError
from reft_edge.files import atomic_write_bytes

CHECKPOINT_SUFFIX = ".ckpt"


def checkpoint_path(out: str | Path) -> Path:
    return Path(str(out) + CHECKPOINT_SUFFIX)


def save_checkpoint(
    path: Path,
    *,
    step: int,
    first_loss: float,
    parameters: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    identity: dict[str, Any],
) -> None:
    from safetensors.torch import save

    tensors, adam_steps = {}, []
    for i, param in enumerate(parameters):
        state = optimizer.state[param]
        tensors[f"param.{i}"] = param.detach().cpu().contiguous()
        tensors[f"exp_avg.{i}"] = state["exp_avg"].cpu().contiguous()
        tensors[f"exp_avg_sq.{i}"] = state["exp_avg_sq"].cpu().contiguous()
        adam_steps.append(float(state["step"]))
    metadata = {
        "step": json.dumps(step),
        "first_loss": json.dumps(first_loss),
        "adam_steps": json.dumps(adam_steps),
        "identity": json.dumps(identity, sort_keys=True),
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_checkpoint(
    path: Path, *, parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer, identity: dict[str, Any]
) -> tuple[int, float]:
    """Restore parameters and optimizer state in place; returns (steps done, first loss)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        saved_identity = json.loads(metadata["identity"])
        step, first_loss = json.loads(metadata["step"]), json.loads(metadata["first_loss"])
        adam_steps = json.loads(metadata["adam_steps"])
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise UsageError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}); delete it and train without --resume"
        ) from None
    if saved_identity != identity:
        changed = sorted(k for k in identity.keys() | saved_identity.keys() if identity.get(k) != saved_identity.get(k))
        raise UsageError(
            f"{path}: written by a run with different {', '.join(changed)}; resume with the same "
            "options and data, or delete the checkpoint"
        )
    check_tensors(path, tensors, parameters, adam_steps, step)
    with torch.no_grad():
        for i, param in enumerate(parameters):
            param.copy_(tensors[f"param.{i}"])
            optimizer.state[param] = {
                "step": torch.tensor(adam_steps[i]),
                "exp_avg": tensors[f"exp_avg.{i}"].to(param.device),
                "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].to(param.device),
            }
    return step, first_loss


def check_tensors(
    path: Path, tensors: dict[str, torch.Tensor], parameters: list[torch.Tensor], adam_steps: Any, step: Any
) -> None:
    """Every parameter's tensors are there with its shape: a checkpoint whose identity matches can
    still be damaged or edited by hand, and must fail with one line rather than a KeyError."""

    def damaged(what: str) -> UsageError:
        return UsageError(f"{path}: {what}; the checkpoint is damaged, delete it and train without --resume")

    if type(step) is not int or step < 0:
        raise damaged(f"step {step!r} is not a step count")
    if (
        not isinstance(adam_steps, list)
        or len(adam_steps) != len(parameters)
        or not all(isinstance(n, (int, float)) for n in adam_steps)
    ):
        raise damaged(
            f"adam_steps holds {len(adam_steps) if isinstance(adam_steps, list) else 'no'} counts "
            f"for {len(parameters)} parameters"
        )
    for i, param in enumerate(parameters):
        for name in (f"param.{i}", f"exp_avg.{i}", f"exp_avg_sq.{i}"):
            if name not in tensors:
                raise damaged(f"tensor {name} is missing")
            if tuple(tensors[name].shape) != tuple(param.shape) or not tensors[name].is_floating_point():
                raise damaged(
                    f"tensor {name} has shape {list(tensors[name].shape)} "
                    f"({tensors[name].dtype}), expected {list(param.shape)}"
                )
