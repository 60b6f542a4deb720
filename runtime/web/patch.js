/**
 * Patch format v3 (`.reft`, reading v1 and v2 too) in the browser: parse and validate a safetensors patch exactly as
 * reft_edge/runtime/patch.py does (docs/patch-format.md is the specification), with the same
 * error kinds and messages. Nothing is executed; the digest uses WebCrypto.
 *
 * @example
 *   import { parsePatch, checkCompatible, affineEdits } from "./patch.js";
 *   const bytes = new Uint8Array(await (await fetch("/patches/alice.reft")).arrayBuffer());
 *   const patch = await parsePatch(bytes, "alice.reft");   // PatchFormatError if damaged
 *   checkCompatible(patch, manifest, "alice.reft");        // BackboneMismatchError, PatchCompatibilityError
 *   for (const edit of affineEdits(patch)) console.log(edit.layer, edit.where, edit.rank);
 */
import { BackboneMismatchError, PatchCompatibilityError, PatchFormatError, UsageError } from "./errors.js";
import { groups, parsePositions, positionsString, WHERE } from "./positions.js";

import SPEC from "./spec.js";

// The format's facts come from Python (spec.js, written by runtime/spec.py)
export const PATCH_FORMAT = SPEC.patch.format;
export const PATCH_FORMAT_VERSION = SPEC.patch.format_version;
const SKILLS_FORMAT_VERSION = SPEC.patch.skills_format_version; // the first version with skill groups
const SKILL_NAME = new RegExp(`^(?:${SPEC.patch.skill_name})$`);
export const MAX_PATCH_BYTES = SPEC.patch.max_patch_bytes;
export const MAX_HEADER_BYTES = SPEC.patch.max_header_bytes;
export const KIND_TENSORS = SPEC.patch.kinds;
/** Real metadata nests 4 levels at most; the bound keeps every reader and printer off deep recursion. */
export const MAX_JSON_DEPTH = SPEC.patch.max_json_depth;
const MAX_SHOWN_CHARS = 200; // of a bad metadata value quoted in an error message

class TooDeep extends Error {}

/** How deep arrays and objects nest in a parsed JSON value (iterative: safe on any depth). */
export function jsonDepth(value) {
  let deepest = 0;
  const stack = [[value, 0]];
  while (stack.length) {
    const [item, depth] = stack.pop();
    if (item !== null && typeof item === "object") {
      deepest = Math.max(deepest, depth + 1);
      for (const child of Object.values(item)) stack.push([child, depth + 1]);
    }
  }
  return deepest;
}

/** JSON.parse that refuses (TooDeep) values nested deeper than MAX_JSON_DEPTH, as Python's reader does. */
function parseBounded(text) {
  let value;
  try { value = JSON.parse(text); } catch (e) {
    if (e instanceof RangeError) throw new TooDeep(); // a stack overflow on deep nesting
    throw e;
  }
  if (jsonDepth(value) > MAX_JSON_DEPTH) throw new TooDeep();
  return value;
}

/** pyRepr(v), cut to MAX_SHOWN_CHARS like Python's shown(): an error message stays one readable line. */
function shown(v) {
  const text = pyRepr(v);
  return text.length <= MAX_SHOWN_CHARS ? text : text.slice(0, MAX_SHOWN_CHARS) + "...";
}
const KINDS = Object.keys(KIND_TENSORS);
const SAVE_DTYPES = SPEC.patch.save_dtypes;
const REQUIRED_METADATA = SPEC.patch.required_metadata;
const { max_rank: MAX_RANK, max_layer: MAX_LAYER } = SPEC.patch;
// safetensors dtype -> [numpy name, bytes per element]; only F32 and F16 are valid in a patch
const ST_DTYPES = { BOOL: ["bool", 1], U8: ["uint8", 1], I8: ["int8", 1], I16: ["int16", 2], U16: ["uint16", 2],
  F16: ["float16", 2], I32: ["int32", 4], U32: ["uint32", 4], F32: ["float32", 4], F64: ["float64", 8],
  I64: ["int64", 8], U64: ["uint64", 8] };

/**
 * @typedef {{name: string, dtype: string, shape: number[], bytes: Uint8Array, values?: Float32Array}} RawTensor
 * @typedef {{layer: number, where: string, params: Object<string, Float32Array>}} Intervention
 * @typedef {{name: string, kind: string, positions: import("./positions.js").Positions, shareWeights: boolean,
 *   rank: number, hiddenSize: number, baseFingerprint: string, dtype: string, payloadSha256: string,
 *   sizeBytes: number, training: object, interventions: Intervention[], layers: number[]}} Patch
 * @typedef {{layer: number, where: string, rank: number, A: Float32Array, B: Float32Array, c: Float32Array}} AffineEdit
 */

/** Python's json.dumps for a string (ensure_ascii). @param {string} s */
export function pyJsonString(s) {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    const code = s.charCodeAt(i);
    if (ch === '"') out += '\\"';
    else if (ch === "\\") out += "\\\\";
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (ch === "\b") out += "\\b";
    else if (ch === "\f") out += "\\f";
    else if (code < 0x20 || code > 0x7e && code !== 0x7f) out += "\\u" + code.toString(16).padStart(4, "0");
    else out += ch;
  }
  return out + '"';
}

/** Python's repr() of a JSON value, for messages. @param {any} v @returns {string} */
export function pyRepr(v) {
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "number") return String(v);
  if (typeof v === "string") {
    const quote = v.includes("'") && !v.includes('"') ? '"' : "'";
    const body = v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/\r/g, "\\r").replace(/\t/g, "\\t");
    return quote + (quote === "'" ? body.replace(/'/g, "\\'") : body) + quote;
  }
  if (Array.isArray(v)) return "[" + v.map(pyRepr).join(", ") + "]";
  return "{" + Object.entries(v).map(([k, x]) => `${pyRepr(k)}: ${pyRepr(x)}`).join(", ") + "}";
}

/** @param {Uint8Array[]} parts @returns {Promise<string>} sha256 hex */
async function sha256Hex(parts) {
  if (!globalThis.crypto?.subtle) {
    throw new UsageError("WebCrypto is unavailable: this page is not a secure context; serve it over https or "
      + "from localhost to check patch digests");
  }
  const total = parts.reduce((n, p) => n + p.length, 0);
  const joined = new Uint8Array(total);
  let offset = 0;
  for (const p of parts) { joined.set(p, offset); offset += p.length; }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", joined));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * sha256 over the metadata (every key but payload_sha256, as sorted JSON), then
 * (name, dtype, shape, little-endian bytes) of every tensor in name order.
 * @param {Object<string, RawTensor>} tensors @param {Object<string, string>} metadata
 */
export async function payloadDigest(tensors, metadata) {
  const enc = new TextEncoder();
  const keys = Object.keys(metadata).filter((k) => k !== "payload_sha256").sort();
  const parts = [enc.encode("{" + keys.map((k) => `${pyJsonString(k)}: ${pyJsonString(metadata[k])}`).join(", ") + "}")];
  for (const name of Object.keys(tensors).sort()) {
    const t = tensors[name];
    parts.push(enc.encode(`[${pyJsonString(name)}, ${pyJsonString(t.dtype)}, [${t.shape.join(", ")}]]`));
    parts.push(t.bytes);
  }
  return sha256Hex(parts);
}

/** @param {Uint8Array} data @param {string} source @returns {Object<string, string>} */
function readMetadata(data, source) {
  if (data.length < 8) {
    throw new PatchFormatError(`${source}: ${data.length} bytes is too short for a safetensors file; `
      + "pass a .reft file written by reft-edge train");
  }
  const headerLen = new DataView(data.buffer, data.byteOffset, 8).getBigUint64(0, true);
  if (headerLen > BigInt(Math.min(MAX_HEADER_BYTES, data.length - 8))) {
    throw new PatchFormatError(`${source}: header length ${headerLen} is impossible for a ${data.length}-byte file; `
      + "the file is truncated or not a patch");
  }
  let header;
  try {
    header = parseBounded(new TextDecoder("utf-8", { fatal: true }).decode(data.subarray(8, 8 + Number(headerLen))));
  } catch (e) {
    if (e instanceof TooDeep) {
      throw new PatchFormatError(`${source}: header nests deeper than ${MAX_JSON_DEPTH} levels; `
        + "the file is damaged or not a patch");
    }
    throw new PatchFormatError(`${source}: header is not valid JSON; the file is damaged or not a patch`);
  }
  const metadata = header !== null && typeof header === "object" && !Array.isArray(header) ? header.__metadata__ : undefined;
  if (metadata === null || typeof metadata !== "object" || Array.isArray(metadata)
      || !Object.values(metadata).every((v) => typeof v === "string")) {
    throw new PatchFormatError(`${source}: no reft-edge metadata in the header; pass a .reft file `
      + "written by reft-edge train");
  }
  return metadata;
}

/** The safetensors rules (offsets contiguous from 0 to the end, sizes match shapes). */
function readTensors(data, source) {
  const damaged = (reason) => new PatchFormatError(`${source}: tensor data is damaged (${reason}); copy the file again`);
  const headerLen = Number(new DataView(data.buffer, data.byteOffset, 8).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(data.subarray(8, 8 + headerLen)));
  const body = data.subarray(8 + headerLen);
  const entries = Object.entries(header).filter(([name]) => name !== "__metadata__");
  /** @type {Object<string, RawTensor>} */
  const tensors = {};
  const spans = [];
  for (const [name, info] of entries) {
    if (info === null || typeof info !== "object" || !Array.isArray(info.shape) || !Array.isArray(info.data_offsets)
        || info.data_offsets.length !== 2 || !info.shape.every((n) => Number.isInteger(n) && n >= 0)
        || !info.data_offsets.every((n) => Number.isInteger(n) && n >= 0)) {
      throw damaged(`invalid header entry for ${name}`);
    }
    if (!(info.dtype in ST_DTYPES)) throw damaged(`unsupported dtype ${info.dtype} for ${name}`);
    const [dtype, itemsize] = ST_DTYPES[info.dtype];
    const [begin, end] = info.data_offsets;
    const count = info.shape.reduce((a, b) => a * b, 1);
    if (end < begin || end - begin !== count * itemsize) throw damaged(`tensor ${name} has invalid info`);
    spans.push([begin, end]);
    tensors[name] = { name, dtype, shape: info.shape, bytes: body.slice(begin, end) };
  }
  spans.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let at = 0;
  for (const [begin, end] of spans) {
    if (begin !== at) throw damaged("metadata incomplete buffer");
    at = end;
  }
  if (at !== body.length) throw damaged("metadata incomplete buffer");
  return tensors;
}

function isIntText(text) {
  return /^\s*-?(0|[1-9]\d*)\s*$/.test(text);
}

function parseMetadata(metadata, source) {
  const bad = (key, expected) => new PatchFormatError(`${source}: metadata '${key}' is ${shown(metadata[key])}, `
    + `expected ${expected}; the file is damaged, re-train or copy it again`);
  const missing = REQUIRED_METADATA.filter((k) => !(k in metadata));
  if (missing.length) {
    throw new PatchFormatError(`${source}: metadata lacks ${missing.join(", ")}; pass a .reft file written by reft-edge train`);
  }
  const v = {};
  for (const key of REQUIRED_METADATA) {
    try { v[key] = parseBounded(metadata[key]); } catch (e) {
      throw bad(key, e instanceof TooDeep ? `JSON nested at most ${MAX_JSON_DEPTH} levels deep` : "a JSON value");
    }
  }
  if (v.format !== PATCH_FORMAT) throw bad("format", pyRepr(PATCH_FORMAT));
  if (!isIntText(metadata.format_version) || !(v.format_version >= 1 && v.format_version <= PATCH_FORMAT_VERSION)) {
    throw new PatchFormatError(`${source}: format version ${shown(v.format_version)}, this reft-edge reads version `
      + `${PATCH_FORMAT_VERSION}; upgrade reft-edge or re-train the patch`);
  }
  if (typeof v.kind !== "string" || !KINDS.includes(v.kind)) throw bad("kind", `one of ${KINDS.join(", ")}`);
  for (const key of ["rank", "hidden_size"]) {
    if (!isIntText(metadata[key]) || !(v[key] >= 1 && v[key] <= MAX_RANK)) throw bad(key, `a whole number from 1 to ${MAX_RANK}`);
  }
  if (v.rank > v.hidden_size) throw bad("rank", "at most hidden_size");
  for (const key of ["name", "base_fingerprint"]) if (typeof v[key] !== "string") throw bad(key, "a string");
  if (typeof v.share_weights !== "boolean") throw bad("share_weights", "true or false");
  if (!SAVE_DTYPES.includes(v.dtype)) throw bad("dtype", `one of ${SAVE_DTYPES.join(", ")}`);
  if (typeof v.payload_sha256 !== "string" || v.payload_sha256.length !== 64) throw bad("payload_sha256", "64 hex digits");
  if (v.training === null || typeof v.training !== "object" || Array.isArray(v.training)) throw bad("training", "a JSON object");
  if (typeof v.positions !== "string") throw bad("positions", "a string like 'f1+l1'");
  try { v.positions = parsePositions(v.positions); } catch { throw bad("positions", "a string like 'f1+l1'"); }
  const version = v.positions.prompt || v.positions.generated ? SPEC.patch.prompt_or_generated_format_version : 1;
  if (version > v.format_version) throw bad("positions", `positions that format version ${v.format_version} can express`);
  const entries = v.interventions;
  if (!Array.isArray(entries) || !entries.length || !entries.every((e) => e !== null && typeof e === "object"
      && !Array.isArray(e) && Object.keys(e).length === 2 && "layer" in e && "where" in e
      && Number.isInteger(e.layer) && e.layer >= 0 && e.layer < MAX_LAYER && WHERE.includes(e.where))) {
    throw bad("interventions", "a non-empty list of {layer, where} objects");
  }
  const allowed = v.share_weights ? ["both"] : groups(v.positions);
  if (entries.some((e) => !allowed.includes(e.where))) {
    throw bad("interventions", `'where' among ${pyRepr(allowed)} (the groups of positions `
      + `${positionsString(v.positions)} with share_weights ${pyRepr(v.share_weights)})`);
  }
  const layers = [...new Set(entries.map((e) => e.layer))].sort((a, b) => a - b);
  if (!Array.isArray(v.layers) || JSON.stringify(v.layers) !== JSON.stringify(layers)) {
    throw bad("layers", "the sorted layers of the interventions");
  }
  v.skills = parseSkills(metadata, v, bad);
  return v;
}

/** Optional ``skills``: [{name, rank}, ...] splitting the rank rows in order (version 3 only). */
function parseSkills(metadata, v, bad) {
  if (!("skills" in metadata)) return [];
  let skills;
  try { skills = parseBounded(metadata.skills); } catch (e) {
    throw bad("skills", e instanceof TooDeep ? `JSON nested at most ${MAX_JSON_DEPTH} levels deep` : "a JSON value");
  }
  const expected = `a list of {name, rank} objects with distinct names whose ranks add up to rank ${v.rank}`;
  if (v.format_version < SKILLS_FORMAT_VERSION) throw bad("format_version", `${SKILLS_FORMAT_VERSION} (the file has skills)`);
  if (!Array.isArray(skills) || !skills.length || !skills.every((s) => s !== null && typeof s === "object"
      && !Array.isArray(s) && Object.keys(s).length === 2 && typeof s.name === "string" && SKILL_NAME.test(s.name)
      && Number.isInteger(s.rank) && s.rank >= 1)) {
    throw bad("skills", expected);
  }
  if (new Set(skills.map((s) => s.name)).size !== skills.length
      || skills.reduce((sum, s) => sum + s.rank, 0) !== v.rank) throw bad("skills", expected);
  return skills.map((s) => [s.name, s.rank]);
}

/** IEEE half -> float. @param {number} h */
function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

/** @param {RawTensor} t @returns {Float32Array} */
function floatValues(t) {
  const view = new DataView(t.bytes.buffer, t.bytes.byteOffset, t.bytes.byteLength);
  const n = t.shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = t.dtype === "float16" ? halfToFloat(view.getUint16(2 * i, true)) : view.getFloat32(4 * i, true);
  return out;
}

function checkTensors(tensors, v, source) {
  const names = KIND_TENSORS[v.kind];
  const expected = new Set(v.interventions.flatMap((_, i) => names.map((n) => `interventions.${i}.${n}`)));
  const found = new Set(Object.keys(tensors));
  const diff = [...found].filter((n) => !expected.has(n)).concat([...expected].filter((n) => !found.has(n))).sort();
  if (diff.length) {
    throw new PatchFormatError(`${source}: tensors ${pyRepr(diff.slice(0, 4))} are missing or unexpected for kind `
      + `'${v.kind}'; the file is damaged, re-train it`);
  }
  for (const [name, t] of Object.entries(tensors)) {
    const shape = name.endsWith(".b") ? [v.rank] : [v.rank, v.hidden_size];
    if (JSON.stringify(t.shape) !== JSON.stringify(shape)) {
      throw new PatchFormatError(`${source}: tensor ${name} has shape ${pyRepr(t.shape)}, expected ${pyRepr(shape)}; `
        + "the file is damaged, re-train it");
    }
    if (t.dtype !== v.dtype) {
      throw new PatchFormatError(`${source}: tensor ${name} is ${t.dtype}, metadata says ${v.dtype}; `
        + "the file is damaged, re-train it");
    }
    t.values = floatValues(t);
    if (!t.values.every(Number.isFinite)) {
      throw new PatchFormatError(`${source}: tensor ${name} holds NaN or infinite values; re-train the patch (lower --lr)`);
    }
  }
}

/**
 * Parse and validate a .reft file, in the order Python does: size, header length, header
 * JSON and metadata, safetensors layout, payload digest, metadata fields, tensors.
 * @param {Uint8Array|ArrayBuffer} bytes @param {string} [source] shown in error messages
 * @returns {Promise<Patch>}
 */
export async function parsePatch(bytes, source = "patch") {
  const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  if (data.length > MAX_PATCH_BYTES) {
    throw new PatchFormatError(`${source}: ${data.length} bytes is larger than any patch (${MAX_PATCH_BYTES} at most); `
      + "pass a .reft file written by reft-edge train");
  }
  const metadata = readMetadata(data, source);
  const tensors = readTensors(data, source);
  const digest = await payloadDigest(tensors, metadata);
  if (pyJsonString(digest) !== metadata.payload_sha256) {
    throw new PatchFormatError(`${source}: payload digest ${digest.slice(0, 16)} does not match the recorded `
      + `${String(metadata.payload_sha256 ?? "None").slice(0, 18)}; the file is damaged, copy it again`);
  }
  const v = parseMetadata(metadata, source);
  checkTensors(tensors, v, source);
  const interventions = v.interventions.map((e, i) => ({
    layer: e.layer, where: e.where,
    params: Object.fromEntries(KIND_TENSORS[v.kind].map((n) => [n, tensors[`interventions.${i}.${n}`].values])),
  }));
  return {
    name: v.name, kind: v.kind, positions: v.positions, shareWeights: v.share_weights, rank: v.rank,
    hiddenSize: v.hidden_size, baseFingerprint: v.base_fingerprint, dtype: v.dtype, payloadSha256: digest,
    sizeBytes: data.length, training: v.training, interventions, layers: v.layers, skills: v.skills,
    skillWeights: null,
  };
}

/**
 * The patch with only the chosen skills on, as Python's Patch.with_skills: an array of names
 * (each at weight 1) or an object name -> weight (0 = off). Unknown names are a UsageError.
 * @param {Patch} patch @param {string[]|Object<string, number>} chosen @returns {Patch}
 */
export function withSkills(patch, chosen) {
  const names = patch.skills.map(([name]) => name);
  if (!names.length) {
    throw new UsageError(`patch '${patch.name}' has no skills; train one with reft-edge train --skill NAME=DATA `
      + "or use the patch as a whole");
  }
  const weights = Array.isArray(chosen) ? Object.fromEntries(chosen.map((n) => [n, 1])) : { ...chosen };
  const unknown = Object.keys(weights).filter((n) => !names.includes(n)).sort();
  if (unknown.length) throw new UsageError(`patch '${patch.name}' has no skill '${unknown[0]}'; its skills are ${names.join(", ")}`);
  if (!Object.values(weights).every(Number.isFinite)) {
    throw new UsageError("skill weights must be finite numbers (1.0 applies a skill as trained)");
  }
  return { ...patch, skillWeights: names.filter((n) => n in weights).map((n) => [n, weights[n]]) };
}

/** [rows to keep, their A scale], or null when every row is on at weight 1 (no choice made). */
function chosenRows(patch) {
  if (!patch.skillWeights) return null;
  const weights = Object.fromEntries(patch.skillWeights);
  const rows = [], scale = [];
  let start = 0;
  for (const [name, rank] of patch.skills) {
    const w = weights[name] ?? 0;
    if (w !== 0) for (let r = start; r < start + rank; r++) { rows.push(r); scale.push(w); }
    start += rank;
  }
  return [rows, scale];
}

/**
 * Raise unless the patch applies to this bundle (manifest.json's fields).
 * @param {Patch} patch @param {{base_fingerprint: string, hidden_size: number, slot_layers: number[]}} manifest
 * @param {string} [source]
 */
export function checkCompatible(patch, manifest, source = "patch") {
  if (patch.baseFingerprint !== manifest.base_fingerprint) {
    throw new BackboneMismatchError(`${source}: trained on base ${patch.baseFingerprint.slice(0, 16)}, but this bundle's `
      + `base is ${manifest.base_fingerprint.slice(0, 16)}; train the patch on the bundle's model or export that patch's base`);
  }
  if (patch.hiddenSize !== manifest.hidden_size) {
    throw new PatchCompatibilityError(`${source}: hidden size ${patch.hiddenSize}, bundle expects ${manifest.hidden_size}; `
      + "train the patch on the bundle's model");
  }
  const missing = patch.layers.filter((l) => !manifest.slot_layers.includes(l));
  if (missing.length) {
    throw new PatchCompatibilityError(`${source}: edits layers ${pyRepr(missing)}, which are not among the bundle's slot `
      + `layers ${pyRepr(manifest.slot_layers)}; re-export with --slot-layers including them (or all)`);
  }
}

/**
 * Each intervention as the shared edit h + ((h Bᵀ + c) ⊙ m) A, with the chosen skills only
 * (withSkills): rows of skills switched off are dropped, a weight scales its rows of A.
 * @param {Patch} patch @returns {AffineEdit[]}
 */
export function affineEdits(patch) {
  const chosen = chosenRows(patch);
  const hidden = patch.hiddenSize;
  const pick = (matrix, scale) => {
    const out = new Float32Array(chosen[0].length * hidden);
    chosen[0].forEach((row, i) => {
      for (let j = 0; j < hidden; j++) out[i * hidden + j] = matrix[row * hidden + j] * (scale ? scale[i] : 1);
    });
    return out;
  };
  return patch.interventions.map(({ layer, where, params }) => {
    const { R, W, b, W1, W2 } = params;
    const sub = (x, y) => x.map((value, i) => value - y[i]);
    const AB = {
      loreft: () => [R, sub(W, R)], direft: () => [R, W], consreft: () => [R, R.map((x) => -x)],
      lobireft: () => [R, new Float32Array(R.length)], noreft: () => [W2, sub(W1, W2)], nodireft: () => [W2, W1],
    }[patch.kind]();
    if (!chosen) return { layer, where, rank: patch.rank, A: AB[0], B: AB[1], c: b };
    // Math.fround: the scaled rows round to float32 exactly as numpy's float32 product does
    const A = pick(AB[0], chosen[1].map(Math.fround));
    return { layer, where, rank: chosen[0].length, A, B: pick(AB[1]), c: Float32Array.from(chosen[0], (r) => b[r]) };
  });
}
