"""The demo behind ``make demo``: one frozen base, two people, kilobyte patches.

    python -m examples.demo                       # the embedded SmolLM2-135M-Instruct, int8 bundle
    python -m examples.demo --model DIR --steps 3 --precision fp32 --max-new-tokens 8   # fast mode

Trains the emoji persona (examples/emoji) and the pirate persona (examples/pirate),
exports the base once into the cache (later runs reuse the bundle and the patches),
then shows base vs personalised answers on prompts the patches never saw, one person
with both patches composed, and both people served in one batch.
"""

from __future__ import annotations

import argparse
import shutil
import textwrap
import time
from pathlib import Path

from reft_edge.export import ExportConfig, export_bundle
from reft_edge.files import cache_dir
from reft_edge.runtime import Patch, Runtime
from reft_edge.train import TrainConfig, train
from reft_edge.train.backbone import Backbone, load_backbone
from reft_edge.train.data import file_digest

EXAMPLES = Path(__file__).resolve().parent
PERSONAS = ("emoji", "pirate")
UNSEEN_PROMPTS = [
    "How do I learn to swim?",
    "What is your favourite animal?",
    "Describe a rainy day.",
    "What do you think about music?",
    "How can I sleep better?",
    "What is the best way to travel?",
]
WIDTH = min(shutil.get_terminal_size((100, 20)).columns, 110)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="reft-edge end-to-end demo")
    parser.add_argument("--model", default=None, help="Hugging Face folder (default: the embedded SmolLM2)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8", "int4"])
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--work", default=None, help="Folder for patches and bundle (default: the cache)")
    return parser.parse_args()


def persona_patch(persona: str, backbone: Backbone, steps: int, work: Path) -> Patch:
    """Train the persona's patch, or reuse the one a previous run trained from the same data and base."""
    data = EXAMPLES / persona / "train.jsonl"
    out = work / f"{persona}.reft"
    if out.is_file():
        cached = Patch.load(out)
        if (cached.base_fingerprint == backbone.fingerprint and cached.training.get("steps") == steps
                and cached.training.get("data_sha256") == file_digest(data)):
            return cached
    layer = backbone.num_layers // 2
    config = TrainConfig(data=str(data), out=str(out), layers=(layer,), rank=4, positions="f2+l2", steps=steps,
                         lr=4e-3, batch_size=12, seed=0, record_time=True)
    print(f"training the {persona} patch ({steps} steps at layer {layer})...")
    return train(config, backbone=backbone)


def show_side_by_side(runtime: Runtime, emoji: Patch, max_new_tokens: int) -> float:
    """Base vs personalised answers; returns the personalised decode tokens/s."""
    speeds = []
    print("\n" + "=" * WIDTH)
    print("Prompts the patch never saw: the same base model, without and with Alice's emoji patch")
    print("=" * WIDTH)
    for prompt in UNSEEN_PROMPTS:
        base = runtime.generate(prompt, max_new_tokens=max_new_tokens)
        alice = runtime.generate(prompt, patches=[emoji], max_new_tokens=max_new_tokens)
        speeds.append(alice.timings["tokens_per_s"])
        print(f"\n  {prompt}")
        print(_row("base", base.text))
        print(_row("alice", alice.text))
    return sorted(speeds)[len(speeds) // 2]


def _row(label: str, text: str) -> str:
    lines = textwrap.wrap(" ".join(text.split()), WIDTH - 12) or [""]
    return "\n".join(f"    {label if i == 0 else '':<6} | {line}" for i, line in enumerate(lines))


def show_composition_and_batch(runtime: Runtime, emoji: Patch, pirate: Patch, max_new_tokens: int) -> None:
    prompt = UNSEEN_PROMPTS[0]
    print("\n" + "=" * WIDTH)
    print(f"One session, several people. Prompt: {prompt}")
    print("=" * WIDTH)
    both = runtime.generate(prompt, patches=[emoji, pirate], max_new_tokens=max_new_tokens)
    print("  composed (emoji + pirate patches on one request; trained apart at the same layer and")
    print("  positions they interfere: see README, Limitations):")
    print(_row("both", both.text))
    answers = runtime.generate_batch([(prompt, [emoji]), (prompt, [pirate]), (prompt, [])],
                                     max_new_tokens=max_new_tokens)
    print("  one batch, each row with its own patch (generate_batch):")
    for label, answer in zip(("alice", "bob", "base"), answers):
        print(_row(label, answer.text))


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    work = Path(args.work) if args.work else cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(args.model)
    emoji, pirate = (persona_patch(p, backbone, args.steps, work) for p in PERSONAS)
    bundle = work / f"bundle-{backbone.fingerprint[:12]}-{args.precision}"
    manifest = export_bundle(ExportConfig(out=str(bundle), model=args.model, precision=args.precision),
                             backbone=backbone)
    del backbone  # the runtime needs only the bundle; free the torch model
    runtime = Runtime.load(bundle)
    tokens_per_s = show_side_by_side(runtime, emoji, args.max_new_tokens)
    show_composition_and_batch(runtime, emoji, pirate, args.max_new_tokens)
    seconds = emoji.training.get("seconds")
    print("\n" + "=" * WIDTH)
    print(f"patch size {emoji.size_bytes / 1024:.1f} KiB (base bundle {manifest.size_bytes / 2**20:.0f} MiB, "
          f"{manifest.precision}); training {seconds if seconds is not None else '?'} s for "
          f"{emoji.training['steps']} steps; decode {tokens_per_s:.1f} tok/s; demo took "
          f"{time.perf_counter() - started:.0f} s")
    print("\nTry next:")
    print(f"  .venv/bin/reft-edge run {bundle} --patch {work / 'emoji.reft'} \"What is your favourite food?\"")
    print(f"  .venv/bin/reft-edge chat {bundle} --patch {work / 'pirate.reft'}")
    print(f"  .venv/bin/reft-edge inspect {work / 'emoji.reft'}")
    print("  .venv/bin/reft-edge train --data your.jsonl --out you.reft --layers 15 --positions f2+l2 --steps 60")


if __name__ == "__main__":
    main()
