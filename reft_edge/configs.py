"""One helper for the stages' frozen config dataclasses: build one from a plain dict strictly."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from reft_edge.errors import UsageError

Config = TypeVar("Config")


def config_from_dict(
    cls: type[Config], values: dict[str, Any], *, what: str, tuple_fields: tuple[str, ...] = ()
) -> Config:
    """``cls(**values)`` that names unknown keys; list values of ``tuple_fields`` become tuples
    (JSON has no tuples, and frozen configs must stay hashable)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    values = {k: tuple(v) if k in tuple_fields and v is not None else v for k, v in values.items()}
    return cls(**values)
