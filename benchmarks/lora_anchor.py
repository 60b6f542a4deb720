"""The LoRA anchor of the quality study: PEFT LoRA r=8 on q_proj/v_proj, trained on a persona's
pairs and measured with the same judges, facts and held-out loss as the patches.

Example::

    from benchmarks.lora_anchor import measure_lora
    figures = measure_lora(persona, load_backbone(), Path("/tmp"), max_new_tokens=48)

Recipe (the issue's anchor): r=8, alpha 16, no dropout, lr 2e-3, AdamW without weight decay,
100 steps of batch 8, loss on the response tokens as the patches' training computes it.
The adapter trains on a copy of the model, then is merged into that copy and measured
with the torch evaluation backend (reft_edge.train.evaluate), so the base stays intact.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

LORA_RANK, LORA_ALPHA, LORA_LR, LORA_STEPS, LORA_BATCH = 8, 16, 2e-3, 100, 8
LORA_TARGETS = ("q_proj", "v_proj")


def train_lora(backbone: Any, data: Path, out: Path) -> tuple[Any, int]:
    """A LoRA-adapted copy of the model (merged) and the adapter's bytes on disk."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from reft_edge.train.data import read_jsonl, tokenize
    from reft_edge.train.fitting import batch_order

    torch.manual_seed(0)
    examples = tokenize(read_jsonl(data), backbone.tokenizer, use_chat_template=True)
    model = get_peft_model(
        copy.deepcopy(backbone.model),
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS)),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LORA_LR, weight_decay=0.0)
    for indices in batch_order(len(examples), LORA_BATCH, LORA_STEPS, seed=0):
        chosen = [examples[i] for i in indices]
        sequences = [list(e.prompt_ids + e.target_ids) for e in chosen]
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(chosen), width, dtype=torch.long)
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)
        attention = torch.zeros(len(chosen), width, dtype=torch.long)
        for row, (example, sequence) in enumerate(zip(chosen, sequences)):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            attention[row, : len(sequence)] = 1
            labels[row, len(example.prompt_ids) : len(sequence)] = torch.tensor(example.target_ids)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(str(out))
    size = sum(f.stat().st_size for f in out.glob("adapter_model.*"))
    merged = model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged, size


def measure_lora(persona: Any, backbone: Any, folder: Path, max_new_tokens: int) -> dict[str, Any]:
    from reft_edge.runtime.evaluate import FACTS_FILE, base_correct_facts, read_facts, read_heldout, user_message
    from reft_edge.runtime.judges import Judge
    from reft_edge.train.evaluate import TorchBackend

    started = time.perf_counter()
    merged, size = train_lora(backbone, persona.folder / "train.jsonl", folder / f"{persona.name}-lora")
    seconds = time.perf_counter() - started
    base, adapted = TorchBackend(backbone), TorchBackend(dataclasses.replace(backbone, model=merged))
    judge = Judge.parse(persona.judge)
    prompts = [list(r.messages) for r in read_heldout(persona.folder / "unseen.txt")[0]]
    answers = adapted.answers(prompts, [], None, max_new_tokens)
    facts = read_facts(FACTS_FILE)
    correct, _ = base_correct_facts(base, facts, _digest(FACTS_FILE), lambda message: None)
    fact_answers = adapted.answers([user_message(facts[i].question) for i in correct], [], None, 32)
    kept = sum(facts[i].answered_by(a) for i, a in zip(correct, fact_answers))
    val = adapted.examples(read_heldout(persona.folder / "val.jsonl")[0])
    val_loss = adapted.response_nll(val, [], None) / sum(len(e.target_ids) for e in val)
    return {
        "bytes": size,
        "train_s": round(seconds, 1),
        "config": {
            "rank": LORA_RANK,
            "alpha": LORA_ALPHA,
            "targets": list(LORA_TARGETS),
            "lr": LORA_LR,
            "steps": LORA_STEPS,
            "batch_size": LORA_BATCH,
        },
        "by_precision": {
            "fp32": {
                "adherence": round(sum(judge(a) for a in answers) / len(answers), 6),
                "base_adherence": None,
                "facts_kept": round(kept / len(correct), 6) if correct else None,
                "facts_base": len(correct),
                "val_loss": round(val_loss, 6),
                "val_loss_base": None,
                "samples": [
                    {"prompt": p[-1]["content"], "base": None, "patched": a} for p, a in list(zip(prompts, answers))[:3]
                ],
            }
        },
    }


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
