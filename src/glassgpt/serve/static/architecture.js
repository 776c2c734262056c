// The architecture page: specification cards, the data flow drawn for this model, and the
// parameter breakdown (the same rows as `glassgpt info`), all from GET /api/model.
"use strict";

const { el, number } = glassgpt;
const EXAMPLE = "The painting was";

function cards(info) {
  const c = info.config;
  const items = [
    ["Parameters", number(info.parameters), "total-parameters"],
    ["Blocks", c.n_layers],
    ["Heads per block", c.n_heads],
    ["Embedding width", number(c.emb_dim)],
    ["Context length", number(c.context_length)],
    ["Vocabulary", number(c.vocab_size)],
    ["Feed-forward width", number(c.ff_dim || 4 * c.emb_dim)],
    [`Size in ${info.dtype}`, `${number(info.size_mib)} MiB`],
  ];
  return items.map(([label, value, id]) => el("div", { class: "card" },
    el("div", { class: "value", ...(id ? { id } : {}), text: String(value) }),
    el("div", { class: "label", text: label })));
}

function step(title, text, shape, extra) {
  const node = el("div", { class: "step" }, el("h3", { text: title }), el("p", { text }));
  if (shape) node.append(el("div", { class: "shape", text: shape }));
  if (extra) node.append(extra);
  return node;
}

function flow(info, example) {
  const c = info.config;
  const d = c.emb_dim, v = number(c.vocab_size), ff = c.ff_dim || 4 * d;
  const headDim = d / c.n_heads;
  const norm = c.norm_placement === "pre";
  const n = example ? example.tokens.length : "T";

  const tokens = example
    ? el("div", { class: "tokens", style: "margin-top:.4rem" }, ...example.tokens.map((t) =>
        el("span", { class: "token" }, glassgpt.visible(t.text), el("small", { text: String(t.id) }))))
    : null;
  const candidates = example
    ? el("div", { class: "bars", style: "margin-top:.5rem" }, ...example.next_tokens.slice(0, 5).map((t) =>
        el("div", { class: "bar" },
          el("span", { class: "word", text: glassgpt.visible(t.text) }),
          el("span", { class: "track" }, el("span", { class: "fill", style: `width:${Math.max(1, t.prob * 100 / example.next_tokens[0].prob)}%; display:block` })),
          el("span", { class: "pct", text: glassgpt.percent(t.prob) }))))
    : null;

  const inner = norm
    ? ["LayerNorm", `Multi-head attention: ${c.n_heads} heads × ${headDim} wide, causal mask`, "+ residual (the shortcut adds the input back)",
       "LayerNorm", `Feed-forward ${number(d)} → ${number(ff)} → ${number(d)} with ${c.activation.toUpperCase()}`, "+ residual"]
    : [`Multi-head attention: ${c.n_heads} heads × ${headDim} wide, causal mask`, "+ residual, then LayerNorm",
       `Feed-forward ${number(d)} → ${number(ff)} → ${number(d)} with ${c.activation.toUpperCase()}`, "+ residual, then LayerNorm"];
  const block = el("div", { class: "step repeat" },
    el("h3", { text: `${c.n_layers} transformer block${c.n_layers > 1 ? "s" : ""}, one after another` }),
    el("p", { text: "Each token's vector is refined: attention mixes in earlier tokens, the feed-forward works on each token alone." }),
    el("div", { class: "shape", text: `(${n}, ${number(d)}) in → (${n}, ${number(d)}) out` }),
    el("div", { class: "inner" }, ...inner.map((text) => el("div", { class: text.startsWith("+") ? "residual" : "", text }))));

  return [
    step("Text", example ? `"${EXAMPLE}"` : "The prompt, as typed."),
    step(`Tokens (${info.tokenizer === "gpt2" ? "GPT-2 byte-pair encoding" : info.tokenizer})`,
      "The text is cut into pieces from a fixed vocabulary; each piece has an id.", `${n} ids from 0 … ${number(c.vocab_size - 1)}`, tokens),
    step("Embeddings", "Each id looks up a learned vector; a learned position vector is added for its place in the context.",
      `token table ${v} × ${number(d)} + position table ${number(c.context_length)} × ${number(d)} → (${n}, ${number(d)})`),
    block,
    c.final_norm ? step("Final LayerNorm", "One last normalisation of every vector.", `(${n}, ${number(d)})`) : null,
    step("Output head → logits", "A linear map scores every vocabulary entry as the next token" +
      (c.tie_weights ? " (it shares its matrix with the token embedding)." : "."), `${number(d)} → ${v} logits per position`),
    step("Softmax → probabilities", "Only the last position matters for the next token; softmax turns its scores into probabilities that sum to 1.",
      example ? "the likeliest next tokens now:" : null, candidates),
    step("Sampling", "Pick one token: the likeliest (temperature 0), or at random after dividing by the temperature and keeping the top-k / top-p candidates. It is appended to the text and fed back in for the next step.",
      "→ next token id, appended; repeat"),
  ].filter(Boolean);
}

function breakdown(info) {
  const rows = info.breakdown;
  const total = rows[rows.length - 1].parameters;
  const blockRows = rows.filter((r) => r.name.startsWith("block "));
  const otherRows = rows.filter((r) => !r.name.startsWith("block ") && r.name !== "total");
  const row = (name, count, cls = "") => el("tr", { class: cls },
    el("td", { text: name }),
    el("td", { class: "num", text: number(count) }),
    el("td", { class: "num" }, el("span", { class: "share", style: `width:${Math.round(60 * count / total)}px` }),
      " " + (100 * count / total).toFixed(1) + "%"));
  const head = el("tr", {}, el("th", { text: "Component" }), el("th", { class: "num", text: "Parameters" }), el("th", { class: "num", text: "Share" }));

  // Blocks are identical: one row per part with "× N", the rows of every block folded below.
  const folded = ["attention", "feed-forward", "norms"].map((part) => {
    const counts = blockRows.filter((r) => r.name.endsWith(part)).map((r) => r.parameters);
    return row(`all blocks: ${part} (${counts.length} × ${number(counts[0] || 0)})`, counts.reduce((a, b) => a + b, 0));
  });
  const table = el("table", { id: "breakdown-table" }, el("thead", {}, head),
    el("tbody", {}, ...otherRows.slice(0, 2).map((r) => row(r.name, r.parameters)), ...folded,
      ...otherRows.slice(2).map((r) => row(r.name, r.parameters)), row("total", total, "total")));
  const perBlock = el("details", {}, el("summary", { text: "every block, row by row" }),
    el("table", {}, el("tbody", {}, ...blockRows.map((r) => row(r.name, r.parameters)))));
  return [table, perBlock];
}

async function main() {
  const errorBox = document.getElementById("error");
  try {
    const info = await glassgpt.model();
    document.getElementById("model-name").textContent = info.name;
    document.title = `glassgpt · ${info.name} architecture`;
    document.getElementById("cards").replaceChildren(...cards(info));
    document.getElementById("breakdown").replaceChildren(...breakdown(info));
    const flowBox = document.getElementById("flow");
    flowBox.replaceChildren(...flow(info, null));
    try {  // the same flow with the example's real tokens and next-token probabilities
      const example = await glassgpt.json("/api/inspect", { text: EXAMPLE });
      flowBox.replaceChildren(...flow(info, example));
    } catch (_) { /* the sizes alone still tell the story */ }
  } catch (error) {
    errorBox.textContent = error.message;
  }
}

main();
