"""Find GGUF quantization blocks inside float weights and store them exactly as MatMulNBits.

Example::

    import numpy as np
    from reft_edge.export.gguf_blocks import find_blocks
    blocks = find_blocks(weight)            # weight: [K, N] float32, as x @ weight
    if blocks is not None:
        print(blocks.kind, blocks.dequantize().tobytes() == weight.tobytes())   # Q4_1 True

Why: the default model ships as a GGUF (attention and MLP weights Q4_1, the embedding
Q8_0), and transformers hands us those blocks dequantized to float32. Re-quantizing the
floats to onnxruntime's symmetric 4-bit blocks threw away a third of the base's facts
(11 of 17 simple questions answered, fp32 17). Every value of a Q4_1 block is
``d * q + m`` (q in 0..15, d and m float16, one pair per 32 values along the input
dimension), so the blocks can be read back from the floats and checked bit for bit;
no GGUF reader or tensor-name mapping is needed, and a converted Hugging Face folder of
the same weights gives the same blocks.

How each kind is stored (``w`` = the float weight, blocks of 32 along K, per column):

    Q8_0  w = d*q, q int8         MatMulNBits 8-bit, stored q+128, zero point 128, scale d
    Q4_0  w = d*(q-8), q 0..15    MatMulNBits 4-bit, default zero point 8, scale d
    Q4_1  w = d*q + m, q 0..15    MatMulNBits 4-bit, default zero point 8, scale d
                                  + (x's block sums) @ (m + 8d)   (m is no integer multiple of d)

MatMulNBits' own zero point could hold ``-m/d`` as a float, exactly, but that is a slow
path in onnxruntime's CPU kernel: 1859 us instead of 29 us for a 576x1536 product, 2
threads. The block sums are one small MatMul with a 0/1 matrix [K, K/32], then a
[K/32, N] MatMul: about 4 % of the weight's multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
KINDS = ("Q4_0", "Q4_1", "Q8_0")  # tried in this order (smallest first): the first that reproduces every value wins


@dataclass(frozen=True)
class Blocks:
    """One weight [K, N] as GGUF blocks along K: ``q`` [K/32, 32, N] integers, ``d`` and ``m`` [K/32, N]."""

    kind: str
    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None  # Q4_1 only

    @property
    def bits(self) -> int:
        return 8 if self.kind == "Q8_0" else 4

    def dequantize(self) -> np.ndarray:
        """The float32 weight [K, N], computed as gguf (and so transformers) computes it."""
        d = self.d[:, None, :]
        if self.kind == "Q4_1":
            w = d * self.q.astype(np.float32) + self.m[:, None, :]
        elif self.kind == "Q4_0":
            w = d * (self.q.astype(np.float32) - 8)
        else:
            w = d * self.q.astype(np.float32)
        return w.astype(np.float32).reshape(-1, self.q.shape[-1])

    def matmul_nbits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """MatMulNBits' B [N, K/32, 32*bits/8] uint8, scales [N, K/32] float32, zero points (None: default)."""
        stored = self.q.astype(np.int16) + (128 if self.kind == "Q8_0" else 0)  # uint8 storage of int8 values
        columns = np.ascontiguousarray(stored.transpose(2, 0, 1)).astype(np.uint8)  # [N, K/32, 32]
        scales = np.ascontiguousarray(self.d.T).astype(np.float32)
        n, blocks = scales.shape
        if self.kind == "Q8_0":
            return columns, scales, np.full((n, blocks), 128, np.uint8)
        packed = columns[..., 0::2] | (columns[..., 1::2] << 4)  # low nibble first
        if self.kind == "Q4_0":
            return packed, scales, None  # 4-bit default zero point is 8
        return packed, scales, None  # Q4_1 too: q - 8 keeps the int8 products centred (see below)


def find_blocks(weight: np.ndarray) -> Blocks | None:
    """The GGUF blocks ``weight`` [K, N] was dequantized from, or None when no kind reproduces it exactly."""
    if weight.dtype != np.float32 or weight.ndim != 2 or weight.shape[0] % BLOCK:
        return None
    values = weight.reshape(weight.shape[0] // BLOCK, BLOCK, weight.shape[1])
    for kind in KINDS:
        blocks = _fit(kind, values)
        if blocks is not None and np.array_equal(blocks.dequantize().view(np.uint32), weight.view(np.uint32)):
            return blocks
    return None


def _fit(kind: str, values: np.ndarray) -> Blocks | None:
    """The blocks a GGUF quantizer would have written for ``values`` (checked by the caller, bit for
    bit: a block of zeros keeps the sign of its zeros through a zero d of that sign)."""
    low, high = values.min(axis=1), values.max(axis=1)
    zero_sign = np.copysign(np.float32(0), values[:, 0, :])
    if kind == "Q4_1":  # the block's minimum is m (q = 0) and its maximum d*15 + m
        m = _half(low)
        d = _zero_signed(_half((high - m) / 15), zero_sign)
        q = np.rint((values - m[:, None]) / _nonzero(d)[:, None])
        return Blocks(kind, np.clip(q, 0, 15).astype(np.uint8), d, m) if np.all((q >= 0) & (q <= 15)) else None
    largest = np.maximum(np.abs(low), np.abs(high))
    if kind == "Q8_0":  # d = max|w| / 127
        d = _zero_signed(_half(largest / 127), zero_sign)
        q = np.rint(values / _nonzero(d)[:, None])
        return Blocks(kind, q.astype(np.int8), d, None) if q.min() >= -128 and q.max() <= 127 else None
    # Q4_0: the value of largest magnitude is d * -8, so d = that value / -8 (d may be negative)
    signed = np.where(np.abs(low) >= np.abs(high), low, high)
    d = _zero_signed(_half(signed / -8), zero_sign)
    q = np.rint(values / _nonzero(d)[:, None]) + 8
    return Blocks(kind, np.clip(q, 0, 15).astype(np.uint8), d, None) if np.all((q >= 0) & (q <= 15)) else None


def _half(values: np.ndarray) -> np.ndarray:
    """Rounded through float16, as GGUF stores d and m."""
    with np.errstate(over="ignore"):
        return values.astype(np.float16).astype(np.float32)


def _zero_signed(d: np.ndarray, zero_sign: np.ndarray) -> np.ndarray:
    return np.where(d == 0, zero_sign, d)


def _nonzero(d: np.ndarray) -> np.ndarray:
    return np.where(d == 0, 1, d)


# -- the graph rewrite ---------------------------------------------------------------------------

MS_DOMAIN = "com.microsoft"


def store_exact_blocks(model, *, accuracy_level: int) -> dict[str, int]:
    """Replace every MatMul (and embedding Gather) whose constant weight is exact GGUF blocks.

    Works in place on ``model`` (an onnx ModelProto), in the main graph and in the
    branches of If nodes (the fused graph's two decoders share their weights). Returns
    how many weights of each kind were stored; weights that are no GGUF blocks are left
    as they are, for the usual quantizer.

        x --MatMul(W)--> y          becomes (Q4_1)
        x --MatMulNBits(q, d, zero point 0)--Add--> y
        x --MatMul(0/1 [K, K/32])--MatMul(m [K/32, N])--^      (block sums, one per x)
    """
    rewrite = _Rewrite(model, accuracy_level)
    rewrite.graph(model.graph)
    rewrite.drop_unused()
    return rewrite.counts


class _Rewrite:
    def __init__(self, model, accuracy_level: int):
        from onnx import numpy_helper

        self.model, self.accuracy_level = model, accuracy_level
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.to_array = numpy_helper.to_array
        self.blocks: dict[str, Blocks | None] = {}  # weight name -> its blocks (None: not exact)
        self.stored: dict[tuple[str, str], list[str]] = {}  # (weight, form) -> initializer names
        self.sums: dict[tuple[int, str], str] = {}  # (graph id, x) -> block sums of x
        self.counts: dict[str, int] = {}
        self.replaced: set[str] = set()

    def graph(self, graph) -> None:
        from onnx import helper

        nodes = []
        for node in graph.node:
            for attribute in node.attribute:  # If branches first: they share the main graph's weights
                if attribute.type == attribute.GRAPH:
                    self.graph(attribute.g)
            nodes.extend(self.node(graph, node, helper))
        del graph.node[:]
        graph.node.extend(nodes)

    def node(self, graph, node, helper) -> list:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in self.initializers:
            blocks = self.weight_blocks(node.input[1], transpose=False)
            if blocks is not None:
                return self.matmul(graph, node, blocks, helper)
        if node.op_type == "Gather" and node.input[0] in self.initializers and _attribute(node, "axis", 0) == 0:
            blocks = self.weight_blocks(node.input[0], transpose=True)
            if blocks is not None and blocks.kind != "Q4_1":  # Gather has no room for m
                return self.gather(node, blocks, helper)
        return [node]

    def weight_blocks(self, name: str, *, transpose: bool) -> Blocks | None:
        key = f"{name}/T" if transpose else name
        if key not in self.blocks:
            array = self.to_array(self.initializers[name])
            self.blocks[key] = find_blocks(np.ascontiguousarray(array.T) if transpose else array)
        return self.blocks[key]

    def matmul(self, graph, node, blocks: Blocks, helper) -> list:
        weight = node.input[1]
        k, n = blocks.q.shape[0] * BLOCK, blocks.q.shape[-1]
        names = self.store(weight, "matmul", lambda: [a for a in blocks.matmul_nbits() if a is not None])
        inputs = [node.input[0], *names[:2]] + ([names[2]] if len(names) > 2 else [])
        product = node.output[0] if blocks.kind != "Q4_1" else f"{node.name}/weights_q"
        nodes = [
            helper.make_node(
                "MatMulNBits",
                inputs,
                [product],
                name=f"{node.name}/MatMulNBits",
                domain=MS_DOMAIN,
                K=k,
                N=n,
                bits=blocks.bits,
                block_size=BLOCK,
                accuracy_level=self.accuracy_level,
            )
        ]
        if blocks.kind == "Q4_1":
            sums, sum_nodes = self.block_sums(graph, node.input[0], k, helper)
            (minimums,) = self.store(weight, "minimums", lambda: [blocks.m + 8 * blocks.d])
            offset = f"{node.name}/minimums"
            nodes += sum_nodes + [
                helper.make_node("MatMul", [sums, minimums], [offset], name=f"{node.name}/MatMul_minimums"),
                helper.make_node("Add", [product, offset], [node.output[0]], name=f"{node.name}/Add_minimums"),
            ]
        self.count(weight, blocks.kind)
        return nodes

    def block_sums(self, graph, x: str, k: int, helper) -> tuple[str, list]:
        """x's sums over each block of 32 along its last axis, once per x in each graph."""
        key = (id(graph), x)
        if key in self.sums:
            return self.sums[key], []
        ones_name = f"block_sums_{k}"  # is_exact_blocks_part knows these names
        if ones_name not in self.initializers:
            ones = np.kron(np.eye(k // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), np.float32))  # [K, K/32]
            self.add(ones_name, ones)
        self.sums[key] = output = f"{x}/block_sums"
        return output, [helper.make_node("MatMul", [x, ones_name], [output], name=f"{x}/MatMul_block_sums")]

    def gather(self, node, blocks: Blocks, helper) -> list:
        data = node.input[0]

        # GatherBlockQuantized wants rows [V, D] with blocks along D: the transpose of MatMul's layout.
        def arrays():
            packed, scales, zero_points = blocks.matmul_nbits()
            rows = packed.reshape(packed.shape[0], -1)
            return [rows, scales] + ([zero_points] if zero_points is not None else [])

        names = self.store(data, "gather", arrays)  # data, scales[, zero points]
        self.count(data, blocks.kind)
        return [
            helper.make_node(
                "GatherBlockQuantized",
                [names[0], node.input[1], *names[1:]],
                list(node.output),
                name=f"{node.name}/GatherBlockQuantized",
                domain=MS_DOMAIN,
                gather_axis=0,
                quantize_axis=1,
                block_size=BLOCK,
                bits=blocks.bits,
            )
        ]

    def store(self, weight: str, form: str, make) -> list[str]:
        key = (weight, form)
        if key not in self.stored:
            arrays = make()
            self.stored[key] = [self.add(f"{weight}/{form}{i}", array) for i, array in enumerate(arrays)]
        return self.stored[key]

    def add(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.model.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        return name

    def count(self, weight: str, kind: str) -> None:
        """Once per weight, however many nodes (the two decoders) read it."""
        if weight not in self.replaced:
            self.replaced.add(weight)
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def drop_unused(self) -> None:
        """Remove the float weights no node reads any more."""
        used = {name for node in all_nodes(self.model.graph) for name in node.input}
        keep = [init for init in self.model.graph.initializer if init.name in used or init.name not in self.replaced]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(keep)


def all_nodes(graph):
    """Every node of ``graph`` and of the graphs its nodes hold (the fused graph's If branches)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH:
                yield from all_nodes(attribute.g)


def is_exact_blocks_part(weight: str) -> bool:
    """Whether ``weight`` is one of the small float matrices a Q4_1 weight's exact form adds (its
    block-sum 0/1 matrix or its minimums), which must stay float."""
    return weight.startswith("block_sums_") or "/minimums" in weight


def _attribute(node, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.i
    return default
