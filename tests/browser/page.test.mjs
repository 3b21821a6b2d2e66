// The web page in headless Chromium: classify an image, add images to the
// index (with and without the API key), search, and check what the page
// shows. Run through run.sh, which starts the server and sets:
//   CAPIVARA_URL, CAPIVARA_API_KEY, CAPIVARA_FIXTURES, CHROMIUM, SCREENSHOT.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { chromium } from "playwright-core";

const BASE = process.env.CAPIVARA_URL ?? "http://127.0.0.1:8080";
const KEY = process.env.CAPIVARA_API_KEY ?? "";
const FIXTURES = process.env.CAPIVARA_FIXTURES ?? new URL("../fixtures/images", import.meta.url).pathname;
const SCREENSHOT = process.env.SCREENSHOT ?? "";
const LABELS = ["gato", "cachorro", "capivara", "pássaro", "carro"];
const UPLOADS = ["photo.jpg", "wide.png", "rgba.png"];
const fixture = (name) => join(FIXTURES, name);

let browser, page;
const consoleErrors = [];
const badRequests = [];
const foreign = [];

/** Failures the test provokes on purpose: "status path". */
const expected = new Set(["401 /images"]);
const deliberate = (url, status) => expected.has(`${status} ${new URL(url).pathname}`);

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const context = await browser.newContext({
    viewport: { width: 1280, height: 900 }, locale: "pt-BR", deviceScaleFactor: 1,
  });
  page = await context.newPage();
  page.setDefaultTimeout(20_000);
  // A standing listener turns on file-chooser interception before any test
  // needs it (turning it on lazily races with the key press that opens it).
  page.on("filechooser", () => {});
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const where = m.location()?.url ?? "";
    // Chromium logs every 4xx answer as "Failed to load resource"; the 401 is expected.
    const status = /status of (\d{3})/.exec(m.text())?.[1];
    if (status && where && deliberate(where, Number(status))) return;
    consoleErrors.push(`${m.text()} (${where})`);
  });
  page.on("pageerror", (e) => consoleErrors.push(`uncaught: ${e.message}`));
  page.on("request", (r) => {
    if (!r.url().startsWith(BASE) && !r.url().startsWith("data:") && !r.url().startsWith("blob:")) {
      foreign.push(r.url());
    }
  });
  page.on("requestfailed", (r) => badRequests.push(`${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
  page.on("response", (r) => {
    if (r.status() >= 400 && !deliberate(r.url(), r.status())) {
      badRequests.push(`${r.request().method()} ${r.url()}: ${r.status()}`);
    }
  });
});

after(async () => {
  await browser?.close();
});

/** "45,5%" (pt-BR) -> 45.5 */
const parsePercent = (s) => Number(s.replace(/\s|%|\u00a0/g, "").replace(",", "."));
const parseDecimal = (s) => Number(s.replace(/\s|\u00a0/g, "").replace("−", "-").replace(",", "."));

test("the page loads, all from the server, and reports ready", async () => {
  await page.goto(BASE + "/", { waitUntil: "networkidle" });
  assert.match(await page.title(), /capivara/);
  assert.equal(await page.locator("html").getAttribute("lang"), "pt-BR");
  await page.locator("#ready[data-state='ok']").waitFor();
  assert.equal(await page.locator("#ready-text").textContent(), "pronto");
  assert.equal(await page.locator("#docs-link").getAttribute("href"), "/docs");
  assert.equal(await page.locator("#classify-title").textContent(), "Classificar");
  assert.equal(await page.locator("#search-title").textContent(), "Buscar");
  assert.deepEqual(
    (await page.locator("#labels").inputValue()).split(",").map((s) => s.trim()),
    LABELS,
  );
});

/** Forward passes of `model`'s image tower so far, from /metrics. */
async function imagePasses(model) {
  const text = await (await fetch(`${BASE}/metrics`)).text();
  const line = text.split("\n").find((l) =>
    l.startsWith("capivara_batch_size_count{") && l.includes(`model="${model}"`) && l.includes('tower="image"'));
  return line ? Number(line.split(" ").pop()) : 0;
}

test("an image dropped on the drop zone is previewed", async () => {
  const bytes = readFileSync(fixture("wide.png")).toString("base64");
  const dt = await page.evaluateHandle((b64) => {
    const data = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const t = new DataTransfer();
    t.items.add(new File([data], "wide.png", { type: "image/png" }));
    return t;
  }, bytes);
  await page.locator("#drop-zone").dispatchEvent("drop", { dataTransfer: dt });
  const preview = page.locator("#classify-preview");
  await preview.waitFor({ state: "visible" });
  assert.match(await preview.getAttribute("alt"), /wide\.png/);
});

test("the keyboard opens the file picker; classifying shows a sorted bar chart", async () => {
  await page.locator("#drop-zone").focus();
  const [chooser] = await Promise.all([
    page.waitForEvent("filechooser"),
    page.keyboard.press("Enter"),
  ]);
  await chooser.setFiles(fixture("photo.jpg"));
  const preview = page.locator("#classify-preview");
  await page.waitForFunction(() => {
    const img = document.getElementById("classify-preview");
    return img.alt.includes("photo.jpg") && img.complete && img.naturalWidth > 0;
  });
  assert.match(await preview.getAttribute("alt"), /photo\.jpg/);

  await page.locator("#classify-btn").click();
  const rows = page.locator("[data-testid='bar-row']");
  await page.waitForFunction((n) => document.querySelectorAll("[data-testid='bar-row']").length === n,
    LABELS.length);
  assert.equal(await rows.count(), LABELS.length, "one row per label");

  const labels = await page.locator("[data-testid='bar-label']").allTextContents();
  assert.deepEqual([...labels].sort(), [...LABELS].sort());
  const shown = (await page.locator("[data-testid='bar-value']").allTextContents()).map(parsePercent);
  for (const p of shown) assert.ok(p >= 0 && p <= 100, `percentage ${p}`);
  const total = shown.reduce((a, b) => a + b, 0);
  assert.ok(Math.abs(total - 100) <= 0.5, `percentages sum to ${total}`);
  for (let i = 1; i < shown.length; i++) {
    assert.ok(shown[i - 1] >= shown[i], `sorted descending: ${shown}`);
  }
  // The bars are as long as the percentages say.
  const widths = await page.locator(".bar-fill").evaluateAll((els) =>
    els.map((e) => e.getBoundingClientRect().width / e.parentElement.getBoundingClientRect().width));
  widths.forEach((w, i) => assert.ok(Math.abs(w * 100 - shown[i]) < 1.5, `bar ${i}: ${w} vs ${shown[i]}%`));
  assert.equal(await page.locator("#classify-error").isVisible(), false);
  assert.equal(await page.locator("#classify-btn").isEnabled(), true);
});

test("with two models loaded, the page classifies with the one chosen", async () => {
  // run.sh serves the tiny model twice: `tiny` (the default) and `outro`.
  const select = page.locator("#model");
  await select.waitFor({ state: "visible" });
  assert.deepEqual(await select.locator("option").allTextContents(), ["outro", "tiny (padrão)"]);
  assert.equal(await select.inputValue(), "tiny");
  await select.selectOption("outro");
  const before = { outro: await imagePasses("outro"), tiny: await imagePasses("tiny") };
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith("/classify") && r.request().method() === "POST"),
    page.locator("#classify-btn").click(),
  ]);
  assert.equal(response.status(), 200);
  await page.locator("#classify-btn:not([disabled])").waitFor();
  assert.equal(await page.locator("#classify-error").isVisible(), false);
  // The server ran the image through `outro`, not the default.
  assert.equal(await imagePasses("outro"), before.outro + 1);
  assert.equal(await imagePasses("tiny"), before.tiny);
  await select.selectOption("tiny");
});

test("searching an empty index says so", async () => {
  await page.locator("#query").fill("uma capivara");
  await page.locator("#query").press("Enter");
  await page.locator("#search-status").getByText("vazio").waitFor();
  assert.equal(await page.locator("[data-testid='result']").count(), 0);
});

test("an upload without the API key shows the 401 message", async () => {
  await page.locator("#api-key").fill("");
  await page.locator("#upload-files").setInputFiles(fixture("photo.jpg"));
  const answer = page.waitForResponse((r) => new URL(r.url()).pathname === "/images");
  await page.locator("#upload-btn").click();
  assert.equal((await answer).status(), 401);
  const status = page.locator("#upload-status");
  await status.getByText("chave de API inválida ou ausente").waitFor();
  assert.match(await status.getAttribute("class"), /\bbad\b/);
});

test("uploading with the key adds the images and refreshes the search", async () => {
  await page.locator("#api-key").fill(KEY);
  await page.locator("#upload-files").setInputFiles(UPLOADS.map(fixture));
  await page.locator("#upload-btn").click();
  const status = page.locator("#upload-status");
  await status.getByText(`${UPLOADS.length} imagens adicionadas`).waitFor();
  assert.match(await status.getAttribute("class"), /\bok\b/);
  assert.equal(await page.evaluate(() => sessionStorage.getItem("capivara.apiKey")), KEY);
  // The empty search from before is repeated.
  await page.waitForFunction((n) => document.querySelectorAll("[data-testid='result']").length === n,
    UPLOADS.length);
});

test("searching by the classified image puts that image first", async () => {
  await page.locator("#similar-btn").click();
  await page.locator("#search-status").getByText("photo.jpg").waitFor();
  const first = page.locator("[data-testid='result']").first();
  assert.match(await first.locator("[data-testid='metadata']").textContent(), /photo\.jpg/);
  const score = parseDecimal(await first.locator("[data-testid='score']").textContent());
  assert.ok(score > 0.9, `self-similarity ${score}`);
});

test("a text search shows the uploaded images with thumbnails, scores and metadata", async () => {
  await page.locator("#query").fill("uma capivara na beira do rio");
  await page.locator("#k").selectOption("12");
  const answer = page.waitForResponse((r) => new URL(r.url()).pathname === "/search");
  await page.locator("#search-btn").click();
  const body = await (await answer).json();
  assert.equal(body.results.length, UPLOADS.length);
  await page.locator("#search-status").getByText("beira do rio").waitFor();

  const cards = page.locator("[data-testid='result']");
  assert.equal(await cards.count(), UPLOADS.length);
  await page.waitForFunction(() => [...document.querySelectorAll("[data-testid='thumb']")]
    .every((img) => img.complete && img.naturalWidth > 0));
  const sizes = await page.locator("[data-testid='thumb']").evaluateAll((imgs) =>
    imgs.map((i) => [i.naturalWidth, i.naturalHeight]));
  for (const [w, h] of sizes) assert.ok(w > 0 && h > 0 && Math.max(w, h) <= 256, `thumbnail ${w}x${h}`);

  const files = (await page.locator("[data-testid='metadata']").allTextContents())
    .map((m) => JSON.parse(m).arquivo);
  assert.deepEqual([...files].sort(), [...UPLOADS].sort());
  const scores = (await page.locator("[data-testid='score']").allTextContents()).map(parseDecimal);
  scores.forEach((s, i) => {
    assert.ok(Number.isFinite(s) && s >= -1 && s <= 1, `score ${s}`);
    assert.ok(Math.abs(s - body.results[i].score) < 0.001, `shown ${s} vs ${body.results[i].score}`);
  });
  const ids = await cards.evaluateAll((els) => els.map((e) => e.dataset.id));
  assert.deepEqual(ids, body.results.map((r) => r.id), "in the server's order");
  // Each score badge is visible inside its card.
  for (const c of await cards.all()) {
    const [box, badge] = [await c.boundingBox(), await c.locator("[data-testid='score']").boundingBox()];
    assert.ok(badge.x >= box.x && badge.x + badge.width <= box.x + box.width + 0.5, "score inside its card");
  }
});

test("screenshot", async () => {
  await page.locator("#query").blur();
  await page.evaluate(() => window.scrollTo(0, 0));
  if (SCREENSHOT) {
    mkdirSync(dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    console.log(`screenshot: ${SCREENSHOT}`);
  }
});

test("a missing thumbnail shows a placeholder", async () => {
  const gone = await page.locator("[data-testid='result']").nth(1).getAttribute("data-id");
  const path = `/images/${gone}/thumbnail`;
  expected.add(`404 ${path}`);
  await page.route(`**${path}`, (route) => route.fulfill({
    status: 404, contentType: "application/json",
    body: JSON.stringify({ error: { code: "not_found", message: "gone" } }),
  }));
  await page.locator("#search-btn").click();
  const card = page.locator(`[data-testid='result'][data-id='${gone}']`);
  await card.getByText("sem miniatura").waitFor();
  assert.equal(await card.locator("img").count(), 0);
  assert.match(await card.locator("[data-testid='score']").textContent(), /\d/);
  await page.unroute(`**${path}`);
});

test("no console errors, failed or outside requests", () => {
  assert.deepEqual(consoleErrors, [], "console errors");
  assert.deepEqual(badRequests, [], "failed requests");
  assert.deepEqual(foreign, [], "requests outside the server");
});
