"""Which prompt tokens an intervention edits: pyreft's ``f{p}+l{s}`` notation, parsed strictly.

>>> Positions.parse("f2+l2").spans(prompt_len=10)
(range(0, 2), range(8, 10))
>>> Positions.parse("f3+l3").spans(prompt_len=4)  # capped so prefix and suffix never overlap
(range(0, 3), range(3, 4))
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reft_edge.errors import UsageError

_POSITIONS_RE = re.compile(r"(?:f(?P<first>\d+))?(?P<plus>\+)?(?:l(?P<last>\d+))?")


@dataclass(frozen=True)
class Positions:
    """The first ``first`` and the last ``last`` tokens of the chat-formatted prompt."""

    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> "Positions":
        match = _POSITIONS_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        both = bool(match) and match["first"] is not None and match["last"] is not None
        if not match or (match["first"] is None and match["last"] is None) or bool(match["plus"]) != both:
            raise UsageError(
                f"positions {text!r} is malformed: expected 'f<p>+l<s>', 'f<p>' or 'l<s>' "
                "with whole numbers, e.g. --positions f1+l1"
            )
        positions = cls(int(match["first"] or 0), int(match["last"] or 0))
        if positions.first + positions.last == 0:
            raise UsageError(f"positions {text!r} selects no token: use at least f1 or l1")
        return positions

    def __str__(self) -> str:
        parts = ([f"f{self.first}"] if self.first else []) + ([f"l{self.last}"] if self.last else [])
        return "+".join(parts)

    def spans(self, prompt_len: int) -> tuple[range, range]:
        """(prefix, suffix) token ranges in a prompt of ``prompt_len`` tokens, never overlapping."""
        first = min(self.first, prompt_len)
        last = min(self.last, prompt_len - first)
        return range(0, first), range(prompt_len - last, prompt_len)

    def token_indices(self, where: str, prompt_len: int) -> list[int]:
        """The prompt tokens an intervention on ``where`` (both, prefix, suffix) edits."""
        prefix, suffix = self.spans(prompt_len)
        return {"both": [*prefix, *suffix], "prefix": list(prefix), "suffix": list(suffix)}[where]
