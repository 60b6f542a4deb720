"""Hostile input and faults (issue 26): what a careless or hostile user can throw at reft-edge.

Each case ends in one of the promised outcomes (docs/hostile-input.md): a one-line error and exit
2 with nothing written, or a 4xx from the web server, which keeps serving and never returns a
file outside its folders. Structured inputs (patch metadata, manifests, JSONL lines, HTTP paths)
are also generated with Hypothesis. Only tiny models; nothing here loads the default model.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st
from test_patch_fuzz import signed, valid_patch

from conftest import write_jsonl
from reft_edge.cli import main, printable
from reft_edge.constants import BUNDLE_SCHEMA_VERSION
from reft_edge.errors import BundleError, DataError, ModelError, PatchError, PatchFormatError, UsageError
from reft_edge.files import atomic_dir, check_output_path, remove_stale_temporaries, writer_file
from reft_edge.runtime.bundle import Manifest
from reft_edge.runtime.patch import MAX_JSON_DEPTH, Intervention, Patch

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "runtime" / "web"
SECRET = "reft-edge-secret-7f3a"  # the content of a file outside every served folder
NODE_OK = shutil.which("node") is not None and (WEB / "node_modules" / "onnxruntime-web").is_dir()
needs_node = pytest.mark.skipif(not NODE_OK, reason="node or runtime/web/node_modules missing (make web)")
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line_exit_2(result) -> str:
    """The CLI's promise for a user error: exit 2, one 'error:' line (or click's usage error), no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, result.output
    return errors[0]


def fake_manifest(**changes) -> dict:
    """A manifest of the right shape for a bundle that holds no real model (enough to be served)."""
    values = {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "tool_version": "0.1.0",
        "source_model": "fake",
        "base_fingerprint": "a" * 64,
        "architecture": "llama",
        "hidden_size": 64,
        "num_layers": 3,
        "vocab_size": 320,
        "slot_layers": [0, 1, 2],
        "kv": {"num_layers": 3, "num_kv_heads": 2, "head_dim": 16, "dtype": "float32"},
        "inputs": ["input_ids"],
        "outputs": ["logits"],
        "precision": "fp32",
        "context_length": 256,
        "files": {"model": "model.onnx", "tokenizer": "tokenizer.json"},
        "special_tokens": {"eos_token": "<|im_end|>", "eos_token_ids": [2], "pad_token_id": 0},
        "generation": {},
        "graph": "fused",
        "size_bytes": 0,
        "verification": {},
    }
    return {**values, **changes}


def fake_bundle(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(fake_manifest(**changes)))
    (folder / "model.onnx").write_bytes(b"not a model")
    (folder / "tokenizer.json").write_text("{}")
    return folder


# == 1-3. serve-web ===================================================================================


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The real server (reft-edge serve-web, i.e. node serve.js) on 127.0.0.1, for a bundle folder
    holding links that leave it: (url, port, bundle)."""
    if not NODE_OK:
        pytest.skip("node or runtime/web/node_modules missing (make web)")
    from reft_edge.runtime.web_server import serving

    top = tmp_path_factory.mktemp("served")
    (top / "secret.txt").write_text(SECRET)
    bundle = fake_bundle(top / "bundle")
    (bundle / "rootlink").symlink_to("/")
    (bundle / "secret.json").symlink_to(top / "secret.txt")
    (bundle / "up").symlink_to("..")
    (bundle / "inside.json").symlink_to(bundle / "manifest.json")  # a link that stays inside: served
    patch = top / "p.reft"
    patch.write_bytes(b"patch bytes")
    with serving(bundle, [patch]) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        yield url, port, bundle


def raw_request(port: int, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes; (status code, whole answer). Bypasses every client's own URL checks."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0
    return status, answer


def get(port: int, path: str) -> tuple[int, bytes]:
    return raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))


def assert_still_serving(port: int) -> None:
    status, answer = get(port, "/bundle/manifest.json")
    assert status == 200 and b'"schema_version"' in answer


OUTSIDE = [
    "/bundle/rootlink/etc/passwd",
    "/bundle/secret.json",
    "/bundle/up/secret.txt",
    "/bundle/up/bundle/../secret.txt",
    "/bundle/rootlink/",
    "/bundle/%72ootlink/etc/passwd",
    "/bundle/up%2fsecret.txt",
    "/bundle/..%2fsecret.txt",
    "/bundle/../secret.txt",
    "/web/../../../etc/passwd",
    "/patches/../secret.txt",
    "/%2e%2e/%2e%2e/etc/passwd",
]


@pytest.mark.parametrize("path", OUTSIDE)
def test_serve_web_never_returns_a_file_outside_its_folders(served, path):
    _, port, _ = served
    status, answer = get(port, path)
    assert status == 404, (path, answer[:200])
    assert SECRET.encode() not in answer and b"root:" not in answer
    assert_still_serving(port)


def test_serve_web_follows_links_that_stay_inside(served):
    _, port, _ = served
    status, answer = get(port, "/bundle/inside.json")
    assert status == 200 and b'"schema_version"' in answer
    assert get(port, "/patches/p.reft")[0] == 200 and b'["p.reft"]' in get(port, "/patches/index.json")[1]


BAD_REQUESTS = [
    b"GET /% HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /patches/%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /bundle/%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /web/%c0%af HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /bundle/%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET http://[::1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET http://[::1 HTTP/1.1\r\n\r\n",
    b"BREW /pot HTTP/1.1\r\n\r\n",
    b"NONSENSE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_serve_web_answers_bad_requests_with_4xx_and_keeps_serving(served, request_bytes):
    _, port, _ = served
    status, _ = raw_request(port, request_bytes)
    assert 400 <= status < 500, status
    assert_still_serving(port)


_SEGMENTS = st.sampled_from(
    [
        "..",
        ".",
        "%2e%2e",
        "%2e",
        "%2f",
        "%5c",
        "%",
        "%z",
        "%zz",
        "%00",
        "%c0%ae",
        "%ff",
        "rootlink",
        "up",
        "etc",
        "passwd",
        "secret.json",
        "secret.txt",
        "manifest.json",
        "inside.json",
        "",
        "\\..",
        "..;",
        "%252e%252e",
        "bundle",
        "web",
        "patches",
    ]
)


@QUICK
@given(
    route=st.sampled_from(["/bundle/", "/web/", "/patches/", "/"]),
    segments=st.lists(st.one_of(_SEGMENTS, st.text(max_size=6)), max_size=8),
)
def test_serve_web_property_any_path_stays_inside(served, route, segments):
    _, port, _ = served
    path = route + "/".join(quote(s, safe="%.\\;") for s in segments)
    status, answer = get(port, path)
    assert status in (200, 400, 404), (path, status)
    assert SECRET.encode() not in answer and b"root:x:" not in answer, path


def test_serve_web_port_in_use_and_unknown_host_are_one_line(served, tmp_path):
    _, port, bundle = served
    for extra, expected in (
        (["--port", str(port)], "already in use"),
        (["--port", "0", "--host", "nope.invalid"], "--host nope.invalid is not an address"),
        (["--host"], "--host needs a value"),
    ):
        done = subprocess.run(
            ["node", str(WEB / "serve.js"), str(bundle), *extra], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().count("\n") == 0 and expected in done.stderr, done.stderr
    # the same through the CLI, which becomes node (execv)
    done = subprocess.run(
        [sys.executable, "-m", "reft_edge.cli", "serve-web", str(bundle), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "already in use" in done.stderr
    assert_still_serving(port)


# == 4. inspect escapes what it shows ====================================================================


def test_inspect_escapes_control_characters(tmp_path):
    from dataclasses import replace

    evil = "evil\n\x1b[31mRED\x1b[0m\r\u202eabc"
    patch = replace(valid_patch(), name=evil, training={"steps": "\x1b]0;pwned\x07", "examples": 1, "final_loss": 1})
    path = tmp_path / "evil.reft"
    patch.to_file(path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert not any(ch in result.output for ch in "\x1b\r\x07\u202e")
    assert len(result.output.splitlines()) == 4 and "evil\\n\\x1b[31mRED" in result.output
    as_json = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert "\x1b" not in as_json.output and json.loads(as_json.output)["name"] == evil


@given(st.text())
def test_printable_property_leaves_no_control_characters(text):
    shown = printable(text)
    assert not any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F or 0xD800 <= ord(ch) <= 0xDFFF for ch in shown)
    shown.encode("utf-8")


# == 5-6. nothing invalid is written; non-finite options fail at parse time ==============================


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--data", "d.jsonl", "--out", "o.reft", "--lr", "inf"],
        ["train", "--data", "d.jsonl", "--out", "o.reft", "--lr", "nan"],
        ["train", "--data", "d.jsonl", "--out", "o.reft", "--val-fraction", "nan"],
        ["train", "--data", "d.jsonl", "--out", "o.reft", "--seed", str(2**64)],
        ["train", "--data", "d.jsonl", "--out", "o.reft", "--seed", "-1"],
        ["train-many", "--jobs", "j.jsonl", "--out-dir", "d", "--seed", str(2**64)],
        ["run", "bundle", "hi", "--weight", "1e39"],
        ["run", "bundle", "hi", "--weight", "-inf"],
        ["run", "bundle", "hi", "--seed", "-5"],
        ["run", "bundle", "hi", "--temperature", "nan"],
        ["chat", "bundle", "--top-p", "inf"],
        ["convert", "a.reft", "--bundle", "b", "--to", "onnx-adapter", "--out", "o", "--weight", "1e39"],
        ["import", "control-vector", "v.gguf", "--out", "o.reft", "--scale", "inf"],
        ["import", "control-vector", "v.gguf", "--out", "o.reft", "--scale", "1e40"],
    ],
)
def test_unusable_numbers_fail_at_parse_time(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_exit_2(CliRunner().invoke(main, args))
    assert "Invalid value" in line
    assert list(tmp_path.iterdir()) == []  # nothing written


def nan_patch(value: float, dtype=np.float32) -> Patch:
    patch = valid_patch()
    first = patch.interventions[0]
    params = {**first.params, "W": np.full_like(first.params["W"], value, dtype=dtype)}
    return Patch(
        **{
            **patch.__dict__,
            "interventions": (Intervention(first.layer, first.where, params), *patch.interventions[1:]),
        }
    )


@pytest.mark.parametrize(
    "value,dtype", [(math.nan, np.float32), (math.inf, np.float32), (1e300, np.float64), (1e39, np.float64)]
)
def test_patch_is_validated_before_it_is_written(tmp_path, value, dtype):
    out = tmp_path / "bad.reft"
    with pytest.raises(PatchFormatError, match="not written.*NaN or infinite.*lower --lr"):
        nan_patch(value, dtype).to_file(out)
    with pytest.raises(PatchFormatError, match="--scale"):
        nan_patch(value, dtype).to_file(out, fix="give a smaller --scale")
    assert list(tmp_path.iterdir()) == []


def test_control_vector_too_large_names_scale(tmp_path, tiny_backbone):
    from test_import import write_control_vector

    from reft_edge.train.interop import import_control_vector

    vector = write_control_vector(tmp_path / "v.gguf", {1: np.full(64, 1e30, np.float32)})
    with pytest.raises(PatchFormatError, match=r"--scale 1e\+30 makes the steering vector too large.*smaller --scale"):
        import_control_vector(vector, scale=1e30, out=tmp_path / "o.reft", backbone=tiny_backbone)
    assert not (tmp_path / "o.reft").exists()


# == 7. a killed export's temporary folder is swept by the next one =====================================

_KILLED_WRITER = """
import sys, time
from pathlib import Path
from reft_edge.files import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.onnx").write_bytes(b"partial" * 1000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_temporaries_of_a_killed_writer_are_swept(tmp_path):
    final = tmp_path / "bundle"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    tmp = Path(writer.stdout.readline().strip())
    assert tmp.is_dir() and writer_file(tmp).read_text().strip() == str(writer.pid)
    assert remove_stale_temporaries(final) == []  # its writer runs: left alone
    writer.send_signal(signal.SIGKILL)  # no cleanup runs
    writer.wait()
    assert tmp.is_dir()
    assert remove_stale_temporaries(final) == [tmp]
    assert not tmp.exists() and not writer_file(tmp).exists()


def test_sweep_keeps_live_writers_and_fresh_folders_without_pid(tmp_path):
    final = tmp_path / "bundle"
    live, legacy, dead = (tmp_path / f".bundle.{tag}.tmp" for tag in ("live", "legacy", "dead"))
    for folder in (live, legacy, dead):
        folder.mkdir()
    writer_file(live).write_text(f"{os.getpid()}\n")
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    writer_file(dead).write_text(done.stdout)  # a process that has exited
    assert remove_stale_temporaries(final) == [dead]
    assert live.is_dir() and legacy.is_dir()
    with atomic_dir(final) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".bundle.live.tmp", ".bundle.live.tmp.pid", ".bundle.legacy.tmp", "bundle"]
    )
    assert [p.name for p in final.iterdir()] == ["x"]  # the PID file never ends up in the result


def test_next_export_sweeps_a_killed_exports_folder(tmp_path, tiny_backbone, tiny_bundle):
    """The leftover of an export killed with SIGKILL beside a bundle goes at the next export of it
    (here an up-to-date one, which sweeps and then returns without rebuilding)."""
    from reft_edge.export import ExportConfig, export_bundle

    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tiny_bundle)], stdout=subprocess.PIPE, text=True
    )
    leftover = Path(writer.stdout.readline().strip())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert leftover.is_dir() and leftover.parent == tiny_bundle.parent
    export_bundle(ExportConfig(model=tiny_backbone.path, out=str(tiny_bundle)), backbone=tiny_backbone, progress=False)
    assert not leftover.exists() and not writer_file(leftover).exists()
    Manifest.from_dir(tiny_bundle)


# == 8, 14. output paths are checked before any work ========================================================


def test_output_paths_are_checked_first(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        (tmp_path / "adir", "is a folder"),
        (tmp_path / "afile" / "o.reft", "is a file, not a folder"),
        (tmp_path / "missing" / "o.reft", "does not exist"),
    ]
    for out, message in cases:
        with pytest.raises(UsageError, match=message):
            check_output_path(out)
    with pytest.raises(UsageError, match="is a file"):
        check_output_path(tmp_path / "afile", folder=True)
    check_output_path(tmp_path / "new" / "deeper", folder=True)  # export makes missing parents


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
def test_read_only_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(UsageError, match="permission denied"):
        check_output_path(locked / "o.reft")


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "nope.jsonl", "--out", "adir"], "is a folder"),
        (["train", "--data", "nope.jsonl", "--out", "afile/o.reft"], "is a file, not a folder"),
        (["import", "pyreft", "nope", "--positions", "l1", "--out", "missing/o.reft"], "does not exist"),
        (["import", "control-vector", "nope.gguf", "--out", "adir"], "is a folder"),
        (["export", "--out", "afile/bundle"], "is a file, not a folder"),
        (["train-many", "--jobs", "nope.jsonl", "--out-dir", "new-out"], "nope.jsonl"),
        (["train-many", "--jobs", "jobs.jsonl", "--out-dir", "afile"], "is a file"),
        (["train-many", "--jobs", "jobs.jsonl", "--out-dir", "afile/sub"], "is a file, not a folder"),
        (
            ["train-many", "--jobs", "inf.jsonl", "--out-dir", "new-out"],
            "inf.jsonl:1: --lr inf must be a positive number up to 10",
        ),
        (["train-many", "--jobs", "seed.jsonl", "--out-dir", "new-out"], "seed.jsonl:1: --seed -3 is not a seed"),
    ],
)
def test_bad_destinations_fail_before_work_and_leave_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    write_jsonl(tmp_path / "jobs.jsonl", [{"id": "a", "data": "d.jsonl"}])
    (tmp_path / "inf.jsonl").write_text('{"id": "a", "data": "d.jsonl", "lr": Infinity}\n')
    write_jsonl(tmp_path / "seed.jsonl", [{"id": "a", "data": "d.jsonl", "seed": -3}])
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_line_exit_2(CliRunner().invoke(main, args))
    assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out-dir, no patch


def test_train_many_one_bad_person_keeps_the_others(tmp_path, tiny_model_dir, monkeypatch):
    """A person whose patch cannot be written (its tensors went NaN) fails alone: the others' patches and
    summary.json are written, and no NaN patch is left. (Training on a tiny model with any --lr the
    parser accepts stays finite, so the NaN is injected where training hands over the patch.)"""
    import reft_edge.train.many as many

    real_save = many.save_patch

    def save_patch(config, *args, **kwargs):
        if Path(config.out).stem == "wild":
            return nan_patch(math.nan).to_file(config.out)
        return real_save(config, *args, **kwargs)

    monkeypatch.setattr(many, "save_patch", save_patch)
    questions = ["What is the weather like today?", "How do I bake a cake?", "Tell me about your weekend."]
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "response": "It is sunny."} for q in questions])
    write_jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"id": "good", "data": str(data)},
            {"id": "wild", "data": str(data)},
            {"id": "also-good", "data": str(data), "seed": 1},
        ],
    )
    result = CliRunner().invoke(
        main,
        [
            "train-many",
            "--jobs",
            str(tmp_path / "jobs.jsonl"),
            "--out-dir",
            str(tmp_path / "out"),
            "--model",
            str(tiny_model_dir("llama")),
            "--steps",
            "4",
            "--layers",
            "1",
            "--batch-size",
            "3",
        ],
    )
    line = one_line_exit_2(result)
    assert "1 of 3 people failed, the first wild" in line and "NaN or infinite" in line
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(p["id"], p["status"]) for p in summary["people"]] == [
        ("good", "trained"),
        ("wild", "failed"),
        ("also-good", "trained"),
    ]
    Patch.from_file(tmp_path / "out" / "good.reft")
    assert not (tmp_path / "out" / "wild.reft").exists()


# == 9. deep or huge metadata ==============================================================================


def _deep(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def test_deep_header_and_deep_training_are_format_errors(tmp_path):
    header = b"[" * 500_000 + b"]" * 500_000
    deep_header = struct.pack("<Q", len(header)) + header
    patch = valid_patch()
    metadata = {k: v for k, v in patch.metadata().items() if k != "payload_sha256"}
    deep_training = signed(patch.tensors(), {**metadata, "training": _deep(100_000)})
    huge_name = signed(patch.tensors(), {**metadata, "name": json.dumps(["x" * 300_000])})
    for label, data, message in (
        ("deep-header", deep_header, f"header nests deeper than {MAX_JSON_DEPTH} levels"),
        ("deep-training", deep_training, f"JSON nested at most {MAX_JSON_DEPTH} levels deep"),
        ("huge-name", huge_name, "expected a string"),
    ):
        path = tmp_path / f"{label}.reft"
        path.write_bytes(data)
        with pytest.raises(PatchFormatError) as caught:
            Patch.from_file(path)
        assert message in str(caught.value) and len(str(caught.value)) < 600
        line = one_line_exit_2(CliRunner().invoke(main, ["inspect", str(path)]))
        assert message in line
        if NODE_OK:
            assert js_patch_error(path) == {"name": "PatchFormatError", "message": str(caught.value)}


_JS_PARSE = """
import { readFileSync } from "fs";
const { parsePatch } = await import(process.argv[1] + "/patch.js");
try { await parsePatch(readFileSync(process.argv[2]), process.argv[2]); console.log(JSON.stringify(null)); }
catch (e) { console.log(JSON.stringify({ name: e.name, message: e.message })); }
"""


def js_patch_error(path: Path) -> dict | None:
    done = subprocess.run(
        ["node", "--input-type=module", "-e", _JS_PARSE, str(WEB), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_METADATA_VALUE = st.one_of(
    _JSON.map(json.dumps),
    st.integers(1, 3000).map(_deep),
    st.text(max_size=30),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
)


@settings(max_examples=150, deadline=None)
@given(
    key=st.sampled_from(
        [
            "name",
            "kind",
            "layers",
            "positions",
            "share_weights",
            "rank",
            "hidden_size",
            "base_fingerprint",
            "dtype",
            "interventions",
            "training",
            "skills",
            "format_version",
        ]
    ),
    value=_METADATA_VALUE,
)
def test_patch_metadata_property_typed_error_or_valid(key, value):
    patch = valid_patch()
    metadata = {k: v for k, v in patch.metadata().items() if k != "payload_sha256"}
    data = signed(patch.tensors(), {**metadata, key: value})
    try:
        loaded = Patch.from_bytes(data, source="fuzzed.reft")
    except PatchError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600
        return
    printable(loaded.summary())  # a patch that loads can be shown
    json.dumps(loaded.summary())


# == 10. manifests ===========================================================================================


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"files": ["model.onnx"]}, "files"),
        ({"context_length": "256"}, "context_length"),
        ({"special_tokens": {"eos_token_ids": ["2"]}}, "special_tokens"),
        ({"special_tokens": {"pad_token_id": "0"}}, "special_tokens"),
        ({"kv": {"num_layers": 3}}, "kv lacks"),
        ({"kv": {"num_layers": "3", "num_kv_heads": 2, "head_dim": 16, "dtype": "float32"}}, "kv.num_layers"),
        ({"slot_layers": "0,1"}, "slot_layers"),
        ({"hidden_size": 6.4}, "hidden_size"),
        ({"generation": {"temperature": "hot"}}, "generation"),
        ({"verification": _deep(10_000)}, "nests deeper"),
    ],
)
def test_manifest_with_wrong_types_is_one_line(tmp_path, changes, field):
    bundle = fake_bundle(tmp_path / "b")
    values = json.loads((bundle / "manifest.json").read_text())
    text = json.dumps({**values, **changes})
    if isinstance(changes.get("verification"), str):
        text = text.replace(json.dumps(changes["verification"]), changes["verification"])
    (bundle / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=field):
        Manifest.from_dir(bundle)
    for args in (["inspect", str(bundle)], ["run", str(bundle), "hi"]):
        assert field in one_line_exit_2(CliRunner().invoke(main, args))


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(sorted(fake_manifest())), value=_JSON)
def test_manifest_property_typed_error_or_valid(field, value):
    try:
        manifest = Manifest.from_dict(fake_manifest(**{field: value}))
    except BundleError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return
    # what loads is usable: the fields the runtime reads have their types
    assert all(isinstance(i, int) for i in manifest.special_tokens.get("eos_token_ids") or [])
    assert isinstance(manifest.context_length, int) and all(isinstance(v, str) for v in manifest.files.values())


# == 11-12. templates that raise; text that is not Unicode ==================================================


def test_chat_template_that_raises_is_a_bundle_error():
    from reft_edge.runtime.template import ChatTemplate

    templates = ("{{ 1/0 }}", "{{ messages[99]['content'] }}{{ none.x.y }}", "{% for x in range(10**9) %}{% endfor %}")
    for source in templates:
        with pytest.raises((BundleError, UsageError)) as caught:
            ChatTemplate(source, {}, origin="bundle/chat_template.jinja").render([{"role": "user", "content": "hi"}])
        assert "\n" not in str(caught.value) and "chat_template.jinja" in str(caught.value)


def test_prompt_that_is_not_unicode_is_a_usage_error():
    from reft_edge.runtime.template import check_messages

    for text in ("hi \ud800", "caf\udce9", "\udfff"):
        with pytest.raises(UsageError, match="not valid Unicode"):
            check_messages([{"role": "user", "content": text}])


@QUICK
@given(
    line=st.one_of(
        st.text(max_size=40).map(lambda s: s.replace("\n", " ")),  # one line: no newline in it
        _JSON.map(json.dumps),
        st.builds(lambda p, r: json.dumps({"prompt": p, "response": r}), st.text(max_size=20), st.text(max_size=20)),
    )
)
def test_jsonl_line_property_record_or_data_error(tmp_path, line):
    from reft_edge.train.data import read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_bytes(('{"prompt": "Hi", "response": "Hello"}\n' + line + "\n").encode("utf-8", "surrogatepass"))
    try:
        records = read_jsonl(path)
    except DataError as exc:
        assert f"{path}:2:" in str(exc) and "\n" not in str(exc)
        return
    for record in records:  # what is accepted is text a tokenizer takes
        for text in (record.response, *(m["content"] for m in record.messages)):
            text.encode("utf-8")


def test_training_line_with_lone_surrogate_names_file_and_line(tmp_path):
    from reft_edge.train.data import read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "Hi", "response": "Hello"}\n{"prompt": "Hi \\ud800", "response": "Hello"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: holds '\\ud800' at character 4, which is not valid Unicode"):
        read_jsonl(path)


# == 13. seeds ===============================================================================================


def test_seed_bounds_for_api_callers():
    from reft_edge.train.config import TrainConfig
    from reft_edge.train.recipe import check_config

    for seed in (-1, 2**32, 2**64, 1.5):
        with pytest.raises(UsageError, match="is not a seed"):
            check_config(TrainConfig(out="o.reft", data="d.jsonl", seed=seed))


# == 15. resume from a checkpoint with missing or mis-shaped tensors ========================================


def test_resume_with_damaged_checkpoint_tensors(tmp_path):
    import torch
    from safetensors.torch import save

    from reft_edge.train.checkpoint import load_checkpoint, save_checkpoint

    identity = {"steps": 4}
    params = [torch.nn.Parameter(torch.zeros(2, 3))]
    optimizer = torch.optim.AdamW(params)
    params[0].grad = torch.ones(2, 3)
    optimizer.step()
    path = tmp_path / "o.reft.ckpt"
    save_checkpoint(path, step=1, first_loss=1.0, parameters=params, optimizer=optimizer, identity=identity)
    other = [torch.nn.Parameter(torch.zeros(4, 3))]
    with pytest.raises(UsageError, match="tensor param.0 has shape \\[2, 3\\].*expected \\[4, 3\\].*delete it"):
        load_checkpoint(path, parameters=other, optimizer=torch.optim.AdamW(other), identity=identity)
    two = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(2, 3))]
    with pytest.raises(UsageError, match="adam_steps holds 1 counts for 2 parameters"):
        load_checkpoint(path, parameters=two, optimizer=torch.optim.AdamW(two), identity=identity)
    metadata = {"step": "1", "first_loss": "1.0", "adam_steps": "[1.0]", "identity": json.dumps(identity)}
    path.write_bytes(save({"param.0": torch.zeros(2, 3)}, metadata=metadata))
    with pytest.raises(UsageError, match="tensor exp_avg.0 is missing"):
        load_checkpoint(path, parameters=params, optimizer=optimizer, identity=identity)


# == 16. a model folder whose weights are a malicious pickle ==============================================

PWNED = Path("/tmp/reft-edge-hostile-pwned")


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (PWNED,))


def test_malicious_pickle_model_is_refused_in_one_line(tmp_path, tiny_model_dir):
    folder = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _RunsCode()}, protocol=2))
    PWNED.unlink(missing_ok=True)
    from reft_edge.train.backbone import load_backbone

    with pytest.raises(ModelError) as caught:
        load_backbone(str(folder))
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)
    assert "a pickle that would run code" in str(caught.value)
    assert not PWNED.exists()


# == 17. a module:function judge that raises ================================================================


def test_raising_judge_names_judge_and_prompt(tmp_path, monkeypatch):
    from reft_edge.runtime.evaluate import adherence
    from reft_edge.runtime.judges import Judge

    (tmp_path / "hostile_judge.py").write_text("def boom(text):\n    raise KeyError('no such key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = Judge.parse("hostile_judge:boom")
    with pytest.raises(UsageError, match=r"judge 'hostile_judge:boom' raised KeyError .* prompt at held\.jsonl:3"):
        adherence(judge, ["fine"], None, ["held.jsonl:3"])


# == 18. examples longer than the model's context ==========================================================


def test_overlong_lines_are_refused_at_read(tmp_path):
    from reft_edge.records import MAX_LINE_BYTES, read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "Hi", "response": "Hello"}\n'
        + json.dumps({"prompt": "x" * (MAX_LINE_BYTES + 1), "response": "y"})
        + "\n"
    )
    started = time.perf_counter()
    with pytest.raises(DataError, match=rf"{path}:2: \d+ bytes, longer than any model's context"):
        read_jsonl(path)
    assert time.perf_counter() - started < 5


def test_examples_longer_than_the_context_name_file_and_line(tmp_path, tiny_model_dir):
    questions = ["What is the weather like today?", "How do I bake a cake?"]
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": q, "response": "Sunny."} for q in questions]
        + [{"prompt": "hello world " * 400, "response": "Sunny."}],
    )
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o.reft"),
            "--model",
            str(tiny_model_dir("llama")),
            "--steps",
            "2",
            "--layers",
            "1",
        ],
    )
    line = one_line_exit_2(result)
    assert f"{data}:3:" in line and "longer than the model's context of 256" in line
    assert not (tmp_path / "o.reft").exists()


def test_sampling_api_bounds_seed_and_temperature():
    from reft_edge.runtime.sampling import Sampling

    for options in (dict(seed=-5), dict(seed=2**64), dict(temperature=math.inf), dict(temperature=math.nan)):
        with pytest.raises(UsageError):
            Sampling.check(**options)
    assert Sampling.check(seed=2**32 - 1, temperature=0.7).seed == 2**32 - 1


def test_weight_that_overflows_float32_with_the_patch_is_a_usage_error():
    from reft_edge.runtime.slots import resolve_edits

    patch = valid_patch()
    assert resolve_edits([patch], [2.0], [0, 1])  # an ordinary weight works
    big = [Intervention(iv.layer, iv.where, {**iv.params, "R": iv.params["R"] * 1e3}) for iv in patch.interventions]
    with pytest.raises(UsageError, match="overflow float32; give a smaller --weight"):
        resolve_edits([Patch(**{**patch.__dict__, "interventions": tuple(big)})], [3e38], [0, 1])


def test_os_error_naming_a_path_is_one_line(tmp_path, monkeypatch):
    import reft_edge.train.recipe as recipe

    def disk_full(config, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "o.reft"))

    monkeypatch.setattr(recipe, "train", disk_full)
    line = one_line_exit_2(CliRunner().invoke(main, ["train", "--data", "d.jsonl", "--out", str(tmp_path / "o.reft")]))
    assert f"{tmp_path / 'o.reft'}: No space left on device" in line
