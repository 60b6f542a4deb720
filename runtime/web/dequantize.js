/**
 * The bundle's quantized weights as float32, once, when the page loads: a rewrite of the ONNX
 * graph (a plain protobuf walk, no ONNX library) that replaces every MatMulNBits (4- or 8-bit,
 * the GGUF blocks export/gguf_blocks.py stores) by a MatMul on a float32 weight computed here.
 *
 * Why: onnxruntime-web's wasm build has no fast 4-bit kernel (it dequantizes every block on every
 * step, ~4 tokens/s on the default model), while its float MatMul kernels are fast. The download
 * stays the small int4/int8 bundle; wasm memory grows by 4 bytes per weight (docs/web.md).
 *
 * A Q4_1 weight (MatMulNBits + "block sums @ minimums" MatMul + Add) becomes one MatMul on
 * w = d*q + m, the float the GGUF (and so the fp32 bundle) holds; Q4_0 and Q8_0 weights are
 * (q - zero point) * d, exact in float32. GatherBlockQuantized (the embedding, one row a step)
 * stays as it is. Nodes of any other form are left untouched.
 *
 * @example
 *   const { model, externalData, stats } = dequantizeModel(bundle.files.model,
 *     [{ path: "model.onnx.data", data: bundle.files.modelData }]);
 *   await ort.InferenceSession.create(model, { externalData: [...originalData, ...externalData] });
 *   stats.weights; stats.unpackedBytes;
 */

export const FLOAT_FILE = "reft-edge-float-weights.bin";

// -- protobuf, the little this needs --------------------------------------------------------

/** @param {Uint8Array} b @param {number} at @returns {[number, number]} value (exact below 2^53), next offset */
function varint(b, at) {
  let value = 0, scale = 1;
  for (;;) {
    const byte = b[at++];
    value += (byte & 0x7f) * scale;
    scale *= 128;
    if (byte < 0x80) return [value, at];
  }
}

/**
 * Top-level fields of one message: {field, wire, value (number, or Uint8Array for wire 2), raw (the whole field's bytes)}.
 * @param {Uint8Array} b
 */
function fields(b) {
  const out = [];
  let at = 0;
  while (at < b.length) {
    const start = at;
    const [tag, next] = varint(b, at);
    const field = Math.floor(tag / 8), wire = tag % 8;
    let value;
    if (wire === 0) [value, at] = varint(b, next);
    else if (wire === 1) { value = b.subarray(next, next + 8); at = next + 8; }
    else if (wire === 5) { value = b.subarray(next, next + 4); at = next + 4; }
    else if (wire === 2) {
      const [length, begin] = varint(b, next);
      value = b.subarray(begin, begin + length);
      at = begin + length;
    } else throw new Error(`protobuf wire type ${wire} at byte ${start}`);
    if (at > b.length) throw new Error("protobuf message cut short");
    out.push({ field, wire, value, raw: b.subarray(start, at) });
  }
  return out;
}

const utf8 = new TextDecoder();
const encoder = new TextEncoder();
const str = (v) => utf8.decode(v);

/** @param {number} n @returns {number[]} */
function encodeVarint(n) {
  const bytes = [];
  while (n >= 128) { bytes.push((n % 128) | 0x80); n = Math.floor(n / 128); }
  bytes.push(n);
  return bytes;
}

/** Accumulates one message's bytes. */
class Writer {
  constructor() { /** @type {Uint8Array[]} */ this.parts = []; this.length = 0; }
  push(bytes) { this.parts.push(bytes); this.length += bytes.length; return this; }
  varintField(field, n) { return this.push(Uint8Array.from([...encodeVarint(field * 8), ...encodeVarint(n)])); }
  bytesField(field, bytes) {
    this.push(Uint8Array.from([...encodeVarint(field * 8 + 2), ...encodeVarint(bytes.length)]));
    return this.push(bytes);
  }
  stringField(field, s) { return this.bytesField(field, encoder.encode(s)); }
  finish() {
    const out = new Uint8Array(this.length);
    let at = 0;
    for (const p of this.parts) { out.set(p, at); at += p.length; }
    return out;
  }
}

// -- ONNX messages ----------------------------------------------------------------------------

// ModelProto.graph 7; GraphProto.node 1, initializer 5, output 12; NodeProto input 1, output 2, name 3,
// op_type 4, attribute 5, domain 7; AttributeProto name 1, f 2, i 3, g 6, graphs 11;
// TensorProto dims 1, data_type 2, float_data 4, name 8, raw_data 9, external_data 13, data_location 14.
const FLOAT = 1, UINT8 = 2, INT8 = 3, FLOAT16 = 10;

function parseNode(bytes) {
  const node = { input: [], output: [], name: "", opType: "", domain: "", attributes: [], bytes };
  for (const f of fields(bytes)) {
    if (f.field === 1) node.input.push(str(f.value));
    else if (f.field === 2) node.output.push(str(f.value));
    else if (f.field === 3) node.name = str(f.value);
    else if (f.field === 4) node.opType = str(f.value);
    else if (f.field === 7) node.domain = str(f.value);
    else if (f.field === 5) node.attributes.push(parseAttribute(f.value));
  }
  return node;
}

function parseAttribute(bytes) {
  const a = { name: "", i: 0, graphs: [], bytes };
  for (const f of fields(bytes)) {
    if (f.field === 1) a.name = str(f.value);
    else if (f.field === 3) a.i = f.value;
    else if (f.field === 6 || f.field === 11) a.graphs.push(f.value);
  }
  return a;
}

function parseTensor(bytes) {
  const t = { dims: [], dataType: 0, name: "", raw: null, floats: null, external: null, bytes };
  const entries = {};
  for (const f of fields(bytes)) {
    if (f.field === 1) {
      if (f.wire === 0) t.dims.push(f.value);
      else for (let at = 0; at < f.value.length;) { const [d, next] = varint(f.value, at); t.dims.push(d); at = next; }
    } else if (f.field === 2) t.dataType = f.value;
    else if (f.field === 4) t.floats = f.value; // packed float32
    else if (f.field === 8) t.name = str(f.value);
    else if (f.field === 9) t.raw = f.value;
    else if (f.field === 13) {
      let key = "", value = "";
      for (const e of fields(f.value)) { if (e.field === 1) key = str(e.value); else if (e.field === 2) value = str(e.value); }
      entries[key] = value;
    }
  }
  if (entries.location) {
    t.external = { path: entries.location, offset: Number(entries.offset ?? 0), length: entries.length === undefined ? null : Number(entries.length) };
  }
  return t;
}

/** A node re-encoded with its own fields kept and its subgraphs rewritten. */
function encodeNode(node, rewriteGraph) {
  const w = new Writer();
  for (const f of fields(node.bytes)) {
    if (f.field !== 5) { w.push(f.raw); continue; }
    const attribute = parseAttribute(f.value);
    if (!attribute.graphs.length) { w.push(f.raw); continue; }
    const a = new Writer();
    for (const g of fields(f.value)) {
      if (g.field === 6 || g.field === 11) a.bytesField(g.field, rewriteGraph(g.value));
      else a.push(g.raw);
    }
    w.bytesField(5, a.finish());
  }
  return w.finish();
}

function encodeNodeOf(opType, domain, name, inputs, output) {
  const w = new Writer();
  for (const i of inputs) w.stringField(1, i);
  w.stringField(2, output).stringField(3, name).stringField(4, opType);
  if (domain) w.stringField(7, domain);
  return w.finish();
}

function encodeExternalTensor(name, dims, offset, length, dataType) {
  const w = new Writer();
  for (const d of dims) w.varintField(1, d);
  w.varintField(2, dataType).stringField(8, name);
  for (const [key, value] of [["location", FLOAT_FILE], ["offset", String(offset)], ["length", String(length)]]) {
    w.bytesField(13, new Writer().stringField(1, key).stringField(2, value).finish());
  }
  return w.varintField(14, 1).finish();
}

// -- the rewrite ------------------------------------------------------------------------------

const attr = (node, name, fallback) => node.attributes.find((a) => a.name === name)?.i ?? fallback;

/**
 * @param {Uint8Array} modelBytes model.onnx
 * @param {{path: string, data: Uint8Array}[]} externalData the bundle's external data files
 * @param {{form?: "float32"|"int8"}} [options] float32: MatMul on the exact float weights; int8: the floats
 *   requantized per column (symmetric int8) for DynamicQuantizeMatMul (activations quantized per tensor at run
 *   time): a quarter of the memory, faster in wasm, not the same arithmetic as any Python path
 * @returns {{model: Uint8Array, externalData: {path: string, data: Uint8Array}[],
 *   stats: {form: string, weights: number, unpackedBytes: number, quantizedBytes: number, seconds: number}}}
 *   model unchanged (and externalData empty) when nothing could be rewritten
 */
export function dequantizeModel(modelBytes, externalData = [], { form = "float32" } = {}) {
  if (!["float32", "int8"].includes(form)) throw new Error(`weight form ${form}: float32 or int8`);
  const int8 = form === "int8";
  const started = globalThis.performance?.now() ?? Date.now();
  const files = new Map(externalData.map((e) => [e.path, e.data]));
  const top = fields(modelBytes);
  const graphField = top.find((f) => f.field === 7);
  if (!graphField) return { model: modelBytes, externalData: [], stats: emptyStats(0) };
  const mainFields = fields(graphField.value);
  const initializers = new Map();
  for (const f of mainFields) if (f.field === 5) { const t = parseTensor(f.value); initializers.set(t.name, t); }

  /** @param {string} name @returns {Uint8Array|null} the tensor's bytes */
  const data = (name) => {
    const t = initializers.get(name);
    if (!t) return null;
    if (t.raw) return t.raw;
    if (t.floats) return t.floats;
    if (t.external) {
      const file = files.get(t.external.path);
      if (!file) return null;
      const length = t.external.length ?? (t.dims.reduce((a, b) => a * b, 1) * (t.dataType === FLOAT ? 4 : t.dataType === FLOAT16 ? 2 : 1));
      return file.subarray(t.external.offset, t.external.offset + length);
    }
    return null;
  };
  const floats = (name) => {
    const t = initializers.get(name), bytes = data(name);
    if (!t || !bytes || t.dataType !== FLOAT) return null;
    return new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
  };

  // pass 1: every graph's nodes, and what consumes each value (Q4_1's Add and its "minimums" MatMul)
  const graphs = [];
  const collect = (graphBytes) => {
    const nodes = fields(graphBytes).filter((f) => f.field === 1).map((f) => parseNode(f.value));
    graphs.push(nodes);
    for (const n of nodes) for (const a of n.attributes) for (const g of a.graphs) collect(g);
  };
  collect(graphField.value);
  const producer = new Map(), consumers = new Map();
  for (const nodes of graphs) {
    for (const n of nodes) {
      for (const o of n.output) producer.set(o, n);
      for (const i of n.input) { if (!consumers.has(i)) consumers.set(i, []); consumers.get(i).push(n); }
    }
  }
  const graphOutputs = new Set();
  const outputsOf = (graphBytes) => {
    for (const f of fields(graphBytes)) {
      if (f.field === 12) for (const o of fields(f.value)) if (o.field === 1) graphOutputs.add(str(o.value));
      if (f.field === 1) for (const a of parseNode(f.value).attributes) for (const g of a.graphs) outputsOf(g);
    }
  };
  outputsOf(graphField.value);

  // pass 2: plan each MatMulNBits weight (once, however many decoders read it)
  /** @type {Map<string, {name: string, K: number, N: number, make: (out: Float32Array) => void}>} */
  const weights = new Map();
  const replaced = new Map(); // MatMulNBits node -> {weight, output, drop: nodes made dead}
  let quantizedBytes = 0;
  for (const nodes of graphs) {
    for (const node of nodes) {
      if (node.opType !== "MatMulNBits" || node.domain !== "com.microsoft") continue;
      const plan = planMatMulNBits(node, data, floats, initializers, producer, consumers, graphOutputs);
      if (!plan) continue;
      if (!weights.has(plan.key)) {
        weights.set(plan.key, { name: `${plan.key}/float32`, K: plan.K, N: plan.N, make: plan.make });
        quantizedBytes += plan.quantizedBytes;
      }
      replaced.set(node, { weight: `${plan.key}/float32`, output: plan.output, drop: plan.drop, blockSums: plan.blockSums });
    }
  }
  if (!weights.size) return { model: modelBytes, externalData: [], stats: emptyStats(started) };

  // the new weights, one buffer: float32 [K, N] each, or (int8) int8 [K, N] then float32 scales [N]
  let total = 0;
  const offsets = new Map();
  for (const [key, w] of weights) {
    offsets.set(key, total);
    total += int8 ? Math.ceil((w.K * w.N + w.N * 4) / 4) * 4 : w.K * w.N * 4;
  }
  const buffer = new ArrayBuffer(total);
  for (const [key, w] of weights) {
    const at = offsets.get(key);
    if (!int8) { w.make(new Float32Array(buffer, at, w.K * w.N)); continue; }
    const floats = new Float32Array(w.K * w.N);
    w.make(floats);
    quantizeColumns(floats, w.K, w.N, new Int8Array(buffer, at, w.K * w.N), new Float32Array(buffer, at + Math.ceil(w.K * w.N / 4) * 4, w.N));
  }

  const dropped = new Set();
  for (const r of replaced.values()) for (const n of r.drop) dropped.add(n);
  // x's block sums go when every reader went (q, k and v read the same sums)
  for (const r of replaced.values()) {
    if (r.blockSums && (consumers.get(r.blockSums.output[0]) ?? []).every((n) => dropped.has(n))) dropped.add(r.blockSums);
  }
  // initializers no kept node reads any more are left out (their bytes stay in the external file, unread)
  const used = new Set();
  for (const nodes of graphs) {
    for (const n of nodes) {
      if (dropped.has(n)) continue;
      if (replaced.has(n)) used.add(n.input[0]);
      else for (const i of n.input) used.add(i);
    }
  }

  const quantizedInputs = new Set();
  for (const n of replaced.keys()) for (const i of n.input.slice(1)) quantizedInputs.add(i);
  for (const n of dropped) for (const i of n.input) quantizedInputs.add(i);
  const isQuantizedInput = (name) => quantizedInputs.has(name);
  const byOutput = new Map();
  for (const nodes of graphs) for (const n of nodes) byOutput.set(n.output[0], n);
  const rewriteGraph = (graphBytes, main) => {
    const w = new Writer();
    for (const f of fields(graphBytes)) {
      if (f.field === 1) {
        const node = parseNode(f.value);
        const original = byOutput.get(node.output[0]); // nodes are matched by their first output (unique in a valid graph)
        if (dropped.has(original)) continue;
        const r = replaced.get(original);
        if (r && int8) {
          w.bytesField(1, encodeNodeOf("DynamicQuantizeMatMul", "com.microsoft", node.name || `${node.output[0]}/DQMatMul`,
            [node.input[0], r.weight, `${r.weight}/scales`], r.output));
        } else if (r) w.bytesField(1, encodeNodeOf("MatMul", "", node.name || `${node.output[0]}/MatMul`, [node.input[0], r.weight], r.output));
        else w.bytesField(1, node.attributes.some((a) => a.graphs.length) ? encodeNode(node, (g) => rewriteGraph(g, false)) : f.value);
      } else if (f.field === 5 && main) {
        if (used.has(parseTensorName(f.value)) || !isQuantizedInput(parseTensorName(f.value))) w.push(f.raw);
      } else w.push(f.raw);
    }
    if (main) {
      for (const [key, weight] of weights) {
        const at = offsets.get(key), size = weight.K * weight.N;
        if (int8) {
          w.bytesField(5, encodeExternalTensor(weight.name, [weight.K, weight.N], at, size, INT8));
          w.bytesField(5, encodeExternalTensor(`${weight.name}/scales`, [weight.N], at + Math.ceil(size / 4) * 4, weight.N * 4, FLOAT));
        } else w.bytesField(5, encodeExternalTensor(weight.name, [weight.K, weight.N], at, size * 4, FLOAT));
      }
    }
    return w.finish();
  };

  const graphBytes = rewriteGraph(graphField.value, true);
  const model = new Writer();
  for (const f of top) {
    if (f.field === 7) model.bytesField(7, graphBytes);
    else model.push(f.raw);
  }
  const seconds = ((globalThis.performance?.now() ?? Date.now()) - started) / 1000;
  return {
    model: model.finish(),
    externalData: [{ path: FLOAT_FILE, data: new Uint8Array(buffer) }],
    stats: { form, weights: weights.size, unpackedBytes: total, quantizedBytes, seconds },
  };
}

/** Symmetric int8 per column: scale = max |w| / 127, q = round(w / scale). */
function quantizeColumns(w, K, N, q, scales) {
  const max = new Float32Array(N);
  for (let k = 0; k < K; k++) for (let n = 0, row = k * N; n < N; n++) { const a = Math.abs(w[row + n]); if (a > max[n]) max[n] = a; }
  for (let n = 0; n < N; n++) scales[n] = max[n] > 0 ? max[n] / 127 : 1;
  const inverse = Float32Array.from(scales, (s) => 1 / s);
  for (let k = 0; k < K; k++) for (let n = 0, row = k * N; n < N; n++) q[row + n] = Math.round(w[row + n] * inverse[n]);
}

function emptyStats(started) {
  return { form: "float32", weights: 0, unpackedBytes: 0, quantizedBytes: 0, seconds: started ? ((globalThis.performance?.now() ?? Date.now()) - started) / 1000 : 0 };
}

function parseTensorName(bytes) {
  for (const f of fields(bytes)) if (f.field === 8) return str(f.value);
  return "";
}

/**
 * How one MatMulNBits node becomes a MatMul, or null when its form is not one this handles
 * (then it runs as it is): bits 4 or 8, float scales, uint8 or no zero points, no g_idx or bias.
 */
function planMatMulNBits(node, data, floats, initializers, producer, consumers, graphOutputs) {
  const K = attr(node, "K", 0), N = attr(node, "N", 0), bits = attr(node, "bits", 4), blockSize = attr(node, "block_size", 0);
  const [, bName, sName, zName, gName, biasName] = node.input;
  if (!K || !N || !blockSize || ![4, 8].includes(bits) || gName || biasName) return null;
  const packed = data(bName), scales = floats(sName);
  const blocks = Math.ceil(K / blockSize), blob = blockSize * bits / 8;
  if (!packed || !scales || packed.length !== N * blocks * blob || scales.length !== N * blocks) return null;
  let zeros = null;
  if (zName) {
    const t = initializers.get(zName);
    zeros = data(zName);
    if (!t || t.dataType !== UINT8 || !zeros) return null;
  }
  const zeroBytesPerColumn = Math.ceil(blocks * bits / 8);
  const zero = (n, b) => {
    if (!zeros) return 1 << (bits - 1);
    if (bits === 8) return zeros[n * zeroBytesPerColumn + b];
    const byte = zeros[n * zeroBytesPerColumn + (b >> 1)];
    return b & 1 ? byte >> 4 : byte & 15;
  };
  // Q4_1 (export/gguf_blocks.py): y = MatMulNBits(x) + (block sums of x) @ minimums, minimums = m + zero*d
  let minimums = null, blockSums = null, output = node.output[0];
  const drop = [];
  const adds = consumers.get(node.output[0]) ?? [];
  if (adds.length === 1 && adds[0].opType === "Add" && adds[0].domain === "" && !graphOutputs.has(node.output[0])) {
    const add = adds[0];
    const other = producer.get(add.input[0] === node.output[0] ? add.input[1] : add.input[0]);
    const mins = other && other.opType === "MatMul" && other.domain === "" ? floats(other.input[1]) : null;
    const sums = other && producer.get(other.input[0]);
    const sumsOnes = sums && sums.opType === "MatMul" && sums.input[0] === node.input[0] ? floats(sums.input[1]) : null;
    if (mins && mins.length === blocks * N && blockSize === 32 && sumsOnes && sumsOnes.length === K * blocks
        && (consumers.get(other.output[0]) ?? []).length === 1 && !graphOutputs.has(other.output[0])) {
      minimums = mins;
      output = add.output[0];
      drop.push(add, other);
      // the block sums of x go when nothing else reads them
      if (!graphOutputs.has(sums.output[0])) blockSums = sums;
    }
  }
  const make = (out) => {
    // out[k * N + n] = the weight at (k, n); MatMulNBits stores column n's blocks along k
    for (let n = 0; n < N; n++) {
      for (let b = 0; b < blocks; b++) {
        const d = scales[n * blocks + b], z = zero(n, b);
        const base = (n * blocks + b) * blob;
        // Q4_1: the GGUF's w = d*q + m, with m = minimum - z*d (exact: the minimum was m + z*d of float16 values)
        const m = minimums ? Math.fround(minimums[b * N + n] - Math.fround(z * d)) : 0;
        const kEnd = Math.min(blockSize, K - b * blockSize);
        for (let j = 0; j < kEnd; j++) {
          const q = bits === 8 ? packed[base + j] : (j & 1 ? packed[base + (j >> 1)] >> 4 : packed[base + (j >> 1)] & 15);
          out[(b * blockSize + j) * N + n] = minimums ? q * d + m : (q - z) * d;
        }
      }
    }
  };
  const key = minimums ? `${bName}+minimums` : bName;
  return { key, K, N, make, output, drop, blockSums, quantizedBytes: packed.length + scales.length * 4 + (minimums ? minimums.length * 4 : 0) };
}

