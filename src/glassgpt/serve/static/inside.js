// The inside page: POST /api/inspect, then the tokens, a bar chart of the next-token
// probabilities and a heatmap of the chosen block's and head's attention weights.
"use strict";

const { el, visible } = glassgpt;
const form = document.getElementById("inspect-form");
const layerSelect = document.getElementById("layer");
const headSelect = document.getElementById("head");
const canvas = document.getElementById("heatmap");
const tooltip = document.getElementById("tooltip");
let current = null;  // the last /api/inspect answer

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
}

form.addEventListener("submit", (event) => { event.preventDefault(); inspect(); });
layerSelect.addEventListener("change", () => current && drawHeatmap());
headSelect.addEventListener("change", () => current && drawHeatmap());
window.addEventListener("resize", () => current && drawHeatmap());
inspect();
