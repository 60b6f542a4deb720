"""Input checks shared by the CLI and the API (pure Python): click option types that refuse, at
parse time, numbers no command can use, and the test for text that is not valid Unicode.

``inf``, ``nan`` and ``1e39`` parse as floats, and a seed of -5 or 2**64 parses as an int; each
used to pass the option parser and fail later (a NaN patch written, a ValueError from numpy).

Example::

    @click.option("--lr", type=FINITE_FLOAT)        # inf, nan: exit 2 before anything runs
    @click.option("--weight", type=FLOAT32)         # also within float32's range (|x| < 3.4e38)
    @click.option("--seed", type=SEED)              # 0 .. 2**32 - 1, what numpy and torch both accept
"""

from __future__ import annotations

import math

import click

FLOAT32_MAX = 3.4028234663852886e38
SEED_MAX = 2**32 - 1  # numpy's legacy seeding bound; torch and default_rng accept at least this range


class FiniteFloat(click.ParamType):
    """A float that is finite and, with ``float32``, also finite once stored as float32."""

    name = "number"

    def __init__(self, float32: bool = False) -> None:
        self.float32 = float32

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; give an ordinary number such as 0.5", param, ctx)
        if self.float32 and abs(number) > FLOAT32_MAX:
            self.fail(
                f"{value!r} overflows float32 (|x| at most {FLOAT32_MAX:.4g}), where it is used; give a smaller number",
                param,
                ctx,
            )
        return number


FINITE_FLOAT = FiniteFloat()
FLOAT32 = FiniteFloat(float32=True)
SEED = click.IntRange(0, SEED_MAX)


def check_seed(seed: int | None, option: str = "--seed") -> None:
    """The same bound for API callers and per-person options (train-many's jobs file)."""
    from reft_edge.errors import UsageError

    if seed is not None and (type(seed) is not int or not 0 <= seed <= SEED_MAX):
        raise UsageError(f"{option} {seed!r} is not a seed; give a whole number from 0 to {SEED_MAX}")


def not_unicode(text: str) -> str | None:
    """Where ``text`` cannot be encoded as UTF-8 (a lone surrogate, as undecodable command-line bytes
    or JSON's "\\ud800" become), e.g. "'\\udcff' at character 3"; None when it is valid text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{text[exc.start]!r} at character {exc.start + 1}"
    return None
