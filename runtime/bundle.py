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
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from reft_edge.constants import BUNDLE_SCHEMA_VERSION, MANIFEST_FILE
from reft_edge.errors import BundleError

if TYPE_CHECKING:
    from reft_edge.runtime.patch import Patch

PRECISIONS = ("fp32", "fp16", "int8", "int4")

GRAPHS = ("fused", "traced")  # how export built the graph; decides how the runtime feeds it


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
    def from_dict(cls, values: dict[str, Any], *, source: str = MANIFEST_FILE) -> "Manifest":
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if not isinstance(values, dict):
            raise BundleError(f"{source}: not a JSON object; re-export the bundle")
        missing = sorted(required - set(values))
        if missing:
            raise BundleError(f"{source}: lacks {', '.join(missing)}; re-export the bundle with this reft-edge")
        if values["schema_version"] != BUNDLE_SCHEMA_VERSION:
            raise BundleError(f"{source}: schema version {values['schema_version']!r}, this reft-edge reads "
                              f"{BUNDLE_SCHEMA_VERSION}; re-export the bundle with this reft-edge")
        try:
            kv = KVLayout(**values["kv"])
            manifest = cls(**{**{k: v for k, v in values.items() if k in names}, "kv": kv})
        except TypeError as exc:
            raise BundleError(f"{source}: malformed ({exc}); re-export the bundle") from None
        manifest._check(source)
        return manifest

    def _check(self, source: str) -> None:
        if self.graph not in GRAPHS:
            raise BundleError(f"{source}: graph {self.graph!r} is unknown (expected one of {', '.join(GRAPHS)}); "
                              "re-export the bundle")
        if self.precision not in PRECISIONS:
            raise BundleError(f"{source}: precision {self.precision!r} is unknown; re-export the bundle")
        for role, name in self.files.items():
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise BundleError(f"{source}: file {role}={name!r} points outside the bundle folder; "
                                  "re-export the bundle")
        if "model" not in self.files or "tokenizer" not in self.files:
            raise BundleError(f"{source}: names no model or tokenizer file; re-export the bundle")

    def load_patches(self, patches: "Sequence[Patch | str | Path]") -> "list[Patch]":
        """Patch objects or paths -> Patch objects, each checked against this bundle's base, hidden
        size and slot layers (one-line errors naming the file)."""
        from reft_edge.runtime.patch import Patch

        if isinstance(patches, (str, Path, Patch)):
            patches = [patches]
        loaded = []
        for item in patches:
            patch = item if isinstance(item, Patch) else Patch.from_file(item)
            patch.check_compatible(base_fingerprint=self.base_fingerprint, hidden_size=self.hidden_size,
                                   slot_layers=self.slot_layers,
                                   source=str(item) if not isinstance(item, Patch) else f"patch {patch.name!r}")
            loaded.append(patch)
        return loaded

    @classmethod
    def from_dir(cls, bundle_dir: str | Path) -> "Manifest":
        """Read and check the manifest, and that every file it names is present."""
        bundle_dir = Path(bundle_dir)
        path = bundle_dir / MANIFEST_FILE
        if not bundle_dir.is_dir():
            raise BundleError(f"{bundle_dir}: not a folder; pass the folder written by reft-edge export")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(f"{path}: missing, so {bundle_dir} is not a complete bundle; "
                              "run reft-edge export again") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: unreadable ({exc}); re-export the bundle") from None
        manifest = cls.from_dict(values, source=str(path))
        for role, name in manifest.files.items():
            if not (bundle_dir / name).is_file():
                raise BundleError(f"{bundle_dir / name}: missing ({role}); re-export the bundle")
        return manifest

    def to_file(self, bundle_dir: str | Path) -> None:
        """Write manifest.json atomically; call it last, once every other file is in place."""
        from reft_edge.files import atomic_write_bytes

        atomic_write_bytes(Path(bundle_dir) / MANIFEST_FILE,
                           (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())
