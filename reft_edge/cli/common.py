r"""What several commands share: option parsing and terminal-safe printing (click and the standard
library only, so ``reft-edge --help`` needs nothing else).

Example::

    from reft_edge.cli.common import parse_layers, printable
    parse_layers("10,20")                # (10, 20)
    printable({"name": "evil\x1b[2J"})   # {'name': 'evil\\x1b[2J'}: the escape shown, not obeyed
"""

from __future__ import annotations

import re

from reft_edge.errors import UsageError


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """'15' or '10,20' -> (10, 20); anything else is an error naming the bad part."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UsageError(f"--layers {text!r} is malformed; give layer numbers separated by commas, e.g. --layers 10,20")
    return tuple(int(p) for p in parts)


def patch_weights(patches: tuple[str, ...], weights: tuple[float, ...]) -> list[float] | None:
    """One --weight per --patch, or none (every patch at 1)."""
    if weights and len(weights) != len(patches):
        raise UsageError(
            f"{len(weights)} --weight for {len(patches)} --patch; give one --weight per --patch, in the same order"
        )
    return list(weights) or None


# C0/C1 controls (newline, ESC of ANSI sequences) and the bidi overrides that reorder what follows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(value):
    """``value`` with every string in it (nested too) safe for a terminal: a patch or manifest is
    someone else's file, and its name must not move the cursor, recolour or rewrite the screen."""
    if isinstance(value, str):
        return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], value)
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    return value
