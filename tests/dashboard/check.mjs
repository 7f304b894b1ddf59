// The dashboard in a real browser (headless Chromium through playwright-core)
// against a running cluster. tests/cluster/dashboard.rs starts `synod dev`
// and runs this with:
//   SYNOD_URL     the node whose dashboard to open
//   SYNOD_TOKEN   an admin token
//   SYNOD_WASM    a counter component to upload from the page
//   SYNOD_SHOTS   where to save screenshots
// Exits non-zero, saying why, at the first thing that does not hold.

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import assert from "node:assert/strict";

const url = process.env.SYNOD_URL;
const token = process.env.SYNOD_TOKEN;
const wasm = process.env.SYNOD_WASM;
const shots = process.env.SYNOD_SHOTS;
mkdirSync(shots, { recursive: true });

async function api(method, path, body) {
  const response = await fetch(url + path, { method, body, headers: { Authorization: "Bearer " + token } });
  const json = await response.json();
  assert.ok(response.ok, `${method} ${path}: ${response.status} ${JSON.stringify(json)}`);
  return json;
}

// Poll `check` (which uses locators: the page's CSP forbids the eval that
// page.waitForFunction needs) until it returns true.
async function until(what, check, timeout) {
  const deadline = Date.now() + timeout;
  while (!(await check())) {
    assert.ok(Date.now() < deadline, `not within ${timeout} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
let failed = false;
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
const problems = [];
page.on("pageerror", (e) => problems.push(String(e)));
try {
  await page.goto(url + "/");
  // No token yet: the page asks for one, and fetches nothing before.
  await page.locator("#token-dialog").waitFor({ state: "visible", timeout: 10_000 });
  await page.screenshot({ path: `${shots}/token.png` });
  await page.fill("#token-input", token);
  await page.click("#token-form button[type=submit]");

  // Three members, one leader.
  await until("three members", async () => (await page.locator("#members tr").count()) === 3, 15_000);
  await until("one leader", async () => (await page.locator("#members .b-leader").count()) === 1, 15_000);
  const cluster = await api("GET", "/v1/cluster");
  const shownLeader = await page.locator("#members .b-leader").evaluate((b) => b.closest("tr").dataset.node);
  assert.equal(Number(shownLeader), cluster.leader, "the page shows the cluster's leader");
  assert.equal(await page.textContent("#leader"), "node " + cluster.leader);

  // Upload from the page: version 1 becomes active.
  await page.fill("#up-name", "counter");
  await page.fill("#up-version", "1");
  await page.setInputFiles("#file", wasm);
  await page.locator('#plugin-rows tr[data-plugin="counter"]').waitFor({ timeout: 30_000 });
  let plugins = await api("GET", "/v1/plugins");
  assert.equal(plugins.plugins.counter?.active, "1", "the upload from the page is in GET /v1/plugins");

  // A second version, then activate it with its button.
  await page.fill("#up-version", "2");
  await page.setInputFiles("#file", []);
  await page.setInputFiles("#file", wasm);
  const button = page.locator('[data-activate="counter@2"]');
  await button.waitFor({ timeout: 30_000 });
  await button.click();
  await until("the activation confirmed", async () => (await page.textContent("#msg")).includes("is active"), 15_000);
  plugins = await api("GET", "/v1/plugins");
  assert.equal(plugins.plugins.counter.active, "2", "the activation from the page is in GET /v1/plugins");

  // A command sent over HTTP shows in the live log within a second.
  const sent = await api("POST", "/v1/commands/counter/increment", JSON.stringify({ by: 5 }));
  const answered = Date.now();
  await page.locator(`#log tr[data-index="${sent.index}"]`).waitFor({ timeout: 1_000 });
  const shownAfter = Date.now() - answered;
  const row = await page.locator(`#log tr[data-index="${sent.index}"]`).innerText();
  assert.match(row, /counter\s+increment/, row);
  console.log(`command ${sent.index} in the live log ${shownAfter} ms after its answer`);

  await page.screenshot({ path: `${shots}/dashboard.png`, fullPage: true });
  await page.locator("#plugins").screenshot({ path: `${shots}/plugins.png` });
  await page.locator("#cluster").screenshot({ path: `${shots}/cluster.png` });
  assert.deepEqual(problems, [], "no script errors on the page");
} catch (e) {
  failed = true;
  console.error(e);
  await page.screenshot({ path: `${shots}/failure.png`, fullPage: true }).catch(() => {});
  console.error(`(screenshot of the failure: ${shots}/failure.png)`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
