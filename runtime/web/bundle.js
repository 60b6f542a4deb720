/**
 * Load a bundle over HTTP (docs/bundle-format.md): manifest.json first, then the graph and its
 * external data, tokenizer.json, tokenizer_config.json and the chat template. Downloads report
 * progress and go through the Cache Storage API (keyed by URL and the base fingerprint), so a
 * returning visitor downloads nothing; when the browser refuses to store (private mode, quota,
 * size), that is logged once and the bundle loads without the cache.
 *
 * @example
 *   import { loadBundle } from "./bundle.js";
 *   const bundle = await loadBundle("/bundle/", {onProgress: ({stage, file, loaded, total}) => console.log(stage, file, loaded, total)});
 *   bundle.manifest.slot_layers; bundle.files.model;  // Uint8Array of model.onnx
 */
import { BundleError } from "./errors.js";
import SPEC from "./spec.js";

export const SCHEMA_VERSION = SPEC.bundle.schema_version; // from Python (spec.js, written by runtime/spec.py)
const CACHE_NAME = "reft-edge-bundles";

/** @typedef {{stage: "download"|"cache"|"dequantize"|"session", file?: string, loaded?: number, total?: number,
 *   cached?: boolean}} Progress download: bytes of a file so far (cached: read from Cache Storage); cache: a
 *   downloaded file being stored; dequantize and session: Model.create's steps */
/** @typedef {{manifest: any, url: string, files: {model: Uint8Array, modelData: Uint8Array|null,
 *   tokenizer: any, tokenizerConfig: any, chatTemplate: string|null}, downloadedBytes: number,
 *   cacheError: string|null}} Bundle */

/**
 * Cache Storage when the browser gives it; any refusal (no secure context, private mode, quota,
 * an entry too large: "Failed to execute 'put' on 'Cache'") is logged once and the bundle loads
 * without it.
 */
class BundleCache {
  constructor() {
    /** @type {string|null} why files are not cached */ this.error = null;
    this.opened = null;
  }

  refuse(what, e) {
    if (this.error) return;
    this.error = `${what}: ${String(e?.message ?? e).split("\n")[0]}`;
    console.warn(`reft-edge: the browser refused to cache the bundle (${this.error}); loading without the cache, `
      + "so a later visit downloads it again");
  }

  async open() {
    if (!this.opened) {
      this.opened = (async () => {
        if (typeof caches === "undefined" || !globalThis.isSecureContext) return null;
        try { return await caches.open(CACHE_NAME); } catch (e) { this.refuse("caches.open", e); return null; }
      })();
    }
    return this.opened;
  }

  /** @param {string} key @returns {Promise<Response|undefined>} */
  async match(key) {
    const cache = await this.open();
    if (!cache) return undefined;
    try { return await cache.match(key); } catch (e) { this.refuse("cache.match", e); return undefined; }
  }

  /** @param {string} key @param {Uint8Array} bytes @param {string|null} type */
  async put(key, bytes, type) {
    const cache = this.error ? null : await this.open();
    if (!cache) return;
    const headers = { "Content-Length": String(bytes.length), ...(type ? { "Content-Type": type } : {}) };
    try { await cache.put(key, new Response(bytes, { headers })); } catch (e) {
      this.refuse("cache.put", e);
      try { await cache.delete(key); } catch { /* nothing stored */ }
    }
  }
}

/** @param {string} url @param {string} file @param {string} key @param {BundleCache} cache @param {(p: Progress) => void} onProgress
 * @returns {Promise<{bytes: Uint8Array, cached: boolean}>} */
async function download(url, file, key, cache, onProgress) {
  const cacheKey = `${url}?base=${key}`;
  let response = await cache.match(cacheKey);
  const cached = !!response;
  if (!response) {
    response = await fetch(url);
    if (!response.ok) throw new BundleError(`${url}: HTTP ${response.status}; serve the whole bundle folder`);
  }
  const total = Number(response.headers.get("content-length") || 0);
  const reader = response.body.getReader();
  const chunks = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.length;
    onProgress({ stage: "download", file, loaded, total: total || loaded, cached });
  }
  let bytes;
  if (chunks.length === 1) bytes = chunks[0];
  else {
    bytes = new Uint8Array(loaded);
    let offset = 0;
    for (const chunk of chunks) { bytes.set(chunk, offset); offset += chunk.length; }
  }
  chunks.length = 0;
  if (!cached) {
    onProgress({ stage: "cache", file, loaded, total: loaded, cached });
    await cache.put(cacheKey, bytes, response.headers.get("content-type"));
  }
  return { bytes, cached };
}

const isCount = (v) => Number.isInteger(v) && v >= 1;
const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
/** The types of the fields this runtime reads, as Python's MANIFEST_TYPES checks them (runtime/bundle.py). */
const MANIFEST_TYPES = [
  ["base_fingerprint", (v) => typeof v === "string" && v.length >= 16, "a string of hex digits"],
  ["hidden_size", isCount, "a positive whole number"],
  ["context_length", isCount, "a positive whole number"],
  ["slot_layers", (v) => Array.isArray(v) && v.every((x) => Number.isInteger(x) && x >= 0), "a list of layer numbers"],
  ["kv", (v) => isObject(v) && ["num_layers", "num_kv_heads", "head_dim"].every((k) => isCount(v[k])),
    "an object {num_layers, num_kv_heads, head_dim, dtype}"],
  ["files", (v) => isObject(v) && Object.values(v).every((x) => typeof x === "string" && /^[^/\\]+$/.test(x)
    && x !== "." && x !== ".."), "an object of role -> file name"],
  ["special_tokens", (v) => isObject(v) && (v.eos_token_ids === undefined
    || (Array.isArray(v.eos_token_ids) && v.eos_token_ids.every(Number.isInteger))),
  "an object of token strings and whole-number ids"],
  ["precision", (v) => typeof v === "string", "a string"],
  ["size_bytes", (v) => Number.isInteger(v) && v >= 0, "a whole number"],
];

/** @param {any} manifest @param {string} url */
export function checkManifest(manifest, url) {
  if (!isObject(manifest)) {
    throw new BundleError(`${url}: not a JSON object; serve the folder written by reft-edge export`);
  }
  if (manifest.schema_version !== SCHEMA_VERSION) {
    throw new BundleError(`${url}: schema_version ${manifest.schema_version}, this runtime reads ${SCHEMA_VERSION}; `
      + "re-export the bundle with this reft-edge");
  }
  for (const key of ["base_fingerprint", "hidden_size", "slot_layers", "graph", "kv", "files", "special_tokens"]) {
    if (!(key in manifest)) throw new BundleError(`${url}: lacks '${key}'; re-export the bundle`);
  }
  for (const [key, check, expected] of MANIFEST_TYPES) {
    if (key in manifest && !check(manifest[key])) {
      const shown = JSON.stringify(manifest[key]);
      throw new BundleError(`${url}: ${key} is ${shown.length <= 80 ? shown : shown.slice(0, 80) + "..."}, expected `
        + `${expected}; the manifest is damaged or hand-edited, re-export the bundle`);
    }
  }
  if (!["fused", "traced"].includes(manifest.graph)) {
    throw new BundleError(`${url}: graph '${manifest.graph}', expected fused or traced; re-export the bundle`);
  }
  if (manifest.kv.dtype !== "float32") {
    throw new BundleError(`${url}: KV dtype ${manifest.kv.dtype}; the web runtime runs fp32, int8 and int4 bundles, `
      + "export one with --precision int4");
  }
}

/**
 * @param {string} baseUrl the bundle folder's URL (ends with /)
 * @param {{onProgress?: (p: Progress) => void}} [options]
 * @returns {Promise<Bundle>}
 */
export async function loadBundle(baseUrl, { onProgress = () => {} } = {}) {
  const root = new URL(baseUrl.endsWith("/") ? baseUrl : baseUrl + "/", globalThis.location?.href);
  const manifestUrl = new URL("manifest.json", root).href;
  const response = await fetch(manifestUrl, { cache: "no-cache" });
  if (!response.ok) throw new BundleError(`${manifestUrl}: HTTP ${response.status}; pass the URL of a bundle folder`);
  let manifest;
  try { manifest = await response.json(); } catch {
    throw new BundleError(`${manifestUrl}: not valid JSON; re-export the bundle`);
  }
  checkManifest(manifest, manifestUrl);
  const key = manifest.base_fingerprint.slice(0, 16) + "-" + manifest.precision + "-" + manifest.size_bytes;
  const cache = new BundleCache();
  const get = (role) => manifest.files[role]
    ? download(new URL(manifest.files[role], root).href, manifest.files[role], key, cache, onProgress) : null;
  const [model, modelData, tokenizer, tokenizerConfig, chatTemplate] = await Promise.all(
    ["model", "model_data", "tokenizer", "tokenizer_config", "chat_template"].map(get));
  const text = (d) => (d ? new TextDecoder().decode(d.bytes) : null);
  const json = (d, role) => {
    try { return d ? JSON.parse(text(d)) : {}; } catch {
      throw new BundleError(`${manifest.files[role]}: not valid JSON; re-export the bundle`);
    }
  };
  const parts = [model, modelData, tokenizer, tokenizerConfig, chatTemplate].filter(Boolean);
  return {
    manifest, url: root.href,
    files: { model: model.bytes, modelData: modelData?.bytes ?? null, tokenizer: json(tokenizer, "tokenizer"),
             tokenizerConfig: json(tokenizerConfig, "tokenizer_config"), chatTemplate: text(chatTemplate) },
    downloadedBytes: parts.filter((p) => !p.cached).reduce((n, p) => n + p.bytes.length, 0),
    cacheError: cache.error,
  };
}
