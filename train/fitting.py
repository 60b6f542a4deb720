"""The parts a fit is made of, below the recipe (reft_edge.train.recipe tells the story and uses these;
reft_edge.train.many drives several people through the same parts in mixed batches):

- the data: ``TrainSet`` (examples, their cached frozen states, the owners active on each) and
  ``Prepared`` (one person's fit inputs); ``collate`` pads a batch into a ``_Batch``;
- the edits: ``build_interventions`` and ``Edits`` (trainable interventions, their rank rows split
  among skills, beside frozen partner edits); ``set_people_edits`` fills the slots for a batch;
- the frozen model: ``cache_frozen_states`` (the output of the lowest edited block, computed once)
  and ``replay_frozen_layers`` (blocks below it skipped, that block replays the cache);
- the loss: ``FitContext`` (what every forward pass shares), ``forward_losses``/``forward_loss``;
- the steps: ``Learner`` (one person's AdamW, seeded ``batch_order``, validation, early stop,
  checkpoints), ``Anchors`` (the retention term's batches), ``Fitted`` (how a fit went).

Example (one loss and its gradient by hand; ``reft_edge.train.recipe.fit`` runs the whole loop)::

    import torch
    from reft_edge.runtime.positions import Positions
    from reft_edge.train.backbone import load_backbone
    from reft_edge.train.config import TrainConfig
    from reft_edge.train.data import read_jsonl, tokenize
    from reft_edge.train.fitting import (Edits, FitContext, build_interventions, cache_frozen_states, collate,
                                         forward_loss, replay_frozen_layers)
    from reft_edge.train.intervention import EditSlots, attach_edits

    backbone, cpu, positions = load_backbone("default"), torch.device("cpu"), Positions.parse("l1+g")
    examples = tokenize(read_jsonl("examples/emoji/train.jsonl")[:4], backbone.tokenizer, use_chat_template=True)
    config = TrainConfig(data="-", out="-", rank=2)
    edits = Edits(build_interventions(config, positions, [15], backbone.hidden_size, 2), [("emoji", 2)], [])
    states = cache_frozen_states(backbone.model, examples, 15, cpu)
    slots = EditSlots()
    with replay_frozen_layers(backbone.model, 15) as (replay, blocks), attach_edits({15: blocks[15]}, slots):
        context = FitContext(backbone.model, replay, slots, positions, cpu)
        loss = forward_loss(context, edits, collate(examples, states, [frozenset({"emoji"})] * 4, cpu))
        loss.backward()   # gradients on edits.parameters() only: the backbone is frozen
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reft_edge.runtime.contract import position_rows, token_mask
from reft_edge.runtime.positions import Positions
from reft_edge.runtime.slots import SlotEdit
from reft_edge.train.backbone import decoder_layers, decoder_layers_owner
from reft_edge.train.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from reft_edge.train.config import TrainConfig
from reft_edge.train.data import Example
from reft_edge.train.intervention import EditSlots, InterventionParams

# -- the data --------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """One person's fit inputs: tokenized examples with their frozen states, fresh edits."""

    positions: Positions
    edits: Edits
    train_set: TrainSet
    val_set: TrainSet
    steps: int
    data_sha256: str
    identity: dict[str, Any]  # what a checkpoint must match to be resumed
    anchor_set: TrainSet | None = None  # the retention term's examples (config.retain_weight > 0)


@dataclass
class TrainSet:
    """Examples, their cached frozen states, and the owners (skills, partners) active on each."""

    examples: list[Example]
    active: list[frozenset[str]]
    states: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls) -> TrainSet:
        return cls([], [])

    @classmethod
    def of(cls, examples: list[Example], *owners: str) -> TrainSet:
        return cls(list(examples), [frozenset(owners)] * len(examples))

    def __iadd__(self, other: TrainSet) -> TrainSet:
        self.examples += other.examples
        self.active += other.active
        self.states += other.states
        return self

    def pick(self, indices: list[int]) -> tuple[list[Example], list[torch.Tensor], list[frozenset[str]]]:
        return [self.examples[i] for i in indices], [self.states[i] for i in indices], [self.active[i] for i in indices]


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
    active: list[frozenset[str]]  # per row: the owners whose rank rows edit it


IGNORED = -100  # F.cross_entropy's ignore_index: a target fed to the model but not learned


def collate(
    examples: list[Example], states: list[torch.Tensor], active: list[frozenset[str]], device: torch.device
) -> _Batch:
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
        learned = range(example.loss_from, n_target if example.loss_to is None else example.loss_to)
        targets += [t if k in learned else IGNORED for k, t in enumerate(example.target_ids)]
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return _Batch(
        input_ids,
        attention_mask,
        padded,
        [len(e.prompt_ids) for e in examples],
        lengths,
        as_long(rows),
        as_long(cols),
        as_long(targets),
        active,
    )


# -- the edits -------------------------------------------------------------------------------------


def build_interventions(
    config: TrainConfig, positions: Positions, layers: list[int], hidden: int, rank: int
) -> list[tuple[int, str, InterventionParams]]:
    """One intervention per layer (shared weights) or one per position group (untied), each with
    ``rank`` rows (every skill's rows, one skill after another)."""
    groups = ["both"] if config.share_weights else list(positions.groups())
    return [(layer, where, InterventionParams(config.kind, hidden, rank)) for layer in layers for where in groups]


@dataclass
class Edits:
    """What the slots hold while training: the trainable interventions (their rank rows split
    among ``skills``) and frozen partner edits. Each rank row has an owner; a batch row edits
    with the rows of the owners active on its example only."""

    interventions: list[tuple[int, str, InterventionParams]]
    skills: list[tuple[str, int]]
    partners: list[tuple[str, SlotEdit]]

    @property
    def owners(self) -> list[str]:
        return [name for name, _ in self.skills] + sorted({owner for owner, _ in self.partners})

    def lowest_layer(self) -> int:
        return min(self.layers())

    def layers(self) -> list[int]:
        return sorted({layer for layer, _, _ in self.interventions} | {edit.slot for _, edit in self.partners})

    def parameters(self) -> list[torch.Tensor]:
        return [p for _, _, params in self.interventions for p in params.parameters()]

    def to(self, device: torch.device) -> None:
        for _, _, params in self.interventions:
            params.to(device)

    def layer_affine(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A, B [rank, hidden] and c [rank] of one layer: trainable interventions, then partners."""
        parts = [params.affine() for at, _, params in self.interventions if at == layer]
        parts += [tuple(torch.from_numpy(x).to(device) for x in (e.A, e.B, e.c)) for _, e in self._partners(layer)]
        return tuple(torch.cat([part[i] for part in parts]) for i in range(3))

    def layer_rows(self, layer: int, positions: Positions) -> list[tuple[Positions, str, int]]:
        """(positions, where, rank) of each part of layer_affine, for contract.position_rows."""
        return [(positions, where, params.b.shape[0]) for at, where, params in self.interventions if at == layer] + [
            (e.positions, e.where, e.A.shape[0]) for _, e in self._partners(layer)
        ]

    def layer_owners(self, layer: int) -> list[str]:
        """The owner of each rank row of layer_affine."""
        per_intervention = [name for name, rank in self.skills for _ in range(rank)]
        here = sum(1 for at, _, _ in self.interventions if at == layer)
        return per_intervention * here + [owner for owner, e in self._partners(layer) for _ in range(e.A.shape[0])]

    def _partners(self, layer: int) -> list[tuple[str, SlotEdit]]:
        return [(owner, edit) for owner, edit in self.partners if edit.slot == layer]


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


def set_edits(slots: EditSlots, edits: Edits, positions: Positions, batch: _Batch, device: torch.device) -> None:
    """One person's edits for every row of the batch."""
    set_people_edits(slots, [(edits, len(batch.lengths))], positions, batch, device)


def set_people_edits(
    slots: EditSlots, people: list[tuple[Edits, int]], positions: Positions, batch: _Batch, device: torch.device
) -> None:
    """Concatenate each person's edits at each layer along the rank in the slot layout
    (contract.position_rows): trainable interventions, then partners. ``people``: (edits, row
    count) in row order, all of one recipe (one rank-row layout); each row gets its own person's
    A, B, c. Each rank row keeps its own positions and edits only the rows whose example has
    its owner (skill or partner) active."""
    slots.clear()
    first = people[0][0]
    for layer in first.layers():
        per_person = [edits.layer_affine(layer, device) for edits, _ in people]
        A, B, c = (_per_row([tensors[i] for tensors in per_person], [n for _, n in people]) for i in range(3))
        rows = position_rows(first.layer_rows(layer, positions))
        owners = [edits.layer_owners(layer) for edits, n in people for _ in range(n)]
        active = torch.tensor(
            [[owner in row for owner in row_owners] for row, row_owners in zip(batch.active, owners)], device=device
        )
        slots.set(layer, A, B, c, edit_masks(rows, batch, device) * active[:, None, :])


def _per_row(tensors: list[torch.Tensor], rows: list[int]) -> torch.Tensor:
    """Each person's tensor repeated over its rows; one person's stays a broadcast batch of 1,
    so training alone computes exactly what it did before mixed batches existed."""
    if len(tensors) == 1:
        return tensors[0][None]
    return torch.cat([tensor[None].expand(n, *tensor.shape) for tensor, n in zip(tensors, rows)])


# -- the frozen model ------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the caching hook: nothing above the cached layer is needed."""


@torch.no_grad()
def cache_frozen_states(
    model: nn.Module, examples: list[Example], lowest: int, device: torch.device
) -> list[torch.Tensor]:
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
    swapped = nn.ModuleList([*(_Skip() for _ in range(lowest)), replay, *real[lowest + 1 :]])
    setattr(owner, attribute, swapped)
    try:
        yield replay, swapped
    finally:
        setattr(owner, attribute, real)


# -- the loss --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitContext:
    """What every forward pass of a fit shares: the model with its frozen blocks replayed
    (``replay`` holds the batch's cached states), the slots the edits are set in, the positions
    the edits cover and the device. ``recipe.fit`` and ``many.fit_group`` make one inside
    ``replay_frozen_layers`` and ``attach_edits``."""

    model: nn.Module
    replay: _Replay
    slots: EditSlots
    positions: Positions
    device: torch.device


def forward_loss(context: FitContext, edits: Edits, batch: _Batch) -> torch.Tensor:
    """Mean cross-entropy of one person's batch's target tokens with its edits applied."""
    return forward_losses(context, [(edits, len(batch.lengths))], batch)[0]


def forward_losses(context: FitContext, people: list[tuple[Edits, int]], batch: _Batch) -> list[torch.Tensor]:
    """Each person's mean cross-entropy of its target tokens with its edits applied. ``people``:
    (edits, row count) in the batch's row order; one person is an ordinary batch.

    Logits are computed person by person, so each person's output-layer matmul has the shape
    it has when that person trains alone."""
    model, device = context.model, context.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    context.replay.states = batch.states
    with autocast:
        set_people_edits(context.slots, people, context.positions, batch, device)
        hidden = model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        row_ends = np.cumsum([n for _, n in people])
        tokens_through = torch.bincount(batch.rows, minlength=len(batch.lengths)).cumsum(0)  # rows 0..i
        bounds = [0, *tokens_through[row_ends - 1].tolist()]
        logits = [
            model.get_output_embeddings()(hidden[batch.rows[a:b], batch.cols[a:b]])
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
    return [F.cross_entropy(part.float(), batch.targets[a:b]) for part, a, b in zip(logits, bounds[:-1], bounds[1:])]


# -- the steps -------------------------------------------------------------------------------------


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Seeded shuffled batches; each epoch is a fresh permutation, each batch sorted by index."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n_examples)
    order: list[list[int]] = []
    while len(order) < steps:
        permutation = torch.randperm(n_examples, generator=generator).tolist()
        order += [sorted(permutation[i : i + batch_size]) for i in range(0, n_examples - batch_size + 1, batch_size)]
    return order[:steps]


@dataclass(frozen=True)
class Fitted:
    """How a fit went: losses, steps run, and the step whose parameters were kept."""

    first_loss: float
    final_loss: float  # training loss of the kept step's batch (the last step without validation)
    steps_run: int
    best_step: int
    val_loss: float | None  # validation loss of the kept parameters


class Learner:
    """One person's fit, a step at a time: its parameters, its own AdamW and seeded batch order,
    validation, early stopping and checkpoints. ``fit`` drives one; ``reft_edge.train.many``
    drives several through shared mixed batches, so each still takes exactly its own steps."""

    def __init__(self, prepared: Prepared, config: TrainConfig, device: torch.device) -> None:
        self.train_set, self.val_set = prepared.train_set, prepared.val_set
        self.config, self.steps, self.device, self.identity = config, prepared.steps, device, prepared.identity
        prepared.edits.to(device)
        self.parameters = prepared.edits.parameters()
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=0.0)
        self.checkpoint = checkpoint_path(config.out)
        self.step, self.first_loss = 0, math.nan
        if config.resume and self.checkpoint.is_file():
            self.step, self.first_loss = load_checkpoint(
                self.checkpoint, parameters=self.parameters, optimizer=self.optimizer, identity=self.identity
            )
        self.order = batch_order(len(self.train_set.examples), config.batch_size, self.steps, config.seed)
        self.loss, self.best, self.stopped = math.nan, _Best(), False

    @property
    def done(self) -> bool:
        return self.stopped or self.step >= len(self.order)

    def next_batch(self) -> tuple[list[Example], list[torch.Tensor], list[frozenset[str]]]:
        return self.train_set.pick(self.order[self.step])

    def update(self, step_loss: float, batch_loss: Callable[[_Batch], torch.Tensor]) -> None:
        """After the backward pass of this learner's batch: its AdamW step, then validation and
        checkpoint when due. ``batch_loss`` computes this learner's loss of a collated batch."""
        self.optimizer.step()
        self.step += 1
        self.loss = step_loss
        self.first_loss = step_loss if self.step == 1 else self.first_loss
        step, config = self.step, self.config
        if self.val_set.examples and (step % config.eval_every == 0 or step == self.steps):
            val_loss = validation_loss(batch_loss, self.val_set, config.batch_size, self.device)
            self.best.consider(step, val_loss, step_loss, self.parameters)
            self.stopped = bool(config.patience and self.best.stale >= config.patience)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < self.steps and not self.stopped:
            save_checkpoint(
                self.checkpoint,
                step=step,
                first_loss=self.first_loss,
                parameters=self.parameters,
                optimizer=self.optimizer,
                identity=self.identity,
            )

    def result(self) -> Fitted:
        if not self.best.step:
            return Fitted(self.first_loss, self.loss, self.step, self.steps, None)
        self.best.restore(self.parameters)
        return Fitted(self.first_loss, self.best.train_loss, self.step, self.best.step, self.best.loss)


class Anchors:
    """The retention examples' batches: half a batch each step, in a seeded order of their own."""

    def __init__(self, anchor_set: TrainSet, config: TrainConfig, steps: int) -> None:
        self.anchor_set = anchor_set
        self.order = batch_order(len(anchor_set.examples), max(1, config.batch_size // 2), steps, config.seed + 1)

    def pick(self, step: int) -> tuple[list[Example], list[torch.Tensor], list[frozenset[str]]]:
        return self.anchor_set.pick(self.order[step % len(self.order)])


@torch.no_grad()
def validation_loss(batch_loss: Any, val_set: TrainSet, batch_size: int, device: torch.device) -> float:
    """Mean target-token loss over the validation examples (token-weighted, batch by batch)."""
    total, tokens = 0.0, 0
    for start in range(0, len(val_set.examples), batch_size):
        chunk = list(range(start, min(start + batch_size, len(val_set.examples))))
        n = sum(len(val_set.examples[i].target_ids) for i in chunk)
        total += batch_loss(collate(*val_set.pick(chunk), device)).item() * n
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
