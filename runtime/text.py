"""Generated token ids -> text pieces, incrementally, with stop strings (one per batch row).

Example::

    from tokenizers import Tokenizer
    from reft_edge.runtime.text import TextRow
    row = TextRow(Tokenizer.from_file("bundle/tokenizer.json"), stop=("\\n\\n",))
    pieces = [row.push(token) for token in (72, 101)] + [row.finish("length")]
    print(row.text == "".join(pieces), row.finish_reason)

tokenizers' DecodeStream holds back a token that ends inside a multi-byte UTF-8
character until the character is complete, so a piece never holds half an emoji.
Text that could be the start of a stop string is held back too, until it either
completes the stop string (and is dropped) or cannot anymore. Each step costs time
proportional to the stop strings' length, never to the text generated so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers.decoders import DecodeStream


class TextRow:
    """The tokens and text of one generated answer, built one token at a time."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stop = tuple(s for s in stop if s)
        self._pieces: list[str] = []
        self._pending = ""  # decoded but not yet emitted: a possible beginning of a stop string
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None  # eos | stop | length

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def push(self, token: int) -> str:
        """Add a generated token; returns the text that became final (often '', never a partial character)."""
        self.token_ids.append(token)
        chunk = self._decoder.step(self._tokenizer, token)
        if not chunk:
            return ""
        pending = self._pending + chunk
        cut = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            self.finish_reason = "stop"
            return self._emit(pending[:cut])
        hold = self._held_back(pending)
        self._pending = pending[len(pending) - hold :] if hold else ""
        return self._emit(pending[: len(pending) - hold])

    def finish(self, reason: str) -> str:
        """End the answer (eos or length); returns any text still held back."""
        self.finish_reason = reason
        rest, self._pending = self._pending, ""
        return self._emit(rest)

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that some stop string starts with."""
        longest = max((len(s) - 1 for s in self._stop), default=0)
        for size in range(min(longest, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0

    def _emit(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece
