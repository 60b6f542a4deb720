"""Run a bundle with patches: one onnxruntime session, KV cache kept in OrtValues, torch-free.

Example::

    from reft_edge.runtime import Runtime
    rt = Runtime.load("bundle/", threads=2)
    out = rt.generate("What should I cook tonight?", patches=["alice.reft"], max_new_tokens=64)
    print(out.text, out.timings["tokens_per_s"])
    for piece in rt.stream("And for dessert?", patches=["alice.reft"]):
        print(piece, end="", flush=True)
    both = rt.generate_batch([("Hi", ["alice.reft"]), ("Hi", ["bob.reft"])])   # one batched run

A string prompt becomes one user message formatted with the bundle's chat template,
exactly as training formatted it (``raw=True`` sends the text as is). Patches edit the
prompt positions each one was trained on, while the prompt is processed, and every
generated token when their positions include ``g``; otherwise generated tokens read the
edited keys and values from the cache but are not edited. Switching or composing patches only
changes the slot inputs: the session stays.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reft_edge.errors import BundleError, UsageError
from reft_edge.runtime.bundle import Manifest
from reft_edge.runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    past_names,
    present_names,
    slot_names,
)
from reft_edge.runtime.engine import Engine
from reft_edge.runtime.patch import Patch
from reft_edge.runtime.sampling import NO_REPEAT_NGRAM, Sampling
from reft_edge.runtime.slots import SlotEdit, resolve_edits, slot_arrays
from reft_edge.runtime.template import ChatTemplate, check_messages, plain_text, template_variables, user_messages
from reft_edge.runtime.text import TextRow

PatchLike = Patch | str | Path
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass
class Generation:
    """One answer: its text, the generated token ids (the stopping EOS not included), and timings."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # eos | stop | length
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "timings": self.timings,
        }


@dataclass(frozen=True)
class _Request:
    prompt_ids: list[int]
    edits: list[SlotEdit]


@dataclass(frozen=True)
class _Options:
    max_new_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    ignore_eos: bool


class Runtime:
    """A loaded bundle: its onnxruntime session, tokenizer and chat template."""

    def __init__(
        self, bundle_dir: Path, manifest: Manifest, session: Any, tokenizer: Any, template: ChatTemplate | None
    ):
        self.bundle_dir, self.manifest, self.session = bundle_dir, manifest, session
        self.tokenizer, self.template = tokenizer, template
        self.device = "cuda" if session.get_providers()[0] == CUDA else "cpu"
        special = manifest.special_tokens
        self.eos_token_ids = frozenset(int(i) for i in special.get("eos_token_ids") or [])
        self.pad_token_id = int(special.get("pad_token_id") or 0)
        self._engine = Engine(
            session,
            graph=manifest.graph,
            kv=manifest.kv,
            slot_layers=manifest.slot_layers,
            device=self.device,
            pad_id=self.pad_token_id,
        )

    @classmethod
    def load(
        cls, bundle_dir: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> Runtime:
        """Open a bundle folder. BundleError names the damaged or missing file."""
        bundle_dir = Path(bundle_dir)
        manifest = Manifest.from_dir(bundle_dir)
        session = _open_session(bundle_dir / manifest.files["model"], providers, threads)
        _check_graph(session, manifest, bundle_dir)
        tokenizer = _open_tokenizer(bundle_dir / manifest.files["tokenizer"])
        template_file = manifest.files.get("chat_template")
        template = (
            ChatTemplate.from_file(bundle_dir / template_file, template_variables(manifest.special_tokens))
            if template_file
            else None
        )
        return cls(bundle_dir, manifest, session, tokenizer, template)

    # -- prompts and patches -------------------------------------------------------------------

    def prompt_text(self, prompt: str | Sequence[dict[str, str]], *, raw: bool = False) -> str:
        """The text the model sees before its answer (chat-formatted unless raw)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UsageError("the prompt is empty; give some text to answer")
            if raw:
                check_messages(user_messages(prompt))  # the same text checks (valid Unicode) as a chat prompt
                return prompt
            prompt = user_messages(prompt)
        elif raw:
            raise UsageError("raw=True takes a string prompt, not a list of messages")
        messages = check_messages(prompt)
        return self.template.render(messages) if self.template else plain_text(messages)

    def encode(self, prompt: str | Sequence[dict[str, str]], *, raw: bool = False) -> list[int]:
        """Prompt token ids, tokenized as training tokenizes (no special tokens added)."""
        return self.tokenizer.encode(self.prompt_text(prompt, raw=raw), add_special_tokens=False).ids

    def load_patches(self, patches: Sequence[PatchLike]) -> list[Patch]:
        """Patch objects or paths -> Patch objects, each checked against this bundle's base and slots."""
        return self.manifest.load_patches(patches)

    def _request(
        self, prompt: Any, patches: Sequence[PatchLike], weights: Sequence[float] | None, raw: bool
    ) -> _Request:
        edits = resolve_edits(self.load_patches(patches), weights, self.manifest.slot_layers)
        return _Request(self.encode(prompt, raw=raw), edits)

    # -- public generation API -----------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[dict[str, str]],
        *,
        patches: Sequence[PatchLike] = (),
        weights: Sequence[float] | None = None,
        raw: bool = False,
        **options: Any,
    ) -> Generation:
        """Answer one prompt. Options: max_new_tokens=128, temperature=0.0 (greedy), top_k, top_p,
        repetition_penalty, no_repeat_ngram (loop guard, sampling.NO_REPEAT_NGRAM unless given; 0 is off), seed,
        stop (strings), ignore_eos."""
        run = self._run([self._request(prompt, patches, weights, raw)], _options(**options))
        return _drain(run)[0]

    def stream(
        self,
        prompt: str | Sequence[dict[str, str]],
        *,
        patches: Sequence[PatchLike] = (),
        weights: Sequence[float] | None = None,
        raw: bool = False,
        **options: Any,
    ) -> Generator[str, None, Generation]:
        """Like generate, yielding text pieces as they become final; the generator returns the Generation."""
        run = self._run([self._request(prompt, patches, weights, raw)], _options(**options))
        while True:
            try:
                pieces = next(run)
            except StopIteration as done:
                return done.value[0]
            if pieces[0]:
                yield pieces[0]

    def generate_batch(self, requests: Sequence[tuple], *, raw: bool = False, **options: Any) -> list[Generation]:
        """Answer several (prompt, patches) or (prompt, patches, weights) requests in one padded batch."""
        if not requests:
            raise UsageError("generate_batch needs at least one (prompt, patches) request")
        prepared = []
        for request in requests:
            if not isinstance(request, (tuple, list)) or len(request) not in (2, 3):
                raise UsageError(f"request {request!r} must be (prompt, patches) or (prompt, patches, weights)")
            prompt, patches, *weights = request
            prepared.append(self._request(prompt, patches, weights[0] if weights else None, raw))
        return _drain(self._run(prepared, _options(**options)))

    # -- the generation loop -------------------------------------------------------------------

    def _check_context(self, requests: list[_Request], max_new_tokens: int) -> None:
        limit = self.manifest.context_length
        for request in requests:
            n = len(request.prompt_ids)
            if n > limit:
                raise UsageError(
                    f"the prompt has {n} tokens, more than the bundle's context length {limit}; shorten it"
                )
            if n + max_new_tokens > limit:
                raise UsageError(
                    f"the prompt's {n} tokens plus max_new_tokens {max_new_tokens} pass the bundle's "
                    f"context length {limit}; use max_new_tokens {limit - n} or fewer"
                )

    def _run(self, requests: list[_Request], options: _Options) -> Generator[list[str], None, list[Generation]]:
        """Prefill then decode the batch; yields each step's new text per row, returns the Generations."""
        started = time.perf_counter()
        self._check_context(requests, options.max_new_tokens)
        sampling = options.sampling
        prompts = [r.prompt_ids for r in requests]
        slots = slot_arrays([r.edits for r in requests], len(self.manifest.slot_layers), self.manifest.hidden_size)
        run = self._engine.start(prompts, slots, options.max_new_tokens)
        rows = [TextRow(self.tokenizer, options.stop) for _ in requests]
        rng = sampling.rng()
        seen = _seen_tokens(requests, self.manifest.vocab_size) if sampling.tracks_seen else None

        tokens = sampling.pick(run.prefill(), seen, rng)  # no answer yet: nothing for the loop guard
        pieces = self._advance(rows, tokens, seen, options, last=options.max_new_tokens == 1)
        prefill_s = time.perf_counter() - started
        yield pieces

        decode_s, steps = 0.0, 0
        while not all(row.finished for row in rows):
            tick = time.perf_counter()
            steps += 1
            tokens = sampling.pick(run.decode(tokens), seen, rng, [row.token_ids for row in rows])
            pieces = self._advance(rows, tokens, seen, options, last=steps + 1 == options.max_new_tokens)
            decode_s += time.perf_counter() - tick
            yield pieces

        timings = _timings(prefill_s, decode_s, steps, time.perf_counter() - started)
        return [
            Generation(row.text, row.token_ids, len(prompt), row.finish_reason, dict(timings))
            for row, prompt in zip(rows, prompts)
        ]

    def _advance(
        self, rows: list[TextRow], tokens: np.ndarray, seen: np.ndarray | None, options: _Options, last: bool
    ) -> list[str]:
        """Give each unfinished row its token; end rows on EOS, a stop string, or the token budget."""
        pieces = []
        for row, token in zip(rows, tokens.tolist()):
            piece = ""
            if not row.finished:
                if token in self.eos_token_ids and not options.ignore_eos:
                    piece = row.finish("eos")
                else:
                    piece = row.push(token)
                    if last and not row.finished:
                        piece += row.finish("length")
            pieces.append(piece)
        if seen is not None:
            seen[np.arange(len(rows)), tokens] = True
        return pieces


def _options(
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram: int | None = NO_REPEAT_NGRAM,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
) -> _Options:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens {max_new_tokens!r} must be a whole number of at least 1")
    sampling = Sampling.check(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram=no_repeat_ngram,
        seed=seed,
    )
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops):
        raise UsageError(f"stop {stop!r} must be a non-empty string or a list of them")
    return _Options(int(max_new_tokens), sampling, stops, bool(ignore_eos))


def _timings(prefill_s: float, decode_s: float, steps: int, total_s: float) -> dict[str, float]:
    """Seconds of the prompt pass and of the decode steps; tokens_per_s is decode steps per second
    (each step gives every row of a batch one token)."""
    return {
        "prefill_s": round(prefill_s, 6),
        "decode_s": round(decode_s, 6),
        "decode_steps": steps,
        "tokens_per_s": round(steps / decode_s, 2) if decode_s else 0.0,
        "total_s": round(total_s, 6),
    }


def _drain(run: Generator[list[str], None, list[Generation]]) -> list[Generation]:
    while True:
        try:
            next(run)
        except StopIteration as done:
            return done.value


def _seen_tokens(requests: list[_Request], vocab_size: int) -> np.ndarray:
    """[batch, vocab] bool: the prompt's tokens, for the repetition penalty (as transformers counts them)."""
    seen = np.zeros((len(requests), vocab_size), bool)
    for row, request in enumerate(requests):
        seen[row, request.prompt_ids] = True
    return seen


def _providers(requested: Sequence[str] | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        return [CUDA, CPU] if CUDA in available else [CPU]
    unknown = [p for p in requested if p not in available]
    if unknown:
        raise UsageError(f"onnxruntime providers {unknown} are not available here; available: {available}")
    return list(requested)


def _open_session(model_path: Path, providers: Sequence[str] | None, threads: int | None) -> Any:
    """One session for prefill and decode: two sessions used alternately in one process ran at
    66 ms per token instead of 36 (their threads spin while the other runs)."""
    import onnxruntime as ort

    if threads is not None and threads < 1:
        raise UsageError(f"threads {threads} must be at least 1")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the CPU fallback warnings are noise to a user
    if threads:
        options.intra_op_num_threads = threads
    chosen = _providers(providers)
    try:
        return ort.InferenceSession(str(model_path), options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types for every kind of damage
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{model_path}: onnxruntime cannot load it ({reason}); re-export the bundle") from None


def _check_graph(session: Any, manifest: Manifest, bundle_dir: Path) -> None:
    names = {i.name for i in session.get_inputs()} | {o.name for o in session.get_outputs()}
    layers = range(manifest.kv.num_layers)
    needed = [
        INPUT_IDS,
        ATTENTION_MASK,
        *([POSITION_IDS] if manifest.graph == "traced" else []),
        LOGITS,
        *(n for layer in manifest.slot_layers for n in slot_names(layer)),
        *(n for layer in layers for n in (*past_names(layer), *present_names(layer))),
    ]
    missing = [n for n in needed if n not in names]
    if missing:
        raise BundleError(
            f"{bundle_dir / manifest.files['model']}: the graph lacks {missing[:4]}; it does not "
            "match its manifest, re-export the bundle"
        )


def _open_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for malformed JSON
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: tokenizer unreadable ({reason}); re-export the bundle") from None
