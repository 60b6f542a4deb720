"""The doctests that serve as specifications (positions grammar, loop guard, layer plans, judges)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "reft_edge.runtime.positions",
    "reft_edge.runtime.contract",
    "reft_edge.runtime.sampling",
    "reft_edge.train.config",
    "reft_edge.runtime.judges",
    "reft_edge.runtime.spec",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
