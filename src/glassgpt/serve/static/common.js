// Shared by every page: calling the API (same origin, or the one in config.js), errors in plain
// words, number formatting, and the header (current page, model badge).
"use strict";

const glassgpt = {
  apiBase: (window.GLASSGPT_API || "").replace(/\/$/, ""),

  // fetch(apiBase + path) with a JSON body if given; resolves to the Response, or throws an
  // Error whose message a person can read (server's own {error} message when it sent one).
  async request(path, body) {
    const options = body === undefined ? {} : {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    };
    let response;
    try {
      response = await fetch(glassgpt.apiBase + path, options);
    } catch (networkError) {
      const where = glassgpt.apiBase || window.location.origin;
      throw new Error(`Could not reach the glassgpt server at ${where}. Is it running` +
        (glassgpt.apiBase ? " and does it allow this page's origin (--cors-origin)?" : "?"));
    }
    if (!response.ok) throw await glassgpt.errorFrom(response);
    return response;
  },

  async json(path, body) {
    return (await glassgpt.request(path, body)).json();
  },

  async errorFrom(response) {
    let message = "";
    try {
      const data = await response.json();
      message = data.error || (typeof data.detail === "string" ? data.detail : "");
    } catch (_) { /* not JSON */ }
    if (response.status === 503) {
      const wait = response.headers.get("Retry-After");
      message = (message || "The server is busy.") + (wait ? ` Try again in ${wait} s.` : "");
    } else if (response.status === 413) {
      message = message || "That text is too long for the server.";
    }
    const error = new Error(message || `The server answered ${response.status} ${response.statusText}.`);
    error.status = response.status;
    return error;
  },

  number: (n) => Number(n).toLocaleString("en-US"),

  compact(n) {
    if (n >= 1e9) return (n / 1e9).toFixed(2) + "B";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (n >= 1e3) return (n / 1e3).toFixed(1) + "K";
    return String(n);
  },

  // A probability as a percentage that stays readable when tiny: 12.3%, 0.0042%.
  percent(p) {
    const value = 100 * p;
    return (value >= 0.1 ? value.toFixed(1) : value.toPrecision(2)) + "%";
  },

  // A token's text made visible: spaces as ·, newlines as ↵.
  visible: (text) => text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→"),

  el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  },

  // Server-sent events arrive as "event: NAME\ndata: JSON\n\n" blocks, possibly split across chunks.
  async* serverEvents(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffered += value;
      let end;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        const block = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        let name = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        yield { name, data: JSON.parse(data) };
      }
    }
  },

  modelPromise: null,
  model() {  // GET /api/model once per page
    glassgpt.modelPromise = glassgpt.modelPromise || glassgpt.json("/api/model");
    return glassgpt.modelPromise;
  },
};

document.addEventListener("DOMContentLoaded", () => {
  const here = window.location.pathname.replace(/\.html$/, "").replace(/\/index$/, "/");
  for (const link of document.querySelectorAll(".top nav a")) {
    const target = new URL(link.href).pathname.replace(/\.html$/, "").replace(/\/index$/, "/");
    if (target === here || (here.endsWith(target) && target !== "/")) link.setAttribute("aria-current", "page");
  }
  const badge = document.querySelector(".model-badge");
  if (badge) {
    glassgpt.model().then((info) => {
      const kind = { classify: " · classifier", instruct: " · instruction-tuned" }[info.task] || "";
      badge.textContent = `${info.name} · ${glassgpt.compact(info.parameters)} parameters · ${info.device}${kind}`;
      // The page at / offers what the model does (tasks.js): name its link after that.
      const home = document.querySelector('.top nav a[href="./"]');
      if (home && info.task === "classify") home.textContent = "Classify";
      if (home && info.task === "instruct") home.textContent = "Instruct";
    }).catch(() => { badge.textContent = "model not reachable"; });
  }
});
