"""Many people in one job: patches per hour of ``train-many`` against sequential ``reft-edge train`` runs.

    python -m benchmarks.train_many                      # 1, 8 and 32 people, 10 steps; then 2 ranks vs 2 threads
    python -m benchmarks.train_many --people 1,8 --steps 5 --rank-people 0   # quicker, no rank comparison

The people are the personas of examples/personas cycled (person i: persona i % 7 with seed i // 7),
each validated on its persona's val.jsonl. Sequential: one in-process ``train()`` per person,
each loading the backbone as a fresh ``reft-edge train`` does (Python and torch start-up not
counted); its cumulative time after k people is the time of k sequential runs, so one pass serves
every count. train-many: one in-process ``train_many`` per count (the backbone loaded once). Both
run with ``--threads`` torch threads (1 by default). The rank comparison runs ``--rank-people``
people as two subprocesses: ``torchrun --nproc-per-node 2`` with one thread per rank against one
``python -m reft_edge.train.many`` process of two threads (start-up and model loading included in
both). Patches of both kinds are compared: identical bytes, and the largest parameter and loss
differences otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reft_edge.runtime.patch import Patch
from reft_edge.train import TrainConfig, train
from reft_edge.train.backbone import load_backbone
from reft_edge.train.config import ManyConfig
from reft_edge.train.many import train_many

PERSONAS = sorted((Path(__file__).resolve().parent.parent / "examples" / "personas").glob("*/train.jsonl"))


def people(count: int) -> list[dict]:
    return [
        {
            "id": f"p{i:02d}-{PERSONAS[i % len(PERSONAS)].parent.name}",
            "data": str(PERSONAS[i % len(PERSONAS)]),
            "val_data": str(PERSONAS[i % len(PERSONAS)].parent / "val.jsonl"),
            "seed": i // len(PERSONAS),
        }
        for i in range(count)
    ]


def write_jobs(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(person) + "\n" for person in people(count)))
    return path


def sequential(folder: Path, count: int, steps: int) -> list[float]:
    """Seconds after each person, every person's train() loading its own backbone."""
    folder.mkdir(parents=True, exist_ok=True)
    started, times = time.perf_counter(), []
    for person in people(count):
        options = {k: v for k, v in person.items() if k != "id"}
        train(TrainConfig(out=str(folder / f"{person['id']}.reft"), steps=steps, **options), progress=False)
        times.append(time.perf_counter() - started)
    return times


def many(folder: Path, count: int, steps: int) -> float:
    started = time.perf_counter()
    train_many(
        ManyConfig(jobs=str(write_jobs(folder, count)), out_dir=str(folder / "out"), defaults={"steps": steps}),
        progress=False,
    )
    return time.perf_counter() - started


def compare(many_dir: Path, alone_dir: Path) -> dict:
    """How the train-many patches compare with the ones trained alone."""
    identical, param_diff, loss_diff = 0, 0.0, 0.0
    for alone_path in sorted(alone_dir.glob("*.reft")):
        mixed_path = many_dir / alone_path.name
        if not mixed_path.is_file():
            continue
        identical += mixed_path.read_bytes() == alone_path.read_bytes()
        mixed, alone = Patch.from_file(mixed_path), Patch.from_file(alone_path)
        for a, b in zip(mixed.interventions, alone.interventions):
            param_diff = max(param_diff, *(float(np.abs(a.params[k] - b.params[k]).max()) for k in a.params))
        for key in ("final_loss", "val_loss"):
            loss_diff = max(loss_diff, abs(mixed.training[key] - alone.training[key]))
    return {"identical": identical, "max_param_diff": param_diff, "max_loss_diff": loss_diff}


def subprocess_run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def ranks_vs_threads(folder: Path, count: int, steps: int) -> tuple[float, float]:
    """(seconds of torchrun with 2 ranks of 1 thread, seconds of 1 process of 2 threads)."""
    jobs = write_jobs(folder, count)
    options = ["--jobs", str(jobs), "--steps", str(steps), "--device", "cpu"]
    ranks = subprocess_run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "reft_edge.train.many",
            *options,
            "--out-dir",
            str(folder / "ranks"),
        ],
        1,
    )
    threads = subprocess_run(
        [sys.executable, "-m", "reft_edge.train.many", *options, "--out-dir", str(folder / "threads")], 2
    )
    return ranks, threads


def per_hour(count: int, seconds: float) -> float:
    return count * 3600 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", default="1,8,32", help="Comma list of people counts.")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="Torch threads of the in-process runs.")
    parser.add_argument("--rank-people", type=int, default=8, help="People of the rank comparison (0: skip it).")
    args = parser.parse_args()
    counts = [int(c) for c in args.people.split(",")]
    torch.set_num_threads(args.threads)
    load_backbone()  # converted and in the page cache before anything is timed
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps per person; "
        f"1-minute load average before: {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        alone = sequential(root / "alone", max(counts), args.steps)
        print(f"sequential done, load {os.getloadavg()[0]:.1f}", flush=True)
        print(
            "| people | sequential s | train-many s | sequential patches/h | train-many patches/h | speed-up "
            "| identical bytes | max param diff | max loss diff | load |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for count in counts:
            many_s = many(root / f"many-{count}", count, args.steps)
            same = compare(root / f"many-{count}" / "out", root / "alone")
            alone_s = alone[count - 1]
            print(
                f"| {count} | {alone_s:.0f} | {many_s:.0f} | {per_hour(count, alone_s):.0f} | "
                f"{per_hour(count, many_s):.0f} | {alone_s / many_s:.2f}x | {same['identical']}/{count} | "
                f"{same['max_param_diff']:.1e} | {same['max_loss_diff']:.1e} | {os.getloadavg()[0]:.1f} |",
                flush=True,
            )
        if args.rank_people:
            ranks_s, threads_s = ranks_vs_threads(root / "ranks", args.rank_people, args.steps)
            print(
                f"\n{args.rank_people} people: torchrun 2 gloo ranks x 1 thread {ranks_s:.0f} s "
                f"({per_hour(args.rank_people, ranks_s):.0f} patches/h), 1 process x 2 threads {threads_s:.0f} s "
                f"({per_hour(args.rank_people, threads_s):.0f} patches/h): {threads_s / ranks_s:.2f}x; "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
