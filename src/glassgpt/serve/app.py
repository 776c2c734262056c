"""The FastAPI app: the JSON API, the server-sent-event stream, and the pages that use them.

    POST /generate          prompt -> continuation, token counts and timing (JSON)
    POST /generate/stream   the same as server-sent events: piece..., then done (or error)
    GET  /api/model         config, parameter breakdown, size, device, dtype
    POST /api/inspect       tokens, top-10 next tokens, attention of every layer and head
    GET  /api/explain[/{t}] the walk-through topics (glassgpt.explain), run on the live model
    GET  /healthz, /readyz  process up; model loaded
    GET  /, /architecture, /inside, /learn   the pages (static/), also as /NAME.html

Model work runs in worker threads behind a `Gate`, never on the event loop.
"""


import asyncio
import importlib
import json
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from glassgpt.serve.engine import (
    Busy,
    Gate,
    ModelHost,
    Sampling,
    inspect_text,
    run_generation,
)
from glassgpt.serve.middleware import AccessLog, BodySizeLimit

log = logging.getLogger("glassgpt.serve")
STATIC_DIR = Path(__file__).parent / "static"
# URL -> file in static/. Each page is also served as /FILE so that links work the same way on
# this server and on the static copy written by `glassgpt site`.
PAGES = {"/": "index.html", "/architecture": "architecture.html", "/inside": "inside.html", "/learn": "learn.html"}
T = TypeVar("T")


@dataclass(frozen=True)
class ServeSettings:
    """Every limit of the service in one place (all overridable from `glassgpt serve`)."""

    max_tokens_cap: int = 256           # the most tokens one request may ask for
    max_prompt_chars: int = 20_000      # longer prompts are refused (422) before tokenizing
    inspect_max_tokens: int = 48        # /api/inspect returns layers x heads x T x T weights
    max_running: int = 1                # generations at once (one keeps a small CPU's cores busy)
    max_waiting: int = 8                # queued behind them; more get 503 + Retry-After
    max_body_bytes: int = 64 * 1024     # larger request bodies get 413
    cors_origins: tuple[str, ...] = ()  # origins allowed to call the API from a browser
    lazy: bool = False                  # load the model on the first request instead of at start-up
    dtype: str = "float32"              # float32, bfloat16 or int8 weights (not for GPT objects)
    compile: bool = False               # CPU decoding through compiled kernels (compiled at warm-up)

    def __post_init__(self) -> None:
        for name in ("max_tokens_cap", "max_prompt_chars", "inspect_max_tokens", "max_running", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"CORS origin {origin!r} must look like http://host:port or https://host")
        if self.dtype not in ("float32", "bfloat16", "int8"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'int8', got {self.dtype!r}")


# ---------------------------------------------------------------- request and response bodies

def request_models(settings: ServeSettings) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request bodies, with bounds taken from `settings` so the OpenAPI schema shows them."""

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: str = Field(min_length=1, max_length=settings.max_prompt_chars,
                            examples=["Every effort moves you"])
        max_tokens: int = Field(min(50, settings.max_tokens_cap), ge=1, le=settings.max_tokens_cap)
        temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy")
        top_k: int | None = Field(None, ge=1, le=1_000_000)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        stop: list[str] = Field(default_factory=list, max_length=4, description="stop at any of these")

        @field_validator("stop")
        @classmethod
        def _check_stop(cls, stop: list[str]) -> list[str]:
            for item in stop:
                if not 1 <= len(item) <= 64:
                    raise ValueError("each stop string must be 1 to 64 characters")
            return stop

    class InspectRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        text: str = Field(min_length=1, max_length=20 * settings.inspect_max_tokens,
                          examples=["The painting was"])

    return GenerateRequest, InspectRequest


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


class ErrorResponse(BaseModel):
    error: str


BUSY = {503: {"model": ErrorResponse, "description": "busy (see Retry-After) or model not loaded"}}


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
    return f"{field}: {error.get('msg', 'invalid')}".replace("Value error, ", "")


# ---------------------------------------------------------------- the app

def create_app(model: Any = "runs/demo", tokenizer=None, settings: ServeSettings | None = None,
               **overrides) -> FastAPI:
    """A FastAPI app serving `model`: a GPT object (with its tokenizer), a checkpoint dir or a preset.

    `settings` (or keyword overrides of its fields, e.g. max_running=2) set the limits.
    """
    settings = settings or ServeSettings()
    if overrides:
        known = {f.name for f in fields(ServeSettings)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown serve settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "cors_origins" in overrides:
            overrides["cors_origins"] = tuple(overrides["cors_origins"])
        settings = ServeSettings(**{**{f.name: getattr(settings, f.name) for f in fields(settings)}, **overrides})
    host = ModelHost(model, tokenizer, dtype=settings.dtype, compile=settings.compile)
    gate = Gate(settings.max_running, settings.max_waiting)
    GenerateRequest, InspectRequest = request_models(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.lazy:
            await run_in_threadpool(host.get)
        yield

    app = FastAPI(title="glassgpt", version="0.1.0", lifespan=lifespan,
                  description="Generate text with a GPT you can see through, and look inside it.")
    app.state.host, app.state.gate, app.state.settings = host, gate, settings

    # ------------------------------------------------ errors as {"error": "..."} in plain words

    @app.exception_handler(RequestValidationError)
    async def validation_failed(request, exc: RequestValidationError):
        problems = [_describe_problem(e) for e in exc.errors()]
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"error": "; ".join(problems), "detail": detail})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)},
                            headers=getattr(exc, "headers", None))

    def admit():
        try:
            return gate.admit()
        except Busy as busy:
            raise HTTPException(503, str(busy), headers={"Retry-After": str(busy.retry_after_s)}) from None

    async def gated(work: Callable[[], T]) -> T:
        """Run `work` in a worker thread once the gate gives it a turn; ValueError becomes 422."""
        ticket = admit()
        started = False

        def job():
            nonlocal started
            started = True
            with ticket:
                return work()

        try:
            return await run_in_threadpool(job)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        except BaseException:
            if not started:  # cancelled before a worker thread picked it up
                ticket.cancel()
            raise

    def sampling(request) -> Sampling:
        return Sampling(max_tokens=request.max_tokens, temperature=request.temperature, top_k=request.top_k,
                        top_p=request.top_p, seed=request.seed, stop=tuple(request.stop))

    # ------------------------------------------------ the API

    @app.post("/generate", response_model=GenerateResponse, responses=BUSY, tags=["generate"])
    async def generate(request: GenerateRequest):
        """Continue the prompt; answer the whole continuation with its token counts and timing."""
        def work():
            model, tokenizer = host.get()
            return run_generation(model, tokenizer, request.prompt, sampling(request), compile=host.compile)

        return {**await gated(work), "model": host.name}

    @app.post("/generate/stream", responses={**BUSY, 200: {"content": {"text/event-stream": {}}}}, tags=["generate"])
    async def generate_stream(request: GenerateRequest):
        """Server-sent events: `piece` {text} as each piece is made, then `done` (the /generate
        answer) or `error` {error}."""
        ticket = admit()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def push(kind: str, data: dict) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, data))
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                cancelled.set()

        def job():
            # Runs in its own thread and always ends, so the ticket is always given back.
            try:
                with ticket:
                    model, tokenizer = host.get()
                    result = run_generation(model, tokenizer, request.prompt, sampling(request),
                                            on_piece=lambda piece: push("piece", {"text": piece}),
                                            cancelled=cancelled, compile=host.compile)
                push("done", {**result, "model": host.name})
            except Exception as error:
                log.exception("streamed generation failed")
                push("error", {"error": str(error) if isinstance(error, ValueError) else "generation failed"})

        threading.Thread(target=job, name="glassgpt-stream", daemon=True).start()

        async def event_stream():
            try:
                while True:
                    kind, data = await events.get()
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if kind != "piece":
                        return
            finally:
                cancelled.set()  # the client left early: stop generating for it

        return StreamingResponse(event_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/model", responses=BUSY, tags=["inspect"])
    async def model_info():
        """The live model: config, parameter breakdown (as `glassgpt info`), size, device, dtype."""
        model, _ = await run_in_threadpool(host.get)
        limits = {"max_tokens": settings.max_tokens_cap, "inspect_max_tokens": inspect_limit(model),
                  "max_prompt_chars": settings.max_prompt_chars}
        return {**host.description, "load_time_s": host.load_time_s, "limits": limits}

    def inspect_limit(model) -> int:
        return min(settings.inspect_max_tokens, model.config.context_length)

    @app.post("/api/inspect", responses=BUSY, tags=["inspect"])
    async def inspect(request: InspectRequest):
        """Tokens of the text, the 10 likeliest next tokens, and attention weights[layer][head][i][j]."""
        def work():
            model, tokenizer = host.get()
            n_tokens = len(tokenizer.encode(request.text))
            if n_tokens > inspect_limit(model):
                raise ValueError(f"text is {n_tokens} tokens; /api/inspect takes at most "
                                 f"{inspect_limit(model)} (attention grows with the square of the length)")
            return inspect_text(model, tokenizer, request.text)

        return await gated(work)

    def explain_module():
        try:
            explain = importlib.import_module("glassgpt.explain")
        except ImportError:
            raise HTTPException(404, "the walk-through (glassgpt.explain) is not part of this build yet") from None
        return explain

    @app.get("/api/explain", tags=["learn"])
    async def explain_topics():
        """The walk-through's topics: [{name, title}]."""
        return [{"name": name, "title": title} for name, title in explain_module().list_topics()]

    @app.get("/api/explain/{topic}", responses=BUSY, tags=["learn"])
    async def explain_topic(topic: str):
        """One walk-through topic computed with the live model: {topic, title, steps: [...]}."""
        explain = explain_module()
        names = [name for name, _ in explain.list_topics()]
        if topic not in names:
            raise HTTPException(404, f"unknown topic {topic!r}; topics: {', '.join(names)}")

        def work():
            model, tokenizer = host.get()
            return explain.run_topic(topic, model=model, tokenizer=tokenizer)

        return await gated(work)

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

    # ------------------------------------------------ the pages

    def page_route(filename: str):
        async def page():
            path = STATIC_DIR / filename
            if not path.exists():
                raise HTTPException(404, f"the page {filename} is not there yet")
            return FileResponse(path, media_type="text/html")
        return page

    for url, filename in PAGES.items():
        app.add_api_route(url, page_route(filename), methods=["GET"], include_in_schema=False)
        app.add_api_route(f"/{filename}", page_route(filename), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Outermost last: the access log sees everything; CORS headers reach even a 413.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Content-Type"], max_age=600)
    app.add_middleware(AccessLog)
    return app
