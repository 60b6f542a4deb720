"""Make a bundle an onnxruntime-genai model folder: genai_config.json and tokenizer_config.json.

Example::

    from reft_edge.export.genai import write_genai_files
    write_genai_files(folder, backbone, graph="fused", kv_heads=3, head_dim=64, context_length=8192,
                      special_tokens=manifest.special_tokens, generation=manifest.generation)

    import onnxruntime_genai as og                       # then, on any device genai runs on
    model = og.Model("bundle/")                          # docs/genai.md: patches as adapter files

genai feeds input_ids, attention_mask, position_ids (when the config names it) and the KV
cache itself; the slot inputs come from an adapter file (``reft-edge convert``), which
genai feeds as named inputs at every step, so they need no entry here. Contract v3 keeps
those inputs the same for the whole generation, which is all an adapter can do.

- fused graphs write the KV cache in place (``past_present_share_buffer`` true: one
  buffer of max_length per layer), and read no position ids;
- traced graphs grow the cache (false) and take position ids.

genai's tokenizer (onnxruntime-extensions) reads tokenizer.json with tokenizer_config.json,
whose ``chat_template`` its ``apply_chat_template`` uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reft_edge.constants import GENAI_CONFIG_FILE, MODEL_FILE, TOKENIZER_CONFIG_FILE
from reft_edge.runtime.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS

# genai model types whose decoder is the generic one (DecoderOnly_Model) with these inputs;
# traced graphs use "decoder", the generic type, whatever their architecture.
GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TOKENIZER_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "clean_up_tokenization_spaces")


def genai_config(
    backbone: Any,
    *,
    graph: str,
    kv_heads: int,
    head_dim: int,
    context_length: int,
    special_tokens: dict[str, Any],
    generation: dict[str, Any],
) -> dict[str, Any]:
    """The genai_config.json of a bundle (greedy by default, as the runtime's generate)."""
    config = backbone.model.config
    inputs = {
        "input_ids": INPUT_IDS,
        "attention_mask": ATTENTION_MASK,
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    if graph == "traced":
        inputs["position_ids"] = POSITION_IDS
    eos = special_tokens["eos_token_ids"]
    search = {
        "do_sample": False,
        "num_beams": 1,
        "num_return_sequences": 1,
        "min_length": 0,
        "max_length": context_length,
        "past_present_share_buffer": graph == "fused",
        "repetition_penalty": 1.0,
        "temperature": float(generation.get("temperature", 1.0)),
        "top_k": int(generation.get("top_k", 1)),
        "top_p": float(generation.get("top_p", 1.0)),
        "length_penalty": 1.0,
        "early_stopping": True,
        "no_repeat_ngram_size": 0,
        "diversity_penalty": 0.0,
    }
    return {
        "model": {
            "type": backbone.model_type if graph == "fused" and backbone.model_type in GENAI_TYPES else "decoder",
            "bos_token_id": special_tokens["bos_token_id"] if special_tokens["bos_token_id"] is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": special_tokens["pad_token_id"],
            "context_length": context_length,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": backbone.num_layers,
                "inputs": inputs,
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": search,
    }


def tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """tokenizer_config.json as genai's tokenizer reads it: the special tokens, the class, and the
    chat template inline (transformers writes it to a file of its own, which genai does not read)."""
    values = {key: getattr(tokenizer, key, None) for key in TOKENIZER_KEYS}
    values = {key: value for key, value in values.items() if isinstance(value, (str, bool))}
    values["tokenizer_class"] = type(tokenizer).__name__.removesuffix("Fast")
    values["add_bos_token"] = values["add_eos_token"] = False  # prompts are tokenized as training does
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        values["chat_template"] = template
    return values


def write_genai_files(folder: Path, backbone: Any, **options: Any) -> dict[str, str]:
    """Write both files into ``folder``; returns their roles for the manifest."""
    (folder / GENAI_CONFIG_FILE).write_text(
        json.dumps(genai_config(backbone, **options), indent=2) + "\n", encoding="utf-8"
    )
    (folder / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps(tokenizer_config(backbone.tokenizer), indent=2) + "\n", encoding="utf-8"
    )
    return {"genai_config": GENAI_CONFIG_FILE, "tokenizer_config": TOKENIZER_CONFIG_FILE}
