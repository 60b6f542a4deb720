"""Export stage: build the frozen base once into an ONNX bundle (torch, onnx, onnxruntime).

Example::

    from reft_edge.export import ExportConfig, export_bundle
    manifest = export_bundle(ExportConfig(out="bundle"))   # the default model, fp32, slots at every layer

``ExportConfig`` and ``export_bundle`` load on first use, so importing the stage's command
(``reft_edge.export.cli``, as ``reft-edge --help`` does) needs neither numpy nor torch.
"""

import importlib

__all__ = ["ExportConfig", "export_bundle"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("reft_edge.export.build"), name)
    raise AttributeError(f"module 'reft_edge.export' has no attribute {name!r}")
