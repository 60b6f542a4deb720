"""train-many: mixed batches give each person its own step, kill and resume, one bad person, bad job
lines, and torchrun with two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, write_jsonl
from reft_edge.cli import main
from reft_edge.runtime.patch import Patch
from reft_edge.train import TrainConfig, train
from reft_edge.train.config import ManyConfig
from reft_edge.train.many import SUMMARY_FILE, train_many

EXAMPLES = ROOT / "examples"
# Three people of one recipe with their own data, seeds, learning rates, batch sizes, step
# counts and validation, and one of another recipe (its own group).
PEOPLE = [
    {"id": "emoji", "data": str(EXAMPLES / "emoji" / "train.jsonl"), "seed": 1},
    {
        "id": "signoff",
        "data": str(EXAMPLES / "personas" / "signoff" / "train.jsonl"),
        "seed": 2,
        "lr": 0.01,
        "val_fraction": 0.2,
        "eval_every": 2,
        "patience": 2,
    },
    {"id": "pirate", "data": str(EXAMPLES / "pirate" / "train.jsonl"), "batch_size": 5, "steps": 7},
    {
        "id": "untied",
        "data": str(EXAMPLES / "emoji" / "train.jsonl"),
        "layers": [0, 2],
        "rank": 3,
        "share_weights": False,
        "positions": "f1+l1",
    },
]
DEFAULTS = {"steps": 10, "lr": 0.02, "layers": [1, 2]}


def _jobs(folder: Path, people: list[dict] = PEOPLE) -> Path:
    folder.mkdir(exist_ok=True)
    return write_jsonl(folder / "jobs.jsonl", people)


def _many(folder: Path, model: Path, max_rows: int = 64, people: list[dict] = PEOPLE) -> list:
    config = ManyConfig(
        jobs=str(_jobs(folder, people)),
        out_dir=str(folder / "out"),
        model=str(model),
        max_rows=max_rows,
        defaults=DEFAULTS,
    )
    return train_many(config, progress=False)


def _alone(person: dict, model: Path, out: Path) -> Path:
    options = {**DEFAULTS, **{k: v for k, v in person.items() if k != "id"}}
    train(TrainConfig.from_dict({**options, "out": str(out), "model": str(model)}), progress=False)
    return out


def _params(path: Path) -> list[np.ndarray]:
    return [array for iv in Patch.from_file(path).interventions for array in iv.params.values()]


def test_mixed_batches_give_each_person_its_own_gradient(tiny_backbone):
    """One backward pass of the summed per-person losses of a mixed batch = each person's own gradient."""
    from reft_edge.runtime.positions import Positions
    from reft_edge.train.data import read_jsonl, tokenize
    from reft_edge.train.fitting import (
        Edits,
        FitContext,
        build_interventions,
        cache_frozen_states,
        collate,
        forward_loss,
        forward_losses,
        replay_frozen_layers,
    )
    from reft_edge.train.intervention import EditSlots, attach_edits

    model, cpu, positions = tiny_backbone.model, torch.device("cpu"), Positions.parse("l1+g")
    people = []
    for seed, data in enumerate(("emoji", "pirate")):
        examples = tokenize(
            read_jsonl(EXAMPLES / data / "train.jsonl")[: 3 + seed], tiny_backbone.tokenizer, use_chat_template=True
        )
        torch.manual_seed(seed)
        config = TrainConfig(data="-", out="-", rank=2)
        interventions = build_interventions(config, positions, [1, 2], tiny_backbone.hidden_size, config.rank)
        people.append(
            (Edits(interventions, [(data, config.rank)], []), examples, cache_frozen_states(model, examples, 1, cpu))
        )
    owners = lambda edits, examples: [frozenset({edits.skills[0][0]})] * len(examples)  # noqa: E731
    slots = EditSlots()
    with replay_frozen_layers(model, 1) as (replay, blocks), attach_edits({1: blocks[1], 2: blocks[2]}, slots):
        context = FitContext(model, replay, slots, positions, cpu)
        alone = []
        for edits, examples, states in people:
            batch = collate(examples, states, owners(edits, examples), cpu)
            forward_loss(context, edits, batch).backward()
            alone.append([p.grad.clone() for p in edits.parameters()])
            for p in edits.parameters():
                p.grad = None
        batch = collate(
            [e for _, examples, _ in people for e in examples],
            [s for *_, states in people for s in states],
            [o for edits, examples, _ in people for o in owners(edits, examples)],
            cpu,
        )
        losses = forward_losses(context, [(edits, len(ex)) for edits, ex, _ in people], batch)
        torch.stack(losses).sum().backward()
    for (edits, _, _), grads in zip(people, alone):
        mixed = [p.grad for p in edits.parameters()]
        for got, want in zip(mixed, grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_patches_match_training_alone(tiny_model_dir, tmp_path):
    """Mixed batches: the same steps, data digest and recipe; losses and parameters within float
    rounding (padding to the mixed batch's length changes the frozen layers' matmul shapes, so
    the last bits may differ). A person in a batch of its own: the same bytes."""
    model = tiny_model_dir("llama")
    results = _many(tmp_path / "mixed", model)
    assert [r.status for r in results] == ["trained"] * 4
    single = _many(tmp_path / "single", model, max_rows=1)  # every person's batch runs on its own
    for person in PEOPLE:
        alone = _alone(person, model, tmp_path / f"{person['id']}.reft")
        mixed, one = tmp_path / "mixed" / "out" / alone.name, tmp_path / "single" / "out" / alone.name
        assert one.read_bytes() == alone.read_bytes()
        got, want = Patch.from_file(mixed), Patch.from_file(alone)
        assert got == want  # name, kind, layers, positions, rank, base
        losses = ("first_loss", "final_loss", "val_loss")
        assert {k: v for k, v in got.training.items() if k not in losses} == {
            k: v for k, v in want.training.items() if k not in losses
        }  # steps, best step, data digest, recipe
        for key in losses:  # stored at six decimals: rounding may flip the last one (equal here on this CPU)
            assert got.training[key] == pytest.approx(want.training[key], abs=2e-6)
        for a, b in zip(_params(mixed), _params(alone)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert {r.id: r.val_loss is not None for r in single} == {
        "emoji": False,
        "signoff": True,
        "pirate": False,
        "untied": False,
    }


def test_killed_job_resumes_and_skips_the_finished(tiny_model_dir, tmp_path, monkeypatch):
    import reft_edge.train.many as many

    model = tiny_model_dir("llama")
    real_finish = many.finish

    def finish_then_die(run, backbone):
        real_finish(run, backbone)
        raise KeyboardInterrupt  # killed right after the first patch is written

    monkeypatch.setattr(many, "finish", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        _many(tmp_path, model)
    monkeypatch.setattr(many, "finish", real_finish)
    written = sorted(p.name for p in (tmp_path / "out").glob("*.reft"))
    assert len(written) == 1 and not list((tmp_path / "out").glob(".*.tmp"))
    first = tmp_path / "out" / written[0]
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    results = _many(tmp_path, model)
    statuses = {r.id: r.status for r in results}
    assert statuses.pop(first.stem) == "skipped" and set(statuses.values()) == {"trained"}
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # not rewritten
    changed = [{**p, "seed": 9} if p["id"] == first.stem else p for p in PEOPLE]  # its recorded identity differs now
    assert {r.id: r.status for r in _many(tmp_path, model, people=changed)}[first.stem] == "trained"
    assert sum(r.status == "skipped" for r in _many(tmp_path, model, people=changed)) == 4


def test_a_bad_data_file_fails_that_person_only(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "yo"}, "{not json"])
    people = [PEOPLE[0], {"id": "bad", "data": str(bad)}, PEOPLE[2]]
    args = [
        "train-many",
        "--jobs",
        str(_jobs(tmp_path, people)),
        "--out-dir",
        str(tmp_path / "out"),
        "--model",
        str(tiny_model_dir("llama")),
        "--steps",
        "3",
        "--layers",
        "1",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: 1 of 3 people failed, the first bad: " in result.output and "bad.jsonl:2: not JSON" in result.output
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert [(p["id"], p["status"]) for p in summary["people"]] == [
        ("emoji", "trained"),
        ("bad", "failed"),
        ("pirate", "trained"),
    ]
    assert "bad.jsonl:2: not JSON" in summary["people"][1]["message"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.reft")) == ["emoji.reft", "pirate.reft"]
    table = result.output[result.output.index("id ") :]
    assert "failed" in table and "bad.jsonl:2" in table and "2 trained, 0 skipped, 1 failed" in table


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "b", "data": "b.jsonl", "rnak": 2}', "unknown training option(s) ['rnak']"),
        ("{not json", "not JSON"),
        ('{"data": "b.jsonl"}', "'id' null is missing"),
        ('{"id": "../b", "data": "b.jsonl"}', "not a file-name-safe name"),
        ('{"id": "a", "data": "b.jsonl"}', "id 'a' is also at"),
        ('{"id": "b"}', "'data' (the person's JSONL file) is missing"),
        ('{"id": "b", "data": "b.jsonl", "out": "x.reft"}', "'out' cannot be set per person"),
        ('{"id": "b", "data": "b.jsonl", "rank": "two"}', "'rank' is \"two\"; it must be a whole number"),
        ('{"id": "b", "data": "b.jsonl", "rank": 0}', "--rank 0 is too small"),
        ('{"id": "b", "data": "b.jsonl", "layers": [1, 7]}', "--layers 7 is outside this model's layers 0..2"),
    ],
)
def test_a_bad_job_line_fails_before_training(line, message, tiny_model_dir, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "data": str(EXAMPLES / "emoji" / "train.jsonl")}) + "\n" + line + "\n")
    result = CliRunner().invoke(
        main,
        [
            "train-many",
            "--jobs",
            str(jobs),
            "--out-dir",
            str(tmp_path / "out"),
            "--model",
            str(tiny_model_dir("llama")),
            "--steps",
            "2",
        ],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith(f"error: {jobs}:2: ") and message in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "out").exists()  # nothing trained, no empty --out-dir


@pytest.mark.slow  # two processes each load torch and the model: about half a minute here
def test_torchrun_two_gloo_ranks_write_every_patch_once(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    jobs = _jobs(tmp_path)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "reft_edge.train.many",
        "--jobs",
        str(jobs),
        "--out-dir",
        str(tmp_path / "out"),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--steps",
        "10",
        "--lr",
        "0.02",
        "--layers",
        "1,2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["world_size"] == 2
    assert [(p["id"], p["status"], p["rank"]) for p in summary["people"]] == [
        (person["id"], "trained", i % 2) for i, person in enumerate(PEOPLE)
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [SUMMARY_FILE, *(f"{p['id']}.reft" for p in PEOPLE)]
    )  # each exactly once, no leftovers
    assert run.stdout.count("4 trained, 0 skipped, 0 failed") == 1  # rank 0 alone prints the summary
    for person in PEOPLE:
        alone = _alone(person, model, tmp_path / f"{person['id']}.reft")
        for a, b in zip(_params(tmp_path / "out" / alone.name), _params(alone)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_shared_partner_makes_the_same_bytes_as_train_compose_with(tiny_backbone, tmp_path):
    """train-many --compose-with house.reft trains each person exactly as `reft-edge train
    --compose-with house.reft` trains them alone: the same patch, byte for byte."""
    from conftest import write_jsonl
    from reft_edge.train import TrainConfig, train
    from reft_edge.train.many import ManyConfig, train_many

    recipe = dict(model=tiny_backbone.path, layers=(1, 2), rank=2, steps=6, compose_steps=2, lr=2e-2)
    house_data = write_jsonl(
        tmp_path / "house.jsonl", [{"prompt": f"q{i}?", "response": f"Hello! a{i}."} for i in range(6)]
    )
    house = tmp_path / "house.reft"
    train(TrainConfig(data=str(house_data), out=str(house), **recipe), backbone=tiny_backbone, progress=False)
    alice = write_jsonl(tmp_path / "alice.jsonl", [{"prompt": f"q{i}?", "response": f"a{i}. Bye!"} for i in range(6)])
    (tmp_path / "alone").mkdir()
    alone = train(
        TrainConfig(data=str(alice), out=str(tmp_path / "alone" / "alice.reft"), compose_with=(str(house),), **recipe),
        backbone=tiny_backbone,
        progress=False,
    )
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "alice", "data": str(alice)}])
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items() if k != "model"}
    results = train_many(
        ManyConfig(
            jobs=str(jobs),
            out_dir=str(tmp_path / "many"),
            model=tiny_backbone.path,
            defaults=defaults,
            compose_with=(str(house),),
        ),
        progress=False,
    )
    assert [r.status for r in results] == ["trained"]
    assert (tmp_path / "many" / "alice.reft").read_bytes() == (tmp_path / "alone" / "alice.reft").read_bytes()
    assert alone.training["composition"]["with"][0]["name"] == "house"
    # a finished person is skipped only while the partner is the same
    again = train_many(
        ManyConfig(
            jobs=str(jobs),
            out_dir=str(tmp_path / "many"),
            model=tiny_backbone.path,
            defaults=defaults,
            compose_with=(str(house),),
        ),
        progress=False,
    )
    assert [r.status for r in again] == ["skipped"]
