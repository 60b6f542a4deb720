"""``reft-edge train --auto``: search the recipe on a validation split within a time budget.

Example::

    from reft_edge.train.auto import train_auto
    from reft_edge.train.config import TrainConfig
    patch = train_auto(TrainConfig(data="alice.jsonl", out="alice.reft"), budget_minutes=10)
    print(patch.training["auto"]["chosen"], patch.training["val_loss"])

Optuna's TPE sampler (seeded) proposes recipes from ``SEARCH_SPACE``; each trial trains a
patch with early stopping on the validation data (``--val-data``, else a seeded quarter
of ``--data``) and scores it by its validation loss. The first trial is the default
recipe, so the search never returns a patch worse on validation than the default. A
trial is only started when the time left covers the slowest trial so far, so the
budget holds. The best trial's patch is written to ``--out`` with the search (the
chosen recipe, every trial's loss) in its training metadata.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from reft_edge.errors import UsageError
from reft_edge.runtime.patch import Patch
from reft_edge.train.config import DEFAULT_LAYER_COUNT, TrainConfig, spread_layers, upper_layers

AUTO_VAL_FRACTION = 0.25
# Recipe choices searched. Layer plans are relative to the model's depth: "upper-N" is
# upper_layers(depth, N) (the default plan), "spread-N" is spread_layers(depth, N).
SEARCH_SPACE: dict[str, tuple] = {
    "layer_plan": (f"upper-{DEFAULT_LAYER_COUNT}", "upper-3", "upper-8", "spread-5"),
    "rank": (1, 2, 4),
    "positions": ("l1+g", "f1+l1+g", "p+g", "g"),
}
LR_RANGE = (1e-3, 6e-3)
MAX_STEPS = 120  # early stopping ends most trials sooner


def train_auto(
    config: TrainConfig, *, budget_minutes: float = 10.0, backbone: Any = None, progress: bool = True
) -> Patch:
    import optuna

    from reft_edge.train.backbone import load_backbone

    if not budget_minutes > 0:
        raise UsageError(f"--budget-minutes {budget_minutes} must be positive (10 is typical)")
    if config.layers is not None:
        raise UsageError("--auto chooses the layers itself; leave out --layers (or train without --auto)")
    if not (config.val_data or config.val_fraction):
        config = dataclasses.replace(config, val_fraction=AUTO_VAL_FRACTION)
    backbone = backbone or load_backbone(config.model)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=config.seed))
    study.enqueue_trial(default_trial())
    deadline = time.monotonic() + budget_minutes * 60
    with tempfile.TemporaryDirectory(dir=Path(config.out).parent, prefix=".auto-") as folder:
        objective = _Objective(config, backbone, Path(folder), progress)
        while objective.time_for_another(deadline):
            study.optimize(objective, n_trials=1)
        best = objective.patches[study.best_trial.number]
        search = {
            "budget_minutes": budget_minutes,
            "trials": [
                {**trial.params, "val_loss": trial.value, "seconds": round(objective.seconds[trial.number], 1)}
                for trial in study.trials
            ],
            "chosen": study.best_trial.params,
        }
        patch = dataclasses.replace(
            best, name=config.name or Path(config.out).stem, training={**best.training, "auto": search}
        ).to_file(config.out)
    if progress:
        print(
            f"--auto: {len(study.trials)} recipes in {sum(objective.seconds):.0f} s; chose {study.best_trial.params} "
            f"(validation loss {study.best_value:.4f}); wrote {config.out}"
        )
    return patch


def default_trial() -> dict[str, Any]:
    """The default recipe as a trial of the search."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {
        "layer_plan": f"upper-{DEFAULT_LAYER_COUNT}",
        "rank": defaults["rank"],
        "positions": defaults["positions"],
        "lr": defaults["lr"],
    }


def trial_config(config: TrainConfig, params: dict[str, Any], num_layers: int, out: Path) -> TrainConfig:
    plan, count = params["layer_plan"].split("-")
    layers = (upper_layers if plan == "upper" else spread_layers)(num_layers, int(count))
    return dataclasses.replace(
        config,
        out=str(out),
        layers=layers,
        rank=params["rank"],
        positions=params["positions"],
        lr=params["lr"],
        steps=config.steps or MAX_STEPS,
        epochs=None,
        name=None,
        checkpoint_every=None,
        resume=False,
    )


class _Objective:
    """Trains one trial's patch; remembers each patch and how long it took."""

    def __init__(self, config: TrainConfig, backbone: Any, folder: Path, progress: bool):
        self.config, self.backbone, self.folder, self.progress = config, backbone, folder, progress
        self.patches: list[Patch] = []
        self.seconds: list[float] = []

    def time_for_another(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        return not self.seconds or left >= max(self.seconds)

    def __call__(self, trial: Any) -> float:
        from reft_edge.train.recipe import train

        params = {name: trial.suggest_categorical(name, choices) for name, choices in SEARCH_SPACE.items()}
        params["lr"] = trial.suggest_float("lr", *LR_RANGE, log=True)
        config = trial_config(self.config, params, self.backbone.num_layers, self.folder / f"{trial.number}.reft")
        started = time.monotonic()
        patch = train(config, backbone=self.backbone, progress=False)
        self.seconds.append(time.monotonic() - started)
        self.patches.append(patch)
        loss = patch.training["val_loss"]
        if self.progress:
            print(f"--auto trial {trial.number}: {params} -> validation loss {loss:.4f} ({self.seconds[-1]:.0f} s)")
        return loss if loss is not None and math.isfinite(loss) else math.inf
