"""The bundle: one exported base model as a folder, described by manifest.json (written last).

Example::

    from reft_edge.runtime.bundle import Manifest
    manifest = Manifest.from_dir("bundle/")      # BundleError if missing, invalid or incomplete
    print(manifest.precision, manifest.slot_layers, manifest.verification)

A folder without a valid manifest is not a bundle. docs/bundle-format.md is the
specification of the folder and of the graph's inputs and outputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reft_edge.constants import BUNDLE_SCHEMA_VERSION, MANIFEST_FILE
from reft_edge.errors import BundleError

if TYPE_CHECKING:
    from reft_edge.runtime.patch import Patch

PRECISIONS = ("fp32", "fp16", "int8", "int4")

GRAPHS = ("fused", "traced")  # how export built the graph; decides how the runtime feeds it


def _is_int(value: Any, low: int = 0) -> bool:
    return type(value) is int and value >= low


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(item) for item in value)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _is_special_tokens(value: Any) -> bool:
    """bos/eos/pad: ``*_token`` a string, ``*_token_id`` a token id, ``eos_token_ids`` a list of them."""

    def ok(key: str, item: Any) -> bool:
        if key == "eos_token_ids":
            return _is_int_list(item)
        if key.endswith("_id"):
            return item is None or _is_int(item)
        return item is None or isinstance(item, str)

    return isinstance(value, dict) and all(ok(str(key), item) for key, item in value.items())


def _is_generation(value: Any) -> bool:
    """Sampling defaults: numbers (or null), as the model's generation_config has them."""
    return isinstance(value, dict) and all(
        item is None or (isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item))
        for item in value.values()
    )


# Each manifest field: (check, what it must be). Checked before anything uses a value, so a
# hand-edited manifest fails with one line naming the field instead of a TypeError deep inside.
MANIFEST_TYPES: dict[str, tuple[Any, str]] = {
    "schema_version": (_is_int, "a whole number"),
    "tool_version": (lambda v: isinstance(v, str), "a string"),
    "source_model": (lambda v: isinstance(v, str), "a string"),
    "base_fingerprint": (lambda v: isinstance(v, str) and len(v) >= 16, "a string of hex digits"),
    "architecture": (lambda v: isinstance(v, str), "a string"),
    "hidden_size": (lambda v: _is_int(v, 1), "a positive whole number"),
    "num_layers": (lambda v: _is_int(v, 1), "a positive whole number"),
    "vocab_size": (lambda v: _is_int(v, 1), "a positive whole number"),
    "slot_layers": (_is_int_list, "a list of layer numbers"),
    "kv": (_is_object, "an object {num_layers, num_kv_heads, head_dim, dtype}"),
    "inputs": (_is_str_list, "a list of strings"),
    "outputs": (_is_str_list, "a list of strings"),
    "precision": (lambda v: isinstance(v, str), "a string"),
    "context_length": (lambda v: _is_int(v, 1), "a positive whole number"),
    "files": (
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "an object of role -> file name",
    ),
    "special_tokens": (_is_special_tokens, "an object of token strings and whole-number ids"),
    "generation": (_is_generation, "an object of finite numbers"),
    "weights": (lambda v: isinstance(v, str), "a string"),
    "graph": (lambda v: isinstance(v, str), "a string"),
    "size_bytes": (_is_int, "a whole number"),
    "verification": (_is_object, "an object"),
}
KV_TYPES: dict[str, tuple[Any, str]] = {
    "num_layers": (lambda v: _is_int(v, 1), "a positive whole number"),
    "num_kv_heads": (lambda v: _is_int(v, 1), "a positive whole number"),
    "head_dim": (lambda v: _is_int(v, 1), "a positive whole number"),
    "dtype": (lambda v: v in ("float32", "float16"), "float32 or float16"),
}


def check_types(values: dict[str, Any], types: dict[str, tuple[Any, str]], source: str, prefix: str = "") -> None:
    """BundleError naming the first field whose value has the wrong type."""
    for key, (check, expected) in types.items():
        if key in values and not check(values[key]):
            shown = json.dumps(values[key])
            shown = shown if len(shown) <= 80 else shown[:80] + "..."
            raise BundleError(
                f"{source}: {prefix}{key} is {shown}, expected {expected}; "
                "the manifest is damaged or hand-edited, re-export the bundle"
            )


@dataclass(frozen=True)
class KVLayout:
    """Past/present tensors: [batch, num_kv_heads, seq, head_dim] per layer, in ``dtype``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # float32 | float16


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    tool_version: str
    source_model: str
    base_fingerprint: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    slot_layers: list[int]
    kv: KVLayout
    inputs: list[str]
    outputs: list[str]
    precision: str
    context_length: int
    files: dict[str, str]  # role -> file name inside the bundle (model, model_data, tokenizer, chat_template)
    special_tokens: dict[str, Any]  # bos/eos/pad token strings and ids; eos_token_ids is a list
    generation: dict[str, Any] = field(default_factory=dict)
    weights: str = ""  # how the weights were made for this precision (export's recipe)
    graph: str = "fused"  # fused (export.fused) | traced (export.graph): how the runtime feeds it
    size_bytes: int = 0
    verification: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = MANIFEST_FILE) -> Manifest:
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if not isinstance(values, dict):
            raise BundleError(f"{source}: not a JSON object; re-export the bundle")
        missing = sorted(required - set(values))
        if missing:
            raise BundleError(f"{source}: lacks {', '.join(missing)}; re-export the bundle with this reft-edge")
        check_types(values, MANIFEST_TYPES, source)
        if values["schema_version"] != BUNDLE_SCHEMA_VERSION:
            raise BundleError(
                f"{source}: schema version {values['schema_version']!r}, this reft-edge reads "
                f"{BUNDLE_SCHEMA_VERSION}; re-export the bundle with this reft-edge"
            )
        missing_kv = sorted({f.name for f in fields(KVLayout)} - set(values["kv"]))
        if missing_kv:
            raise BundleError(f"{source}: kv lacks {', '.join(missing_kv)}; re-export the bundle with this reft-edge")
        check_types(values["kv"], KV_TYPES, source, prefix="kv.")
        try:
            kv = KVLayout(**values["kv"])
            manifest = cls(**{**{k: v for k, v in values.items() if k in names}, "kv": kv})
        except TypeError as exc:
            raise BundleError(f"{source}: malformed ({exc}); re-export the bundle") from None
        manifest._check(source)
        return manifest

    def _check(self, source: str) -> None:
        if self.graph not in GRAPHS:
            raise BundleError(
                f"{source}: graph {self.graph!r} is unknown (expected one of {', '.join(GRAPHS)}); re-export the bundle"
            )
        if self.precision not in PRECISIONS:
            raise BundleError(f"{source}: precision {self.precision!r} is unknown; re-export the bundle")
        for role, name in self.files.items():
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise BundleError(
                    f"{source}: file {role}={name!r} points outside the bundle folder; re-export the bundle"
                )
        if "model" not in self.files or "tokenizer" not in self.files:
            raise BundleError(f"{source}: names no model or tokenizer file; re-export the bundle")

    def load_patches(self, patches: Sequence[Patch | str | Path]) -> list[Patch]:
        """Patch objects or paths -> Patch objects, each checked against this bundle's base, hidden
        size and slot layers (one-line errors naming the file)."""
        from reft_edge.runtime.patch import Patch

        if isinstance(patches, (str, Path, Patch)):
            patches = [patches]
        loaded = []
        for item in patches:
            patch = item if isinstance(item, Patch) else Patch.from_file(item)
            patch.check_compatible(
                base_fingerprint=self.base_fingerprint,
                hidden_size=self.hidden_size,
                slot_layers=self.slot_layers,
                source=str(item) if not isinstance(item, Patch) else f"patch {patch.name!r}",
            )
            loaded.append(patch)
        return loaded

    @classmethod
    def from_dir(cls, bundle_dir: str | Path) -> Manifest:
        """Read and check the manifest, and that every file it names is present."""
        bundle_dir = Path(bundle_dir)
        path = bundle_dir / MANIFEST_FILE
        if not bundle_dir.is_dir():
            raise BundleError(f"{bundle_dir}: not a folder; pass the folder written by reft-edge export")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(
                f"{path}: missing, so {bundle_dir} is not a complete bundle; run reft-edge export again"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: unreadable ({exc}); re-export the bundle") from None
        except RecursionError:
            values = None  # nested beyond any manifest: refused just below
        from reft_edge.runtime.patch import MAX_JSON_DEPTH, json_depth

        if values is None or json_depth(values) > MAX_JSON_DEPTH:
            raise BundleError(
                f"{path}: nests deeper than {MAX_JSON_DEPTH} levels; the manifest is damaged, re-export the bundle"
            )
        manifest = cls.from_dict(values, source=str(path))
        for role, name in manifest.files.items():
            if not (bundle_dir / name).is_file():
                raise BundleError(f"{bundle_dir / name}: missing ({role}); re-export the bundle")
        return manifest

    def to_file(self, bundle_dir: str | Path) -> None:
        """Write manifest.json atomically; call it last, once every other file is in place."""
        from reft_edge.files import atomic_write_bytes

        atomic_write_bytes(
            Path(bundle_dir) / MANIFEST_FILE, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()
        )
