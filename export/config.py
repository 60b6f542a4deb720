"""The export options: one frozen dataclass, torch- and numpy-free, so the CLI derives its options,
choices and defaults from it (``reft-edge --help`` imports this, not the exporter).

Example::

    from reft_edge.export.config import PRECISIONS, ExportConfig
    config = ExportConfig(out="bundle", precision="int8")
    ExportConfig.from_dict(config.to_dict()) == config   # True
    PRECISIONS                                          # ('fp32', 'fp16', 'int8', 'int4')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from reft_edge.configs import config_from_dict
from reft_edge.runtime.bundle import PRECISIONS  # what a bundle's manifest may say, so what export may write

__all__ = ["PRECISIONS", "ExportConfig"]


@dataclass(frozen=True)
class ExportConfig:
    """Everything that decides a bundle."""

    out: str
    model: str | None = None  # None or "default": the embedded SmolLM2-135M-Instruct
    precision: str = "fp32"  # one of PRECISIONS: fp32 | fp16 | int8 | int4
    slot_layers: tuple[int, ...] | None = None  # None: every decoder layer
    force: bool = False  # re-export even when an identical bundle exists
    verify: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExportConfig:
        return config_from_dict(cls, values, what="export", tuple_fields=("slot_layers",))
