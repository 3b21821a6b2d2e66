"use strict";
// The capivara page: plain JavaScript, no framework, no build step, nothing
// loaded from outside this server.

const $ = (id) => document.getElementById(id);
const percent = new Intl.NumberFormat("pt-BR", {
  style: "percent", minimumFractionDigits: 1, maximumFractionDigits: 1,
});
const decimal = new Intl.NumberFormat("pt-BR", {
  minimumFractionDigits: 3, maximumFractionDigits: 3,
});

// Portuguese words for the server's error codes; its (English) message follows.
const ERRORS = {
  unauthorized: "chave de API inválida ou ausente",
  invalid_labels: "rótulos inválidos",
  invalid_image: "não foi possível ler a imagem",
  unsupported_image: "formato de imagem não suportado",
  unsupported_media_type: "formato não suportado",
  image_too_large: "imagem grande demais",
  payload_too_large: "envio grande demais",
  missing_image: "falta a imagem",
  empty_query: "digite o que procura",
  query_too_long: "busca longa demais",
  overloaded: "servidor ocupado, tente de novo em instantes",
  not_ready: "o modelo ainda está carregando",
  shutting_down: "o servidor está sendo desligado",
  insufficient_storage: "sem espaço em disco no servidor",
};

/** Calls the API; resolves to the JSON body or throws an Error in Portuguese. */
async function api(path, options = {}) {
  // The key, when given, goes with every call (a server started with
  // --api-key-reads wants it for reads too).
  const key = $("api-key")?.value.trim();
  if (key) options = { ...options, headers: { Authorization: `Bearer ${key}`, ...(options.headers || {}) } };
  let res;
  try {
    res = await fetch(path, options);
  } catch {
    throw new Error("sem conexão com o servidor");
  }
  const body = await res.json().catch(() => null);
  if (res.ok) return body;
  const err = (body && body.error) || {};
  const words = ERRORS[err.code] || `erro ${res.status}`;
  const retry = res.headers.get("Retry-After");
  let msg = err.message && err.message !== words ? `${words}: ${err.message}` : words;
  if (retry) msg += ` (tente de novo em ${retry} s)`;
  const e = new Error(msg);
  e.status = res.status;
  throw e;
}

function showError(el, message) {
  el.textContent = message || "";
  el.hidden = !message;
}

/** Disables a button and marks a region busy while `work` runs. */
async function busy(button, region, label, work) {
  const idle = button.textContent;
  button.disabled = true;
  button.textContent = label;
  button.classList.add("is-busy");
  region?.setAttribute("aria-busy", "true");
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.textContent = idle;
    button.classList.remove("is-busy");
    region?.setAttribute("aria-busy", "false");
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).split(",", 2)[1]);
    r.onerror = () => reject(new Error("não foi possível ler o arquivo"));
    r.readAsDataURL(file);
  });
}

// ---- readiness -------------------------------------------------------------

async function pollReady() {
  const box = $("ready");
  let state = "down";
  try {
    const res = await fetch("/readyz", { cache: "no-store" });
    state = res.ok ? "ok" : "wait";
    if (res.ok) showModels(await res.json());
  } catch { /* stays "down" */ }
  const text = { ok: "pronto", wait: "carregando o modelo…", down: "servidor indisponível" };
  box.dataset.state = state;
  $("ready-text").textContent = text[state];
  setTimeout(pollReady, state === "ok" ? 15000 : 2000);
}

/** With more than one model loaded, a selector for the one that classifies. */
function showModels(ready) {
  const names = Object.keys(ready.models || {});
  const select = $("model");
  if (names.length < 2 || select.options.length) return;
  for (const name of names) {
    const option = el("option", { value: name, text: name });
    if (name === ready.default_model) {
      option.selected = true;
      option.textContent = `${name} (padrão)`;
    }
    select.append(option);
  }
  $("model-field").hidden = false;
}

// ---- classify --------------------------------------------------------------

let chosen = null; // the File to classify
let previewUrl = null;

function choose(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError($("classify-error"), `“${file.name}” não é uma imagem`);
    return;
  }
  chosen = file;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  const img = $("classify-preview");
  img.src = previewUrl;
  img.alt = `Imagem escolhida: ${file.name}`;
  img.hidden = false;
  $("drop-zone").classList.add("has-image");
  $("classify-file-name").textContent = `${file.name} · ${Math.ceil(file.size / 1024)} KiB`;
  showError($("classify-error"), "");
  clearBars();
}

function clearBars() {
  $("classify-results").replaceChildren(el("p", { class: "empty muted", text: "Os resultados aparecem aqui." }));
}

function renderBars(predictions, name) {
  const list = el("ol", { class: "bars", id: "bars", "aria-label": "Probabilidade de cada rótulo" });
  predictions.forEach((p, i) => {
    const share = Math.max(0, Math.min(1, p.score));
    const fill = el("span", { class: "bar-fill" });
    fill.style.width = `${(share * 100).toFixed(2)}%`;
    list.append(el("li", { class: i === 0 ? "bar-row top" : "bar-row", "data-testid": "bar-row" },
      el("span", { class: "bar-label", "data-testid": "bar-label", title: p.label, text: p.label }),
      el("span", { class: "bar-track", "aria-hidden": "true" }, fill),
      el("span", { class: "bar-value", "data-testid": "bar-value", "data-score": String(p.score),
        text: percent.format(p.score) })));
  });
  const caption = el("p", { class: "chart-caption muted",
    text: `Probabilidade de cada rótulo para “${name}”` });
  $("classify-results").replaceChildren(caption, list);
}

async function classify(event) {
  event.preventDefault();
  const errorBox = $("classify-error");
  const labels = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (!chosen) return showError(errorBox, "Escolha uma imagem primeiro.");
  if (!labels.length) return showError(errorBox, "Escreva ao menos um rótulo.");
  showError(errorBox, "");
  const file = chosen;
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("labels", labels.join(","));
  if (!$("model-field").hidden && $("model").value) form.append("model", $("model").value);
  try {
    const body = await busy($("classify-btn"), $("classify-results"), "Classificando…",
      () => api("/classify", { method: "POST", body: form }));
    renderBars(body.predictions, file.name);
  } catch (e) {
    clearBars();
    showError(errorBox, `Não foi possível classificar: ${e.message}`);
  }
}

function setupDropZone() {
  const zone = $("drop-zone");
  const input = $("classify-file");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => choose(input.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    choose(e.dataTransfer.files[0]);
  });
  // Pasting an image anywhere on the page picks it too.
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) choose(file);
  });
}

// ---- search ----------------------------------------------------------------

let lastSearch = null; // the body of the last search, to repeat it after an upload

function card(result) {
  const id = result.id;
  const thumb = el("img", {
    class: "thumb", alt: `Miniatura de ${id}`, loading: "lazy", "data-testid": "thumb",
    src: `/images/${encodeURIComponent(id)}/thumbnail`,
  });
  const score = el("span", { class: "card-score", "data-testid": "score", title: "similaridade (cosseno)",
    text: decimal.format(result.score) });
  const frame = el("div", { class: "thumb-frame" }, thumb, score);
  thumb.addEventListener("error", () => {
    thumb.replaceWith(el("div", { class: "thumb-missing", role: "img",
      "aria-label": `Sem miniatura para ${id}`, text: "sem miniatura" }));
  }, { once: true });
  const meta = result.metadata && Object.keys(result.metadata).length
    ? JSON.stringify(result.metadata) : "";
  return el("li", { class: "card", "data-testid": "result", "data-id": id },
    frame,
    el("div", { class: "card-body" },
      el("span", { class: "card-id", title: id, text: id }),
      meta ? el("code", { class: "card-meta", "data-testid": "metadata", title: meta, text: meta }) : ""));
}

async function runSearch(body, what) {
  const errorBox = $("search-error");
  showError(errorBox, "");
  try {
    const res = await busy($("search-btn"), $("search-results"), "Buscando…",
      () => api("/search", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      }));
    lastSearch = { body, what };
    const n = res.results.length;
    $("search-results").replaceChildren(...res.results.map(card));
    $("search-status").textContent = n
      ? `${n} ${n === 1 ? "imagem" : "imagens"} para ${what} · o número é a similaridade (cosseno)`
      : "O índice está vazio: adicione imagens abaixo.";
  } catch (e) {
    $("search-status").textContent = "";
    $("search-results").replaceChildren();
    showError(errorBox, `Não foi possível buscar: ${e.message}`);
  }
}

function search(event) {
  event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return showError($("search-error"), "Digite o que procura.");
  runSearch({ query, k: Number($("k").value) }, `“${query}”`);
}

async function searchSimilar() {
  if (!chosen) return showError($("classify-error"), "Escolha uma imagem primeiro.");
  const image = await fileToBase64(chosen);
  runSearch({ image, k: Number($("k").value) }, `a imagem “${chosen.name}”`);
  $("search-pane").scrollIntoView({ behavior: "smooth", block: "start" });
}

// ---- upload ----------------------------------------------------------------

const KEY = "capivara.apiKey";

async function upload(event) {
  event.preventDefault();
  const status = $("upload-status");
  const files = [...$("upload-files").files];
  status.className = "status";
  if (!files.length) {
    status.textContent = "Escolha uma ou mais imagens.";
    return;
  }
  const key = $("api-key").value.trim();
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  let added = 0;
  try {
    await busy($("upload-btn"), null, "Enviando…", async () => {
      for (let i = 0; i < files.length; i += 16) { // the server takes at most 64 per request
        const form = new FormData();
        for (const f of files.slice(i, i + 16)) {
          form.append("image", f, f.name);
          form.append("metadata", JSON.stringify({ arquivo: f.name }));
        }
        status.textContent = `Enviando ${Math.min(i + 16, files.length)} de ${files.length}…`;
        const res = await api("/images", { method: "POST", headers, body: form });
        added += res.ids.length;
      }
    });
    status.classList.add("ok");
    status.textContent = `${added} ${added === 1 ? "imagem adicionada" : "imagens adicionadas"} ao índice.`;
    $("upload-files").value = "";
    showChosenFiles();
    if (lastSearch) runSearch(lastSearch.body, lastSearch.what);
  } catch (e) {
    status.classList.add("bad");
    status.textContent = (added ? `${added} adicionadas; depois ` : "") + `falhou: ${e.message}`;
  }
}

function showChosenFiles() {
  const files = [...$("upload-files").files];
  $("upload-files-chosen").textContent = files.length
    ? `${files.length} ${files.length === 1 ? "escolhida" : "escolhidas"}: ${files.map((f) => f.name).join(", ")}`
    : "nenhuma escolhida";
}

function setupApiKey() {
  const input = $("api-key");
  try {
    input.value = sessionStorage.getItem(KEY) || "";
    input.addEventListener("input", () => sessionStorage.setItem(KEY, input.value));
  } catch { /* storage disabled: the field still works for this page */ }
}

// ---- start -----------------------------------------------------------------

setupDropZone();
setupApiKey();
$("classify-form").addEventListener("submit", classify);
$("similar-btn").addEventListener("click", searchSimilar);
$("search-form").addEventListener("submit", search);
$("upload-form").addEventListener("submit", upload);
$("upload-files").addEventListener("change", showChosenFiles);
pollReady();
