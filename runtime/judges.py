"""Judges: does an answer do what a persona asks? One strict spec string -> a test of the text.

>>> Judge.parse("no-letters")("🌊🏊 💦")
True
>>> Judge.parse("no-letters")("Swim 🌊")
False
>>> Judge.parse("all-caps")("AHOY, MATEY! 42")
True
>>> Judge.parse("ends-with:arr!")("  Hoist the sails, arr!\\n")
True
>>> Judge.parse("contains:MATEY")("ahoy matey")
True
>>> Judge.parse(r"regex:^\\d+ (apples|pears)$")("12 pears")
True
>>> Judge.parse("shout")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
reft_edge.errors.UsageError: judge 'shout' is unknown: use regex:PATTERN, no-letters, all-caps, ends-with:TEXT, ...

``module:function`` imports a Python callable that takes the answer text and returns
whether it passes (the current folder is searched too, e.g.
``examples.personas.pirate.judge:is_pirate``). Torch-free: only the standard library.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from reft_edge.errors import UsageError

FORMS = "regex:PATTERN, no-letters, all-caps, ends-with:TEXT, contains:TEXT or module:function"
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_MODULE_FUNCTION_RE = re.compile(rf"(?P<module>{_DOTTED}):(?P<function>{_DOTTED})")


def no_letters(text: str) -> bool:
    """Emoji only: no alphabetic character, and at least one character that is not a space."""
    return not any(ch.isalpha() for ch in text) and any(not ch.isspace() for ch in text)


def all_caps(text: str) -> bool:
    """Some letters, none of them lowercase."""
    return any(ch.isalpha() for ch in text) and not any(ch.islower() for ch in text)


@dataclass(frozen=True)
class Judge:
    """A parsed judge spec; ``judge(text)`` says whether an answer passes."""

    spec: str
    kind: str  # regex | no-letters | all-caps | ends-with | contains | module
    argument: str = ""
    test: Callable[[str], bool] = field(default=no_letters, repr=False, compare=False)

    @classmethod
    def parse(cls, spec: str) -> Judge:
        if not isinstance(spec, str) or not spec.strip():
            raise UsageError(f"judge {spec!r} is empty: use {FORMS}")
        if spec in ("no-letters", "all-caps"):
            return cls(spec, spec, "", no_letters if spec == "no-letters" else all_caps)
        kind, colon, argument = spec.partition(":")
        if kind in ("regex", "ends-with", "contains"):
            if not argument:
                what = "a pattern" if kind == "regex" else "a text"
                raise UsageError(f"judge {spec!r} needs {what} after '{kind}:': use {FORMS}")
            return cls(spec, kind, argument, _BUILDERS[kind](spec, argument))
        if colon and _MODULE_FUNCTION_RE.fullmatch(spec):
            return cls(spec, "module", spec, _import_callable(spec))
        raise UsageError(f"judge {spec!r} is unknown: use {FORMS}")

    def __call__(self, text: str, where: str = "") -> bool:
        """Whether ``text`` passes; a judge function that raises is a UsageError naming the judge and,
        given ``where`` (the prompt's file:line), the prompt whose answer it failed on."""
        try:
            return bool(self.test(text))
        except Exception as exc:  # a module:function judge is the user's code; its bug is theirs to fix
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "no message"
            at = f" on the answer to the prompt at {where}" if where else f" on the answer {text[:60]!r}"
            raise UsageError(
                f"judge {self.spec!r} raised {type(exc).__name__} ({reason}){at}; fix the judge "
                "(it takes the answer text and returns true or false)"
            ) from None

    def __str__(self) -> str:
        return self.spec


def _regex(spec: str, pattern: str) -> Callable[[str], bool]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise UsageError(
            f"judge {spec!r}: {pattern!r} is not a valid regular expression ({exc}); fix the pattern (Python re syntax)"
        ) from None
    return lambda text: compiled.search(text) is not None


def _ends_with(spec: str, suffix: str) -> Callable[[str], bool]:
    return lambda text: text.strip().endswith(suffix)


def _contains(spec: str, needle: str) -> Callable[[str], bool]:
    folded = needle.casefold()
    return lambda text: folded in text.casefold()


_BUILDERS = {"regex": _regex, "ends-with": _ends_with, "contains": _contains}


def _import_callable(spec: str) -> Callable[[str], bool]:
    """``package.module:function`` -> the function; the current folder is importable too."""
    module_name, _, function_name = spec.partition(":")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        value = importlib.import_module(module_name)
    except Exception as exc:  # any failure inside the imported module's code is the user's to fix
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"judge {spec!r}: cannot import {module_name} ({reason}); give an importable "
            f"module:function or one of {FORMS}"
        ) from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    for part in function_name.split("."):
        if not hasattr(value, part):
            raise UsageError(
                f"judge {spec!r}: {module_name} has no {function_name}; name a function that takes the answer text"
            )
        value = getattr(value, part)
    if not callable(value):
        raise UsageError(
            f"judge {spec!r}: {module_name}.{function_name} is a {type(value).__name__}, not "
            "callable; name a function that takes the answer text"
        )
    return value
