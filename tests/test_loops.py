"""The loop metric on fixed strings (runtime/loops.py has more as doctests)."""

import pytest

from reft_edge.runtime.loops import loop_share, loops


@pytest.mark.parametrize(
    "text",
    [
        "Great question!inker Great tip, ...; Great for beginners; Great for beginners; Great for beginners; Great for",
        "Là-à-là-à-là-à.",
        "the the the",
        "Yes.\nYes.\nYes.",
        "I love it. I love it, and I love it!",
    ],
)
def test_looping_answers(text):
    assert loops(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Paris is the capital of France.",
        "- Water the roots.\n- Mulch the beds.\n- Check the soil.",
        "The cat sat on the mat, and the dog sat by the door; the end.",
        "Yes, yes. That is right.",
        "Great question! The sky is blue because air scatters blue light more than red. Stay curious!",
    ],
)
def test_sound_answers(text):
    assert not loops(text)


def test_share():
    assert loop_share([]) == 0.0
    assert loop_share(["a a a", "fine answer", "b b b", "another one"]) == 0.5
