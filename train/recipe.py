"""Train one person's patch: a LoReFT edit at a few layers and prompt positions of a frozen LM.

Example (the CLI ``reft-edge train`` calls exactly this)::

    from reft_edge.train import TrainConfig, train
    patch = train(TrainConfig(data="examples/emoji/train.jsonl", out="emoji.reft",
                              layers=(15,), rank=4, positions="f2+l2", steps=60, batch_size=12))
    print(patch.training["final_loss"], patch.size_bytes)

Steps, top to bottom: check the config, read the data, load the backbone, tokenize,
cache the frozen states below the lowest edited layer (they never change), fit the
edit with AdamW, save the patch atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reft_edge import __version__
from reft_edge.errors import UsageError
from reft_edge.runtime.contract import position_rows, token_mask
from reft_edge.runtime.patch import KINDS, SAVE_DTYPES, Intervention, Patch
from reft_edge.runtime.positions import Positions
from reft_edge.train.backbone import Backbone, decoder_layers, decoder_layers_owner, load_backbone
from reft_edge.train.config import DEFAULT_LAYER_COUNT, DEFAULT_STEPS, TrainConfig, upper_layers
from reft_edge.train.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from reft_edge.train.data import Example, Record, file_digest, read_jsonl, tokenize
from reft_edge.train.intervention import EditSlots, InterventionParams, attach_edits


_NOT_NUMERIC = {"checkpoint_every", "resume", "record_time"}  # options that cannot change the patch
_NOT_RECIPE = _NOT_NUMERIC | {"data", "out", "name", "model", "device", "val_data"}


def train(config: TrainConfig, *, backbone: Backbone | None = None, progress: bool = True) -> Patch:
    """Train and save a patch; returns it as loaded back from ``config.out``."""
    positions = check_config(config)
    records = split_records(config, read_jsonl(config.data))
    backbone = backbone or load_backbone(config.model)
    layers = resolve_layers(config, backbone)
    device = pick_device(config.device)
    started = time.perf_counter()
    backbone.model.to(device)
    prepared = prepare(config, positions, layers, records, backbone, device)
    fitted = fit(backbone.model, prepared.train_set, prepared.val_set, prepared.interventions, positions, config,
                 prepared.steps, device, prepared.identity, progress)
    seconds = time.perf_counter() - started
    backbone.model.to("cpu")
    patch = save_patch(config, prepared, fitted, seconds, backbone)
    if progress:
        val = "" if fitted.val_loss is None else f", validation loss {fitted.val_loss:.4f} (best step {fitted.best_step})"
        print(f"trained {config.out}: final loss {fitted.final_loss:.4f}{val}, {fitted.steps_run} steps, "
              f"{seconds:.1f} s, {patch.size_bytes} bytes")
    return patch


@dataclass
class Prepared:
    """One person's fit inputs: tokenized examples with their frozen states, fresh interventions."""

    positions: Positions
    interventions: list[tuple[int, str, InterventionParams]]
    train_set: tuple[list[Example], list[torch.Tensor]]
    val_set: tuple[list[Example], list[torch.Tensor]]
    steps: int
    data_sha256: str
    identity: dict[str, Any]  # what a checkpoint must match to be resumed


def prepare(config: TrainConfig, positions: Positions, layers: list[int], records: tuple[list[Record], list[Record]],
            backbone: Backbone, device: torch.device) -> Prepared:
    """Tokenize, seed and build the interventions, cache the frozen states (model already on ``device``)."""
    examples = tokenize(records[0], backbone.tokenizer, use_chat_template=config.chat_template)
    val_examples = tokenize(records[1], backbone.tokenizer, use_chat_template=config.chat_template)
    torch.manual_seed(config.seed)
    interventions = build_interventions(config, positions, layers, backbone.hidden_size)
    states = cache_frozen_states(backbone.model, examples, min(layers), device)
    val_states = cache_frozen_states(backbone.model, val_examples, min(layers), device)
    steps = count_steps(config, len(examples))
    data_sha256 = file_digest(config.data)
    identity = json.loads(json.dumps({  # as JSON sees it, so it compares equal after a round trip
        **{k: v for k, v in config.to_dict().items() if k not in _NOT_NUMERIC}, "steps": steps,
        "data_sha256": data_sha256, "base_fingerprint": backbone.fingerprint}))
    return Prepared(positions, interventions, (examples, states), (val_examples, val_states), steps, data_sha256,
                    identity)


def save_patch(config: TrainConfig, prepared: Prepared, fitted: "Fitted", seconds: float, backbone: Backbone) -> Patch:
    """Write the patch atomically with its training record; drop the checkpoint it no longer needs."""
    training = {
        "steps": prepared.steps, "steps_run": fitted.steps_run, "best_step": fitted.best_step,
        "first_loss": round(fitted.first_loss, 6), "final_loss": round(fitted.final_loss, 6),
        "val_loss": None if fitted.val_loss is None else round(fitted.val_loss, 6),
        "val_examples": len(prepared.val_set[0]),
        "seconds": round(seconds, 2) if config.record_time else None, "examples": len(prepared.train_set[0]),
        "data_sha256": prepared.data_sha256, "lr": config.lr, "batch_size": config.batch_size,
        "seed": config.seed, "library_version": __version__, "model": backbone.source,
        "recipe": recipe_summary(config),
    }
    patch = to_patch(config, prepared.positions, prepared.interventions, backbone, training).to_file(config.out)
    checkpoint_path(config.out).unlink(missing_ok=True)
    return patch


def recipe_summary(config: TrainConfig) -> dict[str, Any]:
    """The options that decide a patch besides its data and base, as JSON sees them."""
    chosen = {k: v for k, v in config.to_dict().items() if k not in _NOT_RECIPE}
    return json.loads(json.dumps(chosen))


def check_config(config: TrainConfig) -> Positions:
    """Checks that need no model, so bad options fail before anything slow starts."""
    positions = Positions.parse(config.positions)
    if config.kind not in KINDS:
        raise UsageError(f"--kind {config.kind!r} is unknown; use one of {', '.join(KINDS)}")
    if config.rank < 1:
        raise UsageError(f"--rank {config.rank} is too small; use a rank of at least 1 (4 is typical)")
    if config.save_dtype not in SAVE_DTYPES:
        raise UsageError(f"--save-dtype {config.save_dtype!r} is unknown; use one of {', '.join(SAVE_DTYPES)}")
    if config.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {config.device!r} is unknown; use auto, cpu or cuda")
    for option, value in (("--steps", config.steps), ("--epochs", config.epochs), ("--batch-size", config.batch_size),
                          ("--checkpoint-every", config.checkpoint_every)):
        if value is not None and value < 1:
            raise UsageError(f"{option} {value} must be at least 1")
    if not config.lr > 0:
        raise UsageError(f"--lr {config.lr} must be positive (4e-3 is typical)")
    if config.val_data and config.val_fraction:
        raise UsageError("--val-data and --val-fraction both given; hold out data one way")
    if config.val_fraction is not None and not 0 < config.val_fraction < 1:
        raise UsageError(f"--val-fraction {config.val_fraction} must be between 0 and 1 (0.2 is typical)")
    for option, value in (("--eval-every", config.eval_every), ("--patience", config.patience)):
        if value is not None and value < 1:
            raise UsageError(f"{option} {value} must be at least 1")
    out_dir = Path(config.out).parent
    if not out_dir.is_dir():
        raise UsageError(f"--out {config.out}: folder {out_dir} does not exist; create it or choose another path")
    return positions


def resolve_layers(config: TrainConfig, backbone: Backbone) -> list[int]:
    n_layers, hidden = backbone.num_layers, backbone.hidden_size
    layers = sorted(set(config.layers)) if config.layers else list(upper_layers(n_layers, DEFAULT_LAYER_COUNT))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise UsageError(f"--layers {bad[0]} is outside this model's layers 0..{n_layers - 1}; pick layers in that range")
    if config.rank > hidden:
        raise UsageError(f"--rank {config.rank} exceeds the hidden size {hidden}; use a rank of at most {hidden}")
    return layers


def pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    return torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def count_steps(config: TrainConfig, n_examples: int) -> int:
    if config.steps:
        return config.steps
    if config.epochs:
        return config.epochs * (n_examples // min(config.batch_size, n_examples))
    return DEFAULT_STEPS


def split_records(config: TrainConfig, records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(training, validation) records: --val-data, or a seeded --val-fraction of --data, or none."""
    if config.val_data:
        return records, read_jsonl(config.val_data)
    if not config.val_fraction:
        return records, []
    n_val = max(1, round(len(records) * config.val_fraction))
    if n_val >= len(records):
        raise UsageError(f"--val-fraction {config.val_fraction} leaves no training example of {len(records)}; "
                         "use a smaller fraction or more data")
    held = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed))[:n_val].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def build_interventions(config: TrainConfig, positions: Positions, layers: list[int],
                        hidden: int) -> list[tuple[int, str, InterventionParams]]:
    """One intervention per layer (shared weights) or one per position group (untied)."""
    groups = ["both"] if config.share_weights else list(positions.groups())
    return [(layer, where, InterventionParams(config.kind, hidden, config.rank)) for layer in layers for where in groups]


class _StopForward(Exception):
    """Raised by the caching hook: nothing above the cached layer is needed."""


@torch.no_grad()
def cache_frozen_states(model: nn.Module, examples: list[Example], lowest: int, device: torch.device) -> list[torch.Tensor]:
    """The output of block ``lowest`` for each example's full sequence (prompt + target[:-1]).

    The backbone is frozen and causal, so these never change during training; each
    example runs alone (no padding) and stops right after the block.
    """
    captured: list[torch.Tensor] = []

    def capture(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output)[0].detach())
        raise _StopForward

    handle = decoder_layers(model)[lowest].register_forward_hook(capture)
    try:
        for example in examples:
            ids = torch.tensor([example.prompt_ids + example.target_ids[:-1]], device=device)
            with contextlib.suppress(_StopForward):
                model.base_model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured


class _Skip(nn.Module):
    """Stands in for a frozen block below the cached one: passes its input through."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Replay(nn.Module):
    """Stands in for the cached block: returns the batch's cached output."""

    states: torch.Tensor

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.states


@contextlib.contextmanager
def replay_frozen_layers(model: nn.Module, lowest: int) -> Iterator[tuple[_Replay, nn.ModuleList]]:
    """Swap blocks 0..lowest for _Skip/_Replay (same indices, so per-layer config still lines
    up) and put the real blocks back afterwards."""
    owner, attribute = decoder_layers_owner(model)
    real = getattr(owner, attribute)
    replay = _Replay()
    swapped = nn.ModuleList([*(_Skip() for _ in range(lowest)), replay, *real[lowest + 1:]])
    setattr(owner, attribute, swapped)
    try:
        yield replay, swapped
    finally:
        setattr(owner, attribute, real)


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [batch, seq], right-padded
    attention_mask: torch.Tensor
    states: torch.Tensor  # cached block outputs [batch, seq, hidden]
    prompt_lens: list[int]
    lengths: list[int]  # prompt + target[:-1]: the response tokens that stand for generated ones
    rows: torch.Tensor  # (rows, cols) of the positions that predict a target token
    cols: torch.Tensor
    targets: torch.Tensor


def collate(examples: list[Example], states: list[torch.Tensor], device: torch.device) -> _Batch:
    """Right-pad to the longest sequence of this batch; padded tokens never reach the loss."""
    lengths = [s.shape[0] for s in states]
    seq = max(lengths)
    input_ids = torch.zeros(len(examples), seq, dtype=torch.long, device=device)
    attention_mask = torch.zeros(len(examples), seq, dtype=torch.long, device=device)
    padded = states[0].new_zeros(len(examples), seq, states[0].shape[-1])
    rows, cols, targets = [], [], []
    for i, (example, state) in enumerate(zip(examples, states)):
        ids = example.prompt_ids + example.target_ids[:-1]
        input_ids[i, : len(ids)] = torch.tensor(ids, device=device)
        attention_mask[i, : len(ids)] = 1
        padded[i, : len(ids)] = state
        n_prompt, n_target = len(example.prompt_ids), len(example.target_ids)
        rows += [i] * n_target
        cols += range(n_prompt - 1, n_prompt - 1 + n_target)
        targets += example.target_ids
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return _Batch(input_ids, attention_mask, padded, [len(e.prompt_ids) for e in examples], lengths,
                  as_long(rows), as_long(cols), as_long(targets))


def edit_masks(rows: np.ndarray, batch: _Batch, device: torch.device) -> torch.Tensor:
    """[batch, seq, rank] 0/1: which tokens of each row a slot's rank rows edit (``rows``: their
    positions, contract.position_rows), by the formula the exported graph computes. Response
    tokens are the generated ones (teacher forcing), so a ``g`` edit covers them as generation will."""
    rows_b, seq = len(batch.prompt_lens), batch.input_ids.shape[1]
    positions = torch.from_numpy(rows).to(device)[None].expand(rows_b, -1, -1)
    t = torch.arange(seq, device=device)[None]
    lengths = torch.tensor(batch.lengths, device=device)[:, None]
    prompt_lens = torch.tensor(batch.prompt_lens, device=device)
    return token_mask(positions, t, prompt_lens, t < lengths, xp=torch).float()


def set_edits(slots: EditSlots, interventions: list[tuple[int, str, InterventionParams]], positions: Positions,
              batch: _Batch, device: torch.device) -> None:
    """One person's edits for every row of the batch."""
    set_people_edits(slots, [(interventions, len(batch.lengths))], positions, batch, device)


def set_people_edits(slots: EditSlots, people: list[tuple[list[tuple[int, str, InterventionParams]], int]],
                     positions: Positions, batch: _Batch, device: torch.device) -> None:
    """Concatenate the interventions at each layer along the rank in the slot layout
    (contract.position_rows); each rank row keeps its own positions. ``people``: (interventions,
    row count) in row order, all of one recipe; each row gets its own person's A, B, c."""
    slots.clear()
    first = people[0][0]
    for layer in sorted({layer for layer, _, _ in first}):
        per_person = [_layer_affine(interventions, layer) for interventions, _ in people]
        A, B, c = (_per_row([tensors[i] for tensors in per_person], [n for _, n in people]) for i in range(3))
        here = [(where, params) for l, where, params in first if l == layer]
        rows = position_rows([(positions, where, params.b.shape[0]) for where, params in here])
        slots.set(layer, A, B, c, edit_masks(rows, batch, device))


def _per_row(tensors: list[torch.Tensor], rows: list[int]) -> torch.Tensor:
    """Each person's tensor repeated over its rows; one person's stays a broadcast batch of 1,
    so training alone computes exactly what it did before mixed batches existed."""
    if len(tensors) == 1:
        return tensors[0][None]
    return torch.cat([tensor[None].expand(n, *tensor.shape) for tensor, n in zip(tensors, rows)])


def _layer_affine(interventions: list[tuple[int, str, InterventionParams]],
                  layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A, B [rank, hidden] and c [rank] of one layer's interventions, concatenated along the rank."""
    affine = [params.affine() for l, _, params in interventions if l == layer]
    return tuple(torch.cat([part[i] for part in affine]) for i in range(3))


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Seeded shuffled batches; each epoch is a fresh permutation, each batch sorted by index."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n_examples)
    order: list[list[int]] = []
    while len(order) < steps:
        permutation = torch.randperm(n_examples, generator=generator).tolist()
        order += [sorted(permutation[i:i + batch_size]) for i in range(0, n_examples - batch_size + 1, batch_size)]
    return order[:steps]


@dataclass(frozen=True)
class Fitted:
    """How a fit went: losses, steps run, and the step whose parameters were kept."""

    first_loss: float
    final_loss: float  # training loss of the kept step's batch (the last step without validation)
    steps_run: int
    best_step: int
    val_loss: float | None  # validation loss of the kept parameters


def fit(model: nn.Module, train_set: tuple[list[Example], list[torch.Tensor]],
        val_set: tuple[list[Example], list[torch.Tensor]], interventions: list[tuple[int, str, InterventionParams]],
        positions: Positions, config: TrainConfig, steps: int, device: torch.device, identity: dict[str, Any],
        progress: bool) -> Fitted:
    """AdamW on the intervention parameters only (checkpointed and resumable). With validation
    data: the validation loss every ``eval_every`` steps, the best step's parameters kept, and
    an early stop after ``patience`` validations without improvement."""
    from tqdm.auto import tqdm

    learner = Learner(train_set, val_set, interventions, config, steps, device, identity)
    slots = EditSlots()
    with replay_frozen_layers(model, min(layer for layer, _, _ in interventions)) as (replay, layers), \
            attach_edits({layer: layers[layer] for layer, _, _ in interventions}, slots):
        batch_loss = partial(forward_loss, model, replay, slots, interventions, positions, device=device)
        bar = tqdm(desc="train", total=steps, initial=learner.step, disable=not progress, unit="step")
        while not learner.done:
            examples, states = learner.next_batch()
            step_loss = batch_loss(collate(examples, states, device))
            learner.optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            learner.update(step_loss.item(), batch_loss)
            bar.update()
            val = {"val": f"{learner.best.loss:.4f}"} if learner.best.step else {}
            bar.set_postfix(loss=f"{learner.loss:.4f}", **val)
        bar.close()
    return learner.result()


class Learner:
    """One person's fit, a step at a time: its parameters, its own AdamW and seeded batch order,
    validation, early stopping and checkpoints. ``fit`` drives one; ``reft_edge.train.many``
    drives several through shared mixed batches, so each still takes exactly its own steps."""

    def __init__(self, train_set: tuple[list[Example], list[torch.Tensor]],
                 val_set: tuple[list[Example], list[torch.Tensor]],
                 interventions: list[tuple[int, str, InterventionParams]], config: TrainConfig, steps: int,
                 device: torch.device, identity: dict[str, Any]) -> None:
        self.examples, self.states = train_set
        self.val_set, self.config, self.steps, self.device, self.identity = val_set, config, steps, device, identity
        for _, _, params in interventions:
            params.to(device)
        self.parameters = [p for _, _, params in interventions for p in params.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=0.0)
        self.checkpoint = checkpoint_path(config.out)
        self.step, self.first_loss = 0, math.nan
        if config.resume and self.checkpoint.is_file():
            self.step, self.first_loss = load_checkpoint(self.checkpoint, parameters=self.parameters,
                                                         optimizer=self.optimizer, identity=identity)
        self.order = batch_order(len(self.examples), config.batch_size, steps, config.seed)
        self.loss, self.best, self.stopped = math.nan, _Best(), False

    @property
    def done(self) -> bool:
        return self.stopped or self.step >= len(self.order)

    def next_batch(self) -> tuple[list[Example], list[torch.Tensor]]:
        indices = self.order[self.step]
        return [self.examples[i] for i in indices], [self.states[i] for i in indices]

    def update(self, step_loss: float, batch_loss: Callable[["_Batch"], torch.Tensor]) -> None:
        """After the backward pass of this learner's batch: its AdamW step, then validation and
        checkpoint when due. ``batch_loss`` computes this learner's loss of a collated batch."""
        self.optimizer.step()
        self.step += 1
        self.loss = step_loss
        self.first_loss = step_loss if self.step == 1 else self.first_loss
        step, config = self.step, self.config
        if self.val_set[0] and (step % config.eval_every == 0 or step == self.steps):
            val_loss = validation_loss(batch_loss, self.val_set, config.batch_size, self.device)
            self.best.consider(step, val_loss, step_loss, self.parameters)
            self.stopped = bool(config.patience and self.best.stale >= config.patience)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < self.steps and not self.stopped:
            save_checkpoint(self.checkpoint, step=step, first_loss=self.first_loss, parameters=self.parameters,
                            optimizer=self.optimizer, identity=self.identity)

    def result(self) -> Fitted:
        if not self.best.step:
            return Fitted(self.first_loss, self.loss, self.step, self.steps, None)
        self.best.restore(self.parameters)
        return Fitted(self.first_loss, self.best.train_loss, self.step, self.best.step, self.best.loss)


def forward_loss(model: nn.Module, replay: "_Replay", slots: EditSlots,
                 interventions: list[tuple[int, str, InterventionParams]], positions: Positions, batch: "_Batch",
                 device: torch.device) -> torch.Tensor:
    """Mean cross-entropy of one person's batch's target tokens with its edits applied."""
    return forward_losses(model, replay, slots, [(interventions, len(batch.lengths))], positions, batch, device)[0]


def forward_losses(model: nn.Module, replay: "_Replay", slots: EditSlots,
                   people: list[tuple[list[tuple[int, str, InterventionParams]], int]], positions: Positions,
                   batch: "_Batch", device: torch.device) -> list[torch.Tensor]:
    """Each person's mean cross-entropy of its target tokens with its edits applied. ``people``:
    (interventions, row count) in the batch's row order; one person is an ordinary batch.

    Logits are computed person by person, so each person's output-layer matmul has the shape
    it has when that person trains alone."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    replay.states = batch.states
    with autocast:
        set_people_edits(slots, people, positions, batch, device)
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=False).last_hidden_state
        row_ends = np.cumsum([n for _, n in people])
        tokens_through = torch.bincount(batch.rows, minlength=len(batch.lengths)).cumsum(0)  # rows 0..i
        bounds = [0, *tokens_through[row_ends - 1].tolist()]
        logits = [model.get_output_embeddings()(hidden[batch.rows[a:b], batch.cols[a:b]])
                  for a, b in zip(bounds[:-1], bounds[1:])]
    return [F.cross_entropy(part.float(), batch.targets[a:b]) for part, a, b in zip(logits, bounds[:-1], bounds[1:])]


@torch.no_grad()
def validation_loss(batch_loss: Any, val_set: tuple[list[Example], list[torch.Tensor]], batch_size: int,
                    device: torch.device) -> float:
    """Mean target-token loss over the validation examples (token-weighted, batch by batch)."""
    examples, states = val_set
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        n = sum(len(e.target_ids) for e in chunk)
        total += batch_loss(collate(chunk, states[start:start + batch_size], device)).item() * n
        tokens += n
    return total / tokens


class _Best:
    """The best validation loss so far, its step, and a copy of its parameters."""

    def __init__(self) -> None:
        self.loss, self.step, self.train_loss, self.stale = math.inf, 0, math.nan, 0
        self.parameters: list[torch.Tensor] = []

    def consider(self, step: int, val_loss: float, train_loss: float, parameters: list[torch.Tensor]) -> None:
        if val_loss < self.loss:
            self.loss, self.step, self.train_loss, self.stale = val_loss, step, train_loss, 0
            self.parameters = [p.detach().clone() for p in parameters]
        else:
            self.stale += 1

    @torch.no_grad()
    def restore(self, parameters: list[torch.Tensor]) -> None:
        for param, kept in zip(parameters, self.parameters):
            param.copy_(kept)


def to_patch(config: TrainConfig, positions: Positions, interventions: list[tuple[int, str, InterventionParams]],
             backbone: Backbone, training: dict[str, Any]) -> Patch:
    with torch.no_grad():
        saved = tuple(
            Intervention(layer, where, {k: v.detach().float().cpu().numpy() for k, v in params.natural().items()})
            for layer, where, params in interventions
        )
    return Patch(
        name=config.name or Path(config.out).stem, kind=config.kind, positions=positions,
        share_weights=config.share_weights, rank=config.rank, hidden_size=backbone.hidden_size,
        base_fingerprint=backbone.fingerprint, interventions=saved, training=training, dtype=config.save_dtype,
    )
