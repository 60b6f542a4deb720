/**
 * Choosing the next token from last-position logits (reft_edge/runtime/sampling.py's order:
 * repetition penalty, the n-gram loop guard, temperature, top-k, top-p). Temperature 0 is greedy (argmax, ties to the
 * lowest id). Seeded draws come from a small deterministic generator (mulberry32): the same seed
 * gives the same answer in every browser, but not numpy's stream, so sampled text differs from Python's.
 *
 * @example
 *   const sampling = checkSampling({temperature: 0.7, topP: 0.9, seed: 1});
 *   const next = pick(logits, sampling, seen, rng(sampling.seed));
 */
import { UsageError } from "./errors.js";
import SPEC from "./spec.js";

/** @typedef {{temperature: number, topK: number|null, topP: number|null, repetitionPenalty: number|null,
 *   noRepeatNgram: number|null, seed: number|null}} Sampling */

/** The loop guard's default, from Python (spec.js): on in every runtime, 0 turns it off. */
export const NO_REPEAT_NGRAM = SPEC.defaults.no_repeat_ngram;

/** @param {Partial<Sampling>} options @returns {Sampling} */
export function checkSampling({ temperature = 0, topK = null, topP = null, repetitionPenalty = null,
  noRepeatNgram = NO_REPEAT_NGRAM,
  seed = null } = {}) {
  if (!(temperature >= 0)) throw new UsageError(`temperature ${temperature} must be >= 0 (0 is greedy)`);
  if (topK !== null && !(topK >= 1)) throw new UsageError(`top_k ${topK} must be at least 1`);
  if (topP !== null && !(topP > 0 && topP <= 1)) throw new UsageError(`top_p ${topP} must be in (0, 1]`);
  if (repetitionPenalty !== null && !(repetitionPenalty > 0)) {
    throw new UsageError(`repetition_penalty ${repetitionPenalty} must be > 0 (1.0 is none)`);
  }
  if (noRepeatNgram !== null && !(Number.isInteger(noRepeatNgram) && noRepeatNgram >= 0)) {
    throw new UsageError(`no_repeat_ngram ${noRepeatNgram} must be a whole number >= 0 (0 is off)`);
  }
  return { temperature, topK, topP, repetitionPenalty, noRepeatNgram, seed };
}

/** mulberry32: uniform floats in [0, 1). @param {number|null} seed @returns {() => number} */
export function rng(seed) {
  let a = (seed ?? Math.floor(Math.random() * 2 ** 32)) >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** @param {Float32Array} logits @returns {number} */
export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

/**
 * The tokens that would complete an n-gram the answer already holds (transformers'
 * no_repeat_ngram_size, over the generated tokens only).
 * @param {number[]} answer @param {number} n @returns {number[]}
 * @example bannedTokens([1, 2, 3, 1, 2], 3)  // [3]: "1 2" was followed by 3
 */
export function bannedTokens(answer, n) {
  if (answer.length < n) return [];
  const tail = n > 1 ? answer.slice(answer.length - n + 1) : [];
  const banned = [];
  for (let start = 0; start + n <= answer.length; start++) {
    if (tail.every((token, i) => answer[start + i] === token)) banned.push(answer[start + n - 1]);
  }
  return banned;
}

/**
 * @param {Float32Array} logits [vocab] @param {Sampling} sampling @param {Set<number>} seen tokens so far
 * @param {() => number} random @param {number[]|null} [answer] generated tokens so far (decode steps)
 * @returns {number}
 */
export function pick(logits, sampling, seen, random, answer = null) {
  let values = logits;
  const penalty = sampling.repetitionPenalty;
  if (penalty !== null && penalty !== 1) {
    values = Float32Array.from(logits);
    for (const id of seen) values[id] = values[id] > 0 ? values[id] / penalty : values[id] * penalty;
  }
  if (sampling.noRepeatNgram && answer) {
    const banned = bannedTokens(answer, sampling.noRepeatNgram);
    if (banned.length) {
      values = Float32Array.from(values);
      for (const id of banned) values[id] = -Infinity;
    }
  }
  if (sampling.temperature === 0) return argmax(values);
  let scaled = Array.from(values, (x) => x / sampling.temperature);
  const order = scaled.map((_, i) => i).sort((a, b) => scaled[b] - scaled[a] || a - b);
  let keep = order.length;
  if (sampling.topK !== null) keep = Math.min(keep, sampling.topK);
  const max = scaled[order[0]];
  const probs = order.slice(0, keep).map((i) => Math.exp(scaled[i] - max));
  const sum = probs.reduce((a, b) => a + b, 0);
  if (sampling.topP !== null && sampling.topP < 1) {
    let before = 0, n = 0;
    while (n < probs.length && before < sampling.topP) { before += probs[n] / sum; n++; }
    keep = Math.max(1, n);
  }
  const kept = probs.slice(0, keep);
  const total = kept.reduce((a, b) => a + b, 0);
  let draw = random() * total;
  for (let i = 0; i < kept.length; i++) {
    draw -= kept[i];
    if (draw < 0) return order[i];
  }
  return order[kept.length - 1];
}
