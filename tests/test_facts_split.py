"""The built-in facts: a development split (recipe choices, --auto) and a test split (reported only)."""

from reft_edge.runtime.evaluate import FACTS_FILE, TEST_FACTS_FILE, read_facts


def test_the_splits_are_disjoint_and_large_enough():
    dev, test = read_facts(FACTS_FILE), read_facts(TEST_FACTS_FILE)
    assert len(dev) + len(test) >= 120 and len(test) >= 80
    normalise = lambda fact: " ".join(fact.question.casefold().split())  # noqa: E731
    assert not {normalise(f) for f in dev} & {normalise(f) for f in test}
    assert len({normalise(f) for f in dev + test}) == len(dev) + len(test)  # no duplicates either
