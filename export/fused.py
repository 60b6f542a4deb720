"""Build the ONNX graph of a Llama-family model node by node, with fused attention and edit slots.

Example::

    from reft_edge.train.backbone import load_backbone
    from reft_edge.export.fused import build_fused_graph, supports_fused_graph
    backbone = load_backbone()                                  # SmolLM2-135M-Instruct
    assert supports_fused_graph(backbone.model) is None        # else: why not, as text
    build_fused_graph(backbone.model, slot_layers=[15], path="/tmp/model.onnx")   # + .data

Why not trace: a traced decoder spends ~70 small ops per layer on attention, rotary and
RMSNorm, which cost more than the matrix products at decode time on a CPU. Here every
layer is onnxruntime's fused kernels (the layout onnxruntime-genai's model builder
uses): SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization,
GroupQueryAttention with rotary inside, and a KV cache that is one preallocated buffer
per layer, written in place (present aliases past). The weights come straight from the
Hugging Face modules, so the torch model stays the reference (export.verify checks it).

Feeds (docs/bundle-format.md, graph "fused"): rows are right-padded; attention_mask is
1 for each row's tokens so far (prompt plus generated), so its row sums give GQA each
row's length and its width the batch's longest; past buffers are [batch, kv_heads,
max_length, head_dim], zeros at the start of a generation. Slot inputs (contract v3) are
the same at every step: the graph computes each token's edit mask from the positions
input, the pass's place in the sequence and the attention mask (FusedGraph.slot_mask).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reft_edge.runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_LINES,
    past_names,
    present_names,
    slot_names,
)
from reft_edge.train.backbone import decoder_layers

FUSED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
OPSET = 18
MS_DOMAIN = "com.microsoft"
STATIC_ROPE_TYPES = (None, "default", "linear", "llama3", "yarn")  # position -> angle fixed at export


def supports_fused_graph(model: nn.Module) -> str | None:
    """None when ``model`` can be built here; else why not (it is then traced instead)."""
    config = model.config
    if config.model_type not in FUSED_ARCHITECTURES:
        return f"architecture {config.model_type} has no fused builder"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) not in STATIC_ROPE_TYPES:
        return f"rope type {rope.get('rope_type')} depends on the sequence length"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        if getattr(config, "sliding_window", None) is None:
            return "layer types other than full attention"
    return None


def build_fused_graph(
    model: nn.Module,
    slot_layers: list[int],
    path: str | Path,
    *,
    share_tied_output: bool = True,
    slot_free_decoder: bool = True,
) -> None:
    """Write the fp32 graph of ``model`` with slots at ``slot_layers`` to ``path`` (+ ``path``.data).

    ``share_tied_output``: a tied output layer reads the embedding matrix (one copy);
    False gives it a transposed copy as a MatMul weight, for the weight quantizers.
    ``slot_free_decoder``: also build the decoder without slots, run when the slots
    have rank 0 (every decode step); see FusedGraph.model.
    """
    import onnx

    graph = FusedGraph(model, slot_layers, share_tied_output, slot_free_decoder)
    onnx.save_model(
        graph.model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=Path(path).name + ".data",
        size_threshold=1024,
    )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


class FusedGraph:
    """Collects nodes, initializers and value names while walking the model's layers once."""

    def __init__(self, model: nn.Module, slot_layers: list[int], share_tied_output: bool, slot_free_decoder: bool):
        self.share_tied_output, self.slot_free_decoder = share_tied_output, slot_free_decoder
        self.config = config = model.config
        self.model_ = model
        self.layers = decoder_layers(model)
        self.slot_layers = list(slot_layers)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = float(config.rms_norm_eps)
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.weights: dict[str, str] = {}  # weight key -> initializer name: both decoders share one copy
        self.names: set[str] = {LOGITS, *(n for i in range(len(self.layers)) for n in present_names(i))}
        self.use_slots = False  # whether the decoder being built applies its slots
        self.output_name = str  # the name a decoder output gets (public, or unique inside an If branch)
        self.token_places: tuple[str, str, str, str] | None = None  # slot_mask's shared values, per decoder

    # -- small helpers ---------------------------------------------------------------------------

    def name(self, base: str) -> str:
        """A unique value/node name starting with ``base``."""
        candidate, n = base, 0
        while candidate in self.names:
            n += 1
            candidate = f"{base}_{n}"
        self.names.add(candidate)
        return candidate

    def node(
        self,
        op: str,
        inputs: list[str],
        *,
        name: str,
        outputs: int | list[str] = 1,
        domain: str = "",
        **attributes: Any,
    ) -> list[str]:
        from onnx import helper

        node_name = self.name(name)
        if isinstance(outputs, int):
            outputs = [self.name(f"{node_name}/out{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=node_name, domain=domain or None, **attributes))
        return outputs

    def one(self, op: str, inputs: list[str], *, name: str, **attributes: Any) -> str:
        return self.node(op, inputs, name=name, **attributes)[0]

    def weight(self, key: str, make: Callable[[], np.ndarray]) -> str:
        """The initializer for ``key``; ``make`` runs on first use only (the second decoder
        reuses the first one's weights, so their arrays are not built twice)."""
        from onnx import numpy_helper

        if key not in self.weights:
            self.weights[key] = name = self.name(key)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(make()), name))
        return self.weights[key]

    def constant(self, value: int | list[int]) -> str:
        """An int64 scalar or vector initializer, one per value."""
        key = f"const_s{value}" if isinstance(value, int) else "const_v" + "_".join(map(str, value))
        return self.weight(key, lambda: np.array(value, np.int64))

    def linear(self, x: str, modules: list[nn.Linear], name: str) -> str:
        """x @ W^T (+ b) for one module, or for several packed side by side (one MatMul)."""
        matrix = self.weight(f"{name}.weight", lambda: np.concatenate([_numpy(m.weight).T for m in modules], axis=1))
        y = self.one("MatMul", [x, matrix], name=f"{name}/MatMul")
        if any(m.bias is not None for m in modules):
            bias = self.weight(
                f"{name}.bias",
                lambda: np.concatenate(
                    [_numpy(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32) for m in modules]
                ),
            )
            y = self.one("Add", [y, bias], name=f"{name}/Add")
        return y

    def module_weight(self, module: nn.Module, name: str) -> str:
        return self.weight(f"{name}.weight", lambda: _numpy(module.weight))

    def rms_norm(self, x: str, module: nn.Module, name: str) -> str:
        return self.one(
            "SimplifiedLayerNormalization", [x, self.module_weight(module, name)], name=name, axis=-1, epsilon=self.eps
        )

    def skip_rms_norm(self, x: str, skip: str, module: nn.Module, name: str) -> tuple[str, str]:
        """(norm(x + skip), x + skip) in one kernel."""
        out = self.node(
            "SkipSimplifiedLayerNormalization",
            [x, skip, self.module_weight(module, name)],
            name=name,
            outputs=4,
            domain=MS_DOMAIN,
            epsilon=self.eps,
        )
        return out[0], out[3]

    # -- the graph -------------------------------------------------------------------------------

    def model(self) -> Any:
        """The whole graph. With slots, the decoder is built twice and an If picks one per run:

            slot.{first}.A --Size--Greater 0--> If --then--> decoder with slots   --> logits, present.*
                                                   --else--> decoder without slots
        The runtime sends rank-0 slots on decode steps when no row edits generated tokens,
        which then skip the slot nodes entirely; both decoders read the same weights and
        write the same KV buffers.
        """
        from onnx import helper

        lengths, total = self.sequence_lengths()
        embedding = self.module_weight(self.model_.get_input_embeddings(), "embed_tokens")
        h = self.one("Gather", [embedding, INPUT_IDS], name="embed_tokens")
        cos, sin = self.rotary_caches()
        decoder_inputs = h, lengths, total, cos, sin, embedding
        if not self.slot_layers or not self.slot_free_decoder:
            self.decoder(*decoder_inputs, use_slots=bool(self.slot_layers), output_name=str)
        else:
            outer, self.nodes = self.nodes, []
            with_slots = self.decoder(
                *decoder_inputs, use_slots=True, output_name=lambda n: self.name(f"with_slots/{n}")
            )
            with_nodes, self.nodes = self.nodes, []
            without_slots = self.decoder(
                *decoder_inputs, use_slots=False, output_name=lambda n: self.name(f"without_slots/{n}")
            )
            without_nodes, self.nodes = self.nodes, outer
            size = self.one("Size", [slot_names(self.slot_layers[0])[0]], name="use_slots/Size")
            use = self.one("Greater", [size, self.constant(0)], name="use_slots")
            branch = lambda name, nodes, values: helper.make_graph(  # noqa: E731
                nodes, name, [], [self.value_info(value, public) for value, public in zip(values, self.outputs())]
            )
            self.node(
                "If",
                [use],
                name="decoder",
                outputs=self.outputs(),
                then_branch=branch("with_slots", with_nodes, with_slots),
                else_branch=branch("without_slots", without_nodes, without_slots),
            )
        return helper.make_model(
            helper.make_graph(
                self.nodes,
                "reft_edge_fused",
                self.inputs(),
                [self.value_info(name, name) for name in self.outputs()],
                self.initializers,
            ),
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="reft-edge",
        )

    def decoder(
        self, h: str, lengths: str, total: str, cos: str, sin: str, embedding: str, *, use_slots: bool, output_name: Any
    ) -> list[str]:
        """Every block, the final norm and the output layer; returns [logits, present.*] value names."""
        self.use_slots, self.output_name, self.token_places = use_slots, output_name, None
        pending = None  # the last MLP's output, not yet added to the residual stream h
        presents = []
        for index, layer in enumerate(self.layers):
            h, pending, present = self.decoder_layer(index, layer, h, pending, lengths, total, cos, sin)
            presents += present
        return [self.output(self.last_residual(h, pending), lengths, embedding), *presents]

    def outputs(self) -> list[str]:
        return [LOGITS, *(n for layer in range(len(self.layers)) for n in present_names(layer))]

    def value_info(self, value: str, public: str) -> Any:
        """The type and shape of graph output ``public`` (given to ``value``, which may be a branch's)."""
        from onnx import TensorProto, helper

        if public == LOGITS:
            return helper.make_tensor_value_info(value, TensorProto.FLOAT, ["batch", 1, self.config.vocab_size])
        return helper.make_tensor_value_info(
            value, TensorProto.FLOAT, ["batch", self.kv_heads, "max_length", self.head_dim]
        )

    def inputs(self) -> list[Any]:
        from onnx import TensorProto, helper

        inputs = [
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_seq"]),
        ]
        inputs += [self.value_info(past, past) for layer in range(len(self.layers)) for past in past_names(layer)]
        hidden = self.config.hidden_size
        shapes = (
            ["batch", "rank", hidden],
            ["batch", "rank", hidden],
            ["batch", 1, "rank"],
            ["batch", POSITION_LINES, "rank"],
        )
        types = (TensorProto.FLOAT,) * 3 + (TensorProto.INT64,)
        for layer in self.slot_layers:
            inputs += [
                helper.make_tensor_value_info(name, kind, shape)
                for name, kind, shape in zip(slot_names(layer), types, shapes)
            ]
        return inputs

    def sequence_lengths(self) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k (each row's length - 1, int32) and total_sequence_length.

        attention_mask --ReduceSum(1)--Sub 1--Cast int32--> seqlens_k [batch]
                       --Shape[1]------------Cast int32--> total_sequence_length []
        """
        one = self.constant(1)
        summed = self.one("ReduceSum", [ATTENTION_MASK, self.constant([1])], name="lengths/ReduceSum", keepdims=0)
        last = self.one("Sub", [summed, one], name="lengths/Sub")
        lengths = self.one("Cast", [last], name="lengths/Cast", to=6)  # int32
        width = self.one("Shape", [ATTENTION_MASK], name="total/Shape", start=1, end=2)
        total = self.one("Squeeze", [self.one("Cast", [width], name="total/Cast", to=6)], name="total/Squeeze")
        return lengths, total

    def rotary_caches(self) -> tuple[str, str]:
        """cos/sin [max_positions, rotary_dim/2] from the model's own rotary module (its scaling included)."""
        rotary = self.model_.model.rotary_emb
        positions = torch.arange(int(self.config.max_position_embeddings), dtype=torch.float32)
        angles = torch.outer(positions, rotary.inv_freq.to(torch.float32))
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        return (
            self.weight("cos_cache", lambda: _numpy(angles.cos() * scale)),
            self.weight("sin_cache", lambda: _numpy(angles.sin() * scale)),
        )

    def decoder_layer(
        self, index: int, layer: nn.Module, h: str, pending: str | None, lengths: str, total: str, cos: str, sin: str
    ) -> tuple[str, str, list[str]]:
        """One block; returns (residual stream, MLP output still to be added to it, present KV names).

        pending, h --SkipSimplifiedLayerNorm--> normed, h + pending   (layer 0: SimplifiedLayerNorm(h))
        (slot on the block before: h + pending --edit--> delta; SkipSimplifiedLayerNorm(delta, h + pending))
        normed --MatMul qkv--GroupQueryAttention(rotary, KV buffer)--MatMul o--> attn
        attn, h --SkipSimplifiedLayerNorm--> normed2, h
        normed2 --MatMul gate, up--> SiLU(gate) * up --MatMul down--> pending
        """
        prefix = f"layers.{index}"
        if pending is None:
            normed = self.rms_norm(h, layer.input_layernorm, f"{prefix}/input_layernorm")
        elif self.has_slot(index - 1):  # edit the previous block's output, then norm it: h' = h + delta
            h = self.one("Add", [h, pending], name=f"layers.{index - 1}/residual")
            normed, h = self.skip_rms_norm(
                self.edit(h, index - 1), h, layer.input_layernorm, f"{prefix}/input_layernorm"
            )
        else:
            normed, h = self.skip_rms_norm(pending, h, layer.input_layernorm, f"{prefix}/input_layernorm")
        attention, present = self.attention(index, layer.self_attn, normed, lengths, total, cos, sin)
        normed, h = self.skip_rms_norm(
            attention, h, layer.post_attention_layernorm, f"{prefix}/post_attention_layernorm"
        )
        mlp = layer.mlp
        gate = self.linear(normed, [mlp.gate_proj], f"{prefix}/mlp/gate_proj")
        up = self.linear(normed, [mlp.up_proj], f"{prefix}/mlp/up_proj")
        silu = self.one(
            "Mul", [gate, self.one("Sigmoid", [gate], name=f"{prefix}/mlp/Sigmoid")], name=f"{prefix}/mlp/silu"
        )
        product = self.one("Mul", [silu, up], name=f"{prefix}/mlp/Mul")
        return h, self.linear(product, [mlp.down_proj], f"{prefix}/mlp/down_proj"), present

    def has_slot(self, layer: int) -> bool:
        return self.use_slots and layer in self.slot_layers

    def last_residual(self, h: str, pending: str) -> str:
        """The last block's output, edited when it has a slot."""
        index = len(self.layers) - 1
        h = self.one("Add", [h, pending], name=f"layers.{index}/residual")
        if self.has_slot(index):
            h = self.one("Add", [h, self.edit(h, index)], name=f"layers.{index}/slot/Add")
        return h

    def edit(self, h: str, layer: int) -> str:
        """The change the slot of ``layer`` makes to h: train.intervention.low_rank_edit minus h.

        h --FusedMatMul B^T--Add c--Mul mask--MatMul A--> delta      (the caller adds it to h)
        slot.l.positions --slot_mask--> mask [batch, seq, rank]
        """
        A, B, c, positions = slot_names(layer)
        name = f"layers.{layer}/slot"
        product = self.one("FusedMatMul", [h, B], name=f"{name}/MatMul_B", domain=MS_DOMAIN, transB=1)
        coefficients = self.one("Add", [product, c], name=f"{name}/Add_c")
        masked = self.one("Mul", [coefficients, self.slot_mask(positions, name)], name=f"{name}/Mul_mask")
        return self.one("MatMul", [masked, A], name=f"{name}/MatMul_A")

    def places(self) -> tuple[str, str, str, str]:
        """Where this pass's tokens sit, built once per decoder (inside the slotted branch only):

        attention_mask --Shape[1]--> width;  input_ids --Shape[1]--> seq;  past = width - seq
        Range(past, width) --Unsqueeze--> t [1, seq, 1]: each token's position
        past == 0 (the prompt pass) ? ReduceSum(attention_mask) : 0 --> prompt_len [batch, 1, 1]
        past > 0 --> later [1, 1, 1]: a pass of generated tokens
        t < prompt_len --> in_prompt [batch, seq, 1]: prompt tokens (never pads, never on later passes)
        """
        if self.token_places is None:
            width = self.one("Shape", [ATTENTION_MASK], name="places/width", start=1, end=2)
            seq = self.one("Shape", [INPUT_IDS], name="places/seq", start=1, end=2)
            past = self.one("Sub", [width, seq], name="places/past")
            scalar = lambda value, name: self.one("Squeeze", [value], name=name)  # noqa: E731
            span = self.one(
                "Range",
                [scalar(past, "places/past_scalar"), scalar(width, "places/width_scalar"), self.constant(1)],
                name="places/Range",
            )
            t = self.one("Unsqueeze", [span, self.constant([0, 2])], name="places/t")
            later = self.one("Greater", [past, self.constant([0])], name="places/later")
            later = self.one("Unsqueeze", [later, self.constant([1, 2])], name="places/later3")
            lengths = self.one("ReduceSum", [ATTENTION_MASK, self.constant([1])], name="places/lengths", keepdims=1)
            lengths = self.one("Unsqueeze", [lengths, self.constant([2])], name="places/lengths3")
            prompt_len = self.one("Where", [later, self.constant(0), lengths], name="places/prompt_len")
            in_prompt = self.one("Less", [t, prompt_len], name="places/in_prompt")
            self.token_places = t, prompt_len, in_prompt, later
        return self.token_places

    def slot_mask(self, positions: str, name: str) -> str:
        """contract.token_mask in ONNX nodes: float [batch, seq, rank] from positions [batch, 4, rank].

        first, last, after, generated = Split(positions, axis 1)      each [batch, 1, rank]
        prefix = t < min(first, prompt_len)
        suffix = t >= prompt_len - min(last, prompt_len - min(after, prompt_len))
        mask = (t < prompt_len and (prefix or suffix)) or (generated and later)   (pads: neither)
        """
        t, prompt_len, in_prompt, later = self.places()
        first, last, after, generated = self.node(
            "Split", [positions], name=f"{name}/Split", outputs=4, axis=1, num_outputs=POSITION_LINES
        )
        prefix = self.one(
            "Less", [t, self.one("Min", [first, prompt_len], name=f"{name}/first")], name=f"{name}/prefix"
        )
        start = self.one("Min", [after, prompt_len], name=f"{name}/after")
        count = self.one("Min", [last, self.one("Sub", [prompt_len, start], name=f"{name}/room")], name=f"{name}/last")
        suffix = self.one(
            "GreaterOrEqual", [t, self.one("Sub", [prompt_len, count], name=f"{name}/from")], name=f"{name}/suffix"
        )
        edits = self.one(
            "And", [self.one("Cast", [generated], name=f"{name}/generated", to=9), later], name=f"{name}/later"
        )
        # (Where has no bool kernel; in_prompt and later never hold together, so And/Or choose)
        prompt = self.one(
            "And", [in_prompt, self.one("Or", [prefix, suffix], name=f"{name}/span")], name=f"{name}/prompt"
        )
        chosen = self.one("Or", [prompt, edits], name=f"{name}/choose")
        return self.one("Cast", [chosen], name=f"{name}/mask", to=1)

    def attention(
        self, index: int, module: nn.Module, x: str, lengths: str, total: str, cos: str, sin: str
    ) -> tuple[str, list[str]]:
        """Packed QKV projection -> GroupQueryAttention (rotary and KV buffer inside) -> output projection;
        returns the output and the present KV names.

        With per-head q/k norms (Qwen3) Q, K and V go in separately, normed before rotary.
        """
        prefix = f"layers.{index}/attn"
        projections = [module.q_proj, module.k_proj, module.v_proj]
        q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        if q_norm is None:
            query_key_value = [self.linear(x, projections, f"{prefix}/qkv_proj"), "", ""]
        else:
            query_key_value = [
                self.head_norm(
                    self.linear(x, [module.q_proj], f"{prefix}/q_proj"), q_norm, self.heads, f"{prefix}/q_norm"
                ),
                self.head_norm(
                    self.linear(x, [module.k_proj], f"{prefix}/k_proj"), k_norm, self.kv_heads, f"{prefix}/k_norm"
                ),
                self.linear(x, [module.v_proj], f"{prefix}/v_proj"),
            ]
        past_key, past_value = past_names(index)
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        sliding = window is not None and (
            layer_types is None
            and self.config.model_type == "mistral"
            or layer_types is not None
            and layer_types[index] == "sliding_attention"
        )
        out = self.node(
            "GroupQueryAttention",
            [*query_key_value, past_key, past_value, lengths, total, cos, sin],
            name=f"{prefix}/GroupQueryAttention",
            outputs=[self.name(f"{prefix}/out"), *map(self.output_name, present_names(index))],
            domain=MS_DOMAIN,
            num_heads=self.heads,
            kv_num_heads=self.kv_heads,
            scale=float(module.scaling),
            do_rotary=1,
            rotary_interleaved=0,
            local_window_size=int(window) if sliding else -1,
        )
        return self.linear(out[0], [module.o_proj], f"{prefix}/o_proj"), out[1:]

    def head_norm(self, x: str, module: nn.Module, heads: int, name: str) -> str:
        """RMSNorm over each head's slice: [b, s, heads*d] -> [b, s, heads, d] -> norm -> back."""
        per_head = self.one("Reshape", [x, self.constant([0, 0, heads, self.head_dim])], name=f"{name}/Reshape")
        normed = self.rms_norm(per_head, module, name)
        return self.one("Reshape", [normed, self.constant([0, 0, heads * self.head_dim])], name=f"{name}/Flatten")

    def output(self, h: str, lengths: str, embedding: str) -> str:
        """Logits of each row's last token only: the vocabulary product over the whole prompt is wasted.

        seqlens_k --Min(seq-1)--> last [b] --GatherND(h, batch_dims 1)--> [b,H] --norm
            --Gemm(embedding, transB) or MatMul(lm_head)--> [b,V] --Unsqueeze--> logits [b,1,V]
        """
        seq = self.one("Shape", [INPUT_IDS], name="output/Shape", start=1, end=2)
        seq_last = self.one("Sub", [seq, self.constant([1])], name="output/Sub")
        # prefill: row b's last token is at lengths[b]; a decode step has one token, at 0
        last = self.one("Min", [self.one("Cast", [lengths], name="output/Cast", to=7), seq_last], name="output/Min")
        index = self.one("Unsqueeze", [last, self.constant([1])], name="output/Unsqueeze")
        picked = self.one("GatherND", [h, index], name="output/GatherND", batch_dims=1)
        normed = self.rms_norm(picked, self.model_.model.norm, "norm")
        head = self.model_.get_output_embeddings()
        if self.share_tied_output and head.weight is self.model_.get_input_embeddings().weight:
            # one copy of a tied matrix: Gemm reads the embedding transposed
            logits = self.one("Gemm", [normed, embedding], name="lm_head/Gemm", transB=1)
        else:  # a MatMul weight of its own, which the int8/int4 quantizers compress
            logits = self.one(
                "MatMul", [normed, self.weight("lm_head.weight", lambda: _numpy(head.weight).T)], name="lm_head/MatMul"
            )
        return self.node("Unsqueeze", [logits, self.constant([1])], name="lm_head", outputs=[self.output_name(LOGITS)])[
            0
        ]
