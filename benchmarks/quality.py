"""Recipe study: how well patches personalise data the project never trained on, against a LoRA anchor.

Example::

    python -m benchmarks.quality                                  # every persona, the study's recipes, fp32
    python -m benchmarks.quality --personas signoff,terse --recipes default,prompt-only --precisions fp32,int4
    python -m benchmarks.quality --report-only                    # docs/quality.md from the saved results

For each persona of examples/personas (train.jsonl, val.jsonl, 20 unseen prompts, a judge)
and each recipe (TrainConfig overrides, below), one run: train a patch on the persona's
training pairs (its val.jsonl as validation data when the recipe asks for it), then
measure on the exported bundle(s) with ``reft_edge.runtime.evaluate``: adherence of the
greedy answers to the 20 unseen prompts (48 new tokens), facts kept (runtime/facts.jsonl,
those the base answers correctly), held-out loss on val.jsonl, patch bytes and training
seconds. The LoRA anchor (PEFT, r=8 on q_proj/v_proj, lr 2e-3, 100 steps, batch 8: a
benchmark-only dependency) is trained on the same pairs and measured the same way with
the torch model. Results go to benchmarks/results/quality.json (one entry per run,
merged across invocations), then docs/quality.md and docs/quality.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PERSONAS = ROOT / "examples" / "personas"
RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
DOC, PLOT = ROOT / "docs" / "quality.md", ROOT / "docs" / "quality.png"
MAX_NEW_TOKENS = 48
SPREAD = (3, 9, 15, 21, 27)  # five of the default model's 30 layers, evenly apart

# Each recipe: TrainConfig overrides on top of the defaults ("default" = none). "val" means
# the persona's val.jsonl is given as --val-data (early stopping, best step kept).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "old-default": {"layers": (15,), "rank": 4, "positions": "f1+l1", "steps": 100, "lr": 4e-3},
    "default-val": {"val": True, "steps": 120},  # the default recipe, stopped early on val.jsonl
    "prompt-only": {"layers": SPREAD, "rank": 2, "positions": "f3+l3", "steps": 60, "lr": 2e-3},
    "every-token": {"layers": SPREAD, "rank": 2, "positions": "p+g", "steps": 60, "lr": 2e-3},
    "last+gen": {"layers": SPREAD, "rank": 2, "positions": "l1+g", "steps": 60, "lr": 2e-3},
    "gen-only": {"layers": SPREAD, "rank": 2, "positions": "g", "steps": 60, "lr": 2e-3},
    "last+gen-val": {"layers": SPREAD, "rank": 2, "positions": "l1+g", "steps": 120, "lr": 2e-3, "val": True},
    "last+gen-20": {"layers": SPREAD, "rank": 2, "positions": "l1+g", "steps": 20, "lr": 2e-3},
    "one-layer-gen": {"layers": (15,), "rank": 4, "positions": "l1+g", "steps": 60, "lr": 2e-3},
    "all-layers-r1": {"layers": tuple(range(0, 30, 2)), "rank": 1, "positions": "l1+g", "steps": 60, "lr": 2e-3},
    # retention: the base's own answers to general prompts trained with the patch on (TrainConfig.retain_weight)
    "retain-0.5": {"retain_weight": 0.5},
    "retain-1": {"retain_weight": 1.0},
    "retain-2": {"retain_weight": 2.0},
}
LORA = "lora-anchor"


@dataclass(frozen=True)
class Persona:
    name: str
    kind: str
    judge: str
    keeps_content: bool
    folder: Path

    @classmethod
    def load(cls, folder: Path) -> Persona:
        spec = json.loads((folder / "persona.json").read_text())
        return cls(spec["name"], spec["kind"], spec["judge"], bool(spec["keeps_content"]), folder)


def load_personas(names: list[str] | None) -> list[Persona]:
    found = {p.name: Persona.load(p) for p in sorted(PERSONAS.iterdir()) if (p / "persona.json").is_file()}
    unknown = sorted(set(names or []) - set(found))
    if unknown:
        raise SystemExit(f"unknown persona(s) {unknown}; known: {sorted(found)}")
    return [found[n] for n in names] if names else list(found.values())


def export_bundles(precisions: list[str], cache: Path) -> dict[str, Path]:
    """The default model's bundles, exported once into ``cache`` (slots at every layer)."""
    from reft_edge.export import ExportConfig, export_bundle

    bundles = {}
    for precision in precisions:
        out = cache / f"bundle-{precision}"
        if not (out / "manifest.json").is_file():
            export_bundle(ExportConfig(out=str(out), precision=precision), progress=True)
        bundles[precision] = out
    return bundles


def train_patch(persona: Persona, recipe: str, backbone: Any, folder: Path) -> tuple[Path, float]:
    from reft_edge.train import TrainConfig
    from reft_edge.train.recipe import train

    overrides = dict(RECIPES[recipe])
    val = overrides.pop("val", False)
    config = TrainConfig(
        data=str(persona.folder / "train.jsonl"),
        out=str(folder / f"{persona.name}-{recipe}.reft"),
        val_data=str(persona.folder / "val.jsonl") if val else None,
        **overrides,
    )
    started = time.perf_counter()
    train(config, backbone=backbone, progress=False)
    return Path(config.out), time.perf_counter() - started


def measure(runtime: Any, persona: Persona, patches: list[Path]) -> dict[str, Any]:
    from reft_edge.runtime.evaluate import FACTS_FILE, TEST_FACTS_FILE, evaluate

    # facts kept on the test split, which no recipe choice looks at
    unseen = evaluate(
        runtime,
        data=persona.folder / "unseen.txt",
        patches=patches,
        judge=persona.judge,
        max_new_tokens=MAX_NEW_TOKENS,
        facts=True,
        facts_file=TEST_FACTS_FILE,
        samples=3,
    ).to_dict()
    heldout = evaluate(
        runtime, data=persona.folder / "val.jsonl", patches=patches, facts=False, samples=0, max_new_tokens=1
    ).to_dict()
    # the development split: what recipe choices look at (the test split above is only reported)
    dev = evaluate(
        runtime,
        data=persona.folder / "unseen.txt",
        patches=patches,
        facts=True,
        facts_file=FACTS_FILE,
        samples=0,
        max_new_tokens=1,
    ).to_dict()["retention"]
    return {
        "adherence": unseen["adherence"]["patched"],
        "base_adherence": unseen["adherence"]["base"],
        "facts_kept": unseen["retention"]["fraction"],
        "facts_base": unseen["retention"]["base_correct"],
        "facts_file": "test",
        "loops": unseen["adherence"]["loops_patched"],
        "facts_kept_dev": dev["fraction"],
        "facts_base_dev": dev["base_correct"],
        "val_loss": heldout["loss"]["patched"],
        "val_loss_base": heldout["loss"]["base"],
        "samples": unseen["samples"],
    }


def run_patch(persona: Persona, recipe: str, backbone: Any, runtimes: dict[str, Any], folder: Path) -> dict:
    from reft_edge.runtime import Patch

    path, seconds = train_patch(persona, recipe, backbone, folder)
    patch = Patch.from_file(path)
    result = {
        "persona": persona.name,
        "recipe": recipe,
        "bytes": patch.size_bytes,
        "train_s": round(seconds, 1),
        "steps_run": patch.training.get("steps_run"),
        "best_step": patch.training.get("best_step"),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in RECIPES[recipe].items()},
    }
    result["by_precision"] = {precision: measure(rt, persona, [path]) for precision, rt in runtimes.items()}
    return result


def run_lora(persona: Persona, backbone: Any, folder: Path) -> dict:
    from benchmarks.lora_anchor import measure_lora

    return {"persona": persona.name, "recipe": LORA, **measure_lora(persona, backbone, folder, MAX_NEW_TOKENS)}


def load_results() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else []


def save_results(results: list[dict]) -> None:
    from reft_edge.files import atomic_write_bytes

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS, (json.dumps(results, indent=1, sort_keys=True) + "\n").encode())


def merge(results: list[dict], entry: dict) -> list[dict]:
    """Replace the entry of the same persona and recipe (a re-run supersedes the old figures)."""
    return [r for r in results if (r["persona"], r["recipe"]) != (entry["persona"], entry["recipe"])] + [entry]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--personas", default=None, help="comma list (default: all of examples/personas)")
    parser.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help=f"comma list of {', '.join(RECIPES)}; 'none' (only the LoRA anchor)",
    )
    parser.add_argument("--precisions", default="fp32", help="bundles to measure on: fp32,int8,int4")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True, help="train the LoRA anchor")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "reft-edge-quality"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        run_study(args)
    from benchmarks.quality_report import write_report

    write_report(load_results(), DOC, PLOT)
    print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")


def run_study(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from reft_edge.runtime import Runtime
    from reft_edge.train.backbone import load_backbone

    personas = load_personas(args.personas.split(",") if args.personas else None)
    recipes = [] if args.recipes == "none" else args.recipes.split(",")
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    runtimes = {p: Runtime.load(b, threads=2) for p, b in export_bundles(args.precisions.split(","), cache).items()}
    backbone = load_backbone()
    results = load_results()
    runs = [(persona, recipe) for persona in personas for recipe in recipes + ([LORA] if args.lora else [])]
    with tempfile.TemporaryDirectory() as folder:
        for persona, recipe in tqdm(runs, desc="quality", unit="run"):
            entry = (
                run_lora(persona, backbone, Path(folder))
                if recipe == LORA
                else run_patch(persona, recipe, backbone, runtimes, Path(folder))
            )
            results = merge(results, entry)
            save_results(results)
            shown = entry["by_precision"].get("fp32") or next(iter(entry["by_precision"].values()))
            tqdm.write(
                f"{persona.name:12s} {recipe:15s} adherence {shown['adherence']:.0%} "
                f"facts {shown['facts_kept']:.0%} val loss {shown['val_loss']:.3f} "
                f"{entry['bytes']} B {entry['train_s']} s"
            )


if __name__ == "__main__":
    main()
