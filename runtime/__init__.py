"""The torch-free runtime: load a bundle and patches, generate personalised text.

Imports only numpy, onnxruntime, tokenizers, safetensors and jinja2 (never torch).
"""

from reft_edge.errors import (
    BackboneMismatchError,
    BundleError,
    PatchCompatibilityError,
    PatchError,
    PatchFormatError,
)
from reft_edge.runtime.patch import Patch
from reft_edge.runtime.positions import Positions

__all__ = [
    "BackboneMismatchError", "BundleError", "Patch", "PatchCompatibilityError", "PatchError",
    "PatchFormatError", "Positions",
]
