"""Turn the exported fp32 graph into the bundle's precision: fp16, int8 or int4 (fp32 is moved as is).

Example::

    from reft_edge.export.quantize import convert_precision
    convert_precision("work/model.onnx", "bundle/model.onnx", "int8")   # + bundle/model.onnx.data

Only weights change. The slot MatMuls stay float in every precision: their second
operand is a graph input, not a weight, and the quantizers only touch MatMuls whose
weight is a constant. Graph inputs and outputs keep their names and shapes; in fp16
bundles the KV tensors are float16 while slot inputs and logits stay float32.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from reft_edge.runtime.contract import LOGITS

INT8_BLOCK, INT4_BLOCK = 16, 32
# MatMulNBits: int8 arithmetic on activations quantized per block of 32. Level 0 (float) decoded at
# 10 tokens/s instead of 94 on the default model and answered the same facts (to_int4).
ACCURACY_LEVEL = 4
# How each precision's weights are made; recorded in the manifest, so a bundle made by an
# older recipe is not taken as up to date.
WEIGHT_RECIPES = {
    "fp32": "float32",
    "fp16": "float16, float32 slot inputs and logits",
    "int8": f"exact GGUF blocks where the weights are some, else MatMulNBits 8-bit asymmetric blocks of {INT8_BLOCK}",
    "int4": f"exact GGUF blocks where the weights are some, else MatMulNBits 4-bit symmetric blocks of {INT4_BLOCK}",
}


def convert_precision(source: str | Path, target: str | Path, precision: str) -> dict[str, int]:
    """Write ``target`` (+ ``target``.data) in ``precision`` from the fp32 graph at ``source`` (fp32 moves it).
    Returns, for int8/int4, how many weights kept exact GGUF blocks of each kind and how many were
    re-quantized; else {}."""
    source, target = Path(source), Path(target)
    if precision == "fp32":  # the external data is found by file name, which stays the same
        source.replace(target)
        data_file(source).replace(data_file(target))
    elif precision == "fp16":
        to_fp16(source, target)
    elif precision == "int8":
        return to_int8(source, target)
    elif precision == "int4":
        return to_int4(source, target)
    else:
        raise ValueError(precision)  # ExportConfig checked it
    return {}


def data_file(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".data")


def save_model(model, path: Path) -> None:
    """Save with every weight in one external file named ``<model>.data`` (the bundle's layout)."""
    import onnx

    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file(path).name,
        size_threshold=1024,
    )


def preprocess(source: Path, target: Path) -> None:
    """onnxruntime's quantization pre-processing: shape inference and constant folding.

    Folding matters for the tied output layer: its weight reaches the MatMul through a
    Transpose; folded, it becomes a constant the quantizer can compress, else it is
    dequantised in full at every step (about 15 ms a token on the default model, which
    erased the int8 speed-up when measured). Symbolic shape inference is skipped:
    the exporter already typed every value, the result is the same graph, and it
    would cost 0.75 GB more peak memory on the default model.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(
        str(source),
        str(target),
        skip_symbolic_shape=True,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        external_data_location=data_file(target).name,
    )


def to_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The exporter records every value's type, so the converter needs no shape inference
    # (which would serialise a second full copy of the model: 2.7 instead of 1 GB peak here).
    model = onnx.load(str(source))
    # Keep float32 at the graph boundary: slot inputs (patch values) and logits (sampling).
    # (the int64 positions input is no float: listing it would make the converter cast it)
    float32_io = [
        i.name
        for i in model.graph.input
        if i.name.startswith("slot.") and i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ] + [LOGITS]
    model = convert_float_to_float16(model, keep_io_types=float32_io, disable_shape_infer=True)
    save_model(model, target)


def to_int8(source: Path, target: Path) -> dict[str, int]:
    """Weight-only int8 blocks (MatMulNBits, 8 bits, asymmetric, block 16) for every MatMul weight.

    Not quantize_dynamic: its activations share one scale per tensor, so the few
    edited prompt positions and the rest of the prompt quantise each other. Measured
    on the emoji patch (20 unseen prompts, default model): emoji-only answers 45% with
    dynamic int8 (per-channel or a float output layer did not help), 90% with fp32.
    Per-tensor scales also made a row's answer depend on the other rows of its batch.

    Block 16 with zero points, measured on the fused graph (emoji share; greedy
    agreement with torch in verification): symmetric 32 gave 80%, 50%; asymmetric 32
    85%, 84%; symmetric 16 90%, 34%; asymmetric 16 90%, 100%, at 96 instead of 117
    decode tokens/s. accuracy_level 0 (float arithmetic) did not help and ran at 5
    tokens/s. The quantizer packs 8-bit Gather weights only at 4 bits, so the
    embedding stays float here.
    """
    return quantize_blockwise(source, target, bits=8, block_size=INT8_BLOCK, symmetric=False, op_types=("MatMul",))


def to_int4(source: Path, target: Path) -> dict[str, int]:
    """Weight-only 4-bit blocks (symmetric, block 32, as onnxruntime-genai's builder makes them)
    for every MatMul weight and the embedding.

    Quantizing the embedding Gather too (GatherBlockQuantized) matters: after folding,
    the tied output layer has its own copy, and a float embedding would be half the
    file. The quantizer raises the opset to 21 for its int4 tensors.

    Weights that are dequantized GGUF blocks are stored as those blocks instead
    (export.gguf_blocks), and only the rest is re-quantized. Measured on the default model
    (Q4_1 layers, Q8_0 embedding), 87 held-out facts (the first test split), greedy, 2 threads: fp32 answers 54;
    re-quantizing the floats to symmetric 4-bit blocks answered 43 (rejected); the exact
    blocks 56 at accuracy_level 4, and the same at level 0 (float activations), which
    decoded at 10 instead of 94 tokens/s (rejected). The exact blocks cost speed: the
    Q4_1 minimums need each input's block sums (two small MatMuls and an Add per
    weight), and the Q8_0 output layer reads 8 bits: 94 against 137 tokens/s before,
    same machine and run; 152 instead of 108 MB.
    """
    return quantize_blockwise(
        source, target, bits=4, block_size=INT4_BLOCK, symmetric=True, op_types=("MatMul", "Gather")
    )


def quantize_blockwise(
    source: Path, target: Path, *, bits: int, block_size: int, symmetric: bool, op_types: tuple[str, ...]
) -> dict[str, int]:
    """Exact GGUF blocks where the weights are some (export.gguf_blocks), onnxruntime's MatMulNBits
    quantizer for the rest, after pre-processing; weights go to <target>.data. Returns how many
    weights of each kind were stored ("Q4_1": 210, ..., "requantized": 0)."""
    import numpy as np
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from reft_edge.export.gguf_blocks import store_exact_blocks

    prepared = target.with_name("prepared.onnx")
    preprocess(source, prepared)
    model = onnx.load(str(prepared))
    counts = store_exact_blocks(model, accuracy_level=ACCURACY_LEVEL)
    leftover, kept_float = _quantizable(model, op_types)
    counts["requantized"] = len(leftover)
    # accuracy_level 4: int8 arithmetic for the activations, quantised per block (faster on CPU).
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=ACCURACY_LEVEL,
        op_types_to_quantize=op_types,
        nodes_to_exclude=kept_float,
    )
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)  # two INFO lines per MatMul, and the expected opset warning
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks: it handles scale 0 itself
            quantizer.process()
    finally:
        logger.setLevel(level)
    quantizer.model.save_model_to_file(str(target), use_external_data_format=True)
    _remove(prepared)
    return counts


def _quantizable(model, op_types: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Names of the ``op_types`` nodes left for onnxruntime's quantizer (a constant weight), and of
    those it must leave float (the exact blocks' small block-sum and minimum MatMuls)."""
    from reft_edge.export.gguf_blocks import all_nodes, is_exact_blocks_part

    weights = {init.name for init in model.graph.initializer}
    names: list[str] = []
    kept_float: list[str] = []
    for node in all_nodes(model.graph):
        if node.op_type not in op_types:
            continue
        weight = node.input[0] if node.op_type == "Gather" else (node.input[1] if len(node.input) > 1 else "")
        if is_exact_blocks_part(weight):
            kept_float.append(node.name)
        elif weight in weights:
            names.append(node.name)
    return names, kept_float


def float_arithmetic_twin(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` at ``out`` whose MatMulNBits compute in float (accuracy_level 0), the
    arithmetic onnxruntime-web's wasm kernel uses; every other file is hard-linked, not copied."""
    import onnx

    from reft_edge.export.gguf_blocks import all_nodes

    out.mkdir(exist_ok=True)
    for file in bundle.iterdir():
        if file.name != "model.onnx":
            (out / file.name).unlink(missing_ok=True)
            os.link(file, out / file.name)
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for node in all_nodes(model.graph):
        for attribute in node.attribute:
            if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                attribute.i = 0
    onnx.save(model, str(out / "model.onnx"))
    return out


def _remove(*models: Path) -> None:
    for model in models:
        for path in (model, data_file(model)):
            path.unlink(missing_ok=True)
