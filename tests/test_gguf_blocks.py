"""Exact GGUF blocks in quantized bundles: found in float weights, stored bit for bit, computed exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from reft_edge.export.gguf_blocks import find_blocks, store_exact_blocks

gguf = pytest.importorskip("gguf")
KINDS = ("Q4_0", "Q4_1", "Q8_0")


def gguf_weight(kind: str, rows: int, columns: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A [rows, columns] float32 weight as gguf quantizes and dequantizes it (blocks along columns),
    and the raw GGUF bytes of its blocks."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((rows, columns)) * 0.05).astype(np.float32)
    values[0, :32] = 0.0  # an all-zero block (d = 0)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    raw = gguf.quants.quantize(values, qtype)
    return gguf.quants.dequantize(raw, qtype).astype(np.float32), raw


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_are_found_and_match_the_gguf_bytes(kind: str) -> None:
    torch_layout, raw = gguf_weight(kind, 48, 128)  # [N, K]: gguf blocks run along K
    blocks = find_blocks(np.ascontiguousarray(torch_layout.T))
    assert blocks is not None and blocks.kind == kind
    assert blocks.dequantize().tobytes() == np.ascontiguousarray(torch_layout.T).tobytes()
    # the scales are the GGUF's float16 d, bit for bit (first two bytes of every block)
    block_bytes = raw.reshape(48, 128 // 32, -1)
    gguf_d = block_bytes[..., :2].copy().view(np.float16)[..., 0]
    assert np.array_equal(blocks.d.T.astype(np.float16).view(np.uint16), gguf_d.view(np.uint16))
    if kind == "Q4_1":
        gguf_m = block_bytes[..., 2:4].copy().view(np.float16)[..., 0]
        assert np.array_equal(blocks.m.T.astype(np.float16).view(np.uint16), gguf_m.view(np.uint16))


def test_float_weights_that_are_no_blocks_are_left_alone() -> None:
    weight = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    assert find_blocks(weight) is None
    assert find_blocks(weight[:40]) is None  # K not a multiple of 32


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_matmul_on_exact_blocks_equals_the_float_product(kind: str) -> None:
    weight = np.ascontiguousarray(gguf_weight(kind, 40, 96, seed=2)[0].T)  # x @ weight, [K=96, N=40]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    x = np.random.default_rng(3).standard_normal((2, 3, 96)).astype(np.float32)
    counts = store_exact_blocks(model, accuracy_level=0)
    assert counts == {kind: 1}
    assert "W" not in {init.name for init in model.graph.initializer}  # the float copy is gone
    assert np.abs(_run(model, {"x": x}) - x @ weight).max() < 1e-5


@pytest.mark.parametrize("kind", ("Q4_0", "Q8_0"))
def test_embedding_gather_on_exact_blocks_is_bit_exact(kind: str) -> None:
    table = gguf_weight(kind, 50, 64, seed=4)[0]  # [V, D], blocks along D
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["y"], name="embed/Gather")],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(table, "E")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    assert store_exact_blocks(model, accuracy_level=0) == {kind: 1}
    ids = np.array([0, 7, 49])
    assert _run(model, {"ids": ids}).tobytes() == table[ids].tobytes()


def test_a_weight_read_by_two_nodes_is_stored_once() -> None:
    weight = np.ascontiguousarray(gguf_weight("Q4_1", 8, 64, seed=5)[0].T)
    nodes = [helper.make_node("MatMul", ["x", "W"], [f"y{i}"], name=f"MatMul{i}") for i in range(2)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 64])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(2)],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    assert store_exact_blocks(model, accuracy_level=0) == {"Q4_1": 1}
    assert len(model.graph.initializer) == 4  # B, scales, minimums and the shared block-sum matrix
