/**
 * Patches -> the graph's slot inputs (graph contract v3, docs/bundle-format.md), for one prompt:
 * slot.{l}.A, slot.{l}.B [1, rank, hidden] float32, slot.{l}.c [1, 1, rank] float32,
 * slot.{l}.positions [1, 4, rank] int64 (first, last, after, generated per rank row).
 * Several patches at one layer are concatenated along the rank, each patch's weight folded
 * into A (reft_edge/runtime/slots.py and contract.position_rows give the same layout).
 *
 * @example
 *   import { slotInputs } from "./slots.js";
 *   const slots = slotInputs([alice, bob], [1.0, 0.5], manifest);
 *   slots.feeds["slot.15.A"];   // {type: "float32", data: Float32Array, dims: [1, rank, hidden]}
 *   slots.editsGenerated;       // true when a patch edits generated tokens (positions with g)
 */
import { UsageError } from "./errors.js";
import { edits, groups } from "./positions.js";
import { affineEdits } from "./patch.js";
import SPEC from "./spec.js";

// The slot contract comes from Python (spec.js, written by runtime/spec.py from runtime/contract.py)
export const EVERY_PROMPT_TOKEN = SPEC.slots.every_prompt_token;
const LINES = SPEC.slots.position_lines; // the lines of slot.{l}.positions, per rank row
const GENERATED = LINES.indexOf("generated");

/** @typedef {{type: string, data: Float32Array|BigInt64Array, dims: number[]}} TensorSpec */

/** (first, last, after, generated) of the rank rows of one intervention on `where` (contract.row_positions).
 * @param {import("./positions.js").Positions} positions @param {string} where @returns {number[]} */
export function rowPositions(positions, where) {
  const g = groups(positions);
  const prefix = (where === "both" || where === "prefix") && g.includes("prefix");
  const suffix = (where === "both" || where === "suffix") && g.includes("suffix");
  const first = positions.prompt ? EVERY_PROMPT_TOKEN : positions.first;
  const line = { first: prefix ? first : 0, last: suffix ? positions.last : 0, after: suffix ? first : 0,
    generated: edits(positions, where, "generated") ? 1 : 0 };
  return LINES.map((name) => line[name]);
}

/** @param {number[]|undefined} weights @param {number} count @returns {number[]} */
export function checkWeights(weights, count) {
  if (weights === undefined || weights === null) return Array(count).fill(1);
  if (weights.length !== count) {
    throw new UsageError(`${weights.length} weight(s) for ${count} patch(es); give one weight per patch`);
  }
  if (!weights.every((w) => typeof w === "number" && Number.isFinite(w))) {
    throw new UsageError(`weights [${weights.join(", ")}] must be finite numbers (1.0 applies a patch as trained)`);
  }
  return weights;
}

/**
 * @param {import("./patch.js").Patch[]} patches checked against the bundle already
 * @param {number[]|undefined} weights one per patch (default 1)
 * @param {{slot_layers: number[], hidden_size: number}} manifest
 * @returns {{feeds: Object<string, TensorSpec>, empty: Object<string, TensorSpec>, rank: number, editsGenerated: boolean}}
 */
export function slotInputs(patches, weights, manifest) {
  const hidden = manifest.hidden_size;
  const perSlot = new Map(manifest.slot_layers.map((layer) => [layer, []]));
  checkWeights(weights, patches.length).forEach((weight, p) => {
    if (weight === 0) return; // off: no rows at all, exactly as without the patch (as Python)
    const w = Math.fround(weight);
    for (const edit of affineEdits(patches[p])) {
      if (!edit.rank) continue; // every skill switched off
      perSlot.get(edit.layer).push({ ...edit, A: edit.A.map((x) => w * x), positions: patches[p].positions });
    }
  });
  const rank = Math.max(0, ...[...perSlot.values()].map((list) => list.reduce((n, e) => n + e.rank, 0)));
  const feeds = {};
  let editsGenerated = false;
  for (const [layer, list] of perSlot) {
    const A = new Float32Array(rank * hidden), B = new Float32Array(rank * hidden), c = new Float32Array(rank);
    const pos = new BigInt64Array(LINES.length * rank);
    let row = 0;
    for (const e of list) {
      A.set(e.A, row * hidden);
      B.set(e.B, row * hidden);
      c.set(e.c, row);
      const lines = rowPositions(e.positions, e.where);
      editsGenerated ||= lines[GENERATED] === 1;
      for (let r = row; r < row + e.rank; r++) lines.forEach((value, line) => { pos[line * rank + r] = BigInt(value); });
      row += e.rank;
    }
    Object.assign(feeds, slotTensors(layer, hidden, rank, A, B, c, pos));
  }
  return { feeds, empty: emptySlots(manifest), rank, editsGenerated };
}

/** Rank-0 slots: no edit (the graph's slot-free branch). @param {{slot_layers: number[], hidden_size: number}} manifest */
export function emptySlots(manifest) {
  const feeds = {};
  for (const layer of manifest.slot_layers) {
    Object.assign(feeds, slotTensors(layer, manifest.hidden_size, 0, new Float32Array(0), new Float32Array(0),
      new Float32Array(0), new BigInt64Array(0)));
  }
  return feeds;
}

function slotTensors(layer, hidden, rank, A, B, c, positions) {
  const { inputs, dtypes } = SPEC.slots;
  const name = (part) => inputs[part].replace("{layer}", String(layer));
  return {
    [name("A")]: { type: dtypes.A, data: A, dims: [1, rank, hidden] },
    [name("B")]: { type: dtypes.B, data: B, dims: [1, rank, hidden] },
    [name("c")]: { type: dtypes.c, data: c, dims: [1, 1, rank] },
    [name("positions")]: { type: dtypes.positions, data: positions, dims: [1, LINES.length, rank] },
  };
}
