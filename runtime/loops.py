"""Does an answer loop? The degenerate repetition a patched small model can fall into.

>>> loops("Great for beginners; Great for beginners; Great for beginners; Great for")
True
>>> loops("kindly kindly kindly help me")
True
>>> loops("Paris is the capital of France. It is also its largest city.")
False
>>> loops("- one\\n- two\\n- three")
False

An answer loops when any of these holds (case-folded, on words of letters and digits):
a word, or a run of two or three words, three times in a row ("là à là à là à"); a word
trigram three times anywhere; a non-empty line three times. Lists and short repeated
function words ("the ... the ... the") do not count. Used by the quality and
composition benchmarks (share of looping answers at 48 and 256 new tokens); torch-free.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"\w+")
REPEATS = 3  # how many times a word in a row, a trigram or a line must occur


def loops(text: str) -> bool:
    """True when ``text`` shows degenerate repetition (see the module docstring)."""
    words = _WORD.findall(text.casefold())
    for n in (1, 2, 3):  # the same n words, REPEATS times back to back
        for i in range(len(words) - n * REPEATS + 1):
            if all(words[i + k * n : i + (k + 1) * n] == words[i : i + n] for k in range(1, REPEATS)):
                return True
    trigrams = Counter(tuple(words[i : i + 3]) for i in range(len(words) - 2))
    if trigrams and max(trigrams.values()) >= REPEATS:
        return True
    lines = Counter(line.strip().casefold() for line in text.splitlines() if line.strip())
    return bool(lines) and max(lines.values()) >= REPEATS


def loop_share(texts: list[str]) -> float:
    """The share of ``texts`` that loop (0.0 for none)."""
    return sum(loops(t) for t in texts) / len(texts) if texts else 0.0
