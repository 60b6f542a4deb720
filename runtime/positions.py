"""Which tokens an intervention edits: pyreft's ``f{p}+l{s}`` notation, grown by ``p`` and ``g``,
parsed strictly.

A positions string joins, with ``+`` and in this order, any of:

- ``f<p>``: the first p prompt tokens; ``l<s>``: the last s prompt tokens (pyreft's notation);
- ``p``: every prompt token (instead of ``f``/``l``);
- ``g``: every generated token (in training: every response token, fed by teacher forcing).

``all`` is short for ``p+g`` (the steering-vector case: every token, prompt and answer).

>>> Positions.parse("f2+l2").spans(prompt_len=10)
(range(0, 2), range(8, 10))
>>> Positions.parse("f3+l3").spans(prompt_len=4)  # capped so prefix and suffix never overlap
(range(0, 3), range(3, 4))
>>> str(Positions.parse("f1+l1+g")), Positions.parse("f1+l1+g").groups()
('f1+l1+g', ('prefix', 'suffix', 'generated'))
>>> Positions.parse("all") == Positions.parse("p+g"), Positions.parse("p").spans(prompt_len=5)
(True, (range(0, 5), range(5, 5)))
>>> Positions.parse("l1").edits("both", "generated"), Positions.parse("l1+g").edits("both", "generated")
(False, True)
>>> Positions.parse("g+f1")
Traceback (most recent call last):
...
reft_edge.errors.UsageError: positions 'g+f1' is malformed: expected parts f<p>, l<s>, p, g joined by '+' ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reft_edge.errors import UsageError

_PART_RE = re.compile(r"f(?P<first>\d+)|l(?P<last>\d+)|(?P<prompt>p)|(?P<generated>g)")
# An intervention's "where": which of the patch's position groups it edits. "both" (every
# group the positions name) is what shared weights use; untied weights get one per group.
WHERE = ("both", "prefix", "suffix", "generated")


@dataclass(frozen=True)
class Positions:
    """The first ``first`` / last ``last`` prompt tokens (or every prompt token when ``prompt``),
    and every generated token when ``generated``."""

    first: int
    last: int
    prompt: bool = False
    generated: bool = False

    @classmethod
    def parse(cls, text: str) -> Positions:
        text = text.strip() if isinstance(text, str) else text
        if text == "all":
            return cls(0, 0, prompt=True, generated=True)
        parts = [_PART_RE.fullmatch(part) for part in text.split("+")] if isinstance(text, str) else [None]
        positions = None
        if all(parts):
            found = {key: value for part in parts for key, value in part.groupdict().items() if value is not None}
            positions = cls(
                int(found.get("first", 0)), int(found.get("last", 0)), "prompt" in found, "generated" in found
            )
        # the canonical spelling is the only one accepted: no repeats, no f0, order f, l, p, g
        if positions is None or str(positions) != text or (positions.prompt and (positions.first or positions.last)):
            raise UsageError(
                f"positions {text!r} is malformed: expected parts f<p>, l<s>, p, g joined by '+' in that order "
                "(f and l exclude p), or 'all'; e.g. --positions f1+l1+g"
            )
        return positions

    def __str__(self) -> str:
        parts = ([f"f{self.first}"] if self.first else []) + ([f"l{self.last}"] if self.last else [])
        parts += (["p"] if self.prompt else []) + (["g"] if self.generated else [])
        return "+".join(parts)

    def groups(self) -> tuple[str, ...]:
        """The position groups this selects: the interventions of untied weights, one per group."""
        return tuple(
            group
            for group, used in (
                ("prefix", self.first or self.prompt),
                ("suffix", self.last),
                ("generated", self.generated),
            )
            if used
        )

    def edits(self, where: str, group: str) -> bool:
        """Whether an intervention on ``where`` edits the tokens of ``group``."""
        return group in self.groups() and where in ("both", group)

    def spans(self, prompt_len: int) -> tuple[range, range]:
        """(prefix, suffix) token ranges in a prompt of ``prompt_len`` tokens, never overlapping."""
        if self.prompt:
            return range(0, prompt_len), range(prompt_len, prompt_len)
        first = min(self.first, prompt_len)
        last = min(self.last, prompt_len - first)
        return range(0, first), range(prompt_len - last, prompt_len)

    def token_indices(self, where: str, prompt_len: int) -> list[int]:
        """The prompt tokens an intervention on ``where`` edits (generated tokens: see ``edits``)."""
        prefix, suffix = self.spans(prompt_len)
        return [*(prefix if where in ("both", "prefix") else ()), *(suffix if where in ("both", "suffix") else ())]
