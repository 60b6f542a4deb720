"""Training speed: reft-edge's recipe vs a plain hook-based LoReFT loop, side by side in one run.

    python -m benchmarks.train_speed            # 60 steps each, the emoji recipe on the default model
    python -m benchmarks.train_speed --steps 10 # quicker, same comparison

The reference is what a first implementation looks like: a forward hook at the layer,
torch's orthogonal parametrisation (weight decay 0: with AdamW's default decay its
Householder map collapses R to zeros after one step), the full model forward
and full-vocabulary logits at every position, every step. reft-edge caches the frozen
states below the edited layer and computes logits only where the loss needs them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reft_edge.runtime.positions import Positions
from reft_edge.train import TrainConfig, train
from reft_edge.train.backbone import decoder_layers, load_backbone
from reft_edge.train.data import read_jsonl, tokenize

DATA = Path(__file__).resolve().parent.parent / "examples" / "emoji" / "train.jsonl"
LAYER, RANK, POSITIONS, LR = 15, 4, "f2+l2", 4e-3


def reference_loop(backbone, steps: int) -> tuple[float, float]:
    """A plain LoReFT loop; returns (seconds, final loss)."""
    model, hidden = backbone.model, backbone.hidden_size
    examples = tokenize(read_jsonl(DATA), backbone.tokenizer, use_chat_template=True)
    torch.manual_seed(0)
    rotate = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(hidden, RANK, bias=False))
    source = torch.nn.Linear(hidden, RANK)
    optimizer = torch.optim.AdamW([*rotate.parameters(), *source.parameters()], lr=LR, weight_decay=0.0)
    seq = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    ids = torch.zeros(len(examples), seq, dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    edit_mask = torch.zeros(len(examples), seq, 1)
    for row, e in enumerate(examples):
        full = e.prompt_ids + e.target_ids
        ids[row, : len(full)] = torch.tensor(full)
        attention[row, : len(full)] = 1
        labels[row, len(e.prompt_ids) : len(full)] = torch.tensor(e.target_ids)
        edit_mask[row, Positions.parse(POSITIONS).token_indices("both", len(e.prompt_ids))] = 1.0

    def hook(module, args, output):
        R = rotate.weight
        return output + edit_mask * ((source(output) - output @ R.T) @ R)

    handle = decoder_layers(model)[LAYER].register_forward_hook(hook)
    started = time.perf_counter()
    try:
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        handle.remove()
    return time.perf_counter() - started, loss.item()


def recipe(backbone, steps: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(
            data=str(DATA),
            out=f"{folder}/emoji.reft",
            layers=(LAYER,),
            rank=RANK,
            positions=POSITIONS,
            steps=steps,
            lr=LR,
            batch_size=12,
            seed=0,
        )
        started = time.perf_counter()
        patch = train(config, backbone=backbone, progress=False)
        return time.perf_counter() - started, patch.training["final_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    backbone = load_backbone()
    ours_s, ours_loss = recipe(backbone, args.steps)
    ref_s, ref_loss = reference_loop(backbone, args.steps)
    print(
        f"threads: {torch.get_num_threads()}, torch {torch.__version__}, {args.steps} steps, "
        f"{len(read_jsonl(DATA))} examples, layer {LAYER}, rank {RANK}, {POSITIONS}"
    )
    print("| training loop | seconds | s/step | final loss | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| plain hook loop (reference) | {ref_s:.1f} | {ref_s / args.steps:.2f} | {ref_loss:.3f} | 1.00x |")
    print(f"| reft-edge train | {ours_s:.1f} | {ours_s / args.steps:.2f} | {ours_loss:.3f} | {ref_s / ours_s:.2f}x |")


if __name__ == "__main__":
    main()
