/**
 * Which tokens an intervention edits: ``f{p}+l{s}``, ``p`` (every prompt token), ``g`` (every
 * generated token), as reft_edge/runtime/positions.py parses them (strictly, canonical spelling only).
 *
 * @example
 *   import { parsePositions, positionsString } from "./positions.js";
 *   const p = parsePositions("f1+l1+g");   // {first: 1, last: 1, prompt: false, generated: true}
 *   positionsString(p) === "f1+l1+g";
 */
import { UsageError } from "./errors.js";

/** @typedef {{first: number, last: number, prompt: boolean, generated: boolean}} Positions */

export const WHERE = ["both", "prefix", "suffix", "generated"];
const PART = /^(?:f(\d+)|l(\d+)|(p)|(g))$/;

/** @param {Positions} p @returns {string} */
export function positionsString(p) {
  const parts = [];
  if (p.first) parts.push(`f${p.first}`);
  if (p.last) parts.push(`l${p.last}`);
  if (p.prompt) parts.push("p");
  if (p.generated) parts.push("g");
  return parts.join("+");
}

/** @param {string} text @returns {Positions} */
export function parsePositions(text) {
  const trimmed = typeof text === "string" ? text.trim() : text;
  if (trimmed === "all") return { first: 0, last: 0, prompt: true, generated: true };
  let positions = null;
  if (typeof trimmed === "string") {
    const found = {};
    let ok = true;
    for (const part of trimmed.split("+")) {
      const m = PART.exec(part);
      if (!m) { ok = false; break; }
      if (m[1] !== undefined) found.first = m[1];
      if (m[2] !== undefined) found.last = m[2];
      if (m[3] !== undefined) found.prompt = true;
      if (m[4] !== undefined) found.generated = true;
    }
    if (ok) {
      positions = { first: parseInt(found.first ?? "0", 10), last: parseInt(found.last ?? "0", 10),
                    prompt: !!found.prompt, generated: !!found.generated };
    }
  }
  if (positions === null || positionsString(positions) !== trimmed
      || (positions.prompt && (positions.first || positions.last))) {
    throw new UsageError(`positions '${trimmed}' is malformed: expected parts f<p>, l<s>, p, g joined by '+' in `
      + "that order (f and l exclude p), or 'all'; e.g. --positions f1+l1+g");
  }
  return positions;
}

/** The position groups selected: one intervention per group when weights are untied.
 * @param {Positions} p @returns {string[]} */
export function groups(p) {
  return [["prefix", p.first || p.prompt], ["suffix", p.last], ["generated", p.generated]]
    .filter(([, used]) => used).map(([group]) => /** @type {string} */ (group));
}

/** @param {Positions} p @param {string} where @param {string} group */
export function edits(p, where, group) {
  return groups(p).includes(group) && (where === "both" || where === group);
}
