"""Export stage: build the frozen base once into an ONNX bundle (torch, onnx, onnxruntime).

Example::

    from reft_edge.export import ExportConfig, export_bundle
    manifest = export_bundle(ExportConfig(out="bundle"))   # the default model, fp32, slots at every layer
"""

from reft_edge.export.build import ExportConfig, export_bundle

__all__ = ["ExportConfig", "export_bundle"]
