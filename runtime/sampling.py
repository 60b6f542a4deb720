"""Choosing the next token from last-position logits, for a whole batch at once (numpy only).

Example::

    import numpy as np
    from reft_edge.runtime.sampling import Sampling
    sampling = Sampling.check(temperature=0.7, top_p=0.9, seed=1)
    rng = sampling.rng()
    tokens = sampling.pick(np.random.randn(2, 100).astype(np.float32), seen=None, rng=rng)

Temperature 0 is greedy (argmax, ties to the lowest id, like torch). The filters follow
transformers' order: repetition penalty, the n-gram loop guard, temperature, top-k, top-p.
OpenAI's frequency and presence penalties (what ``reft-edge serve`` takes) come first:
``logit -= count * frequency + (count > 0) * presence`` over the tokens generated so far.

The loop guard (``no_repeat_ngram=n``) forbids a token that would repeat an n-gram already
in the answer, as transformers' ``no_repeat_ngram_size`` does, but over the generated
tokens only (the chat template's own repeated markers are not the loops it is for).
It is on by default (``NO_REPEAT_NGRAM``) in every runtime: ``Runtime.generate``,
``stream`` and ``generate_batch``, `reft-edge run` and `chat`, and the web runtime; pass 0 to
turn it off. A small model under a strong persona patch can otherwise fall into "kindly
kindly kindly ..." until the token budget ends; a 6-gram almost never repeats in a sound
short answer. The bundle's onnxruntime-genai config keeps genai's own guard off: genai
counts n-grams over the prompt too, so its tokens would differ from these runtimes'.
Evaluation (runtime.evaluate) turns it off, to measure the patch rather than the guard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reft_edge.constants import NO_REPEAT_NGRAM as NO_REPEAT_NGRAM  # re-exported; the CLI reads it numpy-free
from reft_edge.errors import UsageError
from reft_edge.params import check_seed


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram: int | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @classmethod
    def check(cls, **options) -> Sampling:
        sampling = cls(**options)
        if not sampling.temperature >= 0:
            raise UsageError(f"temperature {sampling.temperature} must be >= 0 (0 is greedy)")
        if sampling.top_k is not None and sampling.top_k < 1:
            raise UsageError(f"top_k {sampling.top_k} must be at least 1")
        if sampling.top_p is not None and not 0 < sampling.top_p <= 1:
            raise UsageError(f"top_p {sampling.top_p} must be in (0, 1]")
        if sampling.repetition_penalty is not None and not sampling.repetition_penalty > 0:
            raise UsageError(f"repetition_penalty {sampling.repetition_penalty} must be > 0 (1.0 is none)")
        if sampling.no_repeat_ngram is not None and (
            isinstance(sampling.no_repeat_ngram, bool)
            or not isinstance(sampling.no_repeat_ngram, int)
            or sampling.no_repeat_ngram < 0
        ):
            raise UsageError(f"no_repeat_ngram {sampling.no_repeat_ngram!r} must be a whole number >= 0 (0 is off)")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(sampling, name)
            if value is not None and not -2 <= value <= 2:
                raise UsageError(f"{name} {value} must be between -2 and 2 (0 is none)")
        if sampling.temperature == math.inf:
            raise UsageError("temperature inf is not a number to divide by; give a finite temperature (0 is greedy)")
        check_seed(sampling.seed, "seed")
        return sampling

    @property
    def tracks_seen(self) -> bool:
        return self.repetition_penalty not in (None, 1.0)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def pick(
        self,
        logits: np.ndarray,
        seen: np.ndarray | None,
        rng: np.random.Generator,
        answers: Sequence[Sequence[int]] = (),
    ) -> np.ndarray:
        """logits [batch, vocab] float32; seen [batch, vocab] bool (tokens so far); answers: each
        row's generated tokens so far (for the loop guard) -> token ids [batch]."""
        if (self.frequency_penalty or self.presence_penalty) and answers:
            logits = penalise_counts(logits, answers, self.frequency_penalty or 0.0, self.presence_penalty or 0.0)
        if self.tracks_seen:
            logits = penalise_repeats(logits, seen, self.repetition_penalty)
        if self.no_repeat_ngram and answers:
            logits = ban_repeated_ngrams(logits, answers, self.no_repeat_ngram)
        if self.temperature == 0:
            return logits.argmax(axis=-1)
        logits = logits.astype(np.float64) / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            logits = keep_top_k(logits, self.top_k)
        if self.top_p is not None and self.top_p < 1:
            logits = keep_top_p(logits, self.top_p)
        return sample(logits, rng)


def penalise_repeats(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: divide positive, multiply negative logits of seen tokens."""
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


def penalise_counts(
    logits: np.ndarray, answers: Sequence[Sequence[int]], frequency: float, presence: float
) -> np.ndarray:
    """OpenAI's penalties: each token's logit minus its count in the row's answer times ``frequency``,
    minus ``presence`` once it occurs at all.

    >>> penalise_counts(np.zeros((1, 4)), [[1, 1, 3]], 0.5, 1.0)[0].tolist()
    [0.0, -2.0, 0.0, -1.5]
    """
    logits = logits.copy()
    for row, answer in enumerate(answers):
        if len(answer):
            counts = np.bincount(np.asarray(answer, np.int64), minlength=logits.shape[-1])[: logits.shape[-1]]
            logits[row] -= (counts * frequency + (counts > 0) * presence).astype(logits.dtype)
    return logits


def ban_repeated_ngrams(logits: np.ndarray, answers: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """-inf for each token that would complete an n-gram the row's answer already holds.

    >>> ban_repeated_ngrams(np.zeros((1, 5)), [[1, 2, 3, 1, 2]], 3)[0].tolist()  # "1 2" was followed by 3
    [0.0, 0.0, 0.0, -inf, 0.0]
    """
    banned_rows, banned_tokens = [], []
    for row, answer in enumerate(answers):
        if len(answer) < n:
            continue
        tail = list(answer[len(answer) - n + 1 :]) if n > 1 else []
        for start in range(len(answer) - n + 1):
            if list(answer[start : start + n - 1]) == tail:
                banned_rows.append(row)
                banned_tokens.append(answer[start + n - 1])
    if not banned_rows:
        return logits
    logits = logits.copy()
    logits[banned_rows, banned_tokens] = -np.inf
    return logits


def keep_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    kth = np.partition(logits, -k, axis=-1)[:, -k, None]
    return np.where(logits < kth, -np.inf, logits)


def keep_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    order = np.argsort(-logits, axis=-1)
    ranked = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(ranked)
    before = np.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
    drop_ranked = before >= p
    drop = np.zeros_like(drop_ranked)
    np.put_along_axis(drop, order, drop_ranked, axis=-1)
    return np.where(drop, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row by inverting the cumulative distribution."""
    cumulative = np.cumsum(softmax(logits), axis=-1)
    draws = rng.random((logits.shape[0], 1)) * cumulative[:, -1:]
    return np.minimum((cumulative <= draws).sum(axis=-1), logits.shape[-1] - 1)
