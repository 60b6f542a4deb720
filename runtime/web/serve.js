#!/usr/bin/env node
/**
 * A small static server for the web demo, with the cross-origin-isolation headers onnxruntime-web
 * needs for threads (COOP same-origin, COEP require-corp). Localhost only unless --host is given.
 *
 *   /                 the demo page: examples/browser/ (index.html, app.js)
 *   /web/...          this folder (the runtime modules and node_modules)
 *   /bundle/...       the bundle folder
 *   /patches/         index.json (the offered patch names), then each --patch file by its name
 *
 * @example
 *   node runtime/web/serve.js out/bundle --patch alice.reft --port 8000
 *   # then open http://127.0.0.1:8000/
 */
import { createReadStream, statSync } from "node:fs";
import { createServer } from "node:http";
import { basename, dirname, extname, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const PAGE = resolve(HERE, "..", "..", "examples", "browser");
const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
  ".json": "application/json", ".wasm": "application/wasm", ".css": "text/css", ".jinja": "text/plain; charset=utf-8" };
const USAGE = "usage: node serve.js BUNDLE [--patch FILE]... [--port N] [--host H]";

/** @param {string[]} argv */
export function parseArgs(argv) {
  const args = { bundle: null, patches: [], port: 8000, host: "127.0.0.1" };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--patch") args.patches.push(resolve(argv[++i]));
    else if (a === "--port") args.port = Number(argv[++i]);
    else if (a === "--host") args.host = argv[++i];
    else if (!args.bundle && !a.startsWith("--")) args.bundle = resolve(a);
    else throw new Error(`unknown argument ${a}; ${USAGE}`);
  }
  if (!args.bundle) throw new Error(`no bundle folder given; ${USAGE}`);
  if (!Number.isInteger(args.port) || args.port < 0 || args.port > 65535) throw new Error(`port ${args.port} is not a port; ${USAGE}`);
  return args;
}

/** A file under root, or null (no escaping the root). */
function inside(root, relative) {
  const path = resolve(root, "." + sep + decodeURIComponent(relative));
  return path === root || path.startsWith(root + sep) ? path : null;
}

export function serve({ bundle, patches, port, host }) {
  const patchFiles = new Map(patches.map((p) => [basename(p), p]));
  const server = createServer((request, response) => {
    const headers = { "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
      "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-cache" };
    const url = new URL(request.url, "http://localhost");
    const route = url.pathname;
    let file = null;
    if (route.startsWith("/web/")) file = inside(HERE, route.slice(5));
    else if (route.startsWith("/bundle/")) file = inside(bundle, route.slice(8));
    else if (route === "/patches/index.json") {
      response.writeHead(200, { ...headers, "Content-Type": "application/json" });
      response.end(JSON.stringify([...patchFiles.keys()]));
      return;
    } else if (route.startsWith("/patches/")) file = patchFiles.get(decodeURIComponent(route.slice(9))) ?? null;
    else file = inside(PAGE, route === "/" ? "index.html" : route.slice(1));
    let size = -1;
    try { if (file && statSync(file).isFile()) size = statSync(file).size; } catch { size = -1; }
    if (size < 0) {
      response.writeHead(404, { ...headers, "Content-Type": "text/plain" });
      response.end(`not found: ${route}\n`);
      return;
    }
    response.writeHead(200, { ...headers, "Content-Type": TYPES[extname(file)] ?? "application/octet-stream",
      "Content-Length": size });
    createReadStream(file).pipe(response);
  });
  server.listen(port, host, () => {
    const { port: bound } = server.address();
    console.log(`serving ${bundle} at http://${host}:${bound}/`);
  });
  return server;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    serve(parseArgs(process.argv.slice(2)));
  } catch (e) {
    console.error(`error: ${e.message}`);
    process.exit(2);
  }
}
