"""Training stage: learn a person's LoReFT patch on a frozen backbone (torch, transformers)."""

from reft_edge.train.recipe import TrainConfig, train

__all__ = ["TrainConfig", "train"]
