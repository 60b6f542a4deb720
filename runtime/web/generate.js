/**
 * Generate with a bundle and patches in onnxruntime-web: one InferenceSession, a prompt pass,
 * then one token per decode step with the KV cache kept between steps (reft_edge/runtime/engine.py
 * and session.py, for one prompt at a time).
 *
 * Fused graphs take one KV buffer per layer [1, kv_heads, prompt + max_new_tokens, head_dim];
 * onnxruntime-web cannot bind one buffer as both past and present, so each step feeds the
 * previous step's present as its past (same shape: GroupQueryAttention copies the cache and
 * writes the new step at the row's length). Traced graphs grow the cache by one step per pass.
 * Slot inputs stay the same for the whole generation (contract v3); when no patch edits
 * generated tokens, decode steps feed rank-0 slots, as the Python runtime does.
 *
 * @example
 *   import * as ort from "onnxruntime-web";
 *   const bundle = await loadBundle("/bundle/");
 *   const model = await Model.create(ort, bundle, {threads: 2});
 *   const alice = await model.loadPatch("/patches/alice.reft");
 *   const out = await model.generate("What should I cook?", {patches: [alice], maxNewTokens: 64, onText: console.log});
 *   out.text; out.tokenIds; out.timings.tokensPerS;
 */
import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";

import { dequantizeModel } from "./dequantize.js";
import { BundleError, UsageError } from "./errors.js";
import { checkCompatible, parsePatch } from "./patch.js";
import { checkSampling, pick, rng } from "./sampling.js";
import { slotInputs } from "./slots.js";
import { TextRow } from "./text.js";

/** @typedef {{text: string, tokenIds: number[], promptTokens: number, finishReason: string,
 *   timings: {prefillS: number, decodeS: number, decodeSteps: number, tokensPerS: number, totalS: number}}} Generation */

export class Model {
  /** @param {any} ort the onnxruntime-web module @param {any} session @param {import("./bundle.js").Bundle} bundle */
  constructor(ort, session, bundle) {
    this.ort = ort;
    this.session = session;
    this.bundle = bundle;
    this.manifest = bundle.manifest;
    this.tokenizer = new Tokenizer(bundle.files.tokenizer, bundle.files.tokenizerConfig);
    this.template = bundle.files.chatTemplate ? new Template(bundle.files.chatTemplate) : null;
    const special = this.manifest.special_tokens;
    this.eosIds = new Set((special.eos_token_ids || []).map(Number));
    this.padId = Number(special.pad_token_id || 0);
    this.variables = Object.fromEntries(Object.entries(special).filter(([k, v]) => k.endsWith("_token") && typeof v === "string"));
  }

  /**
   * @param {any} ort @param {import("./bundle.js").Bundle} bundle
   * @param {{threads?: number, backend?: "wasm"|"webgpu", weights?: "float32"|"int8"|"shipped",
   *   onProgress?: (p: import("./bundle.js").Progress) => void}} [options] threads: wasm threads (need a
   *   cross-origin-isolated page); backend: the execution provider (webgpu needs ort from onnxruntime-web/webgpu);
   *   weights: how MatMulNBits runs: float32 (default on wasm: unpacked once here, dequantize.js), int8 (per-column
   *   int8 with dynamically quantized activations) or shipped (the bundle's 4/8-bit nodes; default on webgpu).
   *   The session takes the bundle's graph and data buffers (bundle.files.model and modelData become null).
   */
  static async create(ort, bundle, { threads, backend = "wasm", weights: form, onProgress = () => {} } = {}) {
    if (!["wasm", "webgpu"].includes(backend)) throw new UsageError(`backend ${backend}: use wasm or webgpu`);
    if (!bundle.files.model) {
      throw new UsageError("this bundle's graph went to a session already (create drops it to save memory); "
        + "load the bundle again with loadBundle for another session");
    }
    const isolated = globalThis.crossOriginIsolated === true;
    ort.env.wasm.numThreads = isolated ? (threads ?? Math.min(4, globalThis.navigator?.hardwareConcurrency || 1)) : 1;
    const options = { executionProviders: backend === "webgpu" ? ["webgpu", "wasm"] : ["wasm"], graphOptimizationLevel: "all" };
    if (backend === "webgpu") {
      // the KV cache stays on the GPU between steps: each step's present is the next step's past
      const kv = bundle.manifest.kv;
      options.preferredOutputLocation = Object.fromEntries(Array.from({ length: kv.num_layers }, (_, i) =>
        ["key", "value"].map((part) => [`present.${i}.${part}`, "gpu-buffer"])).flat());
    }
    const data = bundle.files.modelData ? [{ path: bundle.manifest.files.model_data, data: bundle.files.modelData }] : [];
    let model = bundle.files.model;
    let weights = null;
    // wasm: its 4-bit kernel is slow, its float MatMul fast, so float32 weights once, here (dequantize.js);
    // WebGPU runs the 4-bit weights as they are
    form ??= backend === "wasm" ? "float32" : "shipped";
    if (!["float32", "int8", "shipped"].includes(form)) throw new UsageError(`weights ${form}: use float32, int8 or shipped`);
    if (form !== "shipped") {
      onProgress({ stage: "dequantize" });
      const rewritten = dequantizeModel(model, data, { form });
      model = rewritten.model;
      data.push(...rewritten.externalData);
      weights = rewritten.stats.weights ? rewritten.stats : null; // null: nothing to unpack (an fp32 bundle)
    }
    if (data.length) options.externalData = data;
    onProgress({ stage: "session" });
    let session;
    for (let attempt = 0; !session; attempt++) {
      try {
        session = await ort.InferenceSession.create(model, options);
      } catch (e) {
        const reason = String(e?.message ?? e).split("\n")[0];
        // onnx >= 1.20 stamps IR version 14; onnxruntime-web 1.30 reads 13 and the graph uses nothing newer
        const ir = /Unsupported model IR version: (\d+), max supported IR version: (\d+)/.exec(reason);
        if (ir && attempt === 0) {
          model = withIrVersion(model, Number(ir[2]));
          if (model) continue;
        }
        throw new BundleError(`${bundle.manifest.files.model}: onnxruntime-web cannot load it (${reason}); re-export the bundle`);
      }
    }
    // the session holds the weights now: drop the downloaded graph and data (the bundle's largest buffers)
    bundle.files.model = null;
    bundle.files.modelData = null;
    const created = new Model(ort, session, bundle);
    created.unpacked = weights; // what dequantize.js did (null: the shipped nodes run)
    created.backend = backend;
    return created;
  }

  /** The text the model sees before its answer: one user message through the chat template. @param {string} prompt */
  promptText(prompt) {
    if (typeof prompt !== "string" || !prompt.trim()) throw new UsageError("the prompt is empty; give some text to answer");
    const messages = [{ role: "user", content: prompt }];
    return this.template ? this.template.render({ ...this.variables, messages, add_generation_prompt: true }) : prompt;
  }

  /** Prompt token ids, tokenized as training tokenizes (no special tokens added). @param {string} prompt */
  encode(prompt) {
    return this.tokenizer.encode(this.promptText(prompt), { add_special_tokens: false }).ids.map(Number);
  }

  /** Fetch, validate and check a .reft against this bundle. @param {string} url @param {string} [source] */
  async loadPatch(url, source) {
    const response = await fetch(url);
    if (!response.ok) throw new UsageError(`${url}: HTTP ${response.status}; pass the URL of a .reft file`);
    return this.patchFromBytes(new Uint8Array(await response.arrayBuffer()), source ?? url.split("/").pop());
  }

  /** @param {Uint8Array} bytes @param {string} source */
  async patchFromBytes(bytes, source) {
    const patch = await parsePatch(bytes, source);
    checkCompatible(patch, this.manifest, source);
    return patch;
  }

  tensor(spec) {
    return new this.ort.Tensor(spec.type, spec.data, spec.dims);
  }

  /** @param {number[]} ids */
  int64(ids, dims) {
    return new this.ort.Tensor("int64", BigInt64Array.from(ids, (x) => BigInt(x)), dims);
  }

  /**
   * Answer one prompt.
   * @param {string} prompt
   * @param {{patches?: any[], weights?: number[], maxNewTokens?: number, temperature?: number, topK?: number|null,
   *   topP?: number|null, repetitionPenalty?: number|null, noRepeatNgram?: number|null, seed?: number|null, stop?: string[], ignoreEos?: boolean,
   *   onText?: (piece: string) => void}} [options]
   * @returns {Promise<Generation>}
   */
  async generate(prompt, options = {}) {
    const { patches = [], weights, maxNewTokens = 128, stop = [], ignoreEos = false, onText = () => {} } = options;
    if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) {
      throw new UsageError(`max_new_tokens ${maxNewTokens} must be a whole number of at least 1`);
    }
    const sampling = checkSampling(options);
    const started = performance.now();
    const promptIds = this.encode(prompt);
    const limit = this.manifest.context_length;
    if (promptIds.length + maxNewTokens > limit) {
      throw new UsageError(`the prompt's ${promptIds.length} tokens plus max_new_tokens ${maxNewTokens} pass the bundle's `
        + `context length ${limit}; use max_new_tokens ${Math.max(0, limit - promptIds.length)} or fewer`);
    }
    const slots = slotInputs(patches, weights, this.manifest);
    const run = new Run(this, promptIds, slots, maxNewTokens);
    const row = new TextRow(this.tokenizer, stop);
    const seen = new Set(promptIds);
    const random = rng(sampling.seed);
    const advance = (token, last) => {
      let piece = "";
      if (this.eosIds.has(token) && !ignoreEos) piece = row.finish("eos");
      else {
        piece = row.push(token);
        if (last && !row.finished) piece += row.finish("length");
      }
      seen.add(token);
      if (piece) onText(piece);
    };
    let token = pick(await run.prefill(), sampling, seen, random);
    advance(token, maxNewTokens === 1);
    const prefillS = (performance.now() - started) / 1000;
    let steps = 0;
    const decodeStart = performance.now();
    while (!row.finished) {
      steps += 1;
      token = pick(await run.decode(token), sampling, seen, random, row.tokenIds);
      advance(token, steps + 1 === maxNewTokens);
    }
    const decodeS = (performance.now() - decodeStart) / 1000;
    run.release();
    return {
      text: row.text, tokenIds: row.tokenIds, promptTokens: promptIds.length, finishReason: row.finishReason,
      timings: { prefillS, decodeS, decodeSteps: steps, tokensPerS: decodeS ? steps / decodeS : 0,
                 totalS: (performance.now() - started) / 1000 },
    };
  }
}

/**
 * A copy of an ONNX model with ModelProto.ir_version (field 1) set to `version`, or null when the
 * field is not a one-byte varint (then nothing is rewritten). Only the top-level fields are walked.
 * @param {Uint8Array} bytes @param {number} version @returns {Uint8Array|null}
 */
export function withIrVersion(bytes, version) {
  const varint = (at) => {
    let value = 0, scale = 1, i = at;
    for (;;) {
      const b = bytes[i++];
      value += (b & 0x7f) * scale;
      scale *= 128;
      if (b < 0x80) return [value, i];
    }
  };
  let at = 0;
  while (at < bytes.length) {
    const [tag, next] = varint(at);
    const field = Math.floor(tag / 8), wire = tag % 8;
    if (field === 1 && wire === 0) {
      if (next + 1 > bytes.length || bytes[next] >= 0x80 || version >= 0x80) return null;
      const copy = bytes.slice();
      copy[next] = version;
      return copy;
    }
    if (wire === 0) at = varint(next)[1];
    else if (wire === 1) at = next + 8;
    else if (wire === 5) at = next + 4;
    else if (wire === 2) { const [length, start] = varint(next); at = start + length; }
    else return null;
  }
  return null;
}

/** One generation's state: the slot feeds and the KV cache between steps. */
class Run {
  constructor(model, promptIds, slots, maxNewTokens) {
    this.model = model;
    const { manifest } = model;
    this.promptIds = promptIds;
    this.fused = manifest.graph === "fused";
    this.slots = Object.fromEntries(Object.entries(slots.feeds).map(([k, v]) => [k, model.tensor(v)]));
    this.decodeSlots = slots.editsGenerated ? this.slots
      : Object.fromEntries(Object.entries(slots.empty).map(([k, v]) => [k, model.tensor(v)]));
    this.length = promptIds.length;
    const { num_layers: layers, num_kv_heads: heads, head_dim: dim } = manifest.kv;
    const rows = this.fused ? promptIds.length + maxNewTokens : 0;
    this.past = {};
    for (let i = 0; i < layers; i++) {
      for (const part of ["key", "value"]) {
        this.past[`past_key_values.${i}.${part}`] = new model.ort.Tensor("float32", new Float32Array(heads * rows * dim), [1, heads, rows, dim]);
      }
    }
  }

  /** @returns {Promise<Float32Array>} logits of the last prompt token */
  prefill() {
    const n = this.promptIds.length;
    const feeds = { input_ids: this.model.int64(this.promptIds, [1, n]) };
    if (!this.fused) feeds.position_ids = this.model.int64([...Array(n).keys()], [1, n]);
    return this.step(feeds, this.slots);
  }

  /** @param {number} token the previous step's token @returns {Promise<Float32Array>} */
  decode(token) {
    const feeds = { input_ids: this.model.int64([token], [1, 1]) };
    if (!this.fused) feeds.position_ids = this.model.int64([this.length], [1, 1]);
    this.length += 1;
    return this.step(feeds, this.decodeSlots);
  }

  async step(feeds, slots) {
    const width = this.length;
    const attention = this.model.int64(Array(width).fill(1), [1, width]);
    const outputs = await this.model.session.run({ ...feeds, ...slots, ...this.past, attention_mask: attention });
    for (const name of Object.keys(this.past)) {
      const present = outputs[name.replace("past_key_values.", "present.")];
      if (this.owned?.has(name)) this.past[name].dispose();
      this.past[name] = present;
    }
    this.owned = new Set(Object.keys(this.past));
    const logits = outputs.logits;
    const vocab = logits.dims[logits.dims.length - 1];
    const values = Float32Array.from(/** @type {Float32Array} */ (logits.data).subarray(logits.data.length - vocab));
    logits.dispose();
    return values;
  }

  release() {
    if (this.owned) for (const name of this.owned) this.past[name].dispose();
    this.owned = null;
  }
}
