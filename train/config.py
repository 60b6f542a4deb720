"""The training options: one frozen dataclass, torch-free, so the CLI derives its options and
defaults from it without importing torch.

Example::

    from reft_edge.train.config import TrainConfig
    config = TrainConfig(data="alice.jsonl", out="alice.reft")
    TrainConfig.from_dict(config.to_dict()) == config   # True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from reft_edge.configs import config_from_dict

@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a patch. Same config + data + base on CPU = same bytes."""

    data: str
    out: str
    model: str | None = None  # None or "default": the embedded SmolLM2-135M-Instruct
    layers: tuple[int, ...] | None = None  # None: one layer at about half depth
    rank: int = 4
    positions: str = "f1+l1"
    share_weights: bool = True  # False: separate interventions for prefix and suffix
    kind: str = "loreft"
    steps: int | None = None  # neither steps nor epochs: 100 steps
    epochs: int | None = None
    lr: float = 4e-3
    batch_size: int = 8
    seed: int = 0
    val_data: str | None = None  # held-out pairs: validation loss, early stopping, best step kept
    val_fraction: float | None = None  # or hold out this share of --data (seeded)
    eval_every: int = 5  # validation every N steps
    patience: int | None = 4  # stop after N validations without a better loss (None: never)
    device: str = "auto"  # auto | cpu | cuda
    save_dtype: str = "float32"
    chat_template: bool = True
    name: str | None = None  # default: the output file's stem
    record_time: bool = False  # store wall-clock seconds (makes the file differ run to run)
    checkpoint_every: int | None = None  # write <out>.ckpt every N steps
    resume: bool = False  # continue from <out>.ckpt when it exists

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return config_from_dict(cls, values, what="training", tuple_fields=("layers",))

DEFAULT_STEPS = 100
DEFAULT_LAYER_COUNT = 1
DEFAULT_LAYERS_HELP = "one layer at about half depth"


def spread_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layers evenly apart, each in the middle of its share of the depth.

    >>> spread_layers(30, 5)
    (3, 9, 15, 21, 27)
    >>> spread_layers(30, 1), spread_layers(3, 5)
    ((15,), (0, 1, 2))
    """
    return tuple(sorted({(2 * i + 1) * num_layers // (2 * count) for i in range(count)}))
