#!/usr/bin/env node
/**
 * The stock anchor of benchmarks/web_speed.py: what a web developer gets without reft-edge, stock
 * onnxruntime-web (wasm, the version runtime/web pins) running onnxruntime-genai's own int4 build of
 * the same model, no patch, in Node: a plain greedy loop with a growing KV cache.
 *
 * @example
 *   node benchmarks/web_stock.mjs MODEL_DIR '{"promptIds": [1, 2, 3], "newTokens": 128, "threads": 2}'
 *   // prints {"decode_tok_s", "ttft_ms", "startup_s", "tokens"}
 */
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const ort = await import(join(ROOT, "runtime", "web", "node_modules", "onnxruntime-web", "dist", "ort.node.min.mjs"));
const { withIrVersion } = await import(join(ROOT, "runtime", "web", "generate.js"));

const [dir, planText] = process.argv.slice(2);
const plan = JSON.parse(planText);
const started = performance.now();
const config = JSON.parse(readFileSync(join(dir, "genai_config.json"), "utf8")).model.decoder;
ort.env.wasm.numThreads = plan.threads ?? 2;
const bytes = new Uint8Array(readFileSync(join(dir, config.filename)));
const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all",
  externalData: [{ path: `${config.filename}.data`, data: new Uint8Array(readFileSync(join(dir, `${config.filename}.data`))) }] };
let session;
try { session = await ort.InferenceSession.create(bytes, options); } catch (e) {
  const ir = /max supported IR version: (\d+)/.exec(String(e?.message));
  if (!ir) throw e;
  session = await ort.InferenceSession.create(withIrVersion(bytes, Number(ir[1])), options);
}
const startupS = (performance.now() - started) / 1000;
const int64 = (ids, dims) => new ort.Tensor("int64", BigInt64Array.from(ids, (x) => BigInt(x)), dims);
const layers = config.num_hidden_layers, heads = config.num_key_value_heads, dim = config.head_size;

async function generate(promptIds, newTokens) {
  let past = {};
  for (let i = 0; i < layers; i++) for (const part of ["key", "value"]) {
    past[`past_key_values.${i}.${part}`] = new ort.Tensor("float32", new Float32Array(0), [1, heads, 0, dim]);
  }
  let ids = promptIds, length = 0;
  const tokens = [];
  let firstS = 0;
  const t0 = performance.now();
  for (let step = 0; step < newTokens; step++) {
    length += ids.length;
    const feeds = { input_ids: int64(ids, [1, ids.length]), attention_mask: int64(Array(length).fill(1), [1, length]), ...past };
    if (session.inputNames.includes("position_ids")) {
      feeds.position_ids = int64(Array.from(ids, (_, i) => length - ids.length + i), [1, ids.length]);
    }
    const out = await session.run(feeds);
    const logits = out.logits.data, vocab = out.logits.dims.at(-1), last = logits.length - vocab;
    let best = 0;
    for (let v = 1; v < vocab; v++) if (logits[last + v] > logits[last + best]) best = v;
    tokens.push(best);
    past = {};
    for (let i = 0; i < layers; i++) for (const part of ["key", "value"]) past[`past_key_values.${i}.${part}`] = out[`present.${i}.${part}`];
    ids = [best];
    if (step === 0) firstS = (performance.now() - t0) / 1000;
  }
  const decodeS = (performance.now() - t0) / 1000 - firstS;
  return { tokens, firstS, decodeS };
}

await generate(plan.promptIds, 8); // warm-up, as benchmarks.worker
const first = await generate(plan.promptIds, 1);
const full = await generate(plan.promptIds, plan.newTokens);
console.log(JSON.stringify({ decode_tok_s: (plan.newTokens - 1) / full.decodeS, ttft_ms: first.firstS * 1000, startup_s: startupS,
  tokens: full.tokens }));
process.exit(0);
