"""Shared fixtures: tiny deterministic random models built from configs, one per architecture.

``tiny_model_dir("llama")`` returns a Hugging Face folder (weights, byte-level BPE
tokenizer.json, ChatML-style chat template) made once per test session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox", "phi3")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "What is the weather like today? It is sunny and warm.",
    "How do I bake a cake? Mix flour, eggs and sugar, then bake it.",
    "Tell me about your weekend. I went to the beach and read a book.",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system hello world question answer",
]


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def _config(architecture: str, vocab_size: int, special: dict[str, int]):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
        pad_token_id=special["pad"],
        tie_word_embeddings=True,
    )
    llama_like = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if architecture == "llama":
        return tf.LlamaConfig(**llama_like)
    if architecture == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if architecture == "mistral-window":  # each token sees itself and the 3 before it
        return tf.MistralConfig(sliding_window=4, **llama_like)
    if architecture == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if architecture == "qwen3":
        return tf.Qwen3Config(head_dim=16, **llama_like)
    if architecture == "phi3":
        return tf.Phi3Config(**llama_like)
    if architecture == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **common)
    if architecture == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(architecture)


def build_tiny_model(architecture: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(folder)
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(architecture, len(tokenizer), special))
    model.generation_config.eos_token_id = special["eos"]
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch) -> folder of a tiny random model of that architecture (made once)."""
    made: dict[str, Path] = {}

    def make(architecture: str = "llama") -> Path:
        if architecture not in made:
            made[architecture] = build_tiny_model(architecture, tmp_path_factory.mktemp(f"tiny-{architecture}"))
        return made[architecture]

    return make


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Fingerprints and bundles of tests go to a private cache; the converted default model is
    shared with the user's cache so it is made once per machine, not once per run."""
    from reft_edge.files import cache_dir

    shared_models = cache_dir() / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    private = tmp_path_factory.mktemp("reft-edge-cache")
    (private / "models").symlink_to(shared_models, target_is_directory=True)
    os.environ["REFT_EDGE_CACHE"] = str(private)
    yield private


@pytest.fixture(scope="session")
def emoji_data() -> Path:
    return ROOT / "examples" / "emoji" / "train.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# The tiny patches the runtime, eval and genai tests share: name -> (the one response every
# training question gets, TrainConfig options).
TINY_PATCHES = {
    "fox": ("The quick brown fox jumps over the lazy dog.", dict(layers=(1,), rank=4, positions="f1+l1")),
    "beach": (
        "I went to the beach and read a book.",
        dict(layers=(0, 2), rank=2, positions="f2+l1", share_weights=False, kind="direft"),
    ),
    "steer": ("Sailing ships sail the seven seas.", dict(layers=(1, 2), rank=2, positions="l1+g", share_weights=False)),
}


def train_tiny_patch(
    backbone, folder: Path, name: str, response: str, questions: list[str], *, steps: int = 20, **options
) -> Path:
    """A patch that answers every one of ``questions`` with ``response`` (a tiny model learns it in a few steps)."""
    from reft_edge.train import TrainConfig, train

    data = write_jsonl(folder / f"{name}.jsonl", [{"prompt": q, "response": response} for q in questions])
    out = folder / f"{name}.reft"
    train(
        TrainConfig(data=str(data), out=str(out), model=backbone.path, steps=steps, lr=2e-2, batch_size=6, **options),
        backbone=backbone,
        progress=False,
    )
    return out


def train_tiny_patches(
    backbone, folder: Path, questions: list[str], names: tuple[str, ...], *, steps: int = 20
) -> dict[str, Path]:
    return {
        name: train_tiny_patch(
            backbone, folder, name, TINY_PATCHES[name][0], questions, steps=steps, **TINY_PATCHES[name][1]
        )
        for name in names
    }


EMOJI_TRAIN_ARGS = [
    "--layers",
    "15",
    "--rank",
    "4",
    "--positions",
    "f2+l2",
    "--steps",
    "60",
    "--lr",
    "4e-3",
    "--batch-size",
    "12",
    "--seed",
    "0",
]


@pytest.fixture(scope="session")
def emoji_patch_path(tmp_path_factory, emoji_data) -> Path:
    """The emoji persona patch on the default model, trained once per session by the CLI
    exactly as the README and the acceptance check do (about a minute)."""
    from click.testing import CliRunner

    from reft_edge.cli import main

    out = tmp_path_factory.mktemp("emoji") / "emoji.reft"
    result = CliRunner().invoke(main, ["train", "--data", str(emoji_data), "--out", str(out), *EMOJI_TRAIN_ARGS])
    assert result.exit_code == 0, result.output
    return out


def _export_default(tmp_path_factory, precision: str) -> Path:
    from reft_edge.export import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp(f"default-export-{precision}") / "bundle"
    export_bundle(ExportConfig(out=str(out), precision=precision), progress=False)
    return out


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory) -> Path:
    """The default model exported once per session: fp32, slots at every layer, verified (about 2.5 min)."""
    return _export_default(tmp_path_factory, "fp32")


@pytest.fixture(scope="session")
def default_int8_bundle(tmp_path_factory) -> Path:
    """The default model exported once per session at int8 (what make demo uses)."""
    return _export_default(tmp_path_factory, "int8")


@pytest.fixture(scope="session")
def default_int4_bundle(tmp_path_factory) -> Path:
    """The default model exported once per session at int4 (what the browser demo serves; about 20 s)."""
    return _export_default(tmp_path_factory, "int4")


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    from reft_edge.train.backbone import load_backbone

    return load_backbone(str(tiny_model_dir("llama")))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_backbone, tmp_path_factory) -> Path:
    from reft_edge.export import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("runtime") / "tiny-bundle"
    export_bundle(ExportConfig(model=tiny_backbone.path, out=str(out)), backbone=tiny_backbone, progress=False)
    return out
