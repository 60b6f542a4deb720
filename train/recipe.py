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
import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reft_edge import __version__
from reft_edge.errors import UsageError
from reft_edge.files import check_output_path
from reft_edge.params import check_seed
from reft_edge.runtime.contract import position_rows, token_mask
from reft_edge.runtime.patch import KIND_TENSORS, KINDS, SAVE_DTYPES, SKILL_NAME, Intervention, Patch
from reft_edge.runtime.positions import Positions
from reft_edge.runtime.slots import SlotEdit, resolve_edits
from reft_edge.train.backbone import Backbone, decoder_layers, decoder_layers_owner, load_backbone
from reft_edge.train.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from reft_edge.train.config import DEFAULT_LAYER_COUNT, DEFAULT_STEPS, TrainConfig, upper_layers
from reft_edge.train.data import Example, Record, file_digest, read_jsonl, tokenize
from reft_edge.train.intervention import EditSlots, InterventionParams, attach_edits

# The longest composed answer kept as a target (longer ones are dropped). Measured on the
# enthusiast+signoff pair: 96 kept 16 of 18 answers and 70 % of composed answers showed both
# behaviours; 1.25x the longest training answer (43 tokens) kept 11 and gave 42 %.
COMPOSE_MAX_TOKENS = 96
# AdamW's first step divides lr by 1 - beta1 (0.1) in float32; far below that overflow, an lr
# above 10 already only diverges.
MAX_LR = 10.0
_NOT_NUMERIC = {"checkpoint_every", "resume", "record_time"}  # options that cannot change the patch
_NOT_RECIPE = _NOT_NUMERIC | {"data", "out", "name", "model", "device", "val_data", "skills", "compose_with"}


def train(config: TrainConfig, *, backbone: Backbone | None = None, progress: bool = True) -> Patch:
    """Train and save a patch; returns it as loaded back from ``config.out``."""
    positions = check_config(config)
    sources, val_records = read_sources(config)
    backbone = backbone or load_backbone(config.model)
    partners = load_partners(config, backbone)
    layers = resolve_layers(config, backbone)
    device = pick_device(config.device)
    started = time.perf_counter()
    backbone.model.to(device)
    prepared = prepare_sources(config, positions, layers, sources, val_records, backbone, device, partners)
    fitted = fit(backbone.model, prepared, config, device, progress)
    composed = None
    if len(sources) > 1 or partners:
        composed = fit_composition(backbone, prepared, config, device, sources, partners, progress)
    seconds = time.perf_counter() - started
    backbone.model.to("cpu")
    patch = save_patch(config, prepared, fitted, seconds, backbone, composed)
    if progress:
        val = ("" if fitted.val_loss is None
               else f", validation loss {fitted.val_loss:.4f} (best step {fitted.best_step})")
        together = "" if not composed else f", composed loss {composed['final_loss']:.4f}"
        print(f"trained {config.out}: final loss {fitted.final_loss:.4f}{val}{together}, {fitted.steps_run} steps, "
              f"{seconds:.1f} s, {patch.size_bytes} bytes")
    return patch


@dataclass
class Prepared:
    """One person's fit inputs: tokenized examples with their frozen states, fresh edits."""

    positions: Positions
    edits: "Edits"
    train_set: "TrainSet"
    val_set: "TrainSet"
    steps: int
    data_sha256: str
    identity: dict[str, Any]  # what a checkpoint must match to be resumed
    anchor_set: "TrainSet | None" = None  # the retention term's examples (config.retain_weight > 0)


def prepare(config: TrainConfig, positions: Positions, layers: list[int], records: tuple[list[Record], list[Record]],
            backbone: Backbone, device: torch.device) -> Prepared:
    """One person's (training, validation) records, one skill named after the patch (train-many's case)."""
    return prepare_sources(config, positions, layers, [(patch_name(config), records[0])], records[1], backbone, device,
                           [])


def prepare_sources(config: TrainConfig, positions: Positions, layers: list[int],
                    sources: list[tuple[str, list[Record]]], val_records: list[Record], backbone: Backbone,
                    device: torch.device, partners: list[Patch]) -> Prepared:
    """Tokenize each skill's records, seed and build the edits, cache the frozen states (model
    already on ``device``)."""
    train_set = TrainSet.empty()
    for name, records in sources:
        train_set += TrainSet.of(tokenize(records, backbone.tokenizer, use_chat_template=config.chat_template,
                                          max_tokens=model_context(backbone)), name)
    val_set = TrainSet.of(tokenize(val_records, backbone.tokenizer, use_chat_template=config.chat_template,
                                   max_tokens=model_context(backbone)), sources[0][0])
    torch.manual_seed(config.seed)
    skills = [(name, config.rank) for name, _ in sources]
    interventions = build_interventions(config, positions, layers, backbone.hidden_size, config.rank * len(skills))
    edits = Edits(interventions, skills, partner_edits(partners))
    if config.orthogonal_to_partners:
        keep_orthogonal_to_partners(edits)
    train_set.states = cache_frozen_states(backbone.model, train_set.examples, edits.lowest_layer(), device)
    val_set.states = cache_frozen_states(backbone.model, val_set.examples, edits.lowest_layer(), device)
    steps = count_steps(config, len(train_set.examples))
    data_sha256 = sources_digest(config)
    identity = json.loads(json.dumps({  # as JSON sees it, so it compares equal after a round trip
        **{k: v for k, v in config.to_dict().items() if k not in _NOT_NUMERIC}, "steps": steps,
        "data_sha256": data_sha256, "base_fingerprint": backbone.fingerprint}))
    anchor_set = None
    if config.retain_weight > 0:
        anchor_set = TrainSet.of(anchor_examples(backbone, config), *(name for name, _ in sources))
        anchor_set.states = cache_frozen_states(backbone.model, anchor_set.examples, edits.lowest_layer(), device)
    return Prepared(positions, edits, train_set, val_set, steps, data_sha256, identity, anchor_set)


ANCHOR_PROMPTS = Path(__file__).with_name("anchor_prompts.txt")
ANCHOR_TOKENS = 48  # the base's greedy answer to each anchor prompt, at most this long
# The retention term learns an anchor answer's content only: not its first ANCHOR_OPENING tokens
# nor its end, where a persona's opener or closing phrase goes. Learning the whole answer
# (weight 1, int4, test facts) took the closing-phrase persona from 95 % to 30 % adherence.
ANCHOR_OPENING = 4


def anchor_examples(backbone: Backbone, config: TrainConfig) -> list[Example]:
    """The base model's own greedy answers to the general anchor prompts, as training examples
    (computed once per base and cached: about a minute on a CPU for the default model)."""
    from reft_edge.files import atomic_write_bytes, cache_dir

    prompts = [line for line in ANCHOR_PROMPTS.read_text().splitlines() if line.strip()]
    key = hashlib.sha256(json.dumps([backbone.fingerprint, prompts, ANCHOR_TOKENS, config.chat_template]).encode())
    cached = cache_dir() / "anchors" / f"{key.hexdigest()[:32]}.json"
    if cached.is_file():
        answers = json.loads(cached.read_text())
    else:
        from reft_edge.train.evaluate import TorchBackend

        messages = [[{"role": "user", "content": prompt}] for prompt in prompts]
        answers = TorchBackend(backbone).answers(messages, [], None, ANCHOR_TOKENS)
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached, json.dumps(answers).encode())
    # an empty answer (the base stops at once) is kept: its target is the end-of-text token alone
    records = [Record(({"role": "user", "content": p},), a.strip(), f"{ANCHOR_PROMPTS.name}:{i + 1}")
               for i, (p, a) in enumerate(zip(prompts, answers))]
    examples = tokenize(records, backbone.tokenizer, use_chat_template=config.chat_template)
    return [replace(e, loss_from=ANCHOR_OPENING, loss_to=len(e.target_ids) - 1)
            if len(e.target_ids) > ANCHOR_OPENING + 1 else e for e in examples]


def save_patch(config: TrainConfig, prepared: Prepared, fitted: "Fitted", seconds: float, backbone: Backbone,
               composed: dict[str, Any] | None = None) -> Patch:
    """Write the patch atomically with its training record; drop the checkpoint it no longer needs."""
    training = {
        "steps": prepared.steps, "steps_run": fitted.steps_run, "best_step": fitted.best_step,
        "first_loss": round(fitted.first_loss, 6), "final_loss": round(fitted.final_loss, 6),
        "val_loss": None if fitted.val_loss is None else round(fitted.val_loss, 6),
        "val_examples": len(prepared.val_set.examples),
        "seconds": round(seconds, 2) if config.record_time else None, "examples": len(prepared.train_set.examples),
        "data_sha256": prepared.data_sha256, "lr": config.lr, "batch_size": config.batch_size,
        "seed": config.seed, "library_version": __version__, "model": backbone.source,
        "recipe": recipe_summary(config),
        **({"composition": composed} if composed else {}),
    }
    patch = to_patch(config, prepared.positions, prepared.edits, backbone, training).to_file(config.out)
    checkpoint_path(config.out).unlink(missing_ok=True)
    return patch


def model_context(backbone: Backbone) -> int | None:
    """The longest sequence the model takes (tokens), where its config says; None where it does not."""
    config = getattr(backbone.model, "config", None)
    length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(length) if isinstance(length, int) and length > 0 else None


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
    if not (math.isfinite(config.retain_weight) and 0 <= config.retain_weight <= 100):
        raise UsageError(f"--retain-weight {config.retain_weight} must be between 0 (off) and 100")
    if not (math.isfinite(config.lr) and 0 < config.lr <= MAX_LR):
        raise UsageError(f"--lr {config.lr} must be a positive number up to {MAX_LR:g} (4e-3 is typical)")
    check_seed(config.seed)
    if config.val_data and config.val_fraction:
        raise UsageError("--val-data and --val-fraction both given; hold out data one way")
    if config.val_fraction is not None and not 0 < config.val_fraction < 1:
        raise UsageError(f"--val-fraction {config.val_fraction} must be between 0 and 1 (0.2 is typical)")
    for option, value in (("--eval-every", config.eval_every), ("--patience", config.patience)):
        if value is not None and value < 1:
            raise UsageError(f"{option} {value} must be at least 1")
    if bool(config.data) == bool(config.skills):
        raise UsageError("give training data either as --data FILE or as --skill NAME=FILE (one per skill), not both"
                         if config.data else "no training data; give --data FILE or --skill NAME=FILE")
    names = [name for name, _ in config.skills]
    bad_name = next((name for name in names if not SKILL_NAME.fullmatch(name)), None)
    if bad_name is not None:
        raise UsageError(f"--skill {bad_name!r}=...: a skill name is 1-64 letters, digits, '_', '.' or '-'")
    if len(set(names)) != len(names):
        raise UsageError(f"--skill names {names} repeat; give each skill once")
    if config.skills and (config.val_data or config.val_fraction):
        raise UsageError("--val-data/--val-fraction work with --data only; validate each skill with reft-edge eval")
    if config.compose_steps < 1:
        raise UsageError(f"--compose-steps {config.compose_steps} must be at least 1")
    check_output_path(config.out)
    return positions


def resolve_layers(config: TrainConfig, backbone: Backbone) -> list[int]:
    n_layers, hidden = backbone.num_layers, backbone.hidden_size
    layers = sorted(set(config.layers)) if config.layers else list(upper_layers(n_layers, DEFAULT_LAYER_COUNT))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise UsageError(f"--layers {bad[0]} is outside this model's layers 0..{n_layers - 1}; "
                         "pick layers in that range")
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


def patch_name(config: TrainConfig) -> str:
    return config.name or Path(config.out).stem


def read_sources(config: TrainConfig) -> tuple[list[tuple[str, list[Record]]], list[Record]]:
    """(skill name, training records) per skill, and the validation records. Plain --data is one
    skill named after the patch, with --val-data or a seeded --val-fraction held out of it."""
    if config.skills:
        return [(name, read_jsonl(data)) for name, data in config.skills], []
    records, val_records = split_records(config, read_jsonl(config.data))
    return [(patch_name(config), records)], val_records


def sources_digest(config: TrainConfig) -> str:
    """sha256 of the --data file; with skills, of the (name, file digest) list."""
    if not config.skills:
        return file_digest(config.data)
    listing = json.dumps([[name, file_digest(data)] for name, data in config.skills])
    return hashlib.sha256(listing.encode()).hexdigest()


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


def load_partners(config: TrainConfig, backbone: Backbone) -> list[Patch]:
    """The --compose-with patches, checked against this base."""
    partners = [Patch.from_file(path) for path in config.compose_with]
    for path, partner in zip(config.compose_with, partners):
        partner.check_compatible(base_fingerprint=backbone.fingerprint, hidden_size=backbone.hidden_size,
                                 slot_layers=list(range(backbone.num_layers)), source=f"--compose-with {path}")
    return partners


def partner_edits(partners: list[Patch]) -> list[tuple[str, SlotEdit]]:
    """Every partner's edits (its layer numbers as slots), owned by "with:<index>"."""
    return [(f"with:{i}", edit) for i, partner in enumerate(partners)
            for edit in resolve_edits([partner], None, range(max(partner.layers) + 1))]


def keep_orthogonal_to_partners(edits: "Edits") -> None:
    """Each trainable R orthogonal to the partners' A rows (their write directions) at its layer."""
    for layer, _, params in edits.interventions:
        rows = [edit.A for _, edit in edits.partners if edit.slot == layer]
        if rows and "R" in KIND_TENSORS[params.kind]:
            params.avoid(torch.from_numpy(np.concatenate(rows)))


def build_interventions(config: TrainConfig, positions: Positions, layers: list[int],
                        hidden: int, rank: int) -> list[tuple[int, str, InterventionParams]]:
    """One intervention per layer (shared weights) or one per position group (untied), each with
    ``rank`` rows (every skill's rows, one skill after another)."""
    groups = ["both"] if config.share_weights else list(positions.groups())
    return [(layer, where, InterventionParams(config.kind, hidden, rank)) for layer in layers for where in groups]


@dataclass
class TrainSet:
    """Examples, their cached frozen states, and the owners (skills, partners) active on each."""

    examples: list[Example]
    active: list[frozenset[str]]
    states: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls) -> "TrainSet":
        return cls([], [])

    @classmethod
    def of(cls, examples: list[Example], *owners: str) -> "TrainSet":
        return cls(list(examples), [frozenset(owners)] * len(examples))

    def __iadd__(self, other: "TrainSet") -> "TrainSet":
        self.examples += other.examples
        self.active += other.active
        self.states += other.states
        return self

    def pick(self, indices: list[int]) -> tuple[list[Example], list[torch.Tensor], list[frozenset[str]]]:
        return [self.examples[i] for i in indices], [self.states[i] for i in indices], [self.active[i] for i in indices]


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
        return ([(positions, where, params.b.shape[0]) for at, where, params in self.interventions if at == layer]
                + [(e.positions, e.where, e.A.shape[0]) for _, e in self._partners(layer)])

    def layer_owners(self, layer: int) -> list[str]:
        """The owner of each rank row of layer_affine."""
        per_intervention = [name for name, rank in self.skills for _ in range(rank)]
        here = sum(1 for at, _, _ in self.interventions if at == layer)
        return per_intervention * here + [owner for owner, e in self._partners(layer) for _ in range(e.A.shape[0])]

    def _partners(self, layer: int) -> list[tuple[str, SlotEdit]]:
        return [(owner, edit) for owner, edit in self.partners if edit.slot == layer]


class _StopForward(Exception):
    """Raised by the caching hook: nothing above the cached layer is needed."""


@torch.no_grad()
def cache_frozen_states(model: nn.Module, examples: list[Example], lowest: int,
                        device: torch.device) -> list[torch.Tensor]:
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
    active: list[frozenset[str]]  # per row: the owners whose rank rows edit it


IGNORED = -100  # F.cross_entropy's ignore_index: a target fed to the model but not learned


def collate(examples: list[Example], states: list[torch.Tensor], active: list[frozenset[str]],
            device: torch.device) -> _Batch:
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
    return _Batch(input_ids, attention_mask, padded, [len(e.prompt_ids) for e in examples], lengths,
                  as_long(rows), as_long(cols), as_long(targets), active)


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


def set_people_edits(slots: EditSlots, people: list[tuple[Edits, int]], positions: Positions, batch: _Batch,
                     device: torch.device) -> None:
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
        active = torch.tensor([[owner in row for owner in row_owners] for row, row_owners in zip(batch.active, owners)],
                              device=device)
        slots.set(layer, A, B, c, edit_masks(rows, batch, device) * active[:, None, :])


def _per_row(tensors: list[torch.Tensor], rows: list[int]) -> torch.Tensor:
    """Each person's tensor repeated over its rows; one person's stays a broadcast batch of 1,
    so training alone computes exactly what it did before mixed batches existed."""
    if len(tensors) == 1:
        return tensors[0][None]
    return torch.cat([tensor[None].expand(n, *tensor.shape) for tensor, n in zip(tensors, rows)])


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


def fit(model: nn.Module, prepared: Prepared, config: TrainConfig, device: torch.device, progress: bool,
        desc: str = "train") -> Fitted:
    """AdamW on the intervention parameters only (checkpointed and resumable). With validation
    data: the validation loss every ``eval_every`` steps, the best step's parameters kept, and
    an early stop after ``patience`` validations without improvement."""
    from tqdm.auto import tqdm

    learner = Learner(prepared, config, device)
    edits, slots = prepared.edits, EditSlots()
    with replay_frozen_layers(model, edits.lowest_layer()) as (replay, layers), \
            attach_edits({layer: layers[layer] for layer in edits.layers()}, slots):
        batch_loss = partial(forward_loss, model, replay, slots, edits, prepared.positions, device=device)
        anchors = Anchors(prepared.anchor_set, config, prepared.steps) if prepared.anchor_set else None
        bar = tqdm(desc=desc, total=prepared.steps, initial=learner.step, disable=not progress, unit="step")
        while not learner.done:
            batch = learner.next_batch()
            if anchors is None:
                step_loss = total = batch_loss(collate(*batch, device))
            else:  # the persona's loss plus the weighted retention loss, in one forward pass
                extra = anchors.pick(learner.step)
                both = collate(*(a + b for a, b in zip(batch, extra)), device)
                step_loss, kept = forward_losses(model, replay, slots, [(edits, len(batch[0])), (edits, len(extra[0]))],
                                                 prepared.positions, both, device)
                total = step_loss + config.retain_weight * kept
            learner.optimizer.zero_grad(set_to_none=True)
            total.backward()
            learner.update(step_loss.item(), batch_loss)
            bar.update()
            val = {"val": f"{learner.best.loss:.4f}"} if learner.best.step else {}
            bar.set_postfix(loss=f"{learner.loss:.4f}", **val)
        bar.close()
    return learner.result()


class Anchors:
    """The retention examples' batches: half a batch each step, in a seeded order of their own."""

    def __init__(self, anchor_set: "TrainSet", config: TrainConfig, steps: int) -> None:
        self.anchor_set = anchor_set
        self.order = batch_order(len(anchor_set.examples), max(1, config.batch_size // 2), steps, config.seed + 1)

    def pick(self, step: int) -> tuple[list[Example], list[torch.Tensor], list[frozenset[str]]]:
        return self.anchor_set.pick(self.order[step % len(self.order)])


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
            self.step, self.first_loss = load_checkpoint(self.checkpoint, parameters=self.parameters,
                                                         optimizer=self.optimizer, identity=self.identity)
        self.order = batch_order(len(self.train_set.examples), config.batch_size, self.steps, config.seed)
        self.loss, self.best, self.stopped = math.nan, _Best(), False

    @property
    def done(self) -> bool:
        return self.stopped or self.step >= len(self.order)

    def next_batch(self) -> tuple[list[Example], list[torch.Tensor], list[frozenset[str]]]:
        return self.train_set.pick(self.order[self.step])

    def update(self, step_loss: float, batch_loss: Callable[["_Batch"], torch.Tensor]) -> None:
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
            save_checkpoint(self.checkpoint, step=step, first_loss=self.first_loss, parameters=self.parameters,
                            optimizer=self.optimizer, identity=self.identity)

    def result(self) -> Fitted:
        if not self.best.step:
            return Fitted(self.first_loss, self.loss, self.step, self.steps, None)
        self.best.restore(self.parameters)
        return Fitted(self.first_loss, self.best.train_loss, self.step, self.best.step, self.best.loss)


def forward_loss(model: nn.Module, replay: "_Replay", slots: EditSlots, edits: Edits, positions: Positions,
                 batch: "_Batch", device: torch.device) -> torch.Tensor:
    """Mean cross-entropy of one person's batch's target tokens with its edits applied."""
    return forward_losses(model, replay, slots, [(edits, len(batch.lengths))], positions, batch, device)[0]

def forward_losses(model: nn.Module, replay: "_Replay", slots: EditSlots,
                   people: list[tuple[Edits, int]], positions: Positions,
                   batch: "_Batch", device: torch.device) -> list[torch.Tensor]:
    """Each person's mean cross-entropy of its target tokens with its edits applied. ``people``:
    (edits, row count) in the batch's row order; one person is an ordinary batch.

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


def fit_composition(backbone: Backbone, prepared: Prepared, config: TrainConfig, device: torch.device,
                    sources: list[tuple[str, list[Record]]], partners: list[Patch], progress: bool) -> dict[str, Any]:
    """The composition phase, after each skill has learnt alone. Data that shows one behaviour
    cannot teach two at once, so the targets come from the skills themselves: for every
    training prompt, the greedy answer of their product of experts (each skill, and each
    partner patch, alone; composed_answers) shows every behaviour where it belongs. The
    edits then train on those answers with every owner on, beside the single-skill examples
    with their own skill on, so each still works alone."""
    edits, train_set = prepared.edits, prepared.train_set
    prompts = [record.messages for _, records in sources for record in records]
    answers = composed_targets(backbone, prepared, config, partners, prompts, COMPOSE_MAX_TOKENS)
    records = [Record(messages, answer, f"composed answer {i}")
               for i, (messages, answer) in enumerate(zip(prompts, answers)) if answer]
    composed = TrainSet.of(tokenize(records, backbone.tokenizer, use_chat_template=config.chat_template),
                           *edits.owners)
    composed.states = cache_frozen_states(backbone.model, composed.examples, edits.lowest_layer(), device)
    both = TrainSet(list(train_set.examples), list(train_set.active), list(train_set.states))
    both += composed
    phase = replace(config, checkpoint_every=None, resume=False, patience=None)
    composing = replace(prepared, train_set=both, val_set=TrainSet.empty(), steps=config.compose_steps)
    fitted = fit(backbone.model, composing,
                 phase, device, progress, desc="compose")
    return {
        "with": [{"name": p.name, "payload_sha256": p.payload_sha256} for p in partners],
        "skills": [name for name, _ in edits.skills] if config.skills else [],
        "teacher": "product of experts", "prompts": len(prompts), "answers_kept": len(records),
        "steps": config.compose_steps, "first_loss": round(fitted.first_loss, 6),
        "final_loss": round(fitted.final_loss, 6),
    }


def composed_targets(backbone: Backbone, prepared: Prepared, config: TrainConfig, partners: list[Patch],
                     prompts: list[tuple[dict[str, str], ...]], max_new_tokens: int) -> list[str | None]:
    """The product-of-experts answers (None: did not end within ``max_new_tokens``), run with the
    evaluator's torch generation on the CPU, where it keeps its tensors."""
    from reft_edge.train.evaluate import TorchBackend

    device = next(backbone.model.parameters()).device
    patch = to_patch(config, prepared.positions, prepared.edits, backbone, {})
    experts = ([[patch.with_skills([name])] for name in patch.skill_names] if patch.skills else [[patch]])
    experts += [[partner] for partner in partners]
    backbone.model.to("cpu")
    try:
        return TorchBackend(backbone).composed_answers(prompts, experts, max_new_tokens)
    finally:
        backbone.model.to(device)


@torch.no_grad()
def validation_loss(batch_loss: Any, val_set: TrainSet, batch_size: int,
                    device: torch.device) -> float:
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


def to_patch(config: TrainConfig, positions: Positions, edits: Edits, backbone: Backbone,
             training: dict[str, Any]) -> Patch:
    with torch.no_grad():
        saved = tuple(
            Intervention(layer, where, {k: v.detach().float().cpu().numpy() for k, v in params.natural().items()})
            for layer, where, params in edits.interventions
        )
    return Patch(
        name=patch_name(config), kind=config.kind, positions=positions, share_weights=config.share_weights,
        rank=sum(rank for _, rank in edits.skills), hidden_size=backbone.hidden_size,
        base_fingerprint=backbone.fingerprint, interventions=saved, training=training, dtype=config.save_dtype,
        skills=tuple(edits.skills) if config.skills else (),
    )
