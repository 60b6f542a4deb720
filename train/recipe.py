"""Train one person's patch: a LoReFT edit at a few layers and prompt positions of a frozen LM.

Example (the CLI ``reft-edge train`` calls exactly this)::

    from reft_edge.train import TrainConfig, train
    patch = train(TrainConfig(data="examples/emoji/train.jsonl", out="emoji.reft",
                              layers=(15,), rank=4, positions="f2+l2", steps=60, batch_size=12))
    print(patch.training["final_loss"], patch.size_bytes)

The story, top to bottom: check the config, read the data, load the backbone, tokenize,
cache the frozen states below the lowest edited layer (they never change), fit the
edit with AdamW, with several skills or partner patches fit them together on answers
where each step is led by one of them (``fit_composition``), save the patch atomically.
The parts it is built from (the training set, the edits, the frozen-layer replay, the
loss, one person's ``Learner``) are in reft_edge.train.fitting.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reft_edge import __version__
from reft_edge.errors import UsageError
from reft_edge.files import check_output_path
from reft_edge.params import check_seed
from reft_edge.runtime.patch import KIND_TENSORS, KINDS, SAVE_DTYPES, SKILL_NAME, Intervention, Patch
from reft_edge.runtime.positions import Positions
from reft_edge.runtime.slots import SlotEdit, resolve_edits
from reft_edge.train.backbone import Backbone, load_backbone
from reft_edge.train.checkpoint import checkpoint_path
from reft_edge.train.config import DEFAULT_LAYER_COUNT, DEFAULT_STEPS, TrainConfig, upper_layers
from reft_edge.train.data import Example, Record, file_digest, read_jsonl, tokenize
from reft_edge.train.fitting import (
    Anchors,
    Edits,
    FitContext,
    Fitted,
    Learner,
    Prepared,
    TrainSet,
    build_interventions,
    cache_frozen_states,
    collate,
    forward_loss,
    forward_losses,
    replay_frozen_layers,
)
from reft_edge.train.intervention import EditSlots, attach_edits

# The longest composed answer kept as a target (longer ones are dropped). Measured on the
# enthusiast+signoff pair: 96 kept 16 of 18 answers and 70 % of composed answers showed both
# behaviours; 1.25x the longest training answer (43 tokens) kept 11 and gave 42 %.
COMPOSE_MAX_TOKENS = 96
# The composition teacher (train.evaluate.leading_expert, chosen by the measurements recorded there),
# as the patch's training record names it.
COMPOSE_TEACHER = "leading expert"
# AdamW's first step divides lr by 1 - beta1 (0.1) in float32; far below that overflow, an lr
# above 10 already only diverges.
MAX_LR = 10.0
_NOT_NUMERIC = {"checkpoint_every", "resume", "record_time"}  # options that cannot change the patch
_NOT_RECIPE = _NOT_NUMERIC | {"data", "out", "name", "model", "device", "val_data", "skills", "compose_with"}


def train(config: TrainConfig, *, backbone: Backbone | None = None, progress: bool = True) -> Patch:
    """Train and save a patch; returns it as loaded back from ``config.out``."""
    positions = check_config(config)
    sources = read_sources(config)
    backbone = backbone or load_backbone(config.model)
    sources = replace(sources, partners=load_partners(config, backbone))
    layers = resolve_layers(config, backbone)
    device = pick_device(config.device)
    started = time.perf_counter()
    backbone.model.to(device)
    prepared = prepare_sources(config, positions, layers, sources, backbone, device)
    fitted = fit(backbone.model, prepared, config, device, progress)
    composed = None
    if len(sources.skills) > 1 or sources.partners:
        composed = fit_composition(backbone, prepared, config, device, sources, progress)
    seconds = time.perf_counter() - started
    backbone.model.to("cpu")
    patch = save_patch(config, prepared, fitted, seconds, backbone, composed)
    if progress:
        val = (
            "" if fitted.val_loss is None else f", validation loss {fitted.val_loss:.4f} (best step {fitted.best_step})"
        )
        together = "" if not composed else f", composed loss {composed['final_loss']:.4f}"
        print(
            f"trained {config.out}: final loss {fitted.final_loss:.4f}{val}{together}, {fitted.steps_run} steps, "
            f"{seconds:.1f} s, {patch.size_bytes} bytes"
        )
    return patch


# -- checks that need no model ---------------------------------------------------------------------


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
    for option, value in (
        ("--steps", config.steps),
        ("--epochs", config.epochs),
        ("--batch-size", config.batch_size),
        ("--checkpoint-every", config.checkpoint_every),
    ):
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
        raise UsageError(
            "give training data either as --data FILE or as --skill NAME=FILE (one per skill), not both"
            if config.data
            else "no training data; give --data FILE or --skill NAME=FILE"
        )
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
        raise UsageError(
            f"--layers {bad[0]} is outside this model's layers 0..{n_layers - 1}; pick layers in that range"
        )
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


# -- the data and the partners ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """What one patch learns from and beside: each skill's training records, the validation
    records, and the partner patches (--compose-with) it must also work beside."""

    skills: list[tuple[str, list[Record]]]  # (skill name, training records) per skill
    val_records: list[Record]
    partners: list[Patch] = field(default_factory=list)


def read_sources(config: TrainConfig) -> Sources:
    """Each skill's records and the validation records (the partners load with the backbone,
    load_partners). Plain --data is one skill named after the patch, with --val-data or a seeded
    --val-fraction held out of it."""
    if config.skills:
        return Sources([(name, read_jsonl(data)) for name, data in config.skills], [])
    records, val_records = split_records(config, read_jsonl(config.data))
    return Sources([(patch_name(config), records)], val_records)


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
        raise UsageError(
            f"--val-fraction {config.val_fraction} leaves no training example of {len(records)}; "
            "use a smaller fraction or more data"
        )
    held = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed))[:n_val].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def load_partners(config: TrainConfig, backbone: Backbone) -> list[Patch]:
    """The --compose-with patches, checked against this base."""
    partners = [Patch.from_file(path) for path in config.compose_with]
    for path, partner in zip(config.compose_with, partners):
        partner.check_compatible(
            base_fingerprint=backbone.fingerprint,
            hidden_size=backbone.hidden_size,
            slot_layers=list(range(backbone.num_layers)),
            source=f"--compose-with {path}",
        )
    return partners


def partner_edits(partners: list[Patch]) -> list[tuple[str, SlotEdit]]:
    """Every partner's edits (its layer numbers as slots), owned by "with:<index>"."""
    return [
        (f"with:{i}", edit)
        for i, partner in enumerate(partners)
        for edit in resolve_edits([partner], None, range(max(partner.layers) + 1))
    ]


def keep_orthogonal_to_partners(edits: Edits) -> None:
    """Each trainable R orthogonal to the partners' A rows (their write directions) at its layer."""
    for layer, _, params in edits.interventions:
        rows = [edit.A for _, edit in edits.partners if edit.slot == layer]
        if rows and "R" in KIND_TENSORS[params.kind]:
            params.avoid(torch.from_numpy(np.concatenate(rows)))


# -- preparing: tokens, edits, frozen states -------------------------------------------------------


def prepare(
    config: TrainConfig,
    positions: Positions,
    layers: list[int],
    records: tuple[list[Record], list[Record]],
    backbone: Backbone,
    device: torch.device,
) -> Prepared:
    """One person's (training, validation) records, one skill named after the patch (train-many's case)."""
    return prepare_sources(
        config, positions, layers, Sources([(patch_name(config), records[0])], records[1]), backbone, device
    )


def prepare_sources(
    config: TrainConfig,
    positions: Positions,
    layers: list[int],
    sources: Sources,
    backbone: Backbone,
    device: torch.device,
) -> Prepared:
    """Tokenize each skill's records, seed and build the edits, cache the frozen states (model
    already on ``device``)."""
    train_set = TrainSet.empty()
    for name, records in sources.skills:
        train_set += TrainSet.of(
            tokenize(
                records, backbone.tokenizer, use_chat_template=config.chat_template, max_tokens=model_context(backbone)
            ),
            name,
        )
    val_set = TrainSet.of(
        tokenize(
            sources.val_records,
            backbone.tokenizer,
            use_chat_template=config.chat_template,
            max_tokens=model_context(backbone),
        ),
        sources.skills[0][0],
    )
    torch.manual_seed(config.seed)
    skills = [(name, config.rank) for name, _ in sources.skills]
    interventions = build_interventions(config, positions, layers, backbone.hidden_size, config.rank * len(skills))
    edits = Edits(interventions, skills, partner_edits(sources.partners))
    if config.orthogonal_to_partners:
        keep_orthogonal_to_partners(edits)
    train_set.states = cache_frozen_states(backbone.model, train_set.examples, edits.lowest_layer(), device)
    val_set.states = cache_frozen_states(backbone.model, val_set.examples, edits.lowest_layer(), device)
    steps = count_steps(config, len(train_set.examples))
    data_sha256 = sources_digest(config)
    identity = json.loads(
        json.dumps(
            {  # as JSON sees it, so it compares equal after a round trip
                **{k: v for k, v in config.to_dict().items() if k not in _NOT_NUMERIC},
                "steps": steps,
                "data_sha256": data_sha256,
                "base_fingerprint": backbone.fingerprint,
            }
        )
    )
    anchor_set = None
    if config.retain_weight > 0:
        anchor_set = TrainSet.of(anchor_examples(backbone, config), *(name for name, _ in sources.skills))
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
    records = [
        Record(({"role": "user", "content": p},), a.strip(), f"{ANCHOR_PROMPTS.name}:{i + 1}")
        for i, (p, a) in enumerate(zip(prompts, answers))
    ]
    examples = tokenize(records, backbone.tokenizer, use_chat_template=config.chat_template)
    return [
        replace(e, loss_from=ANCHOR_OPENING, loss_to=len(e.target_ids) - 1)
        if len(e.target_ids) > ANCHOR_OPENING + 1
        else e
        for e in examples
    ]


def model_context(backbone: Backbone) -> int | None:
    """The longest sequence the model takes (tokens), where its config says; None where it does not."""
    config = getattr(backbone.model, "config", None)
    length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(length) if isinstance(length, int) and length > 0 else None


# -- fitting ---------------------------------------------------------------------------------------


def fit(
    model: nn.Module, prepared: Prepared, config: TrainConfig, device: torch.device, progress: bool, desc: str = "train"
) -> Fitted:
    """AdamW on the intervention parameters only (checkpointed and resumable). With validation
    data: the validation loss every ``eval_every`` steps, the best step's parameters kept, and
    an early stop after ``patience`` validations without improvement."""
    from tqdm.auto import tqdm

    learner = Learner(prepared, config, device)
    edits, slots = prepared.edits, EditSlots()
    with (
        replay_frozen_layers(model, edits.lowest_layer()) as (replay, layers),
        attach_edits({layer: layers[layer] for layer in edits.layers()}, slots),
    ):
        context = FitContext(model, replay, slots, prepared.positions, device)
        batch_loss = partial(forward_loss, context, edits)
        anchors = Anchors(prepared.anchor_set, config, prepared.steps) if prepared.anchor_set else None
        bar = tqdm(desc=desc, total=prepared.steps, initial=learner.step, disable=not progress, unit="step")
        while not learner.done:
            batch = learner.next_batch()
            if anchors is None:
                step_loss = total = batch_loss(collate(*batch, device))
            else:  # the persona's loss plus the weighted retention loss, in one forward pass
                extra = anchors.pick(learner.step)
                both = collate(*(a + b for a, b in zip(batch, extra)), device)
                step_loss, kept = forward_losses(context, [(edits, len(batch[0])), (edits, len(extra[0]))], both)
                total = step_loss + config.retain_weight * kept
            learner.optimizer.zero_grad(set_to_none=True)
            total.backward()
            learner.update(step_loss.item(), batch_loss)
            bar.update()
            val = {"val": f"{learner.best.loss:.4f}"} if learner.best.step else {}
            bar.set_postfix(loss=f"{learner.loss:.4f}", **val)
        bar.close()
    return learner.result()


def fit_composition(
    backbone: Backbone, prepared: Prepared, config: TrainConfig, device: torch.device, sources: Sources, progress: bool
) -> dict[str, Any]:
    """The composition phase, after each skill has learnt alone. Data that shows one behaviour
    cannot teach two at once, so the targets come from the skills themselves: for every
    training prompt, a greedy answer whose every token comes from the skill or partner patch
    that departs most from the base there (composed_answers, train.evaluate.leading_expert)
    shows every behaviour where it belongs. The
    edits then train on those answers with every owner on, beside the single-skill examples
    with their own skill on, so each still works alone."""
    edits, train_set, partners = prepared.edits, prepared.train_set, sources.partners
    prompts = [record.messages for _, records in sources.skills for record in records]
    answers = composed_targets(backbone, prepared, config, partners, prompts, COMPOSE_MAX_TOKENS)
    records = [
        Record(messages, answer, f"composed answer {i}")
        for i, (messages, answer) in enumerate(zip(prompts, answers))
        if answer
    ]
    composed = TrainSet.of(tokenize(records, backbone.tokenizer, use_chat_template=config.chat_template), *edits.owners)
    composed.states = cache_frozen_states(backbone.model, composed.examples, edits.lowest_layer(), device)
    both = TrainSet(list(train_set.examples), list(train_set.active), list(train_set.states))
    both += composed
    phase = replace(config, checkpoint_every=None, resume=False, patience=None)
    composing = replace(prepared, train_set=both, val_set=TrainSet.empty(), steps=config.compose_steps)
    fitted = fit(backbone.model, composing, phase, device, progress, desc="compose")
    return {
        "with": [{"name": p.name, "payload_sha256": p.payload_sha256} for p in partners],
        "skills": [name for name, _ in edits.skills] if config.skills else [],
        "teacher": COMPOSE_TEACHER,
        "prompts": len(prompts),
        "answers_kept": len(records),
        "steps": config.compose_steps,
        "first_loss": round(fitted.first_loss, 6),
        "final_loss": round(fitted.final_loss, 6),
    }


def composed_targets(
    backbone: Backbone,
    prepared: Prepared,
    config: TrainConfig,
    partners: list[Patch],
    prompts: list[tuple[dict[str, str], ...]],
    max_new_tokens: int,
) -> list[str | None]:
    """The composition teacher's answers (None: did not end within ``max_new_tokens``), run with the
    evaluator's torch generation on the CPU, where it keeps its tensors."""
    from reft_edge.train.evaluate import TorchBackend

    device = next(backbone.model.parameters()).device
    patch = to_patch(config, prepared.positions, prepared.edits, backbone, {})
    experts = [[patch.with_skills([name])] for name in patch.skill_names] if patch.skills else [[patch]]
    experts += [[partner] for partner in partners]
    backbone.model.to("cpu")
    try:
        return TorchBackend(backbone).composed_answers(prompts, experts, max_new_tokens)
    finally:
        backbone.model.to(device)


# -- the patch -------------------------------------------------------------------------------------


def save_patch(
    config: TrainConfig,
    prepared: Prepared,
    fitted: Fitted,
    seconds: float,
    backbone: Backbone,
    composed: dict[str, Any] | None = None,
) -> Patch:
    """Write the patch atomically with its training record; drop the checkpoint it no longer needs."""
    training = {
        "steps": prepared.steps,
        "steps_run": fitted.steps_run,
        "best_step": fitted.best_step,
        "first_loss": round(fitted.first_loss, 6),
        "final_loss": round(fitted.final_loss, 6),
        "val_loss": None if fitted.val_loss is None else round(fitted.val_loss, 6),
        "val_examples": len(prepared.val_set.examples),
        "seconds": round(seconds, 2) if config.record_time else None,
        "examples": len(prepared.train_set.examples),
        "data_sha256": prepared.data_sha256,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "library_version": __version__,
        "model": backbone.source,
        "recipe": recipe_summary(config),
        **({"composition": composed} if composed else {}),
    }
    patch = to_patch(config, prepared.positions, prepared.edits, backbone, training).to_file(config.out)
    checkpoint_path(config.out).unlink(missing_ok=True)
    return patch


def recipe_summary(config: TrainConfig) -> dict[str, Any]:
    """The options that decide a patch besides its data and base, as JSON sees them."""
    chosen = {k: v for k, v in config.to_dict().items() if k not in _NOT_RECIPE}
    return json.loads(json.dumps(chosen))


def to_patch(
    config: TrainConfig, positions: Positions, edits: Edits, backbone: Backbone, training: dict[str, Any]
) -> Patch:
    with torch.no_grad():
        saved = tuple(
            Intervention(layer, where, {k: v.detach().float().cpu().numpy() for k, v in params.natural().items()})
            for layer, where, params in edits.interventions
        )
    return Patch(
        name=patch_name(config),
        kind=config.kind,
        positions=positions,
        share_weights=config.share_weights,
        rank=sum(rank for _, rank in edits.skills),
        hidden_size=backbone.hidden_size,
        base_fingerprint=backbone.fingerprint,
        interventions=saved,
        training=training,
        dtype=config.save_dtype,
        skills=tuple(edits.skills) if config.skills else (),
    )
