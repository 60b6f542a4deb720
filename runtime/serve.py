"""``reft-edge serve``: an OpenAI-compatible HTTP endpoint where each request carries its person's patch.

Example::

    reft-edge serve bundle/ --patches patches/ --port 8080       # patches/alice.reft -> model "base+alice"

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    client.chat.completions.create(model="base+alice", messages=[{"role": "user", "content": "Hi"}])
    client.chat.completions.create(model="base", messages=[...],
                                   extra_body={"patches": [{"name": "alice", "weight": 0.5}], "skills": {"caps": 1}})

    with serving("bundle/", "patches/") as url:      # the same server on a free port, in this process
        ...

Routes: POST /v1/chat/completions and /v1/completions (``stream`` gives server-sent events as
OpenAI sends them), GET /v1/models (the base and ``base+NAME`` for each NAME.reft in the
patch folder), GET /health. docs/serve.md describes every field.

One scheduler thread owns the onnxruntime session and one running batch (engine.RowBatch):
a request waits in a bounded queue (429 when it is full), joins the batch between decode
steps (prefilled apart from the running rows, one per step, so each row's tokens are
the ones it gets alone), and leaves it as
soon as it ends, times out or its client goes away. Each row has its own patches, weights,
skills and sampling. The HTTP side (Starlette on uvicorn, the ``serve`` extra) only parses,
queues and writes; the runtime below it stays torch-free.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reft_edge.constants import NO_REPEAT_NGRAM
from reft_edge.errors import ReftEdgeError, UsageError

log = logging.getLogger("reft_edge.serve")

BASE = "base"
MAX_BODY_BYTES = 1024 * 1024
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


# -- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An OpenAI-style error: HTTP status and the {"error": {...}} object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- patches --------------------------------------------------------------------------------------


class PatchStore:
    """The *.reft files of a folder, each loaded and checked against the bundle once, reloaded when
    its modification time or size changes. A bad file is logged and left out; the others serve."""

    def __init__(self, folder: str | Path, manifest: Any):
        self.folder, self.manifest = Path(folder), manifest
        self.patches: dict[str, Any] = {}  # name -> Patch
        self._seen: dict[str, tuple[int, int]] = {}  # name -> (mtime_ns, size) of the file last read
        self.errors: dict[str, str] = {}  # name -> why it is left out
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Read the folder's patch files that are new or changed; forget removed ones."""
        with self._lock:
            try:
                files = {p.stem: p for p in self.folder.iterdir() if p.suffix == ".reft" and p.is_file()}
            except OSError as exc:
                log.warning("patch folder %s unreadable (%s); serving the patches read before", self.folder, exc)
                return
            for name in set(self._seen) - set(files):
                self._seen.pop(name)
                self.patches.pop(name, None)
                self.errors.pop(name, None)
                log.info("patch %s removed", name)
            for name, path in sorted(files.items()):
                try:
                    stat = path.stat()
                except OSError:
                    continue
                key = (stat.st_mtime_ns, stat.st_size)
                if self._seen.get(name) == key:
                    continue
                self._seen[name] = key
                try:
                    patch = self.manifest.load_patches([path])[0]
                except ReftEdgeError as exc:
                    self.patches.pop(name, None)
                    self.errors[name] = str(exc)
                    log.warning("patch %s skipped: %s", name, exc)
                    continue
                reloaded = name in self.patches or name in self.errors
                self.patches[name] = patch
                self.errors.pop(name, None)
                log.info(
                    "patch %s %s (%s, rank %d, layers %s)",
                    name,
                    "reloaded" if reloaded else "loaded",
                    patch.kind,
                    patch.rank,
                    patch.layers,
                )

    def get(self, name: str) -> Any:
        return self.patches.get(name)


# -- the scheduler --------------------------------------------------------------------------------


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request on its way through the scheduler; events go back to the HTTP side's loop."""

    prompt_ids: list[int]
    slots: Any  # SlotArrays of one row
    sampling: Any  # Sampling
    max_tokens: int
    stop: tuple[str, ...]
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    tokens: int = 0

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the request's loop is gone: nobody listens
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class _Row:
    """A job in the running batch: its text, sampling state and last token."""

    def __init__(self, job: Job, tokenizer: Any, vocab_size: int):
        from reft_edge.runtime.text import TextRow

        self.job, self.text = job, TextRow(tokenizer, job.stop)
        self.rng = job.sampling.rng()
        self.seen = None
        if job.sampling.tracks_seen:
            self.seen = np.zeros((1, vocab_size), bool)
            self.seen[0, job.prompt_ids] = True
        self.token = 0

    def pick(self, logits: np.ndarray) -> int:
        answers = [self.text.token_ids] if self.text.token_ids else ()
        token = int(self.job.sampling.pick(logits[None], self.seen, self.rng, answers)[0])
        if self.seen is not None:
            self.seen[0, token] = True
        self.token = token
        return token


class Scheduler:
    """One thread owns the session: it admits queued jobs into the running batch between decode
    steps, runs the steps, and hands each row's text back to its job."""

    def __init__(self, runtime: Any, *, max_batch: int = 8, max_queue: int = 64):
        self.rt = runtime
        self.batch = runtime._engine.rows(max_batch)
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.rows: dict[int, _Row] = {}  # id(row) -> row, the batch's owners
        self.condition = threading.Condition()
        self.stopped = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="reft-edge-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(job)
            self.condition.notify()

    @property
    def active(self) -> int:
        return len(self.batch)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopped and not self.waiting and not len(self.batch):
                    self.condition.wait()
                if self.stopped:
                    break
            try:
                self._admit()
                self._drop_cancelled()
                if len(self.batch):
                    self._step()
                time.sleep(0)  # let the HTTP thread take the GIL and send what this step made
            except Exception as exc:  # never die: fail the running rows, start a fresh batch
                log.exception("decode step failed; failing %d running request(s)", len(self.batch))
                for row in list(self.rows.values()):
                    row.job.emit("error", 500, f"generation failed: {type(exc).__name__}: {exc}")
                self.rows.clear()
                self.batch = self.rt._engine.rows(self.batch.capacity)
        for row in list(self.rows.values()):
            row.job.emit("error", 503, "the server is shutting down")
        for job in self.waiting:
            job.emit("error", 503, "the server is shutting down")

    def _admit(self, at_once: int = 1) -> None:
        """Prefill up to ``at_once`` waiting jobs into free rows in one pass (each row's tokens as alone);
        a failing prefill fails only the jobs in it. One per decode step by default: on a CPU a prefill
        costs its tokens' compute whether batched or not, and one at a time between steps gives the
        earliest arrivals their first token soonest and keeps the running rows streaming (measured:
        docs/serve.md)."""
        joining: list[_Row] = []
        with self.condition:
            while self.waiting and len(joining) < at_once and len(self.batch) + len(joining) < self.batch.capacity:
                job = self.waiting.popleft()
                if job.cancelled.is_set():
                    job.emit("cancelled")
                else:
                    joining.append(_Row(job, self.rt.tokenizer, self.rt.manifest.vocab_size))
        if not joining:
            return
        # one max_new_tokens for the pass: the longest budget (it only sizes the KV buffers)
        budget = max(row.job.max_tokens for row in joining)
        try:
            logits = self.batch.join_many(
                [id(row) for row in joining],
                [row.job.prompt_ids for row in joining],
                [row.job.slots for row in joining],
                budget,
            )
        except Exception as exc:
            log.exception("prefill failed")
            for row in joining:
                row.job.emit("error", 500, f"prefill failed: {type(exc).__name__}: {exc}")
            return
        for row, row_logits in zip(joining, logits):
            self.rows[id(row)] = row
            self._advance(row, row.pick(row_logits))

    def _drop_cancelled(self) -> None:
        for key, row in list(self.rows.items()):
            if row.job.cancelled.is_set():
                self._leave(key)
                row.job.emit("cancelled")

    def _step(self) -> None:
        owners = list(self.batch.owners)
        logits = self.batch.step([self.rows[key].token for key in owners])
        self.steps += 1
        for key, row_logits in zip(owners, logits):
            row = self.rows[key]
            self._advance(row, row.pick(row_logits))

    def _advance(self, row: _Row, token: int) -> None:
        """As Runtime._advance, for one row: end it on EOS, a stop string or its token budget."""
        job, text = row.job, row.text
        if job.first_token is None:
            job.first_token = time.perf_counter()
        if token in self.rt.eos_token_ids and not job.ignore_eos:
            piece = text.finish("eos")
        else:
            piece = text.push(token)
            if len(text.token_ids) >= job.max_tokens and not text.finished:
                piece += text.finish("length")
        job.tokens = len(text.token_ids)
        if piece:
            job.emit("piece", piece)
        if text.finished:
            job.emit("done", text.finish_reason)
            self._leave(id(row))

    def _leave(self, key: int) -> None:
        self.batch.leave(key)
        self.rows.pop(key)


# -- requests -------------------------------------------------------------------------------------

# Fields each route takes. OpenAI fields this server cannot honour are refused by _refuse_unsupported.
COMMON_FIELDS = {
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "user",
    "logit_bias",
    "logprobs",
    "patches",
    "skills",
    "top_k",
    "repetition_penalty",
    "no_repeat_ngram",
    "ignore_eos",
}
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "metadata",
    "store",
    "service_tier",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}


@dataclass
class Parsed:
    model: str
    patch_names: list[str]
    job_args: dict[str, Any]
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, low: float, high: float, *, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad(f"{name} must be {'a whole number' if integer else 'a number'}, not {value!r}", name)
    if not low <= value <= high:
        raise _bad(f"{name} {value} must be between {low} and {high}", name)
    return value


def _refuse_unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise _bad(
            "n must be 1: this server returns one choice per request (send several requests; they are batched)", "n"
        )
    if body.get("best_of", 1) not in (1, None):
        raise _bad("best_of must be 1", "best_of")
    if body.get("logprobs") not in (None, False):
        raise _bad("logprobs are not supported by this server", "logprobs")
    if body.get("top_logprobs") is not None:
        raise _bad("top_logprobs are not supported by this server", "top_logprobs")
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported by this server", "logit_bias")
    if body.get("echo"):
        raise _bad("echo is not supported by this server", "echo")
    if body.get("suffix"):
        raise _bad("suffix is not supported by this server", "suffix")
    for name in ("tools", "functions"):
        if body.get(name):
            raise _bad(f"{name} (function calling) is not supported by this server", name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise _bad('response_format must be {"type": "text"}: structured output is not supported', "response_format")


def _messages(value: Any) -> list[dict[str, str]]:
    """OpenAI chat messages -> {"role", "content"} with string content (text parts joined)."""
    if not isinstance(value, list) or not value:
        raise _bad('messages must be a non-empty list of {"role": ..., "content": ...}', "messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string role", f"messages[{i}]")
        role, content = message["role"], message.get("content")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(
                f"messages[{i}].role {role!r} is not supported; use system, user or assistant", f"messages[{i}].role"
            )
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        messages.append({"role": role, "content": content})
    return messages


class Service:
    """What the routes share: the runtime, the patch store, the scheduler and the options."""

    def __init__(
        self,
        runtime: Any,
        store: PatchStore,
        scheduler: Scheduler,
        *,
        model_name: str = BASE,
        api_key: str | None = None,
        timeout: float = 300.0,
        max_body: int = MAX_BODY_BYTES,
        max_tokens: int = 256,
    ):
        self.rt, self.store, self.scheduler = runtime, store, scheduler
        self.model_name, self.api_key, self.timeout = model_name, api_key, timeout
        self.max_body, self.max_tokens = max_body, max_tokens
        self.created = int(time.time())

    # -- parsing

    def resolve_model(self, model: Any) -> list[str]:
        """'base' -> [], 'base+alice' -> ['alice'], 'base+alice+bob' composes both."""
        if model is None:
            return []
        if not isinstance(model, str):
            raise _bad(f"model must be a string, not {model!r}", "model")
        base, *names = model.split("+")
        if base not in (self.model_name, BASE, self.rt.manifest.source_model):
            raise ApiError(
                404,
                f"model {model!r} does not exist; GET /v1/models lists {self.model_name!r} and "
                f"{self.model_name}+NAME for each patch",
                param="model",
                code="model_not_found",
            )
        for name in names:
            if self.store.get(name) is None:
                why = self.store.errors.get(name)
                raise ApiError(
                    404,
                    f"model {model!r}: patch {name!r} "
                    + (f"could not be loaded ({why})" if why else f"is not in the patch folder ({name}.reft)"),
                    param="model",
                    code="model_not_found",
                )
        return names

    def parse(self, body: Any, chat: bool) -> Parsed:
        from reft_edge.runtime.sampling import Sampling
        from reft_edge.runtime.slots import resolve_edits, slot_arrays

        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", code="invalid_body")
        allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise _bad(
                f"unknown field {unknown[0]!r} for {'chat completions' if chat else 'completions'}",
                unknown[0],
                "unknown_field",
            )
        _refuse_unsupported(body)
        self.store.refresh()
        names = self.resolve_model(body.get("model"))
        patches = [self.store.get(n) for n in names]
        weights = [1.0] * len(patches)
        for i, item in enumerate(self._patch_field(body.get("patches"))):
            name, weight = item
            patch = self.store.get(name)
            if patch is None:
                raise _bad(
                    f"patches[{i}]: no patch {name!r} in the patch folder; GET /v1/models lists them",
                    "patches",
                    "patch_not_found",
                )
            names.append(name)
            patches.append(patch)
            weights.append(weight)
        skills = body.get("skills")
        if skills is not None:
            patches = self._skills(patches, skills)

        if chat:
            prompt = _messages(body.get("messages"))
            raw = False
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise _bad("prompt must be a string (one prompt per request)", "prompt")
            raw = True
        try:
            prompt_ids = self.rt.encode(prompt, raw=raw)
        except UsageError as exc:
            raise _bad(str(exc), "messages" if chat else "prompt") from None

        limit = self.rt.manifest.context_length
        room = limit - len(prompt_ids)
        if room < 1:
            raise _bad(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        max_tokens = _number(body, "max_tokens", 1, 1 << 30, integer=True)
        if chat and body.get("max_completion_tokens") is not None:
            max_tokens = _number(body, "max_completion_tokens", 1, 1 << 30, integer=True)
        if max_tokens is None:
            max_tokens = min(self.max_tokens, room)
        elif max_tokens > room:
            raise _bad(
                f"the prompt's {len(prompt_ids)} tokens plus max_tokens {max_tokens} pass the model's "
                f"context of {limit}; ask for {room} or fewer",
                "max_tokens",
                "context_length_exceeded",
            )

        defaults = self.rt.manifest.generation or {}
        options = {
            "temperature": _number(body, "temperature", 0, 2),
            "top_p": _number(body, "top_p", 0, 1),
            "top_k": _number(body, "top_k", 1, 1 << 30, integer=True),
            "repetition_penalty": _number(body, "repetition_penalty", 0.01, 100),
        }
        if options["top_p"] == 0:
            raise _bad("top_p must be above 0", "top_p")
        options = {k: v if v is not None else defaults.get(k) for k, v in options.items()}
        options["temperature"] = options["temperature"] or 0.0
        seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
        no_repeat = _number(body, "no_repeat_ngram", 0, 1 << 16, integer=True)
        try:
            sampling = Sampling.check(
                **options,
                # the loop guard, on by default as in every runtime (reft_edge.constants); 0 turns it off
                no_repeat_ngram=NO_REPEAT_NGRAM if no_repeat is None else no_repeat,
                seed=None if seed is None else seed % (1 << 64),
                frequency_penalty=_number(body, "frequency_penalty", -2, 2),
                presence_penalty=_number(body, "presence_penalty", -2, 2),
            )
        except UsageError as exc:
            raise _bad(str(exc)) from None

        stop = body.get("stop")
        stops = (stop,) if isinstance(stop, str) else stop
        if stops is None:
            stops = ()
        if not isinstance(stops, list | tuple) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop must be a non-empty string or a list of up to 4 of them", "stop")

        try:
            edits = resolve_edits(patches, weights, self.rt.manifest.slot_layers)
        except UsageError as exc:
            raise _bad(str(exc), "patches") from None
        slots = slot_arrays([edits], len(self.rt.manifest.slot_layers), self.rt.manifest.hidden_size)
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _bad("ignore_eos must be true or false", "ignore_eos")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise _bad("stream must be true or false", "stream")
        options_field = body.get("stream_options") or {}
        if not isinstance(options_field, dict) or set(options_field) - {"include_usage", "continuous_usage_stats"}:
            raise _bad("stream_options takes include_usage only", "stream_options")
        model = body.get("model") or self.model_name
        return Parsed(
            model,
            names,
            dict(
                prompt_ids=prompt_ids,
                slots=slots,
                sampling=sampling,
                max_tokens=int(max_tokens),
                stop=tuple(stops),
                ignore_eos=ignore_eos,
            ),
            stream,
            bool(options_field.get("include_usage")),
        )

    @staticmethod
    def _patch_field(value: Any) -> list[tuple[str, float]]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise _bad('patches must be a list like [{"name": "alice", "weight": 1.0}]', "patches")
        items = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "weight"}:
                raise _bad(f'patches[{i}] must be {{"name": str, "weight": number}}', "patches")
            weight = item.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not np.isfinite(weight):
                raise _bad(f"patches[{i}].weight must be a finite number", "patches")
            items.append((item["name"], float(weight)))
        return items

    @staticmethod
    def _skills(patches: list[Any], value: Any) -> list[Any]:
        if isinstance(value, list):
            value = dict.fromkeys(value, 1.0)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and not isinstance(w, bool) and isinstance(w, int | float) and np.isfinite(w)
            for k, w in value.items()
        ):
            raise _bad('skills must be {"NAME": weight, ...} (or a list of names)', "skills")
        known = {name for patch in patches for name in patch.skill_names}
        unknown = sorted(set(value) - known)
        if unknown:
            raise _bad(
                f"skills: no chosen patch has a skill {unknown[0]!r}; their skills are "
                f"{', '.join(sorted(known)) or 'none'}",
                "skills",
                "skill_not_found",
            )
        return [
            p.with_skills({n: float(w) for n, w in value.items() if n in p.skill_names}) if p.skills else p
            for p in patches
        ]


# -- HTTP -----------------------------------------------------------------------------------------


def build_app(service: Service) -> Any:
    """The Starlette application of a Service."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    def authorise(request: Any) -> None:
        if service.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {service.api_key}":
            raise ApiError(401, "invalid or missing API key: send Authorization: Bearer KEY", code="invalid_api_key")

    async def read_json(request: Any) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > service.max_body:
            raise ApiError(413, f"the request body is larger than {service.max_body} bytes", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > service.max_body:
                raise ApiError(413, f"the request body is larger than {service.max_body} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _bad(f"the request body is not valid JSON ({exc})", code="invalid_json") from None

    def log_line(
        request: Any,
        status: int,
        started: float,
        parsed: Parsed | None = None,
        job: Job | None = None,
        finish: str | None = None,
        note: str = "",
    ) -> None:
        parts = [f"{request.method} {request.url.path} {status}"]
        if parsed is not None:
            parts.append(
                f"model={parsed.model} patches={','.join(parsed.patch_names) or '-'}"
                f"{' stream' if parsed.stream else ''}"
            )
        if job is not None:
            ttft = f"{(job.first_token - job.submitted) * 1000:.0f}ms" if job.first_token else "-"
            parts.append(f"prompt={len(job.prompt_ids)} tokens={job.tokens} ttft={ttft}")
        parts.append(f"latency={(time.perf_counter() - started) * 1000:.0f}ms")
        if finish:
            parts.append(f"finish={finish}")
        if note:
            parts.append(note)
        log.info(" ".join(parts))

    async def completions(request: Any, chat: bool) -> Any:
        started = time.perf_counter()
        parsed = job = None
        try:
            authorise(request)
            body = await read_json(request)
            parsed = service.parse(body, chat)
            job = Job(**parsed.job_args, loop=asyncio.get_running_loop())
            try:
                service.scheduler.submit(job)
            except QueueFull:
                raise ApiError(
                    429,
                    f"the server is busy ({service.scheduler.max_queue} requests already wait); retry shortly",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                ) from None
        except ApiError as error:
            log_line(request, error.status, started, parsed, note=f"error={error.code or error.type}")
            return error_response(error)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if parsed.stream:
            return StreamingResponse(
                stream(request, parsed, job, ident, chat, started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await collect(request, parsed, job, ident, chat, started)

    def usage(job: Job) -> dict[str, int]:
        return {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": job.tokens,
            "total_tokens": len(job.prompt_ids) + job.tokens,
        }

    async def next_event(job: Job, deadline: float) -> tuple:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise TimeoutError
        return await asyncio.wait_for(job.events.get(), remaining)

    async def watch_disconnect(request: Any, job: Job) -> None:
        """The body is read: the next message is the client going away; free its row then."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    async def collect(request: Any, parsed: Parsed, job: Job, ident: str, chat: bool, started: float) -> Any:
        watcher = asyncio.create_task(watch_disconnect(request, job))
        pieces, finish, status = [], None, 200
        try:
            deadline = started + service.timeout
            while True:
                event = await next_event(job, deadline)
                if event[0] == "piece":
                    pieces.append(event[1])
                elif event[0] == "done":
                    finish = FINISH[event[1]]
                    break
                elif event[0] == "cancelled":
                    log_line(request, 499, started, parsed, job, note="client disconnected")
                    return error_response(ApiError(499, "the client went away", code="client_closed"))
                else:
                    status = event[1]
                    raise ApiError(event[1], event[2], type="server_error")
        except TimeoutError:
            job.cancel()
            status = 504
            error = ApiError(
                504,
                f"the request took longer than {service.timeout:g} s; it was stopped "
                "(ask for fewer max_tokens or retry)",
                type="timeout",
                code="timeout",
            )
            log_line(request, status, started, parsed, job, note="error=timeout")
            return error_response(error)
        except ApiError as error:
            log_line(request, status, started, parsed, job, note="error=generation")
            return error_response(error)
        finally:
            watcher.cancel()
            job.cancel()  # a no-op when it ended; else its row is freed at the next step
        text = "".join(pieces)
        created = int(time.time())
        if chat:
            body = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": parsed.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": usage(job),
            }
        else:
            body = {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": parsed.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "usage": usage(job),
            }
        log_line(request, 200, started, parsed, job, finish=finish)
        return JSONResponse(body)

    async def stream(request: Any, parsed: Parsed, job: Job, ident: str, chat: bool, started: float):
        created = int(time.time())

        def chunk(delta: dict | None, text: str | None, finish: str | None) -> str:
            if chat:
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                body = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": parsed.model,
                    "choices": [choice],
                }
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                body = {
                    "id": ident,
                    "object": "text_completion",
                    "created": created,
                    "model": parsed.model,
                    "choices": [choice],
                }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        finish, note, status = None, "", 200
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None, None)
            deadline = started + service.timeout
            while True:
                try:
                    event = await next_event(job, deadline)
                except TimeoutError:
                    status, note = 504, "error=timeout"
                    error = ApiError(
                        504,
                        f"the request took longer than {service.timeout:g} s; it was stopped",
                        type="timeout",
                        code="timeout",
                    )
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                if event[0] == "piece":
                    yield chunk({"content": event[1]}, event[1], None)
                elif event[0] == "done":
                    finish = FINISH[event[1]]
                    yield chunk({}, "", finish)
                    if parsed.include_usage:
                        body = {
                            "id": ident,
                            "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created,
                            "model": parsed.model,
                            "choices": [],
                            "usage": usage(job),
                        }
                        yield f"data: {json.dumps(body)}\n\n"
                    break
                elif event[0] == "cancelled":
                    status, note = 499, "client disconnected"
                    return
                else:
                    status, note = event[1], "error=generation"
                    yield f"data: {json.dumps(ApiError(event[1], event[2], type='server_error').body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status, note = 499, "client disconnected"
            raise
        finally:
            watcher.cancel()
            job.cancel()  # frees the row at once when the client went away mid-stream
            log_line(request, status, started, parsed, job, finish=finish, note=note)

    async def chat_route(request: Any) -> Any:
        return await completions(request, chat=True)

    async def completion_route(request: Any) -> Any:
        return await completions(request, chat=False)

    def model_entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": service.created, "owned_by": "reft-edge"}

    async def models_route(request: Any) -> Any:
        started = time.perf_counter()
        try:
            authorise(request)
        except ApiError as error:
            log_line(request, error.status, started, note=f"error={error.code}")
            return error_response(error)
        service.store.refresh()
        names = [service.model_name] + [f"{service.model_name}+{n}" for n in sorted(service.store.patches)]
        log_line(request, 200, started)
        return JSONResponse({"object": "list", "data": [model_entry(n) for n in names]})

    async def health_route(request: Any) -> Any:
        scheduler = service.scheduler
        return JSONResponse(
            {
                "status": "ok" if scheduler.thread.is_alive() else "scheduler stopped",
                "model": service.model_name,
                "source_model": service.rt.manifest.source_model,
                "patches": sorted(service.store.patches),
                "skipped_patches": sorted(service.store.errors),
                "running": scheduler.active,
                "queued": scheduler.queued,
                "decode_steps": scheduler.steps,
                "batch_capacity": scheduler.batch.capacity,
            },
            status_code=200 if scheduler.thread.is_alive() else 503,
        )

    async def not_found(request: Any, exc: Exception) -> Any:
        status = getattr(exc, "status_code", 404)
        reason = "no such route" if status == 404 else "method not allowed"
        message = f"{request.method} {request.url.path}: {reason}"
        return error_response(ApiError(status, message, code="not_found" if status == 404 else "method_not_allowed"))

    async def internal(request: Any, exc: Exception) -> Any:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    routes = [
        Route("/v1/chat/completions", chat_route, methods=["POST"]),
        Route("/v1/completions", completion_route, methods=["POST"]),
        Route("/v1/models", models_route, methods=["GET"]),
        Route("/health", health_route, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: internal})


# -- running it -----------------------------------------------------------------------------------


def _require_serve_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"reft-edge serve needs {exc.name}; install it with pip install 'reft-edge[serve]'") from None


@dataclass
class Server:
    """A loaded bundle, its patch folder, the scheduler and the app, bound to a socket."""

    service: Service
    app: Any
    sock: socket.socket

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    @classmethod
    def open(
        cls,
        bundle: str | Path,
        patches: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        api_key: str | None = None,
        threads: int | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        timeout: float = 300.0,
        max_body: int = MAX_BODY_BYTES,
        max_tokens: int = 256,
        model_name: str = BASE,
    ) -> Server:
        _require_serve_extra()
        from reft_edge.runtime import Runtime

        for name, value, low in (
            ("--max-batch", max_batch, 1),
            ("--max-queue", max_queue, 0),
            ("--max-tokens", max_tokens, 1),
        ):
            if value < low:
                raise UsageError(f"{name} {value} must be at least {low}")
        if timeout <= 0:
            raise UsageError(f"--timeout {timeout} must be a positive number of seconds")
        if "+" in model_name or not model_name:
            raise UsageError(f"--model-name {model_name!r} must be non-empty and without '+'")
        folder = Path(patches)
        if not folder.is_dir():
            raise UsageError(f"--patches {folder}: not a folder; pass the folder holding the .reft files")
        rt = Runtime.load(bundle, threads=threads)
        store = PatchStore(folder, rt.manifest)
        store.refresh()
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port (0 takes a free one) or --host"
            ) from None
        scheduler = Scheduler(rt, max_batch=max_batch, max_queue=max_queue).start()
        service = Service(
            rt,
            store,
            scheduler,
            model_name=model_name,
            api_key=api_key,
            timeout=timeout,
            max_body=max_body,
            max_tokens=max_tokens,
        )
        return cls(service, build_app(service), sock)

    def uvicorn(self) -> Any:
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        return uvicorn.Server(config)

    def run(self) -> None:
        """Serve until interrupted (the CLI)."""
        try:
            self.uvicorn().run(sockets=[self.sock])
        finally:
            self.service.scheduler.stop()

    @contextmanager
    def background(self) -> Iterator[str]:
        """Serve from a thread of this process; yields the URL, stops on exit."""
        server = self.uvicorn()
        thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        thread.start()
        try:
            while not server.started:
                if not thread.is_alive():
                    raise UsageError("the server did not start; run reft-edge serve in a shell to see why")
                time.sleep(0.02)
            yield self.url
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            self.service.scheduler.stop()
            self.sock.close()


@contextmanager
def serving(bundle: str | Path, patches: str | Path, **options: Any) -> Iterator[str]:
    """``reft-edge serve`` on a free port of 127.0.0.1 in a background thread; yields its URL."""
    options.setdefault("port", 0)
    with Server.open(bundle, patches, **options).background() as url:
        yield url


def configure_logging() -> None:
    """One line per request on stderr (the CLI's)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(os.environ.get("REFT_EDGE_LOG_LEVEL", "INFO"))
    log.propagate = False
