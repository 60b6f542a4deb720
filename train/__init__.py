"""Training stage: learn a person's LoReFT patch on a frozen backbone (torch, transformers).

``train`` and ``TrainConfig`` load on first use, so the torch-free parts of this stage
(``reft_edge.train.config``, and ``reft_edge.train.data``, which re-exports reft_edge.records) import
without torch.
"""

import importlib

__all__ = ["TrainConfig", "train"]


_LAZY = {"TrainConfig": "reft_edge.train.config", "train": "reft_edge.train.recipe"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reft_edge.train' has no attribute {name!r}")
