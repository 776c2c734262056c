"""What the server does with the model, without any HTTP: load it, generate, classify, answer
instructions, look inside it.

Also the `Gate` that keeps a small CPU from being oversubscribed: a bounded number of jobs run at
once, a bounded number wait for a turn, and anything past that is refused at once (the app turns
that into 503 + Retry-After) instead of piling up in a queue nobody will live to see served. Each
admitted job holds a `Ticket`: how many tokens it asked for (the gate's Retry-After is the time the
admitted tokens take at the measured speed) and a flag its client sets by going away (a job
waiting for a turn then gives its place back, a running one stops before its next decoding step).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
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
    quarter of the bytes to read per token, the limit of decoding on a CPU), on `device` (on CUDA,
    decoding replays a CUDA graph: `glassgpt.generate`). `compile=True`: on CUDA the graphed step is
    compiled, on a CPU the step of a model that `glassgpt.cpu_step` does not serve (its one-call
    step is faster); during the warm-up (`glassgpt.generate`).

    What the model does (`task_of`) comes from the checkpoint: a classification head makes it a
    classifier; an instruction template in its glassgpt.json (or `template=` for a GPT object)
    makes it instruction-tuned. Both files are read here, so a broken template fails at start-up.
    """

    def __init__(self, source, tokenizer=None, name: str | None = None, dtype: str = "float32",
                 compile: bool = False, template: InstructionTemplate | None = None, device: str = "cpu"):
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
        self.device = device
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
                    model, tokenizer, _ = resolve_model(self.source, self.device,
                                                    dtype="float32" if int8 else self.dtype)
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


class Cancelled(Exception):
    """The job's client went away while it waited for a turn: it never ran, its place is given back."""


# The ticket of the job running in this worker thread (set by `with ticket:`), so the generation
# functions find their cancel flag and report their token counts without every route passing them.
_current_job: ContextVar[Ticket | None] = ContextVar("glassgpt_current_job", default=None)


def current_job() -> Ticket | None:
    """The `Ticket` of the gated job running in this thread, or None outside the gate."""
    return _current_job.get()


class Gate:
    """At most `max_running` jobs at once, at most `max_waiting` more queued; the rest refused.

    `admit()` is called where the request arrives and either refuses at once (`Busy`) or hands
    back a `Ticket`; the job then runs `with ticket:` in a worker thread, which waits for a turn.
    The ticket is given back when the job ends, whoever ends it, so a client that disconnects
    cannot leak a place in the queue.

    Retry-After (`drain_s`) is measured, not a worst case: every admitted job is counted at what it
    is expected to take. A job that declared its tokens takes tokens x fill / speed, where speed is
    the tokens per second finished jobs ran at (sums decayed by 0.8 a job, so recent jobs count
    most) and fill the share of their requested tokens they generated (a reply that reaches its
    end-of-text token early asks for more than it uses); other jobs take the mean duration of such
    jobs. A running job counts what it has left of that; the total is shared among the turns.
    """

    DECAY = 0.8  # the weight of the past in each running average, per finished job

    def __init__(self, max_running: int = 1, max_waiting: int = 8):
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.capacity = max_running + max_waiting
        self._lock = threading.Lock()
        # Turns are given in the order jobs asked for them (a plain semaphore lets late jobs overtake
        # early ones, and Retry-After would be no promise at all).
        self._turns = threading.Condition(threading.Lock())
        self._queue: collections.deque[Ticket] = collections.deque()
        self.running = 0
        self._jobs: set[Ticket] = set()
        self.mean_job_s = 1.0  # jobs not counted in tokens (classify, inspect); the first guess for all
        self._tokens_sum = 0.0  # decayed sums of finished jobs' generated tokens and seconds
        self._seconds_sum = 0.0
        self.fill = 1.0  # generated / requested tokens of finished jobs (running average)

    @property
    def admitted(self) -> int:
        """Jobs admitted and not yet finished: running or waiting for a turn."""
        return len(self._jobs)

    @property
    def tokens_per_s(self) -> float | None:
        """Measured tokens per second of one job (while sharing the CPU as jobs do); None before any."""
        return self._tokens_sum / self._seconds_sum if self._seconds_sum > 0 else None

    def admit(self, tokens: int = 0, cancelled: threading.Event | None = None) -> Ticket:
        """A ticket for a job that may generate up to `tokens` tokens (0: not counted in tokens), or
        Busy. `cancelled`: the flag that says the client has gone (a fresh one if None)."""
        with self._lock:
            if len(self._jobs) >= self.capacity:
                raise Busy(max(1, math.ceil(self._drain_s(time.perf_counter()))))
            ticket = Ticket(self, tokens, cancelled)
            self._jobs.add(ticket)
        return ticket

    def drain_s(self) -> float:
        """Seconds until every admitted job is done, at the measured speed (see the class)."""
        with self._lock:
            return self._drain_s(time.perf_counter())

    def _drain_s(self, now: float) -> float:
        speed = self.tokens_per_s
        total = 0.0
        for ticket in self._jobs:
            if ticket.tokens and speed is not None:
                expected = ticket.tokens * self.fill / speed
            else:
                expected = self.mean_job_s
            if ticket.started_at is not None:
                expected = max(0.0, expected - (now - ticket.started_at))
            total += expected
        return total / self.max_running

    def _finished(self, ticket: Ticket, job_s: float | None) -> None:
        with self._lock:
            self._jobs.discard(ticket)
            if job_s is None:  # never ran: nothing measured
                return
            keep = self.DECAY
            if ticket.generated:
                self._tokens_sum = keep * self._tokens_sum + ticket.generated
                self._seconds_sum = keep * self._seconds_sum + job_s
            if ticket.tokens and not ticket.cancelled.is_set():  # a cancelled job says nothing of fill
                self.fill = keep * self.fill + (1 - keep) * min(1.0, ticket.generated / ticket.tokens)
            elif not ticket.tokens:
                self.mean_job_s = keep * self.mean_job_s + (1 - keep) * job_s


class Ticket:
    """One admitted job: `with ticket:` waits for a turn, runs, then frees the turn and the place.

    `tokens`: what the job asked for; `generated`: what it made (the generation functions add to
    it); `cancelled`: set when its client goes away.
    """

    POLL_S = 0.05  # how often a job waiting for a turn looks whether its client is still there

    def __init__(self, gate: Gate, tokens: int = 0, cancelled: threading.Event | None = None):
        self.gate = gate
        self.tokens = tokens
        self.cancelled = cancelled if cancelled is not None else threading.Event()
        self.generated = 0
        self.started_at: float | None = None
        self._context = None

    def __enter__(self) -> Ticket:
        gate = self.gate
        with gate._turns:
            gate._queue.append(self)
            # A finished job wakes the waiters at once; the timeout only bounds how long a job whose
            # client left keeps its place in the queue.
            while gate._queue[0] is not self or gate.running >= gate.max_running:
                if self.cancelled.is_set():
                    gate._queue.remove(self)
                    gate._turns.notify_all()  # the job behind it may be first now
                    gate._finished(self, None)
                    raise Cancelled("the client went away while its request waited for a turn")
                gate._turns.wait(timeout=self.POLL_S)
            gate._queue.popleft()
            gate.running += 1
            gate._turns.notify_all()  # with several turns, the next in the queue may take one too
        self.started_at = time.perf_counter()
        self._context = _current_job.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _current_job.reset(self._context)
        gate = self.gate
        with gate._turns:
            gate.running -= 1
            gate._turns.notify_all()
        gate._finished(self, time.perf_counter() - self.started_at)

    def cancel(self) -> None:
        """Give the place back for a job that will never run."""
        self.gate._finished(self, None)


# ---------------------------------------------------------------- generation

def window_slide(context_length: int) -> int:
    """How far the served models' window moves once a reply fills the context: half of it.

    Past the context, GPT-2's learned positions cannot extend a KV cache; recomputing the last
    window at every step (generate.iter_tokens's default) makes each token cost a whole window's
    forward pass: one request of 256 new tokens after a 256-token prompt kept a 162M model busy for
    minutes. Moving the window half a context at a time costs one prefill of half a window every
    half-context tokens, about one token of prefill per token generated, and every token still
    sees at least half a context of text before it.
    """
    return max(1, context_length // 2)


def fit_prompt(tokenizer, prompt: str, context_length: int, max_tokens: int) -> tuple[str, int, int]:
    """(prompt to use, its token count, tokens dropped from its start).

    GPT-2's positions end at the context length. A prompt longer than the room left for the reply
    keeps its last tokens: at most `context_length - max_tokens`, so the reply decodes from the KV
    cache, but never fewer than half the context (a reply longer than that is served by moving the
    window, `window_slide`, rather than by throwing away most of the prompt).
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
    whether the prompt had to be cut to fit the context. `cancelled` stops early (client gone);
    inside the gate it defaults to the job's own flag (`current_job`), which also counts the tokens.
    Past the context the window moves by `window_slide` tokens at once.
    """
    started = time.perf_counter()
    job = current_job()
    if cancelled is None and job is not None:
        cancelled = job.cancelled
    context = model.config.context_length
    used_prompt, prompt_tokens, dropped = fit_prompt(tokenizer, prompt, context, max_tokens)
    timing = Timing()
    pieces = []
    stream = stream_text(model, tokenizer, used_prompt, max_tokens, sampling, timing=timing, compile=compile,
                         slide=window_slide(context), cancelled=cancelled)
    try:
        for piece in stream:
            pieces.append(piece)
            if on_piece is not None:
                on_piece(piece)
            if cancelled is not None and cancelled.is_set():
                break
    finally:
        stream.close()
        if job is not None:
            job.generated += timing.new_tokens
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


def instruction_prompt(model: GPT, tokenizer, template: InstructionTemplate, instruction: str,
                       input: str, max_tokens: int) -> str:  # noqa: A002
    """The prompt `run_instruction` continues; ValueError if the tokenizer cannot encode it or it does
    not fit the context with room for `max_tokens` (the streaming route checks this before it starts)."""
    prompt = template.format_prompt(instruction, input)
    context = model.config.context_length
    _, _, dropped = fit_prompt(tokenizer, prompt, context, max_tokens)
    if dropped:
        n_tokens, room = len(tokenizer.encode(prompt)), context - min(max_tokens, context // 2)
        raise ValueError(f"the prompt (the instruction in the {template.name} template) is {n_tokens} "
                         f"tokens; with max_tokens {max_tokens} at most {room} fit the model's context of "
                         f"{context}. Shorten the instruction or input, or ask for fewer tokens")
    return prompt


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
    prompt = instruction_prompt(model, tokenizer, template, instruction, input, max_tokens)
    result = run_generation(model, tokenizer, prompt, max_tokens, sampling, on_piece=on_piece,
                            cancelled=cancelled, compile=compile)
    return {"instruction": instruction, "input": input, "prompt": prompt,
            "response": result["completion"].strip(), "completion": result["completion"],
            **{key: result[key] for key in ("prompt_tokens", "completion_tokens", "time_s", "tokens_per_s")}}


# ---------------------------------------------------------------- looking inside

def inspect_text(model: GPT, tokenizer, text: str, top: int = 10) -> dict:
    """Tokens of `text`, the `top` most likely next tokens and every head's attention weights.

    Attention comes from the explicit path (`record_attention`): weights[layer][head][i][j]
    is how much token i looks at token j, each row summing to 1; "attention" is a numpy array
    (n_layers, n_heads, T, T), which `json_response` writes as nested lists.
    """
    ids = tokenizer.encode(text)
    with torch.inference_mode():
        logits, weights = record_attention(model, torch.tensor([ids], device=model.tok_emb.weight.device))
        probs = torch.softmax(logits[0, -1].double(), dim=-1)
        top_probs, top_ids = probs.topk(min(top, probs.shape[0]))
        # float64 before rounding, so 0.1234 serialises as 0.1234 and not 0.12340000271797180; one
        # array, not nested lists: layers x heads x T x T numbers are written straight from it
        # (`json_response`), where a Python float each cost more than the model itself.
        attention = torch.round(torch.cat(weights).double(), decimals=4).cpu().numpy()
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
