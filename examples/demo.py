"""The demo behind ``make demo``: one frozen base, two people, kilobyte patches.

    python -m examples.demo                       # the embedded SmolLM2-135M-Instruct, int4 bundle
    python -m examples.demo --model DIR --steps 3 --precision fp32 --max-new-tokens 8   # fast mode

Trains two personas of examples/personas with the default recipe (Alice: every answer
opens with "Great question!"; Bob: every answer ends with "Stay curious!"), exports
the base once into the cache as the int4 bundle devices run (its weights are the GGUF's
own blocks; later runs reuse the bundle and the patches), then shows base vs
personalised answers on prompts the patches never saw (with the runtimes' default loop
guard), measures each patch on its persona's 20 unseen prompts (adherence to its judge,
answers that loop) and on the held-out test facts (facts kept), and serves both people
in one batch. Last, composition as a product ships it: Alice's opener as the house style
every answer carries, and Bob's closing phrase trained with ``compose_with=(house,)``,
applied together per request, measured on the 40 unseen prompts of both personas.
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
import time
from pathlib import Path

from reft_edge.export import ExportConfig, export_bundle
from reft_edge.files import cache_dir
from reft_edge.runtime import Patch, Runtime
from reft_edge.runtime.evaluate import TEST_FACTS_FILE, evaluate
from reft_edge.runtime.loops import loops
from reft_edge.train import TrainConfig, train
from reft_edge.train.backbone import Backbone, load_backbone
from reft_edge.train.data import file_digest

PERSONAS = Path(__file__).resolve().parent / "personas"
PEOPLE = {"alice": "enthusiast", "bob": "signoff"}  # person -> persona folder
SHOWN_PROMPTS = 4  # side by side; all 20 unseen prompts are measured
WIDTH = min(shutil.get_terminal_size((100, 20)).columns, 110)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="reft-edge end-to-end demo")
    parser.add_argument("--model", default=None, help="Hugging Face folder (default: the embedded SmolLM2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the default recipe's)")
    parser.add_argument("--precision", default="int4", choices=["fp32", "int8", "int4"])
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--work", default=None, help="Folder for patches and bundle (default: the cache)")
    return parser.parse_args()


def persona_patch(
    persona: str, backbone: Backbone, steps: int | None, work: Path, compose_with: Patch | None = None
) -> Patch:
    """Train the persona's patch with the default recipe (to compose with ``compose_with`` if
    given), or reuse the one a previous run trained from the same data, steps, base and partner."""
    data = PERSONAS / persona / "train.jsonl"
    partner = (work / f"{compose_with.name}.reft",) if compose_with else ()
    out = work / (f"{persona}-with-{compose_with.name}.reft" if compose_with else f"{persona}.reft")
    config = TrainConfig(
        data=str(data), out=str(out), steps=steps, record_time=True, compose_with=tuple(map(str, partner))
    )
    if out.is_file():
        from reft_edge.train.recipe import COMPOSE_TEACHER

        cached = Patch.load(out)
        partners = [p["payload_sha256"] for p in cached.training.get("composition", {}).get("with", [])]
        if (
            cached.base_fingerprint == backbone.fingerprint
            and cached.training.get("data_sha256") == file_digest(data)
            and cached.training.get("recipe") == _recipe(config)
            and partners == ([compose_with.payload_sha256] if compose_with else [])
            and cached.training.get("composition", {}).get("teacher", COMPOSE_TEACHER) == COMPOSE_TEACHER
        ):
            return cached
    composing = f", to compose with {compose_with.name}" if compose_with else ""
    print(f"training the {persona} patch (default recipe{composing})...")
    return train(config, backbone=backbone)


def _recipe(config: TrainConfig) -> dict:
    """What decides a patch besides data and base (the patch records it at training time)."""
    from reft_edge.train.recipe import recipe_summary

    return recipe_summary(config)


def show_side_by_side(runtime: Runtime, patches: dict[str, Patch], max_new_tokens: int) -> float:
    """Base vs personalised answers on unseen prompts; returns the personalised decode tokens/s."""
    speeds = []
    print("\n" + "=" * WIDTH)
    print("Prompts the patches never saw: the same base model, without and with each person's patch")
    print("=" * WIDTH)
    for person, patch in patches.items():
        prompts = _unseen(PEOPLE[person])[: SHOWN_PROMPTS // len(patches)]
        for prompt in prompts:
            base = runtime.generate(prompt, max_new_tokens=max_new_tokens)
            mine = runtime.generate(prompt, patches=[patch], max_new_tokens=max_new_tokens)
            speeds.append(mine.timings["tokens_per_s"])
            print(f"\n  {prompt}")
            print(_row("base", base.text))
            print(_row(person, mine.text + (" [loops]" if loops(mine.text) else "")))
    return sorted(speeds)[len(speeds) // 2]


def show_quality(runtime: Runtime, patches: dict[str, Patch], max_new_tokens: int) -> None:
    """Each patch on all 20 unseen prompts of its persona (its judge) and on the built-in facts."""
    print("\n" + "=" * WIDTH)
    print("Measured (reft-edge eval, no loop guard): unseen prompts that follow the persona, answers that")
    print("loop, and held-out test facts the base knows that the patched model still answers correctly")
    print("=" * WIDTH)
    for person, patch in patches.items():
        folder = PERSONAS / PEOPLE[person]
        judge = json.loads((folder / "persona.json").read_text())["judge"]
        report = evaluate(
            runtime,
            data=folder / "unseen.txt",
            patches=[patch],
            judge=judge,
            max_new_tokens=max_new_tokens,
            samples=0,
            facts_file=TEST_FACTS_FILE,
        )
        kept = report.retention
        facts = f"{kept.kept}/{kept.base_correct}" if kept and kept.base_correct else "n/a (the base knows none)"
        print(
            f"  {person:<6} ({PEOPLE[person]}, judge {judge}): follows the persona in "
            f"{report.adherence.patched:.0%} of {report.prompts} unseen answers (base {report.adherence.base:.0%}), "
            f"{report.adherence.loops_patched:.0%} loop; test facts kept {facts}"
        )


def _unseen(persona: str) -> list[str]:
    return [line for line in (PERSONAS / persona / "unseen.txt").read_text().splitlines() if line.strip()]


def _row(label: str, text: str) -> str:
    lines = textwrap.wrap(" ".join(text.split()), WIDTH - 12) or [""]
    return "\n".join(f"    {label if i == 0 else '':<6} | {line}" for i, line in enumerate(lines))


def show_batch(runtime: Runtime, patches: dict[str, Patch], max_new_tokens: int) -> None:
    prompt = _unseen(PEOPLE["alice"])[-1]
    print("\n" + "=" * WIDTH)
    print(f"One session, several people in one batch (generate_batch). Prompt: {prompt}")
    print("=" * WIDTH)
    requests = [(prompt, [patch]) for patch in patches.values()] + [(prompt, [])]
    answers = runtime.generate_batch(requests, max_new_tokens=max_new_tokens)
    for label, answer in zip([*patches, "base"], answers):
        print(_row(label, answer.text))


def show_composition(runtime: Runtime, alice: Patch, bob_with_alice: Patch, bob: Patch, max_new_tokens: int) -> None:
    """A house style (Alice's opener, shared by every user) and a person (Bob's closing phrase) in
    one answer: Bob's patch trained to compose with the house patch, against the two patches
    trained apart; both measured on 40 unseen prompts."""
    from reft_edge.runtime.judges import Judge

    print("\n" + "=" * WIDTH)
    print("Composition: a house style (the opener) plus Bob's own closing phrase on one request")
    print("=" * WIDTH)
    prompts = _unseen(PEOPLE["alice"]) + _unseen(PEOPLE["bob"])
    judges = [Judge.parse(json.loads((PERSONAS / PEOPLE[p] / "persona.json").read_text())["judge"]) for p in PEOPLE]
    for label, patches in (("trained apart", [alice, bob]), ("trained to compose", [alice, bob_with_alice])):
        answers = runtime.generate_batch([(p, patches) for p in prompts], max_new_tokens=max_new_tokens)
        passed = [all(judge(a.text) for judge in judges) for a in answers]
        looping = sum(loops(a.text) for a in answers)
        print(
            f"\n  {label}: {sum(passed)} of {len(prompts)} unseen answers open with 'Great question!' and end "
            f"with 'Stay curious!'; {looping} loop"
        )
        # the apart pair's first answer shows what goes wrong; the composable pair's answers that pass (and do
        # not loop) show the result
        shown = (
            [(p, a) for p, a, ok in zip(prompts, answers, passed) if ok and not loops(a.text)][:2]
            if any(passed)
            else list(zip(prompts, answers))[:1]
        )
        for prompt, answer in shown:
            print(f"  {prompt}")
            print(_row("both", answer.text))


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    work = Path(args.work) if args.work else cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(args.model)
    patches = {person: persona_patch(persona, backbone, args.steps, work) for person, persona in PEOPLE.items()}
    bob_with_alice = persona_patch(PEOPLE["bob"], backbone, args.steps, work, compose_with=patches["alice"])
    bundle = work / f"bundle-{backbone.fingerprint[:12]}-{args.precision}"
    manifest = export_bundle(
        ExportConfig(out=str(bundle), model=args.model, precision=args.precision), backbone=backbone
    )
    del backbone  # the runtime needs only the bundle; free the torch model
    runtime = Runtime.load(bundle)
    tokens_per_s = show_side_by_side(runtime, patches, args.max_new_tokens)
    show_quality(runtime, patches, args.max_new_tokens)
    show_batch(runtime, patches, args.max_new_tokens)
    show_composition(runtime, patches["alice"], bob_with_alice, patches["bob"], args.max_new_tokens)
    alice = patches["alice"]
    seconds = alice.training.get("seconds")
    print("\n" + "=" * WIDTH)
    print(
        f"patch size {alice.size_bytes / 1024:.1f} KiB (base bundle {manifest.size_bytes / 2**20:.0f} MiB, "
        f"{manifest.precision}); training {seconds if seconds is not None else '?'} s for "
        f"{alice.training['steps_run']} steps; decode {tokens_per_s:.1f} tok/s; demo took "
        f"{time.perf_counter() - started:.0f} s"
    )
    print("\nTry next:")
    print(f'  .venv/bin/reft-edge run {bundle} --patch {work / "enthusiast.reft"} "What is your favourite food?"')
    print(f"  .venv/bin/reft-edge chat {bundle} --patch {work / 'signoff.reft'}")
    print(f"  .venv/bin/reft-edge inspect {work / 'enthusiast.reft'}")
    print(
        f"  .venv/bin/reft-edge eval {bundle} --patch {work / 'signoff.reft'} "
        f"--data {PERSONAS / 'signoff' / 'unseen.txt'} --judge 'ends-with:Stay curious!'"
    )
    print("  .venv/bin/reft-edge train --data your.jsonl --out you.reft")
    print(
        f"  .venv/bin/reft-edge serve-web {bundle} --patch {work / 'enthusiast.reft'} --patch "
        f"{work / 'signoff.reft'}   # then open http://127.0.0.1:8000/ (make web first)"
    )


if __name__ == "__main__":
    main()
