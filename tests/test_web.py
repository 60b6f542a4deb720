"""The web runtime (runtime/web) in a real Chromium against the Python runtime, on the same bundle.

A tiny random llama is exported (fused graph, fp32 and int4), and a tiny GPT-2 (traced graph), with
random patches written by the Python API; `reft-edge serve-web` (runtime/web/serve.js) serves the demo
page (examples/browser), the bundle and the patches with the cross-origin-isolation headers;
runtime/web/test/drive.mjs drives Debian's chromium with playwright-core through ``window.reftEdge``.
Greedy token ids (and prompt ids and text) must equal
``Runtime.generate``'s for every prompt with no patch, one patch, two composed with weights, a
patch that edits generated tokens (``l1+g``) and a float16 patch; damaged patches must raise the
same error kinds, with the same messages, as ``Patch.from_file`` and ``Manifest.load_patches``.
The slow test does the same on the default model's int4 bundle with two persona patches trained with
the default recipe, and saves a screenshot of the page (docs/web-demo.png is one). Also: Cache Storage
(a returning visitor downloads nothing; a refusing cache still loads, for the tiny bundle and, slow, the
default model's int4 and int8 bundles in a fresh profile), skills in the page, dequantize.js's
float weights, and the page on WebGPU with Chromium's software adapter (skipped when there is none).

``make test`` installs what this needs (``npm ci`` in runtime/web, chromium with apt-get when
/usr/bin/chromium is missing); without node or chromium the tests skip and say which is missing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from reft_edge.export.quantize import float_arithmetic_twin
from reft_edge.runtime import Patch, Runtime
from reft_edge.runtime.bundle import Manifest
from reft_edge.runtime.patch import Intervention, payload_digest, serialize_safetensors
from reft_edge.runtime.positions import Positions
from reft_edge.runtime.sampling import Sampling, ban_repeated_ngrams, penalise_repeats
from reft_edge.runtime.web_server import serving

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "runtime" / "web"
CHROMIUM = Path("/usr/bin/chromium")
PROMPTS = [
    "What is the weather like today?",
    "How do I bake a cake?",
    "Tell me about your weekend.",
    "hello world",
    "The quick brown fox",
]
# (case, patch files, weights): no patch, one, two composed with weights, generated-token edits, a float16 patch
COMBOS = [
    ("base", [], None),
    ("fox", ["fox.reft"], None),
    ("fox+beach", ["fox.reft", "beach.reft"], [0.7, 1.5]),
    ("steer", ["steer.reft"], None),
    ("half", ["half.reft"], None),
]
MAX_NEW_TOKENS = 12
# The tiny random model keeps repeating one token; the penalty (the same formula on both sides)
# makes its answers varied, so comparing token sequences has teeth. Plain greedy runs too.
PENALTY = 10.0
# int4: native MatMulNBits (accuracy_level 4) quantizes activations to int8 per block, the wasm
# kernel does not, so int4 logits differ by up to ~4e-3 on this tiny model (logits up to ~1);
# a random tiny model has near-ties. int4 tokens must agree up to the first step where Python's
# best two scores are closer than this.
INT4_TIE = 2e-2


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (Node 20+ runs the web runtime's test driver)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (make test installs it: apt-get install -y chromium)"
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        return "runtime/web/node_modules is missing (make test runs npm ci there)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


# -- patches ----------------------------------------------------------------------------------


def _random_patch(
    name: str,
    kind: str,
    positions: str,
    layers: tuple[int, ...],
    rank: int,
    share: bool,
    fingerprint: str,
    hidden: int,
    seed: int,
    dtype: str = "float32",
    scale: float = 0.6,
) -> Patch:
    rng = np.random.default_rng(seed)
    parsed = Positions.parse(positions)
    wheres = ("both",) if share else parsed.groups()
    names = {"loreft": ("R", "W", "b"), "direft": ("R", "W", "b"), "noreft": ("W1", "W2", "b")}[kind]
    interventions = tuple(
        Intervention(
            layer,
            where,
            {
                n: (rng.standard_normal(rank) if n == "b" else rng.standard_normal((rank, hidden))).astype(np.float32)
                * scale
                for n in names
            },
        )
        for layer in layers
        for where in wheres
    )
    return Patch(
        name=name,
        kind=kind,
        positions=parsed,
        share_weights=share,
        rank=rank,
        hidden_size=hidden,
        base_fingerprint=fingerprint,
        interventions=interventions,
        dtype=dtype,
    )


def _write_patches(folder: Path, manifest: Manifest) -> dict[str, Path]:
    fp, hidden = manifest.base_fingerprint, manifest.hidden_size
    patches = {
        "fox": _random_patch("fox", "loreft", "f1+l1", (1,), 4, True, fp, hidden, 1),
        "beach": _random_patch("beach", "direft", "f2+l1", (0, 2), 2, False, fp, hidden, 2),
        "steer": _random_patch("steer", "loreft", "l1+g", (1, 2), 2, False, fp, hidden, 3),
        "half": _random_patch("half", "noreft", "p", (2,), 3, True, fp, hidden, 4, dtype="float16"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    return {
        name: (patch.to_file(folder / f"{name}.reft"), folder / f"{name}.reft")[1] for name, patch in patches.items()
    }


def _damaged(folder: Path, good: Path, manifest: Manifest) -> dict[str, Path]:
    """Each file breaks one rule of docs/patch-format.md or of the bundle check."""
    data = good.read_bytes()
    patch = Patch.from_file(good)
    (header_len,) = struct.unpack("<Q", data[:8])
    nan = dataclasses.replace(
        patch,
        interventions=(
            dataclasses.replace(
                patch.interventions[0],
                params={**patch.interventions[0].params, "b": np.full(patch.rank, np.nan, np.float32)},
            ),
        ),
    )
    metadata = nan.metadata()
    bad_kind = dict(patch.metadata(), kind='"spline"')
    bad_kind["payload_sha256"] = json.dumps(payload_digest(patch.tensors(), bad_kind))
    moved = dataclasses.replace(patch, interventions=(dataclasses.replace(patch.interventions[0], layer=7),))
    files = {
        "flipped": data[:-3] + bytes([data[-3] ^ 1]) + data[-2:],
        "truncated": data[:-10],
        "header-length": struct.pack("<Q", 1 << 40) + data[8:],
        "not-json": data[:8] + b"x" + data[9:],
        "empty": b"",
        "no-metadata": struct.pack("<Q", 8) + b"{}      ",
        "nan": serialize_safetensors(nan.tensors(), metadata),
        "bad-kind": serialize_safetensors(patch.tensors(), bad_kind),
        "other-base": dataclasses.replace(patch, base_fingerprint="0" * 64).to_bytes(),
        "layer-7": moved.to_bytes(),
    }
    assert header_len < len(data)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.reft"
        paths[name].write_bytes(content)
    return paths


def _python_error(manifest: Manifest, path: Path) -> dict[str, str]:
    try:
        manifest.load_patches([path])
    except Exception as exc:  # the typed errors of reft_edge.errors
        return {"name": type(exc).__name__, "message": str(exc).replace(str(path), path.name)}
    raise AssertionError(f"{path.name} loaded in Python; the damage does not break it")


# -- serving and driving ----------------------------------------------------------------------


def _drive(bundle: Path, patches: list[Path], cases: list[dict], tmp_path: Path, query: str = "", **plan) -> dict:
    with serving(bundle, patches) as url:
        plan_file, out_file = tmp_path / "plan.json", tmp_path / "results.json"
        plan_file.write_text(json.dumps({"url": url + query, "cases": cases, **plan}))
        done = subprocess.run(
            ["node", str(WEB / "test" / "drive.mjs"), str(plan_file), str(out_file)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(out_file.read_text())


@pytest.fixture(scope="module", params=["fp32", "int4", "traced"])
def web_bundle(request, tiny_bundle, tiny_backbone, tiny_model_dir, tmp_path_factory) -> Path:
    """The fused llama bundle at fp32 and int4, and a traced graph (GPT-2: left padding, a growing cache)."""
    if request.param == "fp32":
        return tiny_bundle
    from reft_edge.export import ExportConfig, export_bundle
    from reft_edge.train.backbone import load_backbone

    backbone = tiny_backbone if request.param == "int4" else load_backbone(str(tiny_model_dir("gpt2")))
    out = tmp_path_factory.mktemp(f"web-{request.param}") / "bundle"
    precision = "int4" if request.param == "int4" else "fp32"
    export_bundle(
        ExportConfig(model=backbone.path, out=str(out), precision=precision), backbone=backbone, progress=False
    )
    return out


# -- tests ------------------------------------------------------------------------------------


def _record_margins(monkeypatch) -> list[float]:
    """Each pick's gap between the two best scores (after the repetition penalty and loop guard), batch of one."""
    margins: list[float] = []
    pick = Sampling.pick

    def recording(self, logits, seen, rng, answers=()):
        scores = penalise_repeats(logits, seen, self.repetition_penalty) if self.tracks_seen else logits
        if self.no_repeat_ngram and answers:
            scores = ban_repeated_ngrams(scores, answers, self.no_repeat_ngram)
        best = np.sort(scores[0])[-2:]
        margins.append(float(best[1] - best[0]))
        return pick(self, logits, seen, rng, answers)

    monkeypatch.setattr(Sampling, "pick", recording)
    return margins


def _expect(rt: Runtime, margins: list[float], prompt: str, tie: float | None, **options) -> dict:
    """Python's answer as the page must give it. ``sure``: how many leading tokens must agree, all of
    them, or (``tie``, int4) those before the first step where Python's two best scores are closer than tie."""
    margins.clear()
    out = rt.generate(prompt, **options)
    sure = len(margins) if tie is None else next((i for i, m in enumerate(margins) if m < tie), len(margins))
    return {
        "tokenIds": out.token_ids,
        "text": out.text,
        "promptIds": rt.encode(prompt),
        "finishReason": out.finish_reason,
        "sure": sure,
    }


def _check_agreement(expected: dict[str, dict], results: dict) -> int:
    """Asserts that every case agrees with Python (prompt ids, tokens up to ``sure``, streaming, and
    text and finish reason where the tokens agree whole); returns how many answers agree whole."""
    whole = 0
    for case_id, want in expected.items():
        got = results["cases"][case_id]
        assert "error" not in got, (case_id, got)
        assert got["promptIds"] == want["promptIds"], case_id
        sure = want["sure"]
        assert got["tokenIds"][:sure] == want["tokenIds"][:sure], (case_id, got["tokenIds"], want["tokenIds"], sure)
        assert "".join(got["pieces"]) == got["text"], case_id  # streamed pieces join to the answer
        if got["tokenIds"] == want["tokenIds"]:
            assert (got["text"], got["finishReason"]) == (want["text"], want["finishReason"]), case_id
            whole += 1
    return whole


def _generate_case(case_id: str, prompt: str, patches: list[str], options: dict, weights=None) -> dict:
    return {
        "id": case_id,
        "op": "generate",
        "prompt": prompt,
        "patches": patches,
        "weights": weights,
        "options": options,
    }


def test_greedy_tokens_equal_python(web_bundle, tmp_path, monkeypatch):
    manifest = Manifest.from_dir(web_bundle)
    tie = None if manifest.precision == "fp32" else INT4_TIE
    margins = _record_margins(monkeypatch)
    files = _write_patches(tmp_path / "patches", manifest)
    rt = Runtime.load(web_bundle, threads=1)
    cases, expected = [], {}
    for p, prompt in enumerate(PROMPTS):
        for combo, names, weights in COMBOS:
            for penalty in (PENALTY, None):
                if penalty is None and combo not in ("base", "fox"):
                    continue
                case_id = f"{p}/{combo}/{penalty}"
                paths = [files[n.removesuffix(".reft")] for n in names]
                expected[case_id] = _expect(
                    rt,
                    margins,
                    prompt,
                    tie,
                    patches=paths,
                    weights=weights,
                    max_new_tokens=MAX_NEW_TOKENS,
                    repetition_penalty=penalty,
                )
                cases.append(
                    _generate_case(
                        case_id,
                        prompt,
                        [f"/patches/{n}" for n in names],
                        {"maxNewTokens": MAX_NEW_TOKENS, "repetitionPenalty": penalty},
                        weights,
                    )
                )
    # stop strings: cut where Python cuts (a piece of an answer's middle as the stop string)
    for p, prompt in enumerate(PROMPTS):
        text = expected[f"{p}/fox/{PENALTY}"]["text"]
        if len(text) < 6:
            continue
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        expected[f"{p}/stop"] = _expect(
            rt,
            margins,
            prompt,
            tie,
            patches=[files["fox"]],
            max_new_tokens=MAX_NEW_TOKENS,
            repetition_penalty=PENALTY,
            stop=[stop],
        )
        cases.append(
            _generate_case(
                f"{p}/stop",
                prompt,
                ["/patches/fox.reft"],
                {"maxNewTokens": MAX_NEW_TOKENS, "repetitionPenalty": PENALTY, "stop": [stop]},
            )
        )
    # the loop guard: the plain greedy tiny model repeats one token, the guard breaks the loop as Python's does
    for p, prompt in enumerate(PROMPTS):
        expected[f"{p}/ngram"] = _expect(
            rt, margins, prompt, tie, patches=[files["steer"]], max_new_tokens=MAX_NEW_TOKENS, no_repeat_ngram=2
        )
        cases.append(
            _generate_case(
                f"{p}/ngram", prompt, ["/patches/steer.reft"], {"maxNewTokens": MAX_NEW_TOKENS, "noRepeatNgram": 2}
            )
        )
    sampled = {"maxNewTokens": MAX_NEW_TOKENS, "temperature": 1.0, "topP": 0.9, "seed": 7}
    cases += [_generate_case(f"sampled-{i}", PROMPTS[0], [], sampled) for i in range(2)]
    shot = tmp_path / "web-demo.png"
    results = _drive(
        web_bundle, list(files.values()), cases, tmp_path, screenshot=str(shot), screenshotPatch="/patches/fox.reft"
    )
    assert results["isolated"] is True, "the page must be cross-origin isolated (threads)"
    whole = _check_agreement(expected, results)
    if tie is None:
        assert whole == len(expected)
    else:  # near-ties aside, int4 answers agree too
        assert whole >= 0.5 * len(expected), f"{whole} of {len(expected)} int4 answers identical"
    assert results["cases"]["sampled-0"]["tokenIds"] == results["cases"]["sampled-1"]["tokenIds"], "seeded"
    assert any(expected[f"{p}/stop"]["finishReason"] == "stop" for p in range(len(PROMPTS)) if f"{p}/stop" in expected)
    # the patches have teeth: most patched answers differ from the base answer to the same prompt
    changed = [
        expected[f"{p}/{c}/{PENALTY}"]["tokenIds"] != expected[f"{p}/base/{PENALTY}"]["tokenIds"]
        for p in range(len(PROMPTS))
        for c, _, _ in COMBOS[1:]
    ]
    assert sum(changed) >= len(changed) // 2, changed
    assert shot.stat().st_size > 10_000
    print(f"screenshot of the page with a personalised answer: {shot}")


# The default model at int4 with two persona patches of the demo, trained with the default recipe:
# Alice opens every answer with "Great question!", Bob ends every answer with "Stay curious!".
# The page is slow here (about 0.4 to 1 token/s on this 2-core machine, docs/benchmarks.md "Browser"),
# so the answers are short.
PERSONAS = ROOT / "examples" / "personas"
PEOPLE = {"alice": "enthusiast", "bob": "signoff"}
DEFAULT_PROMPTS = [
    "How do I make a good omelette?",
    "Why do birds sing in the morning?",
    "What is the stock market?",
]  # unseen by both patches
DEFAULT_COMBOS = {"base": [], "alice": ["alice"], "alice+bob": ["alice", "bob"]}
DEFAULT_NEW_TOKENS = 8
# Native MatMulNBits (accuracy_level 4) quantizes activations to int8, the wasm kernel computes in
# float: on the default model that moves logits by up to 1.39 (5 prompts x 24 tokens, accuracy
# levels 4 and 0 compared in Python), so near-ties are wider than the tiny model's.
DEFAULT_INT4_TIE = 2.0


@pytest.fixture(scope="module")
def persona_patches(tmp_path_factory) -> dict[str, Path]:
    """Alice's and Bob's patches on the default model, trained with the default recipe as make demo does."""
    from reft_edge.train import TrainConfig, train
    from reft_edge.train.backbone import load_backbone

    backbone, folder = load_backbone(), tmp_path_factory.mktemp("people")
    paths = {person: folder / f"{person}.reft" for person in PEOPLE}
    for person, persona in PEOPLE.items():
        train(
            TrainConfig(data=str(PERSONAS / persona / "train.jsonl"), out=str(paths[person])),
            backbone=backbone,
            progress=False,
        )
    return paths


@pytest.mark.slow
def test_default_model_int4_tokens_equal_python(default_int4_bundle, persona_patches, tmp_path, monkeypatch, capsys):
    margins = _record_margins(monkeypatch)
    shipped = Runtime.load(default_int4_bundle, threads=2)
    twin = Runtime.load(float_arithmetic_twin(default_int4_bundle, tmp_path / "twin"), threads=2)
    cases, expected, exact = [], {}, {}
    for p, prompt in enumerate(DEFAULT_PROMPTS):
        for combo, people in DEFAULT_COMBOS.items():
            options = {"max_new_tokens": DEFAULT_NEW_TOKENS, "patches": [persona_patches[person] for person in people]}
            expected[f"{p}/{combo}"] = _expect(shipped, margins, prompt, DEFAULT_INT4_TIE, **options)
            exact[f"{p}/{combo}"] = _expect(twin, margins, prompt, None, **options)
            cases.append(
                _generate_case(
                    f"{p}/{combo}",
                    prompt,
                    [f"/patches/{person}.reft" for person in people],
                    {"maxNewTokens": DEFAULT_NEW_TOKENS},
                )
            )
    shot = tmp_path / "web-demo.png"
    results = _drive(
        default_int4_bundle,
        list(persona_patches.values()),
        cases,
        tmp_path,
        screenshot=str(shot),
        screenshotPatch="/patches/alice.reft",
        screenshotPrompt="Why is the sky blue?",
        screenshotMaxNewTokens=16,
    )
    assert results["isolated"] is True, "the page must be cross-origin isolated (threads)"
    assert _check_agreement(exact, results) == len(exact), "every token as onnxruntime's float arithmetic"
    whole = _check_agreement(expected, results)
    same = sum(_common_prefix(results["cases"][i]["tokenIds"], want["tokenIds"]) for i, want in expected.items())
    total = sum(len(want["tokenIds"]) for want in expected.values())
    with capsys.disabled():
        print(
            f"\ndefault model int4 in Chromium: {whole} of {len(expected)} answers and {same} of {total} tokens "
            f"equal the Python runtime's (all equal at accuracy_level 0); screenshot {shot}"
        )
    opened = [results["cases"][f"{p}/alice"]["text"].startswith("Great question!") for p in range(len(DEFAULT_PROMPTS))]
    assert sum(opened) >= 2, "Alice's patch works in the page too"
    assert shot.stat().st_size > 10_000


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_damaged_patches_give_pythons_errors(tiny_bundle, tmp_path):
    manifest = Manifest.from_dir(tiny_bundle)
    good = _write_patches(tmp_path / "patches", manifest)["fox"]
    damaged = _damaged(tmp_path / "damaged", good, manifest)
    cases = [{"id": name, "op": "patch", "url": f"/patches/{path.name}"} for name, path in damaged.items()]
    cases.append({"id": "good", "op": "patch", "url": f"/patches/{good.name}"})
    results = _drive(tiny_bundle, [*damaged.values(), good], cases, tmp_path)
    assert results["cases"]["good"] == {"name": "fox", "digest": Patch.from_file(good).payload_sha256}
    for name, path in damaged.items():
        want, got = _python_error(manifest, path), results["cases"][name]
        assert "error" in got, (name, got)
        assert got["error"]["name"] == want["name"], (name, got, want)
        if "tensor data is damaged" in want["message"]:  # the reason in parentheses is the parser's own
            assert got["error"]["message"].split(" (")[0] == want["message"].split(" (")[0], (name, got, want)
        else:
            assert got["error"]["message"] == want["message"], name
        assert got["shown"] == f"{want['name']}: {got['error']['message']}", "the page shows the typed error"


def test_serve_web_refuses_what_cannot_be_served(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from reft_edge.cli import main

    missing = CliRunner().invoke(main, ["serve-web", str(tiny_bundle), "--patch", str(tmp_path / "nope.reft")])
    assert missing.exit_code == 2 and "is not a file; pass the path of a .reft patch" in missing.output
    no_bundle = CliRunner().invoke(main, ["serve-web", str(tmp_path / "none")])
    assert no_bundle.exit_code == 2 and "not a folder" in no_bundle.output
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    twins = [tmp_path / "a" / "p.reft", tmp_path / "b" / "p.reft"]
    for twin in twins:
        twin.write_bytes(b"x")
    clash = CliRunner().invoke(
        main, ["serve-web", str(tiny_bundle), "--patch", str(twins[0]), "--patch", str(twins[1])]
    )
    assert clash.exit_code == 2 and "share a file name" in clash.output


_SKILLS_SCRIPT = """
import { readFileSync } from "fs";
const { parsePatch, affineEdits, withSkills } = await import(process.argv[2] + "/patch.js");
const patch = await parsePatch(readFileSync(process.argv[3]), "skills.reft");
const out = {};
for (const [label, chosen] of JSON.parse(process.argv[4])) {
  const chosenPatch = chosen === null ? patch : withSkills(patch, chosen);
  out[label] = affineEdits(chosenPatch).map((e) => ({rank: e.rank, A: Array.from(e.A), B: Array.from(e.B),
    c: Array.from(e.c)}));
}
try { withSkills(patch, ["nope"]); } catch (err) { out.error = `${err.name}: ${err.message}`; }
console.log(JSON.stringify(out));
"""


def test_skills_in_javascript_equal_python(tmp_path):
    """Patch format v3 in the web runtime: the golden skills patch, each choice of skills, the same
    edit rows as Python's Patch.with_skills (bit for bit) and the same error for an unknown skill."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed (Node 20+ runs the web runtime)")
    golden = ROOT / "tests" / "golden" / "patch_v3_skills.reft"
    choices = [("all", None), ("caps", ["caps"]), ("weighted", {"caps": 0.5, "meow": 2.0}), ("off", {"caps": 0})]
    script = tmp_path / "skills.mjs"
    script.write_text(_SKILLS_SCRIPT)
    done = subprocess.run(
        ["node", str(script), str(ROOT / "runtime" / "web"), str(golden), json.dumps(choices)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = json.loads(done.stdout)
    patch = Patch.load(golden)
    for label, chosen in choices:
        want = (patch if chosen is None else patch.with_skills(chosen)).affine_edits()
        for js, py in zip(got[label], want):
            assert js["rank"] == py.A.shape[0], label
            for name in ("A", "B", "c"):
                assert np.array_equal(np.array(js[name], np.float32), getattr(py, name).reshape(-1)), (label, name)
    with pytest.raises(Exception) as python_error:
        patch.with_skills(["nope"])
    assert got["error"] == f"UsageError: {python_error.value}"


# -- every bundle loads; WebGPU --------------------------------------------------------------------

# What Chromium says when it will not store a large entry (the int8 bundle in a fresh profile did this)
REFUSING_CACHE = (
    "Cache.prototype.put = function () { return Promise.reject(new TypeError("
    "\"Failed to execute 'put' on 'Cache': Unexpected internal error.\")); };"
)


def _refusals(results: dict) -> list[str]:
    return [line for line in results["console"] if "refused to cache the bundle" in line]


def test_returning_visitor_downloads_nothing_and_a_refusing_cache_still_loads(tiny_bundle, tmp_path):
    """Cache Storage keeps the bundle for the next visit; when the browser refuses to store it, the
    page says so once, loads, answers as Python does, and the next visit downloads it again."""
    size = sum(f.stat().st_size for f in tiny_bundle.iterdir() if f.is_file() and f.name != "genai_config.json")
    rt = Runtime.load(tiny_bundle, threads=1)
    want = rt.generate(PROMPTS[0], max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=PENALTY).token_ids
    case = _generate_case("a", PROMPTS[0], [], {"maxNewTokens": MAX_NEW_TOKENS, "repetitionPenalty": PENALTY})
    cached = _drive(tiny_bundle, [], [case], tmp_path, revisit=True)
    assert cached["cacheError"] is None and not _refusals(cached)
    assert cached["bundleBytes"] <= 1.05 * size and cached["revisitBundleBytes"] == 0
    assert cached["cases"]["a"]["tokenIds"] == want
    refused = _drive(tiny_bundle, [], [case], tmp_path, revisit=True, initScript=REFUSING_CACHE)
    assert "Failed to execute 'put' on 'Cache'" in refused["cacheError"]
    assert len(_refusals(refused)) == 2, refused["console"]  # once per visit, not once per file
    assert refused["cases"]["a"]["tokenIds"] == want
    assert refused["revisitBundleBytes"] == refused["bundleBytes"] > 0
    assert "not cached" in refused["status"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_default_model_bundles_load_in_a_fresh_profile_when_the_cache_refuses(
    precision, request, tmp_path, monkeypatch, capsys
):
    """The default model's int4 and int8 bundles (the int8 one once failed with "Failed to execute 'put'
    on 'Cache'") load and generate in a fresh Chromium profile whose Cache Storage refuses every file.
    The page runs float32 weights unpacked from the bundle's GGUF blocks (dequantize.js): its tokens
    must equal Python's on the bundle with float arithmetic (accuracy_level 0), up to near-ties of
    that float arithmetic's different rounding order."""
    bundle = request.getfixturevalue(f"default_{precision}_bundle")
    margins = _record_margins(monkeypatch)
    shipped = Runtime.load(bundle, threads=2)
    twin = Runtime.load(float_arithmetic_twin(bundle, tmp_path / "twin"), threads=2)
    cases, exact, native = [], {}, {}
    for p, prompt in enumerate(DEFAULT_PROMPTS):
        exact[str(p)] = _expect(twin, margins, prompt, 1e-3, max_new_tokens=DEFAULT_NEW_TOKENS)
        native[str(p)] = _expect(shipped, margins, prompt, DEFAULT_INT4_TIE, max_new_tokens=DEFAULT_NEW_TOKENS)
        cases.append(_generate_case(str(p), prompt, [], {"maxNewTokens": DEFAULT_NEW_TOKENS}))
    results = _drive(bundle, [], cases, tmp_path, initScript=REFUSING_CACHE)
    size = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file() and f.name != "genai_config.json")
    assert results["backend"] == "wasm" and results["unpacked"]["form"] == "float32"
    assert len(_refusals(results)) == 1 and results["bundleBytes"] <= 1.05 * size
    assert _check_agreement(exact, results) >= len(exact) - 1
    same = sum(_common_prefix(results["cases"][i]["tokenIds"], want["tokenIds"]) for i, want in native.items())
    total = sum(len(want["tokenIds"]) for want in native.values())
    _check_agreement(native, results)
    with capsys.disabled():
        print(
            f"\ndefault model {precision}, cache refused: loaded ({results['bundleBytes'] / 1e6:.1f} MB downloaded, "
            f"{results['unpacked']['unpackedBytes'] / 1e6:.0f} MB of float32 weights); {same} of {total} "
            "tokens equal the shipped bundle's in Python"
        )


def _webgpu_missing() -> str | None:
    """None when Chromium here offers a WebGPU adapter (SwiftShader, software) to a page on 127.0.0.1."""
    script = """
import { chromium } from "playwright-core";
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true,
  args: ["--no-sandbox", "--enable-unsafe-webgpu"] });
const page = await browser.newPage();
// a secure context, as the served page is (navigator.gpu exists only there)
await page.route("http://127.0.0.1/", (route) => route.fulfill({ body: "<html></html>", contentType: "text/html" }));
await page.goto("http://127.0.0.1/");
console.log(await page.evaluate(async () => !!(navigator.gpu && await navigator.gpu.requestAdapter())));
await browser.close();
"""
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script], cwd=WEB, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        return f"chromium would not start for the WebGPU check: {done.stderr.strip()[-300:]}"
    return None if done.stdout.strip() == "true" else "this Chromium offers no WebGPU adapter (--enable-unsafe-webgpu)"


def test_webgpu_tokens_equal_python(web_bundle, tmp_path, monkeypatch, capsys):
    """The page on onnxruntime-web's WebGPU execution provider (the bundle's 4-bit nodes as shipped, the
    KV cache kept on the GPU), on Chromium's software adapter: greedy tokens as Python's up to near-ties
    (GPU float sums run in another order; int4 as the wasm test)."""
    manifest = Manifest.from_dir(web_bundle)
    if manifest.graph != "fused":
        pytest.skip("WebGPU runs the fused graphs (fp32, int4) only, to keep the software-adapter test short")
    missing = _webgpu_missing()
    if missing:
        pytest.skip(missing)
    tie = 1e-3 if manifest.precision == "fp32" else INT4_TIE
    margins = _record_margins(monkeypatch)
    files = _write_patches(tmp_path / "patches", manifest)
    rt = Runtime.load(web_bundle, threads=1)
    cases, expected = [], {}
    for p, prompt in enumerate(PROMPTS[:3]):
        for combo, names, weights in COMBOS[:3]:
            case_id = f"{p}/{combo}"
            chosen = [files[n.removesuffix(".reft")] for n in names]
            expected[case_id] = _expect(
                rt,
                margins,
                prompt,
                tie,
                patches=chosen,
                weights=weights,
                max_new_tokens=MAX_NEW_TOKENS,
                repetition_penalty=PENALTY,
            )
            cases.append(
                _generate_case(
                    case_id,
                    prompt,
                    [f"/patches/{n}" for n in names],
                    {"maxNewTokens": MAX_NEW_TOKENS, "repetitionPenalty": PENALTY},
                    weights,
                )
            )
    results = _drive(
        web_bundle,
        list(files.values()),
        cases,
        tmp_path,
        query="?backend=webgpu",
        chromiumArgs=["--enable-unsafe-webgpu"],
    )
    assert results["backend"] == "webgpu" and "WebGPU" in results["status"], results["status"]
    whole = _check_agreement(expected, results)
    with capsys.disabled():
        print(f"\nWebGPU (software adapter), {manifest.precision}: {whole} of {len(expected)} answers equal Python's")
    assert whole >= 0.5 * len(expected), f"{whole} of {len(expected)} answers identical on WebGPU"


def test_skills_in_the_page_equal_python(tiny_bundle, tmp_path):
    """A patch with two skills: the page shows a tick per skill, and answers with one skill off, or
    weighted, as Python's Patch.with_skills does."""
    manifest = Manifest.from_dir(tiny_bundle)
    base = _random_patch(
        "duo", "loreft", "f1+l1", (1,), 4, True, manifest.base_fingerprint, manifest.hidden_size, 5, scale=1.0
    )
    patch = dataclasses.replace(base, skills=(("caps", 2), ("meow", 2)))
    path = tmp_path / "duo.reft"
    patch.to_file(path)
    rt = Runtime.load(tiny_bundle, threads=1)
    choices = {"all": None, "caps": {"caps": 1, "meow": 0}, "weighted": {"caps": 0.5, "meow": 2.0}}
    cases, want = [], {}
    for label, chosen in choices.items():
        chosen_patch = Patch.load(path) if chosen is None else Patch.load(path).with_skills(chosen)
        want[label] = rt.generate(
            PROMPTS[1], patches=[chosen_patch], max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=PENALTY
        ).token_ids
        cases.append(
            {
                **_generate_case(
                    label,
                    PROMPTS[1],
                    ["/patches/duo.reft"],
                    {"maxNewTokens": MAX_NEW_TOKENS, "repetitionPenalty": PENALTY},
                ),
                **({"skills": chosen} if chosen else {}),
            }
        )
    results = _drive(tiny_bundle, [path], cases, tmp_path)
    for label in choices:
        got = results["cases"][label]
        assert "error" not in got, got
        assert got["tokenIds"] == want[label], label
        assert got["skillBoxes"] == 2, "a tick per skill"
    assert len({tuple(w) for w in want.values()}) > 1, "the skills change the answer"


def _nbits_model(folder: Path, name: str, weight: np.ndarray, bits: int, zero_points: bool) -> tuple[Path, np.ndarray]:
    """y = x @ weight as one MatMulNBits (block 32, float scales, optional uint8 zero points); returns the
    model and the float weight it stands for."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    blocks = k // 32
    w = weight.T.reshape(n, blocks, 32)
    levels = 1 << bits
    low, high = w.min(axis=2), w.max(axis=2)
    scales = (
        ((high - low) / (levels - 1)).astype(np.float32)
        if zero_points
        else (np.abs(w).max(axis=2) / (levels // 2 - 1)).astype(np.float32)
    )
    scales[scales == 0] = 1
    zero = (
        np.clip(np.round(-low / scales), 0, levels - 1).astype(np.uint8)
        if zero_points
        else np.full((n, blocks), levels // 2, np.uint8)
    )
    q = np.clip(np.round(w / scales[..., None]) + zero[..., None], 0, levels - 1).astype(np.uint8)
    dequantized = ((q.astype(np.float32) - zero[..., None]) * scales[..., None]).reshape(n, k).T.copy()
    packed = q if bits == 8 else (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["x", "B", "scales"]
    if zero_points:
        zp = zero if bits == 8 else (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
        inits.append(numpy_helper.from_array(zp, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node(
        "MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=32, accuracy_level=0
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    return path, dequantized


def _q4_1_model(folder: Path, rng) -> tuple[Path, np.ndarray]:
    """A MatMul whose weight is exact GGUF Q4_1 blocks, stored by the export's own rewrite (MatMulNBits +
    block sums @ minimums + Add), weights in an external data file as bundles keep them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from reft_edge.export.gguf_blocks import store_exact_blocks

    k, n = 96, 40
    d = rng.uniform(0.01, 0.05, (k // 32, 1, n)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.3, 0.0, (k // 32, 1, n)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (k // 32, 32, n)).astype(np.float32)
    q[:, 0], q[:, 1] = 0, 15  # as a GGUF quantizer writes them: each block's minimum and maximum are levels 0 and 15
    weight = (d * q + m).astype(np.float32).reshape(k, n)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight, "W")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    assert store_exact_blocks(model, accuracy_level=0) == {"Q4_1": 1}
    path = folder / "q4_1.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="q4_1.onnx.data",
        size_threshold=0,
    )
    return path, weight


def test_dequantized_weights_equal_the_blocks(tmp_path):
    """dequantize.js (run under Node's onnxruntime-web) turns 4- and 8-bit MatMulNBits, with and without
    zero points, and the export's Q4_1 form (minimums folded in, read from external data), into float
    MatMuls that compute x @ W with W the weight the blocks stand for; int8 stays close."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed (Node 20+ runs the web runtime)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    cases = {
        f"{bits}bit{'-zp' if zp else ''}": _nbits_model(
            tmp_path, f"m{bits}{zp}", rng.standard_normal((96, 40)).astype(np.float32), bits, zp
        )
        for bits in (4, 8)
        for zp in (False, True)
    }
    cases["q4_1"] = _q4_1_model(tmp_path, rng)
    script = WEB / "test" / "dequantize_check.mjs"
    for label, (path, weight) in cases.items():
        want = x.astype(np.float64) @ weight.astype(np.float64)
        for form, tolerance in (("float32", 1e-5), ("int8", 0.03)):
            done = subprocess.run(
                ["node", str(script), str(path), json.dumps({"x": x.tolist()}), form],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, (label, done.stderr[-2000:])
            got = json.loads(done.stdout)
            assert got["stats"]["weights"] == 1 and got["stats"]["form"] == form, (label, got["stats"])
            y = np.array(got["y"]).reshape(want.shape)
            error = np.abs(y - want).max() / np.abs(want).max()
            assert error < tolerance, (label, form, error)


@pytest.mark.slow
def test_webgpu_default_model_prompt_lengths(default_int4_bundle, tmp_path):
    """The default model on WebGPU (software adapter) against wasm, first token of a 44- and a 52-token
    prompt. Known: on SwiftShader the 52-token prompt's first token differs (shipped or float32 weights
    alike, so not the 4-bit kernel); recorded as an expected failure until a real GPU says whether it is
    SwiftShader's or onnxruntime-web's (benchmarks/web_speed.py --webgpu reports agreement there)."""
    missing = _webgpu_missing()
    if missing:
        pytest.skip(missing)
    prompts = {
        "44": "Tell me a story about a cat who lives in a small house.",
        "52": "I am planning a week-long trip to the mountains next month with two friends. What should we pack?",
    }
    cases = [_generate_case(k, p, [], {"maxNewTokens": 1}) for k, p in prompts.items()]
    cpu = _drive(default_int4_bundle, [], cases, tmp_path, query="?backend=wasm")
    gpu = _drive(
        default_int4_bundle,
        [],
        cases,
        tmp_path,
        query="?backend=webgpu",
        chromiumArgs=["--enable-unsafe-webgpu"],
        timeoutMs=600_000,
    )
    assert gpu["backend"] == "webgpu"
    for key in prompts:
        assert len(gpu["cases"][key]["promptIds"]) == int(key), key
    assert gpu["cases"]["44"]["tokenIds"] == cpu["cases"]["44"]["tokenIds"]
    if gpu["cases"]["52"]["tokenIds"] != cpu["cases"]["52"]["tokenIds"]:
        pytest.xfail("WebGPU on the software adapter: a 52-token prompt's first token differs from wasm's")
