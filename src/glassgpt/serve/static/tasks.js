// The page at / for a fine-tuned model. GET /api/model's "task" says what the served model does:
// "classify" shows the classification box (texts in, each text's label and class probabilities
// out, from POST /classify), "instruct" the instruction box (instruction + optional input in, the
// response streamed from POST /instruct/stream), "generate" leaves the generate box (generate.js).
"use strict";

const taskBoxes = { generate: "generate-box", classify: "classify-box", instruct: "instruct-box" };

glassgpt.model().then((info) => {
  const task = info.task in taskBoxes ? info.task : "generate";
  for (const [name, id] of Object.entries(taskBoxes)) document.getElementById(id).hidden = name !== task;
  if (task === "classify") setUpClassify(info);
  if (task === "instruct") setUpInstruct(info);
  if (task !== "generate") document.title = `glassgpt · ${task}`;
  document.body.dataset.task = task;  // the page is ready for this model
}).catch(() => { /* the header badge already says the model is unreachable */ });

// Send a form on Ctrl+Enter (or Cmd+Enter) from any of its text boxes.
function sendOnCtrlEnter(form, button, send) {
  form.addEventListener("submit", (event) => { event.preventDefault(); if (!button.disabled) send(); });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !event.isComposing) {
      event.preventDefault();
      if (!button.disabled) send();
    }
  });
}

async function busy(button, label, work) {
  const idle = button.textContent;
  button.disabled = true;
  button.textContent = label;
  try {
    await work();
  } finally {
    button.disabled = false;
    button.textContent = idle;
  }
}

// ---------------------------------------------------------------- classification

function setUpClassify(info) {
  const { el } = glassgpt;
  const form = document.getElementById("classify-form");
  const textsBox = document.getElementById("texts");
  const button = document.getElementById("classify-send");
  const predictions = document.getElementById("predictions");
  const errorBox = document.getElementById("classify-error");
  document.getElementById("class-list").textContent = info.classes.join(", ");
  document.getElementById("max-texts").textContent = info.limits.max_texts;

  // One text with its label, and a bar per class in the head's order (the label's bar is full width
  // at probability 1).
  const showPrediction = (result) => el("div", { class: "prediction" },
    el("div", { class: "said" }, el("span", { class: "label", text: result.label }), result.text),
    el("div", { class: "bars" }, ...Object.entries(result.probabilities).map(([name, p]) =>
      el("div", { class: "bar", "data-class": name },
        el("span", { class: "word", text: name }),
        el("span", { class: "track" }, el("span", { class: "fill", style: `display:block; width:${Math.max(0.5, 100 * p)}%` })),
        el("span", { class: "pct", text: glassgpt.percent(p) })))));

  async function classify() {
    const texts = textsBox.value.split("\n").map((line) => line.trim()).filter(Boolean);
    errorBox.textContent = "";
    if (!texts.length) {
      errorBox.textContent = "Type a text first (one per line).";
      return;
    }
    await busy(button, "Classifying…", async () => {
      try {
        const results = await glassgpt.json("/classify", { texts });
        predictions.replaceChildren(...results.map(showPrediction));
      } catch (error) {
        errorBox.textContent = error.message;
      }
    });
  }

  sendOnCtrlEnter(form, button, classify);
}

// ---------------------------------------------------------------- instructions

function setUpInstruct(info) {
  const form = document.getElementById("instruct-form");
  const button = document.getElementById("instruct-send");
  const response = document.getElementById("response");
  const promptShown = document.getElementById("instruct-prompt");
  const timing = document.getElementById("instruct-timing");
  const errorBox = document.getElementById("instruct-error");
  document.getElementById("template-name").textContent = info.template;

  for (const id of ["instruct-max-tokens", "instruct-temperature"]) {
    const input = document.getElementById(id);
    const shown = document.getElementById(`${id}-value`);
    input.addEventListener("input", () => { shown.textContent = input.value; });
  }
  const slider = document.getElementById("instruct-max-tokens");
  slider.max = info.limits.max_tokens;
  if (Number(slider.value) > info.limits.max_tokens) slider.value = info.limits.max_tokens;
  document.getElementById("instruct-max-tokens-value").textContent = slider.value;

  async function send() {
    const body = {
      instruction: document.getElementById("instruction").value,
      input: document.getElementById("instruction-input").value,
      max_tokens: Number(slider.value),
      temperature: Number(document.getElementById("instruct-temperature").value),
    };
    errorBox.textContent = "";
    if (!body.instruction.trim()) {
      errorBox.textContent = "Type an instruction first.";
      return;
    }
    timing.textContent = "";
    response.textContent = "";
    response.classList.add("streaming");
    let streamed = "";
    await busy(button, "Answering…", async () => {
      try {
        const answer = await glassgpt.request("/instruct/stream", body);
        for await (const event of glassgpt.serverEvents(answer)) {
          if (event.name === "piece") {
            streamed += event.data.text;
            response.textContent = streamed.trimStart();  // the response is shown stripped, as answered
          } else if (event.name === "done") {
            response.textContent = event.data.response;
            promptShown.textContent = event.data.prompt;
            document.getElementById("prompt-details").hidden = false;
            const ended = event.data.completion_tokens < body.max_tokens ? "ended at end-of-text" : "max tokens reached";
            timing.textContent = `Answered in ${event.data.time_s.toFixed(2)} s (${event.data.tokens_per_s.toFixed(1)} tokens/s)`;
            timing.append(" ", glassgpt.el("small", { text: `· ${event.data.completion_tokens} tokens · ${ended}` }));
          } else if (event.name === "error") throw new Error(event.data.error);
        }
      } catch (error) {
        errorBox.textContent = error.message;
      } finally {
        response.classList.remove("streaming");
      }
    });
  }

  sendOnCtrlEnter(form, button, send);
}
