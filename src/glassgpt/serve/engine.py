"""What the server does with the model, without any HTTP: load it, generate, classify, answer
instructions, look inside it.

Also the `Gate` that keeps a small CPU from being oversubscribed: a bounded number of jobs run at
once, a bounded number wait for a turn, and anything past that is refused at once (the app turns
that into 503 + Retry-After) instead of piling up in a queue nobody will live to see served.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from glassgpt.generate import Sampling, Timing, iter_tokens, stream_text
from glassgpt.hub import check_model_spec, quantize_int8, resolve_model
from glassgpt.inspect import record_attention
from glassgpt.instruct import InstructionTemplate, load_template
from glassgpt.model import GPT
from glassgpt.weights import GLASSGPT_META

log = logging.getLogger("glassgpt.serve")


# ---------------------------------------------------------------- the model being served

class ModelHost:
    """The served model: loaded once, at start-up or on the first request that needs it.

    `source` is a GPT (then `tokenizer` is required) or anything `hub.resolve_model` accepts, loaded
    as `dtype`: "float32", "bfloat16" or "int8" (weight-only int8 Linear layers, `glassgpt.int8`: a
    quarter of the bytes to read per token, the limit of decoding on a CPU). `compile=True`:
    decode through compiled matrix-vector kernels on a CPU (`glassgpt.generate`), compiled during
    the warm-up.

    What the model does (`task_of`) comes from the checkpoint: a classification head makes it a
    classifier; an instruction template in its glassgpt.json (or `template=` for a GPT object)
    makes it instruction-tuned. Both files are read here, so a broken template fails at start-up.
    """

    def __init__(self, source, tokenizer=None, name: str | None = None, dtype: str = "float32",
                 compile: bool = False, template: InstructionTemplate | None = None):
        if isinstance(source, GPT) and tokenizer is None:
            raise ValueError("serving a GPT object needs its tokenizer: pass tokenizer=...")
        if not isinstance(source, GPT):
            check_model_spec(source)  # fail at start-up, not on the first request
        saved = _saved_metadata(source)
        self.template = template or (load_template(source) if saved else None)
        # A classifier's training run: "max_length" is the length its texts were cut to.
        self.finetune: dict = saved.get("finetune", {})
        self.source = source
        self.dtype = dtype
        self.compile = compile
        self._model = source if isinstance(source, GPT) else None
        self._tokenizer = tokenizer
        self.name = name or (source.config.name if isinstance(source, GPT) else Path(str(source)).name)
        self.load_time_s: float | None = 0.0 if self._model is not None else None
        self._lock = threading.Lock()
        self._warm = False
        self.description: dict | None = None  # GET /api/model's answer, made once at load
        if self._model is not None:
            self._check(self._model, self._tokenizer)
            self.description = describe_model(self._model, self._tokenizer, self.name, self.template)

    @property
    def ready(self) -> bool:
        return self._model is not None

    def get(self):
        """(model, tokenizer), loading them on the first call (thread-safe, loads once)."""
        if self._model is None or not self._warm:
            with self._lock:
                if self._model is None:
                    started = time.perf_counter()
                    int8 = self.dtype == "int8"
                    model, tokenizer, _ = resolve_model(self.source, dtype="float32" if int8 else self.dtype)
                    self._check(model, tokenizer)
                    # Described before quantising: int8 Linear layers hold no parameters to count.
                    self.description = describe_model(model, tokenizer, self.name, self.template)
                    if int8:
                        model = quantize_int8(model)
                        self.description["dtype"] = "int8 (Linear layers; embeddings and norms float32)"
                    self._tokenizer = tokenizer
                    self.load_time_s = time.perf_counter() - started
                    self._model = model.eval()
                    log.info("loaded model %s (%s parameters) in %.2f s", self.name,
                             f"{model.num_parameters():,}", self.load_time_s)
                if not self._warm:
                    self._warm_up(self._model)
                    self._warm = True
        return self._model, self._tokenizer

    def _warm_up(self, model: GPT) -> None:
        # PyTorch's first calls set up thread pools, kernels and allocator caches (and, with
        # compile=True, compile them); pay for that at start-up, through the very path requests
        # take (a prefill and a cached decode step), not in the first user's request.
        prefill = max(1, min(8, model.config.context_length - 1))
        if model.config.n_classes:  # a classifier runs one forward pass per batch, no decoding
            with torch.inference_mode():
                model(torch.zeros((1, prefill), dtype=torch.long, device=model.tok_emb.weight.device))
            return
        for _ in iter_tokens(model, [0] * prefill, 2, compile=self.compile):
            pass

    @property
    def task(self) -> str | None:
        """"classify", "instruct" or "generate" (`task_of`); None until the model is loaded."""
        return self.description["task"] if self.description else None

    @staticmethod
    def _check(model: GPT, tokenizer) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the {tokenizer.name} tokenizer makes ids up to {tokenizer.vocab_size - 1:,} but the model "
                f"only has {model.config.vocab_size:,} token embeddings; "
                "serve a model with a matching vocabulary"
            )


def _saved_metadata(source) -> dict:
    """The glassgpt.json of a checkpoint directory (empty for anything else: a GPT, a preset, HF)."""
    if isinstance(source, GPT):
        return {}
    meta_file = Path(str(source)) / GLASSGPT_META
    if not meta_file.is_file():
        return {}
    return json.loads(meta_file.read_text(encoding="utf-8"))


def task_of(config, template: InstructionTemplate | None) -> str:
    """"classify" (a classification head), "instruct" (a language model with an instruction
    template) or "generate" (a plain language model)."""
    if config.n_classes:
        return "classify"
    return "instruct" if template is not None else "generate"


# ---------------------------------------------------------------- bounded concurrency

class Busy(Exception):
    """Every running slot and every waiting place is taken."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the server is busy; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Gate:
    """At most `max_running` jobs at once, at most `max_waiting` more queued; the rest refused.

    `admit()` is called where the request arrives and either refuses at once (`Busy`) or hands
    back a `Ticket`; the job then runs `with ticket:` in a worker thread, which waits for a turn.
    The ticket is given back when the job ends, whoever ends it, so a client that disconnects
    cannot leak a place in the queue.
    """

    def __init__(self, max_running: int = 1, max_waiting: int = 8):
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.capacity = max_running + max_waiting
        self._turns = threading.Semaphore(max_running)
        self._lock = threading.Lock()
        self.admitted = 0
        self.mean_job_s = 1.0  # a running average, to tell refused clients when to come back

    def admit(self) -> Ticket:
        with self._lock:
            if self.admitted >= self.capacity:
                rounds = math.ceil(self.admitted / self.max_running)
                raise Busy(max(1, math.ceil(rounds * self.mean_job_s)))
            self.admitted += 1
        return Ticket(self)

    def _finished(self, job_s: float | None) -> None:
        with self._lock:
            self.admitted -= 1
            if job_s is not None:
                self.mean_job_s = 0.8 * self.mean_job_s + 0.2 * job_s


class Ticket:
    """One admitted job: `with ticket:` waits for a turn, runs, then frees the turn and the place."""

    def __init__(self, gate: Gate):
        self.gate = gate
        self._started: float | None = None

    def __enter__(self) -> Ticket:
        self.gate._turns.acquire()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.gate._turns.release()
        self.gate._finished(time.perf_counter() - self._started)

    def cancel(self) -> None:
        """Give the place back for a job that will never run."""
        self.gate._finished(None)


# ---------------------------------------------------------------- generation

def fit_prompt(tokenizer, prompt: str, context_length: int, max_tokens: int) -> tuple[str, int, int]:
    """(prompt to use, its token count, tokens dropped from its start).

    GPT-2's positions end at the context length. A prompt longer than the room left for the reply
    keeps its last tokens: at most `context_length - max_tokens`, but never fewer than half the
    context, so the reply decodes from the KV cache instead of recomputing the window every step.
    """
    ids = tokenizer.encode(prompt)
    room = context_length - min(max_tokens, context_length // 2)
    if len(ids) <= room:
        return prompt, len(ids), 0
    kept = ids[-room:]
    text = tokenizer.decode(kept)
    return text, len(tokenizer.encode(text)), len(ids) - len(kept)


def run_generation(model: GPT, tokenizer, prompt: str, max_tokens: int, sampling: Sampling | None = None,
                   on_piece: Callable[[str], None] | None = None,
                   cancelled: threading.Event | None = None, compile: bool = False) -> dict:
    """Continue `prompt` by up to `max_tokens` tokens picked as `sampling` says (default greedy); call
    `on_piece` with each text piece as it is made; return the summary.

    The summary is what POST /generate answers: text, completion, token counts, timing and
    whether the prompt had to be cut to fit the context. `cancelled` stops early (client gone).
    """
    started = time.perf_counter()
    context = model.config.context_length
    used_prompt, prompt_tokens, dropped = fit_prompt(tokenizer, prompt, context, max_tokens)
    timing = Timing()
    pieces = []
    stream = stream_text(model, tokenizer, used_prompt, max_tokens, sampling, timing=timing, compile=compile)
    for piece in stream:
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)
        if cancelled is not None and cancelled.is_set():
            stream.close()
            break
    elapsed = time.perf_counter() - started
    completion = "".join(pieces)
    return {
        "text": prompt + completion,
        "completion": completion,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": timing.new_tokens,
        "time_s": round(elapsed, 4),
        "tokens_per_s": round(timing.new_tokens / elapsed, 2) if elapsed > 0 else 0.0,
        "truncated": dropped > 0,
        "dropped_prompt_tokens": dropped,
    }


# ---------------------------------------------------------------- fine-tuned models

def run_classification(model: GPT, tokenizer, texts: Sequence[str], max_length: int | None = None
                       ) -> list[dict]:
    """Each text's label and class probabilities: `glassgpt.classify.predict`, as `glassgpt classify`
    runs it (texts cut to `max_length` tokens, the length the classifier was trained with)."""
    from glassgpt.classify import predict

    return predict(model, tokenizer, list(texts), max_length=max_length)


def run_instruction(model: GPT, tokenizer, template: InstructionTemplate, instruction: str, input: str,  # noqa: A002
                    max_tokens: int, sampling: Sampling | None = None,
                    on_piece: Callable[[str], None] | None = None,
                    cancelled: threading.Event | None = None, compile: bool = False) -> dict:
    """The response to `instruction` (and `input`), put into `template`'s prompt as training did.

    The model continues the prompt until its end-of-text token (or `max_tokens`, or a stop string);
    the answer is the response alone, stripped, as `glassgpt.instruct.respond` gives it, plus the
    prompt the model saw and run_generation's counts. A prompt that does not fit the context is
    refused (ValueError), not cut: cutting would drop the template's start, which the model needs.
    """
    prompt = template.format_prompt(instruction, input)
    context = model.config.context_length
    _, _, dropped = fit_prompt(tokenizer, prompt, context, max_tokens)
    if dropped:
        n_tokens, room = len(tokenizer.encode(prompt)), context - min(max_tokens, context // 2)
        raise ValueError(f"the prompt (the instruction in the {template.name} template) is {n_tokens} "
                         f"tokens; with max_tokens {max_tokens} at most {room} fit the model's context of "
                         f"{context}. Shorten the instruction or input, or ask for fewer tokens")
    result = run_generation(model, tokenizer, prompt, max_tokens, sampling, on_piece=on_piece,
                            cancelled=cancelled, compile=compile)
    return {"instruction": instruction, "input": input, "prompt": prompt,
            "response": result["completion"].strip(), "completion": result["completion"],
            **{key: result[key] for key in ("prompt_tokens", "completion_tokens", "time_s", "tokens_per_s")}}


# ---------------------------------------------------------------- looking inside

def inspect_text(model: GPT, tokenizer, text: str, top: int = 10) -> dict:
    """Tokens of `text`, the `top` most likely next tokens and every head's attention weights.

    Attention comes from the explicit path (`record_attention`): weights[layer][head][i][j]
    is how much token i looks at token j, each row summing to 1.
    """
    ids = tokenizer.encode(text)
    with torch.inference_mode():
        logits, weights = record_attention(model, torch.tensor([ids], device=model.tok_emb.weight.device))
        probs = torch.softmax(logits[0, -1].double(), dim=-1)
        top_probs, top_ids = probs.topk(min(top, probs.shape[0]))
        # float64 before rounding, so 0.1234 serialises as 0.1234 and not 0.12340000271797180.
        attention = [torch.round(w[0].double(), decimals=4).tolist() for w in weights]
    top_ids = top_ids.tolist()
    return {
        "tokens": [{"id": i, "text": s} for i, s in zip(ids, tokenizer.token_strings(ids), strict=True)],
        "next_tokens": [{"id": i, "text": s, "prob": round(p, 6)}
                        for i, s, p in zip(top_ids, tokenizer.token_strings(top_ids), top_probs.tolist(),
                                           strict=True)],
        "attention": attention,
        "n_layers": model.config.n_layers,
        "n_heads": model.config.n_heads,
    }


def describe_model(model: GPT, tokenizer, name: str, template: InstructionTemplate | None = None) -> dict:
    """What GET /api/model answers: config, parameter breakdown, size, device and dtype; the task
    (`task_of`), a classifier's classes and an instruction-tuned model's template name."""
    from glassgpt.classify import class_names

    parameters = list(model.parameters())
    size_bytes = sum(p.numel() * p.element_size() for p in parameters)
    first = parameters[0]
    return {
        "name": name,
        "config": model.config.to_dict(),
        "parameters": model.num_parameters(),
        "breakdown": [{"name": part, "parameters": count} for part, count in model.parameter_breakdown()],
        "size_bytes": size_bytes,
        "size_mib": round(size_bytes / 2**20, 1),
        "device": str(first.device),
        "dtype": str(first.dtype).removeprefix("torch."),
        "tokenizer": tokenizer.name,
        "task": task_of(model.config, template),
        "classes": class_names(model.config) if model.config.n_classes else None,
        "template": template.name if template is not None and not model.config.n_classes else None,
    }
