"""Damaged and hostile patch files: every one must end in a PatchError subclass.

From one valid patch the generator makes 200+ damaged files (empty, random bytes,
truncations, flipped bits, corrupted headers, absurd header lengths, NaN/Inf values,
grown shapes, wrong dtypes, missing or mutated metadata, another base, a pickle that
would run code, a directory, a missing path). Crafted files carry a correct digest, so
they exercise the validation behind it, not just the digest.
"""

from __future__ import annotations

import json
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from reft_edge.errors import PatchError
from reft_edge.runtime.patch import Intervention, Patch, payload_digest, serialize_safetensors
from reft_edge.runtime.positions import Positions

HIDDEN, RANK = 64, 4
PWNED = Path("/tmp/reft-edge-fuzz-pwned")


def valid_patch(base_fingerprint: str = "a" * 64) -> Patch:
    rng = np.random.default_rng(0)

    def params():
        return {
            "R": np.linalg.qr(rng.normal(size=(HIDDEN, RANK)))[0].T.astype(np.float32),
            "W": rng.normal(size=(RANK, HIDDEN)).astype(np.float32),
            "b": rng.normal(size=RANK).astype(np.float32),
        }

    return Patch(
        name="victim",
        kind="loreft",
        positions=Positions(2, 2),
        share_weights=False,
        rank=RANK,
        hidden_size=HIDDEN,
        base_fingerprint=base_fingerprint,
        interventions=(Intervention(0, "prefix", params()), Intervention(1, "suffix", params())),
        training={"steps": 3, "final_loss": 1.5, "seconds": None},
        skills=(("caps", 3), ("meow", 1)),
    )


def signed(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A file with a correct digest for whatever tensors and metadata it is given."""
    metadata = dict(metadata)
    metadata["payload_sha256"] = json.dumps(payload_digest(tensors, metadata))
    return serialize_safetensors_any(tensors, metadata)


def serialize_safetensors_any(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Like the writer, but for any dtype (the writer itself only writes float32/float16)."""
    names = {"float64": "F64", "int32": "I32", "int64": "I64", "uint8": "U8", "float32": "F32", "float16": "F16"}
    header: dict = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name]).tobytes()
        header[name] = {
            "dtype": names[tensors[name].dtype.name],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (PWNED,))


def damaged_cases(patch: Patch) -> list[tuple[str, bytes | str]]:
    """(label, file bytes) pairs; a str value is a special path case ('directory', 'missing')."""
    rng = random.Random(1234)
    good = patch.to_bytes()
    tensors, metadata = patch.tensors(), {k: v for k, v in patch.metadata().items() if k != "payload_sha256"}
    header_len = struct.unpack("<Q", good[:8])[0]
    cases: list[tuple[str, bytes | str]] = [
        ("empty", b""),
        ("directory", "directory"),
        ("missing", "missing"),
        ("pickle", pickle.dumps(_RunsCode())),
        ("pickle-named-safetensors", b"\x80\x04" + pickle.dumps(_RunsCode())),
    ]
    cases += [(f"random-{n}", rng.randbytes(n)) for n in (1, 7, 8, 9, 64, 500, 4096, len(good))]
    cases += [(f"random-with-header-{i}", good[:8] + rng.randbytes(len(good) - 8)) for i in range(4)]
    cases += [(f"truncated-{cut}", good[:cut]) for cut in sorted(rng.sample(range(1, len(good)), 60))]
    for _ in range(40):
        at = rng.randrange(8 + header_len, len(good))
        flipped = bytearray(good)
        flipped[at] ^= 1 << rng.randrange(8)
        cases.append((f"payload-bit-{at}", bytes(flipped)))
    for _ in range(40):
        at = rng.randrange(8, 8 + header_len)
        corrupted = bytearray(good)
        corrupted[at] = rng.choice([c for c in b'{}[]":,0123456789abcdefxyz \x00\xff' if c != corrupted[at]])
        cases.append((f"header-byte-{at}", bytes(corrupted)))
    for length in (0, 1, header_len - 1, header_len + 1, len(good), 2**31, 2**63, 2**64 - 1):
        cases.append((f"header-length-{length}", struct.pack("<Q", length) + good[8:]))
    first = "interventions.0.R"
    for label, value in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
        poisoned = dict(tensors)
        poisoned[first] = tensors[first].copy()
        poisoned[first][0, 0] = value
        cases.append((f"crafted-{label}", signed(poisoned, metadata)))
    for name in tensors:
        grown = dict(tensors)
        grown[name] = np.concatenate([tensors[name], tensors[name][:1]])
        cases.append((f"crafted-grown-{name}", signed(grown, metadata)))
        cases.append((f"crafted-missing-{name}", signed({k: v for k, v in tensors.items() if k != name}, metadata)))
        for dtype in ("float64", "int32", "uint8"):
            cases.append((f"crafted-{dtype}-{name}", signed({**tensors, name: tensors[name].astype(dtype)}, metadata)))
    cases.append(("crafted-extra-tensor", signed({**tensors, "interventions.9.R": tensors[first]}, metadata)))
    cases.append(("crafted-no-tensors", signed({}, metadata)))
    for key in metadata:
        if key == "skills":  # optional: without it the rows are one unnamed skill, a sound patch
            continue
        cases.append((f"crafted-missing-meta-{key}", signed(tensors, {k: v for k, v in metadata.items() if k != key})))
        cases.append(
            (
                f"unsigned-missing-meta-{key}",
                serialize_safetensors(tensors, {k: v for k, v in patch.metadata().items() if k != key}),
            )
        )
    mutations = {
        "format": ['"safetensors"', '"reft-edge-patch2"', "null", "1"],
        "format_version": ["4", "2", "0", '"1"', "1.0", "true", "null"],
        "name": ["1", "null", "[]"],
        "kind": ['"lora"', '"LOREFT"', "1", "null", '["loreft"]'],
        "layers": ["[0]", "[1, 0]", "[]", '"0,1"', "[-1]", "null", "[0, 1, 2]"],
        "positions": ['"f2l2"', '"x"', "2", "null", '""', '"f0"', '"l1+g"', '"g+f1"'],
        "share_weights": ['"false"', "0", "null"],
        "rank": ["0", "-4", "3", "5", "1e9", '"4"', "4.0", "null", "[4]", "65", "true"],
        "hidden_size": ["0", "63", "-64", '"64"', "null", "1099511627776"],
        "base_fingerprint": ["null", "1", "[]"],
        "dtype": ['"float64"', '"bfloat16"', '"int8"', "null", "32"],
        "interventions": [
            "[]",
            "null",
            '[{"layer": 0, "where": "prefix"}]',
            '[{"layer": 0, "where": "middle"}, {"layer": 1, "where": "suffix"}]',
            '[{"layer": "0", "where": "prefix"}, {"layer": 1, "where": "suffix"}]',
            '[{"layer": 0}, {"layer": 1, "where": "suffix"}]',
            '[{"layer": 99999, "where": "prefix"}, {"layer": 1, "where": "suffix"}]',
            '{"layer": 0, "where": "prefix"}',
        ],
        "training": ["null", "[]", '"fast"', "3"],
        "skills": [
            "null",
            "[]",
            '{"caps": 3, "meow": 1}',
            '[{"name": "caps", "rank": 4}, {"name": "meow", "rank": 1}]',
            '[{"name": "caps", "rank": 3}]',
            '[{"name": "caps", "rank": 3}, {"name": "caps", "rank": 1}]',
            '[{"name": "", "rank": 3}, {"name": "meow", "rank": 1}]',
            '[{"name": "caps", "rank": 3.0}, {"name": "meow", "rank": 1}]',
            '[{"name": "caps", "rank": 4}, {"name": "meow", "rank": 0}]',
            '[{"name": "caps"}, {"name": "meow", "rank": 1}]',
            '"caps,meow"',
        ],
    }
    for key, values in mutations.items():
        for value in values:
            cases.append((f"crafted-meta-{key}={value}", signed(tensors, {**metadata, key: value})))
        cases.append((f"crafted-meta-{key}-not-json", signed(tensors, {**metadata, key: "{not json"})))
    return cases


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    from reft_edge.runtime import Runtime

    return Runtime.load(tiny_bundle)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, runtime) -> list[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("damaged")
    files = []
    for i, (label, content) in enumerate(damaged_cases(valid_patch(runtime.manifest.base_fingerprint))):
        path = folder / f"{i:03d}.reft"
        if content == "directory":
            path.mkdir()
        elif content != "missing":
            path.write_bytes(content)
        files.append((label, path))
    return files


def _outcomes(cases: list[tuple[str, Path]], use) -> tuple[int, list, list]:
    typed, other, accepted = 0, [], []
    for label, path in cases:
        try:
            use(path)
            accepted.append(label)
        except PatchError as exc:
            typed += 1
            assert str(path) in str(exc) and "\n" not in str(exc), (label, exc)
        except Exception as exc:  # any other exception is what this test is looking for
            other.append((label, repr(exc)))
    return typed, other, accepted


@pytest.mark.parametrize("use", ["Patch.load", "generate"])
def test_every_damaged_patch_is_a_patch_error(use, damaged, runtime, tmp_path, capsys):
    PWNED.unlink(missing_ok=True)
    cases = list(damaged)
    if use == "generate":  # a sound file for another base is damaged as far as this bundle goes
        other_base = tmp_path / "other-base.reft"
        valid_patch("b" * 64).to_file(other_base)
        cases.append(("other-base", other_base))
    run = {
        "Patch.load": Patch.load,
        "generate": lambda path: runtime.generate("hello", patches=[path], max_new_tokens=1),
    }[use]
    typed, other, accepted = _outcomes(cases, run)
    with capsys.disabled():
        print(
            f"\npatch fuzz ({use}): {len(cases)} cases, {typed} typed errors, {len(other)} other exceptions, "
            f"{len(accepted)} accepted damaged"
        )
    assert len(cases) >= 200
    assert not other and not accepted, (other[:5], accepted[:5])
    assert not PWNED.exists(), "loading a patch ran code"


def test_the_undamaged_patch_generates(runtime, tmp_path):
    path = tmp_path / "ok.reft"
    valid_patch(runtime.manifest.base_fingerprint).to_file(path)
    assert runtime.generate("hello", patches=[path], max_new_tokens=2).token_ids


def test_the_undamaged_patch_loads(tmp_path):
    patch = valid_patch()
    loaded = Patch.load(patch.to_file(tmp_path / "ok.reft") and tmp_path / "ok.reft")
    assert loaded == patch
