// The vitserve web page: an ordinary client of the public API (/models, /classify, /embed, /reconstruct).
// Text that comes from users or the server (file names, labels, error messages) only ever goes in as textContent.
"use strict";

const page = {
  apiKey: "",          // kept in this page only: never stored, sent as X-API-Key with each request
  images: [],          // {id, file, url}: the chosen files, in order
  nextId: 1,
  models: [],          // GET /models
};

// --- small helpers -------------------------------------------------------------------------------------------

function el(tag, options = {}, children = []) {
  const node = document.createElement(tag);
  if (options.className) node.className = options.className;
  if (options.text !== undefined) node.textContent = String(options.text);
  for (const [name, value] of Object.entries(options.attrs || {})) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

function $(selector) {
  return document.querySelector(selector);
}

function pngSource(base64) {
  return "data:image/png;base64," + base64;
}

function apiUrl(path) {
  return new URL("../" + path, window.location.href);  // the page lives at <server>/ui/
}

class ApiError extends Error {}

// One request to the API; a failure becomes an ApiError carrying the error envelope's message.
async function api(path, { method = "POST", body = undefined, files = [] } = {}) {
  const headers = {};
  if (page.apiKey) headers["X-API-Key"] = page.apiKey;
  let response;
  try {
    response = await fetch(apiUrl(path), { method, body, headers });
  } catch (error) {
    throw new ApiError(`the server could not be reached (${error.message})`);
  }
  const isJson = (response.headers.get("content-type") || "").includes("application/json");
  const data = isJson ? await response.json().catch(() => null) : null;
  if (!response.ok) {
    const envelope = data && data.error;
    if (!envelope || typeof envelope.message !== "string") throw new ApiError(`HTTP ${response.status}`);
    const image = Number.isInteger(envelope.index) ? files[envelope.index] : undefined;
    const which = image ? ` (file: ${image.file.name})` : "";
    throw new ApiError(`${envelope.message}${which} [HTTP ${response.status}, ${envelope.type}]`);
  }
  return data;
}

function showError(message) {
  $("#error-message").textContent = message;
  $("#error").hidden = false;
}

function clearError() {
  $("#error").hidden = true;
  $("#error-message").textContent = "";
}

function setStatus(text) {
  $("#status").textContent = text;
}

// Runs one user action: status line, error box, and timing.
async function perform(description, action) {
  clearError();
  setStatus(description + " …");
  const started = performance.now();
  try {
    await action();
    setStatus(`${description}: done in ${Math.round(performance.now() - started)} ms`);
  } catch (error) {
    setStatus("");
    showError(error instanceof ApiError ? error.message : `unexpected problem in the page: ${error.message}`);
    if (!(error instanceof ApiError)) throw error;
  }
}

function chosenImages() {
  if (page.images.length === 0) throw new ApiError("choose or drop at least one image first");
  return page.images;
}

function imageForm(images, fields) {
  const form = new FormData();
  for (const image of images) form.append("file", image.file, image.file.name);
  for (const [name, value] of Object.entries(fields)) {
    if (value !== "" && value !== undefined && value !== null) form.append(name, String(value));
  }
  return form;
}

// --- images --------------------------------------------------------------------------------------------------

function addFiles(fileList) {
  for (const file of fileList) {
    page.images.push({ id: page.nextId++, file, url: URL.createObjectURL(file) });
  }
  renderThumbnails();
}

function removeImage(id) {
  const index = page.images.findIndex((image) => image.id === id);
  if (index >= 0) {
    URL.revokeObjectURL(page.images[index].url);
    page.images.splice(index, 1);
  }
  renderThumbnails();
}

function renderThumbnails() {
  const list = $("#thumbnails");
  list.replaceChildren(...page.images.map((image) => {
    const remove = el("button", { text: "×", className: "remove", attrs: { type: "button", "aria-label": "remove " + image.file.name } });
    remove.addEventListener("click", () => removeImage(image.id));
    return el("li", { className: "thumbnail" }, [
      el("img", { attrs: { src: image.url, alt: image.file.name } }),
      el("span", { className: "name", text: image.file.name }),
      remove,
    ]);
  }));
}

function setUpImageInput() {
  const input = $("#file-input");
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";  // choosing the same file again adds it again
  });
  const zone = $("#drop-zone");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    addFiles(event.dataTransfer.files);
  });
}

// --- models --------------------------------------------------------------------------------------------------

async function loadModels() {
  await perform("loading the models", async () => {
    const data = await api("models", { method: "GET" });
    page.models = data.models;
  }).finally(fillModelSelects);
}

function modelsFor(task) {
  if (task === "attention") return page.models.filter((model) => model.task === "classify" && model.attention);
  return page.models.filter((model) => model.task === task);
}

function fillModelSelects() {
  for (const select of document.querySelectorAll("select[data-task]")) {
    const task = select.dataset.task;
    const models = modelsFor(task);
    const previous = select.value;
    select.replaceChildren(...models.map((model) =>
      el("option", { text: `${model.name} (v${model.version}, ${model.image_size.join("x")})`, attrs: { value: model.name } })));
    if (models.length === 0) {
      const why = task === "attention" ? "no classifier here has attention maps" : `no ${task} model on this server`;
      select.append(el("option", { text: why, attrs: { value: "" } }));
    } else if (models.some((model) => model.name === previous)) {
      select.value = previous;
    }
    select.disabled = models.length === 0;
    select.form.querySelector("button[type=submit]").disabled = models.length === 0;
  }
}

// --- classify ------------------------------------------------------------------------------------------------

function imageCard(image, children) {
  return el("article", { className: "card" }, [
    el("figure", { className: "source" }, [
      el("img", { attrs: { src: image.url, alt: image.file.name } }),
      el("figcaption", { text: image.file.name }),
    ]),
    ...children,
  ]);
}

function predictionList(predictions) {
  return el("ol", { className: "predictions" }, predictions.map((prediction) => {
    const bar = el("span", { className: "bar" });
    bar.style.width = `${(prediction.score * 100).toFixed(1)}%`;
    return el("li", {}, [
      el("span", { className: "label", text: prediction.label }),
      el("span", { className: "bar-track" }, [bar]),
      el("span", { className: "score", text: `${(prediction.score * 100).toFixed(1)}%` }),
    ]);
  }));
}

async function classify(form) {
  const images = chosenImages();
  const data = await api("classify", { body: imageForm(images, { model: form.model.value, top_k: form.top_k.value }), files: images });
  $("#classify-results").replaceChildren(...data.results.map((result, i) =>
    imageCard(images[i], [predictionList(result.predictions)])));
}

// --- attention -----------------------------------------------------------------------------------------------

// The same cold-to-hot ramp as the server's overlay.
const HEAT = [[20, 20, 90], [120, 30, 140], [230, 90, 40], [255, 230, 120]];

function heatColour(value) {
  const position = Math.min(Math.max(value, 0), 1) * (HEAT.length - 1);
  const low = Math.min(Math.floor(position), HEAT.length - 2);
  const f = position - low;
  const rgb = HEAT[low].map((c, k) => Math.round(c * (1 - f) + HEAT[low + 1][k] * f));
  return `rgb(${rgb.join(",")})`;
}

function heatGrid(rows) {
  const canvas = el("canvas", { className: "heat-grid", attrs: { width: 160, height: Math.round(160 * rows.length / rows[0].length) } });
  const flat = rows.flat();
  const low = Math.min(...flat);
  const span = Math.max(...flat) - low || 1;
  const context = canvas.getContext("2d");
  const cellW = canvas.width / rows[0].length;
  const cellH = canvas.height / rows.length;
  rows.forEach((row, r) => row.forEach((value, c) => {
    context.fillStyle = heatColour((value - low) / span);
    context.fillRect(c * cellW, r * cellH, Math.ceil(cellW), Math.ceil(cellH));
  }));
  return canvas;
}

async function attention(form) {
  const images = chosenImages();
  const fields = { model: form.model.value, attention_png: "true", top_k: 1 };
  const data = await api("classify", { body: imageForm(images, fields), files: images });
  $("#attention-results").replaceChildren(...data.results.map((result, i) => {
    const top = result.predictions[0];
    return imageCard(images[i], [
      el("figure", { className: "overlay" }, [
        el("img", { attrs: { src: pngSource(result.attention_png), alt: "attention over " + images[i].file.name } }),
        el("figcaption", { text: `attention for "${top.label}" (${(top.score * 100).toFixed(1)}%)` }),
      ]),
      el("figure", {}, [heatGrid(result.attention),
        el("figcaption", { text: `the ${result.attention.length}x${result.attention[0].length} patch grid` })]),
    ]);
  }));
}

// --- reconstruct ---------------------------------------------------------------------------------------------

// One image's reconstruction view: the pictures, and the mask the user edits on the grid over the masked input.
class ReconstructionView {
  constructor(image, form) {
    this.image = image;
    this.form = form;
    this.mask = [];  // per patch, row-major: true = hidden
    this.grid = [1, 1];
    this.requests = 0;  // re-runs sent so far
    this.masked = el("img", { className: "model-size", attrs: { alt: "masked input" } });
    this.reconstruction = el("img", { className: "model-size", attrs: { alt: "reconstruction" } });
    this.composite = el("img", { className: "model-size", attrs: { alt: "visible patches with the hidden ones painted back" } });
    this.canvas = el("canvas", { className: "patch-grid", attrs: { width: 256, height: 256, title: "click or drag to hide or show patches" } });
    this.mse = el("p", { className: "mse" });
    this.card = imageCard(image, [
      el("figure", {}, [el("div", { className: "stack" }, [this.masked, this.canvas]),
        el("figcaption", { text: "masked input: click or drag patches" })]),
      el("figure", {}, [this.composite, el("figcaption", { text: "visible + painted back" }), this.mse]),
      el("figure", {}, [this.reconstruction, el("figcaption", { text: "every patch as predicted" })]),
    ]);
    this.card.classList.add("reconstruction");
    this.listen();
  }

  show(result, grid) {
    this.grid = grid;
    this.mask = result.mask.map((value) => value === 1);
    this.masked.src = pngSource(result.masked_png);
    this.composite.src = pngSource(result.composite_png);
    this.reconstruction.src = pngSource(result.reconstruction_png);
    const hidden = this.mask.filter(Boolean).length;
    this.mse.textContent = `MSE over the ${hidden} hidden patches: ${result.mse.toFixed(4)}`;
    this.card.dataset.mask = result.mask.join("");
    this.canvas.height = Math.round(this.canvas.width * grid[0] / grid[1]);
    this.draw();
  }

  patchAt(event) {
    const box = this.canvas.getBoundingClientRect();
    const col = Math.floor((event.clientX - box.left) / box.width * this.grid[1]);
    const row = Math.floor((event.clientY - box.top) / box.height * this.grid[0]);
    if (row < 0 || col < 0 || row >= this.grid[0] || col >= this.grid[1]) return -1;
    return row * this.grid[1] + col;
  }

  listen() {
    let hiding = null;  // while dragging: whether the patches passed over are hidden (true) or shown (false)
    let changed = false;
    const apply = (event) => {
      const patch = this.patchAt(event);
      if (patch < 0 || this.mask[patch] === hiding) return;
      this.mask[patch] = hiding;
      changed = true;
      this.draw();
    };
    this.canvas.addEventListener("pointerdown", (event) => {
      const patch = this.patchAt(event);
      if (patch < 0) return;
      event.preventDefault();
      this.canvas.setPointerCapture(event.pointerId);
      hiding = !this.mask[patch];
      apply(event);
    });
    this.canvas.addEventListener("pointermove", (event) => {
      if (hiding !== null) apply(event);
    });
    const finish = () => {
      if (hiding === null) return;
      hiding = null;
      if (changed) this.rerun();
      changed = false;
    };
    this.canvas.addEventListener("pointerup", finish);
    this.canvas.addEventListener("pointercancel", finish);
  }

  draw() {
    const context = this.canvas.getContext("2d");
    const [rows, cols] = this.grid;
    const cellW = this.canvas.width / cols;
    const cellH = this.canvas.height / rows;
    context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    context.fillStyle = "rgba(220, 40, 60, 0.35)";  // hidden patches, also before the server has answered
    this.mask.forEach((hidden, patch) => {
      if (hidden) context.fillRect((patch % cols) * cellW, Math.floor(patch / cols) * cellH, cellW, cellH);
    });
    context.strokeStyle = "rgba(255, 255, 255, 0.7)";
    context.lineWidth = 1;
    context.beginPath();
    for (let c = 1; c < cols; c++) { context.moveTo(c * cellW, 0); context.lineTo(c * cellW, this.canvas.height); }
    for (let r = 1; r < rows; r++) { context.moveTo(0, r * cellH); context.lineTo(this.canvas.width, r * cellH); }
    context.stroke();
  }

  // This image again, with exactly the patches the user hid.
  async rerun() {
    const masked = this.mask.flatMap((hidden, patch) => (hidden ? [patch] : []));
    await perform(`reconstructing ${this.image.file.name} with ${masked.length} hidden patches`, async () => {
      if (masked.length === 0) throw new ApiError("hide at least one patch: there is nothing to paint back");
      const fields = { model: this.form.model.value, masked: masked.join(",") };
      const ticket = ++this.requests;  // a quicker answer to an earlier mask must not replace a later one
      const data = await api("reconstruct", { body: imageForm([this.image], fields), files: [this.image] });
      if (ticket === this.requests) this.show(data.results[0], data.grid);
    });
  }
}

async function reconstruct(form) {
  const images = chosenImages();
  const fields = { model: form.model.value, mask_ratio: form.mask_ratio.value, seed: form.seed.value };
  const data = await api("reconstruct", { body: imageForm(images, fields), files: images });
  const views = images.map((image) => new ReconstructionView(image, form));
  views.forEach((view, i) => view.show(data.results[i], data.grid));
  $("#reconstruct-results").replaceChildren(...views.map((view) => view.card));
}

// --- embed ---------------------------------------------------------------------------------------------------

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let k = 0; k < a.length; k++) { dot += a[k] * b[k]; na += a[k] * a[k]; nb += b[k] * b[k]; }
  return dot / (Math.sqrt(na * nb) || 1);
}

async function embed(form) {
  const images = chosenImages();
  const data = await api("embed", { body: imageForm(images, { model: form.model.value }), files: images });
  const vectors = data.embeddings;
  const header = el("tr", {}, [el("th"), ...images.map((image) =>
    el("th", {}, [el("img", { attrs: { src: image.url, alt: image.file.name, title: image.file.name } })]))]);
  const rows = vectors.map((row, i) => el("tr", {}, [
    el("th", {}, [el("img", { attrs: { src: images[i].url, alt: images[i].file.name, title: images[i].file.name } })]),
    ...vectors.map((column) => {
      const similarity = cosine(row, column);
      const cell = el("td", { text: similarity.toFixed(3) });
      const strength = Math.max(similarity, 0);  // 0 (or below): pale, 1: deep blue
      cell.style.backgroundColor = `hsl(222, 65%, ${Math.round(96 - 56 * strength)}%)`;
      if (strength > 0.6) cell.classList.add("strong");
      return cell;
    }),
  ]));
  $("#embed-results").replaceChildren(
    el("p", { className: "hint", text: `${data.model} v${data.version}: ${data.dim}-d embeddings (${data.pooling} pooling); cosine similarity` }),
    el("table", { className: "similarity" }, [header, ...rows]));
}

// --- wiring --------------------------------------------------------------------------------------------------

const ACTIONS = { classify, attention, reconstruct, embed };

function showTab(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  for (const panel of document.querySelectorAll(".tab-panel")) panel.hidden = panel.id !== "tab-" + name;
}

function main() {
  setUpImageInput();
  for (const tab of document.querySelectorAll("[role=tab]")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  for (const form of document.querySelectorAll("form[data-task]")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const task = form.dataset.task;
      perform(`${task}: ${page.images.length} image(s)`, () => ACTIONS[task](form));
    });
  }
  const ratio = $("#tab-reconstruct input[name=mask_ratio]");
  ratio.addEventListener("input", () => { $("#mask-ratio-value").textContent = Number(ratio.value).toFixed(2); });
  ratio.addEventListener("change", () => { if (page.images.length) ratio.form.requestSubmit(); });
  $("#error-close").addEventListener("click", clearError);
  const key = $("#api-key");
  const useKey = () => {
    if (page.apiKey === key.value.trim()) return;
    page.apiKey = key.value.trim();
    loadModels();
  };
  key.addEventListener("change", useKey);
  $("#key-form").addEventListener("submit", (event) => {  // Enter in the field
    event.preventDefault();
    useKey();
  });
  loadModels();
}

main();
