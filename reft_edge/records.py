"""Data records every stage agrees on: JSONL lines -> chat-formatted prompt tokens + response tokens,
and the batches evaluation walks them in. Torch-free (training, the runtime and evaluation share it).

Each line is ``{"prompt": "...", "response": "..."}`` or ``{"messages": [...]}`` (the
last message must be the assistant's; it is the target). The prompt is formatted with
the model's chat template (one user message, generation prompt added) exactly as the
runtime formats it; the loss covers the response tokens plus the end-of-turn token.

Example::

    from reft_edge.records import read_jsonl, tokenize
    records = read_jsonl("examples/emoji/train.jsonl")
    examples = tokenize(records, tokenizer, use_chat_template=True)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reft_edge.errors import DataError
from reft_edge.params import not_unicode

BATCH_SIZE = 8  # prompts or examples per batch when evaluating

Messages = Sequence[dict[str, str]]

_FIX = 'each line must be {"prompt": "...", "response": "..."} or {"messages": [...]}'
# A training example must fit the model's context (checked in tokens by tokenize); a line this
# long could not fit any model's, and reading it into tokens alone would take minutes and gigabytes.
MAX_LINE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Record:
    """One training pair: the conversation before the answer, and the answer."""

    messages: tuple[dict[str, str], ...]
    response: str
    where: str  # file:line, for error messages


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    # target tokens [loss_from, loss_to) count in the loss; the others are fed but not learned
    loss_from: int = 0
    loss_to: int | None = None


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_jsonl(path: str | Path) -> list[Record]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read data file ({exc.strerror}); check the --data path") from None
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        if len(line) > MAX_LINE_BYTES:
            raise DataError(
                f"{where}: {len(line)} bytes, longer than any model's context ({MAX_LINE_BYTES} bytes "
                "per example at most); split the example or drop it"
            )
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 (byte {exc.start}); save the file as UTF-8") from None
        if text:
            records.append(_parse_line(text, where))
    if not records:
        raise DataError(f"{path}: no examples; {_FIX}, one per line")
    return records


def _parse_line(text: str, where: str) -> Record:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc.msg}); {_FIX}") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: a JSON {type(value).__name__}, not an object; {_FIX}")
    if "messages" in value:
        messages = value["messages"]
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise DataError(
                f'{where}: \'messages\' must be a list of at least two {{"role": ..., "content": ...}} objects; ' + _FIX
            )
        if messages[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: the last message has role {messages[-1]['role']!r}; "
                "end each conversation with the assistant message to learn"
            )
        prompt = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
        response = messages[-1]["content"]
    elif isinstance(value.get("prompt"), str) and isinstance(value.get("response"), str):
        prompt, response = ({"role": "user", "content": value["prompt"]},), value["response"]
    else:
        raise DataError(f"{where}: lacks 'prompt' and 'response' strings; {_FIX}")
    if not response.strip():
        raise DataError(f"{where}: the response is empty; give every example a non-empty answer")
    if not any(m["content"].strip() for m in prompt):
        raise DataError(f"{where}: the prompt is empty; give every example a question")
    for text in (*(m["content"] for m in prompt), response, *(m["role"] for m in prompt)):
        bad = not_unicode(text)
        if bad is not None:
            raise DataError(
                f"{where}: holds {bad}, which is not valid Unicode text (a lone surrogate escape "
                "such as \\ud800); fix or drop that example"
            )
    return Record(prompt, response, where)


def prompt_text(tokenizer: Any, messages: list[dict[str, str]] | tuple, use_chat_template: bool) -> str:
    """The prompt exactly as the runtime will see it before the first generated token."""
    if use_chat_template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def _target_text(tokenizer: Any, record: Record, prompt: str, use_chat_template: bool) -> str:
    """Response plus the end-of-turn marker the template puts after it (else the EOS token)."""
    if use_chat_template:
        full = tokenizer.apply_chat_template(
            [*record.messages, {"role": "assistant", "content": record.response}], tokenize=False
        )
        tail = full[len(prompt) :] if full.startswith(prompt) else ""
        if tail.startswith(record.response) and tail[len(record.response) :].strip():
            return record.response + tail[len(record.response) :].rstrip()
    return record.response + (tokenizer.eos_token or "")


def tokenize(
    records: list[Record], tokenizer: Any, *, use_chat_template: bool, max_tokens: int | None = None
) -> list[Example]:
    """Records -> token ids; with ``max_tokens`` (the model's context), an example longer than that
    is a DataError naming its file:line (the rule: prompt and response tokens together must fit)."""
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("the model's tokenizer has no chat template; pass --no-chat-template to train on raw text")
    examples = []
    for record in records:
        prompt = prompt_text(tokenizer, record.messages, use_chat_template)
        target = _target_text(tokenizer, record, prompt, use_chat_template)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not prompt_ids or not target_ids:
            raise DataError(f"{record.where}: the prompt or response tokenizes to nothing; give real text")
        if max_tokens is not None and len(prompt_ids) + len(target_ids) > max_tokens:
            raise DataError(
                f"{record.where}: {len(prompt_ids) + len(target_ids)} tokens, longer than the model's "
                f"context of {max_tokens}; shorten the example or split it in two"
            )
        examples.append(Example(tuple(prompt_ids), tuple(target_ids)))
    return examples


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
