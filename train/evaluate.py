"""The torch side of ``reft-edge eval --model``: a Hugging Face model, patches applied by the
training stage's edit hooks (train.intervention.attach_edits), attached per call and removed.

Example::

    from reft_edge.evaluate import evaluate
    report = evaluate(model="default", data="heldout.jsonl", patches=["emoji.reft"], judge="no-letters")

``TorchBackend`` answers what runtime.evaluate asks of a base, the way the runtime answers
it on a bundle: slot arrays from runtime.slots.slot_arrays (several patches compose as the
runtime composes them), rows left-padded for greedy generation, with the masks the graph
computes from them (SlotArrays.masks): prompt positions at prefill, generated-token edits
(positions with ``g``) at each decode step. The held-out loss is one teacher-forced pass
per batch, right-padded and masked as training masks it: prompt positions, and response
tokens where the patch edits generated tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from reft_edge.records import BATCH_SIZE, Example, Messages, Record, chunks, prompt_text, tokenize
from reft_edge.runtime.patch import Patch
from reft_edge.runtime.slots import SlotArrays, SlotEdit, resolve_edits, slot_arrays
from reft_edge.train.backbone import Backbone, decoder_layers, eager_attention, load_backbone
from reft_edge.train.intervention import EditSlots, attach_edits


def open_model(model: Any, say: Any) -> TorchBackend:
    """The backend reft_edge.evaluate hands runtime.evaluate for ``model=``: a Hugging Face folder or
    id, "default", or a loaded Backbone."""
    if isinstance(model, (str, Path)):
        say(f"loading model {model}")
        return TorchBackend.load(str(model))
    return TorchBackend(model)


class TorchBackend:
    """A loaded Backbone; patches may edit any of its layers."""

    kind = "model"

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.model, self.tokenizer = backbone.model, backbone.tokenizer
        self.source = backbone.source
        self.precision = f"torch-{str(next(self.model.parameters()).dtype).removeprefix('torch.')}"
        self.base_fingerprint = backbone.fingerprint
        self.layers = decoder_layers(self.model)
        self.slot_layers = list(range(len(self.layers)))
        self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.eos_ids = eos_token_ids(self.tokenizer, self.model)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)

    @classmethod
    def load(cls, model: str) -> TorchBackend:
        return cls(load_backbone(model))

    def load_patches(self, patches: Sequence[Patch | str | Path]) -> list[Patch]:
        loaded = []
        for item in patches:
            patch = item if isinstance(item, Patch) else Patch.from_file(item)
            patch.check_compatible(
                base_fingerprint=self.base_fingerprint,
                hidden_size=self.backbone.hidden_size,
                slot_layers=self.slot_layers,
                source=f"patch {patch.name!r}" if isinstance(item, Patch) else str(item),
            )
            loaded.append(patch)
        return loaded

    def examples(self, records: Sequence[Record]) -> list[Example]:
        return tokenize(list(records), self.tokenizer, use_chat_template=self.use_chat_template)

    def edits(self, patches: Sequence[Patch], weights: Sequence[float] | None) -> list[SlotEdit]:
        return resolve_edits(patches, weights, self.slot_layers)

    def slot_arrays(self, rows: int, edits: list[SlotEdit]) -> SlotArrays:
        return slot_arrays([edits] * rows, len(self.slot_layers), self.backbone.hidden_size)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[EditSlots]:
        """Edit hooks on every layer (a layer without a value in the slots is left alone), eager attention."""
        slots = EditSlots()
        with eager_attention(self.model), torch.no_grad(), attach_edits(dict(enumerate(self.layers)), slots):
            yield slots

    # -- the held-out loss ------------------------------------------------------------------------

    def response_nll(
        self, examples: Sequence[Example], patches: Sequence[Patch], weights: Sequence[float] | None
    ) -> float:
        edits = self.edits(patches, weights)
        with self.hooks() as slots:
            return sum(self._chunk_nll(slots, chunk, edits) for chunk in chunks(examples, BATCH_SIZE))

    def _chunk_nll(self, slots: EditSlots, examples: Sequence[Example], edits: list[SlotEdit]) -> float:
        """One pass over prompt + target[:-1], right-padded; the NLL of every target token, summed."""
        sequences = [list(e.prompt_ids) + list(e.target_ids[:-1]) for e in examples]
        prompt_lens = [len(e.prompt_ids) for e in examples]
        seq = max(len(s) for s in sequences)
        input_ids = torch.full((len(examples), seq), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(examples), seq), dtype=torch.long)
        arrays = self.slot_arrays(len(examples), edits)
        rows, cols, targets = [], [], []
        for row, (example, sequence, prompt_len) in enumerate(zip(examples, sequences, prompt_lens)):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention[row, : len(sequence)] = 1
            rows += [row] * len(example.target_ids)
            cols += range(prompt_len - 1, prompt_len - 1 + len(example.target_ids))
            targets += example.target_ids
        # response tokens (from prompt_len on) stand for generated ones, as in training
        t = np.arange(seq)[None]
        set_slots(slots, arrays, arrays.masks(t, np.array(prompt_lens), attention.numpy() != 0))
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[torch.tensor(rows), torch.tensor(cols)])
        return float(F.cross_entropy(logits.double(), torch.tensor(targets), reduction="sum"))

    # -- greedy answers ---------------------------------------------------------------------------

    def answers(
        self,
        prompts: Sequence[Messages],
        patches: Sequence[Patch],
        weights: Sequence[float] | None,
        max_new_tokens: int,
    ) -> list[str]:
        edits = self.edits(patches, weights)
        tokens = []
        with self.hooks() as slots:
            for chunk in chunks(self.prompt_ids(prompts), BATCH_SIZE):
                tokens += self._greedy(slots, chunk, [edits] * len(chunk), max_new_tokens)[0]
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]

    def composed_answers(
        self, prompts: Sequence[Messages], experts: Sequence[Sequence[Patch]], max_new_tokens: int
    ) -> list[str | None]:
        """Greedy answers that hand each step to one expert (each a list of patches applied
        together): the expert that departs most from the base there (``leading_expert``), so an
        opener comes from the expert that opens, a length from the one that stops. None where
        the answer did not end in time."""
        group = [[]] + [self.edits(patches, None) for patches in experts]
        answers: list[str | None] = []
        with self.hooks() as slots:
            for chunk in chunks(self.prompt_ids(prompts), BATCH_SIZE):
                rows = [prompt for prompt in chunk for _ in group]
                tokens, ended = self._greedy(
                    slots, rows, group * len(chunk), max_new_tokens, pick=leading_expert(len(group))
                )
                answers += [
                    self.tokenizer.decode(t, skip_special_tokens=True) if done else None
                    for t, done in zip(tokens[:: len(group)], ended[:: len(group)])
                ]
        return answers

    def prompt_ids(self, prompts: Sequence[Messages]) -> list[list[int]]:
        return [
            self.tokenizer(prompt_text(self.tokenizer, list(p), self.use_chat_template), add_special_tokens=False)[
                "input_ids"
            ]
            for p in prompts
        ]

    def _greedy(
        self,
        slots: EditSlots,
        prompts: Sequence[list[int]],
        row_edits: Sequence[list[SlotEdit]],
        max_new_tokens: int,
        pick: Any = None,
    ) -> tuple[list[list[int]], list[bool]]:
        """Left-padded batch, KV cache, each row with its own edits; tokens up to (not including)
        each row's EOS, and whether it ended. ``pick`` maps the last logits [rows, vocab] to the
        next tokens (default: argmax)."""
        from transformers import DynamicCache

        batch, lens = len(prompts), [len(p) for p in prompts]
        seq = max(lens)
        arrays = slot_arrays(row_edits, len(self.slot_layers), self.backbone.hidden_size)
        input_ids = torch.full((batch, seq), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch, seq), dtype=torch.long)
        positions = torch.ones((batch, seq), dtype=torch.long)  # pads: 1, as Hugging Face gives them
        for row, prompt in enumerate(prompts):
            start = seq - len(prompt)
            input_ids[row, start:], attention[row, start:] = torch.tensor(prompt), 1
            positions[row, start:] = torch.arange(len(prompt))
        cache = DynamicCache()
        set_slots(slots, arrays, arrays.masks(positions.numpy(), np.array(lens), attention.numpy() != 0))
        logits = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True
        ).logits[:, -1]
        # every decode step: the generated-token edits, if any (a pass without prompt tokens)
        set_slots(
            slots,
            arrays,
            arrays.masks(np.zeros((batch, 1), np.int64), np.zeros(batch, np.int64), np.ones((batch, 1), bool)),
        )
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * batch
        for step in range(max_new_tokens):
            chosen = logits.argmax(-1) if pick is None else pick(logits)
            for row, token in enumerate(chosen.tolist()):
                if not done[row]:
                    done[row] = token in self.eos_ids
                    out[row] += [] if done[row] else [token]
            if all(done) or step + 1 == max_new_tokens:
                break
            attention = torch.cat([attention, torch.ones((batch, 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            logits = self.model(
                input_ids=chosen[:, None], attention_mask=attention, position_ids=positions, cache=cache, use_cache=True
            ).logits[:, -1]
        return out, done


# The teacher of composition, chosen by measurement (greedy teacher answers to 32 validation and
# training prompts of three selection pairs, judged with both personas' judges; issue 23's study,
# docs/quality.md): butler+terse / enthusiast+terse / lowercase+bullets, share of answers showing both.
# - product of experts, argmax sum_i log p_i - (n - 1) log p_base: 3 % / 12 % / 28 %. One expert's
#   strong "not this token" vetoes the other's opener ("Certainly." lost to terse's first word).
# - boosts only, log p_base + sum_i max(0, log p_i - log p_base): 44 % / 22 % / -, garbled words
#   (each expert's small boosts of odd tokens add up: "Great question!RecipeSteps ripe guac").
# - the same with vetoes down to -2 nats: 34 % / 19 % / -.
# - the leading expert's own greedy token, the leader the expert farthest from the base (KL) at
#   each step: 50 % / 16 % / 44 %; fluent (every token is some expert's greedy choice). By the
#   largest log-ratio of each expert's own top token instead of KL: 50 % / 19 %.
# - the same, a leader kept while it is sure of its next token (p >= LEAD_CONFIDENCE), so a
#   phrase one expert starts ("Great" -> " question!") is finished by it. Kept, at 0.9:
#   56 % / 56 % / 38 % (0.5: 38 % / 47 % / 16 %; 0.8: 47 % / 53 % / 28 %; 0.97: 50 % / 56 % / 38 %).
#   Teacher answers still miss both behaviours half the time: the targets of issue 23 are not met.
LEAD_CONFIDENCE = 0.9


def leading_expert(group: int) -> Any:
    """pick() for rows laid out as [base, expert 1, ..., expert n] per prompt: every row of a group
    gets the greedy token of the group's leading expert. The leader is the expert whose next-token
    distribution departs most from the base's (KL(p_i || p_base)), except that the previous leader
    keeps the lead while its own top token has probability >= LEAD_CONFIDENCE. One pick() per
    batch: it remembers each group's leader between steps."""
    previous: torch.Tensor | None = None  # each group's leader at the last step

    def pick(logits: torch.Tensor) -> torch.Tensor:
        nonlocal previous
        logp = logits.float().log_softmax(-1).view(-1, group, logits.shape[-1])
        experts, base = logp[:, 1:], logp[:, :1]
        rows = torch.arange(len(logp))
        lead = (experts.exp() * (experts - base)).sum(-1).argmax(-1)  # [prompts]
        if previous is not None:
            sure = experts[rows, previous].max(-1).values.exp() >= LEAD_CONFIDENCE
            lead = torch.where(sure, previous, lead)
        previous = lead
        return experts[rows, lead].argmax(-1).repeat_interleave(group)

    return pick


def set_slots(slots: EditSlots, arrays: SlotArrays, mask: np.ndarray) -> None:
    """Each slot (= layer) whose mask edits something; the others stay empty (exactly the identity)."""
    slots.clear()
    for k in range(arrays.A.shape[0]):
        if mask[k].any():
            slots.set(k, *(torch.from_numpy(np.ascontiguousarray(x[k])) for x in (arrays.A, arrays.B, arrays.c, mask)))


def eos_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """The tokenizer's EOS and generation_config's, as the export stage records them for the runtime."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]
    return {int(i) for i in ids if i is not None}
