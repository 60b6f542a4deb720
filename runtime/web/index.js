/**
 * reft-edge's web runtime: a frozen base bundle plus .reft patches, generated with onnxruntime-web.
 *
 * @example
 *   import * as ort from "onnxruntime-web";
 *   import { open } from "./index.js";
 *   const model = await open(ort, "/bundle/", {threads: 2, onProgress: console.log});
 *   const alice = await model.loadPatch("/patches/alice.reft");
 *   const {text} = await model.generate("Hi!", {patches: [alice], maxNewTokens: 32});
 */
import { loadBundle } from "./bundle.js";
import { Model } from "./generate.js";

export * from "./errors.js";
export { loadBundle } from "./bundle.js";
export { Model } from "./generate.js";
export { dequantizeModel } from "./dequantize.js";
export { parsePatch, checkCompatible, affineEdits, withSkills } from "./patch.js";
export { slotInputs } from "./slots.js";

/**
 * Download (or take from the cache) a bundle and open it.
 * @param {any} ort onnxruntime-web @param {string} bundleUrl
 * @param {{threads?: number, backend?: "wasm"|"webgpu", weights?: "float32"|"int8"|"shipped", onProgress?: (p: import("./bundle.js").Progress) => void}} [options]
 *   as Model.create
 */
export async function open(ort, bundleUrl, { threads, backend, weights, onProgress } = {}) {
  const bundle = await loadBundle(bundleUrl, { onProgress });
  const model = await Model.create(ort, bundle, { threads, backend, weights, onProgress });
  model.downloadedBytes = bundle.downloadedBytes;
  model.cacheError = bundle.cacheError;
  return model;
}
