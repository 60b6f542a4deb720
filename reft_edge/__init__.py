"""reft-edge: personalise one frozen language model with kilobyte LoReFT patches.

Stages (each a subpackage, imported lazily by the CLI):

- ``reft_edge.train``   learns a patch per person (torch, transformers)
- ``reft_edge.export``  traces the frozen base once into an ONNX bundle
- ``reft_edge.runtime`` runs a bundle plus patches (onnxruntime, numpy, tokenizers)
"""

__version__ = "0.1.0"
