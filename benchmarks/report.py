"""Turn one run of benchmarks.run into docs/benchmarks.md and a decode-speed chart.

    python -m benchmarks.run     # calls write(); this module has no command of its own

Every number in the tables comes from the run; the export section quotes figures a
separate measurement recorded here, and says so. The "Browser" and "Many people in one job"
sections are benchmarks.web_speed's and benchmarks.train_many's own runs: a new report keeps
them as they were (``KEPT_SECTIONS``, ``section``/``put_section``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

CHART_NAME = "benchmark_decode.png"
MB = 1e6
BROWSER_HEADING = "## Browser"  # written by benchmarks.web_speed
EXPORT_HEADING = "## Export (separate measurement)"

# Export of the default model (fused graph, verification included), /usr/bin/time -v on a quiet machine; not this run's
EXPORT_FIGURES = [
    ("fp32", "17", "2.69 GB", "544 MB"),
    ("fp16", "17", "2.54 GB", "274 MB"),
    ("int8", "21", "2.87 GB", "296 MB"),
    ("int4", "20", "2.87 GB", "108 MB"),
]

# Names benchmarks.run gives its configurations
HF, HF_PATCH = "transformers eager fp32", "transformers eager fp32 + patch"
FP32, FP32_PATCH = "reft-edge fp32", "reft-edge fp32 + patch"
FP32_FREE, INT4_FREE = "reft-edge fp32 slot-free", "reft-edge int4 slot-free"
INT8, INT8_PATCH = "reft-edge int8", "reft-edge int8 + patch"
INT4, INT4_PATCH = "reft-edge int4", "reft-edge int4 + patch"
GENAI_FP32, GENAI_INT4 = "onnxruntime-genai fp32", "onnxruntime-genai int4"


@dataclass
class Report:
    configs: list  # benchmarks.run.Config
    results: dict[str, list[dict]]  # name -> one result per round ({"error": ...} on failure)
    load: dict
    training: dict | None
    env: dict[str, str]
    notes: list[str]
    args: dict
    seconds: float

    def values(self, name: str, metric: str) -> list[float]:
        return [r[metric] for r in self.results.get(name, []) if r.get(metric) is not None]

    def paired(self, a: str, b: str, metric: str, combine: Callable[[float, float], float]) -> list[float]:
        """combine(a, b) per round where both ran: the rounds share the machine's state."""
        pairs = zip(self.results.get(a, []), self.results.get(b, []))
        return [combine(x[metric], y[metric]) for x, y in pairs if metric in x and metric in y]


def write(out: Path, report: Report) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    chart(out.with_name(CHART_NAME), report)
    kept = [section(out, heading) for heading in KEPT_SECTIONS]
    out.write_text("\n".join(markdown(report)) + "\n")
    for heading, lines in zip(KEPT_SECTIONS, kept):
        if lines:
            put_section(out, heading, lines)


# Sections that other benchmarks write into the same file (benchmarks.web_speed, benchmarks.train_many);
# a run of this one keeps them as they were.
KEPT_SECTIONS = (BROWSER_HEADING, "## Many people in one job")


def section(path: Path, heading: str) -> list[str]:
    """The lines of one "## " section of a markdown file, heading included ([] when absent)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    if heading not in lines:
        return []
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def put_section(path: Path, heading: str, new: list[str]) -> None:
    """Replace that section with ``new`` (which ends with a blank line), or add it before the export section."""
    lines = path.read_text().splitlines()
    old = section(path, heading)
    at = lines.index(heading) if old else lines.index(EXPORT_HEADING) if EXPORT_HEADING in lines else len(lines)
    lines[at : at + len(old)] = new
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


# -- formatting ------------------------------------------------------------------------------------


def spread(values: list[float], digits: int = 1, scale: float = 1.0) -> str:
    """median (min–max), or the one value, or n/a."""
    if not values:
        return "n/a"
    values = [v / scale for v in values]
    median = f"{statistics.median(values):.{digits}f}"
    if len(values) == 1:
        return median
    return f"{median} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def ratio(values: list[float]) -> str:
    return spread(values, 2) + "x" if values else "n/a"


def percent(values: list[float]) -> str:
    if not values:
        return "n/a"
    shown = [f"{100 * v:+.1f}%" for v in (statistics.median(values), min(values), max(values))]
    return shown[0] if len(values) == 1 else f"{shown[0]} ({shown[1]} to {shown[2]})"


def verdict(values: list[float], passes: Callable[[float], bool]) -> str:
    if not values:
        return "not measured"
    return "met" if passes(statistics.median(values)) else "**not met**"


def faster(a: float, b: float) -> float:
    return a / b


def slower(a: float, b: float) -> float:
    """Extra decode time of the configuration with a over the one with b (tok/s given)."""
    return b / a - 1


# -- the document ----------------------------------------------------------------------------------


def markdown(r: Report) -> list[str]:
    return [*header(r), *goals(r), *inference_table(r), *ratios(r), *training(r), *export_section(), *method(r)]


def header(r: Report) -> list[str]:
    e, load, a = r.env, r.load, r.args
    command = " ".join(
        [
            "python -m benchmarks.run",
            f"--repeats {a['repeats']}",
            f"--new-tokens {a['new_tokens']}",
            f"--threads {a['threads']}",
            f"--train-steps {a['train_steps']}",
            *(["--skip-genai"] if a["skip_genai"] else []),
            *(["--skip-train"] if a["skip_train"] else []),
        ]
    )
    return [
        "# Benchmarks",
        "",
        f"Generated by `{command}` ({r.seconds / 60:.0f} min) on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
        "Every number below comes from that one run, except the export section, which quotes a separate "
        "measurement, and the Browser section, which has its own run (`python -m benchmarks.web_speed`). "
        "Reproduce with `make bench` or `.venv/bin/python -m benchmarks.run` (the defaults are the command "
        "above; `--quick` is a 1-round smoke run).",
        "",
        f"- Machine: {e['cpu']}, {e['cores']} cores, {e['memory']} RAM, {e['os']}; no GPU.",
        f"- Versions: Python {e['python']}, reft-edge {e['reft-edge']}, torch {e['torch']}, transformers "
        f"{e['transformers']}, onnxruntime {e['onnxruntime']}, onnxruntime-genai {e['onnxruntime-genai']}, "
        f"numpy {e['numpy']}.",
        f"- Threads: {e['threads']} intra-op threads for every engine (torch.set_num_threads, onnxruntime "
        "session options, genai session options).",
        f"- Load: 1-minute load average {load['before'][0]:.2f} / {load['before'][1]:.2f} / "
        f"{load['before'][2]:.2f} (1 / 5 / 15 min) before the run; during it "
        f"{load['load_min']:.2f}–{load['load_max']:.2f} (median {load['load_median']:.2f}), which includes "
        f"the benchmark's own {e['threads']} threads. Other processes kept {load['foreign_cores']:.2f} of "
        f"{e['cores']} cores busy on average while the inference rounds ran (/proc/stat minus our own CPU time).",
        "- The CUDA path (onnxruntime-gpu, fp16 bundles) was not measured: no GPU in this session.",
        "",
        f"![decode tokens per second]({CHART_NAME})",
        "",
    ]


def goals(r: Report) -> list[str]:
    int4_vs_genai = r.paired(INT4_PATCH, GENAI_INT4, "decode_tok_s", faster)
    fp32_vs_hf = r.paired(FP32_PATCH, HF, "decode_tok_s", faster)
    fp32_vs_hf_patch = r.paired(FP32_PATCH, HF_PATCH, "decode_tok_s", faster)
    patch_cost = r.paired(FP32_PATCH, FP32, "decode_tok_s", slower)
    slot_cost_fp32 = r.paired(FP32_PATCH, FP32_FREE, "decode_tok_s", slower)
    slot_cost_int4 = r.paired(INT4_PATCH, INT4_FREE, "decode_tok_s", slower)
    worst, rss = worst_rss_ratio(r)
    ttft = ", ".join(
        f"{name.removeprefix('reft-edge ')} {spread(r.values(name, 'ttft_ms'), 0)} ms"
        for name in (FP32_PATCH, INT8_PATCH, INT4_PATCH)
        if r.values(name, "ttft_ms")
    )
    rows = [
        (
            "int4 bundle + patch decode vs onnxruntime-genai int4 (no patch)",
            "≥ 0.8x (goal 1.0x)",
            ratio(int4_vs_genai),
            int4_status(int4_vs_genai),
        ),
        (
            "fp32 bundle + patch decode vs transformers eager fp32 (no patch)",
            "≥ 1.3x",
            ratio(fp32_vs_hf),
            verdict(fp32_vs_hf, lambda v: v >= 1.3),
        ),
        (
            "… vs transformers eager fp32 with the same patch (hooks)",
            "≥ 1.3x",
            ratio(fp32_vs_hf_patch),
            verdict(fp32_vs_hf_patch, lambda v: v >= 1.3),
        ),
        (
            "slot overhead: fp32 + patch vs fp32 zero patch (extra decode time)",
            "≤ 3%",
            percent(patch_cost),
            verdict(patch_cost, lambda v: v <= 0.03),
        ),
        (
            "slot overhead: fp32, 30 slots + patch vs the slot-free export",
            "≤ 3%",
            percent(slot_cost_fp32),
            verdict(slot_cost_fp32, lambda v: v <= 0.03),
        ),
        (
            "slot overhead: int4, 30 slots + patch vs the slot-free export",
            "≤ 3%",
            percent(slot_cost_int4),
            verdict(slot_cost_int4, lambda v: v <= 0.03),
        ),
        (f"time to first token, {prompt_tokens(r)}-token prompt, with the patch", "reported", ttft or "n/a", "—"),
        (f"peak RSS / bundle weight bytes (worst: {worst})", "≤ 1.5x", ratio(rss), verdict(rss, lambda v: v <= 1.5)),
    ]
    return [
        "## Goals",
        "",
        "| goal | target | measured: median (min–max over rounds) | status |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
    ]


def int4_status(values: list[float]) -> str:
    if not values:
        return "not measured"
    median = statistics.median(values)
    return "met" if median >= 1.0 else "0.8x floor met, 1.0x goal not" if median >= 0.8 else "**not met**"


def worst_rss_ratio(r: Report) -> tuple[str, list[float]]:
    """The runtime configuration whose median peak RSS is largest against its model files."""
    per_config = {
        c.name: [v / c.weight_bytes for v in r.values(c.name, "peak_rss_bytes")]
        for c in r.configs
        if c.engine == "runtime" and r.values(c.name, "peak_rss_bytes")
    }
    if not per_config:
        return "n/a", []
    name = max(per_config, key=lambda n: statistics.median(per_config[n]))
    return name, per_config[name]


def prompt_tokens(r: Report) -> str:
    counts = {x["prompt_tokens"] for runs in r.results.values() for x in runs if "prompt_tokens" in x}
    return "/".join(str(n) for n in sorted(counts)) or "?"


def inference_table(r: Report) -> list[str]:
    n = r.args["new_tokens"]
    lines = [
        "## Inference",
        "",
        f"Greedy decoding of {n} new tokens (EOS ignored) from one chat-formatted prompt; median "
        "(min–max) over rounds. Decode = tokens per second over the steps after the first token; "
        "prefill = the prompt's forward pass and the first token's pick; TTFT = from a text prompt to "
        "the first token (chat template, tokenization and patch placement included); start-up = library "
        "imports plus model load in a fresh process; RSS = the process's peak. The patch is the "
        f"demo's emoji persona (layer 15, rank 4, positions f2+l2). 'Tokens as transformers' counts the "
        "greedy tokens, from the start, that equal transformers eager fp32 with the same patch (or none).",
        "",
        "| configuration | decode tok/s | prefill ms | TTFT ms | peak RSS MB | start-up s | patch load ms "
        "| model files MB | tokens as transformers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config in r.configs:
        errors = [x["error"] for x in r.results.get(config.name, []) if "error" in x]
        if len(errors) == len(r.results.get(config.name, [])):
            lines.append(f"| {config.name} | failed: {errors[0] if errors else 'not run'} |||||||| ")
            continue
        cells = [
            spread(r.values(config.name, metric), digits, scale)
            for metric, digits, scale in (
                ("decode_tok_s", 1, 1),
                ("prefill_ms", 0, 1),
                ("ttft_ms", 0, 1),
                ("peak_rss_bytes", 0, MB),
                ("startup_s", 2, 1),
                ("patch_load_ms", 1, 1),
            )
        ]
        if not config.patch:
            cells[-1] = "—"
        size = f"{config.weight_bytes / MB:.0f}" if config.weight_bytes else "—"
        lines.append(f"| {config.name} | {' | '.join(cells)} | {size} | {agreement(r, config)} |")
    failed = sum("error" in x for runs in r.results.values() for x in runs)
    if failed:
        lines += ["", f"{failed} worker run(s) failed; their rounds are left out of the medians above."]
    return [*lines, ""]


def agreement(r: Report, config) -> str:
    reference = HF_PATCH if config.patch else HF
    ours = next((x["tokens"] for x in r.results.get(config.name, []) if "tokens" in x), None)
    theirs = next((x["tokens"] for x in r.results.get(reference, []) if "tokens" in x), None)
    if ours is None or theirs is None or config.engine == "transformers":
        return "—"
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"{same}/{len(theirs)}"


def ratios(r: Report) -> list[str]:
    rows = [
        ("fp32 + patch / transformers eager fp32 (no patch)", FP32_PATCH, HF),
        ("fp32 + patch / transformers eager fp32 + patch", FP32_PATCH, HF_PATCH),
        ("fp32 (no patch) / transformers eager fp32", FP32, HF),
        ("fp32 (no patch) / onnxruntime-genai fp32", FP32, GENAI_FP32),
        ("int8 + patch / transformers eager fp32", INT8_PATCH, HF),
        ("int4 + patch / onnxruntime-genai int4 (no patch)", INT4_PATCH, GENAI_INT4),
        ("int4 (no patch) / onnxruntime-genai int4", INT4, GENAI_INT4),
        ("fp32 + patch / fp32 (patch vs no patch, 30 slots)", FP32_PATCH, FP32),
        ("int8 + patch / int8", INT8_PATCH, INT8),
        ("int4 + patch / int4", INT4_PATCH, INT4),
        ("fp32 + patch / fp32 slot-free export", FP32_PATCH, FP32_FREE),
        ("int4 + patch / int4 slot-free export", INT4_PATCH, INT4_FREE),
        ("fp32, 30 slots, no patch / fp32 slot-free", FP32, FP32_FREE),
        ("int4, 30 slots, no patch / int4 slot-free", INT4, INT4_FREE),
        ("transformers + patch (hooks) / transformers", HF_PATCH, HF),
    ]
    lines = [
        "## Ratios",
        "",
        "Per round (configurations of one round ran minutes apart on the same machine), then median "
        "(min–max) over rounds. Above 1.00x: the first is faster (decode) or slower (prefill, TTFT).",
        "",
        "| ratio | decode tok/s | prefill ms | TTFT ms |",
        "|---|---|---|---|",
    ]
    for label, a, b in rows:
        if a in r.results and b in r.results:
            lines.append(
                f"| {label} | {ratio(r.paired(a, b, 'decode_tok_s', faster))} | "
                f"{ratio(r.paired(a, b, 'prefill_ms', faster))} | "
                f"{ratio(r.paired(a, b, 'ttft_ms', faster))} |"
            )
    return [*lines, ""]


def training(r: Report) -> list[str]:
    t = r.training
    if t is None:
        return ["## Training", "", "Skipped (--skip-train); `python -m benchmarks.train_speed` runs it alone.", ""]
    steps = t["steps"]
    return [
        "## Training",
        "",
        f"`benchmarks.train_speed`: the emoji recipe ({steps} steps, layer 15, rank 4, f2+l2, batch 12) on the "
        f"default model, {r.env['threads']} threads, one run each, after the inference rounds. The reference is "
        "a plain hook-based LoReFT loop (full forward and full-vocabulary logits every step). Other "
        f"processes kept {t['foreign_cores']:.2f} of {r.env['cores']} cores busy on average meanwhile; "
        "torch slows down far more than in proportion when a core is taken.",
        "",
        "| training loop | seconds | s/step | final loss | speed-up |",
        "|---|---|---|---|---|",
        f"| plain hook loop (reference) | {t['ref_s']:.1f} | {t['ref_s'] / steps:.2f} | {t['ref_loss']:.3f} | 1.00x |",
        f"| reft-edge train | {t['ours_s']:.1f} | {t['ours_s'] / steps:.2f} | {t['ours_loss']:.3f} | "
        f"{t['ref_s'] / t['ours_s']:.2f}x |",
        "",
    ]


def export_section() -> list[str]:
    lines = [
        EXPORT_HEADING,
        "",
        "Not measured by this run: the default model exported once per precision (fused graph, verification "
        "included) with "
        "`/usr/bin/time -v reft-edge export` on a quiet machine of the same kind (2 cores).",
        "",
        "| precision | wall s | peak RSS | bundle size |",
        "|---|---|---|---|",
    ]
    lines += [f"| {p} | {s} | {rss} | {size} |" for p, s, rss, size in EXPORT_FIGURES]
    return [*lines, ""]


def method(r: Report) -> list[str]:
    return [
        "## How it is measured",
        "",
        "- Each configuration runs in its own process (`benchmarks/worker.py`), so its peak RSS "
        "(VmHWM of /proc/self/status) is its own; it warms up with an 8-token generation, then times one "
        "1-token generation (TTFT) and one full generation.",
        "- One round runs every configuration once, the order rotated by one each round, so load from "
        "other processes spreads over all configurations; ratios pair configurations of the same round.",
        "- transformers: `AutoModelForCausalLM` (default attention implementation) in eager PyTorch with "
        "`torch.inference_mode`, a KV cache and `logits_to_keep=1`, as `generate()` would; the patch "
        "runs through `reft_edge.train.intervention.attach_edits`, the hooks the training stage uses.",
        "- reft-edge: `Runtime.load(bundle, threads=N)` and `generate(..., ignore_eos=True)`; the "
        "'no patch' rows pass no patch (rank-0 slot inputs).",
        "- onnxruntime-genai: `python -m onnxruntime_genai.models.builder -i <converted model> -o <out> "
        "-p fp32|int4 -e cpu` on the same converted base; greedy, `min_length = max_length` so EOS "
        "cannot stop it early. It has no patch mechanism, so it always runs without one.",
        "- Slot cost: bundles with slots at all 30 layers against slot-free exports "
        "(`--slot-layers none`) of the same precision, which cannot take a patch.",
        *(f"- {note}" for note in r.notes),
        "- Benchmark-only dependencies: onnxruntime-genai and matplotlib (`pip install onnxruntime-genai "
        "matplotlib`); the project itself does not need them.",
        "",
    ]


# -- the chart -------------------------------------------------------------------------------------


def chart(path: Path, r: Report) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    colours = {"transformers": "#8c8c8c", "runtime": "#2a7ab9", "genai": "#e08a2c"}
    shown = [c for c in r.configs if r.values(c.name, "decode_tok_s")]
    medians = [statistics.median(r.values(c.name, "decode_tok_s")) for c in shown]
    low = [m - min(r.values(c.name, "decode_tok_s")) for m, c in zip(medians, shown)]
    high = [max(r.values(c.name, "decode_tok_s")) - m for m, c in zip(medians, shown)]
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.4))
    rows = range(len(shown))
    axes.barh(rows, medians, xerr=[low, high], color=[colours[c.engine] for c in shown], capsize=3)
    for row, value, above in zip(rows, medians, high):  # right of the error bar, so the two never overlap
        axes.text(value + above + max(medians) * 0.01, row, f"{value:.1f}", va="center", fontsize=8)
    axes.set_yticks(list(rows), [c.name for c in shown], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(
        f"decode tokens/s, median and min–max of {r.args['repeats']} rounds "
        f"({r.env['threads']} threads, {r.env['cores']}-core CPU)"
    )
    axes.set_title(f"SmolLM2-135M-Instruct, greedy decode after a {prompt_tokens(r)}-token prompt", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
