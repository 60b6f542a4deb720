"""Composition study: two personas on one request, for patches trained apart, trained with
``--compose-with``, and trained as two skills of one patch, against LoRA adapters composed.

Example::

    python -m benchmarks.composition --precision fp32,int4 --methods compose-with,lora
    python -m benchmarks.composition --pairs enthusiast+signoff --no-lora
    python -m benchmarks.composition --report-only                 # docs/quality.md from the saved results

A pair is compatible when one answer can show both behaviours (an opener and a closing
phrase; lowercase and bullet points). For each pair (a, b) and each method, the greedy
answers (48 new tokens) to the 40 unseen prompts of both personas are judged with both
judges: a alone, b alone and a + b composed; facts kept (runtime/facts.jsonl) for each.
Methods, all on the default recipe (TrainConfig defaults):

- apart: a and b trained alone, applied together (their rank rows concatenated);
- compose-with: b trained with ``compose_with=(a,)``, applied with a;
- compose-orthogonal: the same, with b's R rows kept orthogonal to a's (``orthogonal_to_partners``);
- skills: one patch with skills a and b (``skills=``), each skill alone and both on;
- lora: PEFT LoRA r=8 q/v adapters (benchmarks.lora_anchor), composed as PEFT composes
  several active adapters: the sum of their weight deltas, measured on the torch model.

Patches are measured through the runtime on each bundle of ``--precision`` (fp32 by
default), each persona's patch trained once and shared by every pair it is in. The pairs in
SELECTION chose the composition method (its teacher, train.evaluate.leading_expert, on their
validation and training prompts; enthusiast+signoff the earlier composition phase); the
others only measure it. Results go to
benchmarks/results/composition.json (merged across invocations), then to the composition
section of docs/quality.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.quality import DOC, MAX_NEW_TOKENS, ROOT, Persona, export_bundles, load_personas

RESULTS = ROOT / "benchmarks" / "results" / "composition.json"
# Pairs of different kinds: opener + closing, language + format, register + length, opener +
# length, topic + opener, language + length, format + closing, register + topic. A pair is
# compatible when one answer can pass both judges (not butler+bullets: "Certainly." is no
# bullet; not lowercase+signoff: "Stay curious!" has a capital).
PAIRS = (
    "enthusiast+signoff",
    "lowercase+bullets",
    "butler+terse",
    "enthusiast+terse",
    "gardener+enthusiast",
    "lowercase+terse",
    "bullets+signoff",
    "butler+gardener",
)
SELECTION = ("enthusiast+signoff", "lowercase+bullets", "butler+terse", "enthusiast+terse")
METHODS = ("apart", "compose-with", "compose-orthogonal", "skills", "lora")
START, END = "<!-- composition:start (written by python -m benchmarks.composition) -->", "<!-- composition:end -->"
# The issue's targets: share of unseen answers that show both behaviours (int4's is lower).
MIN_BOTH = {"fp32": 0.80, "int8": 0.80, "int4": 0.70, "torch-fp32": 0.80}


@dataclasses.dataclass(frozen=True)
class Pair:
    a: Persona
    b: Persona

    @property
    def name(self) -> str:
        return f"{self.a.name}+{self.b.name}"

    def prompts(self) -> list[list[dict[str, str]]]:
        from reft_edge.runtime.evaluate import read_heldout

        return [list(r.messages) for p in (self.a, self.b) for r in read_heldout(p.folder / "unseen.txt")[0]]


def load_pairs(names: Sequence[str]) -> list[Pair]:
    pairs = []
    for name in names:
        a, sep, b = name.partition("+")
        if not sep:
            raise SystemExit(f"--pairs {name!r}: give persona pairs as a+b, e.g. enthusiast+signoff")
        pairs.append(Pair(*load_personas([a, b])))
    return pairs


# -- training -----------------------------------------------------------------------------------


def train_patches(pair: Pair, method: str, backbone: Any, folder: Path) -> tuple[dict[str, list[Any]], float]:
    """{"a": patches for a alone, "b": ..., "ab": both} for one patch method, and training seconds."""
    from reft_edge.runtime import Patch
    from reft_edge.train import TrainConfig, train
    from reft_edge.train.recipe import COMPOSE_TEACHER, recipe_summary, sources_digest

    def fit(out: str, **options: Any) -> Patch:
        """Train, or reuse the patch an earlier run trained from the same data, recipe and partners."""
        config = TrainConfig(out=str(folder / out), **options)
        if Path(config.out).is_file():
            cached = Patch.load(config.out)
            partners = [Patch.load(p).payload_sha256 for p in config.compose_with]
            if (
                cached.training.get("recipe") == recipe_summary(config)
                and cached.training.get("data_sha256") == sources_digest(config)
                and [p["payload_sha256"] for p in cached.training.get("composition", {}).get("with", [])] == partners
                and cached.training.get("composition", {}).get("teacher", COMPOSE_TEACHER) == COMPOSE_TEACHER
            ):
                return cached
        return train(config, backbone=backbone, progress=False)

    data = {p.name: str(p.folder / "train.jsonl") for p in (pair.a, pair.b)}
    started = time.perf_counter()
    alone = {p.name: folder.parent / "alone" / f"{p.name}.reft" for p in (pair.a, pair.b)}
    for name, path in alone.items():  # shared by every pair and method
        path.parent.mkdir(parents=True, exist_ok=True)
        fit(str(path), data=data[name])
    a, b = Patch.load(alone[pair.a.name]), Patch.load(alone[pair.b.name])
    if method == "apart":
        return {"a": [a], "b": [b], "ab": [a, b]}, time.perf_counter() - started
    started = time.perf_counter()
    if method in ("compose-with", "compose-orthogonal"):
        orthogonal = method == "compose-orthogonal"
        with_a = fit(
            f"{pair.b.name}-with-{pair.a.name}{'-orthogonal' if orthogonal else ''}.reft",
            data=data[pair.b.name],
            compose_with=(str(alone[pair.a.name]),),
            orthogonal_to_partners=orthogonal,
        )
        return {"a": [a], "b": [with_a], "ab": [a, with_a]}, time.perf_counter() - started
    skills = fit(f"{pair.name}.reft", skills=((pair.a.name, data[pair.a.name]), (pair.b.name, data[pair.b.name])))
    return (
        {"a": [skills.with_skills([pair.a.name])], "b": [skills.with_skills([pair.b.name])], "ab": [skills]},
        time.perf_counter() - started,
    )


# -- measuring ----------------------------------------------------------------------------------


def judged(pair: Pair, answers: list[str]) -> dict[str, float]:
    from reft_edge.runtime.judges import Judge

    ja, jb = Judge.parse(pair.a.judge), Judge.parse(pair.b.judge)
    share = lambda ok: round(sum(ok) / len(ok), 6)  # noqa: E731
    return {
        "a": share([ja(t) for t in answers]),
        "b": share([jb(t) for t in answers]),
        "both": share([ja(t) and jb(t) for t in answers]),
    }


_FACTS_KEPT: dict[tuple, Any] = {}  # (bundle, patch digests) -> retention: a patch's facts, measured once per run


def measure_patches(pair: Pair, runtime: Any, uses: dict[str, list[Any]]) -> dict[str, Any]:
    from reft_edge.runtime.evaluate import TEST_FACTS_FILE, RuntimeBackend, evaluate
    from reft_edge.runtime.loops import loop_share

    backend, prompts, figures = RuntimeBackend(runtime), pair.prompts(), {}
    facts_txt = _prompts_file(prompts)
    for use, patches in uses.items():
        answers = backend.answers(prompts, patches, None, MAX_NEW_TOKENS)
        key = (str(runtime.bundle_dir), tuple(p.payload_sha256 for p in patches))
        if key not in _FACTS_KEPT:  # the test split: no choice looks at it
            _FACTS_KEPT[key] = evaluate(
                runtime, data=facts_txt, patches=patches, facts=True, samples=0, facts_file=TEST_FACTS_FILE
            ).retention
        kept = _FACTS_KEPT[key]
        figures[use] = {
            **judged(pair, answers),
            "facts_kept": kept.fraction,
            "facts_base": kept.base_correct,
            "facts_file": "test",
            "loops": loop_share(answers),
            "sample": answers[0],
            "sample_b": answers[len(prompts) // 2],
        }
    base = backend.answers(prompts, [], None, MAX_NEW_TOKENS)
    figures["base"] = {
        **judged(pair, base),
        "facts_kept": None,
        "facts_base": None,
        "sample": base[0],
        "sample_b": base[len(prompts) // 2],
    }
    return figures


def measure_lora(pair: Pair, backbone: Any, folder: Path) -> tuple[dict[str, Any], float]:
    """Each adapter merged alone, and both deltas summed (what PEFT computes with both active)."""
    from benchmarks.lora_anchor import train_lora
    from reft_edge.train.evaluate import TorchBackend

    started = time.perf_counter()
    merged = {
        p.name: train_lora(backbone, p.folder / "train.jsonl", folder / f"{p.name}-lora")[0] for p in (pair.a, pair.b)
    }
    seconds = time.perf_counter() - started
    prompts, figures = pair.prompts(), {}

    def measure(use: str, model: Any) -> None:
        adapted = TorchBackend(dataclasses.replace(backbone, model=model))
        answers = adapted.answers(prompts, [], None, MAX_NEW_TOKENS)
        figures[use] = {
            **judged(pair, answers),
            "facts_kept": _torch_facts_kept(backbone, adapted),
            "facts_file": "test",
            "facts_base": None,
            "sample": answers[0],
            "sample_b": answers[len(prompts) // 2],
        }

    a, b = merged[pair.a.name], merged[pair.b.name]
    measure("a", a)
    measure("b", b)
    base_state, a_state = backbone.model.state_dict(), a.state_dict()
    b.load_state_dict({k: v + a_state[k] - base_state[k] for k, v in b.state_dict().items()})
    measure("ab", b)
    return figures, seconds


def _torch_facts_kept(backbone: Any, adapted: Any) -> float | None:
    from benchmarks.lora_anchor import _digest
    from reft_edge.runtime.evaluate import TEST_FACTS_FILE, base_correct_facts, read_facts, user_message
    from reft_edge.train.evaluate import TorchBackend

    facts = read_facts(TEST_FACTS_FILE)
    correct, _ = base_correct_facts(TorchBackend(backbone), facts, _digest(TEST_FACTS_FILE), lambda message: None)
    answers = adapted.answers([user_message(facts[i].question) for i in correct], [], None, 32)
    return round(sum(facts[i].answered_by(a) for i, a in zip(correct, answers)) / len(correct), 6) if correct else None


def _prompts_file(prompts: list[list[dict[str, str]]]) -> Path:
    """evaluate() wants a data file; facts need no prompts of their own, any one line does."""
    path = Path(tempfile.mkstemp(suffix=".txt")[1])
    path.write_text(prompts[0][-1]["content"] + "\n")
    return path


# -- results and report -------------------------------------------------------------------------


def load_results() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else []


def save(results: list[dict], entry: dict) -> list[dict]:
    from reft_edge.files import atomic_write_bytes

    key = lambda r: (r["pair"], r["method"], r.get("precision", "fp32"))  # noqa: E731
    results = [r for r in results if key(r) != key(entry)] + [entry]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS, (json.dumps(results, indent=1, sort_keys=True) + "\n").encode())
    return results


def render(results: list[dict]) -> str:
    pct = lambda v: "—" if v is None else f"{v:.0%}"  # noqa: E731
    lines = [
        "| pair | chose the method | method | a alone: a / facts | b alone: b / facts | "
        "composed: a / b / **both** / facts | both ≥ 80 % (int4: 70 %) | loops composed | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = lambda r: (r["pair"] not in SELECTION, r["pair"], METHODS.index(r["method"]), r["precision"])  # noqa: E731
    for entry in sorted(results, key=order):
        f = entry["figures"]
        a, b, ab = f["a"], f["b"], f["ab"]
        lines.append(
            f"| {entry['pair']} | {'yes' if entry['pair'] in SELECTION else 'no'} | "
            f"{entry['method']}, {entry['precision']} | "
            f"{pct(a['a'])} / {pct(a['facts_kept'])} | "
            f"{pct(b['b'])} / {pct(b['facts_kept'])} | {pct(ab['a'])} / {pct(ab['b'])} / "
            f"**{pct(ab['both'])}** / {pct(ab['facts_kept'])} | "
            f"{'met' if ab['both'] >= MIN_BOTH[entry['precision']] else 'not met'} | {pct(ab.get('loops'))} "
            f"| {entry['train_s'] or 'reused'} |"
        )
    means = ["", "Mean share of composed answers showing both behaviours:", ""]
    for method, precision in sorted({(r["method"], r["precision"]) for r in results}):
        for chose in (True, False):
            shown = [
                r["figures"]["ab"]["both"]
                for r in results
                if (r["method"], r["precision"]) == (method, precision) and (r["pair"] in SELECTION) == chose
            ]
            if shown:
                which = "pairs that chose the method" if chose else "pairs no choice looked at"
                means.append(f"- {method}, {precision}, {which}: {sum(shown) / len(shown):.0%} ({len(shown)} pairs)")
    samples = ["", "Composed answers to the first unseen prompt of each persona (greedy):", ""]
    for entry in sorted(results, key=order):
        ab = entry["figures"]["ab"]
        samples.append(
            f"- {entry['pair']}, {entry['method']}, {entry['precision']}: "
            f"{json.dumps(ab['sample'])} / "
            f"{json.dumps(ab['sample_b'])}"
        )
    return "\n".join(lines + means + samples)


def write_report(results: list[dict]) -> None:
    text = DOC.read_text()
    if START not in text:
        text += f"\n## Composition\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n{render(results)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma list of a+b persona pairs")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--no-lora", dest="lora", action="store_false", help="skip the LoRA adapters (minutes each)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "reft-edge-quality"))
    parser.add_argument("--precision", default="fp32", help="comma list of the bundles measured: fp32, int8, int4")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        run_study(
            load_pairs(args.pairs.split(",")),
            [m for m in args.methods.split(",") if args.lora or m != "lora"],
            Path(args.cache),
            print,
            args.precision.split(","),
        )
    write_report(load_results())
    print(f"wrote {DOC.relative_to(ROOT)}")


def run_study(
    pairs: list[Pair],
    methods: list[str],
    cache: Path,
    say: Callable[[str], None],
    precisions: Sequence[str] = ("fp32",),
) -> None:
    from reft_edge.runtime import Runtime
    from reft_edge.train.backbone import load_backbone

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    cache.mkdir(parents=True, exist_ok=True)
    bundles = export_bundles(list(precisions), cache)
    runtimes = {precision: Runtime.load(bundles[precision], threads=2) for precision in precisions}
    backbone = load_backbone()
    results = load_results()
    for pair in pairs:
        folder = cache / "composition" / pair.name
        folder.mkdir(parents=True, exist_ok=True)
        for method in methods:
            if method == "lora":  # the torch model: one measurement whatever the bundles
                figures, seconds = measure_lora(pair, backbone, folder)
                results = _record(results, pair, method, seconds, figures, "torch-fp32", say)
                continue
            uses, seconds = train_patches(pair, method, backbone, folder)
            for precision, runtime in runtimes.items():
                figures = measure_patches(pair, runtime, uses)
                results = _record(results, pair, method, seconds, figures, precision, say)


def _record(
    results: list[dict], pair: Pair, method: str, seconds: float, figures: dict, precision: str, say: Callable
) -> list[dict]:
    entry = {"pair": pair.name, "method": method, "train_s": round(seconds, 1), "figures": figures}
    results = save(results, {**entry, "precision": precision})
    ab = figures["ab"]
    facts = "—" if ab["facts_kept"] is None else format(ab["facts_kept"], ".0%")
    say(
        f"{pair.name:22s} {method:12s} {precision:10s} composed: a {ab['a']:.0%} b {ab['b']:.0%} "
        f"both {ab['both']:.0%} facts {facts}"
    )
    return results


if __name__ == "__main__":
    main()
