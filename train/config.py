"""The training options: one frozen dataclass, torch-free, so the CLI derives its options and
defaults from it without importing torch.

Example::

    from reft_edge.train.config import TrainConfig
    config = TrainConfig(data="alice.jsonl", out="alice.reft")
    TrainConfig.from_dict(config.to_dict()) == config   # True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from reft_edge.configs import config_from_dict


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a patch. Same config + data + base on CPU = same bytes."""

    out: str
    data: str | None = None  # JSONL pairs; or give skills instead
    # (name, JSONL) per skill: one patch whose rank rows are grouped into named skills (``rank``
    # rows each), trained on their own data and, after that, to work together (see compose_steps)
    skills: tuple[tuple[str, str], ...] = ()
    # patches (same base) the new one must also work beside: trained alone, then with them active
    compose_with: tuple[str, ...] = ()
    compose_steps: int = 30  # steps of the composition phase (with several skills or compose_with)
    # With compose_with: the new patch's R rows stay orthogonal to its partners' rows at each layer,
    # so neither reads back what the other writes there (kinds with R only). Off by default: on the
    # tiny opener + closing test pair it kept the pair from reproducing its teacher's answers.
    orthogonal_to_partners: bool = False
    # Retention: weight of the cross-entropy, with the patch on, of the base model's own greedy answers
    # to general prompts (train/anchor_prompts.txt), added to every step's loss; 0 turns it off.
    retain_weight: float = 0.0
    model: str | None = None  # None or "default": the embedded SmolLM2-135M-Instruct
    layers: tuple[int, ...] | None = None  # None: DEFAULT_LAYER_COUNT layers of the upper half (upper_layers)
    rank: int = 2
    positions: str = "l1+g"  # the last prompt token and every generated token
    share_weights: bool = True  # False: separate interventions for prefix and suffix
    kind: str = "loreft"
    steps: int | None = None  # neither steps nor epochs: DEFAULT_STEPS
    epochs: int | None = None
    lr: float = 2e-3
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
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        if isinstance(values.get("skills"), list):  # JSON has lists where the config keeps tuples
            values = {**values, "skills": tuple(tuple(pair) for pair in values["skills"])}
        return config_from_dict(cls, values, what="training", tuple_fields=("layers", "compose_with"))


@dataclass(frozen=True)
class ManyConfig:
    """A train-many job: the jobs file, the output folder, and what every person shares."""

    jobs: str  # JSONL, one person per line: {"id", "data", and TrainConfig options to override}
    out_dir: str  # <id>.reft per person, summary.json
    model: str | None = None  # one backbone for everyone (TrainConfig.model)
    device: str = "auto"
    max_rows: int = 32  # rows per mixed batch: several people's batches share one forward pass
    defaults: dict[str, Any] = field(default_factory=dict)  # TrainConfig options for every person
    # Patches every person's patch must compose with (a shared house style): each person is then
    # trained exactly as `reft-edge train --compose-with` trains them alone.
    compose_with: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ManyConfig:
        return config_from_dict(cls, values, what="train-many", tuple_fields=("compose_with",))


# The default recipe, chosen by the study in docs/quality.md (benchmarks.quality): rank 2 at five
# layers of the upper half, the last prompt token and every generated token, 30 steps at lr 2e-3.
# Editing generated tokens carries the persona through the answer; staying out of the lower
# half and stopping early keeps the base's knowledge (facts kept 79 % vs 61 % with layers
# 3-27, three personas).
DEFAULT_STEPS = 30
DEFAULT_LAYER_COUNT = 5
DEFAULT_LAYERS_HELP = f"{DEFAULT_LAYER_COUNT} layers evenly over the upper half (15,18,21,24,27 of 30)"


def upper_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layers evenly apart from the middle of the model up.

    >>> upper_layers(30, 5)
    (15, 18, 21, 24, 27)
    >>> upper_layers(32, 5), upper_layers(3, 5)
    ((16, 19, 22, 25, 28), (1, 2))
    """
    half = num_layers // 2
    return tuple(sorted({half + i * (num_layers - half) // count for i in range(count)}))


def spread_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layers evenly apart, each in the middle of its share of the depth.

    >>> spread_layers(30, 5)
    (3, 9, 15, 21, 27)
    >>> spread_layers(30, 1), spread_layers(3, 5)
    ((15,), (0, 1, 2))
    """
    return tuple(sorted({(2 * i + 1) * num_layers // (2 * count) for i in range(count)}))
