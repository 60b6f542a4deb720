"""Prompt formatting without transformers: the bundle's chat template, rendered as training renders it.

Example::

    from reft_edge.runtime.template import ChatTemplate
    template = ChatTemplate.from_file("bundle/chat_template.jinja", {"bos_token": "<s>", "eos_token": "</s>"})
    text = template.render([{"role": "user", "content": "Hi"}])   # generation prompt added

Training formats a prompt with ``tokenizer.apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)``. A patch edits the first and last few tokens of exactly
that text, so the runtime must produce the same characters: this module builds the
same sandboxed jinja2 environment transformers builds (trim_blocks, lstrip_blocks,
loop controls, its ``tojson``, ``raise_exception``, ``strftime_now``) and passes the
special token strings as variables, as ``apply_chat_template`` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from reft_edge.errors import BundleError, UsageError
from reft_edge.params import not_unicode


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it); renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers overrides jinja's tojson, which would escape HTML characters
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def user_messages(prompt: str) -> list[dict[str, str]]:
    """A plain prompt is one user message, as in training data's {"prompt": ...} lines."""
    return [{"role": "user", "content": prompt}]


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """A non-empty list of {"role": str, "content": str} dicts, with some text in it."""
    if (
        not isinstance(messages, Sequence)
        or isinstance(messages, str)
        or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise UsageError('messages must be a list of {"role": ..., "content": ...} dicts with string values')
    if not any(m["content"].strip() for m in messages):
        raise UsageError("the prompt is empty; give some text to answer")
    for m in messages:
        where = not_unicode(m["content"])
        if where is not None:
            raise UsageError(
                f"the {m['role']} message holds {where}, which is not valid Unicode text "
                "(undecodable bytes or a lone surrogate); pass UTF-8 text"
            )
    return [dict(m) for m in messages]


class ChatTemplate:
    """A compiled chat template plus the special-token variables it may read."""

    def __init__(self, source: str, variables: Mapping[str, Any], *, origin: str = "chat template"):
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise BundleError(f"{origin}: not a valid jinja template ({exc}); re-export the bundle") from None
        self._variables = dict(variables)
        self._origin = origin

    @classmethod
    def from_file(cls, path: str | Path, variables: Mapping[str, Any]) -> ChatTemplate:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path}: unreadable chat template ({exc}); re-export the bundle") from None
        return cls(source, variables, origin=str(path))

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                **self._variables, messages=messages, add_generation_prompt=add_generation_prompt
            )
        except jinja2.exceptions.TemplateError as exc:
            # raise_exception() in a template is how it rejects a conversation (e.g. roles out of order)
            raise UsageError(f"the chat template ({self._origin}) rejects these messages: {exc}") from None
        except Exception as exc:  # the template's own bug ({{ 1/0 }}, a recursion): the bundle is at fault
            reason = str(exc).splitlines()[0][:160] if str(exc) else ""
            raise BundleError(
                f"{self._origin}: the chat template fails when rendered ({type(exc).__name__}"
                f"{': ' + reason if reason else ''}); fix the template or re-export the bundle"
            ) from None


def template_variables(special_tokens: Mapping[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, ... as strings: what apply_chat_template passes from special_tokens_map."""
    return {key: value for key, value in special_tokens.items() if key.endswith("_token") and isinstance(value, str)}


def plain_text(messages: list[dict[str, Any]]) -> str:
    """Without a chat template, training joins the message texts with newlines; so does the runtime."""
    return "\n".join(m["content"] for m in messages)
