// deepserve console: a client of the server's public REST API (KServe V2 / Triton HTTP), nothing private.
// Models: POST /v2/repository/index, GET /v2/models/{m}[/versions/{v}][/config]; training cards from
// /console/models/{m}/versions/{v}/card|curve. Try it: POST /v2/models/{m}/infer (classification extension, binary
// tensor data for .npy files), POST /v2/models/{m}/generate_stream (server-sent events). Watch: GET /v2/models/stats.

const TOKEN_KEY = "deepserve-token";
const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
  return e;
}

// --- the API ------------------------------------------------------------------------------------------------------
export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function serverMessage(r) {
  const text = await r.text();
  try { const doc = JSON.parse(text); if (doc && typeof doc.error === "string") return doc.error; } catch { /* not JSON */ }
  return text || `${r.status} ${r.statusText}`;
}

async function call(method, path, body, { headers = {}, signal } = {}) {
  const h = { ...headers };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h.authorization = `Bearer ${token}`;
  if (body !== undefined && !(body instanceof Blob)) { h["content-type"] = "application/json"; body = JSON.stringify(body); }
  const r = await fetch(path, { method, headers: h, body, signal });
  if (r.status === 401) {
    const message = await serverMessage(r);
    show(`The server needs a bearer token (${message}): enter it above.`);
    $("#token").focus();
    throw new ApiError(401, message);
  }
  if (!r.ok) throw new ApiError(r.status, await serverMessage(r));
  return r;
}

async function api(method, path, body, opts) {
  const r = await call(method, path, body, opts);
  const text = r.status === 204 ? "" : await r.text();
  return text ? JSON.parse(text) : null;
}

const enc = encodeURIComponent;
const modelPath = (m, v) => `/v2/models/${enc(m)}` + (v ? `/versions/${enc(v)}` : "");

function show(message, info = false) {
  const s = $("#status");
  s.textContent = message;
  s.className = info ? "info" : "";
}

function errorBox(where, exc) {
  return el("p", { class: "error", role: "alert", text: `${where}: ${exc.message}` });
}

// --- models ------------------------------------------------------------------------------------------------------
const models = new Map(); // name -> {name, versions: [{version, state, reason}], metadata, config, kind}

function dims(shape) { return `[${shape.map(Number).join(", ")}]`; }

function parameter(config, key) {
  const p = config?.parameters?.[key];
  return p ? p.string_value : undefined;
}

// What the Try panel offers, from the metadata and config alone (no model names are special).
function kindOf(md, config) {
  if (!md || !config) return "none";
  if (config.model_transaction_policy?.decoupled || parameter(config, "generation_text_input")) return "generate";
  if (parameter(config, "text_input")) return "text";
  const ins = md.inputs, outs = md.outputs;
  const fp = (t) => t.datatype === "FP32";
  const shape = (t) => t.shape.map(Number).slice(1).join("x");
  if (ins.length === 1 && fp(ins[0]) && ["1x8x8", "8x8"].includes(shape(ins[0])) &&
      outs.some((o) => o.shape.length === 2)) return "digits";
  const z = ins.find((t) => fp(t) && t.shape.length === 2);
  const label = ins.find((t) => t.datatype === "INT64" && t.shape.length <= 2);
  if (ins.length === 2 && z && label && outs.some((o) => fp(o) && o.shape.length >= 3)) return "sampler";
  return "tensors";
}

const KIND_NAMES = { digits: "draw a digit", text: "text classifier", sampler: "conditional image sampler",
  generate: "text generation (streamed)", tensors: "tensors (JSON or .npy)", none: "not ready" };

async function loadModels() {
  const box = $("#models");
  let index;
  try {
    const [server, entries] = await Promise.all([api("GET", "/v2"), api("POST", "/v2/repository/index", {})]);
    $("#server").textContent = server.version;
    index = entries;
  } catch (exc) {
    box.replaceChildren(errorBox("Models", exc));
    return;
  }
  show("");
  models.clear();
  for (const e of index) {
    if (!models.has(e.name)) models.set(e.name, { name: e.name, versions: [] });
    models.get(e.name).versions.push({ version: e.version || "", state: e.state || "", reason: e.reason || "" });
  }
  await Promise.all([...models.values()].map(async (m) => {
    const ready = m.versions.filter((v) => v.state === "READY" && v.version).map((v) => Number(v.version));
    if (!ready.length) return;
    const v = String(Math.max(...ready));
    try {
      [m.metadata, m.config] = await Promise.all([api("GET", modelPath(m.name, v)),
        api("GET", modelPath(m.name, v) + "/config")]);
      m.version = v;
    } catch (exc) { m.error = exc; }
  }));
  for (const m of models.values()) m.kind = kindOf(m.metadata, m.config);
  box.replaceChildren(...[...models.values()].map(modelCard));
  if (!models.size) box.append(el("p", { text: "The repository has no model." }));
  fillTrySelect();
}

function stateBadge(state) {
  return el("span", { class: `badge ${state || "NOT-LOADED"}`, text: state || "NOT LOADED" });
}

function tensorTable(caption, tensors, config, key) {
  const labelled = new Map((config?.[key] || []).map((t) => [t.name, t.label_filename]));
  return el("table", {}, el("caption", { class: "muted", text: caption }),
    el("tr", {}, el("th", { text: "name" }), el("th", { text: "datatype" }), el("th", { text: "shape" })),
    tensors.map((t) => el("tr", {}, el("td", { text: t.name + (labelled.get(t.name) ? ` (labels: ${labelled.get(t.name)})` : "") }),
      el("td", { text: t.datatype }), el("td", { text: dims(t.shape) }))));
}

function modelCard(m) {
  const overall = m.metadata ? "READY" : (m.versions.find((v) => v.state && v.state !== "READY")?.state || "");
  const card = el("article", { class: "model", id: `model-${m.name}`, "data-model": m.name },
    el("h3", {}, `${m.name} `, stateBadge(overall)));
  const versions = el("ul", { class: "versions" });
  for (const v of m.versions) {
    versions.append(el("li", { "data-version": v.version },
      v.version ? `version ${v.version} ` : "model ", stateBadge(v.state),
      v.reason ? [" ", el("span", { class: "reason", text: v.reason })] : null));
  }
  card.append(versions);
  if (m.error) card.append(errorBox("Metadata", m.error));
  if (m.metadata && m.config) {
    const c = m.config;
    card.append(el("dl", { class: "facts" },
      el("dt", { text: "platform" }), el("dd", { text: c.platform || m.metadata.platform }),
      el("dt", { text: "execution provider" }), el("dd", { class: "provider", text: parameter(c, "execution_providers") || "?" }),
      el("dt", { text: "max batch size" }), el("dd", { text: String(c.max_batch_size || 0) }),
      el("dt", { text: "serving" }), el("dd", { text: `version ${m.version} (of ${m.metadata.versions.join(", ")})` }),
      el("dt", { text: "try it" }), el("dd", {}, el("a", { href: `#try/${enc(m.name)}`, text: KIND_NAMES[m.kind] }))));
    card.append(tensorTable("inputs", m.metadata.inputs, c, "input"), tensorTable("outputs", m.metadata.outputs, c, "output"));
  }
  for (const v of m.versions.filter((x) => x.version)) {
    const details = el("details", { class: "card" }, el("summary", { text: `Training card, version ${v.version}` }));
    details.addEventListener("toggle", () => { if (details.open && !details.dataset.loaded) loadCard(details, m.name, v.version); });
    card.append(details);
  }
  return card;
}

function facts(obj) {
  const dl = el("dl", { class: "facts" });
  for (const [k, v] of Object.entries(obj || {})) {
    if (v === null || typeof v === "object") continue;
    dl.append(el("dt", { text: k }), el("dd", { text: typeof v === "number" ? String(+v.toPrecision(6)) : String(v) }));
  }
  return dl;
}

async function loadCard(details, name, version) {
  details.dataset.loaded = "1";
  const base = `/console/models/${enc(name)}/versions/${enc(version)}`;
  try {
    const card = await api("GET", `${base}/card`);
    if (!card) { details.append(el("p", { class: "muted", text: "No training card: this version was not published by a training job." })); return; }
    const data = card.data || {};
    details.append(el("p", {}, `${card.job || name}: ${card.task || ""}; data ${data.name || "?"}`,
      data.samples ? `, ${data.samples} samples` : ""));
    if (card.test) details.append(el("h3", { text: "Test" }), facts(card.test));
    if (card.parity) details.append(el("h3", { text: "Export parity (torch vs onnxruntime)" }), facts(card.parity));
    const spec = card.spec || {};
    if (spec.model || spec.train) details.append(el("details", {}, el("summary", { text: "Hyper-parameters" }), facts(spec.model), facts(spec.train)));
    const r = await call("GET", `${base}/curve`);
    if (r.status === 200) {
      const img = el("img", { alt: `Training curve of ${name} version ${version}`, class: "curve" });
      img.src = URL.createObjectURL(await r.blob());
      details.append(img);
    }
  } catch (exc) { details.append(errorBox("Training card", exc)); }
}

// --- try it -----------------------------------------------------------------------------------------------------
function fillTrySelect() {
  const sel = $("#try-model");
  const ready = [...models.values()].filter((m) => m.metadata);
  sel.replaceChildren(...ready.map((m) => el("option", { value: m.name, text: `${m.name} (${KIND_NAMES[m.kind]})` })));
  if (location.hash.startsWith("#try")) route();
}

function renderTry(name) {
  const m = models.get(name);
  const box = $("#try");
  if (!m || !m.metadata) { box.replaceChildren(el("p", { text: models.size ? "Pick a ready model." : "Loading models…" })); return; }
  $("#try-model").value = name;
  const panels = { digits: digitsPanel, text: textPanel, sampler: samplerPanel, generate: generatePanel };
  const special = panels[m.kind];
  box.replaceChildren(special ? special(m) : tensorsPanel(m, true));
  if (special) box.append(el("details", { class: "panel" }, el("summary", { text: "Raw request: JSON or .npy inputs" }), tensorsPanel(m, false)));
}

// The output a classification is asked of: the one with labels, else probabilities, else the first [B, C] output.
function classOutput(m) {
  const outs = m.metadata.outputs.filter((o) => o.shape.length === 2);
  const labelled = (m.config.output || []).find((o) => o.label_filename && outs.some((x) => x.name === o.name));
  return (labelled && labelled.name) || (outs.find((o) => /prob/.test(o.name)) || outs[0]).name;
}

async function classify(m, inputs, k, resultBox) {
  const output = classOutput(m);
  try {
    const reply = await api("POST", modelPath(m.name) + "/infer",
      { inputs, outputs: [{ name: output, parameters: { classification: k } }] });
    const top = reply.outputs[0].data.map((s) => { const [score, index, ...label] = s.split(":"); return { score: +score, index: +index, label: label.join(":") }; });
    const max = Math.max(...top.map((t) => Math.abs(t.score)), 1e-9);
    resultBox.replaceChildren(el("p", { class: "muted", text: `top ${top.length} of ${output}, version ${reply.model_version}` }),
      el("ol", { class: "top" }, top.map((t, i) => el("li", { class: i === 0 ? "best" : null, "data-index": t.index },
        el("strong", { class: "label", text: t.label || String(t.index) }), ` ${t.score.toFixed(4)}`,
        meter(Math.abs(t.score) / max)))));
  } catch (exc) { resultBox.replaceChildren(errorBox("Inference", exc)); }
}

function meter(fraction) {
  const m = el("span", { class: "meter" });
  m.style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
  return m;
}

// Drawing: a 32x32 bitmap, summed in 4x4 blocks to 8x8 counts 0..16, as the UCI optdigits scans behind
// scikit-learn's load_digits were made; the training job divides those counts by 16 (training/data.py), so do we.
const GRID = 32;

class Drawing {
  constructor(canvas, onChange) {
    this.canvas = canvas; this.onChange = onChange;
    this.bits = new Uint8Array(GRID * GRID);
    this.brush = 2; this.cursor = [16, 16]; this.last = null;
    canvas.width = canvas.height = GRID * 8;
    canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); this.last = this.at(e); this.dab(...this.last); this.draw(); });
    canvas.addEventListener("pointermove", (e) => { if (!this.last) return; const p = this.at(e); this.line(this.last, p); this.last = p; this.draw(); });
    const end = () => { if (this.last) { this.last = null; this.onChange(); } };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    canvas.addEventListener("keydown", (e) => this.key(e));
    this.draw();
  }
  at(e) { const r = this.canvas.getBoundingClientRect(); return [(e.clientX - r.left) / r.width * GRID, (e.clientY - r.top) / r.height * GRID]; }
  dab(x, y) {
    if (this.brush < 1) { const i = Math.floor(y), j = Math.floor(x); if (i >= 0 && i < GRID && j >= 0 && j < GRID) this.bits[i * GRID + j] = 1; return; }
    const r = this.brush;
    for (let i = Math.floor(y - r); i <= Math.ceil(y + r); i++) for (let j = Math.floor(x - r); j <= Math.ceil(x + r); j++) {
      if (i < 0 || i >= GRID || j < 0 || j >= GRID) continue;
      if ((j + 0.5 - x) ** 2 + (i + 0.5 - y) ** 2 <= r * r + 1e-9) this.bits[i * GRID + j] = 1;
    }
  }
  line([x0, y0], [x1, y1]) {
    const steps = Math.max(1, Math.ceil(Math.hypot(x1 - x0, y1 - y0) * 4));
    for (let s = 1; s <= steps; s++) this.dab(x0 + (x1 - x0) * s / steps, y0 + (y1 - y0) * s / steps);
  }
  key(e) {  // keyboard drawing: arrows move the cursor, space or enter paints under it
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (moves[e.key]) {
      const [dx, dy] = moves[e.key];
      this.cursor = [Math.max(0, Math.min(GRID - 1, this.cursor[0] + dx)), Math.max(0, Math.min(GRID - 1, this.cursor[1] + dy))];
      if (e.shiftKey) this.dab(this.cursor[0] + 0.5, this.cursor[1] + 0.5);
    } else if (e.key === " " || e.key === "Enter") this.dab(this.cursor[0] + 0.5, this.cursor[1] + 0.5);
    else return;
    e.preventDefault(); this.draw(true);
    if (e.key === " " || e.key === "Enter" || e.shiftKey) this.onChange();
  }
  clear() { this.bits.fill(0); this.draw(); }
  draw(withCursor = false) {
    const g = this.canvas.getContext("2d");
    g.fillStyle = "#fff"; g.fillRect(0, 0, this.canvas.width, this.canvas.height);
    g.fillStyle = "#1b1f24";
    for (let i = 0; i < GRID; i++) for (let j = 0; j < GRID; j++) if (this.bits[i * GRID + j]) g.fillRect(j * 8, i * 8, 8, 8);
    g.strokeStyle = "#e3e7ec";
    for (let k = 32; k < GRID * 8; k += 32) { g.beginPath(); g.moveTo(k, 0); g.lineTo(k, GRID * 8); g.moveTo(0, k); g.lineTo(GRID * 8, k); g.stroke(); }
    if (withCursor) { g.strokeStyle = "#f0b429"; g.lineWidth = 2; g.strokeRect(this.cursor[0] * 8, this.cursor[1] * 8, 8, 8); g.lineWidth = 1; }
  }
  empty() { return !this.bits.some((b) => b); }
  // The drawing scaled (nearest neighbour) so its longer side fills the box, centred, as the scans were normalised.
  fitted() {
    let r0 = GRID, r1 = -1, c0 = GRID, c1 = -1;
    for (let i = 0; i < GRID; i++) for (let j = 0; j < GRID; j++) if (this.bits[i * GRID + j]) {
      r0 = Math.min(r0, i); r1 = Math.max(r1, i); c0 = Math.min(c0, j); c1 = Math.max(c1, j);
    }
    if (r1 < 0) return this.bits;
    const h = r1 - r0 + 1, w = c1 - c0 + 1, s = GRID / Math.max(h, w);
    const oy = (GRID - h * s) / 2, ox = (GRID - w * s) / 2, out = new Uint8Array(GRID * GRID);
    for (let i = 0; i < GRID; i++) for (let j = 0; j < GRID; j++) {
      const si = Math.floor((i + 0.5 - oy) / s), sj = Math.floor((j + 0.5 - ox) / s);
      if (si >= 0 && si < h && sj >= 0 && sj < w) out[i * GRID + j] = this.bits[(r0 + si) * GRID + c0 + sj];
    }
    return out;
  }
  counts(fit) {
    const bits = fit ? this.fitted() : this.bits, out = new Array(64).fill(0);
    for (let i = 0; i < GRID; i++) for (let j = 0; j < GRID; j++) out[(i >> 2) * 8 + (j >> 2)] += bits[i * GRID + j];
    return out;
  }
}

function drawPixels(canvas, values, h, w) {  // values in [0, 1], ink dark on white
  canvas.width = w; canvas.height = h;
  const g = canvas.getContext("2d"), img = g.createImageData(w, h);
  for (let k = 0; k < h * w; k++) {
    const v = 255 - Math.round(Math.max(0, Math.min(1, values[k])) * 255);
    img.data.set([v, v, v, 255], k * 4);
  }
  g.putImageData(img, 0, 0);
}

function digitsPanel(m) {
  const input = m.metadata.inputs[0];
  const canvas = el("canvas", { class: "draw", tabindex: "0", "aria-label": "Drawing area: draw with the mouse, a finger, or the arrow keys and space" });
  const preview = el("canvas", { class: "pixels preview", "aria-label": "What the model receives: 8x8 values 0 to 16" });
  const result = el("div", { class: "result", "aria-live": "polite" });
  const fit = el("input", { type: "checkbox", id: "fit", checked: true });
  const brush = el("select", { id: "brush" }, el("option", { value: "2", text: "thick pen" }), el("option", { value: "0", text: "fine pen" }));
  let drawing;
  const run = () => {
    const counts = drawing.counts(fit.checked);
    drawPixels(preview, counts.map((c) => c / 16), 8, 8);
    preview.dataset.counts = counts.join(",");
    if (drawing.empty()) { result.replaceChildren(el("p", { class: "muted", text: "Draw a digit." })); return; }
    const shape = [1, ...input.shape.slice(1).map(Number)];
    classify(m, [{ name: input.name, datatype: "FP32", shape, data: counts.map((c) => c / 16) }], Math.min(3, classCount(m)), result);
  };
  drawing = new Drawing(canvas, run);
  brush.addEventListener("change", () => { drawing.brush = Number(brush.value); });
  fit.addEventListener("change", run);
  run();
  return el("div", { class: "panel digits" }, el("p", { class: "muted", text: "Draw a digit; it is sampled to 8x8 like scikit-learn's load_digits (counts 0..16 of a 32x32 bitmap, divided by 16)." }),
    el("div", { class: "row" }, canvas, el("div", {},
      el("div", { class: "controls" }, el("button", { type: "button", class: "plain", onclick: () => { drawing.clear(); run(); }, text: "Clear" }), brush,
        el("label", {}, fit, " fit to the box")),
      el("p", { class: "muted" }, "Sent: "), preview, result)));
}

function classCount(m) {
  const out = m.metadata.outputs.find((o) => o.name === classOutput(m));
  const n = Number(out.shape[1]);
  return n > 0 ? n : 3;
}

function textPanel(m) {
  const name = parameter(m.config, "text_name") || "text";
  const area = el("textarea", { id: "text", "aria-label": "Text to classify", placeholder: "Type a sentence…" });
  const result = el("div", { class: "result", "aria-live": "polite" });
  let timer;
  const run = () => {
    if (!area.value.trim()) { result.replaceChildren(); return; }
    classify(m, [{ name, datatype: "BYTES", shape: [1, 1], data: [area.value] }], Math.min(3, classCount(m)), result);
  };
  area.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(run, 300); });
  return el("div", { class: "panel text" }, el("p", { class: "muted", text: "Type text: the server encodes it as the model's training job did." }),
    area, el("div", { class: "controls" }, el("button", { type: "button", onclick: run, text: "Identify" })), result);
}

function gaussian(n) {  // Box-Muller
  const out = new Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - Math.random())), t = 2 * Math.PI * Math.random();
    out[i] = r * Math.cos(t); if (i + 1 < n) out[i + 1] = r * Math.sin(t);
  }
  return out;
}

function samplerPanel(m) {
  const ins = m.metadata.inputs;
  const z = ins.find((t) => t.datatype === "FP32"), labelIn = ins.find((t) => t.datatype === "INT64");
  const out = m.metadata.outputs.find((o) => o.datatype === "FP32" && o.shape.length >= 3);
  const latent = Number(z.shape[1]);
  const label = el("input", { type: "number", id: "label", min: "0", value: "0", "aria-label": "Label" });
  const count = el("input", { type: "number", id: "count", min: "1", max: "64", value: "8", "aria-label": "Samples" });
  const result = el("div", { class: "result", "aria-live": "polite" });
  const run = async () => {
    const n = Math.max(1, Math.min(64, Number(count.value) || 1));
    const lab = Math.trunc(Number(label.value) || 0);
    try {
      const reply = await api("POST", modelPath(m.name) + "/infer", {
        inputs: [{ name: z.name, datatype: "FP32", shape: [n, latent], data: gaussian(n * latent) },
          { name: labelIn.name, datatype: "INT64", shape: labelIn.shape.length === 2 ? [n, 1] : [n], data: new Array(n).fill(lab) }],
        outputs: [{ name: out.name }] });
      const o = reply.outputs[0], [h, w] = o.shape.slice(-2), size = h * w;
      result.replaceChildren(el("div", { class: "samples" }, Array.from({ length: n }, (_, i) => {
        const c = el("canvas", { class: "pixels sample", role: "img", "aria-label": `sample ${i + 1} of label ${lab}` });
        drawPixels(c, o.data.slice(i * size, (i + 1) * size), h, w);
        return c;
      })));
    } catch (exc) { result.replaceChildren(errorBox("Inference", exc)); }
  };
  return el("div", { class: "panel sampler" }, el("p", { class: "muted", text: `Pick a label; each sample draws ${latent} latent values from N(0, 1).` }),
    el("div", { class: "controls" }, el("label", {}, "label ", label), el("label", {}, "samples ", count),
      el("button", { type: "button", onclick: run, text: "Sample" })), result);
}

// Triton's generate extension over server-sent events: one `data: {json}` event per piece of text.
async function* generateStream(model, text, maxTokens, signal) {
  let r;
  try {
    r = await call("POST", modelPath(model) + "/generate_stream", { text_input: text, parameters: { max_tokens: maxTokens } },
      { headers: { accept: "text/event-stream" }, signal });
  } catch (exc) {
    if (exc.status === 404 || exc.status === 501) {
      throw new ApiError(exc.status, `this server does not offer streamed generation (POST /v2/models/{model}/generate_stream answered ${exc.status}: ${exc.message})`);
    }
    throw exc;
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(500, event.error);
      yield event;
    }
  }
}

function generatePanel(m) {
  const prompt = el("textarea", { id: "prompt", "aria-label": "Prompt", placeholder: "Type a prompt…" });
  const maxTokens = el("input", { type: "number", id: "max-tokens", min: "1", value: parameter(m.config, "generation_default_max_tokens") || "64", "aria-label": "Maximum tokens" });
  const out = el("pre", { class: "out generated", "aria-live": "polite" });
  const note = el("div", { class: "result" });
  const go = el("button", { type: "button", text: "Generate" }), stop = el("button", { type: "button", class: "plain", text: "Stop", disabled: true });
  let controller;
  go.addEventListener("click", async () => {
    controller = new AbortController();
    out.textContent = ""; note.replaceChildren(); go.disabled = true; stop.disabled = false;
    try {
      for await (const event of generateStream(m.name, prompt.value, Number(maxTokens.value) || 1, controller.signal)) out.textContent += event.text_output ?? "";
      note.replaceChildren(el("p", { class: "muted done", text: "done" }));
    } catch (exc) {
      note.replaceChildren(exc.name === "AbortError" ? el("p", { class: "muted", text: "stopped" }) : errorBox("Generation", exc));
    } finally { go.disabled = false; stop.disabled = true; }
  });
  stop.addEventListener("click", () => controller?.abort());
  return el("div", { class: "panel generate" }, prompt,
    el("div", { class: "controls" }, el("label", {}, "max tokens ", maxTokens), go, stop), out, note);
}

// .npy files (NumPy format 1.0-3.0): the header is a Python dict literal; little-endian, C order only.
const NPY_TYPES = { b1: "BOOL", u1: "UINT8", u2: "UINT16", u4: "UINT32", u8: "UINT64", i1: "INT8", i2: "INT16",
  i4: "INT32", i8: "INT64", f2: "FP16", f4: "FP32", f8: "FP64" };

export function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];
  if (bytes.length < 10 || magic.some((b, i) => bytes[i] !== b)) throw new Error("not a .npy file (no \\x93NUMPY magic)");
  const major = bytes[6], view = new DataView(buffer);
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true), start = major === 1 ? 10 : 12;
  const header = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']*)'/.exec(header), order = /'fortran_order':\s*(True|False)/.exec(header),
    shape = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !order || !shape) throw new Error(`cannot read the .npy header ${header.trim()}`);
  if (order[1] === "True") throw new Error("Fortran-ordered arrays are not supported: save with np.ascontiguousarray");
  const [, endian, code] = /^([<>|=]?)(.*)$/.exec(descr[1]);
  if (endian === ">") throw new Error(`big-endian dtype ${descr[1]}: save it as little-endian`);
  const datatype = NPY_TYPES[code];
  if (!datatype) throw new Error(`dtype ${descr[1]} has no tensor datatype here (strings and objects are not supported)`);
  const dims = shape[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  return { datatype, shape: dims, data: bytes.subarray(start + headerLength) };
}

function template(m) {
  const skip = parameter(m.config, "text_input");
  return { inputs: m.metadata.inputs.filter((t) => t.name !== skip).map((t) => {
    const shape = t.shape.map((d) => (Number(d) < 0 ? 1 : Number(d)));
    const n = shape.reduce((a, b) => a * b, 1);
    return { name: t.name, datatype: t.datatype, shape, data: new Array(n).fill(t.datatype === "BYTES" ? "" : t.datatype === "BOOL" ? false : 0) };
  }) };
}

function tensorsPanel(m, open) {
  const area = el("textarea", { class: "request", "aria-label": "Request body (JSON)", spellcheck: "false" });
  area.value = JSON.stringify(template(m), null, 1);
  const files = new Map();
  const fileInputs = m.metadata.inputs.map((t) => {
    const f = el("input", { type: "file", accept: ".npy", "data-input": t.name, "aria-label": `.npy file for input ${t.name}` });
    const info = el("span", { class: "muted" });
    f.addEventListener("change", async () => {
      if (!f.files.length) { files.delete(t.name); info.textContent = ""; return; }
      try {
        const npy = parseNpy(await f.files[0].arrayBuffer());
        files.set(t.name, npy);
        info.textContent = ` ${npy.datatype} ${dims(npy.shape)}, ${npy.data.length} bytes (sent as binary tensor data)`;
      } catch (exc) { files.delete(t.name); info.textContent = ` ${exc.message}`; }
    });
    return el("div", {}, el("label", {}, `${t.name} (.npy) `, f), info);
  });
  const result = el("div", { class: "result", "aria-live": "polite" });
  const run = async () => {
    let doc;
    try { doc = JSON.parse(area.value); } catch (exc) { result.replaceChildren(errorBox("Request JSON", exc)); return; }
    doc.inputs = Array.isArray(doc.inputs) ? doc.inputs : [];
    const tail = [];
    for (const [name, npy] of files) {
      const entry = { name, datatype: npy.datatype, shape: npy.shape, parameters: { binary_data_size: npy.data.length } };
      const i = doc.inputs.findIndex((t) => t.name === name);
      if (i >= 0) doc.inputs[i] = entry; else doc.inputs.push(entry);
    }
    for (const t of doc.inputs) if (files.has(t.name)) tail.push(files.get(t.name).data);
    try {
      let reply;
      if (tail.length) {
        const head = new TextEncoder().encode(JSON.stringify(doc));
        reply = await api("POST", modelPath(m.name) + "/infer", new Blob([head, ...tail], { type: "application/octet-stream" }),
          { headers: { "inference-header-content-length": String(head.length) } });
      } else reply = await api("POST", modelPath(m.name) + "/infer", doc);
      result.replaceChildren(...reply.outputs.map((o) => el("div", { class: "output", "data-output": o.name },
        el("h3", { text: `${o.name}: ${o.datatype} ${dims(o.shape)}` }),
        el("pre", { class: "out", text: JSON.stringify(o.data.length > 1000 ? [...o.data.slice(0, 1000), `… ${o.data.length - 1000} more`] : o.data) }))));
    } catch (exc) { result.replaceChildren(errorBox("Inference", exc)); }
  };
  return el("div", { class: open ? "panel tensors" : "tensors" },
    el("p", { class: "muted", text: "Edit the request (KServe V2 JSON), or give inputs as .npy files." }),
    area, fileInputs, el("div", { class: "controls" }, el("button", { type: "button", class: "run", onclick: run, text: "Run" })), result);
}

// --- watch --------------------------------------------------------------------------------------------------------
const WINDOW_MS = 10000, HISTORY_MS = 120000;
let samples = [], pollTimer = null;

async function poll() {
  try {
    const doc = await api("GET", "/v2/models/stats");
    samples.push({ t: performance.now(), stats: new Map(doc.model_stats.map((s) => [`${s.name}:${s.version}`, s])) });
    samples = samples.filter((s) => s.t >= samples[samples.length - 1].t - HISTORY_MS);
    renderWatch();
  } catch (exc) { $("#watch tbody").replaceChildren(el("tr", {}, el("td", { colspan: "10" }, errorBox("Statistics", exc)))); }
}

function sampleBefore(t) {  // the newest sample at least `t` ms old, else the oldest
  for (let i = samples.length - 1; i >= 0; i--) if (samples[i].t <= t) return samples[i];
  return samples[0];
}

const ms = (ns, count) => (count > 0 ? `${(ns / count / 1e6).toFixed(2)} ms` : "–");

function renderWatch() {
  const now = samples[samples.length - 1], then = sampleBefore(now.t - WINDOW_MS), dt = (now.t - then.t) / 1000;
  const rows = [];
  for (const [key, s] of [...now.stats].sort()) {
    const p = then.stats.get(key) || null, is = s.inference_stats, ps = p?.inference_stats;
    const d = (f) => f(is) - (ps ? f(ps) : 0);
    const ok = d((x) => x.success.count), okNs = d((x) => x.success.ns);
    const computeCount = d((x) => x.compute_infer.count);
    const computeNs = d((x) => x.compute_input.ns + x.compute_infer.ns + x.compute_output.ns);
    const before = new Map((p?.batch_stats || []).map((b) => [b.batch_size, b.compute_infer.count]));
    const batches = (s.batch_stats || []).map((b) => [b.batch_size, b.compute_infer.count - (before.get(b.batch_size) || 0)]).filter(([, n]) => n > 0);
    const rate = dt > 0 && p ? ok / dt : null;
    const history = samples.map((x) => x.stats.get(key)?.inference_stats.success.count ?? 0);
    rows.push(el("tr", { "data-model": s.name, "data-version": s.version },
      el("th", { scope: "row", text: `${s.name} v${s.version}` }),
      el("td", { class: "num rate", text: rate === null ? "…" : rate.toFixed(1) }),
      el("td", { class: "num latency", text: ms(okNs, ok) }),
      el("td", { class: "num queue", text: ms(d((x) => x.queue.ns), d((x) => x.queue.count)) }),
      el("td", { class: "num compute", text: ms(computeNs, computeCount) }),
      el("td", { class: "batches" }, batchBars(batches)),
      el("td", { class: "num total", text: String(is.success.count) }),
      el("td", { class: "num failed", text: String(is.fail.count) }),
      el("td", { class: "num mean-batch", text: s.execution_count ? (s.inference_count / s.execution_count).toFixed(2) : "–" }),
      el("td", {}, sparkline(history, samples.map((x) => x.t)))));
  }
  $("#watch tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "10", text: "No model version is serving." }))]));
}

function batchBars(batches) {
  if (!batches.length) return el("span", { class: "muted", text: "idle" });
  const max = Math.max(...batches.map(([, n]) => n));
  const bars = el("span", { class: "bars", role: "img", "aria-label": batches.map(([b, n]) => `${n} runs of batch ${b}`).join(", ") },
    batches.map(([b, n]) => { const s = el("span", { title: `batch ${b}: ${n} runs` }); s.style.height = `${Math.max(4, n / max * 100)}%`; return s; }));
  return el("span", {}, bars, el("span", { class: "muted", text: batches.map(([b, n]) => `${b}×${n}`).join(" ") }));
}

function sparkline(counts, times) {  // requests per second between consecutive samples
  const rates = counts.slice(1).map((c, i) => Math.max(0, c - counts[i]) / Math.max(1e-3, (times[i + 1] - times[i]) / 1000));
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark"); svg.setAttribute("viewBox", "0 0 100 20"); svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img"); svg.setAttribute("aria-label", rates.length ? `peak ${Math.max(...rates).toFixed(1)} req/s` : "no data yet");
  if (rates.length > 1) {
    const max = Math.max(...rates, 1e-9);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", rates.map((r, i) => `${(i / (rates.length - 1) * 100).toFixed(1)},${(19 - r / max * 18).toFixed(1)}`).join(" "));
    svg.append(line);
  }
  return svg;
}

function watch(on) {
  clearInterval(pollTimer); pollTimer = null;
  if (!on) return;
  samples = [];
  poll();
  pollTimer = setInterval(poll, Number($("#interval").value));
}

// --- views ---------------------------------------------------------------------------------------------------------
function route() {
  const [view, arg] = (location.hash.slice(1) || "models").split("/");
  const name = ["models", "try", "watch"].includes(view) ? view : "models";
  for (const v of ["models", "try", "watch"]) {
    $(`#view-${v}`).hidden = v !== name;
    const tab = $(`#tab-${v}`);
    if (v === name) tab.setAttribute("aria-current", "page"); else tab.removeAttribute("aria-current");
  }
  if (name === "try") renderTry(arg ? decodeURIComponent(arg) : $("#try-model").value);
  watch(name === "watch" && !document.hidden);
}

function init() {
  const token = $("#token");
  token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("#auth").addEventListener("submit", (e) => {
    e.preventDefault();
    if (token.value) sessionStorage.setItem(TOKEN_KEY, token.value.trim()); else sessionStorage.removeItem(TOKEN_KEY);
    show("");
    loadModels();
  });
  $("#refresh").addEventListener("click", loadModels);
  $("#try-model").addEventListener("change", (e) => { location.hash = `#try/${enc(e.target.value)}`; });
  $("#interval").addEventListener("change", () => route());
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => watch(!document.hidden && location.hash.startsWith("#watch")));
  route();
  loadModels();
}

init();
