"""The OpenAI-compatible API: the wire the OpenAI SDKs, chat front-ends and lm-eval speak.

    POST /v1/completions        prompt(s) -> text_completion (or its `data: {...}` stream), with
                                log-probabilities of generated and (echo) prompt tokens
    POST /v1/chat/completions   messages -> chat.completion (or chat.completion.chunk stream)
    GET  /v1/models[/{id}]      the served model

Same process, same `Gate`, same bounds as /generate. Tokens come from `generate.iter_tokens`, the
one decoding loop; its `observe` hook hands over the logits each token was picked from, and the
log-probabilities reported are their log-softmax (the model's own distribution, before temperature
and top-p, as OpenAI documents), so a greedy token is always the top alternative.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for an invalid
request (FastAPI's validation, answered under /v1 as OpenAI does: 400, not 422), 404 for
a model other than the served one, 429 + Retry-After when the gate is full.

Chat on a plain language model (no instruction template) renders the messages as plain text, one
"Role: content" line per message, then "Assistant:" for the model to continue; generation also
stops at "\\nUser:" so the model does not write the user's next turn. On an instruction-tuned
checkpoint the last user message is the instruction of the saved template, and any earlier
messages (system included) become its input as "Role: content" lines.
"""

# No `from __future__ import annotations`: pydantic reads the request models' annotations.

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Literal

import torch
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.concurrency import run_in_threadpool

from glassgpt.generate import Sampling, _first_stop, detokenize_stream, iter_tokens
from glassgpt.serve.app import (
    CLIENT_LEFT,
    LANGUAGE_MODEL,
    SEED_BOUND,
    ErrorResponse,
    Integer,
    ServeSettings,
    gated,
    integer,
    left_early,
    require_task,
    stream_job,
)
from glassgpt.serve.engine import Cancelled, Gate, ModelHost, current_job, window_slide
from glassgpt.serve.middleware import CLIENT_CLOSED, client_gone

log = logging.getLogger("glassgpt.serve")

MAX_CHOICES = 16            # prompts x n of one request
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
PLAIN_CHAT_STOP = "\nUser:"


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(status_code=self.status, content=body, headers=self.headers)


# ---------------------------------------------------------------- request bodies

Stop = str | list[str] | None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False  # a last chunk with no choices and the usage


class _Common(BaseModel):
    # Fields OpenAI defines that do not change glassgpt's answer (user, ...) are accepted and ignored.
    # Strict, as /generate is: "5" or true for an integer is a 400, as the published schema says.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Integer = Field(1, ge=1, le=MAX_CHOICES)
    stop: Stop = None
    seed: integer(ge=0, lt=SEED_BOUND) | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0: penalties are not supported")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0: penalties are not supported")
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > 4 or any(not 1 <= len(s) <= 64 for s in stops):
            raise OpenAIError(400, "stop: up to 4 strings of 1 to 64 characters", param="stop")
        return stops

    def check_unsupported(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise OpenAIError(400, f"{name} is not supported (only 0)", param=name)

    def sampling(self, choice: int) -> Sampling:
        # n choices of one seeded request differ from each other, and the request stays reproducible.
        seed = None if self.seed is None else (self.seed + choice) % SEED_BOUND
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=seed)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[Integer] | list[list[Integer]] = ""
    max_tokens: integer(ge=0) | None = 16
    logprobs: integer(ge=0, le=MAX_COMPLETION_LOGPROBS) | None = None
    echo: bool = False
    best_of: Integer | None = Field(None, description="only n (or none): one answer per choice")
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts can be read
            if any(part.get("type") != "text" for part in self.content):
                raise OpenAIError(400, "only text content parts are supported", param="messages")
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: integer(ge=1) | None = None
    max_completion_tokens: integer(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: integer(ge=0, le=MAX_CHAT_TOP_LOGPROBS) | None = None


class OpenAIErrorBody(BaseModel):
    error: dict | str = Field(description="{message, type, param, code}; a path that names no route: "
                                          "\"Not Found\"")


# Every status code a route answers, in its OpenAPI entry (the schemathesis test checks it). A body
# that is not even UTF-8 is refused before the /v1 handlers see it, in /generate's {"error": "..."}.
NOT_FOUND = {404: {"model": OpenAIErrorBody, "description": "no such model (GET /v1/models)"}}
GENERATING = {
    **NOT_FOUND,
    400: {"description": "an invalid request, in OpenAI's error shape (a body that is not UTF-8: "
                         "{\"error\": \"...\"})"},
    413: {"model": ErrorResponse, "description": "the body is over the server's limit"},
    429: {"model": OpenAIErrorBody, "description": "busy: try again after Retry-After seconds"},
}


def invalid_body(errors: list[dict]) -> OpenAIError:
    """A 400 naming the first bad field (`param`) and saying what is wrong with up to five."""
    def where(error: dict) -> str:
        return ".".join(str(part) for part in error.get("loc", ()) if part != "body")

    message = "; ".join(f"{where(e) or 'body'}: {e.get('msg')}".replace("Value error, ", "")
                        for e in errors[:5])
    return OpenAIError(400, message or "invalid request body", param=where(errors[0]) if errors else None)


# ---------------------------------------------------------------- one choice, generated

class Token:
    """One token with its log-probability and the top alternatives ([(text, logprob)])."""

    __slots__ = ("id", "text", "logprob", "top")

    def __init__(self, id: int, text: str, logprob: float | None, top: list | None):  # noqa: A002
        self.id, self.text, self.logprob, self.top = id, text, logprob, top


def _top(tokenizer, logprobs: torch.Tensor, k: int) -> list[tuple[str, float]]:
    if k <= 0:
        return []
    values, ids = logprobs.topk(k)
    return [(tokenizer.decode([i]), v) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]


def prompt_logprobs(model, tokenizer, ids: list[int], k: int) -> list[Token]:
    """Each prompt token with its log-probability given the tokens before it (the first has none):
    one forward pass, the scoring `glassgpt eval` does."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=model.tok_emb.weight.device))[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
    tokens = [Token(ids[0], tokenizer.decode([ids[0]]), None, None)]
    for position in range(1, len(ids)):
        row = logprobs[position - 1]
        tokens.append(Token(ids[position], tokenizer.decode([ids[position]]), float(row[ids[position]]),
                            _top(tokenizer, row, k)))
    return tokens


def generate_choice(model, tokenizer, ids: list[int], max_tokens: int, sampling: Sampling,
                    stops: tuple[str, ...], top_k: int, on_piece: Callable[[str, list[Token]], None],
                    cancelled: threading.Event | None, compile: bool, metrics=None) -> str:
    """Continue `ids`; call `on_piece(text, tokens)` with each text piece and the tokens that made it
    (an end-of-text token too, with no text); return the finish reason, "stop" or "length". `metrics`
    (serve.metrics.Metrics) counts the tokens and the time to the first piece. Like
    engine.run_generation: `cancelled` defaults to the gated job's flag, past the context the window
    moves by `window_slide`, and the tokens made are added to the job's count."""
    steps: list[Token] = []
    eos_id = tokenizer.eos_id
    job = current_job()
    if cancelled is None and job is not None:
        cancelled = job.cancelled

    def observe(logits: torch.Tensor, next_ids: torch.Tensor) -> None:
        row = torch.log_softmax(logits[0].float(), dim=-1)
        token_id = int(next_ids[0])
        steps.append(Token(token_id, tokenizer.decode([token_id]), float(row[token_id]),
                           _top(tokenizer, row, top_k)))

    tokens = iter_tokens(model, ids, max_tokens, Sampling(temperature=sampling.temperature,
                                                         top_p=sampling.top_p, seed=sampling.seed,
                                                         eos_id=eos_id), compile=compile, observe=observe,
                         slide=window_slide(model.config.context_length), cancelled=cancelled)
    stream = detokenize_stream(tokenizer, tokens, stops)
    reported, started, first_at = 0, time.perf_counter(), None
    try:
        for piece in stream:
            first_at = first_at or time.perf_counter()
            made, reported = steps[reported:], len(steps)
            on_piece(piece, made)
            if cancelled is not None and cancelled.is_set():
                break
        else:
            # The end-of-text token shows no text but is reported, as OpenAI does: harnesses that
            # slice the echoed token list by position (lm-eval) rely on every token being there.
            if steps[reported:] and steps[-1].id == eos_id:
                on_piece("", steps[reported:])
    finally:
        stream.close()
        tokens.close()
        if job is not None:
            job.generated += len(steps)
    generated = [token.id for token in steps if token.id != eos_id]
    if metrics is not None:
        metrics.generated(started, first_at, len(generated))
    if len(generated) < len(steps) or (stops and _first_stop(tokenizer.decode(generated), stops) >= 0):
        return "stop"
    return "length" if len(steps) >= max_tokens else "stop"


# ---------------------------------------------------------------- the response shapes

def completion_logprobs(tokens: list[Token], start_offset: int) -> dict:
    offsets, offset = [], start_offset
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.top is None else dict(t.top) for t in tokens], "text_offset": offsets}


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: list[Token]) -> list[dict]:
    return [{"token": t.text, "logprob": t.logprob, "bytes": _bytes(t.text),
             "top_logprobs": [{"token": text, "logprob": lp, "bytes": _bytes(text)}
                              for text, lp in t.top or []]}
            for t in tokens]


def render_chat(messages: list[ChatMessage], template) -> tuple[str, tuple[str, ...]]:
    """(the prompt the model continues, extra stop strings): see the module's docstring."""
    lines = [f"{m.role.capitalize()}: {m.text()}" for m in messages]
    if template is None:
        return "\n".join(lines) + "\nAssistant:", (PLAIN_CHAT_STOP,)
    if messages[-1].role != "user":
        raise OpenAIError(400, "the last message must be the user's: it is the instruction", param="messages")
    return template.format_prompt(messages[-1].text(), "\n".join(lines[:-1])), ()


# ---------------------------------------------------------------- the routes

def metrics_of(app: FastAPI):
    """The app's serve.metrics.Metrics, if it has them."""
    return getattr(app.state, "metrics", None)


def install_openai_api(app: FastAPI, host: ModelHost, gate: Gate, settings: ServeSettings) -> None:
    """POST /v1/completions, POST /v1/chat/completions, GET /v1/models and /v1/models/{id}."""

    @app.exception_handler(OpenAIError)
    async def openai_error(request, exc: OpenAIError):
        return exc.response()

    # FastAPI validates the bodies (so /docs shows them); under /v1 a bad one is OpenAI's 400.
    elsewhere = app.exception_handlers.get(RequestValidationError)

    @app.exception_handler(RequestValidationError)
    async def validation_failed(request, exc: RequestValidationError):
        if request.url.path.startswith("/v1/") or elsewhere is None:
            return invalid_body(list(exc.errors())).response()
        return await elsewhere(request, exc)

    # The published maxima are this server's, as /generate's are: max_tokens up to its cap.
    tokens = settings.max_tokens_cap
    Completion = create_model("CompletionRequest", __base__=CompletionRequest,
                              max_tokens=(integer(ge=0, le=tokens) | None, min(16, tokens)))
    Chat = create_model("ChatRequest", __base__=ChatRequest,
                        max_tokens=(integer(ge=1, le=tokens) | None, None),
                        max_completion_tokens=(integer(ge=1, le=tokens) | None, None))

    def model_card() -> dict:
        return {"id": host.name, "object": "model", "created": 0, "owned_by": "glassgpt"}

    @app.get("/v1/models", tags=["openai"])
    async def list_models():
        """The served model, as OpenAI lists models."""
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=NOT_FOUND, tags=["openai"])
    async def get_model(model_id: str):
        """The served model, if `model_id` names it."""
        if model_id != host.name:
            raise OpenAIError(404, f"the model {model_id!r} does not exist; this server serves "
                              f"{host.name!r}", param="model", code="model_not_found")
        return model_card()

    async def check(request: _Common) -> None:
        if request.model != host.name:
            raise OpenAIError(404, f"the model {request.model!r} does not exist; this server serves "
                              f"{host.name!r} (GET /v1/models)", param="model", code="model_not_found")
        request.check_unsupported()
        try:
            await require_task(host, *LANGUAGE_MODEL)
        except HTTPException as error:
            raise OpenAIError(400, str(error.detail), param="model") from None

    def fit(ids: list[int], context: int) -> None:
        # The prompt must fit the context (echo scores it in one forward pass; nothing is cut, so
        # a harness's numbers are never silently those of a shorter text); the reply may go past
        # it: the window then moves half a context at a time (engine.window_slide), as on /generate.
        if len(ids) > context:
            raise OpenAIError(400, f"the prompt is {len(ids)} tokens: more than the model's context of "
                              f"{context}", param="prompt", code="context_length_exceeded")

    def check_max_tokens(max_tokens: int) -> None:
        if max_tokens > settings.max_tokens_cap:
            raise OpenAIError(400, f"max_tokens must be at most {settings.max_tokens_cap}",
                              param="max_tokens")

    def prompts_of(request: CompletionRequest) -> list[str | list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise OpenAIError(400, "prompt must not be an empty list", param="prompt")
        if len(prompts) * request.n > MAX_CHOICES:
            raise OpenAIError(400, f"prompts x n must be at most {MAX_CHOICES}", param="n")
        for p in prompts:
            if isinstance(p, str) and len(p) > settings.max_prompt_chars:
                raise OpenAIError(400, f"each prompt may have at most {settings.max_prompt_chars} characters",
                                  param="prompt")
        return prompts

    def prepare(request: CompletionRequest, prompts, model, tokenizer) -> list[tuple[list[int], str]]:
        """(ids, text) of every prompt, each checked: refusals come before any work, and before a
        stream begins. Tokenizing is cheap next to a forward pass, so it runs here, outside the gate."""
        prepared = []
        for prompt in prompts:
            ids = list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
            if any(not 0 <= i < model.config.vocab_size for i in ids):
                raise OpenAIError(400, "prompt token ids must lie in the model's vocabulary", param="prompt")
            text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
            if not ids and (request.echo or request.max_tokens == 0):
                raise OpenAIError(400, "the prompt is empty: there is nothing to score", param="prompt")
            fit(ids, model.config.context_length)
            prepared.append((ids, text))
        return prepared

    def completions_work(request: CompletionRequest, prepared, stops, emit, cancelled) -> tuple[list, dict]:
        """Every choice of a completion request, in a worker thread; `emit(index, text, tokens, finish,
        offset)` for each piece (finish None) and once at each choice's end (text ""). (choices, usage)"""
        model, tokenizer = host.get()
        max_tokens, k = request.max_tokens, request.logprobs or 0
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        choices = []
        job = current_job()
        gone = cancelled if cancelled is not None else job.cancelled if job is not None else None
        for p, (ids, text) in enumerate(prepared):
            if gone is not None and gone.is_set():  # its client left: score and generate no more
                break
            scored = request.echo and request.logprobs is not None
            echoed = prompt_logprobs(model, tokenizer, ids, k) if scored else []
            for c in range(request.n):
                index = p * request.n + c
                usage["prompt_tokens"] += len(ids)
                pieces, tokens = [text] if request.echo else [], list(echoed)
                if request.echo:
                    emit(index, text, echoed, None, 0)

                def on_piece(piece, made, index=index, pieces=pieces, tokens=tokens):
                    offset = sum(len(x) for x in pieces)
                    pieces.append(piece)
                    tokens.extend(made)
                    emit(index, piece, made, None, offset)

                finish = "length"
                if max_tokens > 0:
                    finish = generate_choice(model, tokenizer, ids or [tokenizer.eos_id], max_tokens,
                                             request.sampling(c), stops, k, on_piece, cancelled, host.compile,
                                             metrics_of(app))
                generated = len(tokens) - len(echoed)
                usage["completion_tokens"] += generated
                emit(index, "", [], finish, 0)
                choices.append({"text": "".join(pieces), "index": index, "finish_reason": finish,
                                "logprobs": completion_logprobs(tokens, 0) if request.logprobs is not None
                                else None})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return choices, usage

    @app.post("/v1/completions", responses=GENERATING, tags=["openai"])
    async def completions(request: Completion):
        """OpenAI's legacy completions: continue each prompt `n` times; `logprobs` k gives each token's
        log-probability and the k likeliest alternatives; `echo` puts the prompt (and, with logprobs,
        its tokens' log-probabilities) in front: with max_tokens 0 that scores a text."""
        await check(request)
        if request.best_of not in (None, request.n) or request.suffix:
            raise OpenAIError(400, "best_of (other than n) and suffix are not supported", param="best_of")
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        request.max_tokens = max_tokens
        check_max_tokens(max_tokens)
        prompts, stops = prompts_of(request), request.stops()
        # In a worker thread: a lazily loaded model may still be warming up under its lock.
        prepared = prepare(request, prompts, *await run_in_threadpool(host.get))
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def shape(choices, usage=None) -> dict:
            body = {"id": ident, "object": "text_completion", "created": created, "model": host.name,
                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return body

        tokens = len(prepared) * request.n * max_tokens  # what the gate counts for Retry-After
        if not request.stream:
            choices, usage = await run_gated(
                lambda: completions_work(request, prepared, stops, lambda *a: None, None), tokens)
            return shape(choices, usage)

        def chunk(index, text, tokens, finish, offset) -> dict:
            wanted = request.logprobs is not None and tokens
            logprobs = completion_logprobs(tokens, offset) if wanted else None
            return shape([{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}])

        def streamed(emit, cancelled) -> None:
            _, usage = completions_work(request, prepared, stops, lambda *a: emit(chunk(*a)), cancelled)
            if request.stream_options and request.stream_options.include_usage:
                emit(shape([], usage))

        return sse(streamed, tokens)

    def chat_work(request: ChatRequest, ids: list[int], max_tokens: int, stops, emit, cancelled
                  ) -> tuple[list, dict]:
        """Every choice of a chat request, in a worker thread, `emit`ting each delta as it is made."""
        model, tokenizer = host.get()
        k = (request.top_logprobs or 0) if request.logprobs else 0
        choices, completion_tokens = [], 0
        for c in range(request.n):
            pieces, tokens = [], []
            emit(c, {"role": "assistant", "content": ""}, None, None)

            def on_piece(piece, made, c=c, pieces=pieces, tokens=tokens):
                pieces.append(piece)
                tokens.extend(made)
                emit(c, {"content": piece}, made, None)

            finish = generate_choice(model, tokenizer, ids, max_tokens, request.sampling(c), stops, k,
                                     on_piece, cancelled, host.compile, metrics_of(app))
            completion_tokens += len(tokens)
            emit(c, {}, None, finish)
            choices.append({"index": c, "message": {"role": "assistant", "content": "".join(pieces)},
                            "logprobs": {"content": chat_logprobs(tokens)} if request.logprobs else None,
                            "finish_reason": finish})
        usage = {"prompt_tokens": len(ids) * request.n, "completion_tokens": completion_tokens,
                 "total_tokens": len(ids) * request.n + completion_tokens}
        return choices, usage

    @app.post("/v1/chat/completions", responses=GENERATING, tags=["openai"])
    async def chat_completions(request: Chat):
        """OpenAI's chat completions: the messages rendered as the module's docstring says, answered
        `n` times; `logprobs` (+ `top_logprobs`) as OpenAI gives them."""
        await check(request)
        prompt, extra_stops = render_chat(request.messages, host.template)
        if len(prompt) > settings.max_prompt_chars:
            raise OpenAIError(400, f"the messages may have at most {settings.max_prompt_chars} characters",
                              param="messages")
        stops = tuple(dict.fromkeys(request.stops() + extra_stops))
        model, tokenizer = await run_in_threadpool(host.get)  # it may still be warming up (lazy)
        ids = tokenizer.encode(prompt)
        fit(ids, model.config.context_length)
        max_tokens = request.max_completion_tokens or request.max_tokens or max(1, min(
            settings.max_tokens_cap, model.config.context_length - len(ids)))
        check_max_tokens(max_tokens)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def shape(kind, choices, usage=None) -> dict:
            body = {"id": ident, "object": kind, "created": created, "model": host.name, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return body

        tokens = request.n * max_tokens
        if not request.stream:
            choices, usage = await run_gated(
                lambda: chat_work(request, ids, max_tokens, stops, lambda *a: None, None), tokens)
            return shape("chat.completion", choices, usage)

        def chunk(index, delta, tokens, finish) -> dict:
            logprobs = {"content": chat_logprobs(tokens)} if request.logprobs and tokens else None
            return shape("chat.completion.chunk",
                         [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

        def streamed(emit, cancelled) -> None:
            _, usage = chat_work(request, ids, max_tokens, stops, lambda *a: emit(chunk(*a)), cancelled)
            if request.stream_options and request.stream_options.include_usage:
                emit(shape("chat.completion.chunk", [], usage))

        return sse(streamed, tokens)

    def admit(work, tokens: int):
        try:
            return gated(gate, work, tokens)
        except HTTPException as error:  # the gate is full
            raise OpenAIError(429, str(error.detail), type="server_busy", code="server_busy",
                              headers=error.headers) from None

    async def run_gated(work, tokens: int):
        """A gated job's answer; 499 (in OpenAI's shape) when its client left and it stopped early."""
        closed = OpenAIError(CLIENT_CLOSED, CLIENT_LEFT, type="client_closed", code="client_closed")
        try:
            result = await admit(work, tokens)
        except ValueError as error:
            raise OpenAIError(400, str(error)) from None
        except Cancelled:
            raise closed from None
        if left_early():
            raise closed
        return result

    def sse(work: Callable[[Callable[[dict], None], threading.Event], object], tokens: int
            ) -> StreamingResponse:
        """`data: {...}` events of one gated job, each chunk `work` emits, then `data: [DONE]`."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = client_gone() or threading.Event()

        def push(item) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                cancelled.set()

        def job() -> None:
            try:
                work(push, cancelled)
            except OpenAIError as error:
                push({"error": json.loads(error.response().body)["error"]})
            except Exception as error:
                log.exception("streamed completion failed")
                message = str(error) if isinstance(error, ValueError) else "generation failed"
                push({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
            finally:
                push(None)

        running = asyncio.ensure_future(stream_job(admit(job, tokens)))  # a full gate: 429 before the stream
        _streams.add(running)
        running.add_done_callback(_streams.discard)

        async def lines():
            ended = False
            try:
                while (item := await events.get()) is not None:
                    yield f"data: {json.dumps(item)}\n\n"
                yield "data: [DONE]\n\n"
                ended = True
            finally:
                if not ended:
                    cancelled.set()  # the client left early: stop generating for it

        return StreamingResponse(lines(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


_streams: set[asyncio.Task] = set()  # running stream jobs, held until they end
