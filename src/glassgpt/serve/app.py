"""The FastAPI app: the JSON API, the server-sent-event stream, and the pages that use them.

    POST /generate          prompt -> continuation, token counts and timing (JSON)
    POST /generate/stream   the same as server-sent events: piece..., then done (or error)
    POST /classify          texts -> label and class probabilities of each (a classifier only)
    POST /instruct          instruction (+ input) -> the response alone (an instruction-tuned model only)
    POST /instruct/stream   the same as server-sent events, like /generate/stream
    GET  /api/model         config, parameter breakdown, size, device, dtype, task
    POST /api/inspect       tokens, top-10 next tokens, attention of every layer and head
                            (+ the inside views of glassgpt.inspect_report named in "views")
    POST /api/patch         clean and corrupted texts -> the activation-patching grid
    GET  /api/explain[/{t}] the walk-through topics (glassgpt.explain), run on the live model
    POST /v1/completions, /v1/chat/completions, GET /v1/models   OpenAI's API (serve/openai_api.py)
    GET  /metrics           Prometheus metrics (serve/metrics.py)
    GET  /healthz, /readyz  process up; model loaded
    GET  /, /architecture, /inside, /learn   the pages (static/, see site.py), also as /NAME.html

`create_app` builds the app from route installers, one per group of routes. Model work runs in
worker threads behind a `Gate` (`gated`), never on the event loop.

What the served model is decides which routes answer (`require_task`): a classifier answers
/classify and refuses the routes that generate or read next tokens (409, saying which route to
use); a language model refuses /classify; /instruct needs the instruction template saved by
`glassgpt finetune instruct`. /generate on an instruction-tuned model continues a raw prompt.
"""

# No `from __future__ import annotations`: FastAPI reads the request models (classes made inside
# functions) from the route functions' annotations.

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from glassgpt import explain, inspect_report
from glassgpt.generate import Sampling
from glassgpt.instruct import InstructionTemplate
from glassgpt.serve.engine import (
    Busy,
    Cancelled,
    Gate,
    ModelHost,
    Ticket,
    inspect_text,
    instruction_prompt,
    run_classification,
    run_generation,
    run_instruction,
)
from glassgpt.serve.metrics import install_metrics
from glassgpt.serve.middleware import (
    CLIENT_CLOSED,
    AccessLog,
    BodySizeLimit,
    ClientWatch,
    ReadDeadline,
    client_gone,
)
from glassgpt.serve.runs import install_runs
from glassgpt.serve.site import PAGES, STATIC_DIR, render_page

log = logging.getLogger("glassgpt.serve")
T = TypeVar("T")

# The views /api/inspect adds: inspect_report's, less patching (two texts: POST /api/patch).
INSPECT_VIEWS = tuple(view for view in inspect_report.VIEWS if view != "patch")
InspectView = Literal[INSPECT_VIEWS]


@dataclass(frozen=True)
class ServeSettings:
    """Every limit of the service in one place (all overridable from `glassgpt serve`)."""

    max_tokens_cap: int = 256           # the most tokens one request may ask for
    max_prompt_chars: int = 20_000      # longer prompts, texts, instructions: 422 before tokenizing
    max_classify_texts: int = 64        # texts one POST /classify may send
    # /api/inspect returns layers x heads x T x T weights: 51 MB of JSON for GPT-2 small at 256, about
    # a second's work on two cores, and every view of such a text a few more (docs/PERFORMANCE.md).
    inspect_max_tokens: int = 256
    patch_max_tokens: int = 32          # /api/patch and the exact heads view: layers (x heads) x T passes
    max_running: int = 1                # generations at once (one keeps a small CPU's cores busy)
    max_waiting: int = 8                # queued behind them; more get 503 + Retry-After
    max_body_bytes: int = 64 * 1024     # larger request bodies get 413
    # What one connection may cost (serve/connections.py): headers and body must each arrive within
    # read_timeout_s (else 408 and the connection closes); idle keep-alive connections close after
    # keep_alive_s; at most max_connections connections and requests at once (beyond: 503); request
    # line and headers at most max_header_bytes (beyond: 400).
    read_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int = 64
    max_header_bytes: int = 16 * 1024
    cors_origins: tuple[str, ...] = ()  # origins allowed to call the API from a browser
    lazy: bool = False                  # load the model on the first request instead of at start-up
    dtype: str = "float32"              # float32, bfloat16 or int8 weights (not for GPT objects)
    compile: bool = False               # CPU decoding through compiled kernels (compiled at warm-up)
    device: str = "cpu"                 # where a loaded model runs: "cpu", "cuda", "cuda:1", ...
    runs_dir: str = "runs"              # the training runs the /runs page shows (serve.runs)

    def __post_init__(self) -> None:
        for name in ("max_tokens_cap", "max_prompt_chars", "max_classify_texts", "inspect_max_tokens",
                     "patch_max_tokens", "max_running", "max_body_bytes", "keep_alive_s", "max_connections",
                     "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be > 0, got {self.read_timeout_s}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))  # a list given is kept as a tuple
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"CORS origin {origin!r} must look like http://host:port or https://host")
        if self.dtype not in ("float32", "bfloat16", "int8"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'int8', got {self.dtype!r}")
        if self.dtype == "int8" and self.device != "cpu":
            raise ValueError("int8 weights run on the CPU only: use --dtype bfloat16 on a GPU")


# ---------------------------------------------------------------- request and response bodies

# Every request body is strict: an integer field takes a JSON integer, not "5" or true, and a
# boolean takes true or false, so the published schema (generated from these models) is exactly
# what is accepted. Unknown fields are refused.
STRICT = ConfigDict(extra="forbid", strict=True)


def _integral(value: Any) -> Any:
    # JSON Schema counts 2.0 as an integer, so the schema's "integer" accepts it; a bool is not one.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_integral)]


def integer(**bounds) -> Any:
    """An `Integer` with bounds (ge=, lt=, ...) that the schema shows even as `integer(...) | None`
    (pydantic leaves bounds out of the schema when they follow the validator)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


# Seeds below 2**63, published as that exclusive bound (2**63 - 1 as a float is 2**63; see
# `exact_integer_bounds` for how integer bounds reach the schema exactly).
SEED_BOUND = 2**63


def exact_integer_bounds(node: Any) -> None:
    """Put an OpenAPI schema's integer bounds back to integers, in place. FastAPI's OpenAPI model types
    every bound as a float, so seed's 2**63 came out as 9.223372036854776e18, and a client comparing
    in floats took 2**63 + 191 for a seed the schema allows (the server refuses it)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for value in node.values():
            exact_integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            exact_integer_bounds(value)


def sampling_request_model(settings: ServeSettings) -> type[BaseModel]:
    """The fields of every request that generates (/generate, /instruct): length and sampling."""

    class SamplingRequest(BaseModel):
        model_config = STRICT

        max_tokens: Integer = Field(min(50, settings.max_tokens_cap), ge=1, le=settings.max_tokens_cap)
        temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy")
        top_k: integer(ge=1, le=1_000_000) | None = None
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        seed: integer(ge=0, lt=SEED_BOUND) | None = None
        stop: list[str] = Field(default_factory=list, max_length=4, description="stop at any of these",
                                json_schema_extra={"items": {"type": "string", "minLength": 1,
                                                             "maxLength": 64}})

        @field_validator("stop")
        @classmethod
        def _check_stop(cls, stop: list[str]) -> list[str]:
            for item in stop:
                if not 1 <= len(item) <= 64:
                    raise ValueError("each stop string must be 1 to 64 characters")
            return stop

        def sampling(self) -> Sampling:
            return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                            stop=tuple(self.stop))

    return SamplingRequest


def generate_request_model(settings: ServeSettings) -> type[BaseModel]:
    """POST /generate's body, with bounds taken from `settings` so the OpenAPI schema shows them."""

    class GenerateRequest(sampling_request_model(settings)):
        prompt: str = Field(min_length=1, max_length=settings.max_prompt_chars,
                            examples=["Every effort moves you"])

    return GenerateRequest


def instruct_request_model(settings: ServeSettings) -> type[BaseModel]:
    """POST /instruct's body: an instruction, an optional input, and /generate's sampling fields."""

    class InstructRequest(sampling_request_model(settings)):
        instruction: str = Field(min_length=1, max_length=settings.max_prompt_chars,
                                 examples=["Rewrite the sentence using a simile."])
        input: str = Field("", max_length=settings.max_prompt_chars, examples=["The car is fast."],
                           description="optional: what the instruction is about")

        @field_validator("instruction")
        @classmethod
        def _check_instruction(cls, instruction: str) -> str:
            if not instruction.strip():
                raise ValueError("the instruction must not be blank")
            return instruction

    return InstructRequest


def classify_request_model(settings: ServeSettings) -> type[BaseModel]:
    """POST /classify's body: {"texts": [...]} or {"text": "..."}, bounded by `settings`."""
    Text = Annotated[str, Field(min_length=1, max_length=settings.max_prompt_chars)]

    class ClassifyRequest(BaseModel):
        # Exactly one of the two fields, as the schema's oneOf says; neither takes null (the
        # defaults are never validated, so None marks the field that was not sent).
        model_config = ConfigDict(**STRICT, json_schema_extra={
            "oneOf": [{"required": ["texts"]}, {"required": ["text"]}],
            "examples": [{"texts": ["Hi, are we still on for lunch?", "You won a prize! Call now"]}]})

        texts: list[Text] = Field(None, min_length=1, max_length=settings.max_classify_texts,
                                  description="the texts to classify")
        text: Text = Field(None, description="one text (instead of texts)")

        @model_validator(mode="after")
        def _one_of_text_or_texts(self):
            if (self.texts is None) == (self.text is None):
                raise ValueError('give "texts" (a list of texts) or "text" (one text), not both or neither')
            return self

        def all_texts(self) -> list[str]:
            return self.texts if self.texts is not None else [self.text]

    return ClassifyRequest


def inspect_request_model(settings: ServeSettings) -> type[BaseModel]:
    """POST /api/inspect's body, bounded by `settings` like `generate_request_model`."""

    class InspectRequest(BaseModel):
        model_config = STRICT

        text: str = Field(min_length=1, max_length=20 * settings.inspect_max_tokens,
                          examples=["The painting was"])
        views: list[InspectView] | None = Field(
            default=None, min_length=1, max_length=len(INSPECT_VIEWS),
            json_schema_extra={"uniqueItems": True},
            description="inside views to add under \"views\" (glassgpt.inspect_report); none: the "
                        "answer is tokens, next tokens and attention alone")
        heads_method: Literal["auto", "exact", "attribution"] = Field(
            default="auto",
            description="the heads view: exact (each head silenced, one pass of the rest of the model per "
                        "head; texts up to patch_max_tokens), attribution (estimated from one backward "
                        "pass: any text /api/inspect takes), or auto: exact when the text is within "
                        "that bound, else attribution. The view's \"method\" says which ran.")

        @model_validator(mode="after")
        def _distinct(self):
            if self.views is not None and len(set(self.views)) != len(self.views):
                raise ValueError("each view may be asked for once")
            return self

    return InspectRequest


def patch_request_model(settings: ServeSettings) -> type[BaseModel]:
    """POST /api/patch's body: two texts of equal token counts and the token whose logit is followed."""

    class PatchRequest(BaseModel):
        model_config = STRICT

        clean: str = Field(min_length=1, max_length=20 * settings.patch_max_tokens,
                           examples=["The Eiffel Tower is in"])
        corrupt: str = Field(min_length=1, max_length=20 * settings.patch_max_tokens,
                             examples=["The Colosseum is in"])
        target: str | None = Field(default=None, min_length=1, max_length=64,
                                   description="one token; default: the model's top next token for clean")

    return PatchRequest


class GenerateResponse(BaseModel):
    text: str = Field(description="the prompt followed by the completion")
    completion: str
    prompt_tokens: int
    completion_tokens: int
    time_s: float
    tokens_per_s: float
    truncated: bool = Field(description="the prompt was cut at its start to fit the context")
    dropped_prompt_tokens: int
    model: str


class Prediction(BaseModel):
    text: str
    label: str = Field(description="the likeliest class")
    probabilities: dict[str, float] = Field(description="every class's probability, in the head's order")


class InstructResponse(BaseModel):
    instruction: str
    input: str
    prompt: str = Field(description="the text the model continued: the instruction in the saved template")
    response: str = Field(description="the response alone, stripped; it ends at the end-of-text token")
    completion: str = Field(description="the continuation as generated (the response before stripping)")
    prompt_tokens: int
    completion_tokens: int
    time_s: float
    tokens_per_s: float
    template: str = Field(description="the instruction template's name")
    model: str


class ErrorResponse(BaseModel):
    error: str


class InvalidResponse(BaseModel):
    error: str = Field(description="every problem, in words")
    detail: list[dict] | None = Field(None, description="pydantic's errors, when the body broke the schema")


# Every status code a route can answer, in its OpenAPI entry (the schemathesis test checks it).
BUSY = {503: {"model": ErrorResponse, "description": "busy (see Retry-After) or model not loaded"}}
WRONG_MODEL = {409: {"model": ErrorResponse,
                     "description": "the served model does not do this (see GET /api/model)"}}
BODY = {
    400: {"model": ErrorResponse, "description": "the body could not be read (not UTF-8 JSON)"},
    413: {"model": ErrorResponse, "description": "the body is over the server's limit (64 KiB by default)"},
    422: {"model": InvalidResponse,
          "description": "the body breaks this schema, or the model cannot take it: a text its tokenizer "
                         "cannot encode or over a token limit (limits: GET /api/model)"},
}
BUSY_OR_WRONG = {**BUSY, **WRONG_MODEL, **BODY}


def _describe_problem(error: dict) -> str:
    """One validation problem in words, e.g. 'max_tokens: Input should be less than or equal to 256'."""
    field = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
    kind = error.get("type")
    if kind == "extra_forbidden":
        return f"unknown field {field!r}"
    if kind == "missing":
        return f"{field} is required"
    if kind == "json_invalid":
        return "the request body is not valid JSON"
    if kind == "string_too_short" and error.get("ctx", {}).get("min_length") == 1:
        return f"{field} must not be empty"
    if kind == "value_error" and field == "body":  # a check across fields: its message says it all
        return str(error.get("msg", "invalid")).replace("Value error, ", "")
    return f"{field}: {error.get('msg', 'invalid')}".replace("Value error, ", "")


# ---------------------------------------------------------------- model work behind the gate

def gated(gate: Gate, work: Callable[[], T], tokens: int = 0) -> Awaitable[T]:
    """Admit `work` now, or refuse it now (503 + Retry-After); the awaitable runs it in a worker thread
    once the gate gives it a turn.

    Admission happens at the call, so a refusal is still an HTTP error even for a route that answers
    with a stream. The place in the gate is given back however the job ends, even if it never ran.
    `tokens`: the most tokens the job may generate (what the gate's Retry-After counts). The job's
    cancel flag is its client's (`middleware.client_gone`): a client that leaves frees the place.
    """
    try:
        ticket = gate.admit(tokens, cancelled=client_gone())
    except Busy as busy:
        raise HTTPException(503, str(busy), headers={"Retry-After": str(busy.retry_after_s)}) from None
    return _run_admitted(ticket, work)


async def _run_admitted(ticket: Ticket, work: Callable[[], T]) -> T:
    started = False

    def job():
        nonlocal started
        started = True
        with ticket:
            return work()

    try:
        return await run_in_threadpool(job)
    except BaseException:
        if not started:  # cancelled before a worker thread picked it up
            ticket.cancel()
        raise


async def stream_job(admitted: Awaitable) -> None:
    """Run a stream's admitted job (what `gated` returned) to its end, in a task nobody awaits: a job
    whose client left before its turn came (Cancelled) simply ends; the stream has nobody to tell."""
    try:
        await admitted
    except Cancelled:
        pass


CLIENT_LEFT = "the client closed the request before its answer was ready"


def left_early() -> bool:
    """Whether the current request's client went away (a job it started stops within a step)."""
    gone = client_gone()
    return gone is not None and gone.is_set()


async def answer(gate: Gate, work: Callable[[], T], tokens: int = 0) -> T:
    """`gated` for a JSON answer: a ValueError (input the model cannot take) becomes 422, and a job
    whose client left (it stopped early, or never ran) 499, the status the access log records."""
    try:
        result = await gated(gate, work, tokens)
    except ValueError as error:
        raise HTTPException(422, str(error)) from None
    except Cancelled:
        raise HTTPException(CLIENT_CLOSED, CLIENT_LEFT) from None
    if left_early():
        raise HTTPException(CLIENT_CLOSED, CLIENT_LEFT)
    return result


_streams: set[asyncio.Task] = set()  # running stream jobs, held until they end


def event_stream(gate: Gate, work: Callable[[Callable[[str], None], threading.Event], dict], tokens: int = 0
                 ) -> StreamingResponse:
    """Server-sent events of one gated job: `piece` {text} each time `work` calls its first
    argument, then `done` (what `work` returns) or `error` {error}.

    `work(on_piece, cancelled)` runs in a worker thread; `cancelled` is set when the client leaves,
    so it can stop generating. Admission happens here: a full gate is a 503, before the stream.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancelled = client_gone() or threading.Event()

    def push(kind: str, data: dict) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            cancelled.set()

    def job() -> None:
        # The stream has begun, so every outcome, failure too, is an event.
        try:
            push("done", work(lambda piece: push("piece", {"text": piece}), cancelled))
        except ValueError as error:  # input the model cannot take: the client's problem, one line
            log.warning("streamed generation refused: %s", error)
            push("error", {"error": str(error)})
        except Exception:
            log.exception("streamed generation failed")
            push("error", {"error": "generation failed"})

    running = asyncio.ensure_future(stream_job(gated(gate, job, tokens)))
    _streams.add(running)
    running.add_done_callback(_streams.discard)

    async def events_as_text():
        ended = False
        try:
            while True:
                kind, data = await events.get()
                yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                if kind != "piece":
                    ended = True
                    return
        finally:
            if not ended:
                cancelled.set()  # the client left early: stop generating for it

    return StreamingResponse(events_as_text(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- which model answers which route

def task_mismatch(description: dict, allowed: tuple[str, ...]) -> str | None:
    """Why a model described by `description` (GET /api/model) cannot answer a route open to the
    `allowed` tasks, in words that name the route to use instead; None when it can."""
    task = description["task"]
    if task in allowed:
        return None
    if task == "classify":
        return (f"the served model is a classifier (classes: {', '.join(description['classes'])}): it scores "
                "texts and has no next tokens to generate or show; use POST /classify")
    if allowed == ("classify",):
        other = " or POST /instruct" if task == "instruct" else ""
        return f"the served model is not a classifier: it is a language model; use POST /generate{other}"
    return ("the served model is not instruction-tuned (its checkpoint holds no instruction template, "
            "which glassgpt finetune instruct saves): use POST /generate to continue a prompt")


async def refuse_early(host: ModelHost, check: Callable[[Any, Any], object]) -> None:
    """422 now if `check(model, tokenizer)` raises ValueError: the streaming routes run the checks
    their JSON twins answer 422 for (a prompt the tokenizer cannot encode, one too long) before the
    stream's 200 is sent. Tokenizing is cheap next to generating: it runs outside the gate."""
    def run():
        check(*host.get())

    try:
        await run_in_threadpool(run)
    except ValueError as error:
        log.info("refused before streaming: %s", error)
        raise HTTPException(422, str(error)) from None


async def require_task(host: ModelHost, *allowed: str) -> None:
    """409 unless the served model does one of the `allowed` tasks (loading it first if lazy)."""
    if not host.ready:
        await run_in_threadpool(host.get)
    problem = task_mismatch(host.description, allowed)
    if problem:
        raise HTTPException(409, problem)


LANGUAGE_MODEL = ("generate", "instruct")
STREAM_RESPONSES = {**BUSY_OR_WRONG, 200: {"content": {"text/event-stream": {}}}}


# ---------------------------------------------------------------- the routes, group by group

def install_errors(app: FastAPI) -> None:
    """Every refusal as {"error": "..."} in plain words (validation problems also in "detail")."""

    @app.exception_handler(RequestValidationError)
    async def validation_failed(request, exc: RequestValidationError):
        problems = [_describe_problem(e) for e in exc.errors()]
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"error": "; ".join(problems), "detail": detail})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)},
                            headers=getattr(exc, "headers", None))


def install_generation_api(app: FastAPI, host: ModelHost, gate: Gate, settings: ServeSettings) -> None:
    """POST /generate and POST /generate/stream."""
    GenerateRequest = generate_request_model(settings)

    @app.post("/generate", response_model=GenerateResponse, responses=BUSY_OR_WRONG, tags=["generate"])
    async def generate(request: GenerateRequest):
        """Continue the prompt; answer the whole continuation with its token counts and timing."""
        await require_task(host, *LANGUAGE_MODEL)

        def work():
            model, tokenizer = host.get()
            return run_generation(model, tokenizer, request.prompt, request.max_tokens, request.sampling(),
                                  compile=host.compile)

        return {**await answer(gate, work, request.max_tokens), "model": host.name}

    @app.post("/generate/stream", responses=STREAM_RESPONSES, tags=["generate"])
    async def generate_stream(request: GenerateRequest):
        """Server-sent events: `piece` {text} as each piece is made, then `done` (the /generate
        answer) or `error` {error}. A prompt /generate refuses is refused here too (422), before the
        stream starts."""
        await require_task(host, *LANGUAGE_MODEL)
        await refuse_early(host, lambda model, tokenizer: tokenizer.encode(request.prompt))

        def work(on_piece, cancelled) -> dict:
            model, tokenizer = host.get()
            result = run_generation(model, tokenizer, request.prompt, request.max_tokens, request.sampling(),
                                    on_piece=on_piece, cancelled=cancelled, compile=host.compile)
            return {**result, "model": host.name}

        return event_stream(gate, work, request.max_tokens)


def install_classify_api(app: FastAPI, host: ModelHost, gate: Gate, settings: ServeSettings) -> None:
    """POST /classify (a classifier only)."""
    ClassifyRequest = classify_request_model(settings)

    @app.post("/classify", response_model=list[Prediction], responses=BUSY_OR_WRONG, tags=["classify"])
    async def classify(request: ClassifyRequest):
        """Each text's label and class probabilities, in the order given: a list of {text, label,
        probabilities}, as `glassgpt classify --json` prints (a list for one "text" too). Texts longer
        than the classifier was trained on keep their first tokens, as in training."""
        await require_task(host, "classify")

        def work():
            model, tokenizer = host.get()
            return run_classification(model, tokenizer, request.all_texts(), host.finetune.get("max_length"))

        return await answer(gate, work)


def install_instruct_api(app: FastAPI, host: ModelHost, gate: Gate, settings: ServeSettings) -> None:
    """POST /instruct and POST /instruct/stream (an instruction-tuned model only)."""
    InstructRequest = instruct_request_model(settings)

    def respond(request, on_piece=None, cancelled=None) -> dict:
        model, tokenizer = host.get()
        result = run_instruction(model, tokenizer, host.template, request.instruction, request.input,
                                 request.max_tokens, request.sampling(), on_piece=on_piece,
                                 cancelled=cancelled, compile=host.compile)
        return {**result, "template": host.template.name, "model": host.name}

    @app.post("/instruct", response_model=InstructResponse, responses=BUSY_OR_WRONG, tags=["instruct"])
    async def instruct(request: InstructRequest):
        """The model's response to the instruction (and input), formatted with the template saved
        with the checkpoint, as it was trained; generation stops at the end-of-text token."""
        await require_task(host, "instruct")
        return await answer(gate, lambda: respond(request), request.max_tokens)

    @app.post("/instruct/stream", responses=STREAM_RESPONSES, tags=["instruct"])
    async def instruct_stream(request: InstructRequest):
        """Server-sent events: `piece` {text} of the response as it is made, then `done` (the
        /instruct answer) or `error` {error}. An instruction /instruct refuses is refused here too
        (422), before the stream starts."""
        await require_task(host, "instruct")
        await refuse_early(host, lambda model, tokenizer: instruction_prompt(
            model, tokenizer, host.template, request.instruction, request.input, request.max_tokens))
        return event_stream(gate, lambda on_piece, cancelled: respond(request, on_piece, cancelled),
                            request.max_tokens)


def json_response(content: Any) -> Response:
    """`content` as JSON, numpy arrays included, rendered by orjson: for answers of millions of numbers
    (/api/inspect's attention), which Python's json module writes several times slower."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def install_inspect_api(app: FastAPI, host: ModelHost, gate: Gate, settings: ServeSettings) -> None:
    """GET /api/model, POST /api/inspect and the walk-through, GET /api/explain[/{topic}]."""
    InspectRequest = inspect_request_model(settings)

    PatchRequest = patch_request_model(settings)

    def inspect_limit(model) -> int:
        return min(settings.inspect_max_tokens, model.config.context_length)

    def patch_limit(model) -> int:
        return min(settings.patch_max_tokens, model.config.context_length)

    @app.get("/api/model", responses=BUSY, tags=["inspect"])
    async def model_info():
        """The live model: config, parameter breakdown (as `glassgpt info`), size, device, dtype, and
        what it does: "task" is "classify" (POST /classify; "classes" in the head's order),
        "instruct" (POST /instruct; "template" names the instruction template) or "generate"."""
        model, _ = await run_in_threadpool(host.get)
        limits = {"max_tokens": settings.max_tokens_cap, "inspect_max_tokens": inspect_limit(model),
                  "max_prompt_chars": settings.max_prompt_chars}
        if host.task == "classify":
            limits.update(max_texts=settings.max_classify_texts, max_text_chars=settings.max_prompt_chars)
        return {**host.description, "load_time_s": host.load_time_s, "limits": limits}

    @app.post("/api/inspect", responses=BUSY_OR_WRONG, tags=["inspect"])
    async def inspect(request: InspectRequest):
        """Tokens of the text, the 10 likeliest next tokens, and attention weights[layer][head][i][j];
        with "views", also {"views": {name: glassgpt inspect --json's answer for that view}}."""
        await require_task(host, *LANGUAGE_MODEL)

        def work():
            model, tokenizer = host.get()
            n_tokens = len(tokenizer.encode(request.text))
            if n_tokens > inspect_limit(model):
                raise ValueError(f"text is {n_tokens} tokens; /api/inspect takes at most "
                                 f"{inspect_limit(model)} (attention grows with the square of the length)")
            # Silencing each head exactly costs a pass of the rest of the model per head: the same
            # tight bound as patching. Past it, "auto" estimates (one backward pass) instead.
            heads_method = request.heads_method
            if heads_method == "auto":
                heads_method = "exact" if n_tokens <= patch_limit(model) else "attribution"
            if "heads" in (request.views or ()) and heads_method == "exact" and n_tokens > patch_limit(model):
                raise ValueError(f"text is {n_tokens} tokens; the heads view takes at most "
                                 f"{patch_limit(model)} exactly (one forward pass per head); heads_method "
                                 f"\"attribution\" or \"auto\" estimates it for longer texts")
            result = inspect_text(model, tokenizer, request.text)
            if request.views is not None:
                result["views"] = {view: inspect_report.report(model, tokenizer, request.text, view,
                                                                method=heads_method)
                                   for view in request.views}
            # Rendered here, in the worker thread, and as it is: up to layers x heads x T x T weights
            # walked by FastAPI's jsonable_encoder would cost more than the model itself, and on the
            # event loop, where every other request waits for it.
            return json_response(result)

        return await answer(gate, work)

    @app.post("/api/patch", responses=BUSY_OR_WRONG, tags=["inspect"])
    async def patch(request: PatchRequest):
        """Activation patching (glassgpt inspect --view patch --json): logits[layer][position] of the
        target when the clean residual stream replaces the corrupted one there, with both texts' logits."""
        await require_task(host, *LANGUAGE_MODEL)

        def work():
            model, tokenizer = host.get()
            counts = [len(tokenizer.encode(text)) for text in (request.clean, request.corrupt)]
            if max(counts) > patch_limit(model):
                raise ValueError(f"the texts are {counts[0]} and {counts[1]} tokens; /api/patch takes at "
                                 f"most {patch_limit(model)} (one forward pass per layer and position)")
            if counts[0] != counts[1]:
                raise ValueError(f"the clean and corrupted texts must have equal token counts: "
                                 f"{counts[0]} and {counts[1]}")
            return inspect_report.report(model, tokenizer, request.clean, "patch", corrupt=request.corrupt,
                                         target=request.target)

        return await answer(gate, work)

    @app.get("/api/explain", tags=["learn"])
    async def explain_topics():
        """The walk-through's topics: [{name, title}]."""
        return [{"name": name, "title": title} for name, title in explain.list_topics()]

    no_topic = {404: {"model": ErrorResponse, "description": "no such topic (GET /api/explain lists them)"}}

    @app.get("/api/explain/{topic}", responses={**BUSY, **WRONG_MODEL, **no_topic}, tags=["learn"])
    async def explain_topic(topic: str):
        """One walk-through topic computed with the live model: {topic, title, steps: [...]}."""
        names = [name for name, _ in explain.list_topics()]
        if topic not in names:
            raise HTTPException(404, f"unknown topic {topic!r}; topics: {', '.join(names)}")
        await require_task(host, *LANGUAGE_MODEL)

        def work():
            model, tokenizer = host.get()
            return explain.run_topic(topic, model=model, tokenizer=tokenizer)

        return await answer(gate, work)


# Load balancers and uptime checkers probe with HEAD: the pages and the health routes answer it as
# GET does, without the body (uvicorn sends the headers only).
GET_OR_HEAD = ["GET", "HEAD"]


def install_health(app: FastAPI, host: ModelHost) -> None:
    """GET (or HEAD) /healthz (the process is up) and /readyz (the model is loaded)."""

    @app.get("/healthz", tags=["health"])
    async def healthz():
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}}, tags=["health"])
    async def readyz():
        """The model is loaded and requests will be served."""
        if not host.ready:
            raise HTTPException(503, "the model is not loaded yet", headers={"Retry-After": "1"})
        return {"status": "ready", "model": host.name, "load_time_s": host.load_time_s}

    for path, endpoint in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD: the schema lists GET only
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)


def install_pages(app: FastAPI) -> None:
    """The pages at their URLs and as /FILE, rendered once from static/; static/ itself under /static."""
    def route(html: str):
        async def page():
            return HTMLResponse(html)
        return page

    for url, filename in PAGES.items():
        page = route(render_page(filename))
        app.add_api_route(url, page, methods=GET_OR_HEAD, include_in_schema=False)
        app.add_api_route(f"/{filename}", page, methods=GET_OR_HEAD, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# ---------------------------------------------------------------- the app

def create_app(model: Any = "runs/demo", tokenizer=None, settings: ServeSettings | None = None, *,
               template: InstructionTemplate | None = None, **overrides) -> FastAPI:
    """A FastAPI app serving `model`: a GPT object (with its tokenizer), a checkpoint dir or a preset.

    `settings` (or keyword overrides of its fields, e.g. max_running=2) set the limits. `template`:
    serve a GPT object as instruction-tuned (a checkpoint directory brings its own template).
    """
    unknown = sorted(set(overrides) - {f.name for f in fields(ServeSettings)})
    if unknown:
        known = ", ".join(f.name for f in fields(ServeSettings))
        raise ValueError(f"unknown serve settings: {', '.join(unknown)}; known: {known}")
    settings = replace(settings or ServeSettings(), **overrides)
    host = ModelHost(model, tokenizer, dtype=settings.dtype, compile=settings.compile, template=template,
                     device=settings.device)
    gate = Gate(settings.max_running, settings.max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.lazy:
            await run_in_threadpool(host.get)
        yield

    app = FastAPI(title="glassgpt", version="0.1.0", lifespan=lifespan,
                  description="Generate text with a GPT you can see through, and look inside it.")
    app.state.host, app.state.gate, app.state.settings = host, gate, settings

    def openapi() -> dict:
        if app.openapi_schema is None:
            exact_integer_bounds(FastAPI.openapi(app))  # FastAPI's, cached on the app, made exact
        return app.openapi_schema

    app.openapi = openapi
    install_errors(app)
    install_generation_api(app, host, gate, settings)
    install_classify_api(app, host, gate, settings)
    install_instruct_api(app, host, gate, settings)
    install_inspect_api(app, host, gate, settings)
    # Imported here: openai_api builds on this module's helpers (gated, require_task).
    from glassgpt.serve.openai_api import install_openai_api
    install_openai_api(app, host, gate, settings)
    install_health(app, host)
    install_runs(app, settings.runs_dir)
    install_pages(app)
    # Outermost last: the access log sees everything; CORS headers reach even a 413.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ReadDeadline, seconds=settings.read_timeout_s)  # its 408 too is an answer
    app.add_middleware(ClientWatch)  # outside the body cap: a 413 is an answer, not a client leaving
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Content-Type"], max_age=600)
    install_metrics(app, host, gate)  # GET /metrics; its middleware counts even a 413
    app.add_middleware(AccessLog)
    return app
