"""lm-eval against `glassgpt serve`, end to end and offline, checked against glassgpt's own scoring.

    pip install "lm-eval[api]"                  # in any environment with glassgpt importable
    python bench/lm_eval_end_to_end.py [--model runs/demo] [--limit 40]

What it does, as a user would:
1. starts `glassgpt serve --model MODEL` (uvicorn on loopback);
2. writes the model's tokenizer as Hugging Face files (`BPETokenizer.save_hf`) so lm-eval's
   tokenizer needs no download, and two local tasks: `glassgpt_verdict` (perplexity of The
   Verdict's paragraphs: `loglikelihood_rolling`) and `glassgpt_sms` (SMS spam or not as a
   two-way multiple choice: `loglikelihood` of each answer after the message);
3. runs `lm_eval --model local-completions` on them (lm-eval scores through `/v1/completions` with
   `echo` and `logprobs`, the route under test);
4. scores the same texts in this process with the model itself (no server, no lm-eval) and prints
   both: word perplexity and accuracy must agree to float rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _server import ServeProcess  # bench/ is on the path when a bench runs as a script

from glassgpt.bpe import BPETokenizer
from glassgpt.hub import resolve_model

DATA = Path(__file__).resolve().parents[1] / "src" / "glassgpt" / "assets"
VERDICT_TASK = """task: glassgpt_verdict
dataset_path: json
dataset_kwargs:
  data_files: {test: "%s"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
SMS_TASK = """task: glassgpt_sms
dataset_path: json
dataset_kwargs:
  data_files: {test: "%s"}
test_split: test
output_type: multiple_choice
doc_to_text: "Message: {{text}}\\nSpam or ham?"
doc_to_choice: ["ham", "spam"]  # lm-eval puts its target_delimiter, " ", before each
doc_to_target: label
metric_list:
  - metric: acc
"""


def paragraphs(limit: int) -> list[str]:
    text = (DATA / "the-verdict.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40][:limit]


def sms(limit: int) -> list[dict]:
    rows = []
    for line in (DATA / "sms-spam-collection.tsv").read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition("\t")
        if label in ("ham", "spam"):
            rows.append({"text": text, "label": int(label == "spam")})
    spam, ham = [r for r in rows if r["label"]], [r for r in rows if not r["label"]]
    return (spam[:limit // 2] + ham[:limit - limit // 2])


@torch.inference_mode()
def logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= start, from one forward pass (ids fit the context)."""
    tokens = torch.tensor([ids], device=model.tok_emb.weight.device)
    logprobs = torch.log_softmax(model(tokens)[0].double(), dim=-1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))


def own_scores(model, tokenizer, texts: list[str], messages: list[dict]) -> dict[str, float]:
    """lm-eval's two metrics computed directly: rolling loglikelihood after the end-of-text token
    (the texts fit the context: one window each), and multiple choice by the larger loglikelihood."""
    total, words = 0.0, 0
    for text in texts:
        total += logprob(model, [tokenizer.eos_id, *tokenizer.encode(text)], 1)
        words += len(text.split())
    correct = 0
    for message in messages:
        context = tokenizer.encode(f"Message: {message['text']}\nSpam or ham?")
        scores = [logprob(model, context + tokenizer.encode(choice), len(context))
                  for choice in (" ham", " spam")]
        correct += int(max(range(2), key=scores.__getitem__) == message["label"])
    return {"word_perplexity": math.exp(-total / words), "acc": correct / len(messages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/demo", help="a checkpoint directory or preset")
    parser.add_argument("--limit", type=int, default=40, help="paragraphs and messages per task")
    parser.add_argument("--lm-eval", default="lm_eval", help="the lm_eval command")
    args = parser.parse_args()
    model, tokenizer, description = resolve_model(args.model)
    texts, messages = paragraphs(args.limit), sms(args.limit)
    context = model.config.context_length
    texts = [t for t in texts if len(tokenizer.encode(t)) < context]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        BPETokenizer.from_tiktoken_ranks().save_hf(scratch / "tokenizer", model_max_length=context)
        (scratch / "verdict.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        (scratch / "sms.jsonl").write_text("".join(json.dumps(m) + "\n" for m in messages))
        tasks = scratch / "tasks"
        tasks.mkdir()
        (tasks / "glassgpt_verdict.yaml").write_text(VERDICT_TASK % (scratch / "verdict.jsonl"))
        (tasks / "glassgpt_sms.yaml").write_text(SMS_TASK % (scratch / "sms.jsonl"))

        with ServeProcess(["--model", args.model, "--dtype", "float32", "--max-waiting", "64"]) as server:
            url = server.url
            served = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            started = time.perf_counter()
            command = [args.lm_eval, "--model", "local-completions",
                       "--tasks", "glassgpt_verdict,glassgpt_sms", "--include_path", str(tasks),
                       "--batch_size", "1", "--output_path", str(scratch / "out"),
                       "--model_args", f"model={served},base_url={url}/v1/completions,"
                       f"tokenizer={scratch / 'tokenizer'},tokenizer_backend=huggingface,"
                       f"max_length={context}"]
            print("$ " + " ".join(command), flush=True)
            subprocess.run(command, check=True)
            seconds = time.perf_counter() - started
        results = {}
        for path in (scratch / "out").rglob("results_*.json"):
            results.update(json.loads(path.read_text())["results"])
    ours = own_scores(model, tokenizer, texts, messages)
    theirs = {"word_perplexity": results["glassgpt_verdict"]["word_perplexity,none"],
              "acc": results["glassgpt_sms"]["acc,none"]}
    print(f"\n{description}: {len(texts)} paragraphs of The Verdict, {len(messages)} SMS messages; "
          f"lm-eval took {seconds:.0f} s")
    for name in ("word_perplexity", "acc"):
        print(f"  {name:16s} lm-eval through /v1/completions {theirs[name]:.6f}   glassgpt in-process "
              f"{ours[name]:.6f}   relative difference {abs(theirs[name] - ours[name]) / ours[name]:.1e}")


if __name__ == "__main__":
    main()
