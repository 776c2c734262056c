// The runs page: GET /api/runs for the list, GET /api/runs/NAME for a run's metrics and snapshot
// steps (again every few seconds: a run that is training grows), and GET /api/runs/NAME/probes/STEP
// for the snapshot the slider points at. The slider follows the newest step while it sits at the end.
"use strict";

const { el, visible } = glassgpt;
const runSelect = document.getElementById("run");
const slider = document.getElementById("slider");
const stepLabel = document.getElementById("step-label");
const layerSelect = document.getElementById("layer");
const headSelect = document.getElementById("head");
const chart = document.getElementById("chart");
const errorBox = document.getElementById("error");
const REFRESH_MS = 3000;

const state = { name: null, run: null, steps: [], snapshots: new Map(), shown: null, step: null };

function fail(error) { errorBox.textContent = error.message || String(error); }

// ------------------------------------------------------------------ the loss chart

function series(run) {
  const pick = (event, key) => run.metrics.filter((r) => r.event === event && typeof r[key] === "number")
    .map((r) => [r.step, r[key]]);
  const lines = [
    { points: pick("step", "train_loss"), color: "rgba(59, 91, 219, .3)", width: 1 },
    { points: pick("eval", "train_loss"), color: "#3b5bdb", width: 2 },
    { points: pick("eval", "val_loss"), color: "#e8590c", width: 2 },
  ];
  const reference = run.reference;  // the recipe's measured run, dashed
  if (reference) {
    for (const [key, color] of [["train_loss", "#3b5bdb"], ["val_loss", "#e8590c"]]) {
      lines.push({ points: reference.steps.map((step, i) => [step, reference[key][i]]), color, width: 1, dash: [5, 4] });
    }
  }
  return lines;
}

function drawChart() {
  const context = chart.getContext("2d");
  const width = chart.clientWidth || 600, height = chart.clientHeight || 280;
  const scale = window.devicePixelRatio || 1;
  chart.width = width * scale;
  chart.height = height * scale;
  context.setTransform(scale, 0, 0, scale, 0, 0);
  context.clearRect(0, 0, width, height);
  const lines = state.run ? series(state.run) : [];
  const all = lines.flatMap((s) => s.points);
  const ink = getComputedStyle(document.documentElement).getPropertyValue("--muted").trim() || "#666";
  context.font = "12px ui-monospace, Menlo, Consolas, monospace";
  context.fillStyle = ink;
  if (!all.length) {
    context.fillText("no losses recorded yet", 12, 24);
    return;
  }
  const left = 48, right = 12, top = 10, bottom = 28;
  const maxStep = Math.max(1, ...all.map((p) => p[0]), ...state.steps);
  let low = Math.min(...all.map((p) => p[1])), high = Math.max(...all.map((p) => p[1]));
  if (high - low < 1e-6) { low -= 0.5; high += 0.5; }
  const x = (step) => left + (width - left - right) * step / maxStep;
  const y = (loss) => top + (height - top - bottom) * (high - loss) / (high - low);
  context.strokeStyle = "rgba(0, 0, 0, .15)";
  context.lineWidth = 1;
  context.textAlign = "right";
  context.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const value = low + (high - low) * i / 4;
    context.beginPath();
    context.moveTo(left, y(value));
    context.lineTo(width - right, y(value));
    context.stroke();
    context.fillText(value.toFixed(2), left - 6, y(value));
  }
  context.textAlign = "center";
  context.textBaseline = "top";
  for (let i = 0; i <= 4; i++) {
    const step = Math.round(maxStep * i / 4);
    context.fillText(String(step), x(step), height - bottom + 8);
  }
  for (const line of lines) {
    if (!line.points.length) continue;
    context.strokeStyle = line.color;
    context.lineWidth = line.width;
    context.setLineDash(line.dash || []);
    context.beginPath();
    line.points.forEach(([step, loss], i) => (i ? context.lineTo(x(step), y(loss)) : context.moveTo(x(step), y(loss))));
    context.stroke();
    context.setLineDash([]);
  }
  if (state.step !== null) {
    context.strokeStyle = "rgba(0, 0, 0, .45)";
    context.setLineDash([4, 3]);
    context.beginPath();
    context.moveTo(x(state.step), top);
    context.lineTo(x(state.step), height - bottom);
    context.stroke();
    context.setLineDash([]);
  }
  chart.dataset.points = String(all.length);
}

// ------------------------------------------------------------------ one snapshot

function bars(node, rows) {  // rows: [label, value, shown text, title]
  const top = Math.max(...rows.map((r) => r[1]), 1e-12);
  node.replaceChildren(...rows.map(([label, value, text, title]) => el("div", { class: "bar" },
    el("span", { class: "word", text: label, title: title || label }),
    el("span", { class: "track" }, el("span", { class: "fill", style: `display:block; width:${Math.max(0.5, 100 * value / top)}%` })),
    el("span", { class: "pct", text }))));
}

function fillSelect(select, count, label) {
  const keep = select.value;
  select.replaceChildren(...Array.from({ length: count }, (_, i) => el("option", { value: String(i), text: `${label} ${i}` })));  // from 0, as the residual parts are named
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

function showLens(snapshot) {
  const table = document.getElementById("lens");
  const header = el("tr", {}, el("th", { text: "" }), ...snapshot.tokens.map((t) => el("th", { text: visible(t) })));
  const rows = snapshot.lens.text.map((row, depth) => el("tr", {},
    el("th", { text: depth === 0 ? "embeddings" : `after block ${depth - 1}` }),
    ...row.map((ranks, position) => {
      const probs = snapshot.lens.prob[depth][position];
      const title = ranks.map((text, r) => `${visible(text)} ${glassgpt.percent(probs[r])}`).join("\n");
      return el("td", { text: visible(ranks[0]), title, style: `background: rgba(59, 91, 219, ${(0.85 * probs[0]).toFixed(3)})` });
    })));
  table.replaceChildren(header, ...rows);
}

function showAttention(snapshot) {
  const table = document.getElementById("attention");
  const weights = snapshot.attention[Number(layerSelect.value) || 0][Number(headSelect.value) || 0];
  const labels = snapshot.tokens.map((t) => visible(t));
  const header = el("tr", {}, el("th", { text: "" }), ...labels.map((l) => el("th", { text: l })));
  const rows = weights.map((row, i) => el("tr", {}, el("th", { text: labels[i] }), ...row.map((w, j) => el("td", {
    text: j > i ? "" : w.toFixed(2),
    title: `${labels[i]} → ${labels[j]}: ${j > i ? "masked (future)" : w.toFixed(4)}`,
    style: j > i ? "background: var(--line)" : `background: rgba(59, 91, 219, ${Math.sqrt(w).toFixed(3)})`,
  }))));
  table.replaceChildren(header, ...rows);
}

function showSnapshot(snapshot) {
  state.shown = snapshot;
  document.getElementById("probe").replaceChildren(...snapshot.tokens.map((t) => el("span", { class: "token", text: visible(t) })));
  bars(document.getElementById("next"), snapshot.next.map((t) => [visible(t.text), t.prob, glassgpt.percent(t.prob), `id ${t.id}`]));
  const last = snapshot.residual.norms.map((row) => row[row.length - 1]);
  bars(document.getElementById("residual"), snapshot.residual.names.map((name, i) => [name, last[i], last[i].toFixed(2)]));
  showLens(snapshot);
  fillSelect(layerSelect, snapshot.attention.length, "block");
  fillSelect(headSelect, snapshot.attention[0].length, "head");
  showAttention(snapshot);
  document.querySelector("main").dataset.shownStep = String(snapshot.step);
}

async function snapshotAt(step) {
  if (!state.snapshots.has(step)) {
    state.snapshots.set(step, glassgpt.json(`/api/runs/${encodeURIComponent(state.name)}/probes/${step}`));
  }
  return state.snapshots.get(step);
}

async function showStep(index) {
  const step = state.steps[index];
  if (step === undefined) return;
  state.step = step;
  stepLabel.textContent = `${step}`;
  drawChart();
  try {
    const snapshot = await snapshotAt(step);
    if (state.step === step) showSnapshot(snapshot);  // the slider may have moved on meanwhile
  } catch (error) {
    state.snapshots.delete(step);
    fail(error);
  }
}

// ------------------------------------------------------------------ runs

async function loadRun(name, first) {
  const run = await glassgpt.json(`/api/runs/${encodeURIComponent(name)}`);
  if (name !== state.name) return;
  const atEnd = first || Number(slider.value) >= state.steps.length - 1;
  state.run = run;
  state.steps = run.snapshots;
  const evals = run.metrics.filter((r) => r.event === "eval").length;
  const lastStep = Math.max(0, ...run.metrics.map((r) => r.step || 0));
  document.getElementById("run-info").textContent =
    `${lastStep} steps, ${evals} evaluations, ${run.snapshots.length} snapshots of the probe text` +
    (run.recipe ? `; the ${run.recipe} recipe` : "") +
    (run.reference ? ` (dashed: its reference run, ${run.reference.source})` : "");
  slider.max = String(Math.max(0, state.steps.length - 1));
  slider.disabled = state.steps.length === 0;
  if (!state.steps.length) {
    stepLabel.textContent = "no snapshots (this run recorded no probe)";
    drawChart();
    return;
  }
  if (atEnd) slider.value = slider.max;  // follow the newest snapshot while the slider is at the end
  const index = Number(slider.value);
  if (first || state.steps[index] !== state.step) await showStep(index);
  else drawChart();
}

async function chooseRun(name) {
  state.name = name;
  state.snapshots = new Map();
  state.step = null;
  errorBox.textContent = "";
  const url = new URL(window.location.href);
  url.searchParams.set("run", name);
  window.history.replaceState(null, "", url);
  try { await loadRun(name, true); } catch (error) { fail(error); }
}

async function start() {
  let listing;
  try { listing = await glassgpt.json("/api/runs"); } catch (error) { fail(error); return; }
  if (!listing.runs.length) {
    fail(new Error(`No training runs under ${listing.root} yet: glassgpt train --out ${listing.root}/NAME writes one.`));
    return;
  }
  runSelect.replaceChildren(...listing.runs.map((r) => el("option", { value: r.name, text: r.name })));
  const wanted = new URLSearchParams(window.location.search).get("run");
  const name = listing.runs.some((r) => r.name === wanted) ? wanted : listing.runs[0].name;
  runSelect.value = name;
  await chooseRun(name);
  setInterval(() => { if (state.name) loadRun(state.name, false).catch(fail); }, REFRESH_MS);
}

runSelect.addEventListener("change", () => chooseRun(runSelect.value));
slider.addEventListener("input", () => showStep(Number(slider.value)));
layerSelect.addEventListener("change", () => state.shown && showAttention(state.shown));
headSelect.addEventListener("change", () => state.shown && showAttention(state.shown));
window.addEventListener("resize", drawChart);
start();
