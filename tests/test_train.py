"""Training stage: the edit math per kind, the patch format, training itself, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import write_jsonl
from reft_edge.cli import main
from reft_edge.runtime.patch import KINDS, Patch
from reft_edge.train import TrainConfig, train
from reft_edge.train.intervention import InterventionParams, low_rank_edit

HIDDEN, RANK = 16, 3


def _paper_forward(kind: str, p: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Each kind's own forward, written as in pyreft / the paper (not via the affine form)."""
    if kind == "loreft":
        return h + (h @ p["W"].T + p["b"] - h @ p["R"].T) @ p["R"]
    if kind == "direft":
        return h + (h @ p["W"].T + p["b"]) @ p["R"]
    if kind == "noreft":
        return h + (h @ p["W1"].T + p["b"] - h @ p["W2"].T) @ p["W2"]
    if kind == "nodireft":
        return h + (h @ p["W1"].T + p["b"]) @ p["W2"]
    if kind == "consreft":
        return h + (p["b"] - h @ p["R"].T) @ p["R"]
    if kind == "lobireft":
        return h + p["b"] @ p["R"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_affine_edit_equals_kind_formula(kind):
    torch.manual_seed(1)
    params = InterventionParams(kind, HIDDEN, RANK)
    with torch.no_grad():
        for value in params.parameters():
            value.normal_()
        h = torch.randn(2, 5, HIDDEN)
        A, B, c = params.affine()
        edited = low_rank_edit(h, A[None], B[None], c[None], torch.ones(2, 5, RANK))
        torch.testing.assert_close(edited, _paper_forward(kind, params.natural(), h), rtol=1e-5, atol=1e-5)


def test_zero_mask_and_zero_rank_are_identity():
    h = torch.randn(1, 4, HIDDEN)
    A, B, c = InterventionParams("loreft", HIDDEN, RANK).affine()
    assert torch.equal(low_rank_edit(h, A[None], B[None], c[None], torch.zeros(1, 4, RANK)), h)
    empty = torch.zeros(1, 0, HIDDEN)
    assert torch.equal(low_rank_edit(h, empty, empty, torch.zeros(1, 0), torch.zeros(1, 4, 0)), h)


@pytest.fixture(scope="module")
def tiny_patch(tiny_model_dir, emoji_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch") / "tiny.reft"
    config = TrainConfig(
        data=str(emoji_data),
        out=str(out),
        model=str(tiny_model_dir("llama")),
        layers=(0, 2),
        rank=4,
        positions="f2+l2",
        share_weights=False,
        steps=25,
        lr=2e-2,
        batch_size=4,
        seed=3,
    )
    return config, train(config, progress=False)


def test_training_lowers_loss_and_keeps_r_orthonormal(tiny_patch):
    _, patch = tiny_patch
    assert patch.training["final_loss"] < patch.training["first_loss"]
    for intervention in patch.interventions:
        R = intervention.params["R"].astype(np.float64)
        assert np.abs(R @ R.T - np.eye(R.shape[0])).max() <= 1e-5


def test_patch_records_what_it_is(tiny_patch):
    config, patch = tiny_patch
    assert (patch.kind, patch.layers, patch.rank, str(patch.positions)) == ("loreft", [0, 2], 4, "f2+l2")
    assert [(iv.layer, iv.where) for iv in patch.interventions] == [
        (0, "prefix"),
        (0, "suffix"),
        (2, "prefix"),
        (2, "suffix"),
    ]
    assert patch.training["examples"] == 12 and patch.training["steps"] == 25
    assert patch.training["seconds"] is None  # only with record_time: keeps files reproducible
    assert Path(config.out).stat().st_size == patch.size_bytes


def test_same_seed_same_bytes(tiny_patch, tmp_path):
    config, _ = tiny_patch
    again = TrainConfig.from_dict({**config.to_dict(), "out": str(tmp_path / Path(config.out).name)})
    train(again, progress=False)
    assert Path(again.out).read_bytes() == Path(config.out).read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_on_gpt2(kind, tiny_model_dir, emoji_data, tmp_path):
    config = TrainConfig(
        data=str(emoji_data),
        out=str(tmp_path / f"{kind}.reft"),
        model=str(tiny_model_dir("gpt2")),
        kind=kind,
        steps=4,
        lr=2e-2,
        seed=0,
    )
    patch = train(config, progress=False)
    assert patch.kind == kind and patch.layers == [1, 2]  # the default plan: the upper half
    assert np.isfinite(patch.training["final_loss"])


def test_round_trip_and_float16(tiny_patch, tmp_path):
    _, patch = tiny_patch
    again = Patch.from_file(patch.to_file(tmp_path / "copy.reft") and tmp_path / "copy.reft")
    assert again == patch and again.metadata() == patch.metadata()
    for a, b in zip(again.interventions, patch.interventions):
        for name in a.params:
            assert np.array_equal(a.params[name], b.params[name])
    from dataclasses import replace

    half = replace(patch, dtype="float16").to_file(tmp_path / "half.reft")
    payload = lambda p: sum(a.nbytes for a in p.tensors().values())  # noqa: E731
    assert 2 * payload(half) == payload(patch) and half.size_bytes < patch.size_bytes  # the header stays
    assert half.interventions[0].params["R"].dtype == np.float16


GOLDEN = Path(__file__).parent / "golden" / "patch_v1.reft"


def _golden_patch() -> Patch:
    from reft_edge.runtime.patch import Intervention
    from reft_edge.runtime.positions import Positions

    rng = np.random.default_rng(7)
    params = {
        "R": np.linalg.qr(rng.normal(size=(8, 2)))[0].T.astype(np.float32),
        "W": rng.normal(size=(2, 8)).astype(np.float32),
        "b": rng.normal(size=2).astype(np.float32),
    }
    return Patch(
        name="golden",
        kind="loreft",
        positions=Positions(1, 1),
        share_weights=True,
        rank=2,
        hidden_size=8,
        base_fingerprint="0" * 64,
        interventions=(Intervention(3, "both", params),),
        training={"steps": 1, "final_loss": 1.0, "seconds": None},
    )


def test_golden_file_reads_and_writes_byte_for_byte():
    golden = Patch.from_file(GOLDEN)
    assert golden.summary()["payload_sha256"] == golden.payload_sha256
    assert golden.to_bytes() == GOLDEN.read_bytes() == _golden_patch().to_bytes()
    assert json.loads(golden.metadata()["interventions"]) == [{"layer": 3, "where": "both"}]


def test_inspect_json(tiny_patch):
    config, patch = tiny_patch
    result = CliRunner().invoke(main, ["inspect", config.out, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    for key in (
        "kind",
        "layers",
        "rank",
        "positions",
        "hidden_size",
        "base_fingerprint",
        "payload_sha256",
        "size_bytes",
        "training",
    ):
        assert key in shown
    assert shown["training"]["final_loss"] == patch.training["final_loss"]
    assert {"steps", "seconds"} <= set(shown["training"])
    readable = CliRunner().invoke(main, ["inspect", config.out])
    assert "loreft" in readable.output and "final loss" in readable.output


# --- bad input: one line naming what, where and the fix; exit 2; no output file ---------------


def _bad(tmp_path, tiny_model_dir, data_rows=None, data=None, **options):
    data = data or str(write_jsonl(tmp_path / "data.jsonl", data_rows or [{"prompt": "hi", "response": "🙂"}]))
    out = options.pop("out", str(tmp_path / "out.reft"))
    args = ["train", "--data", data, "--out", out, "--model", str(tiny_model_dir("llama")), "--steps", "1"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert not Path(out).exists() and not list(Path(out).parent.glob(".out.reft*"))
    return lines[0]


def test_unreadable_data_file(tmp_path, tiny_model_dir):
    message = _bad(tmp_path, tiny_model_dir, data=str(tmp_path / "missing.jsonl"))
    assert "missing.jsonl: cannot read data file" in message and "--data" in message


def test_line_not_json_names_file_and_line(tmp_path, tiny_model_dir):
    rows = [{"prompt": "a", "response": "b"}] * 16 + ["{not json"]
    message = _bad(tmp_path, tiny_model_dir, data_rows=rows)
    assert "data.jsonl:17: not JSON" in message and '"prompt"' in message


def test_line_missing_fields(tmp_path, tiny_model_dir):
    message = _bad(tmp_path, tiny_model_dir, data_rows=[{"prompt": "a", "answer": "b"}])
    assert "data.jsonl:1: lacks 'prompt' and 'response'" in message


def test_empty_response(tmp_path, tiny_model_dir):
    assert "data.jsonl:2: the response is empty" in _bad(
        tmp_path, tiny_model_dir, data_rows=[{"prompt": "a", "response": "b"}, {"prompt": "a", "response": " "}]
    )


def test_empty_dataset(tmp_path, tiny_model_dir):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "empty.jsonl: no examples" in _bad(tmp_path, tiny_model_dir, data=str(tmp_path / "empty.jsonl"))


def test_non_utf8_line(tmp_path, tiny_model_dir):
    (tmp_path / "latin.jsonl").write_bytes(
        b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n'
    )
    assert "latin.jsonl:2: not UTF-8" in _bad(tmp_path, tiny_model_dir, data=str(tmp_path / "latin.jsonl"))


def test_layer_out_of_range(tmp_path, tiny_model_dir):
    assert "--layers 7 is outside this model's layers 0..2" in _bad(tmp_path, tiny_model_dir, layers="1,7")


def test_layers_malformed(tmp_path, tiny_model_dir):
    assert "--layers '1;2' is malformed" in _bad(tmp_path, tiny_model_dir, layers="1;2")


def test_rank_too_small_and_too_large(tmp_path, tiny_model_dir):
    assert "--rank 0 is too small" in _bad(tmp_path, tiny_model_dir, rank=0)
    assert "--rank 65 exceeds the hidden size 64" in _bad(tmp_path, tiny_model_dir, rank=65)


def test_malformed_positions(tmp_path, tiny_model_dir):
    assert "positions 'f2l2' is malformed" in _bad(tmp_path, tiny_model_dir, positions="f2l2")


def test_output_folder_missing(tmp_path, tiny_model_dir):
    message = _bad(tmp_path, tiny_model_dir, out=str(tmp_path / "nope" / "x.reft"))
    assert "folder" in message and "does not exist" in message


def test_killed_run_resumes_to_the_same_bytes(tiny_model_dir, emoji_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    model = str(tiny_model_dir("llama"))
    args = [
        "--data",
        str(emoji_data),
        "--model",
        model,
        "--layers",
        "1",
        "--steps",
        "400",
        "--lr",
        "1e-3",
        "--seed",
        "5",
        "--checkpoint-every",
        "20",
    ]
    whole = tmp_path / "whole" / "p.reft"
    resumed = tmp_path / "resumed" / "p.reft"
    whole.parent.mkdir(), resumed.parent.mkdir()
    cli = [sys.executable, "-m", "reft_edge.cli", "train"]
    subprocess.run([*cli, *args, "--out", str(whole)], check=True, capture_output=True)
    assert not (whole.parent / "p.reft.ckpt").exists()  # removed once the patch is saved

    run = subprocess.Popen([*cli, *args, "--out", str(resumed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (resumed.parent / "p.reft.ckpt").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not resumed.exists(), "the run finished before it could be killed; raise --steps"
    subprocess.run([*cli, *args, "--out", str(resumed), "--resume"], check=True, capture_output=True)
    assert resumed.read_bytes() == whole.read_bytes()


def test_resume_refuses_a_checkpoint_from_other_options(tiny_model_dir, emoji_data, tmp_path):
    out = tmp_path / "p.reft"
    base = [
        "train",
        "--data",
        str(emoji_data),
        "--model",
        str(tiny_model_dir("llama")),
        "--out",
        str(out),
        "--steps",
        "4",
        "--checkpoint-every",
        "1",
    ]
    from reft_edge.train.checkpoint import checkpoint_path, save_checkpoint

    params = [torch.zeros(2, requires_grad=True)]
    optimizer = torch.optim.AdamW(params)
    params[0].sum().backward()
    optimizer.step()
    save_checkpoint(
        checkpoint_path(out), step=2, first_loss=1.0, parameters=params, optimizer=optimizer, identity={"rank": 99}
    )
    result = CliRunner().invoke(main, [*base, "--resume"])
    assert result.exit_code == 2
    assert "p.reft.ckpt: written by a run with different" in result.output and "rank" in result.output


# -- generated-token edits and validation -----------------------------------------------------


def test_generated_positions_cover_exactly_the_response_tokens():
    from reft_edge.runtime.contract import position_rows
    from reft_edge.runtime.positions import Positions
    from reft_edge.train.data import Example
    from reft_edge.train.fitting import collate, edit_masks

    examples = [Example((1, 2, 3), (5, 6, 7)), Example((1, 2), (5, 6, 7, 8, 9))]
    states = [torch.zeros(len(e.prompt_ids) + len(e.target_ids) - 1, HIDDEN) for e in examples]
    batch = collate(examples, states, [frozenset()] * 2, torch.device("cpu"))
    positions = Positions.parse("f1+g")

    def masks(where):
        return edit_masks(position_rows([(positions, where, 1)]), batch, torch.device("cpu"))[..., 0]

    both = masks("both")
    # row 0: a prompt of 3, 2 fed response tokens, 1 pad; row 1: a prompt of 2, 4 fed response tokens
    assert both.tolist() == [[1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1]]
    assert masks("prefix").tolist() == [[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert masks("generated").tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]]


def test_untied_generated_positions_train_one_intervention_per_group(tiny_model_dir, emoji_data, tmp_path):
    config = TrainConfig(
        data=str(emoji_data),
        out=str(tmp_path / "g.reft"),
        model=str(tiny_model_dir("llama")),
        layers=(1,),
        rank=2,
        positions="l1+g",
        share_weights=False,
        steps=6,
        lr=2e-2,
        seed=0,
    )
    patch = train(config, progress=False)
    assert [iv.where for iv in patch.interventions] == ["suffix", "generated"]
    assert str(Patch.from_file(config.out).positions) == "l1+g"
    assert json.loads(patch.metadata()["format_version"]) == 2  # 1 cannot say "g"


def test_validation_keeps_the_best_step_and_stops_early(tiny_model_dir, emoji_data, tmp_path):
    config = TrainConfig(
        data=str(emoji_data),
        out=str(tmp_path / "v.reft"),
        model=str(tiny_model_dir("llama")),
        layers=(1,),
        rank=4,
        positions="p+g",
        steps=200,
        lr=5e-2,
        batch_size=4,
        seed=0,
        val_fraction=0.25,
        eval_every=2,
        patience=3,
        name="v",
    )
    training = train(config, progress=False).training
    assert training["examples"] == 9 and training["val_examples"] == 3
    assert training["steps_run"] < 200  # a tiny random model overfits 9 examples quickly: stopped early
    assert training["best_step"] <= training["steps_run"] and training["best_step"] % 2 == 0
    assert np.isfinite(training["val_loss"])
    again = train(TrainConfig.from_dict({**config.to_dict(), "out": str(tmp_path / "v2.reft")}), progress=False)
    assert again.to_bytes() == Patch.from_file(config.out).to_bytes()  # the same seed: the same patch


@pytest.mark.parametrize(
    "options, message",
    [
        ({"val_fraction": 1.5}, "between 0 and 1"),
        ({"val_fraction": 0.2, "val_data": "x.jsonl"}, "one way"),
        ({"patience": 0}, "--patience 0"),
        ({"positions": "g+p"}, "malformed"),
    ],
)
def test_bad_validation_and_position_options(options, message, tiny_model_dir, emoji_data, tmp_path):
    from reft_edge.errors import UsageError

    with pytest.raises(UsageError, match=message):
        train(
            TrainConfig(
                data=str(emoji_data), out=str(tmp_path / "x.reft"), model=str(tiny_model_dir("llama")), **options
            ),
            progress=False,
        )


def test_auto_search_keeps_the_best_trial_within_its_budget(tiny_model_dir, emoji_data, tmp_path):
    from reft_edge.train.auto import SEARCH_SPACE, train_auto

    config = TrainConfig(
        data=str(emoji_data),
        out=str(tmp_path / "auto.reft"),
        model=str(tiny_model_dir("llama")),
        steps=6,
        eval_every=2,
        seed=0,
    )
    patch = train_auto(config, budget_minutes=0.25, progress=False)
    search = patch.training["auto"]
    trials = search["trials"]
    assert len(trials) >= 1 and trials[0]["layer_plan"] == SEARCH_SPACE["layer_plan"][0]  # the default first
    best = min(trials, key=lambda t: t["val_loss"])
    assert search["chosen"] == {k: v for k, v in best.items() if k not in ("val_loss", "seconds")}
    assert patch.training["val_loss"] == pytest.approx(best["val_loss"], abs=1e-6)
    assert patch.training["val_examples"] == 3 and patch.name == "auto"  # a quarter of 12 held out
    assert not list(tmp_path.glob(".auto-*"))  # trial patches are cleaned up


def test_auto_refuses_fixed_layers(tiny_model_dir, emoji_data, tmp_path):
    from reft_edge.errors import UsageError
    from reft_edge.train.auto import train_auto

    with pytest.raises(UsageError, match="--auto chooses the layers"):
        train_auto(TrainConfig(data=str(emoji_data), out=str(tmp_path / "a.reft"), layers=(1,)), progress=False)


def test_the_retention_term_keeps_the_base_answers_to_general_prompts(tiny_backbone, tmp_path):
    """--retain-weight trains the base model's own greedy answers to the anchor prompts with the
    patch on: the patched model then gives those answers a lower loss than a patch trained without."""
    from conftest import write_jsonl
    from reft_edge.train import TrainConfig, train
    from reft_edge.train.evaluate import TorchBackend
    from reft_edge.train.recipe import anchor_examples

    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"Tell me about {i}.", "response": "WOOF WOOF WOOF!"} for i in range(8)]
    )
    common = dict(data=str(data), model=tiny_backbone.path, layers=(1, 2), rank=2, steps=25, lr=5e-2)
    config = TrainConfig(out=str(tmp_path / "p.reft"), **common)
    anchors = anchor_examples(tiny_backbone, config)
    assert len(anchors) > 20 and anchors == anchor_examples(tiny_backbone, config)  # the second read is cached
    backend = TorchBackend(tiny_backbone)

    def anchor_nll(**options) -> float:
        patch = train(
            TrainConfig(out=str(tmp_path / "p.reft"), **common, **options), backbone=tiny_backbone, progress=False
        )
        return backend.response_nll(anchors, [patch], None) / sum(len(e.target_ids) for e in anchors)

    assert anchor_nll(retain_weight=2.0) < anchor_nll() - 0.05
