/**
 * The demo page (`reft-edge serve-web` serves it at /, the runtime modules at /web/): loads the
 * bundle served at /bundle/, takes a .reft (dropped, picked or offered by the server at /patches/),
 * and streams the base and the personalised answer side by side.
 * Exposes `window.reftEdge` so tests and other pages can drive it:
 *
 * @example
 *   await window.reftEdge.ready;
 *   const alice = await window.reftEdge.loadPatch("/patches/alice.reft");
 *   const {text, tokenIds} = await window.reftEdge.generate("Hi", {patches: [alice], maxNewTokens: 16});
 */
import { open, withSkills } from "/web/index.js";
import { positionsString } from "/web/positions.js";
import SPEC from "/web/spec.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let current = null;

function showError(error) {
  $("error").textContent = error ? `${error.name}: ${error.message}` : "";
}

let adapter = null; // the WebGPU adapter's vendor and architecture, when there is one

/**
 * WebGPU when the browser has a hardware adapter, else wasm; ?backend=wasm or ?backend=webgpu decides
 * instead. A software adapter (SwiftShader, a fallback adapter) runs on the CPU some 200 times slower
 * than wasm, so it is only used when asked for.
 */
async function chooseBackend() {
  let hardware = false;
  try {
    const found = navigator.gpu ? await navigator.gpu.requestAdapter() : null;
    if (found) {
      adapter = `${found.info?.vendor || "unknown vendor"} ${found.info?.architecture || ""}`.trim();
      hardware = !found.isFallbackAdapter && !found.info?.isFallbackAdapter && !/swiftshader/i.test(adapter);
    }
  } catch { adapter = null; }
  return params.get("backend") ?? (hardware ? "webgpu" : "wasm");
}

const MB = (n) => (n / 1e6).toFixed(1);
let ort = null;
let backend = null;
const ready = (async () => {
  backend = await chooseBackend();
  // the WebGPU build also runs wasm, but is larger: a page without WebGPU loads the wasm build only
  ort = backend === "webgpu" ? await import("onnxruntime-web/webgpu") : await import("onnxruntime-web");
  ort.env.wasm.wasmPaths = "/web/node_modules/onnxruntime-web/dist/";
  const shown = { download: "downloading", cache: "caching" };
  const load = () => open(ort, params.get("bundle") ?? "/bundle/", {
    threads: params.has("threads") ? Number(params.get("threads")) : undefined,
    backend,
    weights: params.get("weights") ?? undefined,
    onProgress: ({ stage, file, loaded, total, cached }) => {
      $("status").textContent = stage === "download" || stage === "cache"
        ? `${cached ? "from the cache" : shown[stage]} ${file}: ${MB(loaded)} / ${MB(total)} MB`
        : stage === "dequantize" ? "unpacking the 4/8-bit weights for the CPU…"
          : `creating the ${backend} session…`;
    },
  });
  let model;
  try {
    model = await load();
  } catch (e) {
    if (backend !== "webgpu" || params.get("backend") === "webgpu") throw e;
    // a GPU that cannot run the graph: the same build runs it on wasm (the bundle comes from the cache)
    console.warn(`reft-edge: WebGPU failed (${e.message}); running on wasm`);
    backend = "wasm";
    model = await load();
  }
  const m = model.manifest;
  const where = backend === "webgpu" ? `WebGPU (${adapter})` : `CPU (wasm, ${ort.env.wasm.numThreads} thread(s)${crossOriginIsolated ? "" : ", not cross-origin isolated"})`;
  $("status").textContent = `ready on ${where}: ${m.source_model} (${m.precision}, ${m.graph} graph), `
    + `${MB(model.downloadedBytes)} MB downloaded${model.cacheError ? " (not cached: the browser refused)" : ""}`
    + (model.unpacked ? `, weights unpacked to ${model.unpacked.form}: ${MB(model.unpacked.unpackedBytes)} MB` : "");
  $("go").disabled = false;
  return model;
})();
ready.catch(showError);

async function usePatch(promise) {
  showError(null);
  try {
    current = await promise;
    $("patch").textContent = `${current.name}: ${current.kind}, layers ${current.layers.join(",")}, rank ${current.rank}, `
      + `${positionsString(current.positions)}, ${(current.sizeBytes / 1024).toFixed(1)} KiB`;
    showSkills(current);
    return current;
  } catch (e) {
    current = null;
    $("patch").textContent = "no patch loaded";
    showSkills(null);
    showError(e);
    throw e;
  }
}

/** A checkbox per skill of the patch (patch format v3), all on: the personalised answer uses the ticked ones. */
function showSkills(patch) {
  const box = $("skills");
  box.replaceChildren();
  for (const [name] of patch?.skills ?? []) {
    const label = document.createElement("label");
    const tick = Object.assign(document.createElement("input"), { type: "checkbox", checked: true, value: name });
    label.append(tick, ` ${name} `);
    box.append(label);
  }
  box.hidden = !patch?.skills?.length;
}

/** The loaded patch with the ticked skills only (all ticked: the patch as trained). */
function chosenPatch() {
  if (!current?.skills?.length) return current;
  const ticks = [...$("skills").querySelectorAll("input")];
  if (ticks.every((t) => t.checked)) return current;
  return withSkills(current, Object.fromEntries(ticks.map((t) => [t.value, t.checked ? 1 : 0])));
}

async function loadPatch(url) {
  const model = await ready;
  return usePatch(model.loadPatch(url));
}

async function generate(prompt, options = {}) {
  const model = await ready;
  try {
    return await model.generate(prompt, options);
  } catch (e) {
    showError(e);
    throw e;
  }
}

async function answer(target, patches) {
  $(target).textContent = "";
  // greedy with the runtimes' default loop guard (no 6-gram of the answer repeats)
  const out = await generate($("prompt").value, { patches, maxNewTokens: Number($("max").value),
    onText: (piece) => { $(target).textContent += piece; } });
  $(`${target}-speed`).textContent = `${out.timings.tokensPerS.toFixed(1)} tokens/s on ${backend === "webgpu" ? "WebGPU" : "wasm"}, `
    + `first token after ${(out.timings.prefillS * 1000).toFixed(0)} ms`;
}

$("go").onclick = async () => {
  showError(null);
  await answer("base", []);
  if (current) {
    try { await answer("personal", [chosenPatch()]); } catch (e) { showError(e); }
  }
};
$("file").onchange = async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const model = await ready;
  usePatch(model.patchFromBytes(new Uint8Array(await file.arrayBuffer()), file.name)).catch(() => {});
};
document.body.ondragover = (event) => event.preventDefault();
document.body.ondrop = async (event) => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (!file) return;
  const model = await ready;
  usePatch(model.patchFromBytes(new Uint8Array(await file.arrayBuffer()), file.name)).catch(() => {});
};
$("offered").onchange = (event) => { if (event.target.value) loadPatch(`/patches/${event.target.value}`).catch(() => {}); };
fetch("/patches/index.json").then((r) => (r.ok ? r.json() : [])).then((names) => {
  for (const name of names) $("offered").add(new Option(name, name));
}).catch(() => {});

window.reftEdge = { ready, loadPatch, generate, withSkills, encode: async (prompt) => (await ready).encode(prompt),
  get threads() { return ort?.env.wasm.numThreads; }, get backend() { return backend; }, get adapter() { return adapter; } };
