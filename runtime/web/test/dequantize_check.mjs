#!/usr/bin/env node
/**
 * Run a model through dequantize.js and onnxruntime-web (wasm, Node) for tests/test_web.py: reads
 * the model (and its external data file, if any), rewrites it, runs one input, prints the output and
 * the rewrite's stats as JSON.
 *
 * @example
 *   node runtime/web/test/dequantize_check.mjs model.onnx '{"x": [[...]]}' float32
 */
import { existsSync, readFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const WEB = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const ort = await import(join(WEB, "node_modules", "onnxruntime-web", "dist", "ort.node.min.mjs"));
const { dequantizeModel } = await import(join(WEB, "dequantize.js"));
const { withIrVersion } = await import(join(WEB, "generate.js"));

const [modelPath, inputText, form = "float32"] = process.argv.slice(2);
const dataPath = `${modelPath}.data`;
const data = existsSync(dataPath) ? [{ path: basename(dataPath), data: new Uint8Array(readFileSync(dataPath)) }] : [];
ort.env.wasm.numThreads = 1;
const rewritten = dequantizeModel(new Uint8Array(readFileSync(modelPath)), data, { form });
const session = await ort.InferenceSession.create(withIrVersion(rewritten.model, 10) ?? rewritten.model,
  { executionProviders: ["wasm"], externalData: [...data, ...rewritten.externalData] });
const x = JSON.parse(inputText).x;
const out = await session.run({ x: new ort.Tensor("float32", Float32Array.from(x.flat()), [x.length, x[0].length]) });
const y = out[session.outputNames[0]];
console.log(JSON.stringify({ y: Array.from(y.data), dims: y.dims, stats: rewritten.stats }));
process.exit(0);
