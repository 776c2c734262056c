// The learn page: the walk-through of glassgpt.explain. GET /api/explain lists the topics, and
// GET /api/explain/{topic} returns one topic's steps, drawn here as text, tables, heatmaps (attention
// weights and the like) and small SVG plots. The chosen topic lives in the URL's #fragment.
"use strict";

const { el } = glassgpt;
const menu = document.getElementById("topics");
const stepsBox = document.getElementById("steps");
const heading = document.getElementById("topic-title");
const errorBox = document.getElementById("error");
let topics = [];

// A cell's text, as the terminal shows it: floats to `digits` decimals (tiny ones in e-notation),
// counts with thousands separators. JSON.parse does not tell 4 from 4.0, so a table column whose
// numbers are all whole asks for `wholeAsCount` (explain.py keeps a column's numbers of one kind,
// writing a setting like dropout as text beside the counts); tensors (whose 1.0 is a weight) do not.
function formatValue(value, digits = 4, wholeAsCount = false) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value) && (wholeAsCount || digits === 0)) return glassgpt.number(value);
  // Python's two-digit exponent (2.98e-08, not 2.98e-8), as the terminal prints it.
  if (value !== 0 && Math.abs(value) < 0.5 * 10 ** -digits) return value.toExponential(2).replace(/e([+-])(\d)$/, "e$10$2");
  return value.toFixed(digits);
}

function isNumber(value) {
  return typeof value === "number";
}

function headerRow(columns) {
  return el("tr", {}, ...columns.map((c, i) => el("th", { class: i === 0 ? "" : "num", text: String(c) })));
}

// One vector or matrix as a table, shaded like a heatmap when the step asks for it.
function matrixTable(matrix, rowLabels, columns, digits, heatmap) {
  const values = matrix.flat();
  const low = Math.min(...values), high = Math.max(...values);
  const table = el("table", { class: heatmap ? "heatmap" : "" });
  table.append(headerRow(["", ...columns]));
  matrix.forEach((row, i) => {
    const cells = row.map((value) => {
      const cell = el("td", { class: "num", text: formatValue(value, digits) });
      if (heatmap) {
        // From the smallest value (faint) to the largest (dark), so near-equal weights still differ.
        const share = high > low ? (value - low) / (high - low) : 1;
        cell.style.background = `rgba(59, 91, 219, ${(0.06 + 0.84 * share).toFixed(3)})`;
        if (share > 0.55) cell.classList.add("dark");
      }
      return cell;
    });
    table.append(el("tr", {}, el("td", { class: "label", text: rowLabels[i] ?? String(i) }), ...cells));
  });
  return el("div", { class: "table-wrap" }, table);
}

// A tensor of any rank: a vector reads as one row under its labels, a matrix as rows, and anything
// larger as one matrix per leading index.
function tensorView(tensor, shape, step, prefix = "") {
  const digits = step.digits ?? 4;
  if (shape.length <= 1) {
    const columns = step.labels || step.columns || tensor.map((_, j) => String(j));
    return [matrixTable([tensor], [""], columns, digits, step.heatmap)];
  }
  if (shape.length === 2) {
    const columns = step.columns || tensor[0].map((_, j) => String(j));
    const labels = step.labels || tensor.map((_, i) => String(i));
    return [matrixTable(tensor, labels, columns, digits, step.heatmap)];
  }
  return tensor.flatMap((part, index) => [
    el("div", { class: "slice", text: `[${prefix}${index}]` }),
    ...tensorView(part, shape.slice(1), step, `${prefix}${index}, `),
  ]);
}

function dataTable(step) {
  const digits = step.digits ?? 4;
  const columns = step.columns || step.table[0].map(() => "");
  const numeric = columns.map((_, j) => step.table.every((row) => isNumber(row[j])));
  // Whole when every number in the column is: a settings column mixes counts with words and yes/no.
  const whole = columns.map((_, j) => step.table.every((row) => !isNumber(row[j]) || Number.isInteger(row[j])));
  const table = el("table", { class: "data" });
  table.append(el("tr", {}, ...columns.map((c, j) => el("th", { class: numeric[j] ? "num" : "", text: String(c) }))));
  for (const row of step.table) {
    table.append(el("tr", {}, ...row.map((value, j) =>
      el("td", { class: numeric[j] ? "num" : "label", text: formatValue(value, digits, whole[j]) }))));
  }
  return el("div", { class: "table-wrap" }, table);
}

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// A line chart of plot.series over plot.x, with integer grid lines.
function linePlot(plot) {
  const width = 520, height = 280, left = 40, right = 12, top = 14, bottom = 34;
  const ys = plot.series.flatMap((s) => s.y);
  const xMin = Math.min(...plot.x), xMax = Math.max(...plot.x);
  const yMin = Math.floor(Math.min(...ys)), yMax = Math.ceil(Math.max(...ys));
  const px = (x) => left + (x - xMin) / (xMax - xMin) * (width - left - right);
  const py = (y) => top + (yMax - y) / (yMax - yMin) * (height - top - bottom);
  const chart = svg("svg", { class: "plot", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": plot.series.map((s) => s.name).join(" and ") + " plotted against " + (plot.x_label || "x") });
  for (let x = Math.ceil(xMin); x <= xMax; x++) {
    chart.append(svg("line", { class: x === 0 ? "axis" : "grid", x1: px(x), x2: px(x), y1: top, y2: height - bottom }));
    chart.append(svg("text", { x: px(x), y: height - bottom + 15, "text-anchor": "middle" }, String(x)));
  }
  for (let y = yMin; y <= yMax; y++) {
    chart.append(svg("line", { class: y === 0 ? "axis" : "grid", x1: left, x2: width - right, y1: py(y), y2: py(y) }));
    chart.append(svg("text", { x: left - 6, y: py(y) + 4, "text-anchor": "end" }, String(y)));
  }
  plot.series.forEach((series, i) => {
    const points = plot.x.map((x, j) => `${px(x).toFixed(1)},${py(series.y[j]).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { class: `series series-${i}`, points }));
    chart.append(svg("rect", { class: `legend-${i}`, x: left + 12, y: top + 6 + i * 18, width: 14, height: 4 }));
    chart.append(svg("text", { x: left + 32, y: top + 11 + i * 18 }, series.name));
  });
  if (plot.x_label) {
    chart.append(svg("text", { x: width - right, y: height - 4, "text-anchor": "end" }, plot.x_label));
  }
  return chart;
}

function stepView(step, number) {
  const article = el("article", { class: "panel learn-step" },
    el("h3", {}, el("span", { class: "number", text: `${number}.` }), step.title),
    el("p", { text: step.text }));
  if (step.tensor !== undefined) {
    article.append(el("div", { class: "shape", text: `shape (${step.shape.join(", ")})` }),
      ...tensorView(step.tensor, step.shape, step));
  }
  if (step.plot) article.append(linePlot(step.plot));
  if (step.table) article.append(dataTable(step));
  return article;
}

function markCurrent(name) {
  for (const link of menu.querySelectorAll("a")) {
    link.setAttribute("aria-current", String(link.dataset.topic === name));
  }
}

async function showTopic(name) {
  const topic = topics.find((t) => t.name === name) || topics[0];
  markCurrent(topic.name);
  heading.textContent = topic.title;
  errorBox.textContent = "";
  stepsBox.setAttribute("aria-busy", "true");
  stepsBox.replaceChildren(el("p", { class: "loading", text: "Computing…" }));
  try {
    const result = await glassgpt.json(`/api/explain/${encodeURIComponent(topic.name)}`);
    if (currentTopic() !== topic.name) return;  // the reader moved on meanwhile
    stepsBox.replaceChildren(...result.steps.map((step, i) => stepView(step, i + 1)));
    stepsBox.dataset.topic = topic.name;
  } catch (error) {
    stepsBox.replaceChildren();
    errorBox.textContent = error.message;
  } finally {
    stepsBox.removeAttribute("aria-busy");
  }
}

function currentTopic() {
  const name = decodeURIComponent(window.location.hash.slice(1));
  return topics.some((t) => t.name === name) ? name : topics[0].name;
}

async function start() {
  try {
    topics = await glassgpt.json("/api/explain");
  } catch (error) {
    menu.replaceChildren();
    errorBox.textContent = error.message;
    return;
  }
  menu.replaceChildren(...topics.map((t) =>
    el("a", { href: `#${t.name}`, "data-topic": t.name, title: t.title, text: t.name })));
  window.addEventListener("hashchange", () => showTopic(currentTopic()));
  showTopic(currentTopic());
}

start();
