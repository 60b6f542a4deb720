"""Inference and training speed of reft-edge against its references, measured side by side in one run.

    python -m benchmarks.run                      # 5 rounds, 128 new tokens: docs/benchmarks.md
                                                  # and docs/benchmark_decode.png
    python -m benchmarks.run --quick              # 1 round, 32 new tokens, 10 training steps
    python -m benchmarks.run --repeats 5 --skip-genai --skip-train --out /tmp/bench.md

Configurations: transformers eager fp32 with and without the emoji patch (hooks of the
training stage), reft-edge bundles at fp32 / int8 / int4 (slots at all 30 layers) with
the patch and with no patch, slot-free fp32 and int4 bundles (`--slot-layers none`,
what the slots cost), and onnxruntime-genai
fp32 / int4 built from the same base by its own model builder (optional: `pip install
onnxruntime-genai`). Each configuration runs in its own process (so peak RSS is its
own), all at the same thread count; one round runs every configuration once, in an
order rotated each round, so that load from other processes spreads over all of them
instead of biasing one. Tables give the median and the min-max over rounds; ratios are
taken within a round (paired), then summarised the same way.

Bundles and genai models are built once into $REFT_EDGE_CACHE/bench (reused when up
to date); the demo's int8 bundle and emoji patch are reused when present. The chart
needs matplotlib, a benchmark-only dependency (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
PROMPT = (
    "I am planning a week-long trip to the mountains next month with two friends who have never hiked "
    "before. What should we pack, and how should we train?"
)  # 64 tokens once chat-formatted
EMOJI_DATA = ROOT / "examples" / "emoji" / "train.jsonl"
WORKER_TIMEOUT_S = 600


@dataclass
class Config:
    """One measured configuration and the files it runs."""

    name: str
    engine: str  # runtime | transformers | genai
    path: str
    patch: str | None = None
    weight_bytes: int | None = None  # the model files' size, for the RSS goal


@dataclass
class Setup:
    """What the preparation step made, and what it had to leave out (with why)."""

    configs: list[Config]
    prompt_text: str
    notes: list[str] = field(default_factory=list)


# -- preparation -----------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> Setup:
    from reft_edge.files import cache_dir
    from reft_edge.train.backbone import load_backbone

    backbone = load_backbone()
    bench = cache_dir() / "bench"
    bench.mkdir(exist_ok=True)
    patch = find_or_train_patch(backbone, cache_dir(), bench)
    prompt_text = backbone.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    configs = [
        Config("transformers eager fp32", "transformers", backbone.path),
        Config("transformers eager fp32 + patch", "transformers", backbone.path, patch),
    ]
    for label, folder in bundles(backbone, cache_dir(), bench).items():
        size = bundle_weight_bytes(folder)
        if "slot-free" not in label:  # a patch needs slots
            configs.append(Config(f"reft-edge {label} + patch", "runtime", str(folder), patch, size))
        configs.append(Config(f"reft-edge {label}", "runtime", str(folder), None, size))
    setup = Setup(configs, prompt_text)
    if args.skip_genai:
        setup.notes.append("onnxruntime-genai skipped (--skip-genai).")
    else:
        add_genai(setup, backbone.path, bench)
    return setup


def find_or_train_patch(backbone, cache: Path, bench: Path) -> str:
    """The demo's emoji patch if it fits this base, else one trained with the demo's recipe."""
    from reft_edge.runtime import Patch
    from reft_edge.train import TrainConfig, train

    for path in (cache / "demo" / "emoji.reft", bench / "emoji.reft"):
        if path.is_file() and Patch.load(path).base_fingerprint == backbone.fingerprint:
            return str(path)
    out = bench / "emoji.reft"
    train(
        TrainConfig(
            data=str(EMOJI_DATA), out=str(out), layers=(15,), rank=4, positions="f2+l2", steps=60, batch_size=12
        ),
        backbone=backbone,
        progress=False,
    )
    return str(out)


def bundles(backbone, cache: Path, bench: Path) -> dict[str, Path]:
    """label -> bundle folder (slots at every layer, or none: "slot-free")."""
    from reft_edge.export import ExportConfig, export_bundle

    demo_int8 = cache / "demo" / f"bundle-{backbone.fingerprint[:12]}-int8"
    wanted = {
        "fp32": (bench / "fp32", "fp32", None),
        "fp32 slot-free": (bench / "fp32-slot-free", "fp32", ()),
        "int8": (demo_int8 if demo_int8.is_dir() else bench / "int8", "int8", None),
        "int4": (bench / "int4", "int4", None),
        "int4 slot-free": (bench / "int4-slot-free", "int4", ()),
    }
    for folder, precision, slots in wanted.values():
        print(f"bundle {folder} ({precision})", flush=True)
        export_bundle(
            ExportConfig(out=str(folder), precision=precision, slot_layers=slots), backbone=backbone, progress=False
        )
    return {label: folder for label, (folder, _, _) in wanted.items()}


def bundle_weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("model.onnx*"))


def add_genai(setup: Setup, model_dir: str, bench: Path) -> None:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        setup.notes.append("onnxruntime-genai skipped: not installed (`pip install onnxruntime-genai`).")
        return
    for precision in ("fp32", "int4"):
        folder = bench / f"genai-{precision}"
        error = build_genai(model_dir, folder, precision)
        if error:
            setup.notes.append(f"onnxruntime-genai {precision} skipped: its model builder failed ({error}).")
            continue
        setup.configs.append(
            Config(f"onnxruntime-genai {precision}", "genai", str(folder), None, bundle_weight_bytes(folder))
        )


def build_genai(model_dir: str, folder: Path, precision: str) -> str | None:
    """Build with onnxruntime-genai's own builder into a temporary folder, renamed when complete;
    returns None, or the builder's last error line."""
    if (folder / "genai_config.json").is_file():
        return None
    print(f"onnxruntime-genai builder -> {folder}", flush=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        out = Path(work) / "model"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                model_dir,
                "-o",
                str(out),
                "-p",
                precision,
                "-e",
                "cpu",
                "-c",
                str(Path(work) / "cache"),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 or not (out / "genai_config.json").is_file():
            lines = (done.stderr or done.stdout).strip().splitlines()
            return lines[-1] if lines else f"exit status {done.returncode}"
        out.rename(folder)
    return None


# -- measurement -----------------------------------------------------------------------------------


@dataclass
class CpuWindow:
    """Cores kept busy by other processes while we measured: all busy CPU time (/proc/stat)
    minus our own and our workers' (getrusage), over the wall time."""

    wall: float
    busy: float
    ours: float

    @classmethod
    def start(cls) -> CpuWindow:
        return cls(time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds())

    def foreign_cores(self) -> float:
        busy, ours = busy_cpu_seconds() - self.busy, own_cpu_seconds() - self.ours
        return max(0.0, (busy - ours) / (time.perf_counter() - self.wall))


def busy_cpu_seconds() -> float:
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    return sum(
        u.ru_utime + u.ru_stime
        for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def measure(setup: Setup, args: argparse.Namespace) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Every configuration once per round, the order rotated each round; returns name -> per-round
    results ({"error": ...} where the worker failed) and the load seen."""
    results: dict[str, list[dict]] = {c.name: [] for c in setup.configs}
    loads, window = [], CpuWindow.start()
    for round_index in range(args.repeats):
        shift = round_index % len(setup.configs)
        for config in setup.configs[shift:] + setup.configs[:shift]:
            loads.append(os.getloadavg()[0])
            results[config.name].append(run_worker(config, setup, args))
            summary = results[config.name][-1]
            shown = f"{summary['decode_tok_s']:.1f} tok/s" if summary.get("decode_tok_s") else summary["error"]
            print(f"round {round_index + 1}/{args.repeats}  {config.name:40s} {shown}", flush=True)
    load = {
        "load_min": min(loads),
        "load_max": max(loads),
        "load_median": statistics.median(loads),
        "foreign_cores": window.foreign_cores(),
    }
    return results, load


def run_worker(config: Config, setup: Setup, args: argparse.Namespace) -> dict:
    spec = {
        "engine": config.engine,
        "path": config.path,
        "patch": config.patch,
        "prompt": PROMPT,
        "prompt_text": setup.prompt_text,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = done.stderr.strip().splitlines()
        return {"error": errors[-1] if errors else f"exit status {done.returncode}"}
    return json.loads(lines[-1])


# -- training speed ---------------------------------------------------------------------------------


def training_rows(steps: int, threads: int) -> dict[str, float]:
    """benchmarks.train_speed's two loops, one after the other, on one loaded backbone."""
    import torch

    from benchmarks import train_speed
    from reft_edge.train.backbone import load_backbone

    torch.set_num_threads(threads)
    backbone = load_backbone()
    window = CpuWindow.start()
    ours_s, ours_loss = train_speed.recipe(backbone, steps)
    ref_s, ref_loss = train_speed.reference_loop(backbone, steps)
    return {
        "steps": steps,
        "ours_s": ours_s,
        "ours_loss": ours_loss,
        "ref_s": ref_s,
        "ref_loss": ref_loss,
        "foreign_cores": window.foreign_cores(),
    }


# -- environment -----------------------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict[str, str]:
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": memory_total(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "threads": str(args.threads),
        **{
            name: package_version(name)
            for name in ("reft-edge", "torch", "transformers", "onnxruntime", "onnxruntime-genai", "numpy")
        },
    }


def cpu_model() -> str:
    lscpu = shutil.which("lscpu")
    if lscpu:
        for line in subprocess.run([lscpu], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_total() -> str:
    with open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
    return f"{kib / 2**20:.0f} GiB"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


# -- main -----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 32 new tokens, 10 training steps")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 5, --quick 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default 128, --quick 32)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every engine")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (default 60, --quick 10)")
    parser.add_argument("--skip-genai", action="store_true", help="leave out onnxruntime-genai")
    parser.add_argument("--skip-train", action="store_true", help="leave out the training-speed rows")
    parser.add_argument(
        "--out",
        default=str(ROOT / "docs" / "benchmarks.md"),
        help="the report; the chart goes next to it as benchmark_decode.png",
    )
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.train_steps = args.train_steps or (10 if args.quick else 60)
    if args.repeats < 1 or args.new_tokens < 2 or args.threads < 1 or args.train_steps < 1:
        parser.error("--repeats, --threads and --train-steps must be at least 1, --new-tokens at least 2")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()
    setup = prepare(args)
    results, load = measure(setup, args)
    load["before"] = load_before
    training = None if args.skip_train else training_rows(args.train_steps, args.threads)
    out = Path(args.out)
    report.write(
        out,
        report.Report(
            setup.configs,
            results,
            load,
            training,
            environment(args),
            setup.notes,
            vars(args),
            time.perf_counter() - started,
        ),
    )
    print(f"wrote {out} and {out.with_name(report.CHART_NAME)} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
