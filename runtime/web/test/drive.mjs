#!/usr/bin/env node
/**
 * Drive the demo page in a real Chromium (playwright-core, Debian's /usr/bin/chromium) through
 * `window.reftEdge`, for tests/test_web.py and benchmarks/web_speed.py: reads a plan, writes what
 * the page answered.
 *
 * @example
 *   node runtime/web/test/drive.mjs plan.json results.json
 *   // plan: {url, timeoutMs?, chromiumArgs? (default ["--disable-gpu"]), initScript?, revisit?, screenshot?, screenshotPrompt?, screenshotPatch?, screenshotMaxNewTokens?,
 *   //        cases: [{id, op: "generate", prompt, patches: [url], weights?, skills?, options}, {id, op: "patch", url}]}
 *   // results: {cases: {id: {tokenIds, text, promptIds, timings} | {error: {name, message}, shown}}, console: [...],
 *   //           isolated, threads, backend, adapter, cacheError, unpacked, status, revisitBundleBytes, loadS (page open to model ready), bundleBytes (the bundle's downloads),
 *   //           pageBytes (every response body: page, modules, wasm, bundle, patches)}
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [planFile, outFile] = process.argv.slice(2);
const plan = JSON.parse(readFileSync(planFile, "utf8"));
const profile = mkdtempSync(join(tmpdir(), "reft-edge-chromium-"));
// a fresh profile each run (launchPersistentContext passes it as --user-data-dir)
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: plan.chromium ?? "/usr/bin/chromium", headless: true,
  args: ["--headless", "--no-sandbox", ...(plan.chromiumArgs ?? ["--disable-gpu"]), "--disable-background-networking",
    "--disable-component-update", "--no-first-run"],
});
const results = { cases: {}, console: [] };
try {
  // initScript: code run in the page before its own (e.g. a Cache.prototype.put that throws)
  if (plan.initScript) await browser.addInitScript({ content: plan.initScript });
  const page = await browser.newPage();
  page.setDefaultTimeout(plan.timeoutMs ?? 120000);
  page.on("console", (m) => results.console.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => results.console.push(`pageerror: ${e.message}`));
  let pageBytes = 0;
  page.on("requestfinished", async (r) => { pageBytes += (await r.sizes()).responseBodySize; });
  const opened = performance.now();
  await page.goto(plan.url);
  results.bundleBytes = await page.evaluate(() => window.reftEdge.ready.then((model) => model.downloadedBytes));
  results.loadS = (performance.now() - opened) / 1000;
  results.isolated = await page.evaluate(() => crossOriginIsolated);
  results.threads = await page.evaluate(() => window.reftEdge.threads);
  Object.assign(results, await page.evaluate(async () => {
    const model = await window.reftEdge.ready;
    return { backend: window.reftEdge.backend, adapter: window.reftEdge.adapter, cacheError: model.cacheError, unpacked: model.unpacked,
             status: document.getElementById("status").textContent };
  }));
  for (const c of plan.cases) {
    results.cases[c.id] = await page.evaluate(async (c) => {
      const api = window.reftEdge;
      try {
        if (c.op === "patch") {
          const patch = await api.loadPatch(c.url);
          return { name: patch.name, digest: patch.payloadSha256 };
        }
        const patches = [];
        for (const url of c.patches) patches.push(await api.loadPatch(url));
        const skillBoxes = document.querySelectorAll("#skills input").length; // the page's ticks for the last patch
        if (c.skills) patches.splice(0, patches.length, ...patches.map((p) => api.withSkills(p, c.skills)));
        const pieces = [];
        const out = await api.generate(c.prompt, { patches, weights: c.weights, ...c.options,
          onText: (piece) => pieces.push(piece) });
        return { text: out.text, tokenIds: out.tokenIds, promptIds: await api.encode(c.prompt), pieces, skillBoxes,
                 finishReason: out.finishReason, timings: out.timings };
      } catch (e) {
        return { error: { name: e.name, message: e.message }, shown: document.getElementById("error").textContent };
      }
    }, c);
  }
  if (plan.screenshot) {
    await page.fill("#prompt", plan.screenshotPrompt ?? "What is the weather like today?");
    if (plan.screenshotMaxNewTokens) await page.fill("#max", String(plan.screenshotMaxNewTokens));
    if (plan.screenshotPatch) await page.evaluate((url) => window.reftEdge.loadPatch(url), plan.screenshotPatch);
    await page.click("#go");
    await page.waitForFunction(() => document.getElementById("personal-speed").textContent !== "", null,
      { timeout: plan.timeoutMs ?? 120000 });
    await page.screenshot({ path: plan.screenshot, fullPage: true });
  }
  results.pageBytes = pageBytes;
  if (plan.revisit) { // a returning visitor, same profile: what the bundle takes from the network now
    await page.reload();
    results.revisitBundleBytes = await page.evaluate(() => window.reftEdge.ready.then((model) => model.downloadedBytes));
  }
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
writeFileSync(outFile, JSON.stringify(results, null, 1));
