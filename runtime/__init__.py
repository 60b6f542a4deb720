"""The torch-free runtime: load a bundle and patches, generate personalised text.

Imports only numpy, onnxruntime, tokenizers, safetensors and jinja2 (never torch).

Example::

    from reft_edge.runtime import Patch, Runtime
    rt = Runtime.load("bundle/")
    alice = Patch.load("alice.reft")
    print(rt.generate("Plan my weekend", patches=[alice]).text)

The classes load on first use, so importing this package (as the CLI does to find
``reft-edge run``) costs nothing and works before the runtime extras are installed.
"""

import importlib

from reft_edge.errors import (
    BackboneMismatchError,
    BundleError,
    PatchCompatibilityError,
    PatchError,
    PatchFormatError,
    UsageError,
)

_LAZY = {
    "Generation": "reft_edge.runtime.session",
    "Patch": "reft_edge.runtime.patch",
    "Positions": "reft_edge.runtime.positions",
    "Runtime": "reft_edge.runtime.session",
}

__all__ = [
    "BackboneMismatchError",
    "BundleError",
    "Generation",
    "Patch",
    "PatchCompatibilityError",
    "PatchError",
    "PatchFormatError",
    "Positions",
    "Runtime",
    "UsageError",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reft_edge.runtime' has no attribute {name!r}")
