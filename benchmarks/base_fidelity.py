"""How much of the fp32 base each quantized bundle keeps, before any patch.

Example::

    python -m benchmarks.base_fidelity                      # fp32, int8, int4 of the default model
    python -m benchmarks.base_fidelity --precisions fp32,int4 --cache /tmp/reft-edge-quality

For each precision, in one run on the same machine: the held-out test facts
(runtime/facts_test.jsonl) it answers among those the fp32 bundle answers (greedy, the
runtime's fact budget); its next-token choice teacher-forced on the fp32 bundle's greedy
answers to 20 unseen prompts x 48 tokens (the share of positions where its argmax equals
fp32's); and decode tokens/s (64 tokens, 2 threads). Results go to
benchmarks/results/base_fidelity.json and the "Base fidelity" table of docs/quality.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.quality import ROOT, export_bundles, load_personas

RESULTS = ROOT / "benchmarks" / "results" / "base_fidelity.json"
DOC = ROOT / "docs" / "quality.md"
START, END = "<!-- fidelity:start (written by python -m benchmarks.base_fidelity) -->", "<!-- fidelity:end -->"
PROMPTS, TOKENS = 20, 48


def unseen_prompts() -> list[str]:
    """The first prompts of each persona's unseen.txt, PROMPTS in all."""
    lines = [
        line for p in load_personas(None) for line in (p.folder / "unseen.txt").read_text().splitlines() if line.strip()
    ]
    return lines[:: max(1, len(lines) // PROMPTS)][:PROMPTS]


def facts_answered(runtime, facts) -> list[bool]:
    from reft_edge.runtime.evaluate import FACT_TOKENS

    answers = runtime.generate_batch([(f.question, []) for f in facts], max_new_tokens=FACT_TOKENS, no_repeat_ngram=0)
    return [f.answered_by(a.text) for f, a in zip(facts, answers)]


def argmax_agreement(runtime, reference: list[tuple[list[int], list[int]]]) -> float:
    """Share of positions where ``runtime``'s argmax equals the reference's next token (teacher-forced)."""
    from reft_edge.runtime.slots import slot_arrays

    manifest, same, total = runtime.manifest, 0, 0
    for prompt_ids, answer in reference:
        slots = slot_arrays([[]], len(manifest.slot_layers), manifest.hidden_size)
        run = runtime._engine.start([prompt_ids], slots, len(answer))
        logits = run.prefill()
        for step, token in enumerate(answer):
            same += int(np.argmax(logits[0]) == token)
            total += 1
            if step + 1 < len(answer):
                logits = run.decode(np.asarray([token], np.int64))
    return same / total


def decode_speed(runtime) -> float:
    runtime.generate("Warm up.", max_new_tokens=4)
    out = runtime.generate(
        "Tell me a long story about a dragon.", max_new_tokens=64, ignore_eos=True, no_repeat_ngram=0
    )
    return out.timings["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "reft-edge-quality"))
    args = parser.parse_args()
    from reft_edge.runtime import Runtime
    from reft_edge.runtime.evaluate import TEST_FACTS_FILE, read_facts

    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        raise SystemExit("list fp32 first: it is the reference")
    bundles = export_bundles(precisions, Path(args.cache))
    facts, prompts = read_facts(TEST_FACTS_FILE), unseen_prompts()
    rows, reference, known = {}, None, None
    for precision in precisions:
        started = time.perf_counter()
        runtime = Runtime.load(bundles[precision], threads=2)
        answered = facts_answered(runtime, facts)
        if reference is None:  # fp32: its greedy answers are the teacher-forced reference
            known = [i for i, ok in enumerate(answered) if ok]
            reference = [
                (runtime.encode(p), runtime.generate(p, max_new_tokens=TOKENS, no_repeat_ngram=0).token_ids)
                for p in prompts
            ]
        rows[precision] = {
            "facts_answered": sum(answered),
            "facts": len(facts),
            "of_fp32_facts": round(sum(answered[i] for i in known) / len(known), 4) if known else None,
            "argmax_agreement": round(argmax_agreement(runtime, reference), 4),
            "tokens_per_s": round(decode_speed(runtime), 1),
            "bytes": sum(f.stat().st_size for f in Path(bundles[precision]).iterdir()),
            "weights": runtime.manifest.weights,
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(precision, rows[precision])
    from reft_edge.files import atomic_write_bytes

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS, (json.dumps(rows, indent=1) + "\n").encode())
    write_report(rows)


def write_report(rows: dict) -> None:
    lines = [
        START,
        "",
        "| bundle | test facts answered | of those fp32 answers | next token = fp32's "
        "(teacher-forced, 20 x 48) | decode tokens/s | size MB |",
        "|---|---|---|---|---|---|",
    ]
    for precision, r in rows.items():
        share = "-" if r["of_fp32_facts"] is None else f"{r['of_fp32_facts']:.0%}"
        lines.append(
            f"| {precision} | {r['facts_answered']} / {r['facts']} | {share} | "
            f"{r['argmax_agreement']:.1%} | {r['tokens_per_s']} | {r['bytes'] / 1e6:.0f} |"
        )
    lines += ["", END]
    text = DOC.read_text()
    block = "\n".join(lines)
    if START in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text += "\n## Base fidelity: what each bundle keeps before any patch\n\n" + block + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
