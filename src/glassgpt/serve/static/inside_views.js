// The inside page's views, drawn from the answers of POST /api/inspect's "views" and POST /api/patch
// (glassgpt.inspect_report's JSON): the logit lens grid, the residual-stream bars, the patching and
// head-ablation heat maps, the embedding maps and the top neurons. inside.js fetches and calls these;
// each draws into its own tab panel and knows nothing of the model beyond the answer it is given.
"use strict";

const insideViews = (() => {
  const { el, visible } = glassgpt;
  const SVG = "http://www.w3.org/2000/svg";
  const ACCENT = "59, 91, 219", GOOD = "43, 138, 62", BAD = "201, 42, 42";

  function svg(tag, attributes = {}, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A heat-map cell: `share` 0..1 of the colour `rgb`; dark cells get light text.
  function shade(cell, rgb, share) {
    const alpha = 0.05 + 0.85 * Math.max(0, Math.min(1, share));
    cell.style.background = `rgba(${rgb}, ${alpha.toFixed(3)})`;
    if (alpha > 0.55) cell.classList.add("dark");
    return cell;
  }

  const short = (text, n = 10) => { const v = visible(text); return v.length > n ? v.slice(0, n - 1) + "…" : v; };
  const signed = (value, digits) => (value >= 0 ? "+" : "") + value.toFixed(digits);

  function header(first, labels) {
    return el("tr", {}, el("th", { text: first }), ...labels.map((l) => el("th", { class: "num", text: l })));
  }

  // ------------------------------------------------------------ logit lens

  // report: {tokens, rows: ["embeddings", "block 0", ...], top[row][position] = [{id, text, logprob}] x 5}
  function logitLens(report, hover) {
    const table = document.getElementById("lens-grid");
    const last = report.rows.length - 1;
    const lines = (row, position) => report.top[row][position]
      .map((c) => `"${visible(c.text)}" ${glassgpt.percent(Math.exp(c.logprob))}`);
    table.replaceChildren(header("after", report.tokens.map((t) => short(t.text))),
      ...report.rows.map((name, row) => el("tr", {},
        el("th", { class: "label", text: row === last ? `${name} (output)` : name }),
        ...report.top[row].map((candidates, position) => {
          const best = candidates[0], probability = Math.exp(best.logprob);
          const cell = el("td", { class: "cell", tabindex: "0", "data-row": String(row), "data-position": String(position),
            title: lines(row, position).join("\n") },
          el("span", { class: "word", text: short(best.text) }),
          el("small", { text: glassgpt.percent(probability) }));
          // sqrt: a guess at 10% is still visibly darker than one at 0.1%.
          return shade(cell, ACCENT, Math.sqrt(probability));
        }))));
    const show = (event) => {
      const cell = event.target.closest("td.cell");
      if (!cell) return;
      const row = Number(cell.dataset.row), position = Number(cell.dataset.position);
      hover.textContent = `${report.rows[row]}, after "${visible(report.tokens[position].text)}": ` +
        lines(row, position).join(", ");
    };
    table.onmouseover = show;
    table.onfocusin = show;
  }

  // ------------------------------------------------------------ residual contributions

  // report: {tokens, names: ["embeddings", "block 0 attention", ...], norms[part][position]}
  function residual(report, select) {
    const keep = select.value;
    select.replaceChildren(...report.tokens.map((t, p) =>
      el("option", { value: String(p), text: `${p}: ${visible(t.text)}` })));
    select.value = keep !== "" && Number(keep) < report.tokens.length ? keep : String(report.tokens.length - 1);
    const draw = () => {
      const position = Number(select.value);
      const norms = report.norms.map((row) => row[position]);
      const top = Math.max(...norms) || 1;
      document.getElementById("residual-bars").replaceChildren(...report.names.map((name, part) =>
        el("div", { class: "bar wide" },
          el("span", { class: "word", text: name }),
          el("span", { class: "track" }, el("span", { class: "fill",
            style: `display:block; width:${Math.max(0.5, 100 * norms[part] / top)}%` })),
          el("span", { class: "pct", text: norms[part].toFixed(3) }))));
      document.getElementById("residual-bars").dataset.position = String(position);
    };
    select.onchange = draw;
    draw();
  }

  // ------------------------------------------------------------ activation patching

  // report: {tokens, corrupt_tokens, target: {id, text}, clean_logit, corrupt_logit, logits[block][position]}
  function patch(report) {
    const { clean_logit: clean, corrupt_logit: corrupt } = report;
    document.getElementById("patch-caption").textContent =
      `Target "${visible(report.target.text)}" (id ${report.target.id}): its logit is ${clean.toFixed(3)} after ` +
      `the clean text and ${corrupt.toFixed(3)} after the corrupted one. Each cell: the logit when that block's ` +
      "input at that token comes from the clean run.";
    const labels = report.tokens.map((t, p) => {
      const other = report.corrupt_tokens[p].text;
      return t.text === other ? short(t.text) : `${short(t.text, 8)} / ${short(other, 8)}`;
    });
    const table = document.getElementById("patch-grid");
    table.replaceChildren(header("block", labels), ...report.logits.map((row, block) => el("tr", {},
      el("th", { class: "label", text: `block ${block}` }),
      ...row.map((value, position) => {
        // From the corrupted value (none of the clean answer back) to the clean one (all of it).
        const share = clean === corrupt ? 0 : (value - corrupt) / (clean - corrupt);
        return shade(el("td", { class: "num", text: value.toFixed(3),
          title: `block ${block}, position ${position}: ${(100 * share).toFixed(0)}% of the way to the clean logit` }),
        ACCENT, share);
      }))));
  }

  // ------------------------------------------------------------ head ablation

  // report: {tokens, target: {id, text}, method, logit, logits[block][head]}
  function heads(report) {
    const baseline = report.logit;
    // Past the server's exact bound the grid is attribution patching's estimate: say so.
    const estimated = report.method === "attribution"
      ? " Estimated by attribution patching (one backward pass; the text is longer than the exact view " +
        "takes): a first-order guess, close for most heads; check a cell that matters on a shorter text."
      : "";
    document.getElementById("heads-caption").textContent =
      `Target "${visible(report.target.text)}" (id ${report.target.id}), the model's top next token: its logit is ` +
      `${baseline.toFixed(3)} with every head. Each cell: the change when that one head is silenced.` + estimated;
    const changes = report.logits.flat().map((v) => Math.abs(v - baseline));
    const scale = Math.max(...changes) || 1;
    document.getElementById("heads-grid").replaceChildren(
      header("block", report.logits[0].map((_, h) => `head ${h}`)),
      ...report.logits.map((row, block) => el("tr", {},
        el("th", { class: "label", text: `block ${block}` }),
        ...row.map((value, head) => shade(el("td", { class: "num", text: signed(value - baseline, 3),
          title: `block ${block}, head ${head} silenced: logit ${value.toFixed(4)}` }),
        value < baseline ? BAD : GOOD, Math.abs(value - baseline) / scale)))));
  }

  // ------------------------------------------------------------ embedding maps

  // The frame of a scatter: points (x, y) scaled into the view box with a margin.
  function scaler(xy, width, height, margin) {
    const xs = xy.map((p) => p[0]), ys = xy.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const sx = (x) => margin + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (width - 2 * margin);
    const sy = (y) => height - margin - (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5) * (height - 2 * margin);
    return (point) => [sx(point[0]), sy(point[1])];
  }

  const share = (explained) => `the axes hold ${(100 * explained[0]).toFixed(1)}% and ` +
    `${(100 * explained[1]).toFixed(1)}% of the variance`;

  // report: {token_map: {ids, texts, xy, explained, neighbours, neighbour_texts, similarity},
  //          position_map: {ids, xy, explained, neighbours, similarity}}
  function embeddings(report, search) {
    const map = report.token_map;
    const chart = document.getElementById("token-map");
    const place = scaler(map.xy, 640, 400, 40);
    document.getElementById("token-map-caption").textContent =
      `${map.ids.length} tokens; ${share(map.explained)}.`;
    const points = map.ids.map((id, i) => {
      const [x, y] = place(map.xy[i]);
      const group = svg("g", { class: "point", "data-index": i, tabindex: 0 });
      group.append(svg("circle", { cx: x.toFixed(1), cy: y.toFixed(1), r: 4 }),
        svg("text", { x: (x + 6).toFixed(1), y: (y + 4).toFixed(1) }, visible(map.texts[i])),
        svg("title", {}, `${visible(map.texts[i])} (id ${id}): x ${map.xy[i][0].toFixed(3)}, y ${map.xy[i][1].toFixed(3)}`));
      return group;
    });
    chart.replaceChildren(...points);

    const choose = (index) => {
      points.forEach((p, i) => p.classList.toggle("chosen", i === index));
      const box = document.getElementById("neighbours");
      if (index < 0) { box.replaceChildren(); return; }
      box.replaceChildren(el("div", { class: "caption", text: `Nearest to "${visible(map.texts[index])}" ` +
        `(id ${map.ids[index]}) in the whole vocabulary:` }),
      ...map.neighbour_texts[index].map((text, j) => el("span", { class: "token" }, visible(text),
        el("small", { text: map.similarity[index][j].toFixed(3) }))));
      box.dataset.index = String(index);
    };
    const find = () => {
      const wanted = search.value.trim().toLowerCase();
      let first = -1;
      points.forEach((p, i) => {
        const name = visible(map.texts[i]).toLowerCase(), plain = map.texts[i].trim().toLowerCase();
        const hit = wanted !== "" && (name.includes(wanted) || plain.includes(wanted));
        p.classList.toggle("match", hit);
        p.classList.toggle("faded", wanted !== "" && !hit);
        if (hit && first < 0) first = i;
      });
      if (wanted !== "") choose(first);
    };
    chart.onclick = (event) => {
      const point = event.target.closest("g.point");
      if (point) choose(Number(point.dataset.index));
    };
    search.oninput = find;
    choose(-1);
    find();

    // Positions: a curve in order, coloured from the first (light) to the last (dark).
    const positions = report.position_map;
    const placePosition = scaler(positions.xy, 640, 300, 30);
    const curve = positions.xy.map(placePosition);
    const chartP = document.getElementById("position-map");
    document.getElementById("position-map-caption").textContent =
      `${positions.ids.length} positions, joined in order; ${share(positions.explained)}. A trained model's ` +
      "neighbouring positions lie next to each other.";
    const every = Math.max(1, Math.ceil(curve.length / 16));
    chartP.replaceChildren(svg("polyline", { class: "curve",
      points: curve.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ") }),
    ...curve.map(([x, y], i) => svg("circle", { cx: x.toFixed(1), cy: y.toFixed(1), r: 3,
      style: `fill: rgba(${ACCENT}, ${(0.2 + 0.8 * i / Math.max(1, curve.length - 1)).toFixed(3)})` })),
    ...curve.filter((_, i) => i % every === 0).map(([x, y], j) =>
      svg("text", { x: (x + 5).toFixed(1), y: (y - 5).toFixed(1) }, String(j * every))));
  }

  // ------------------------------------------------------------ top neurons

  // report: {tokens, block, neurons: [{neuron, peak, positions, activations, token_ids, tokens}]}
  function neurons(report) {
    document.getElementById("neuron-table").replaceChildren(
      el("tr", {}, el("th", { text: `block ${report.block} unit` }), el("th", { class: "num", text: "peak" }),
        el("th", { text: "fires on (activation)" })),
      ...report.neurons.map((n) => el("tr", {},
        el("td", { class: "num unit", text: String(n.neuron) }),
        el("td", { class: "num", text: n.peak.toFixed(3) }),
        el("td", {}, el("div", { class: "fires" }, ...n.tokens.map((text, j) => el("span", { class: "token",
          title: `position ${n.positions[j]}` }, visible(text), el("small", { text: n.activations[j].toFixed(3) }))))))));
  }

  return { logitLens, residual, patch, heads, embeddings, neurons };
})();
