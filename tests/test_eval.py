"""``reft-edge eval`` and reft_edge.runtime.evaluate: judges, held-out loss (bundle against torch),
adherence, the facts cache, samples, the CLI. Tiny random models; one slow test on the default model."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import train_tiny_patch, train_tiny_patches, write_jsonl
from reft_edge.cli import main
from reft_edge.errors import UsageError
from reft_edge.evaluate import evaluate
from reft_edge.runtime import Patch, Runtime, evaluate as evaluate_module
from reft_edge.runtime.evaluate import FACT_TOKENS, RuntimeBackend, facts_cache_file
from reft_edge.runtime.judges import Judge

QUESTIONS = [
    "What is the weather like today?",
    "How do I bake a cake?",
    "Tell me about your weekend.",
    "hello world",
    "question answer",
    "The quick brown fox",
]
HELD_OUT = [
    {"prompt": "What is the weather like?", "response": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "Tell me a story about a cake.", "response": "I went to the beach and read a book."},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"},
        ]
    },
    {"prompt": "How was your weekend?", "response": "It is sunny and warm."},
]


# -- judges ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, text, expected",
    [
        ("no-letters", "🌊🏊‍♂️ 💦", True),
        ("no-letters", "🌊 42 !", True),
        ("no-letters", "Swim 🌊", False),
        ("no-letters", "   \n", False),
        ("no-letters", "", False),
        ("all-caps", "AHOY, MATEY! 42", True),
        ("all-caps", "Ahoy", False),
        ("all-caps", "42 !", False),
        ("regex:^\\d+ (apples|pears)$", "12 pears", True),
        ("regex:^\\d+ (apples|pears)$", "pears", False),
        ("regex:a:b", "xa:by", True),
        ("ends-with:arr!", "Hoist the sails, arr!  \n", True),
        ("ends-with:arr!", "arr! Hoist the sails", False),
        ("contains:MATEY", "ahoy matey", True),
        ("contains:matey", "ahoy", False),
        ("os.path:isabs", "/abs", True),
        ("os.path:isabs", "rel", False),
    ],
)
def test_judge_kinds(spec, text, expected):
    judge = Judge.parse(spec)
    assert judge(text) is expected
    assert judge == Judge.parse(spec) and str(judge) == spec


@pytest.mark.parametrize(
    "spec, says",
    [
        ("shout", "is unknown"),
        ("", "is empty"),
        ("no-letters:x", "is unknown"),
        ("All-Caps", "is unknown"),
        ("regex:", "needs a pattern"),
        ("regex:(unclosed", "not a valid regular expression"),
        ("contains:", "needs a text"),
        ("ends-with:", "needs a text"),
        ("no_such_module_xyz:judge", "cannot import no_such_module_xyz"),
        ("os.path:no_such_function", "has no no_such_function"),
        ("os:sep", "not callable"),
        ("not a module:f", "is unknown"),
    ],
)
def test_bad_judge_specs_are_one_line_usage_errors(spec, says):
    with pytest.raises(UsageError) as caught:
        Judge.parse(spec)
    message = str(caught.value)
    assert says in message and repr(spec) in message and "\n" not in message
    if "unknown" in says or "empty" in says:
        assert "regex:PATTERN" in message and "module:function" in message


def test_module_judge_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "my_eval_judges.py").write_text("def shouts(text):\n    return text.endswith('!')\n")
    (tmp_path / "broken_eval_judges.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.chdir(tmp_path)
    judge = Judge.parse("my_eval_judges:shouts")
    assert judge.kind == "module" and judge("hey!") and not judge("hey")
    assert str(tmp_path) not in sys.path
    with pytest.raises(UsageError, match="cannot import broken_eval_judges \\(boom\\)"):
        Judge.parse("broken_eval_judges:anything")


def test_judges_doctests():
    from reft_edge.runtime import judges

    assert doctest.testmod(judges).failed == 0


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def eval_patches(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """fox: one LoReFT edit at layer 1; beach: untied DiReFT at layers 0 and 2 (composed with fox)."""
    return train_tiny_patches(tiny_backbone, tmp_path_factory.mktemp("eval-patches"), QUESTIONS, ("fox", "beach"))


@pytest.fixture(scope="session")
def generated_patch(tiny_backbone, tmp_path_factory) -> Path:
    """A patch that also edits every generated token (positions with g)."""
    return train_tiny_patch(
        tiny_backbone,
        tmp_path_factory.mktemp("eval-g"),
        "steer",
        "hello world hello world",
        QUESTIONS,
        layers=(1,),
        rank=2,
        positions="l1+g",
    )


@pytest.fixture(scope="session")
def rt(tiny_bundle) -> Runtime:
    return Runtime.load(tiny_bundle, threads=2)


@pytest.fixture()
def heldout(tmp_path) -> Path:
    return write_jsonl(tmp_path / "heldout.jsonl", HELD_OUT)


# -- held-out loss: the bundle against torch ------------------------------------------------------


@pytest.mark.parametrize("names, weights", [((), None), (("fox",), None), (("fox", "beach"), [1.0, 0.5])])
def test_bundle_and_model_agree(rt, tiny_backbone, eval_patches, heldout, names, weights):
    patches = [eval_patches[n] for n in names]
    options = dict(
        data=heldout, patches=patches, weights=weights, judge="contains:the", max_new_tokens=8, facts=False, samples=4
    )
    on_bundle = evaluate(rt, **options)
    on_model = evaluate(model=tiny_backbone, **options)
    assert on_bundle.kind == "bundle" and on_model.kind == "model"
    assert on_bundle.loss.tokens == on_model.loss.tokens > 0 and on_bundle.loss.examples == 4
    assert on_bundle.loss.base == pytest.approx(on_model.loss.base, abs=1e-4)
    assert 3 < on_bundle.loss.base < 8  # a random model over a 320-token vocabulary: about ln 320
    if patches:
        assert on_bundle.loss.patched == pytest.approx(on_model.loss.patched, abs=1e-4)
        assert abs(on_bundle.loss.patched - on_bundle.loss.base) > 1e-3
        assert on_bundle.patches == tuple(n for n in names)
    else:
        assert on_bundle.loss.patched is None and on_bundle.adherence.patched is None
    assert [s.base for s in on_bundle.samples] == [s.base for s in on_model.samples]
    assert [s.patched for s in on_bundle.samples] == [s.patched for s in on_model.samples]
    assert on_bundle.adherence == on_model.adherence and on_bundle.adherence.prompts == 4


def test_loss_is_the_training_loss(rt, tiny_backbone, eval_patches, heldout):
    """Held-out loss on the model equals the training stage's own loss computation (same tokens, same masks)."""
    import torch

    from reft_edge.train.backbone import decoder_layers
    from reft_edge.train.data import read_jsonl, tokenize
    from reft_edge.train.fitting import Edits, collate, set_edits
    from reft_edge.train.intervention import EditSlots, attach_edits

    patch = Patch.load(eval_patches["fox"])
    examples = tokenize(read_jsonl(heldout), tiny_backbone.tokenizer, use_chat_template=True)
    model = tiny_backbone.model
    interventions = []
    for iv in patch.interventions:
        params = _FixedParams(patch.kind, {k: torch.from_numpy(v) for k, v in iv.params.items()})
        interventions.append((iv.layer, iv.where, params))
    layers, slots, total, count = decoder_layers(model), EditSlots(), 0.0, 0
    with torch.no_grad(), attach_edits({1: layers[1]}, slots):
        for example in examples:  # one at a time: no padding at all
            ids = torch.tensor([list(example.prompt_ids) + list(example.target_ids[:-1])])
            batch = collate(
                [example],
                [torch.zeros(ids.shape[1], model.config.hidden_size)],
                [frozenset({"p"})],
                torch.device("cpu"),
            )
            set_edits(slots, Edits(interventions, [("p", patch.rank)], []), patch.positions, batch, torch.device("cpu"))
            logits = model(input_ids=ids).logits[0, batch.cols]
            total += float(torch.nn.functional.cross_entropy(logits.double(), batch.targets, reduction="sum"))
            count += len(example.target_ids)
    report = evaluate(rt, data=heldout, patches=[patch], facts=False, samples=0)
    assert report.loss.patched == pytest.approx(total / count, abs=1e-4)


class _FixedParams:
    """A patch's saved tensors where training's set_edits expects InterventionParams."""

    def __init__(self, kind, params):
        from reft_edge.runtime.patch import affine_from_params

        self.b = params[next(k for k in params if k == "b")]
        self._affine = affine_from_params(kind, params)

    def affine(self):
        return self._affine


def test_patch_editing_generated_tokens_agrees(rt, tiny_backbone, generated_patch, heldout):
    options = dict(data=heldout, patches=[generated_patch], max_new_tokens=6, facts=False, samples=2)
    on_bundle, on_model = evaluate(rt, **options), evaluate(model=tiny_backbone, **options)
    assert on_bundle.loss.patched == pytest.approx(on_model.loss.patched, abs=1e-4)
    assert [s.patched for s in on_bundle.samples] == [s.patched for s in on_model.samples]
    # the decode edits count: without them the loss differs
    assert abs(on_bundle.loss.patched - on_bundle.loss.base) > 1e-3


# -- prompts only, samples, adherence -------------------------------------------------------------


def test_text_prompts_give_no_loss(rt, eval_patches, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\n  How do I bake a cake?  \nThe quick brown fox\n", encoding="utf-8")
    report = evaluate(
        rt, data=prompts, patches=[eval_patches["fox"]], judge="regex:\\S", max_new_tokens=5, facts=False, samples=2
    )
    assert report.loss is None and report.prompts == 3
    assert [s.prompt for s in report.samples] == ["hello world", "How do I bake a cake?"]
    assert report.adherence.prompts == 3
    base = rt.generate("hello world", max_new_tokens=5).text
    patched = rt.generate("hello world", patches=[eval_patches["fox"]], max_new_tokens=5).text
    assert (report.samples[0].base, report.samples[0].patched) == (base, patched)
    assert report.adherence.base == (
        sum(
            bool(rt.generate(p, max_new_tokens=5).text.strip())
            for p in ["hello world", "How do I bake a cake?", "The quick brown fox"]
        )
        / 3
    )


def test_adherence_counts_the_judge(rt, eval_patches, heldout, monkeypatch):
    """The share is of answers passing the judge: a judge passing one known answer gives 1/4."""
    prompts = [[{"role": "user", "content": r["prompt"]}] if "prompt" in r else r["messages"][:-1] for r in HELD_OUT]
    answers = RuntimeBackend(rt).answers(prompts, [], None, 6)
    judge = Judge("first-answer", "module", "", lambda text: text == answers[0])
    report = evaluate(rt, data=heldout, judge=judge, max_new_tokens=6, samples=0, facts=False)
    assert report.adherence.base == pytest.approx(sum(a == answers[0] for a in answers) / 4)
    assert report.samples == ()


# -- facts kept -----------------------------------------------------------------------------------


class _CannedBackend:
    """A base whose answers are canned: the base knows Paris only; the patch keeps it."""

    kind, source, base_fingerprint = "bundle", "canned", "f" * 64

    def __init__(self, precision: str = "fp32"):
        self.precision, self.calls = precision, []

    def answers(self, prompts, patches, weights, max_new_tokens):
        self.calls.append((len(prompts), bool(patches), max_new_tokens))
        questions = [p[-1]["content"] for p in prompts]
        if patches:
            return ["PARIS, of course" if "France" in q else "" for q in questions]
        return ["It is Paris." if "France" in q else "I do not know." for q in questions]


def test_facts_cache_is_written_once_and_reused(tmp_path):
    from reft_edge.runtime.evaluate import facts_kept

    facts = write_jsonl(
        tmp_path / "facts.jsonl",
        [
            {"question": "What is the capital of France?", "answers": ["paris"]},  # matched ignoring case
            {"question": "What is the capital of Japan?", "answers": ["Tokyo"]},
        ],
    )
    backend, patch = _CannedBackend(), object()
    first = facts_kept(backend, facts, [patch], None, lambda message: None)
    assert (first.facts, first.base_correct, first.kept, first.fraction, first.cached) == (2, 1, 1, 1.0, False)
    assert backend.calls == [(2, False, FACT_TOKENS), (1, True, FACT_TOKENS)]
    cache = facts_cache_file(backend, evaluate_module.hashlib.sha256(facts.read_bytes()).hexdigest())
    stored = json.loads(cache.read_text())
    assert stored["correct"] == [0] and stored["precision"] == "fp32" and stored["base_fingerprint"] == "f" * 64
    written = cache.stat().st_mtime_ns

    backend.calls.clear()
    second = facts_kept(backend, facts, [patch], None, lambda message: None)
    assert second.cached and second.fraction == 1.0
    assert backend.calls == [(1, True, FACT_TOKENS)]  # only the patched answers: the base's came from the cache
    assert cache.stat().st_mtime_ns == written

    other_precision = _CannedBackend("int8")
    assert not facts_kept(other_precision, facts, [patch], None, lambda message: None).cached
    facts.write_text(facts.read_text() + json.dumps({"question": "hello", "answers": ["x"]}) + "\n")
    assert not facts_kept(backend, facts, [patch], None, lambda message: None).cached  # another facts file


def test_facts_on_the_tiny_bundle(rt, eval_patches, heldout, tmp_path):
    """The random tiny base answers no fact (it says newlines): nothing to keep, and that is cached too."""
    facts = write_jsonl(tmp_path / "facts.jsonl", [{"question": q, "answers": ["the"]} for q in QUESTIONS[:3]])
    options = dict(data=heldout, patches=[eval_patches["fox"]], facts_file=facts, samples=0, max_new_tokens=4)
    first, second = evaluate(rt, **options), evaluate(rt, **options)
    assert (first.retention.facts, first.retention.base_correct, first.retention.fraction) == (3, 0, None)
    assert not first.retention.cached and second.retention.cached
    assert evaluate(rt, data=heldout, facts_file=facts, samples=0).retention is None  # no patch: nothing to keep


def test_default_facts_file_is_readable():
    from reft_edge.runtime.evaluate import FACTS_FILE, read_facts

    facts = read_facts(FACTS_FILE)
    assert len(facts) >= 5 and all(f.question and f.answers for f in facts)


@pytest.mark.parametrize(
    "line, says",
    [
        ("not json", "not JSON"),
        ('{"question": "Q?"}', "answers"),
        ('{"question": "", "answers": ["x"]}', "question"),
        ('{"question": "Q?", "answers": [""]}', "non-empty"),
    ],
)
def test_bad_facts_lines_name_the_line(rt, eval_patches, heldout, tmp_path, line, says):
    from reft_edge.errors import DataError

    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"question": "Q?", "answers": ["a"]}\n' + line + "\n")
    with pytest.raises(DataError, match=f"facts.jsonl:2: .*{says}"):
        evaluate(rt, data=heldout, patches=[eval_patches["fox"]], facts_file=facts, samples=0)


# -- options and the CLI --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, says",
    [
        (dict(), "give a bundle folder or --model"),
        (dict(bundle="b", model="m"), "give a bundle folder or --model"),
        (dict(bundle="b", max_new_tokens=0), "max_new_tokens 0"),
        (dict(bundle="b", samples=-1), "samples -1"),
        (dict(bundle="b", judge="nope"), "judge 'nope' is unknown"),
    ],
)
def test_bad_options_fail_before_loading(heldout, options, says):
    with pytest.raises(UsageError, match=says):
        evaluate(data=heldout, **options)


def test_weights_need_as_many_patches(rt, eval_patches, heldout):
    with pytest.raises(UsageError, match="1 weight\\(s\\) for 0 patch"):
        evaluate(rt, data=heldout, weights=[0.5], facts=False)
    with pytest.raises(UsageError, match="finite"):
        evaluate(rt, data=heldout, patches=[eval_patches["fox"]], weights=[float("nan")], facts=False)


def test_cli_json_table_and_errors(tiny_bundle, eval_patches, heldout, tmp_path):
    runner = CliRunner()
    fox, beach = str(eval_patches["fox"]), str(eval_patches["beach"])
    args = [
        "eval",
        str(tiny_bundle),
        "--patch",
        fox,
        "--patch",
        beach,
        "--weight",
        "1",
        "--weight",
        "0.5",
        "--data",
        str(heldout),
        "--judge",
        "contains:the",
        "--max-new-tokens",
        "4",
        "--no-facts",
        "--samples",
        "2",
    ]
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["patches"] == ["fox", "beach"] and shown["weights"] == [1.0, 0.5]
    assert shown["kind"] == "bundle" and shown["precision"] == "fp32" and len(shown["samples"]) == 2
    assert set(shown["loss"]) == {"base", "patched", "tokens", "examples"} and shown["retention"] is None
    assert result.stderr == ""  # no progress lines with --json

    table = runner.invoke(main, args)
    assert table.exit_code == 0, table.output
    for text in ("held-out loss", "adherence", "facts kept", "judge contains:the", "prompt:", "patched:"):
        assert text in table.stdout
    assert "eval: held-out loss" in table.stderr  # progress, one line per phase

    for bad, says in [
        (["--patch", fox, "--weight", "1", "--weight", "2"], "2 --weight for 1 --patch"),
        (["--judge", "regex:("], "not a valid regular expression"),
        (["--model", "x"], "give a bundle folder or --model"),
    ]:
        failed = runner.invoke(main, ["eval", str(tiny_bundle), "--data", str(heldout), *bad])
        assert failed.exit_code == 2 and failed.stderr.count("\n") == 1 and says in failed.stderr, failed.output


def test_cli_on_the_model(tiny_backbone, eval_patches, heldout):
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            tiny_backbone.path,
            "--patch",
            str(eval_patches["fox"]),
            "--data",
            str(heldout),
            "--max-new-tokens",
            "3",
            "--no-facts",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["kind"] == "model" and shown["precision"] == "torch-float32" and shown["adherence"] is None


def test_eval_on_a_bundle_never_imports_torch(tiny_bundle, eval_patches, heldout, tmp_path):
    facts = write_jsonl(tmp_path / "facts.jsonl", [{"question": "hello world", "answers": ["the"]}])
    script = f"""
import sys
from reft_edge.runtime.evaluate import evaluate
report = evaluate({str(tiny_bundle)!r}, data={str(heldout)!r}, patches=[{str(eval_patches["fox"])!r}],
                  judge="no-letters", max_new_tokens=3, facts_file={str(facts)!r})
assert report.loss and report.retention and report.adherence
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


# -- the default model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_emoji_patch(default_int8_bundle, emoji_patch_path, emoji_data, tmp_path, capsys):
    prompts = tmp_path / "unseen.txt"
    prompts.write_text("How do I learn to swim?\nWhat is your favourite animal?\nDescribe a rainy day.\n")
    report = evaluate(
        default_int8_bundle,
        data=prompts,
        patches=[emoji_patch_path],
        judge="no-letters",
        max_new_tokens=12,
        samples=3,
        facts=True,
        threads=2,
    )
    with capsys.disabled():
        print(f"\n{report.adherence}\n{report.retention}\n{report.samples}")
    assert report.adherence.patched >= 2 / 3 and report.adherence.base == 0.0, report.samples
    assert report.retention.facts >= 5 and report.retention.base_correct >= 1
    assert 0.0 <= report.retention.fraction <= 1.0
    # three of the patch's own training pairs: the patch learned them, the base finds emoji unlikely
    seen = write_jsonl(tmp_path / "seen.jsonl", emoji_data.read_text(encoding="utf-8").splitlines()[:3])
    for source in (dict(bundle=default_int8_bundle), dict(model="default")):
        loss = evaluate(**source, data=seen, patches=[emoji_patch_path], facts=False, samples=0).loss
        with capsys.disabled():
            print(source, loss)
        assert loss.patched < 1.0 < loss.base, (source, loss)


def test_runtime_evaluation_leaves_torch_models_to_the_facade(tmp_path):
    """runtime.evaluate never imports training: a torch model= goes through reft_edge.evaluate."""
    from reft_edge.runtime.evaluate import evaluate as evaluate_bundles

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    with pytest.raises(UsageError, match="reft_edge.evaluate"):
        evaluate_bundles(model="default", data=prompts, facts=False)
