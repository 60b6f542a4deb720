"""The facts Python and the web runtime share are written once (runtime/spec.py) and committed as
runtime/web/spec.json and spec.js; the web modules import them instead of re-declaring them."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from reft_edge.runtime import spec


def test_committed_spec_is_current():
    want_json, want_js = spec.render()
    for path, want in ((spec.JSON_FILE, want_json), (spec.JS_FILE, want_js)):
        assert path.exists() and path.read_text() == want, (
            f"{path} is stale; run `python -m reft_edge.runtime.spec` and commit it"
        )


def test_spec_matches_python_constants():
    from reft_edge.constants import BUNDLE_SCHEMA_VERSION, PATCH_FORMAT_VERSION
    from reft_edge.runtime.contract import POSITION_LINES, slot_names
    from reft_edge.runtime.patch import KIND_TENSORS

    facts = json.loads(spec.JSON_FILE.read_text())
    assert facts["patch"]["format_version"] == PATCH_FORMAT_VERSION
    assert facts["bundle"]["schema_version"] == BUNDLE_SCHEMA_VERSION
    assert {k: tuple(v) for k, v in facts["patch"]["kinds"].items()} == KIND_TENSORS
    assert len(facts["slots"]["position_lines"]) == POSITION_LINES
    assert tuple(name.replace("{layer}", "7") for name in facts["slots"]["inputs"].values()) == slot_names(7)


_SCRIPT = """
const web = process.argv[1];
const spec = (await import(web + "/spec.js")).default;
const patch = await import(web + "/patch.js");
const bundle = await import(web + "/bundle.js");
const slots = await import(web + "/slots.js");
console.log(JSON.stringify({spec, kinds: patch.KIND_TENSORS, version: patch.PATCH_FORMAT_VERSION,
  maxBytes: patch.MAX_PATCH_BYTES, schema: bundle.SCHEMA_VERSION, every: slots.EVERY_PROMPT_TOKEN,
  empty: Object.entries(slots.emptySlots({slot_layers: [3], hidden_size: 8})).map(([k, v]) => [k, v.type, v.dims])}));
"""


def test_web_modules_read_the_spec():
    if shutil.which("node") is None:
        pytest.skip("node is not installed (Node 20+ runs the web runtime)")
    done = subprocess.run(
        ["node", "--input-type=module", "-e", _SCRIPT, str(spec.WEB)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = json.loads(done.stdout)
    facts = json.loads(spec.JSON_FILE.read_text())
    assert got["spec"] == facts
    assert got["kinds"] == facts["patch"]["kinds"] and got["version"] == facts["patch"]["format_version"]
    assert got["maxBytes"] == facts["patch"]["max_patch_bytes"] and got["schema"] == facts["bundle"]["schema_version"]
    assert got["every"] == facts["slots"]["every_prompt_token"]
    assert got["empty"] == [
        ["slot.3.A", "float32", [1, 0, 8]],
        ["slot.3.B", "float32", [1, 0, 8]],
        ["slot.3.c", "float32", [1, 1, 0]],
        ["slot.3.positions", "int64", [1, 4, 0]],
    ]
