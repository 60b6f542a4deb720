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
import { createReadStream, realpathSync, statSync } from "node:fs";
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
  const value = (i) => {
    if (i >= argv.length || argv[i] === "") throw new Error(`${argv[i - 1]} needs a value; ${USAGE}`);
    return argv[i];
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--patch") args.patches.push(resolve(value(++i)));
    else if (a === "--port") args.port = Number(value(++i));
    else if (a === "--host") args.host = value(++i);
    else if (!args.bundle && !a.startsWith("--")) args.bundle = resolve(a);
    else throw new Error(`unknown argument ${a}; ${USAGE}`);
  }
  if (!args.bundle) throw new Error(`no bundle folder given; ${USAGE}`);
  if (!Number.isInteger(args.port) || args.port < 0 || args.port > 65535) throw new Error(`port ${args.port} is not a port; ${USAGE}`);
  return args;
}

/** `text` percent-decoded, or null where the encoding is broken (`%`, `%zz`, a lone UTF-8 byte). */
function decoded(text) {
  try { return decodeURIComponent(text); } catch { return null; }
}

/** The real path of `path` (links followed), or null where it does not exist or cannot be read. */
function real(path) {
  try { return realpathSync(path); } catch { return null; }
}

/**
 * The real path of a regular file under root, or null. The check runs on real paths: comparing
 * path strings lets a link inside the folder (`rootlink -> /`) hand out any file on the machine.
 * @param {string} root a real path (see realRoots)
 * @param {string} relative the URL's path below the route, still percent-encoded
 */
export function inside(root, relative) {
  const name = decoded(relative);
  if (name === null || name.includes("\0")) return null;
  const path = real(resolve(root, "." + sep + name));
  return path !== null && (path === root || path.startsWith(root + sep)) ? path : null;
}

/** The size of a regular file, or -1 (a folder, a vanished file, a device). */
function fileSize(path) {
  try {
    const stat = statSync(path);
    return stat.isFile() ? stat.size : -1;
  } catch { return -1; }
}

const HEADERS = { "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
  "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-cache" };

/** A short plain-text answer (404, 400, 500). */
function reply(response, status, text) {
  response.writeHead(status, { ...HEADERS, "Content-Type": "text/plain; charset=utf-8" });
  response.end(`${text}\n`);
}

/**
 * The file a route names, or null. Bundle and page files must stay inside their folder once links
 * are followed; a patch is one of the files given with --patch (their real paths, fixed at start).
 */
function routeFile(route, roots, patchFiles) {
  if (route.startsWith("/web/")) return inside(roots.web, route.slice(5));
  if (route.startsWith("/bundle/")) return inside(roots.bundle, route.slice(8));
  if (route.startsWith("/patches/")) return patchFiles.get(decoded(route.slice(9))) ?? null;
  return inside(roots.page, route === "/" ? "index.html" : route.slice(1));
}

function handle(request, response, roots, patchFiles) {
  // A request line such as `GET http://[::1 HTTP/1.1` makes `new URL` throw: a 400, not a crash.
  let route;
  try { route = new URL(request.url, "http://localhost").pathname; } catch {
    reply(response, 400, "bad request: the URL cannot be parsed");
    return;
  }
  if (route === "/patches/index.json") {
    response.writeHead(200, { ...HEADERS, "Content-Type": "application/json" });
    response.end(JSON.stringify([...patchFiles.keys()]));
    return;
  }
  const file = routeFile(route, roots, patchFiles);
  const size = file === null ? -1 : fileSize(file);
  if (size < 0) {
    reply(response, 404, `not found: ${route}`);
    return;
  }
  response.writeHead(200, { ...HEADERS, "Content-Type": TYPES[extname(file)] ?? "application/octet-stream",
    "Content-Length": size });
  createReadStream(file).on("error", () => response.destroy()).pipe(response);
}

/** The served folders' real paths (the bundle may be reached through a link itself). */
function realRoots(bundle) {
  return { web: real(HERE) ?? HERE, page: real(PAGE) ?? PAGE, bundle: real(bundle) ?? bundle };
}

/** What a failed listen means, in one line (the port is taken, the host is not an address here). */
export function listenError(error, host, port) {
  if (error.code === "EADDRINUSE") return `port ${port} on ${host} is already in use; pass another --port (0 picks a free one)`;
  if (error.code === "EACCES") return `port ${port} needs privileges; pass a --port above 1023 (0 picks a free one)`;
  if (["ENOTFOUND", "EAI_AGAIN", "EADDRNOTAVAIL", "EINVAL"].includes(error.code)) {
    return `--host ${host} is not an address of this machine (${error.code}); pass e.g. --host 127.0.0.1`;
  }
  return `cannot listen on ${host}:${port} (${error.code ?? error.message}); pass another --host or --port`;
}

export function serve({ bundle, patches, port, host }) {
  const roots = realRoots(bundle);
  const patchFiles = new Map(patches.map((p) => [basename(p), real(p) ?? p]));
  const server = createServer((request, response) => {
    try {
      handle(request, response, roots, patchFiles);
    } catch (e) {  // whatever one request does, the server keeps serving the others
      if (!response.headersSent) reply(response, 400, "bad request");
      else response.destroy();
    }
  });
  // Malformed HTTP: answer 4xx (431 for oversized headers, as node does) and close that socket only.
  server.on("clientError", (error, socket) => {
    if (error.code === "ECONNRESET" || !socket.writable) { socket.destroy(); return; }
    const status = error.code === "HPE_HEADER_OVERFLOW" ? "431 Request Header Fields Too Large" : "400 Bad Request";
    socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\n\r\n`);
  });
  server.on("error", (error) => {
    console.error(`error: ${listenError(error, host, port)}`);
    process.exit(2);
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
