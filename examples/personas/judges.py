"""Judges for the personas in this folder: each takes a generated answer, returns True if it follows the persona.

Referenced from a persona.json as ``"judge": "examples.personas.judges:<function>"``. Every judge
ignores surrounding whitespace and is safe on answers cut short by a token limit: a judge whose
marker sits at the end of an answer (the brevity limit) fails a cut answer, because a cut answer
does not end a sentence.
"""

from __future__ import annotations

import re

__all__ = ["all_lowercase", "at_most_12_words", "formal_register", "mentions_gardening"]

# n't, 're, 'll, 've, 'm, 'd after a word, and 's after the pronouns where it can only be "is"/"has"
# (never a possessive); straight or curly apostrophe.
_CONTRACTION = re.compile(
    r"\b\w+['\u2019](?:t|re|ll|ve|m|d)\b"
    r"|\b(?:it|that|there|here|what|who|he|she|let|where|how|when|why)['\u2019]s\b",
    re.IGNORECASE,
)
_FORMAL_OPENING = re.compile(r"Certainly[.,]")
_SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u2019\u201d)\]]*\Z")
_GARDENING = re.compile(
    r"\b(?:garden\w*|compost\w*|seedlings?|flower ?beds?|mulch\w*|trowels?|allotments?|"
    r"vegetable patch(?:es)?|weeding|pruning|potting soil|raised beds?)\b",
    re.IGNORECASE,
)


def formal_register(text: str) -> bool:
    """Opens with "Certainly." (or "Certainly,"), and uses no contractions and no exclamation marks."""
    text = text.strip()
    return bool(_FORMAL_OPENING.match(text)) and "!" not in text and not _CONTRACTION.search(text)


def at_most_12_words(text: str) -> bool:
    """At most 12 words, ending a sentence (so an answer cut off by the token limit fails)."""
    text = text.strip()
    return 0 < len(text.split()) <= 12 and any(c.isalnum() for c in text) and bool(_SENTENCE_END.search(text))


def mentions_gardening(text: str) -> bool:
    """Mentions gardening: garden, gardener, compost, seedlings, flowerbed, mulch, weeding, pruning..."""
    return bool(_GARDENING.search(text))


def all_lowercase(text: str) -> bool:
    """Has letters, and none of them is a capital (any script)."""
    return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)
