"""Decode speed of the web runtime against stock onnxruntime-web and the Python runtime, in one run.

    python -m benchmarks.web_speed                          # 3 rounds, 128 new tokens, 2 threads, int4
    python -m benchmarks.web_speed --repeats 1 --new-tokens 32 --precisions int4,int8
    python -m benchmarks.web_speed --webgpu                 # also the page on WebGPU (a machine with a GPU)

The default model's bundles (int4, and int8 with --precisions) and the emoji patch are the ones
``benchmarks.run`` measures (built once into $REFT_EDGE_CACHE/bench, or reused). Each round runs,
in an order that rotates each round:

- the Python runtime on the bundle (``benchmarks.worker``, exactly as ``benchmarks.run`` measures it),
  and on the bundle's float-arithmetic twin (MatMulNBits ``accuracy_level`` 0: the arithmetic the
  page's float32 weights compute, for token agreement);
- the demo page in a fresh Chromium profile (``runtime/web/test/drive.mjs`` through ``reft-edge
  serve-web``: cross-origin isolated, a first visit that downloads the whole bundle) on wasm with the
  weights unpacked to float32 (the page's default), on wasm with per-column int8 weights, and with
  ``--webgpu`` on WebGPU (Chromium started with --enable-unsafe-webgpu; on a machine without a GPU
  that is a software adapter, far slower than wasm);
- the stock anchor: stock onnxruntime-web (wasm, same version) running onnxruntime-genai's own int4
  build of the same model, no patch, in Node (``benchmarks/web_stock.mjs``).

Each warms up with 8 tokens, times a 1-token generation (time to first token) and times
``--new-tokens`` greedy tokens with EOS ignored and no loop guard, from the same 64-token prompt,
with the patch (the anchor without). Writes (or replaces) the "Browser" section of
docs/benchmarks.md, which ``benchmarks.run`` keeps when it rewrites the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import BROWSER_HEADING, put_section
from benchmarks.run import (
    PROMPT,
    Config,
    CpuWindow,
    Setup,
    build_genai,
    cpu_model,
    find_or_train_patch,
    memory_total,
    package_version,
    run_worker,
)

ROOT = Path(__file__).resolve().parent.parent
DRIVE = ROOT / "runtime" / "web" / "test" / "drive.mjs"
STOCK = ROOT / "benchmarks" / "web_stock.mjs"
WARMUP_TOKENS = 8  # as benchmarks.worker
# engine -> (label, page query, chromium flags); the page's engines
PAGES = {
    "page": ("page, wasm, float32 weights (default)", "?backend=wasm&weights=float32", None),
    "page-int8": ("page, wasm, int8 weights", "?backend=wasm&weights=int8", None),
    "page-webgpu": ("page, WebGPU, shipped 4/8-bit weights", "?backend=webgpu", ["--enable-unsafe-webgpu"]),
}


def prepare(precisions: list[str]) -> tuple[dict[str, Path], str, Path | None, str]:
    """The default model's bundles (benchmarks.run's), the emoji patch, the genai int4 build (or None) and a note."""
    from reft_edge.export import ExportConfig, export_bundle
    from reft_edge.files import cache_dir
    from reft_edge.train.backbone import load_backbone

    backbone = load_backbone()
    bench = cache_dir() / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    patch = find_or_train_patch(backbone, cache_dir(), bench)
    bundles = {}
    for precision in precisions:
        bundles[precision] = bench / precision
        export_bundle(ExportConfig(out=str(bundles[precision]), precision=precision), backbone=backbone, progress=False)
    genai, note = bench / "genai-int4", ""
    error = build_genai(backbone.path, genai, "int4")
    if error:
        genai, note = None, f"stock anchor skipped: onnxruntime-genai's builder failed ({error})"
    return bundles, patch, genai, note


def float_twin(bundle: Path) -> Path:
    """The bundle with MatMulNBits at accuracy_level 0 (float arithmetic), next to it, hard-linked;
    made again only when the bundle is newer."""
    from reft_edge.export.quantize import float_arithmetic_twin

    out = bundle.parent / f"{bundle.name}-float-arithmetic"
    if out.is_dir() and (out / "model.onnx").stat().st_mtime >= (bundle / "model.onnx").stat().st_mtime:
        return out
    return float_arithmetic_twin(bundle, out)


def python_round(bundle: Path, patch: str, args: argparse.Namespace) -> dict:
    config = Config("reft-edge + patch", "runtime", str(bundle), patch)
    return run_worker(config, Setup([config], prompt_text=""), args)


def page_round(engine: str, bundle: Path, patch: str, args: argparse.Namespace) -> dict:
    """The page's warm-up, 1-token and full generations, in the shape benchmarks.worker reports."""
    from reft_edge.runtime.web_server import serving

    _, query, flags = PAGES[engine]
    options = {"ignoreEos": True, "noRepeatNgram": 0}
    cases = [
        {
            "id": name,
            "op": "generate",
            "prompt": PROMPT,
            "patches": [f"/patches/{Path(patch).name}"],
            "options": {**options, "maxNewTokens": n},
        }
        for name, n in (("warmup", WARMUP_TOKENS), ("first", 1), ("full", args.new_tokens))
    ]
    with serving(bundle, [patch]) as url, tempfile.TemporaryDirectory() as work:
        plan, out = Path(work) / "plan.json", Path(work) / "results.json"
        plan.write_text(
            json.dumps(
                {
                    "url": f"{url}{query}&threads={args.threads}",
                    "cases": cases,
                    "timeoutMs": 1_800_000,
                    **({"chromiumArgs": flags} if flags else {}),
                }
            )
        )
        done = subprocess.run(["node", str(DRIVE), str(plan), str(out)], capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
        page = json.loads(out.read_text())
    errors = [c["error"]["message"] for c in page["cases"].values() if "error" in c]
    if errors:
        return {"error": errors[0]}
    full, first = page["cases"]["full"], page["cases"]["first"]
    return {
        "decode_tok_s": full["timings"]["tokensPerS"],
        "ttft_ms": first["timings"]["totalS"] * 1000,
        "startup_s": page["loadS"],
        "bundle_bytes": page["bundleBytes"],
        "page_bytes": page["pageBytes"],
        "threads": page["threads"],
        "isolated": page["isolated"],
        "backend": page["backend"],
        "adapter": page.get("adapter"),
        "unpacked_bytes": (page.get("unpacked") or {}).get("unpackedBytes", 0),
        "tokens": full["tokenIds"],
    }


def stock_round(genai: Path, prompt_ids: list[int], args: argparse.Namespace) -> dict:
    plan = {"promptIds": prompt_ids, "newTokens": args.new_tokens, "threads": args.threads}
    done = subprocess.run(
        ["node", str(STOCK), str(genai), json.dumps(plan)], capture_output=True, text=True, timeout=3600
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
    return json.loads(lines[-1])


def measure(
    bundles: dict[str, Path], patch: str, genai: Path | None, args: argparse.Namespace
) -> tuple[dict[str, dict[str, list[dict]]], dict]:
    """runs[precision][engine] -> one result per round."""
    from reft_edge.runtime import Runtime

    pages = ["page", "page-int8"] + (["page-webgpu"] if args.webgpu else [])
    runs: dict[str, dict[str, list[dict]]] = {}
    loads, window = [], CpuWindow.start()
    prompt_ids = Runtime.load(next(iter(bundles.values()))).encode(PROMPT)
    for precision, bundle in bundles.items():
        twin = float_twin(bundle)
        engines = ["python", "python-float", *pages] + (["stock"] if genai and precision == "int4" else [])
        runs[precision] = {engine: [] for engine in engines}
        for round_index in range(args.repeats):
            shift = round_index % len(engines)
            for engine in engines[shift:] + engines[:shift]:
                loads.append(os.getloadavg()[0])
                if engine == "python":
                    run = python_round(bundle, patch, args)
                elif engine == "python-float":
                    run = python_round(twin, patch, args)
                elif engine == "stock":
                    run = stock_round(genai, prompt_ids, args)
                else:
                    run = page_round(engine, bundle, patch, args)
                runs[precision][engine].append(run)
                shown = f"{run['decode_tok_s']:.1f} tok/s" if "decode_tok_s" in run else run["error"]
                print(f"{precision} round {round_index + 1}/{args.repeats}  {engine:12s} {shown}", flush=True)
    return runs, {
        "median": statistics.median(loads),
        "min": min(loads),
        "max": max(loads),
        "foreign_cores": window.foreign_cores(),
    }


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def agreement(runs: list[dict], reference: list[dict]) -> str:
    """Tokens equal position by position and the common prefix, summed over rounds."""
    same = sum(sum(a == b for a, b in zip(r["tokens"], p["tokens"])) for r, p in zip(runs, reference))
    prefix = sum(common_prefix(r["tokens"], p["tokens"]) for r, p in zip(runs, reference))
    total = sum(len(p["tokens"]) for p in reference)
    return f"{100 * same / total:.0f} % ({prefix}/{total} from the start)"


def section(
    runs: dict[str, dict[str, list[dict]]],
    load: dict,
    load_before: tuple,
    bundles: dict[str, Path],
    args: argparse.Namespace,
    command: str,
    note: str,
) -> list[str]:
    """The "Browser" section of docs/benchmarks.md: median (min–max) over rounds, ratios paired per round."""
    failed = {f"{p}/{e}": [r["error"] for r in rs if "error" in r] for p, es in runs.items() for e, rs in es.items()}
    failed = {k: v for k, v in failed.items() if v and not k.endswith("page-webgpu")}
    if failed:
        raise SystemExit(f"a round failed: {failed}; nothing written")
    any_page = next(r[0] for es in runs.values() for e, r in es.items() if e.startswith("page") and "error" not in r[0])
    lines = [
        BROWSER_HEADING,
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the web runtime "
        f"(`runtime/web`, the demo page driven in Debian's Chromium {chromium_version()}, headless, cross-origin "
        f"isolated: {any_page['isolated']}), stock onnxruntime-web {web_version()} and the Python runtime "
        f"(onnxruntime {package_version('onnxruntime')}) on the default model with the emoji patch (the stock "
        f"anchor without), {args.new_tokens} greedy tokens (EOS ignored, no loop guard) from the 64-token prompt, "
        f"{args.threads} threads each, {args.repeats} round(s), the order rotating each round.",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {memory_total()} RAM; no GPU. **Shared**: other "
        f"engineers' jobs ran at the same time.",
        f"- Load: 1-minute load average {' / '.join(f'{v:.2f}' for v in load_before)} (1 / 5 / 15 min) before "
        f"the run, {load['min']:.2f}–{load['max']:.2f} (median {load['median']:.2f}) during it, our own threads "
        f"included; other processes kept {load['foreign_cores']:.2f} of {os.cpu_count()} cores busy on average.",
        *([f"- {note}"] if note else []),
        "",
        "| bundle | engine | decode tok/s | TTFT ms | start-up s | downloaded MB | weights in memory MB |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "python": "Python runtime (CPU, the bundle as shipped)",
        "python-float": "Python runtime, float arithmetic (accuracy_level 0)",
        "stock": "stock onnxruntime-web, genai's int4 build, no patch (Node, wasm)",
        **{e: label for e, (label, _, _) in PAGES.items()},
    }
    for precision, engines in runs.items():
        size = sum(f.stat().st_size for f in bundles[precision].glob("model.onnx*"))
        for engine, rs in engines.items():
            if any("error" in r for r in rs):
                lines.append(f"| {precision} | {labels[engine]} | failed: {rs[0].get('error', '')[:120]} | | | | |")
                continue
            label = labels[engine]
            if engine == "page-webgpu":
                software = "; software, on the CPU" if "swiftshader" in str(rs[0]["adapter"]) else ""
                label += f" (adapter: {rs[0]['adapter']}{software})"
            if engine.startswith("page"):
                down = f"{rs[0]['bundle_bytes'] / 1e6:.1f} bundle, {rs[0]['page_bytes'] / 1e6:.1f} in all"
                unpacked = rs[0]["unpacked_bytes"]
                memory = f"{unpacked / 1e6:.0f} unpacked" if unpacked else f"{size / 1e6:.0f}"
            else:
                down, memory = "— (reads from disk)", "—" if engine == "stock" else f"{size / 1e6:.0f}"
            lines.append(
                f"| {precision} | {label} | {spread([r['decode_tok_s'] for r in rs])} "
                f"| {spread([r['ttft_ms'] for r in rs], 0)} | {spread([r['startup_s'] for r in rs], 2)} "
                f"| {down} | {memory} |"
            )
    lines.append("")
    for precision, engines in runs.items():
        py, fl = engines["python"], engines["python-float"]
        for engine in [e for e in engines if e.startswith("page")]:
            web = engines[engine]
            if any("error" in r for r in web):
                continue
            vs_py = [w["decode_tok_s"] / p["decode_tok_s"] for p, w in zip(py, web)]
            text = (
                f"- {precision}, {PAGES[engine][0]}: **{spread(vs_py, 2)}x** the Python runtime "
                f"(goal ≥ 0.25x: {'met' if statistics.median(vs_py) >= 0.25 else '**not met**'})"
            )
            if "stock" in engines and not any("error" in r for r in engines["stock"]):
                vs_stock = [w["decode_tok_s"] / s["decode_tok_s"] for s, w in zip(engines["stock"], web)]
                text += (
                    f", **{spread(vs_stock, 2)}x** stock onnxruntime-web "
                    f"(goal ≥ 3x: {'met' if statistics.median(vs_stock) >= 3 else '**not met**'})"
                )
            text += (
                f"; tokens equal to Python's float arithmetic: {agreement(web, fl)}, to Python's shipped "
                f"arithmetic: {agreement(web, py)}."
            )
            lines.append(text)
    lines += [
        "",
        "Ratios are paired per round. TTFT: from the text prompt to the first token, chat template, tokenization "
        "and patch placement included. Start-up: Python, imports and model load in a fresh process; the page, "
        "from opening it to the model being ready (download from localhost, unpacking the weights, session "
        "creation), a first visit. Downloaded: response bodies the page fetched (a returning visitor takes the "
        "bundle from Cache Storage). Weights in memory: the float32 or int8 weights the page unpacks at load "
        "(wasm memory; the bundle's files themselves are held too). Python's shipped arithmetic quantizes "
        "activations to int8 (MatMulNBits accuracy_level 4), so no float path can match it token for token; "
        "why, and what each path costs: docs/web.md.",
        "",
    ]
    return lines


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def web_version() -> str:
    lock = json.loads((ROOT / "runtime" / "web" / "package-lock.json").read_text())
    return lock["packages"]["node_modules/onnxruntime-web"]["version"]


def chromium_version() -> str:
    done = subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True)
    return done.stdout.split()[1] if done.returncode == 0 and len(done.stdout.split()) > 1 else "(version unknown)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each runs both engines once)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--precisions", default="int4", help="bundles to measure, comma-separated (int4, int8)")
    parser.add_argument("--webgpu", action="store_true", help="also the page on WebGPU (for a machine with a GPU)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="the report to put the section in")
    args = parser.parse_args()
    if args.repeats < 1 or args.new_tokens < 2 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1, --new-tokens at least 2")
    args.precisions = [p for p in args.precisions.split(",") if p]
    if not args.precisions or set(args.precisions) - {"int4", "int8"}:
        parser.error("--precisions: int4 and/or int8")
    return args


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()
    bundles, patch, genai, note = prepare(args.precisions)
    runs, load = measure(bundles, patch, genai, args)
    command = " ".join(["python -m benchmarks.web_speed", *sys.argv[1:]])
    lines = section(runs, load, load_before, bundles, args, command, note)
    put_section(Path(args.out), BROWSER_HEADING, lines)
    print("\n".join(["", *lines, f"wrote the {BROWSER_HEADING[3:]} section of {args.out}"]))


if __name__ == "__main__":
    main()
