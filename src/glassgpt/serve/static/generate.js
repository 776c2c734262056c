// The generate box of the page at /: send the prompt to POST /generate/stream, show each piece as
// it arrives, then the timing line from the final event. (tasks.js swaps in the classify or
// instruct box when the served model is a classifier or instruction-tuned.)
"use strict";

const form = document.getElementById("generate-form");
const promptBox = document.getElementById("prompt");
const sendButton = document.getElementById("send");
const output = document.getElementById("output");
const timing = document.getElementById("timing");
const errorBox = document.getElementById("error");

for (const id of ["max-tokens", "temperature"]) {
  const input = document.getElementById(id);
  const shown = document.getElementById(`${id}-value`);
  input.addEventListener("input", () => { shown.textContent = input.value; });
}

// The slider's upper end is the server's own cap.
glassgpt.model().then((info) => {
  const slider = document.getElementById("max-tokens");
  slider.max = info.limits.max_tokens;
  if (Number(slider.value) > info.limits.max_tokens) slider.value = info.limits.max_tokens;
  document.getElementById("max-tokens-value").textContent = slider.value;
}).catch(() => { /* the header badge already says the model is unreachable */ });

function optionalNumber(id) {
  const value = document.getElementById(id).value.trim();
  return value === "" ? null : Number(value);
}

function requestBody() {
  const body = {
    prompt: promptBox.value,
    max_tokens: Number(document.getElementById("max-tokens").value),
    temperature: Number(document.getElementById("temperature").value),
  };
  for (const [field, id] of [["top_k", "top-k"], ["top_p", "top-p"], ["seed", "seed"]]) {
    const value = optionalNumber(id);
    if (value !== null) body[field] = value;
  }
  return body;
}

function showTiming(result) {
  timing.textContent = `Generated in ${result.time_s.toFixed(2)} s (${result.tokens_per_s.toFixed(1)} tokens/s)`;
  const details = [`${result.completion_tokens} new tokens`, `prompt ${result.prompt_tokens} tokens`];
  if (result.truncated) details.push(`prompt cut: its first ${result.dropped_prompt_tokens} tokens did not fit the context`);
  timing.append(" ", glassgpt.el("small", { text: "· " + details.join(" · ") }));
}

async function send() {
  const body = requestBody();
  if (!body.prompt) {
    errorBox.textContent = "Type a prompt first.";
    return;
  }
  sendButton.disabled = true;
  sendButton.textContent = "Generating…";
  errorBox.textContent = "";
  timing.textContent = "";
  const [promptSpan, completionSpan] = output.children;
  promptSpan.textContent = body.prompt;
  completionSpan.textContent = "";
  output.classList.add("streaming");
  try {
    const response = await glassgpt.request("/generate/stream", body);
    for await (const event of glassgpt.serverEvents(response)) {
      if (event.name === "piece") completionSpan.textContent += event.data.text;
      else if (event.name === "done") {
        completionSpan.textContent = event.data.completion;
        showTiming(event.data);
      } else if (event.name === "error") throw new Error(event.data.error);
    }
  } catch (error) {
    errorBox.textContent = error.message;
  } finally {
    output.classList.remove("streaming");
    sendButton.disabled = false;
    sendButton.textContent = "Send";
  }
}

form.addEventListener("submit", (event) => { event.preventDefault(); send(); });
promptBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    if (!sendButton.disabled) send();
  }
});
