"""Evaluate patches on held-out data: held-out loss, adherence to a judge, facts kept, samples.

Example::

    from reft_edge.runtime.evaluate import evaluate
    report = evaluate("bundle-int8", data="heldout.jsonl", patches=["emoji.reft"], judge="no-letters")
    print(report.loss.patched, report.adherence.patched, report.retention.fraction)
    print(json.dumps(report.to_dict()))

    from reft_edge.evaluate import evaluate   # also a torch model (the training stage's backend)
    evaluate(model="default", data="prompts.txt", patches=["emoji.reft"])

A bundle is measured as devices run it, through the runtime (torch-free); ``model=``
runs the Hugging Face model with the training stage's hooks (reft_edge.train.evaluate),
which reft_edge.evaluate passes in (``open_model``): the runtime never imports training.
Both answer the same few questions (``Backend``), in batches, greedily:

1. held-out loss: the mean negative log-likelihood per response token (the response and
   the end-of-turn token, tokenized exactly as training tokenizes them), with and
   without the patches; only when the data has responses (JSONL, not .txt);
2. adherence (with ``judge``): the share of held-out prompts whose greedy answer passes
   the judge, with the patches and, for reference, without;
3. facts kept: the facts file's questions the base answers correctly (computed once per
   base and cached in the cache folder), and the share of those still answered
   correctly with the patches;
4. samples: a few prompts with the base answer beside the patched one.

On a bundle the loss is teacher-forced through the runtime's own engine with the
runtime's own slot arrays, so every position a patch edits while generating (prompt
tokens at prefill, generated tokens at decode) is edited exactly as in generation.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reft_edge.errors import DataError, UsageError
from reft_edge.files import atomic_write_bytes, cache_dir
from reft_edge.records import BATCH_SIZE, Example, Messages, Record, chunks, read_jsonl, tokenize
from reft_edge.runtime.judges import Judge
from reft_edge.runtime.loops import loop_share
from reft_edge.runtime.patch import Patch
from reft_edge.runtime.slots import check_weights

FACTS_FILE = Path(__file__).with_name("facts.jsonl")  # the development split: recipe choices and --auto look at it
TEST_FACTS_FILE = Path(__file__).with_name("facts_test.jsonl")  # the test split: only ever reported
FACT_TOKENS = 32  # greedy tokens per fact question
FACTS_CACHE_VERSION = 1  # bump when what the cache holds, or how it is computed, changes
Say = Callable[[str], None]


# -- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossReport:
    """Mean negative log-likelihood per response token (nats)."""

    base: float
    patched: float | None  # None without patches
    tokens: int
    examples: int


@dataclass(frozen=True)
class AdherenceReport:
    """Share of held-out prompts whose greedy answer passes the judge."""

    judge: str
    base: float
    patched: float | None  # None without patches
    prompts: int
    loops_base: float | None = None  # share of answers that loop (runtime.loops)
    loops_patched: float | None = None


@dataclass(frozen=True)
class RetentionReport:
    """Of the facts the base answers correctly, the share still answered correctly with the patches."""

    facts_file: str
    facts: int
    base_correct: int
    kept: int
    fraction: float | None  # None when the base answers none of the facts
    cached: bool  # the base's answers came from the cache


@dataclass(frozen=True)
class Sample:
    prompt: str
    base: str
    patched: str | None  # None without patches


@dataclass(frozen=True)
class EvalReport:
    source: str  # the bundle folder or the model
    kind: str  # bundle | model
    precision: str
    base_fingerprint: str
    patches: tuple[str, ...]
    weights: tuple[float, ...]
    data: str
    prompts: int
    max_new_tokens: int
    loss: LossReport | None
    adherence: AdherenceReport | None
    retention: RetentionReport | None
    samples: tuple[Sample, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        return {
            **values,
            "patches": list(self.patches),
            "weights": list(self.weights),
            "samples": [asdict(s) for s in self.samples],
        }


# -- what a base must answer --------------------------------------------------------------------


class Backend(Protocol):
    """A base that can be evaluated: a bundle (RuntimeBackend) or a torch model (train.evaluate.TorchBackend)."""

    kind: str
    source: str
    precision: str
    base_fingerprint: str

    def load_patches(self, patches: Sequence[Patch | str | Path]) -> list[Patch]: ...

    def examples(self, records: Sequence[Record]) -> list[Example]: ...

    def response_nll(
        self, examples: Sequence[Example], patches: Sequence[Patch], weights: Sequence[float] | None
    ) -> float: ...

    def answers(
        self,
        prompts: Sequence[Messages],
        patches: Sequence[Patch],
        weights: Sequence[float] | None,
        max_new_tokens: int,
    ) -> list[str]: ...


class RuntimeBackend:
    """A bundle, through the torch-free runtime."""

    kind = "bundle"

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.source = str(runtime.bundle_dir)
        self.precision = runtime.manifest.precision
        self.base_fingerprint = runtime.manifest.base_fingerprint

    def load_patches(self, patches: Sequence[Patch | str | Path]) -> list[Patch]:
        return self.runtime.load_patches(list(patches))

    def examples(self, records: Sequence[Record]) -> list[Example]:
        rt = self.runtime
        examples = tokenize(list(records), _TrainingTokenizer(rt), use_chat_template=rt.template is not None)
        limit = rt.manifest.context_length
        for record, example in zip(records, examples):
            n = len(example.prompt_ids) + len(example.target_ids)
            if n > limit:
                raise DataError(
                    f"{record.where}: prompt and response take {n} tokens, more than the bundle's "
                    f"context length {limit}; shorten or drop this example"
                )
        return examples

    def response_nll(
        self, examples: Sequence[Example], patches: Sequence[Patch], weights: Sequence[float] | None
    ) -> float:
        from reft_edge.runtime.slots import resolve_edits

        edits = resolve_edits(patches, weights, self.runtime.manifest.slot_layers)
        return sum(teacher_forced_nll(self.runtime, chunk, edits) for chunk in chunks(examples, BATCH_SIZE))

    def answers(
        self,
        prompts: Sequence[Messages],
        patches: Sequence[Patch],
        weights: Sequence[float] | None,
        max_new_tokens: int,
    ) -> list[str]:
        texts = []
        for chunk in chunks(prompts, BATCH_SIZE):
            requests = [(list(prompt), patches, weights) for prompt in chunk]
            # no loop guard: evaluation measures what the patch does, loops included
            texts += [
                g.text for g in self.runtime.generate_batch(requests, max_new_tokens=max_new_tokens, no_repeat_ngram=0)
            ]
        return texts


class _TrainingTokenizer:
    """The runtime's tokenizer and chat template under the names records.tokenize calls, so
    held-out examples are tokenized by the training code itself."""

    def __init__(self, runtime: Any):
        self._runtime = runtime
        self.chat_template = runtime.template is not None
        self.eos_token = runtime.manifest.special_tokens.get("eos_token") or ""

    def apply_chat_template(
        self, messages: Messages, *, tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        return self._runtime.template.render(list(messages), add_generation_prompt=add_generation_prompt)

    def __call__(self, text: str, *, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self._runtime.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}


def teacher_forced_nll(runtime: Any, examples: Sequence[Example], edits: Sequence[Any]) -> float:
    """Summed NLL of the examples' target tokens: prefill the prompts, then feed the targets one
    decode step at a time (rows already done are fed the pad id and ignored)."""
    from reft_edge.runtime.slots import slot_arrays

    manifest = runtime.manifest
    prompts = [list(e.prompt_ids) for e in examples]
    targets = [list(e.target_ids) for e in examples]
    steps = max(len(t) for t in targets)
    slots = slot_arrays([edits] * len(examples), len(manifest.slot_layers), manifest.hidden_size)
    run = runtime._engine.start(prompts, slots, steps)
    logits, total = run.prefill(), 0.0
    for step in range(steps):
        live = [row for row, target in enumerate(targets) if step < len(target)]
        total += float(token_nll(logits[live], [targets[row][step] for row in live]).sum())
        if step + 1 < steps:
            fed = [target[step] if step < len(target) else runtime.pad_token_id for target in targets]
            logits = run.decode(np.asarray(fed, np.int64))
    return total


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return log_norm - logits[np.arange(len(targets)), np.asarray(targets, np.int64)]


# -- inputs ---------------------------------------------------------------------------------------


def read_heldout(path: str | Path) -> tuple[list[Record], bool]:
    """(records, whether they have responses): JSONL like training data, or a .txt of prompts, one a line."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        return read_jsonl(path), True
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read data file ({exc.strerror}); check the --data path") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    records = [
        Record(({"role": "user", "content": line.strip()},), "", f"{path}:{number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not records:
        raise DataError(f"{path}: no prompts; write one prompt per line")
    return records, False


@dataclass(frozen=True)
class Fact:
    question: str
    answers: tuple[str, ...]

    def answered_by(self, text: str) -> bool:
        """Some acceptable answer occurs in the text, ignoring case."""
        folded = text.casefold()
        return any(answer.casefold() in folded for answer in self.answers)


def read_facts(path: str | Path) -> list[Fact]:
    """Lines of {"question": "...", "answers": ["acceptable", "substrings"]}."""
    path = Path(path)
    fix = 'each line must be {"question": "...", "answers": ["...", ...]}'
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the facts file ({exc}); check the path") from None
    facts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not JSON ({exc.msg}); {fix}") from None
        question = value.get("question") if isinstance(value, dict) else None
        answers = value.get("answers") if isinstance(value, dict) else None
        if (
            not isinstance(question, str)
            or not question.strip()
            or not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)
        ):
            raise DataError(f"{path}:{number}: {fix} (non-empty strings)")
        facts.append(Fact(question, tuple(answers)))
    if not facts:
        raise DataError(f"{path}: no facts; {fix}, one per line")
    return facts


# -- the steps ------------------------------------------------------------------------------------


def heldout_loss(
    backend: Backend, records: Sequence[Record], patches: Sequence[Patch], weights: Sequence[float] | None, say: Say
) -> LossReport:
    examples = backend.examples(records)
    tokens = sum(len(e.target_ids) for e in examples)
    say(f"held-out loss: {len(examples)} examples, {tokens} response tokens")
    base = backend.response_nll(examples, [], None) / tokens
    patched = backend.response_nll(examples, patches, weights) / tokens if patches else None
    return LossReport(round(base, 6), None if patched is None else round(patched, 6), tokens, len(examples))


def adherence(
    judge: Judge, base_answers: Sequence[str], patched_answers: Sequence[str] | None, wheres: Sequence[str] = ()
) -> AdherenceReport:
    """The share of answers the judge passes; ``wheres`` (each prompt's file:line) name the prompt
    whose answer a raising judge failed on."""

    def share(answers: Sequence[str]) -> float:
        places = list(wheres) or [""] * len(answers)
        return round(sum(judge(a, where) for a, where in zip(answers, places)) / len(answers), 6)

    return AdherenceReport(
        judge.spec,
        share(base_answers),
        None if patched_answers is None else share(patched_answers),
        len(base_answers),
        loop_share(list(base_answers)),
        None if patched_answers is None else loop_share(list(patched_answers)),
    )


def facts_cache_file(backend: Backend, facts_sha256: str) -> Path:
    """One file per (base, precision, facts file): which facts the base answers correctly."""
    key = json.dumps([FACTS_CACHE_VERSION, backend.base_fingerprint, backend.precision, facts_sha256, FACT_TOKENS])
    return cache_dir() / "facts" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def base_correct_facts(backend: Backend, facts: Sequence[Fact], facts_sha256: str, say: Say) -> tuple[list[int], bool]:
    """(indices of the facts the base answers correctly, whether they came from the cache)."""
    path = facts_cache_file(backend, facts_sha256)
    try:
        cached = json.loads(path.read_text())
        if cached["base_fingerprint"] == backend.base_fingerprint and cached["facts_sha256"] == facts_sha256:
            return [int(i) for i in cached["correct"]], True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: compute it again
    say(f"facts: the base answers {len(facts)} questions (once per base, then cached)")
    answers = backend.answers([user_message(f.question) for f in facts], [], None, FACT_TOKENS)
    correct = [i for i, (fact, answer) in enumerate(zip(facts, answers)) if fact.answered_by(answer)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        path,
        json.dumps(
            {
                "base_fingerprint": backend.base_fingerprint,
                "precision": backend.precision,
                "facts_sha256": facts_sha256,
                "max_new_tokens": FACT_TOKENS,
                "facts": len(facts),
                "correct": correct,
            },
            indent=1,
        ).encode(),
    )
    return correct, False


def facts_kept(
    backend: Backend, facts_file: Path, patches: Sequence[Patch], weights: Sequence[float] | None, say: Say
) -> RetentionReport:
    facts = read_facts(facts_file)
    digest = hashlib.sha256(facts_file.read_bytes()).hexdigest()
    correct, cached = base_correct_facts(backend, facts, digest, say)
    kept = 0
    if correct:
        say(f"facts: {len(correct)} the base knows, answered with the patches")
        answers = backend.answers([user_message(facts[i].question) for i in correct], patches, weights, FACT_TOKENS)
        kept = sum(facts[i].answered_by(a) for i, a in zip(correct, answers))
    fraction = round(kept / len(correct), 6) if correct else None
    return RetentionReport(str(facts_file), len(facts), len(correct), kept, fraction, cached)


def user_message(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def prompt_label(record: Record) -> str:
    """What a sample shows of its prompt: the last message."""
    return record.messages[-1]["content"]


# -- all together ---------------------------------------------------------------------------------


def evaluate(
    bundle: Any = None,
    *,
    data: str | Path,
    model: Any = None,
    patches: Sequence[Patch | str | Path] = (),
    weights: Sequence[float] | None = None,
    judge: str | Judge | None = None,
    max_new_tokens: int = 48,
    facts: bool = True,
    facts_file: str | Path | None = None,
    samples: int = 3,
    threads: int | None = None,
    progress: bool = False,
    open_model: Callable[[Any, Say], Backend] | None = None,
) -> EvalReport:
    """Evaluate ``patches`` on ``bundle`` (a folder or a loaded Runtime) or ``model`` (a Hugging
    Face folder or id, "default", or a loaded Backbone, opened by ``open_model``: reft_edge.evaluate
    passes training's) with the held-out ``data``."""
    started = time.perf_counter()
    say = _say if progress else (lambda message: None)
    check_options(bundle, model, max_new_tokens, samples)
    judge = Judge.parse(judge) if isinstance(judge, str) else judge
    records, has_responses = read_heldout(data)
    facts_path = Path(facts_file) if facts_file else FACTS_FILE
    if facts and patches and not facts_path.is_file():
        raise UsageError(f"facts file {facts_path} does not exist; pass an existing one or --no-facts")
    backend = open_backend(bundle, model, threads, say, open_model)
    loaded = backend.load_patches(patches)
    weights = check_weights(loaded, weights)  # one per patch, 1.0 unless given

    loss = heldout_loss(backend, records, loaded, weights, say) if has_responses else None
    shown = records if judge else records[:samples]  # without a judge only the samples need answers
    prompts = [list(r.messages) for r in shown]
    base_answers = patched_answers = None
    if prompts:
        say(f"answers: {len(prompts)} prompts, {max_new_tokens} tokens, base{' and patched' if loaded else ''}")
        base_answers = backend.answers(prompts, [], None, max_new_tokens)
        patched_answers = backend.answers(prompts, loaded, weights, max_new_tokens) if loaded else None
    retention = facts_kept(backend, facts_path, loaded, weights, say) if facts and loaded else None
    return EvalReport(
        source=backend.source,
        kind=backend.kind,
        precision=backend.precision,
        base_fingerprint=backend.base_fingerprint,
        patches=tuple(p.name for p in loaded),
        weights=tuple(weights or ()),
        data=str(data),
        prompts=len(records),
        max_new_tokens=max_new_tokens,
        loss=loss,
        adherence=adherence(judge, base_answers, patched_answers, [r.where for r in shown]) if judge else None,
        retention=retention,
        samples=tuple(
            Sample(prompt_label(r), base_answers[i], patched_answers[i] if patched_answers else None)
            for i, r in enumerate(shown[:samples])
        ),
        seconds=round(time.perf_counter() - started, 3),
    )


def check_options(bundle: Any, model: Any, max_new_tokens: int, samples: int) -> None:
    if (bundle is None) == (model is None):
        raise UsageError(
            "give a bundle folder or --model (one of them): the bundle measures what devices run, "
            "--model the torch model"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens {max_new_tokens!r} must be a whole number of at least 1")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise UsageError(f"samples {samples!r} must be a whole number of at least 0")


def open_backend(
    bundle: Any, model: Any, threads: int | None, say: Say, open_model: Callable[[Any, Say], Backend] | None = None
) -> Backend:
    if model is not None:
        if open_model is None:
            raise UsageError(
                "the runtime evaluates bundles only (it has no torch); evaluate a torch model with "
                "reft_edge.evaluate.evaluate(model=...) or reft-edge eval --model"
            )
        return open_model(model, say)
    if isinstance(bundle, (str, Path)):
        from reft_edge.runtime.session import Runtime

        say(f"loading bundle {bundle}")
        return RuntimeBackend(Runtime.load(bundle, threads=threads))
    return RuntimeBackend(bundle)


def _say(message: str) -> None:
    print(f"eval: {message}", file=sys.stderr, flush=True)
