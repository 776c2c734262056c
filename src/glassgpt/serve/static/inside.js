// The inside page: POST /api/inspect, then the tokens, a bar chart of the next-token
// probabilities and a heatmap of the chosen block's and head's attention weights; below them a tab
// per view (inside_views.js draws each), fetched when its tab is opened: the views of the page's text
// from /api/inspect's "views", patching from /api/patch, the embedding map from /api/inspect on the
// tab's own list of tokens. The open tab lives in the URL's #fragment, so /learn can link to a view.
"use strict";

const { el, visible } = glassgpt;
const form = document.getElementById("inspect-form");
const layerSelect = document.getElementById("layer");
const headSelect = document.getElementById("head");
const canvas = document.getElementById("heatmap");
const tooltip = document.getElementById("tooltip");
let current = null;  // the last /api/inspect answer
let lookedAt = null;  // the text it was for: the views of the text below are of this text

function showTokens(tokens) {
  document.getElementById("tokens").replaceChildren(...tokens.map((t) =>
    el("span", { class: "token", title: `id ${t.id}` }, visible(t.text), el("small", { text: String(t.id) }))));
}

function showNext(next) {
  const top = next[0].prob;
  document.getElementById("next").replaceChildren(...next.map((t) => el("div", { class: "bar" },
    el("span", { class: "word", text: visible(t.text), title: `id ${t.id}` }),
    el("span", { class: "track" }, el("span", { class: "fill", style: `display:block; width:${Math.max(0.5, 100 * t.prob / top)}%` })),
    el("span", { class: "pct", text: glassgpt.percent(t.prob) }))));
}

// Blocks and heads are numbered from 0, as everywhere else (/learn, `glassgpt inspect`, the code).
function fillSelect(select, count, label, keep) {
  const options = Array.from({ length: count }, (_, i) => el("option", { value: String(i), text: `${label} ${i}` }));
  if (label === "head") options.push(el("option", { value: "mean", text: "mean of all heads" }));
  select.replaceChildren(...options);
  if (keep !== null && [...select.options].some((o) => o.value === keep)) select.value = keep;
}

function weightsShown() {
  const layer = current.attention[Number(layerSelect.value)];
  if (headSelect.value !== "mean") return layer[Number(headSelect.value)];
  return layer[0].map((row, i) => row.map((_, j) => layer.reduce((sum, head) => sum + head[i][j], 0) / layer.length));
}

function cssColor(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function drawHeatmap() {
  const weights = weightsShown();
  const labels = current.tokens.map((t) => visible(t.text).slice(0, 12));
  const n = labels.length;
  const context = canvas.getContext("2d");
  context.font = "12px ui-monospace, Menlo, Consolas, monospace";
  const margin = Math.ceil(Math.max(...labels.map((l) => context.measureText(l).width))) + 10;
  const room = Math.max(160, (canvas.parentElement.clientWidth || 600) - margin - 4);
  const cell = Math.max(10, Math.min(44, Math.floor(room / n)));
  const scale = window.devicePixelRatio || 1;
  const width = margin + n * cell + 2, height = margin + n * cell + 2;
  canvas.width = width * scale;
  canvas.height = height * scale;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  context.setTransform(scale, 0, 0, scale, 0, 0);
  context.font = "12px ui-monospace, Menlo, Consolas, monospace";
  context.clearRect(0, 0, width, height);

  const ink = cssColor("--ink"), muted = cssColor("--line");
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const x = margin + j * cell, y = margin + i * cell;
      if (j > i) {
        context.fillStyle = muted;
      } else {
        // sqrt: small weights stay visible next to a dominant one.
        context.fillStyle = `rgba(59, 91, 219, ${Math.sqrt(weights[i][j]).toFixed(3)})`;
      }
      context.fillRect(x, y, cell - 1, cell - 1);
    }
  }
  context.fillStyle = ink;
  context.textBaseline = "middle";
  context.textAlign = "right";
  labels.forEach((label, i) => context.fillText(label, margin - 6, margin + i * cell + cell / 2));
  context.save();
  context.textAlign = "left";
  labels.forEach((label, j) => {
    context.save();
    context.translate(margin + j * cell + cell / 2, margin - 6);
    context.rotate(-Math.PI / 2);
    context.fillText(label, 0, 0);
    context.restore();
  });
  context.restore();
  canvas.dataset.drawn = `${layerSelect.value}/${headSelect.value}/${n}`;
  canvas.dataset.margin = String(margin);
  canvas.dataset.cell = String(cell);
}

canvas.addEventListener("mousemove", (event) => {
  if (!current) return;
  const margin = Number(canvas.dataset.margin), cell = Number(canvas.dataset.cell);
  const box = canvas.getBoundingClientRect();
  const j = Math.floor((event.clientX - box.left - margin) / cell);
  const i = Math.floor((event.clientY - box.top - margin) / cell);
  const n = current.tokens.length;
  if (i < 0 || j < 0 || i >= n || j >= n) { tooltip.textContent = ""; return; }
  const w = weightsShown()[i][j];
  tooltip.textContent = `"${visible(current.tokens[i].text)}" → "${visible(current.tokens[j].text)}": ` +
    (j > i ? "masked (future)" : w.toFixed(4));
});

async function inspect() {
  const errorBox = document.getElementById("error");
  const button = document.getElementById("look");
  const text = document.getElementById("text").value;
  errorBox.textContent = "";
  if (!text) { errorBox.textContent = "Type a text first."; return; }
  button.disabled = true;
  try {
    current = await glassgpt.json("/api/inspect", { text });
    lookedAt = text;
    showTokens(current.tokens);
    showNext(current.next_tokens);
    const layer = layerSelect.value || null, head = headSelect.value || null;
    fillSelect(layerSelect, current.n_layers, "block", layer);
    fillSelect(headSelect, current.n_heads, "head", head);
    drawHeatmap();
  } catch (error) {
    errorBox.textContent = error.message;
  } finally {
    button.disabled = false;
  }
  showView(openTab());
}

// ---------------------------------------------------------------- the tabs of views

const tabs = [...document.querySelectorAll("#tabs [role=tab]")];
const TEXT_VIEWS = { "logit-lens": "logitLens", residual: "residual", heads: "heads", neurons: "neurons" };
const pending = {};  // view -> the request whose answer its panel waits for (a newer one wins)

function openTab() {
  const name = decodeURIComponent(window.location.hash.slice(1));
  return tabs.some((t) => t.dataset.view === name) ? name : "attention";
}

function selectTab(view) {
  for (const tab of tabs) {
    const on = tab.dataset.view === view;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    document.getElementById(tab.getAttribute("aria-controls")).hidden = !on;
  }
  if (view === "attention" && current) drawHeatmap();  // sized to its panel, now visible
  showView(view);
}

// Fill `view`'s panel with `draw(await request())` unless it already shows `key`; the panel is
// aria-busy meanwhile and gets data-shown=key when drawn (the tests wait on that), or its error.
async function fetchInto(view, key, request, draw) {
  const panel = document.getElementById(`panel-${view}`);
  const errorBox = panel.querySelector(".view-error");
  if (pending[view] ? pending[view].key === key : panel.dataset.shown === key) return;
  const mine = (pending[view] = { key });
  panel.setAttribute("aria-busy", "true");
  errorBox.textContent = "";
  try {
    const answer = await request();
    if (pending[view] !== mine) return;
    draw(answer);
    panel.dataset.shown = key;
  } catch (error) {
    if (pending[view] !== mine) return;
    errorBox.textContent = error.message;
    delete panel.dataset.shown;
  } finally {
    if (pending[view] === mine) {
      delete pending[view];
      panel.removeAttribute("aria-busy");
    }
  }
}

async function viewOf(text, view) {
  return (await glassgpt.json("/api/inspect", { text, views: [view] })).views[view];
}

function showView(view) {
  if (view in TEXT_VIEWS) {
    if (lookedAt === null) return;  // the page's text comes first
    const text = lookedAt;
    const draw = {
      "logit-lens": (report) => insideViews.logitLens(report, document.getElementById("lens-hover")),
      residual: (report) => insideViews.residual(report, document.getElementById("residual-position")),
      heads: insideViews.heads,
      neurons: insideViews.neurons,
    }[view];
    fetchInto(view, text, () => viewOf(text, view), draw);
  } else if (view === "patch" && !document.getElementById("panel-patch").dataset.shown) {
    runPatch();
  } else if (view === "embeddings" && !document.getElementById("panel-embeddings").dataset.shown) {
    runEmbeddings();
  }
}

function runPatch() {
  const body = { clean: document.getElementById("patch-clean").value,
    corrupt: document.getElementById("patch-corrupt").value };
  const target = document.getElementById("patch-target").value;
  if (target) body.target = target;
  const button = document.getElementById("patch-run");
  button.disabled = true;
  fetchInto("patch", JSON.stringify(body), () => glassgpt.json("/api/patch", body), insideViews.patch)
    .finally(() => { button.disabled = false; });
}

function runEmbeddings() {
  const text = document.getElementById("embeddings-text").value;
  fetchInto("embeddings", text, () => viewOf(text, "embeddings"),
    (report) => insideViews.embeddings(report, document.getElementById("embeddings-search")));
}

for (const tab of tabs) {
  tab.addEventListener("click", () => {
    if (openTab() === tab.dataset.view) selectTab(tab.dataset.view);
    else window.location.hash = tab.dataset.view;  // hashchange selects it
  });
  tab.addEventListener("keydown", (event) => {  // arrow keys move along the tabs
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
    next.focus();
    next.click();
  });
}
window.addEventListener("hashchange", () => selectTab(openTab()));
document.getElementById("patch-form").addEventListener("submit", (event) => { event.preventDefault(); runPatch(); });
document.getElementById("embeddings-form").addEventListener("submit", (event) => {
  event.preventDefault();
  runEmbeddings();
});

form.addEventListener("submit", (event) => { event.preventDefault(); inspect(); });
layerSelect.addEventListener("change", () => current && drawHeatmap());
headSelect.addEventListener("change", () => current && drawHeatmap());
window.addEventListener("resize", () => current && drawHeatmap());
selectTab(openTab());
inspect();
