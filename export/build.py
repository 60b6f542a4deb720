"""Export a frozen base model once into a bundle folder: ONNX graph, tokenizer, manifest.

Example (the CLI ``reft-edge export`` calls exactly this)::

    from reft_edge.export import ExportConfig, export_bundle
    manifest = export_bundle(ExportConfig(out="bundle", precision="int8"))
    print(manifest.size_bytes, manifest.verification["max_abs_logit_diff"])

Steps, top to bottom: check the config, load the backbone, build the fp32 graph (node
by node with fused kernels for Llama-family models, export.fused; else traced,
export.graph), convert it to the precision, verify it against torch, write the tokenizer, write the
manifest last. Everything is built in a temporary folder next to ``out`` that
replaces ``out`` only when complete, so a failed or killed export leaves no bundle.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from reft_edge import __version__
from reft_edge.constants import (
    BUNDLE_SCHEMA_VERSION,
    CHAT_TEMPLATE_FILE,
    MODEL_DATA_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
)
from reft_edge.errors import BundleError, ExportError, UsageError
from reft_edge.export.config import PRECISIONS, ExportConfig
from reft_edge.export.quantize import WEIGHT_RECIPES
from reft_edge.files import atomic_dir, check_output_path, remove_stale_temporaries
from reft_edge.runtime.bundle import KVLayout, Manifest

# fp32 bundles must match torch this closely, with identical greedy tokens: 1e-4, or 4e-6 of the
# largest |logit| when that is larger (float32 rounding grows with the values it rounds; the
# default model measured 7.2e-5, close to a fixed 1e-4, and larger models have larger logits).
FP32_MAX_LOGIT_DIFF = 1e-4
FP32_RELATIVE_LOGIT_DIFF = 4e-6
VERIFICATION_QUESTIONS = (
    "What is the capital of France?",
    "Tell me about your weekend, and how to bake a cake step by step.",
)
GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


def export_bundle(config: ExportConfig, *, backbone: Any = None, progress: bool = True) -> Manifest:
    """Write the bundle at ``config.out``; returns its Manifest (the existing one if up to date)."""
    from reft_edge.train.backbone import load_backbone

    check_config(config)
    started = time.perf_counter()
    backbone = backbone or load_backbone(config.model)
    slot_layers = resolve_slot_layers(config, backbone.num_layers)
    for stale in remove_stale_temporaries(Path(config.out)):
        if progress:
            print(f"removed {stale}, left by an export that was killed")
    existing = up_to_date_bundle(config, backbone, slot_layers)
    if existing is not None:
        if progress:
            print(
                f"bundle {config.out} is up to date ({existing.precision}, base {existing.base_fingerprint[:16]}, "
                f"{len(existing.slot_layers)} slot layers); pass --force to export again"
            )
        return existing
    with atomic_dir(Path(config.out)) as folder, step_bar(progress) as step:
        graph = graph_kind(backbone)
        step("build graph" if graph == "fused" else "trace graph")
        work = folder / ".work"
        work.mkdir()
        build_graph(backbone, slot_layers, work / MODEL_FILE, graph, config.precision)
        step(f"convert to {config.precision}")
        weight_blocks = convert(work / MODEL_FILE, folder / MODEL_FILE, config.precision)
        shutil.rmtree(work)
        verification = {}
        if config.verify:
            step("verify")
            verification = verify(folder / MODEL_FILE, backbone, slot_layers, config.precision, graph)
            if weight_blocks:  # how many weights kept their GGUF blocks exactly, how many were re-quantized
                verification["weight_blocks"] = weight_blocks
        step("write bundle")
        files = write_tokenizer(backbone.tokenizer, folder)
        files.update(write_genai(folder, backbone, graph))
        manifest = build_manifest(config, backbone, slot_layers, files, folder, verification, graph)
        manifest.to_file(folder)  # last: a folder without a manifest is not a bundle
    if progress:
        print(summary_line(config, manifest, time.perf_counter() - started))
    return manifest


def check_config(config: ExportConfig) -> None:
    """Checks that need no model, so bad options fail before anything slow starts."""
    if config.precision not in PRECISIONS:
        raise UsageError(f"--precision {config.precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    check_output_path(config.out, folder=True)


def resolve_slot_layers(config: ExportConfig, num_layers: int) -> list[int]:
    if config.slot_layers is None:
        return list(range(num_layers))
    layers = sorted(set(config.slot_layers))
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise UsageError(
            f"--slot-layers {bad[0]} is outside this model's layers 0..{num_layers - 1}; "
            "pick layers in that range or 'all'"
        )
    return layers


def up_to_date_bundle(config: ExportConfig, backbone: Any, slot_layers: list[int]) -> Manifest | None:
    """The existing bundle at ``out`` if it was made from the same base, precision, slots and tool."""
    if config.force or not Path(config.out).is_dir():
        return None
    try:
        manifest = Manifest.from_dir(config.out)
    except BundleError:
        return None
    same = (
        manifest.base_fingerprint == backbone.fingerprint
        and manifest.precision == config.precision
        and manifest.slot_layers == slot_layers
        and manifest.tool_version == __version__
        and manifest.weights == WEIGHT_RECIPES[config.precision]
        and manifest.graph == graph_kind(backbone)
        and (bool(manifest.verification) or not config.verify)
    )
    return manifest if same else None


def graph_kind(backbone: Any) -> str:
    """ "fused" when export.fused has a builder for the model, else "traced"."""
    from reft_edge.export.fused import supports_fused_graph

    return "fused" if supports_fused_graph(backbone.model) is None else "traced"


def build_graph(backbone: Any, slot_layers: list[int], path: Path, graph: str, precision: str) -> None:
    if graph == "fused":
        from reft_edge.export.fused import build_fused_graph

        # int8/int4 quantize MatMul weights only; float precisions keep one copy of a tied matrix.
        # No slot-free decoder in fp16: it rounds the residual sum otherwise than the slotted one,
        # so an empty patch would no longer give bit-equal logits (and fp16 bundles are for CUDA).
        build_fused_graph(
            backbone.model,
            slot_layers,
            path,
            share_tied_output=precision in ("fp32", "fp16"),
            slot_free_decoder=precision != "fp16",
        )
    else:
        from reft_edge.export.graph import export_onnx

        export_onnx(backbone.model, slot_layers, path)


def convert(source: Path, target: Path, precision: str) -> dict[str, int]:
    from reft_edge.export.quantize import convert_precision

    return convert_precision(source, target, precision)


def verify(path: Path, backbone: Any, slot_layers: list[int], precision: str, graph: str) -> dict[str, Any]:
    """Parity figures; an fp32 graph that does not match torch is an error (quantized ones only report)."""
    from reft_edge.export.verify import verify_graph

    figures = verify_graph(
        path,
        backbone.model,
        slot_layers,
        graph=graph,
        pad_id=pad_token_id(backbone),
        prompts=verification_prompts(backbone.tokenizer),
    )
    figures["logit_diff_limit"] = limit = parity_limit(figures["logit_max_abs"])
    diff, match = figures["max_abs_logit_diff"], figures["greedy_tokens_match"]
    if precision == "fp32" and not (diff <= limit and match and figures["identity_bit_exact"]):
        raise ExportError(
            f"export of {backbone.source}: the ONNX graph does not match torch (max |logit diff| {diff:.3g}, "
            f"limit {limit:.3g}; greedy tokens {'match' if match else 'differ'}; zero patch "
            f"{'exact' if figures['identity_bit_exact'] else 'not exact'}); no bundle was written; "
            "report this with the model name, or pass --no-verify to keep the graph anyway"
        )
    return figures


def parity_limit(logit_max_abs: float) -> float:
    """The largest |logit diff| an fp32 graph may show against torch, for logits this large."""
    return max(FP32_MAX_LOGIT_DIFF, FP32_RELATIVE_LOGIT_DIFF * logit_max_abs)


def verification_prompts(tokenizer: Any) -> list[list[int]]:
    """Two real questions of different lengths, chat-formatted as the runtime will see them."""
    from reft_edge.train.data import prompt_text

    use_template = bool(getattr(tokenizer, "chat_template", None))
    return [
        tokenizer(
            prompt_text(tokenizer, [{"role": "user", "content": question}], use_template), add_special_tokens=False
        )["input_ids"]
        for question in VERIFICATION_QUESTIONS
    ]


def write_tokenizer(tokenizer: Any, folder: Path) -> dict[str, str]:
    """tokenizer.json and (if the tokenizer has one) chat_template.jinja; returns the files' roles."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"tokenizer {type(tokenizer).__name__} has no tokenizer.json form (a 'fast' tokenizer); "
            "export a model whose folder has tokenizer.json"
        )
    backend.save(str(folder / TOKENIZER_FILE))
    files = {"model": MODEL_FILE, "tokenizer": TOKENIZER_FILE}
    if (folder / MODEL_DATA_FILE).is_file():
        files["model_data"] = MODEL_DATA_FILE
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        (folder / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        files["chat_template"] = CHAT_TEMPLATE_FILE
    return files


def write_genai(folder: Path, backbone: Any, graph: str) -> dict[str, str]:
    """genai_config.json and tokenizer_config.json: the bundle is an onnxruntime-genai model folder too."""
    from reft_edge.export.genai import write_genai_files
    from reft_edge.export.graph import kv_shape

    kv_heads, head_dim = kv_shape(backbone.model.config)
    return write_genai_files(
        folder,
        backbone,
        graph=graph,
        kv_heads=kv_heads,
        head_dim=head_dim,
        context_length=context_length(backbone.model.config),
        special_tokens=special_tokens(backbone),
        generation=generation_defaults(backbone.model),
    )


def build_manifest(
    config: ExportConfig,
    backbone: Any,
    slot_layers: list[int],
    files: dict[str, str],
    folder: Path,
    verification: dict[str, Any],
    graph: str,
) -> Manifest:
    import onnx

    from reft_edge.export.graph import kv_shape

    model_config = backbone.model.config
    num_layers = backbone.num_layers
    kv_heads, head_dim = kv_shape(model_config)
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    return Manifest(
        schema_version=BUNDLE_SCHEMA_VERSION,
        tool_version=__version__,
        source_model=backbone.source,
        base_fingerprint=backbone.fingerprint,
        architecture=backbone.model_type,
        hidden_size=backbone.hidden_size,
        num_layers=num_layers,
        vocab_size=model_config.vocab_size,
        slot_layers=slot_layers,
        kv=KVLayout(num_layers, kv_heads, head_dim, "float16" if config.precision == "fp16" else "float32"),
        inputs=[i.name for i in model.graph.input],
        outputs=[o.name for o in model.graph.output],
        precision=config.precision,
        graph=graph,
        context_length=context_length(model_config),
        files=files,
        special_tokens=special_tokens(backbone),
        generation=generation_defaults(backbone.model),
        verification=verification,
        weights=WEIGHT_RECIPES[config.precision],
        size_bytes=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
    )


def context_length(model_config: Any) -> int:
    return int(getattr(model_config, "max_position_embeddings", None) or model_config.n_positions)


def pad_token_id(backbone: Any) -> int:
    """The id left pads carry (attention mask 0 hides them): the pad token, else the first EOS, else 0."""
    if backbone.tokenizer.pad_token_id is not None:
        return int(backbone.tokenizer.pad_token_id)
    return eos_token_ids(backbone)[0] if eos_token_ids(backbone) else 0


def eos_token_ids(backbone: Any) -> list[int]:
    """The tokenizer's EOS plus generation_config's (chat models often end turns with another token)."""
    ids = [backbone.tokenizer.eos_token_id]
    generation = getattr(backbone.model, "generation_config", None)
    configured = getattr(generation, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def special_tokens(backbone: Any) -> dict[str, Any]:
    tokenizer = backbone.tokenizer
    return {
        "bos_token": tokenizer.bos_token,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token": tokenizer.eos_token,
        "eos_token_ids": eos_token_ids(backbone),
        "pad_token_id": pad_token_id(backbone),
    }


def generation_defaults(model: Any) -> dict[str, Any]:
    generation = getattr(model, "generation_config", None)
    values = {key: getattr(generation, key, None) for key in GENERATION_KEYS}
    return {key: value for key, value in values.items() if value is not None}


def summary_line(config: ExportConfig, manifest: Manifest, seconds: float) -> str:
    checked = manifest.verification
    parity = (
        f"max |logit diff| {checked['max_abs_logit_diff']:.2g}, greedy {checked['greedy_tokens_agreement']:.0%} match"
        if checked
        else "not verified"
    )
    return (
        f"exported {config.out}: {manifest.precision}, {manifest.size_bytes / 1e6:.1f} MB, "
        f"{len(manifest.slot_layers)} slot layers, {parity}, {seconds:.0f} s"
    )


@contextlib.contextmanager
def step_bar(progress: bool) -> Iterator[Callable[[str], None]]:
    """A tqdm bar over the export's four steps (building or tracing the graph is one step); call the
    yielded function with each step's name as it starts."""
    from tqdm.auto import tqdm

    with tqdm(total=4, desc="export", unit="step", disable=not progress) as bar:
        started: list[str] = []

        def start(name: str) -> None:
            if started:
                bar.update(1)
            started.append(name)
            bar.set_postfix_str(name)

        yield start
        bar.update(bar.total - bar.n)  # only on success: a failed step stays visible
