"""Step a bundle's graph through one generation: one prefill pass, then one token per decode step.

Example::

    engine = Engine(session, graph="fused", kv=manifest.kv, slot_layers=[15], device="cpu", pad_id=2)
    run = engine.start([[1, 2, 3], [4, 5]], SlotArrays.empty(1, batch=2, hidden=576), max_new_tokens=8)
    logits = run.prefill()                          # [batch, vocab], each row's last prompt token
    logits = run.decode(logits.argmax(-1))          # the next position of every row
    rows = engine.rows(capacity=8)                  # or: rows that join and leave between steps (RowBatch)

The two graph kinds (``manifest.graph``, docs/bundle-format.md) are fed differently:

- ``fused`` (export.fused): rows are right-padded. Each layer's KV cache is one buffer
  [batch, kv_heads, prompt + max_new_tokens, head_dim] allocated once per generation
  and bound as both past and present, so GroupQueryAttention writes each step's keys
  and values in place. attention_mask has 1 for each row's tokens so far.
- ``traced`` (export.graph): rows are left-padded, position ids are explicit, and the
  cache grows: present = past + the new step, bound back as the next past.

A run owns its IOBinding, so generations on one session from several threads do not
share state (onnxruntime sessions are thread-safe). Slot inputs (A, B, c, positions) are
placed on the device once per run and stay for every step: the graph works out which
tokens they edit (graph contract v3). When no row's patch edits generated tokens, decode
steps bind rank-0 slots instead (empty slots leave the graph nothing to compute: the
fused graph then runs its slot-free branch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reft_edge.runtime.bundle import KVLayout
from reft_edge.runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    POSITION_LINES,
    past_names,
    present_names,
    slot_names,
)
from reft_edge.runtime.slots import SlotArrays


class Engine:
    """One session of a bundle's graph, and how to feed it."""

    def __init__(self, session: Any, *, graph: str, kv: KVLayout, slot_layers: Sequence[int], device: str, pad_id: int):
        self.session, self.graph, self.kv, self.device, self.pad_id = session, graph, kv, device, pad_id
        self.slot_layers = list(slot_layers)
        self.kv_dtype = np.float16 if kv.dtype == "float16" else np.float32
        self.vocab_size = next(o.shape[-1] for o in session.get_outputs() if o.name == LOGITS)
        self.kv_names = [
            (past, present)
            for layer in range(kv.num_layers)
            for past, present in zip(past_names(layer), present_names(layer))
        ]

    def start(self, prompts: Sequence[Sequence[int]], slots: SlotArrays, max_new_tokens: int) -> _Run:
        run_type = _SharedBufferRun if self.graph == "fused" else _GrowingRun
        return run_type(self, [list(p) for p in prompts], slots, max_new_tokens)

    def rows(self, capacity: int, length: int = 256) -> RowBatch | OneRow:
        """A batch that rows join and leave between decode steps: a RowBatch for a fused graph on the
        CPU, else a OneRow (the same interface, one row at a time)."""
        if self.graph == "fused" and self.device == "cpu":
            return RowBatch(self, capacity, length)
        return OneRow(self)

    @staticmethod
    def on_cpu(array: np.ndarray) -> Any:
        from onnxruntime import OrtValue

        return OrtValue.ortvalue_from_numpy(array)

    def on_device(self, array: np.ndarray) -> Any:
        from onnxruntime import OrtValue

        return OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)


class _Run:
    """What both graph kinds share: the binding, the slot inputs, running a step."""

    def __init__(self, engine: Engine, prompts: list[list[int]], slots: SlotArrays, max_new_tokens: int):
        self.engine = engine
        self.binding = engine.session.io_binding()
        self.lens = np.array([len(p) for p in prompts], np.int64)
        self.batch, self.seq = len(prompts), int(self.lens.max())
        self.max_length = self.seq + max_new_tokens
        self.steps = 0
        self.prompt_ids = prompts
        self.arrays: dict[str, np.ndarray] = {}  # bound numpy inputs: onnxruntime reads their memory, keep them
        for k, layer in enumerate(engine.slot_layers):
            a, b, c, positions = slot_names(layer)
            self.binding.bind_ortvalue_input(a, engine.on_device(slots.A[k]))
            self.binding.bind_ortvalue_input(b, engine.on_device(slots.B[k]))
            self.binding.bind_ortvalue_input(c, engine.on_device(slots.c[k][:, None, :]))
            self.binding.bind_ortvalue_input(positions, engine.on_device(slots.positions[k]))
        self.edits_generated = slots.edits_generated
        self.hidden = slots.A.shape[-1]
        # logits land in one buffer of this run: no output to look up and wrap per step
        self.logits_buffer = np.empty((self.batch, 1, engine.vocab_size), np.float32)
        self.binding.bind_ortvalue_output(LOGITS, engine.on_cpu(self.logits_buffer))

    def bind(self, name: str, array: np.ndarray) -> None:
        """Bind a numpy input; onnxruntime reads it in place at every run, so the run keeps it alive."""
        self.arrays[name] = array = np.ascontiguousarray(array)
        self.binding.bind_cpu_input(name, array)

    def run(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """One pass; returns the logits [batch, vocab] of each row's last token (a copy: the
        next pass overwrites the buffer)."""
        for name, array in arrays.items():
            self.bind(name, array)
        self.engine.session.run_with_iobinding(self.binding)
        return self.logits_buffer[:, -1, :].copy()

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Feed each row's next token; returns the logits [batch, vocab] that follow it."""
        if self.steps == 0 and not self.edits_generated:
            self.bind_empty_slots()
        self.steps += 1
        return self.step(np.asarray(tokens, np.int64).reshape(self.batch, 1))

    def bind_empty_slots(self) -> None:
        """No row edits generated tokens: rank 0 adds exactly zero (as the graph's zero mask
        would) and leaves the slot nodes nothing to compute."""
        empty = (
            np.zeros((self.batch, 0, self.hidden), np.float32),
            np.zeros((self.batch, 0, self.hidden), np.float32),
            np.zeros((self.batch, 1, 0), np.float32),
            np.zeros((self.batch, POSITION_LINES, 0), np.int64),
        )
        for layer in self.engine.slot_layers:
            for name, array in zip(slot_names(layer), empty):
                self.bind(name, array)


class _SharedBufferRun(_Run):
    """Right-padded rows; KV buffers preallocated and written in place (graph "fused")."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        engine, kv = self.engine, self.engine.kv
        for past, present in engine.kv_names:
            buffer = engine.on_device(
                np.zeros((self.batch, kv.num_kv_heads, self.max_length, kv.head_dim), engine.kv_dtype)
            )
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)

    def prefill(self) -> np.ndarray:
        input_ids = np.full((self.batch, self.seq), self.engine.pad_id, np.int64)
        for row, prompt in enumerate(self.prompt_ids):
            input_ids[row, : len(prompt)] = prompt
        return self.forward(input_ids)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self.forward(tokens)

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        width = self.seq + self.steps
        attention = (np.arange(width) < (self.lens + self.steps)[:, None]).astype(np.int64)
        return self.run({INPUT_IDS: input_ids, ATTENTION_MASK: attention})


class _GrowingRun(_Run):
    """Left-padded rows, explicit positions, a cache that grows by one step per run (graph "traced")."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        kv, engine = self.engine.kv, self.engine
        self.pads = self.seq - self.lens
        empty = engine.on_device(np.zeros((self.batch, kv.num_kv_heads, 0, kv.head_dim), engine.kv_dtype))
        self.past = [empty] * (2 * kv.num_layers)
        # the whole run's attention mask: 0 on each row's left pads, 1 from there on
        self.attention = (np.arange(self.max_length) >= self.pads[:, None]).astype(np.int64)

    def prefill(self) -> np.ndarray:
        input_ids = np.full((self.batch, self.seq), self.engine.pad_id, np.int64)
        positions = np.ones((self.batch, self.seq), np.int64)  # pads: 1, as Hugging Face gives them
        for row, (prompt, pad) in enumerate(zip(self.prompt_ids, self.pads)):
            input_ids[row, pad:] = prompt
            positions[row, pad:] = np.arange(len(prompt))
        return self.grow(input_ids, positions)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self.grow(tokens, (self.lens + self.steps - 1)[:, None])

    def grow(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        for (past, present), value in zip(self.engine.kv_names, self.past):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_output(present, self.engine.device)
        width = self.seq + self.steps
        logits = self.run(
            {
                INPUT_IDS: input_ids,
                POSITION_IDS: positions,
                ATTENTION_MASK: np.ascontiguousarray(self.attention[:, :width]),
            }
        )
        self.past = self.binding.get_outputs()[1:]  # logits was bound first
        return logits


class RowBatch:
    """A batch whose rows join and leave between decode steps: the server's running batch (graph
    "fused" on the CPU).

    Example::

        batch = engine.rows(capacity=8)
        logits = batch.join("alice", prompt_ids, slots, max_new_tokens=64)   # [vocab]: prefilled alone
        logits = batch.step(tokens)            # [rows, vocab]: one decode step of every row, in batch.owners order
        batch.leave("alice")                   # the last row moves into its place

    Each layer's KV cache is one numpy buffer [capacity, kv_heads, length, head_dim] bound as
    past and present (GroupQueryAttention writes in place, as in a run). Joining rows are
    prefilled on their own (one, or several arriving together in one right-padded pass as a
    run prefills them), straight into their rows of the buffers, so each first token is the
    one the request gets alone; decode steps run rows [0, n) together, each at its own
    length (the attention mask's row sums). Leaving copies the last row into the hole, so
    the running rows stay one contiguous block; a row longer than the buffers grows them.
    Slot inputs are per row (SlotArrays of batch 1), stacked when the rows change.
    """

    def __init__(self, engine: Engine, capacity: int, length: int = 256):
        if engine.graph != "fused" or engine.device != "cpu":
            raise ValueError("RowBatch needs a fused graph on the CPU")
        self.engine, self.capacity, self.length = engine, capacity, length
        self.owners: list[Any] = []
        self.lengths: list[int] = []  # tokens in each row's cache
        self.slots: list[SlotArrays] = []
        self.buffers = self._allocate(length)
        self.binding: Any = None  # the decode binding of the current rows (rebuilt when they change)

    def _allocate(self, length: int) -> list[np.ndarray]:
        kv = self.engine.kv
        return [
            np.zeros((self.capacity, kv.num_kv_heads, length, kv.head_dim), self.engine.kv_dtype)
            for _ in self.engine.kv_names
        ]

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def full(self) -> bool:
        return len(self.owners) >= self.capacity

    def join(self, owner: Any, prompt: Sequence[int], slots: SlotArrays, max_new_tokens: int) -> np.ndarray:
        """Prefill ``prompt`` alone into the next free row; returns the logits [vocab] of its last token."""
        return self.join_many([owner], [prompt], [slots], max_new_tokens)[0]

    def join_many(
        self, owners: Sequence[Any], prompts: Sequence[Sequence[int]], slots: Sequence[SlotArrays], max_new_tokens: int
    ) -> np.ndarray:
        """Prefill several prompts in one pass (right-padded, as a run's prefill) into the next free rows;
        returns the logits [len(prompts), vocab] of each one's last token. The running rows wait."""
        k, row = len(prompts), len(self.owners)
        if row + k > self.capacity:
            raise ValueError(f"{k} more rows do not fit: {row} of {self.capacity} are taken")
        needed = max(len(p) for p in prompts) + max_new_tokens
        if needed > self.length:
            self._grow(max(needed, 2 * self.length))
        engine = self.engine
        binding = engine.session.io_binding()
        for buffer, (past, present) in zip(self.buffers, engine.kv_names):
            view = buffer[row : row + k]
            view[...] = 0
            value = engine.on_cpu(view)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        lens = np.array([len(p) for p in prompts], np.int64)
        input_ids = np.full((k, int(lens.max())), engine.pad_id, np.int64)
        for i, prompt in enumerate(prompts):
            input_ids[i, : len(prompt)] = prompt
        mask = (np.arange(input_ids.shape[1]) < lens[:, None]).astype(np.int64)
        binding.bind_cpu_input(INPUT_IDS, input_ids)
        binding.bind_cpu_input(ATTENTION_MASK, mask)
        kept = _bind_slots(binding, engine.slot_layers, SlotArrays.stack(slots))  # noqa: F841 (alive for the run)
        logits = np.empty((k, 1, engine.vocab_size), np.float32)
        binding.bind_ortvalue_output(LOGITS, engine.on_cpu(logits))
        engine.session.run_with_iobinding(binding)
        self.owners += list(owners)
        self.lengths += lens.tolist()
        self.slots += list(slots)
        self.binding = None
        return logits[:, -1].copy()

    def leave(self, owner: Any) -> None:
        """Free ``owner``'s row at once: the last row takes its place."""
        row, last = self.owners.index(owner), len(self.owners) - 1
        if row != last:
            width = self.lengths[last]
            for buffer in self.buffers:
                buffer[row, :, :width] = buffer[last, :, :width]
            for rows in (self.owners, self.lengths, self.slots):
                rows[row] = rows[last]
        for rows in (self.owners, self.lengths, self.slots):
            rows.pop()
        self.binding = None

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed each row its next token (in ``owners`` order); returns the logits [rows, vocab] that follow."""
        n = len(self.owners)
        if any(length >= self.length for length in self.lengths):
            self._grow(2 * self.length)
        if self.binding is None:
            self._bind_rows()
        lengths = np.asarray(self.lengths, np.int64) + 1
        ids = np.asarray(tokens, np.int64).reshape(n, 1)
        mask = (np.arange(int(lengths.max())) < lengths[:, None]).astype(np.int64)
        self.binding.bind_cpu_input(INPUT_IDS, ids)  # read during the run below, which keeps them alive
        self.binding.bind_cpu_input(ATTENTION_MASK, mask)
        self.engine.session.run_with_iobinding(self.binding)
        self.lengths = lengths.tolist()
        return self.logits[:, -1, :].copy()

    def _bind_rows(self) -> None:
        engine, n = self.engine, len(self.owners)
        binding = engine.session.io_binding()
        for buffer, (past, present) in zip(self.buffers, engine.kv_names):
            value = engine.on_cpu(buffer[:n])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        slots = SlotArrays.stack(self.slots)
        if not slots.edits_generated:  # as a run's decode steps: rank 0, the graph's slot-free branch
            slots = SlotArrays.empty(len(engine.slot_layers), n, slots.A.shape[-1])
        self.slot_inputs = _bind_slots(binding, engine.slot_layers, slots)  # kept alive with the binding
        self.logits = np.empty((n, 1, engine.vocab_size), np.float32)
        binding.bind_ortvalue_output(LOGITS, engine.on_cpu(self.logits))
        self.binding = binding

    def _grow(self, length: int) -> None:
        grown = self._allocate(length)
        for old, new in zip(self.buffers, grown):
            new[:, :, : self.length] = old
        self.buffers, self.length, self.binding = grown, length, None


def _bind_slots(binding: Any, slot_layers: Sequence[int], slots: SlotArrays) -> list[np.ndarray]:
    """Bind each slot layer's A, B, c and positions from numpy; returns the arrays (keep them alive)."""
    arrays = []
    for k, layer in enumerate(slot_layers):
        for name, array in zip(slot_names(layer), (slots.A[k], slots.B[k], slots.c[k][:, None, :], slots.positions[k])):
            arrays.append(array := np.ascontiguousarray(array))
            binding.bind_cpu_input(name, array)
    return arrays


class OneRow:
    """RowBatch's interface with room for one row, as an ordinary run: for traced graphs and CUDA,
    whose KV caches RowBatch cannot move between rows."""

    capacity = 1

    def __init__(self, engine: Engine):
        self.engine, self.owners, self.run = engine, [], None

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def full(self) -> bool:
        return bool(self.owners)

    def join(self, owner: Any, prompt: Sequence[int], slots: SlotArrays, max_new_tokens: int) -> np.ndarray:
        if self.full:
            raise ValueError("the batch is full")
        self.run = self.engine.start([list(prompt)], slots, max_new_tokens)
        logits = self.run.prefill()
        self.owners = [owner]
        return logits[0]

    def join_many(
        self, owners: Sequence[Any], prompts: Sequence[Sequence[int]], slots: Sequence[SlotArrays], max_new_tokens: int
    ) -> np.ndarray:
        if len(prompts) != 1:
            raise ValueError("a OneRow takes one row")
        return self.join(owners[0], prompts[0], slots[0], max_new_tokens)[None]

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        return self.run.decode(np.asarray(tokens, np.int64))

    def leave(self, owner: Any) -> None:
        self.owners.remove(owner)
        self.run = None
