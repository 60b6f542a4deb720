"""Train many people's patches in one job: one backbone, mixed batches, people sharded over ranks.

Example (the CLI ``reft-edge train-many`` calls exactly this)::

    from reft_edge.train.config import ManyConfig
    from reft_edge.train.many import train_many
    for result in train_many(ManyConfig(jobs="jobs.jsonl", out_dir="patches", defaults={"steps": 30})):
        print(result.id, result.status, result.file)

Scaled out, each rank trains every ``world_size``-th person (person i on rank i % world_size)::

    torchrun --nproc-per-node 2 -m reft_edge.train.many --jobs jobs.jsonl --out-dir patches

``jobs.jsonl`` holds one person per line, ``{"id": "alice", "data": "alice.jsonl"}`` plus any
TrainConfig option for that person only (``"val_data"``, ``"steps"``, ``"seed"``, ...); paths
are relative to the jobs file. The job's own options (``ManyConfig.defaults``) apply to everyone
else. Steps, top to bottom: read and check every job line, load the backbone once and check each
line's layers against it (a bad line fails the whole job before any training), skip people whose
finished patch matches, group people
by recipe, and per group prepare each person (data, tokens, frozen states: a bad data file fails
that person only) and train them together in mixed batches, writing each patch the moment its
person stops; gather the results on rank 0, which writes ``summary.json`` and prints the table.

Each person keeps its own AdamW, seeded batch order, validation and early stopping
(``fitting.Learner``), and its loss is the mean over its own target tokens, so one backward pass
of the summed losses gives every person exactly its own gradient. docs/train-many.md says how
close the patches come to ``reft-edge train``'s bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from reft_edge.errors import PatchError, ReftEdgeError, UsageError
from reft_edge.files import atomic_write_bytes, check_output_path
from reft_edge.runtime.patch import Patch
from reft_edge.runtime.positions import Positions
from reft_edge.train.backbone import Backbone, load_backbone
from reft_edge.train.config import ManyConfig, TrainConfig
from reft_edge.train.data import Record, file_digest, read_jsonl
from reft_edge.train.fitting import (
    FitContext,
    Learner,
    Prepared,
    collate,
    forward_loss,
    forward_losses,
    replay_frozen_layers,
)
from reft_edge.train.intervention import EditSlots, attach_edits
from reft_edge.train.recipe import (
    check_config,
    count_steps,
    pick_device,
    prepare,
    recipe_summary,
    resolve_layers,
    save_patch,
    split_records,
)

SUMMARY_FILE = "summary.json"
_JOB_WIDE = {  # TrainConfig fields a job line may not set, and why
    "out": "the patch is always <out-dir>/<id>.reft",
    "model": "the job loads one backbone for everyone; pass --model",
    "device": "the job runs on one device; pass --device",
    "resume": "finished people are skipped and unfinished ones start again by themselves",
    "checkpoint_every": "unfinished people start again from their first step",
    "skills": "a person is one skill here; train a patch of several skills with reft-edge train --skill",
    "compose_with": "a shared partner (a house style) is the job's: pass train-many --compose-with",
}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_EXAMPLE = '{"id": "alice", "data": "alice.jsonl"}'


@dataclass(frozen=True)
class Job:
    """One checked job line: a person and the TrainConfig that trains them alone."""

    index: int  # position among the job lines; decides the rank
    id: str
    where: str  # jobs.jsonl:LINE
    config: TrainConfig
    positions: Positions


@dataclass(frozen=True)
class Result:
    """How one person went: trained, skipped (a matching patch was already there) or failed."""

    id: str
    status: str
    file: str | None
    steps: int | None = None  # steps run
    final_loss: float | None = None
    val_loss: float | None = None
    message: str = ""  # why it failed
    rank: int = 0  # the torchrun rank that handled this person

    @classmethod
    def from_patch(cls, job: Job, patch: Patch, status: str) -> Result:
        training = patch.training
        return cls(
            job.id,
            status,
            job.config.out,
            training.get("steps_run"),
            training.get("final_loss"),
            training.get("val_loss"),
        )


def train_many(config: ManyConfig, *, progress: bool = True) -> list[Result]:
    """Train every job's person (this rank's share under torchrun); returns everyone's results."""
    if config.max_rows < 1:
        raise UsageError(f"--max-rows {config.max_rows} must be at least 1")
    check_output_path(config.out_dir, "--out-dir", folder=True)  # before any work starts
    with made_dir(Path(config.out_dir)):  # removed again, if still empty, when the job fails
        jobs = read_jobs(config)  # every rank reads every line, so a bad line stops all ranks alike
        return train_jobs(config, jobs, progress)


@contextlib.contextmanager
def made_dir(path: Path) -> Iterator[None]:
    """Create ``path`` for the job; remove it again if the job fails and left nothing in it."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out-dir {path}: cannot create it ({exc.strerror}); choose another --out-dir") from None
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only an empty folder: a failed job leaves no trace, a partial one keeps its patches
        raise


def train_jobs(config: ManyConfig, jobs: list[Job], progress: bool) -> list[Result]:
    world = World.start(config.device)
    try:
        backbone = load_backbone(config.model)
        layers = {job.id: job_layers(job, backbone) for job in jobs}
        device = pick_device(config.device)
        backbone.model.to(device)
        mine = [job for job in jobs if job.index % world.size == world.rank]
        results = run_jobs(mine, layers, backbone, device, config.max_rows, progress and world.rank == 0)
        backbone.model.to("cpu")
        everyone = world.gather(results)
    finally:
        world.stop()
    order = {job.id: job.index for job in jobs}
    everyone.sort(key=lambda result: order[result.id])
    if world.rank == 0:
        write_summary(config, everyone, world.size)
        if progress:
            print(summary_table(everyone))
    return everyone


# -- the jobs file --------------------------------------------------------------------------------


def read_jobs(config: ManyConfig) -> list[Job]:
    path = Path(config.jobs)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the jobs file ({exc.strerror}); check the --jobs path") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8; save the jobs file as UTF-8") from None
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{path}:{number}"
            try:
                jobs.append(parse_job(line, len(jobs), where, config, path.parent, seen))
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
    if not jobs:
        raise UsageError(f"{path}: no jobs; write one JSON object per person, e.g. {_EXAMPLE}")
    return jobs


def parse_job(line: str, index: int, where: str, config: ManyConfig, folder: Path, seen: dict[str, str]) -> Job:
    """One line -> Job; raises UsageError naming the problem (the caller adds file:line)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"not JSON ({exc.msg}); write one object per line, e.g. {_EXAMPLE}") from None
    if not isinstance(value, dict):
        raise UsageError(f"a JSON {type(value).__name__}, not an object; write e.g. {_EXAMPLE}")
    person = value.pop("id", None)
    if not isinstance(person, str) or not _ID.fullmatch(person):
        raise UsageError(
            f"'id' {json.dumps(person)} is missing or not a file-name-safe name; use letters, digits, "
            "'.', '_' and '-' (it names <id>.reft)"
        )
    if person in seen:
        raise UsageError(f"id {person!r} is also at {seen[person]}; give each person their own id")
    seen[person] = where
    if not isinstance(value.get("data"), str):
        raise UsageError(f"'data' (the person's JSONL file) is missing or not a string; e.g. {_EXAMPLE}")
    for key in sorted(value.keys() & _JOB_WIDE.keys()):
        raise UsageError(f"'{key}' cannot be set per person: {_JOB_WIDE[key]}")
    check_types(value)
    for key in ("data", "val_data"):
        if isinstance(value.get(key), str):
            value[key] = str(folder / value[key])  # an absolute path stays as it is
    options = {
        **config.defaults,
        **value,
        "out": str(Path(config.out_dir) / f"{person}.reft"),
        "model": config.model,
        "device": config.device,
        "compose_with": config.compose_with,
    }
    train_config = TrainConfig.from_dict(options)
    return Job(index, person, where, train_config, check_config(train_config))


def check_types(values: dict[str, Any]) -> None:
    """Each known TrainConfig option has a value of its declared type (JSON numbers, strings, ...)."""
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        if key in hints and not any(_is_a(value, kind) for kind in typing.get_args(hints[key]) or (hints[key],)):
            wanted = " or ".join(_name(kind) for kind in typing.get_args(hints[key]) or (hints[key],))
            raise UsageError(f"'{key}' is {json.dumps(value)}; it must be {wanted}")


def _is_a(value: Any, kind: Any) -> bool:
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(kind) is tuple:  # layers: a JSON list of layer numbers
        return isinstance(value, list) and all(_is_a(item, int) for item in value)
    return isinstance(value, kind)


def _name(kind: Any) -> str:
    names = {type(None): "null", int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    return names.get(kind, "a list of whole numbers")


def job_layers(job: Job, backbone: Backbone) -> list[int]:
    try:
        return resolve_layers(job.config, backbone)
    except UsageError as exc:
        raise UsageError(f"{job.where}: {exc}") from None


# -- training ---------------------------------------------------------------------------------------


@dataclass
class _Run:
    """A person in training."""

    job: Job
    prepared: Prepared
    learner: Learner
    started: float


def run_jobs(
    jobs: list[Job],
    layers: dict[str, list[int]],
    backbone: Backbone,
    device: torch.device,
    max_rows: int,
    progress: bool,
) -> list[Result]:
    """Skip the finished, then train the rest group by group (people of one recipe share batches)."""
    from tqdm.auto import tqdm

    results: dict[str, Result] = {}
    pending: list[tuple[Job, tuple[list[Record], list[Record]]]] = []
    for job in jobs:
        try:
            records = split_records(job.config, read_jsonl(job.config.data))
            finished = finished_patch(job.config, records, backbone)
        except ReftEdgeError as exc:
            results[job.id] = Result(job.id, "failed", None, message=str(exc))
            continue
        if finished:
            results[job.id] = Result.from_patch(job, finished, "skipped")
        else:
            pending.append((job, records))
    composable = [(job, records) for job, records in pending if job.config.compose_with]
    pending = [(job, records) for job, records in pending if not job.config.compose_with]
    for job, _ in composable:
        results[job.id] = train_composable(job, backbone, progress)
    total = sum(count_steps(job.config, len(records[0])) for job, records in pending)
    bar = tqdm(desc="train-many", total=total, disable=not progress, unit="step")
    for key in dict.fromkeys(recipe_key(job, layers[job.id]) for job, _ in pending):
        group = [(job, records) for job, records in pending if recipe_key(job, layers[job.id]) == key]
        results.update(fit_group(group, layers[group[0][0].id], backbone, device, max_rows, bar))
    bar.close()
    return [results[job.id] for job in jobs]


def train_composable(job: Job, backbone: Backbone, progress: bool) -> Result:
    """A person who must compose with the job's shared patch, trained alone by the very recipe of
    ``reft-edge train --compose-with`` (its composition phase needs that person's own teacher
    answers, so it does not share mixed batches); the same bytes as that command."""
    from reft_edge.train.recipe import train

    if progress:
        print(f"{job.id}: training to compose with {', '.join(job.config.compose_with)}")
    try:
        patch = train(job.config, backbone=backbone, progress=progress)
    except ReftEdgeError as exc:
        return Result(job.id, "failed", None, message=str(exc))
    return Result.from_patch(job, patch, "trained")


def recipe_key(job: Job, layers: list[int]) -> tuple:
    """People who can share a batch: the same edited layers (so the same cached block) and edit shape."""
    config = job.config
    return tuple(layers), config.rank, config.kind, str(job.positions), config.share_weights


def finished_patch(config: TrainConfig, records: tuple[list[Record], list[Record]], backbone: Backbone) -> Patch | None:
    """The person's patch if one is already there and records this very training (data, recipe, base)."""
    path = Path(config.out)
    if not path.is_file():
        return None
    try:
        patch = Patch.from_file(path)
    except PatchError:
        return None  # damaged: train again
    expected = {
        "data_sha256": file_digest(config.data),
        "recipe": recipe_summary(config),
        "seed": config.seed,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "examples": len(records[0]),
        "val_examples": len(records[1]),
        "steps": count_steps(config, len(records[0])),
        "model": backbone.source,
    }
    matches = all(patch.training.get(key) == value for key, value in expected.items())
    partners = [entry.get("payload_sha256") for entry in patch.training.get("composition", {}).get("with", [])]
    try:
        matches = matches and partners == [Patch.from_file(path).payload_sha256 for path in config.compose_with]
    except PatchError:
        return None  # a damaged partner fails when the person trains, with its own message
    same_base = patch.base_fingerprint == backbone.fingerprint and patch.name == (config.name or path.stem)
    return patch if matches and same_base else None


def fit_group(
    group: list[tuple[Job, tuple[list[Record], list[Record]]]],
    layers: list[int],
    backbone: Backbone,
    device: torch.device,
    max_rows: int,
    bar: Any,
) -> dict[str, Result]:
    """Train one recipe's people together: every round each active person takes one step, in mixed
    batches of at most ``max_rows`` rows; a person's patch is written the moment it stops."""
    results: dict[str, Result] = {}
    model, slots = backbone.model, EditSlots()
    positions = group[0][0].positions
    active = []
    for job, records in group:  # before the blocks are swapped: caching runs the real ones
        started = time.perf_counter()
        try:
            prepared = prepare(job.config, job.positions, layers, records, backbone, device)
        except ReftEdgeError as exc:
            results[job.id] = Result(job.id, "failed", None, message=str(exc))
            bar.total -= count_steps(job.config, len(records[0]))
            continue
        learner = Learner(prepared, job.config, device)
        active.append(_Run(job, prepared, learner, started))
    with (
        replay_frozen_layers(model, min(layers)) as (replay, blocks),
        attach_edits({layer: blocks[layer] for layer in layers}, slots),
    ):
        context = FitContext(model, replay, slots, positions, device)
        while active:
            for chunk in list(chunks(active, max_rows)):
                mixed_step(chunk, context)
                bar.update(len(chunk))
                for run in chunk:
                    if run.learner.done:
                        bar.update(run.prepared.steps - run.learner.step)  # an early stop skips the rest
                        results[run.job.id] = finish(run, backbone)
                bar.set_postfix_str(" ".join(f"{run.job.id}={run.learner.loss:.3f}" for run in chunk[:6]))
            active = [run for run in active if not run.learner.done]
    return results


def chunks(runs: list[_Run], max_rows: int) -> Iterator[list[_Run]]:
    """Consecutive people whose next batches fit ``max_rows`` together (a bigger batch goes alone)."""
    chunk: list[_Run] = []
    rows = 0
    for run in runs:
        n = len(run.learner.order[run.learner.step])
        if chunk and rows + n > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(run)
        rows += n
    if chunk:
        yield chunk


def mixed_step(chunk: list[_Run], context: FitContext) -> None:
    """One step for each person of ``chunk``: one forward and backward pass over all their batches
    (each row edited by its own person), then each person's own AdamW step and validation."""
    batches = [run.learner.next_batch() for run in chunk]
    batch = collate(*(sum((list(part[i]) for part in batches), []) for i in range(3)), context.device)
    people = [(run.prepared.edits, len(examples)) for run, (examples, _, _) in zip(chunk, batches)]
    losses = forward_losses(context, people, batch)
    for run in chunk:
        run.learner.optimizer.zero_grad(set_to_none=True)
    # Each loss depends on its own person's parameters only, so the sum's gradient is each person's own.
    torch.stack(losses).sum().backward()
    for run, loss in zip(chunk, losses):
        run.learner.update(loss.item(), partial(forward_loss, context, run.prepared.edits))


def finish(run: _Run, backbone: Backbone) -> Result:
    """Write the person's patch; a patch that cannot be written (NaN after a huge lr) fails that person only."""
    fitted = run.learner.result()
    try:
        patch = save_patch(run.job.config, run.prepared, fitted, time.perf_counter() - run.started, backbone)
    except ReftEdgeError as exc:
        return Result(run.job.id, "failed", None, steps=fitted.steps_run, message=str(exc))
    return Result.from_patch(run.job, patch, "trained")


# -- ranks and the summary ------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` (torchrun sets WORLD_SIZE, RANK and the rendezvous)."""

    rank: int
    size: int

    @classmethod
    def start(cls, device: str) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls(0, 1)
        import torch.distributed as dist

        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:  # NCCL wants one GPU per rank; "cuda" then means this rank's own
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def gather(self, results: list[Result]) -> list[Result]:
        """Every rank's results, on every rank."""
        if self.size == 1:
            return list(results)
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.size
        dist.all_gather_object(everyone, [{**asdict(result), "rank": self.rank} for result in results])
        return [Result(**result) for part in everyone for result in part]

    def stop(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def write_summary(config: ManyConfig, results: list[Result], world_size: int) -> Path:
    path = Path(config.out_dir) / SUMMARY_FILE
    summary = {"jobs": config.jobs, "world_size": world_size, "people": [asdict(result) for result in results]}
    atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())
    return path


def summary_table(results: list[Result]) -> str:
    """A plain-text table: id, steps, final loss, val loss, status, file (or why it failed)."""
    number = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    rows = [("id", "steps", "final loss", "val loss", "status", "file")]
    rows += [
        (
            r.id,
            "-" if r.steps is None else str(r.steps),
            number(r.final_loss),
            number(r.val_loss),
            r.status,
            r.file if r.status != "failed" else r.message,
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5] for row in rows]
    counts = {status: sum(r.status == status for r in results) for status in ("trained", "skipped", "failed")}
    return "\n".join([*lines, ", ".join(f"{n} {status}" for status, n in counts.items())])


if __name__ == "__main__":  # torchrun -m reft_edge.train.many: the CLI command, its options and errors
    from reft_edge.cli import main

    sys.exit(main(["train-many", *sys.argv[1:]], prog_name="reft_edge.train.many"))
