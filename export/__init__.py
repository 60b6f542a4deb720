"""Export stage: build the frozen base once into an ONNX bundle (torch, onnx, onnxruntime).

Example::

    from reft_edge.export import ExportConfig, export_bundle
    manifest = export_bundle(ExportConfig(out="bundle"))   # the default model, fp32, slots at every layer

``ExportConfig`` and ``export_bundle`` load on first use, so importing this package needs neither
numpy nor torch; ``reft_edge.export.config`` (the options, which ``reft-edge export`` reads its own
from) is torch- and numpy-free too.
"""

import importlib

__all__ = ["ExportConfig", "export_bundle"]

_LAZY = {"ExportConfig": "reft_edge.export.config", "export_bundle": "reft_edge.export.build"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reft_edge.export' has no attribute {name!r}")
