"""Skills and composition: patches whose rank rows are grouped into named skills, switched on,
off or weighted per request and per batch row; weights; composable training.

The references are independent of the selection code: a skill is also built by hand as a
patch of its own (its rows sliced out of the natural parameters), and the torch reference
(tests/test_runtime.torch_greedy) applies that patch with the training stage's hooks.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_jsonl
from reft_edge.errors import PatchFormatError, UsageError
from reft_edge.runtime import Patch, Runtime
from reft_edge.runtime.patch import Intervention, choose_skills, parse_skill_choice, serialize_safetensors
from reft_edge.runtime.positions import Positions
from test_runtime import PROMPTS, QUESTIONS, torch_greedy

GOLDEN = Path(__file__).parent / "golden" / "patch_v3_skills.reft"
SKILL_RESPONSES = {"fox": "The quick brown fox jumps over the lazy dog.", "sea": "Sailing ships sail the seven seas."}


@pytest.fixture(scope="session")
def rt(tiny_bundle) -> Runtime:
    return Runtime.load(tiny_bundle, threads=2)


@pytest.fixture(scope="session")
def skills_patch(tiny_backbone, tmp_path_factory) -> Patch:
    """Two skills (fox, sea) at layers 1 and 2, rank 2 each, positions l1+g, trained together."""
    from reft_edge.train import TrainConfig, train

    folder = tmp_path_factory.mktemp("skills")
    data = {
        name: write_jsonl(folder / f"{name}.jsonl", [{"prompt": q, "response": r} for q in QUESTIONS])
        for name, r in SKILL_RESPONSES.items()
    }
    config = TrainConfig(
        skills=tuple((name, str(path)) for name, path in data.items()),
        out=str(folder / "s.reft"),
        model=tiny_backbone.path,
        layers=(1, 2),
        rank=2,
        steps=20,
        compose_steps=4,
        lr=2e-2,
        batch_size=6,
    )
    return train(config, backbone=tiny_backbone, progress=False)


def sliced(patch: Patch, rows: slice, name: str) -> Patch:
    """A patch of ``rows`` of every intervention, built from the natural parameters (LoReFT's R, W
    and b are row-wise: each rank row's edit depends on its own rows only)."""
    interventions = tuple(
        Intervention(iv.layer, iv.where, {k: v[rows] for k, v in iv.params.items()}) for iv in patch.interventions
    )
    rank = interventions[0].params["b"].shape[0]
    return replace(patch, name=name, rank=rank, interventions=interventions, skills=())


# -- the file format ----------------------------------------------------------------------------


def _golden_skills_patch() -> Patch:
    rng = np.random.default_rng(11)
    params = {
        "R": np.linalg.qr(rng.normal(size=(8, 3)))[0].T.astype(np.float32),
        "W": rng.normal(size=(3, 8)).astype(np.float32),
        "b": rng.normal(size=3).astype(np.float32),
    }
    return Patch(
        name="golden-skills",
        kind="loreft",
        positions=Positions.parse("l1+g"),
        share_weights=True,
        rank=3,
        hidden_size=8,
        base_fingerprint="0" * 64,
        interventions=(Intervention(3, "both", params),),
        training={"steps": 1, "final_loss": 1.0, "seconds": None},
        skills=(("caps", 2), ("meow", 1)),
    )


def test_golden_skills_file_reads_and_writes_byte_for_byte():
    golden = Patch.from_file(GOLDEN)
    assert golden.to_bytes() == GOLDEN.read_bytes() == _golden_skills_patch().to_bytes()
    assert golden.skills == (("caps", 2), ("meow", 1))
    assert json.loads(golden.metadata()["format_version"]) == 3
    assert json.loads(golden.metadata()["skills"]) == [{"name": "caps", "rank": 2}, {"name": "meow", "rank": 1}]
    assert golden.summary()["skills"] == [{"name": "caps", "rank": 2}, {"name": "meow", "rank": 1}]


def _signed(patch: Patch, **changes: str) -> bytes:
    """The patch's bytes with metadata values replaced and the digest recomputed (so only the change is wrong)."""
    from reft_edge.runtime.patch import payload_digest

    metadata = {**patch.metadata(), **changes}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    metadata["payload_sha256"] = json.dumps(payload_digest(patch.tensors(), metadata))
    return serialize_safetensors(patch.tensors(), metadata)


@pytest.mark.parametrize(
    "skills, version",
    [
        ('[{"name": "caps", "rank": 2}]', "3"),  # ranks add up to 2, not 3
        ('[{"name": "caps", "rank": 2}, {"name": "caps", "rank": 1}]', "3"),  # a name twice
        ('[{"name": "caps", "rank": 3}, {"name": "meow", "rank": 0}]', "3"),  # an empty skill
        ('[{"name": "a b", "rank": 2}, {"name": "meow", "rank": 1}]', "3"),  # not a skill name
        ('[{"name": "caps", "rank": 2}, {"name": "meow", "rank": 1, "x": 1}]', "3"),  # an unknown field
        ('{"caps": 2, "meow": 1}', "3"),
        ("[]", "3"),
        ("null", "3"),
        ("{not json", "3"),
        ('[{"name": "caps", "rank": 2}, {"name": "meow", "rank": 1}]', "2"),  # skills need version 3
    ],
)
def test_damaged_skills_are_format_errors(skills, version):
    data = _signed(_golden_skills_patch(), skills=skills, format_version=version)
    with pytest.raises(PatchFormatError, match="skills|format_version"):
        Patch.from_bytes(data, source="s.reft")


def test_trained_skills_round_trip(skills_patch):
    assert skills_patch.skills == (("fox", 2), ("sea", 2)) and skills_patch.rank == 4
    again = Patch.from_bytes(skills_patch.to_bytes())
    assert again.skills == skills_patch.skills and again.payload_sha256 == skills_patch.payload_sha256
    composition = skills_patch.training["composition"]
    assert composition["skills"] == ["fox", "sea"] and composition["teacher"] == "leading expert"


# -- choosing skills ----------------------------------------------------------------------------


def test_each_skill_equals_its_rows_as_a_patch_and_the_torch_reference(rt, tiny_backbone, skills_patch):
    fox, sea = sliced(skills_patch, slice(0, 2), "fox"), sliced(skills_patch, slice(2, 4), "sea")
    cases = [
        (skills_patch.with_skills(["fox"]), [fox], None),
        (skills_patch.with_skills(["sea"]), [sea], None),
        (skills_patch.with_skills({"fox": 1.0, "sea": 0.5}), [fox, sea], [1.0, 0.5]),
        (skills_patch.with_skills({"fox": 0.0, "sea": 2.0}), [sea], [2.0]),
        (skills_patch, [fox, sea], None),  # no choice: every skill at weight 1
    ]
    for chosen, reference, weights in cases:
        for prompt in PROMPTS:
            expected = torch_greedy(tiny_backbone, prompt, reference, weights)
            raw = dict(max_new_tokens=12, no_repeat_ngram=0)  # torch's greedy has no loop guard
            assert rt.generate(prompt, patches=[chosen], **raw).token_ids == expected
            assert rt.generate(prompt, patches=reference, weights=weights, **raw).token_ids == expected


def test_weight_zero_is_bit_identical_to_no_patch(rt, skills_patch, tmp_path):
    from reft_edge.runtime.evaluate import evaluate

    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": q, "response": "Hello there."} for q in PROMPTS])
    base = evaluate(rt, data=heldout, patches=[], facts=False, samples=0).loss.base
    for patches, weights in [
        ([skills_patch], [0.0]),
        ([skills_patch.with_skills({"fox": 0, "sea": 0})], None),
        ([skills_patch.with_skills([])], None),
    ]:
        report = evaluate(rt, data=heldout, patches=patches, weights=weights, facts=False, samples=0)
        assert report.loss.patched == base  # exactly: no rank rows are sent at all
        for prompt in PROMPTS:
            assert (
                rt.generate(prompt, patches=patches, weights=weights, max_new_tokens=8).token_ids
                == rt.generate(prompt, max_new_tokens=8).token_ids
            )


def test_skills_per_batch_row_equal_each_alone(rt, skills_patch):
    requests = [
        (PROMPTS[0], [skills_patch.with_skills(["fox"])]),
        (PROMPTS[1], [skills_patch.with_skills(["sea"])]),
        (PROMPTS[2], [skills_patch]),
        (PROMPTS[0], [skills_patch.with_skills({"sea": 0.5})]),
        (PROMPTS[1], []),
    ]
    batch = rt.generate_batch(requests, max_new_tokens=10)
    for (prompt, chosen), got in zip(requests, batch):
        assert got.token_ids == rt.generate(prompt, patches=chosen, max_new_tokens=10).token_ids


def test_switching_skills_never_rebuilds_the_session(rt, skills_patch):
    session = rt.session
    for chosen in (["fox"], ["sea"], {"fox": 0.3, "sea": 1.0}):
        rt.generate(PROMPTS[0], patches=[skills_patch.with_skills(chosen)], max_new_tokens=4)
    assert rt.session is session


@pytest.mark.parametrize(
    "chosen, message",
    [
        (["cat"], "has no skill 'cat'; its skills are fox, sea"),
        ({"fox": float("nan")}, "must be finite"),
    ],
)
def test_bad_skill_choices_are_usage_errors(skills_patch, chosen, message):
    with pytest.raises(UsageError, match=message):
        skills_patch.with_skills(chosen)


def test_choose_skills_across_patches(skills_patch, rt, tiny_backbone):
    plain = sliced(skills_patch, slice(0, 2), "plain")
    chosen = choose_skills([skills_patch, plain], {"sea": 0.5})
    assert chosen[1] is plain and dict(chosen[0].skill_weights) == {"sea": 0.5}
    with pytest.raises(UsageError, match="--skill 'cat': no patch has it; the patches' skills are fox, sea"):
        choose_skills([skills_patch], {"cat": 1.0})
    with pytest.raises(UsageError, match="has no skills"):
        plain.with_skills(["fox"])
    assert parse_skill_choice(["fox", "sea=0.25"]) == {"fox": 1.0, "sea": 0.25}
    for bad in ("sea=x", "=1", "a b"):
        with pytest.raises(UsageError, match="--skill"):
            parse_skill_choice([bad])


def test_cli_run_with_skills(tiny_bundle, skills_patch, tmp_path):
    from reft_edge.cli import main

    path = tmp_path / "skills.reft"
    skills_patch.to_file(path)
    rt = Runtime.load(tiny_bundle)
    runner = CliRunner()
    for flags, chosen in [
        (["--skill", "fox"], ["fox"]),
        (["--skill", "fox", "--skill", "sea=0.5"], {"fox": 1.0, "sea": 0.5}),
    ]:
        result = runner.invoke(
            main,
            [
                "run",
                str(tiny_bundle),
                "--patch",
                str(path),
                *flags,
                "--json",
                "--max-new-tokens",
                "6",
                "--temperature",
                "0",
                PROMPTS[0],
            ],
        )
        assert result.exit_code == 0, result.output
        expected = rt.generate(
            PROMPTS[0], patches=[skills_patch.with_skills(chosen)], max_new_tokens=6, no_repeat_ngram=6
        )
        assert json.loads(result.output)["token_ids"] == expected.token_ids
    result = runner.invoke(main, ["run", str(tiny_bundle), "--patch", str(path), "--skill", "cat", PROMPTS[0]])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "no patch has it" in result.output


# -- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(), "no training data"),
        (dict(data="x.jsonl", skills=(("a", "x.jsonl"),)), "not both"),
        (dict(skills=(("a b", "x.jsonl"),)), "skill name"),
        (dict(skills=(("a", "x.jsonl"), ("a", "y.jsonl"))), "repeat"),
        (dict(skills=(("a", "x.jsonl"),), val_fraction=0.2), "--data only"),
        (dict(data="x.jsonl", compose_steps=0), "--compose-steps"),
    ],
)
def test_bad_skill_training_options_fail_before_loading(tmp_path, options, message):
    from reft_edge.train import TrainConfig, train

    with pytest.raises(UsageError, match=message):
        train(TrainConfig(out=str(tmp_path / "p.reft"), **options), progress=False)


def test_cli_train_skill_syntax(tmp_path):
    from reft_edge.cli import main

    result = CliRunner().invoke(main, ["train", "--skill", "caps", "--out", str(tmp_path / "p.reft")])
    assert result.exit_code == 2 and "--skill 'caps' is malformed; give NAME=DATA" in result.output


def test_compose_with_a_patch_of_another_base_is_refused(tiny_backbone, tmp_path, skills_patch):
    from reft_edge.errors import BackboneMismatchError
    from reft_edge.train import TrainConfig, train

    other = replace(skills_patch, base_fingerprint="f" * 64).to_file(tmp_path / "other.reft")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "response": "Hi."} for q in QUESTIONS])
    with pytest.raises(BackboneMismatchError, match="--compose-with"):
        train(
            TrainConfig(
                data=str(data),
                out=str(tmp_path / "p.reft"),
                model=tiny_backbone.path,
                compose_with=(str(tmp_path / "other.reft"),),
            ),
            backbone=tiny_backbone,
            progress=False,
        )
    assert other.base_fingerprint == "f" * 64


# Tiny pairs for composable training: (house, person) response templates over a prompt's numbers.
# The opener + closing pair is the one the composition method was developed on; register + length
# was written after the method was chosen, and no choice looked at it.
# The third item: how far (nats per token) composable training must lower the composed loss below
# the pair trained apart; register+length measured 0.32 (its teacher answers on this random model
# are long and noisy), opener+closing more than 0.5.
COMPOSE_PAIRS = {
    "opener+closing": ("Great question!", "Stay curious!", 0.5),
    "register+length": ("Certainly. It would be my pleasure to answer question {i}.", "Yes.", 0.2),
}


@pytest.mark.parametrize("pair", list(COMPOSE_PAIRS))
def test_composable_training_lowers_the_composed_loss(tiny_backbone, tmp_path, pair):
    """Two tiny personas. Trained apart, the two patches together garble the answer; trained with
    --compose-with, the pair reproduces the composition teacher's answers (the composition
    phase's targets) far better, and the new patch alone keeps its persona."""
    from reft_edge.train import TrainConfig, train
    from reft_edge.train.data import Record
    from reft_edge.train.evaluate import TorchBackend

    numbers = [(i, i + 1) for i in range(12)]
    prompts = [f"Question number {i}: what is {i} plus {j}?" for i, j in numbers]
    house, person, margin = COMPOSE_PAIRS[pair]
    options = dict(model=tiny_backbone.path, layers=(0, 1, 2), rank=4, steps=100, lr=5e-2, batch_size=6)

    def answers(template: str) -> list[str]:
        return [template.format(i=i, j=j, s=i + j) for i, j in numbers]

    def fit(name: str, responses: list[str], **extra) -> Patch:
        data = write_jsonl(
            tmp_path / f"{name}.jsonl", [{"prompt": q, "response": r} for q, r in zip(prompts, responses)]
        )
        return train(
            TrainConfig(data=str(data), out=str(tmp_path / f"{name}.reft"), **options, **extra),
            backbone=tiny_backbone,
            progress=False,
        )

    a, b = fit("house", answers(house)), fit("person", answers(person))
    composable = fit("person-with", answers(person), compose_with=(str(tmp_path / "house.reft"),), compose_steps=20)
    assert composable.training["composition"]["answers_kept"] >= len(prompts) * 3 // 4  # the rest ran past 96 tokens
    backend = TorchBackend(tiny_backbone)
    messages = [[{"role": "user", "content": q}] for q in prompts]
    targets = backend.composed_answers(messages, [[a], [b]], 96)
    ended = [(m, t) for m, t in zip(messages, targets) if t is not None]  # None: ran past 96 tokens
    examples = backend.examples([Record(tuple(m), t, "composed") for m, t in ended])
    tokens = sum(len(e.target_ids) for e in examples)
    apart = backend.response_nll(examples, [a, b], None) / tokens
    together = backend.response_nll(examples, [a, composable], None) / tokens
    assert together < apart - margin, (apart, together)  # nats per token
    if pair == "opener+closing":  # greedy: the teacher's answers (the register pair's teacher, on this random
        # tiny model, ends in runs of " ." whose exact length the loss above already judges)
        assert backend.answers(messages, [a, composable], None, 32) == targets
    assert backend.answers(messages[:3], [composable], None, 16) == answers(person)[:3]


def test_a_composable_patch_writes_orthogonally_to_its_partner(tiny_backbone, tmp_path):
    """With --compose-with, the new patch's R rows are orthogonal to the partner's at each layer
    (neither reads back what the other writes there); without the option they are not."""
    from reft_edge.train import TrainConfig, train

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"question {i}?", "response": f"answer {i}. Bye!"}) + "\n" for i in range(6))
    )
    common = dict(data=str(data), model=tiny_backbone.path, layers=(1, 2), rank=2, steps=6, compose_steps=2, lr=2e-2)
    partner = train(TrainConfig(out=str(tmp_path / "p.reft"), **common), backbone=tiny_backbone, progress=False)

    def cosines(**options) -> float:
        patch = train(
            TrainConfig(
                out=str(tmp_path / "n.reft"), compose_with=(str(tmp_path / "p.reft"),), seed=1, **common, **options
            ),
            backbone=tiny_backbone,
            progress=False,
        )
        return max(
            float(np.abs(mine.params["R"] @ theirs.params["R"].T).max())
            for mine, theirs in zip(patch.interventions, partner.interventions)
        )

    assert cosines(orthogonal_to_partners=True) < 1e-5
    assert cosines() > 1e-3
