"""Decode speed of the web runtime in Chromium against the Python runtime, side by side on one int4 bundle.

    python -m benchmarks.web_speed                          # 3 rounds, 128 new tokens, 2 threads
    python -m benchmarks.web_speed --repeats 1 --new-tokens 32

The default model's int4 bundle and the emoji patch are the ones ``benchmarks.run`` measures
(built once into $REFT_EDGE_CACHE/bench, or reused). Each round runs the Python runtime in its
own process (``benchmarks.worker``, exactly as ``benchmarks.run`` measures it) and the demo page
in a fresh Chromium profile (``runtime/web/test/drive.mjs`` through ``reft-edge serve-web``: wasm,
cross-origin isolated, so a first visit that downloads the whole bundle), the order alternating
each round. Both warm up with 8 tokens, time a 1-token generation from the text prompt (time to
first token) and time ``--new-tokens`` greedy tokens with EOS ignored, with the patch, from the
same prompt. Writes (or replaces) the "Browser" section of docs/benchmarks.md, which
``benchmarks.run`` keeps when it rewrites the rest.
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
    cpu_model,
    find_or_train_patch,
    memory_total,
    package_version,
    run_worker,
)

ROOT = Path(__file__).resolve().parent.parent
DRIVE = ROOT / "runtime" / "web" / "test" / "drive.mjs"
WARMUP_TOKENS = 8  # as benchmarks.worker


def prepare() -> tuple[Path, str]:
    """The default model's int4 bundle (benchmarks.run's) and the emoji patch."""
    from reft_edge.export import ExportConfig, export_bundle
    from reft_edge.files import cache_dir
    from reft_edge.train.backbone import load_backbone

    backbone = load_backbone()
    bench = cache_dir() / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    patch = find_or_train_patch(backbone, cache_dir(), bench)
    export_bundle(ExportConfig(out=str(bench / "int4"), precision="int4"), backbone=backbone, progress=False)
    return bench / "int4", patch


def python_round(bundle: Path, patch: str, args: argparse.Namespace) -> dict:
    config = Config("reft-edge int4 + patch", "runtime", str(bundle), patch)
    return run_worker(config, Setup([config], prompt_text=""), args)


def browser_round(bundle: Path, patch: str, args: argparse.Namespace) -> dict:
    """The page's warm-up, 1-token and full generations, in the shape benchmarks.worker reports."""
    from reft_edge.runtime.web_cli import serving

    cases = [{"id": name, "op": "generate", "prompt": PROMPT, "patches": [f"/patches/{Path(patch).name}"],
              "options": {"ignoreEos": True, "maxNewTokens": n}}
             for name, n in (("warmup", WARMUP_TOKENS), ("first", 1), ("full", args.new_tokens))]
    with serving(bundle, [patch]) as url, tempfile.TemporaryDirectory() as work:
        plan, out = Path(work) / "plan.json", Path(work) / "results.json"
        plan.write_text(json.dumps({"url": f"{url}?threads={args.threads}", "cases": cases, "timeoutMs": 600_000}))
        done = subprocess.run(["node", str(DRIVE), str(plan), str(out)], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
        page = json.loads(out.read_text())
    errors = [c["error"]["message"] for c in page["cases"].values() if "error" in c]
    if errors:
        return {"error": errors[0]}
    full, first = page["cases"]["full"], page["cases"]["first"]
    return {"decode_tok_s": full["timings"]["tokensPerS"], "ttft_ms": first["timings"]["totalS"] * 1000,
            "startup_s": page["loadS"], "bundle_bytes": page["bundleBytes"], "page_bytes": page["pageBytes"],
            "threads": page["threads"], "isolated": page["isolated"], "tokens": full["tokenIds"]}


def measure(bundle: Path, patch: str, args: argparse.Namespace) -> tuple[dict[str, list[dict]], dict]:
    runs: dict[str, list[dict]] = {"python": [], "browser": []}
    loads, window = [], CpuWindow.start()
    for round_index in range(args.repeats):
        order = ("python", "browser") if round_index % 2 == 0 else ("browser", "python")
        for engine in order:
            loads.append(os.getloadavg()[0])
            run = (python_round if engine == "python" else browser_round)(bundle, patch, args)
            runs[engine].append(run)
            shown = f"{run['decode_tok_s']:.1f} tok/s" if "decode_tok_s" in run else run["error"]
            print(f"round {round_index + 1}/{args.repeats}  {engine:8s} {shown}", flush=True)
    return runs, {"median": statistics.median(loads), "min": min(loads), "max": max(loads),
                  "foreign_cores": window.foreign_cores()}


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def section(runs: dict[str, list[dict]], load: dict, load_before: tuple, bundle: Path, args: argparse.Namespace,
            command: str) -> list[str]:
    """The "Browser" section of docs/benchmarks.md: median (min–max) over rounds, ratios paired per round."""
    failed = {e: [r["error"] for r in rs if "error" in r] for e, rs in runs.items()}
    if any(failed.values()):
        raise SystemExit(f"a round failed: {failed}; nothing written")
    py, web = runs["python"], runs["browser"]
    ratios = [w["decode_tok_s"] / p["decode_tok_s"] for p, w in zip(py, web)]
    same = [f"{common_prefix(p['tokens'], w['tokens'])}/{len(w['tokens'])}" for p, w in zip(py, web)]
    size = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())
    met = "met" if statistics.median(ratios) >= 0.5 else "**not met**"
    rows = [
        "| engine | decode tok/s | TTFT ms | start-up s | downloaded MB |",
        "|---|---|---|---|---|",
        f"| Python runtime (onnxruntime {package_version('onnxruntime')}, CPU) "
        f"| {spread([r['decode_tok_s'] for r in py])} | {spread([r['ttft_ms'] for r in py], 0)} "
        f"| {spread([r['startup_s'] for r in py], 2)} | — (reads the {size / 1e6:.0f} MB bundle from disk) |",
        f"| Chromium, onnxruntime-web {web_version()} (wasm, {web[0]['threads']} threads) "
        f"| {spread([r['decode_tok_s'] for r in web])} | {spread([r['ttft_ms'] for r in web], 0)} "
        f"| {spread([r['startup_s'] for r in web], 2)} "
        f"| {web[0]['bundle_bytes'] / 1e6:.1f} bundle, {web[0]['page_bytes'] / 1e6:.1f} in all |",
    ]
    return [
        BROWSER_HEADING,
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the web runtime "
        f"(`runtime/web`, the demo page driven in Debian's Chromium {chromium_version()}, headless, cross-origin "
        f"isolated: {web[0]['isolated']}) against the Python runtime, on the same default-model int4 bundle with "
        f"the emoji patch, {args.new_tokens} greedy tokens (EOS ignored) from the 64-token prompt, "
        f"{args.threads} threads each, {args.repeats} round(s) alternating which runs first.",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {memory_total()} RAM; no GPU.",
        f"- Load: 1-minute load average {' / '.join(f'{v:.2f}' for v in load_before)} (1 / 5 / 15 min) before "
        f"the run, {load['min']:.2f}–{load['max']:.2f} (median {load['median']:.2f}) during it, our own threads "
        f"included; other processes kept {load['foreign_cores']:.2f} of {os.cpu_count()} cores busy on average.",
        "",
        *rows,
        "",
        f"Browser / Python decode speed, paired per round: **{spread(ratios, 2)}x** (goal ≥ 0.5x: {met}). "
        f"Greedy tokens equal from the start: {', '.join(same)} "
        f"per round (the wasm MatMulNBits kernel computes in float, native onnxruntime quantizes activations to "
        f"int8: docs/web.md). TTFT: from the text prompt to the first "
        f"token, chat template, tokenization and patch placement included. Start-up: Python, imports and model "
        f"load in a fresh process; browser, from opening the page to the model being ready (download from "
        f"localhost, session creation), a first visit. Downloaded: response bodies the page fetched (a returning "
        f"visitor takes the bundle from Cache Storage). Why the page is slow, and what might fix it: docs/web.md, "
        f"Limits.",
        "",
    ]


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
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="the report to put the section in")
    args = parser.parse_args()
    if args.repeats < 1 or args.new_tokens < 2 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1, --new-tokens at least 2")
    return args


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()
    bundle, patch = prepare()
    runs, load = measure(bundle, patch, args)
    command = " ".join(["python -m benchmarks.web_speed", *sys.argv[1:]])
    lines = section(runs, load, load_before, bundle, args, command)
    put_section(Path(args.out), BROWSER_HEADING, lines)
    print("\n".join(["", *lines, f"wrote the {BROWSER_HEADING[3:]} section of {args.out}"]))


if __name__ == "__main__":
    main()
