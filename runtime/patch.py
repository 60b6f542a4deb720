"""Patch format v3 (it reads v1 and v2 too): one safetensors file per person, read and written with numpy only.

Example::

    from reft_edge.runtime import Patch
    patch = Patch.from_file("alice.reft")          # validates everything, never unpickles
    print(patch.kind, patch.layers, patch.rank, patch.size_bytes)
    for edit in patch.affine_edits():              # the one low-rank affine form all kinds share
        print(edit.layer, edit.where, edit.A.shape)

The file holds, per intervention ``i``, the tensors of its kind's natural
parametrisation as ``interventions.{i}.{name}`` and a string-to-string metadata
table whose values are JSON. docs/patch-format.md is the specification.

A patch may group its rank rows into named skills (``reft-edge train --skill``): skill k
owns the same consecutive rows of every intervention. Any subset is switched on, off or
weighted per request without touching the file or the session::

    skills = Patch.load("skills.reft")
    caps_only = skills.with_skills(["caps"])               # the other skills' rows are dropped
    both = skills.with_skills({"caps": 1.0, "meow": 0.5})  # meow's edit at half strength
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from reft_edge.constants import KIND_TENSORS, KINDS, PATCH_FORMAT, PATCH_FORMAT_VERSION, SAVE_DTYPES
from reft_edge.errors import BackboneMismatchError, PatchCompatibilityError, PatchFormatError, UsageError
from reft_edge.runtime.positions import WHERE, Positions

MAX_PATCH_BYTES = 64 * 1024 * 1024  # patches are kilobytes; anything this big is not one
MAX_HEADER_BYTES = 1024 * 1024
MAX_RANK = 1 << 16  # rank and hidden size are 1 .. MAX_RANK
MAX_LAYER = 4096  # layers are 0 .. MAX_LAYER - 1
_REQUIRED_METADATA = (
    "format",
    "format_version",
    "name",
    "kind",
    "layers",
    "positions",
    "share_weights",
    "rank",
    "hidden_size",
    "base_fingerprint",
    "dtype",
    "payload_sha256",
    "interventions",
    "training",
)
SKILL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Real metadata nests 4 levels at most; a bound keeps every reader and printer off deep recursion.
MAX_JSON_DEPTH = 64
MAX_SHOWN_CHARS = 200  # of a bad metadata value quoted in an error message


class _TooDeep(ValueError):
    """JSON nested deeper than MAX_JSON_DEPTH."""


def json_depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value (iterative: safe on any depth)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads_bounded(text: str | bytes) -> Any:
    """json.loads that refuses (``_TooDeep``) values nested deeper than MAX_JSON_DEPTH."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _TooDeep from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise _TooDeep
    return value


def shown(value: Any) -> str:
    """repr(value), cut to MAX_SHOWN_CHARS: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."


def affine_from_params(kind: str, params: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """Map a kind's parameters to the shared edit ``h + ((h B^T + c) * m) A``; returns (A, B, c).

    Written with array arithmetic only, so the same code serves numpy arrays (runtime)
    and torch tensors with autograd (training and export).
    """
    if kind in ("loreft", "direft", "consreft", "lobireft"):
        R, b = params["R"], params["b"]
        B = {
            "loreft": lambda: params["W"] - R,
            "direft": lambda: params["W"],
            "consreft": lambda: -R,
            "lobireft": lambda: R * 0,
        }[kind]()
        return R, B, b
    if kind in ("noreft", "nodireft"):
        W1, W2, b = params["W1"], params["W2"], params["b"]
        return W2, (W1 - W2 if kind == "noreft" else W1), b
    raise PatchFormatError(f"unknown intervention kind {kind!r}; expected one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Intervention:
    """One low-rank edit at one layer, on the prefix, suffix or both position groups."""

    layer: int
    where: str
    params: dict[str, np.ndarray] = field(compare=False)


@dataclass(frozen=True)
class AffineEdit:
    """An intervention in the shared form: A, B [rank, hidden], c [rank], float32."""

    layer: int
    where: str
    A: np.ndarray
    B: np.ndarray
    c: np.ndarray


@dataclass(frozen=True)
class Patch:
    """A validated patch: what it edits, its tensors, and where it came from."""

    name: str
    kind: str
    positions: Positions
    share_weights: bool
    rank: int
    hidden_size: int
    base_fingerprint: str
    interventions: tuple[Intervention, ...]
    training: dict = field(default_factory=dict, compare=False)
    dtype: str = "float32"
    payload_sha256: str = field(default="", compare=False)  # filled in by the loader
    size_bytes: int = field(default=0, compare=False)
    skills: tuple[tuple[str, int], ...] = ()  # (name, rank rows), in row order; () = one unnamed skill
    # The request's choice (with_skills): (name, weight) of the skills switched on; None = all at 1.
    # Not stored in the file.
    skill_weights: tuple[tuple[str, float], ...] | None = field(default=None, compare=False)

    @property
    def layers(self) -> list[int]:
        return sorted({iv.layer for iv in self.interventions})

    def affine_edits(self) -> list[AffineEdit]:
        """Every intervention in the shared form, with the chosen skills only (with_skills): rows of
        skills switched off (or weighted 0) are dropped, so they cost nothing and change nothing;
        a weight scales its rows of A, which scales their edit linearly for every kind."""
        rows, scale = self._chosen_rows()
        edits = []
        for iv in self.interventions:
            params = {k: v.astype(np.float32) for k, v in iv.params.items()}
            A, B, c = affine_from_params(self.kind, params)
            if rows is not None:
                A, B, c = A[rows] * scale[:, None], B[rows], c[rows]
            edits.append(AffineEdit(iv.layer, iv.where, A, B, c))
        return edits

    @property
    def skill_names(self) -> list[str]:
        return [name for name, _ in self.skills]

    def with_skills(self, chosen: Mapping[str, float] | Sequence[str]) -> Patch:
        """This patch with only the ``chosen`` skills on (a list: each at weight 1; a mapping: name ->
        weight, 0 = off). Weights must be finite; unknown names are a UsageError."""
        if not self.skills:
            raise UsageError(
                f"patch {self.name!r} has no skills; train one with reft-edge train --skill NAME=DATA "
                "or use the patch as a whole"
            )
        weights = dict(chosen) if isinstance(chosen, Mapping) else dict.fromkeys(chosen, 1.0)
        unknown = sorted(set(weights) - set(self.skill_names))
        if unknown:
            raise UsageError(
                f"patch {self.name!r} has no skill {unknown[0]!r}; its skills are {', '.join(self.skill_names)}"
            )
        if not all(np.isfinite(float(w)) for w in weights.values()):
            raise UsageError(f"skill weights {weights} must be finite numbers (1.0 applies a skill as trained)")
        return replace(
            self, skill_weights=tuple((name, float(weights[name])) for name in self.skill_names if name in weights)
        )

    def _chosen_rows(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(rank rows to keep, their A scale), or (None, _) when every row is on at weight 1."""
        if self.skill_weights is None:
            return None, np.ones(0, np.float32)
        weights = dict(self.skill_weights)
        rows, scale, start = [], [], 0
        for name, rank in self.skills:
            if weights.get(name, 0.0) != 0.0:
                rows += range(start, start + rank)
                scale += [weights[name]] * rank
            start += rank
        return np.array(rows, np.int64), np.array(scale, np.float32)

    def check_compatible(
        self, *, base_fingerprint: str, hidden_size: int, slot_layers: list[int], source: str = "patch"
    ) -> None:
        """Raise unless this patch can be applied to a base with these properties."""
        if self.base_fingerprint != base_fingerprint:
            raise BackboneMismatchError(
                f"{source}: trained on base {self.base_fingerprint[:16]}, but this bundle's base is "
                f"{base_fingerprint[:16]}; train the patch on the bundle's model or export that patch's base"
            )
        if self.hidden_size != hidden_size:
            raise PatchCompatibilityError(
                f"{source}: hidden size {self.hidden_size}, bundle expects {hidden_size}; "
                "train the patch on the bundle's model"
            )
        missing = [layer for layer in self.layers if layer not in slot_layers]
        if missing:
            raise PatchCompatibilityError(
                f"{source}: edits layers {missing}, which are not among the bundle's slot layers "
                f"{slot_layers}; re-export with --slot-layers including them (or all)"
            )

    def metadata(self) -> dict[str, str]:
        values = {
            "format": PATCH_FORMAT,
            "format_version": format_version(self.positions),
            "name": self.name,
            "kind": self.kind,
            "layers": self.layers,
            "positions": str(self.positions),
            "share_weights": self.share_weights,
            "rank": self.rank,
            "hidden_size": self.hidden_size,
            "base_fingerprint": self.base_fingerprint,
            "dtype": self.dtype,
            "interventions": [{"layer": iv.layer, "where": iv.where} for iv in self.interventions],
            "training": self.training,
        }
        if self.skills:
            values["format_version"] = SKILLS_FORMAT_VERSION
            values["skills"] = [{"name": name, "rank": rank} for name, rank in self.skills]
        metadata = {key: json.dumps(value, sort_keys=True) for key, value in values.items()}
        return {**metadata, "payload_sha256": json.dumps(payload_digest(self.tensors(), metadata))}

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            f"interventions.{i}.{name}": np.ascontiguousarray(array.astype(self.dtype))
            for i, iv in enumerate(self.interventions)
            for name, array in iv.params.items()
        }

    def to_bytes(self) -> bytes:
        return serialize_safetensors(self.tensors(), self.metadata())

    def to_file(self, path: str | Path, *, fix: str = "re-train with a lower --lr") -> Patch:
        """Validate, then write atomically; returns the patch as a loader would see it (digest and
        size filled in). Nothing is written for a patch no reader would accept; ``fix`` says what the
        caller's user should change when the values are not finite (the cause differs: --lr, --scale)."""
        from reft_edge.files import atomic_write_bytes

        self.check_finite(f"{path}: not written", fix)
        data = self.to_bytes()
        checked = Patch.from_bytes(data, source=str(path))  # every reader check, before a byte lands
        atomic_write_bytes(Path(path), data)
        return checked

    def check_finite(self, source: str, fix: str) -> None:
        """Raise unless every tensor is finite in the dtype it is stored in (1e39 is inf in float32)."""
        with np.errstate(over="ignore", invalid="ignore"):
            tensors = self.tensors()
        for name, array in sorted(tensors.items()):
            if not np.isfinite(array).all():
                raise PatchFormatError(f"{source}: tensor {name} holds NaN or infinite values (as {self.dtype}); {fix}")

    @classmethod
    def from_file(cls, path: str | Path) -> Patch:
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise PatchFormatError(f"{path}: {what}; pass the path of a .reft patch file")
        size = path.stat().st_size
        if size > MAX_PATCH_BYTES:
            raise PatchFormatError(
                f"{path}: {size} bytes is larger than any patch ({MAX_PATCH_BYTES} at most); "
                "pass a .reft file written by reft-edge train"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PatchFormatError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from None
        return cls.from_bytes(data, source=str(path))

    load = from_file  # the runtime API's name: Patch.load("alice.reft")

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "patch") -> Patch:
        metadata = _read_metadata(data, source)
        tensors = _read_tensors(data, source)
        digest = payload_digest(tensors, metadata)
        if json.dumps(digest) != metadata.get("payload_sha256"):
            raise PatchFormatError(
                f"{source}: payload digest {digest[:16]} does not match the recorded "
                f"{str(metadata.get('payload_sha256'))[:18]}; the file is damaged, copy it again"
            )
        fields = _parse_metadata(metadata, source)
        _check_tensors(tensors, fields, source)
        interventions = tuple(
            Intervention(
                entry["layer"],
                entry["where"],
                {name: tensors[f"interventions.{i}.{name}"] for name in KIND_TENSORS[fields["kind"]]},
            )
            for i, entry in enumerate(fields["interventions"])
        )
        return cls(
            name=fields["name"],
            kind=fields["kind"],
            positions=fields["positions"],
            share_weights=fields["share_weights"],
            rank=fields["rank"],
            hidden_size=fields["hidden_size"],
            base_fingerprint=fields["base_fingerprint"],
            interventions=interventions,
            training=fields["training"],
            dtype=fields["dtype"],
            payload_sha256=digest,
            size_bytes=len(data),
            skills=fields["skills"],
        )

    def summary(self) -> dict[str, Any]:
        """What ``reft-edge inspect PATCH --json`` prints."""
        return {
            "name": self.name,
            "kind": self.kind,
            "layers": self.layers,
            "rank": self.rank,
            "positions": str(self.positions),
            "share_weights": self.share_weights,
            "hidden_size": self.hidden_size,
            "base_fingerprint": self.base_fingerprint,
            "dtype": self.dtype,
            "payload_sha256": self.payload_sha256,
            "size_bytes": self.size_bytes,
            "interventions": [{"layer": iv.layer, "where": iv.where} for iv in self.interventions],
            "skills": [{"name": name, "rank": rank} for name, rank in self.skills],
            "training": self.training,
        }


def choose_skills(patches: Sequence[Patch], chosen: Mapping[str, float]) -> list[Patch]:
    """Each patch that has skills keeps only the ``chosen`` ones it has (name -> weight); patches
    without skills are unchanged. A name no patch has is a UsageError."""
    if not chosen:
        return list(patches)
    known = {name for patch in patches for name in patch.skill_names}
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise UsageError(
            f"--skill {unknown[0]!r}: no patch has it; the patches' skills are "
            f"{', '.join(sorted(known)) or 'none (train with --skill NAME=DATA)'}"
        )
    return [
        patch.with_skills({n: w for n, w in chosen.items() if n in patch.skill_names}) if patch.skills else patch
        for patch in patches
    ]


def parse_skill_choice(values: Sequence[str]) -> dict[str, float]:
    """('caps', 'meow=0.5') -> {'caps': 1.0, 'meow': 0.5}: the --skill values of run and chat.

    >>> parse_skill_choice(["caps", "meow=0.5"])
    {'caps': 1.0, 'meow': 0.5}
    """
    chosen: dict[str, float] = {}
    for value in values:
        name, sep, weight = value.partition("=")
        try:
            chosen[name] = float(weight) if sep else 1.0
        except ValueError:
            raise UsageError(
                f"--skill {value!r}: {weight!r} is not a number; give NAME or NAME=WEIGHT, e.g. --skill meow=0.5"
            ) from None
        if not SKILL_NAME.fullmatch(name):
            raise UsageError(f"--skill {value!r}: give NAME or NAME=WEIGHT, e.g. --skill meow=0.5")
    return chosen


SKILLS_FORMAT_VERSION = 3  # the first version with skill groups


def format_version(positions: Positions) -> int:
    """The oldest format that can say these positions, so older readers keep reading what they can:
    1 knows ``f{p}+l{s}`` only; 2 adds ``p`` (every prompt token) and ``g`` (every generated token);
    3 adds skill groups (Patch.metadata raises a patch with skills to 3)."""
    return 2 if positions.prompt or positions.generated else 1


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16"}


def serialize_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The safetensors layout with keys in sorted order, so equal patches are equal bytes
    (the safetensors library orders metadata by a per-process hash)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)


def payload_digest(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """sha256 over the metadata (every key but payload_sha256, as sorted JSON), then
    (name, dtype, shape, little-endian bytes) of every tensor in name order."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "payload_sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(json.dumps([name, array.dtype.name, list(array.shape)]).encode())
        digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()


def _read_metadata(data: bytes, source: str) -> dict[str, str]:
    if len(data) < 8:
        raise PatchFormatError(
            f"{source}: {len(data)} bytes is too short for a safetensors file; "
            "pass a .reft file written by reft-edge train"
        )
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise PatchFormatError(
            f"{source}: header length {header_len} is impossible for a {len(data)}-byte file; "
            "the file is truncated or not a patch"
        )
    try:
        header = loads_bounded(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PatchFormatError(f"{source}: header is not valid JSON; the file is damaged or not a patch") from None
    except _TooDeep:
        raise PatchFormatError(
            f"{source}: header nests deeper than {MAX_JSON_DEPTH} levels; the file is damaged or not a patch"
        ) from None
    metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PatchFormatError(
            f"{source}: no reft-edge metadata in the header; pass a .reft file written by reft-edge train"
        )
    return metadata


def _parse_metadata(metadata: dict[str, str], source: str) -> dict[str, Any]:
    def bad(key: str, expected: str) -> PatchFormatError:
        return PatchFormatError(
            f"{source}: metadata {key!r} is {shown(metadata.get(key))}, expected {expected}; "
            "the file is damaged, re-train or copy it again"
        )

    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise PatchFormatError(
            f"{source}: metadata lacks {', '.join(missing)}; pass a .reft file written by reft-edge train"
        )
    values = {}
    for key in _REQUIRED_METADATA:
        try:
            values[key] = loads_bounded(metadata[key])
        except json.JSONDecodeError:
            raise bad(key, "a JSON value") from None
        except _TooDeep:
            raise bad(key, f"JSON nested at most {MAX_JSON_DEPTH} levels deep") from None
    if values["format"] != PATCH_FORMAT:
        raise bad("format", repr(PATCH_FORMAT))
    if type(values["format_version"]) is not int or not 1 <= values["format_version"] <= PATCH_FORMAT_VERSION:
        raise PatchFormatError(
            f"{source}: format version {shown(values['format_version'])}, this reft-edge reads version "
            f"{PATCH_FORMAT_VERSION}; upgrade reft-edge or re-train the patch"
        )
    if not isinstance(values["kind"], str) or values["kind"] not in KIND_TENSORS:
        raise bad("kind", f"one of {', '.join(KINDS)}")
    for key in ("rank", "hidden_size"):
        if type(values[key]) is not int or not 1 <= values[key] <= MAX_RANK:
            raise bad(key, f"a whole number from 1 to {MAX_RANK}")
    if values["rank"] > values["hidden_size"]:
        raise bad("rank", "at most hidden_size")
    for key in ("name", "base_fingerprint"):
        if not isinstance(values[key], str):
            raise bad(key, "a string")
    if not isinstance(values["share_weights"], bool):
        raise bad("share_weights", "true or false")
    if values["dtype"] not in SAVE_DTYPES:
        raise bad("dtype", f"one of {', '.join(SAVE_DTYPES)}")
    if not isinstance(values["payload_sha256"], str) or len(values["payload_sha256"]) != 64:
        raise bad("payload_sha256", "64 hex digits")
    if not isinstance(values["training"], dict):
        raise bad("training", "a JSON object")
    if not isinstance(values["positions"], str):
        raise bad("positions", "a string like 'f1+l1'")
    try:
        values["positions"] = Positions.parse(values["positions"])
    except Exception:
        raise bad("positions", "a string like 'f1+l1'") from None
    if format_version(values["positions"]) > values["format_version"]:
        raise bad("positions", f"positions that format version {values['format_version']} can express")
    entries = values["interventions"]
    if (
        not isinstance(entries, list)
        or not entries
        or not all(
            isinstance(e, dict)
            and set(e) == {"layer", "where"}
            and type(e["layer"]) is int
            and 0 <= e["layer"] < MAX_LAYER
            and e["where"] in WHERE
            for e in entries
        )
    ):
        raise bad("interventions", "a non-empty list of {layer, where} objects")
    groups = ("both",) if values["share_weights"] else values["positions"].groups()
    if any(e["where"] not in groups for e in entries):
        raise bad(
            "interventions",
            f"'where' among {list(groups)} (the groups of positions "
            f"{values['positions']} with share_weights {values['share_weights']})",
        )
    if not isinstance(values["layers"], list) or values["layers"] != sorted({e["layer"] for e in entries}):
        raise bad("layers", "the sorted layers of the interventions")
    values["skills"] = _parse_skills(metadata, values, bad)
    return values


def _parse_skills(metadata: dict[str, str], values: dict[str, Any], bad: Any) -> tuple[tuple[str, int], ...]:
    """Optional ``skills``: [{"name", "rank"}, ...] splitting the rank rows in order (version 3 only)."""
    if "skills" not in metadata:
        return ()
    try:
        skills = loads_bounded(metadata["skills"])
    except json.JSONDecodeError:
        raise bad("skills", "a JSON value") from None
    except _TooDeep:
        raise bad("skills", f"JSON nested at most {MAX_JSON_DEPTH} levels deep") from None
    expected = f"a list of {{name, rank}} objects with distinct names whose ranks add up to rank {values['rank']}"
    if values["format_version"] < SKILLS_FORMAT_VERSION:
        raise bad("format_version", f"{SKILLS_FORMAT_VERSION} (the file has skills)")
    if (
        not isinstance(skills, list)
        or not skills
        or not all(
            isinstance(s, dict)
            and set(s) == {"name", "rank"}
            and isinstance(s["name"], str)
            and SKILL_NAME.fullmatch(s["name"])
            and type(s["rank"]) is int
            and s["rank"] >= 1
            for s in skills
        )
    ):
        raise bad("skills", expected)
    if len({s["name"] for s in skills}) != len(skills) or sum(s["rank"] for s in skills) != values["rank"]:
        raise bad("skills", expected)
    return tuple((s["name"], s["rank"]) for s in skills)


def _read_tensors(data: bytes, source: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(data)
    except (SafetensorError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PatchFormatError(f"{source}: tensor data is damaged ({reason}); copy the file again") from None


def _check_tensors(tensors: dict[str, np.ndarray], fields: dict[str, Any], source: str) -> None:
    names = KIND_TENSORS[fields["kind"]]
    expected = {f"interventions.{i}.{n}" for i in range(len(fields["interventions"])) for n in names}
    if set(tensors) != expected:
        raise PatchFormatError(
            f"{source}: tensors {sorted(set(tensors) ^ expected)[:4]} are missing or unexpected for kind "
            f"{fields['kind']!r}; the file is damaged, re-train it"
        )
    rank, hidden = fields["rank"], fields["hidden_size"]
    for name, array in tensors.items():
        shape = (rank,) if name.endswith(".b") else (rank, hidden)
        if array.shape != shape:
            raise PatchFormatError(
                f"{source}: tensor {name} has shape {list(array.shape)}, expected "
                f"{list(shape)}; the file is damaged, re-train it"
            )
        if array.dtype.name != fields["dtype"]:
            raise PatchFormatError(
                f"{source}: tensor {name} is {array.dtype.name}, metadata says "
                f"{fields['dtype']}; the file is damaged, re-train it"
            )
        if not np.isfinite(array).all():
            raise PatchFormatError(
                f"{source}: tensor {name} holds NaN or infinite values; re-train the patch (lower --lr)"
            )
