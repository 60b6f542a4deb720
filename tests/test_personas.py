"""The recipe-study personas and the facts set: complete, disjoint splits, and every answer passes its own judge.

Each folder under examples/personas/ holds train.jsonl, val.jsonl, unseen.txt (prompts for
measuring adherence on questions the patch never saw) and persona.json (name, kind,
description, judge spec, keeps_content).
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT
from reft_edge.runtime.judges import Judge
from reft_edge.train.data import read_jsonl

PERSONAS = ROOT / "examples" / "personas"
FACTS = ROOT / "runtime" / "facts.jsonl"
NAMES = sorted(p.name for p in PERSONAS.iterdir() if (p / "persona.json").is_file())
KINDS = {"format", "closing", "register", "brevity", "topic", "language", "opener"}
MAX_WORDS = 45  # training cost grows with the response length; the model is small


@pytest.fixture(autouse=True)
def _importable_examples(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # module:function judges live in examples.personas.judges


def _key(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", prompt.casefold()).strip()


def _persona(name: str) -> dict:
    return json.loads((PERSONAS / name / "persona.json").read_text(encoding="utf-8"))


def _pairs(name: str, split: str) -> list[tuple[str, str]]:
    return [(r.messages[-1]["content"], r.response) for r in read_jsonl(PERSONAS / name / f"{split}.jsonl")]


def _unseen(name: str) -> list[str]:
    return (PERSONAS / name / "unseen.txt").read_text(encoding="utf-8").splitlines()


def _facts() -> list[dict]:
    return [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_personas_of_every_kind():
    assert KINDS <= {_persona(name)["kind"] for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_persona_files_are_complete_and_splits_disjoint(name):
    meta = _persona(name)
    assert set(meta) == {"name", "kind", "description", "judge", "keeps_content"}
    assert meta["name"] == name and meta["kind"].strip() and isinstance(meta["keeps_content"], bool)
    assert meta["description"].strip() and "\n" not in meta["description"]
    Judge.parse(meta["judge"])  # a strict parser accepts it
    train, val, unseen = _pairs(name, "train"), _pairs(name, "val"), _unseen(name)
    assert len(train) >= 16 and len(val) >= 8 and len(unseen) == 20
    assert all(line.strip() == line and line for line in unseen)
    keys = [_key(p) for p, _ in train + val] + [_key(p) for p in unseen]
    assert len(set(keys)) == len(keys), "a prompt repeats across train, val and unseen"
    for _, response in train + val:
        assert len(response.split()) <= MAX_WORDS, response


@pytest.mark.parametrize("name", NAMES)
def test_every_training_and_validation_answer_passes_its_judge(name):
    judge = Judge.parse(_persona(name)["judge"])
    failing = [r for _, r in _pairs(name, "train") + _pairs(name, "val") if not judge(r)]
    assert not failing
    assert all(judge(r + "  \n") for _, r in _pairs(name, "train"))  # trailing whitespace is fine


@pytest.mark.parametrize("name", NAMES)
def test_judge_tells_the_persona_apart(name):
    judge = Judge.parse(_persona(name)["judge"])
    plain = (
        "The capital of France is Paris. It is known for the Eiffel Tower, its museums and its food, "
        "and millions of people visit it every year."
    )
    assert not judge(plain)
    others = [r for other in NAMES if other != name for _, r in _pairs(other, "train")]
    passing = sum(judge(r) for r in others)
    assert passing <= 0.15 * len(others), f"{passing} of {len(others)} other personas' answers pass"


def test_judges_handle_answers_cut_at_the_token_limit():
    from examples.personas import judges

    assert judges.at_most_12_words("The capital of Portugal is Lisbon.")
    assert not judges.at_most_12_words("The capital of Portugal is")  # cut mid-sentence
    assert not judges.at_most_12_words(" ".join(["word"] * 13) + ".")
    closing = Judge.parse(_persona("signoff")["judge"])
    assert closing("Paris is the capital of France. Stay curious! \n")
    assert not closing("Stay curious! Paris is the capital of France, and it")
    assert judges.formal_register("Certainly. The capital of France is Paris.")
    assert not judges.formal_register("Certainly. It's Paris.")
    assert not judges.formal_register("Certainly! Paris.")
    assert not judges.formal_register("The capital is Paris. Certainly.")
    assert judges.all_lowercase("paris is the capital of france, and it")
    assert not judges.all_lowercase("paris is in France.") and not judges.all_lowercase("42 !")
    assert judges.mentions_gardening("Lovely weather for the Gardener.") and not judges.mentions_gardening("Paris.")


def test_facts_file():
    facts = _facts()
    assert 30 <= len(facts) <= 60
    questions = [_key(f["question"]) for f in facts]
    assert len(set(questions)) == len(questions)
    for fact in facts:
        assert set(fact) == {"question", "answers"} and fact["question"].strip().endswith("?")
        assert fact["answers"] and all(isinstance(a, str) and a.strip() == a and a for a in fact["answers"])


def test_facts_are_not_persona_training_questions():
    from reft_edge.runtime.evaluate import TEST_FACTS_FILE, read_facts

    questions = {_key(f["question"]) for f in _facts()} | {_key(f.question) for f in read_facts(TEST_FACTS_FILE)}
    trained = {_key(p) for name in NAMES for split in ("train", "val") for p, _ in _pairs(name, split)}
    assert not questions & trained, "retention would be measured on trained questions"


def test_facts_ship_with_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "facts.jsonl" in config["tool"]["setuptools"]["package-data"]["reft_edge.runtime"]
