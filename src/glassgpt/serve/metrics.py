"""GET /metrics: the server's numbers in Prometheus's text format (prometheus-client).

    glassgpt_requests_total{route, method, status}     requests answered
    glassgpt_request_seconds{route}                    latency histogram, until the last byte (streams too)
    glassgpt_refused_total{status}                     requests refused by a full gate (503, or 429 on /v1)
    glassgpt_gate_running / glassgpt_gate_waiting      jobs in the gate now
    glassgpt_generated_tokens_total                    tokens generated for /v1 completions and chat
    glassgpt_time_to_first_token_seconds               from a /v1 choice's start to its first token
    glassgpt_tokens_per_second                         each /v1 choice's decoding speed after that
    glassgpt_model_load_seconds                        how long loading the model took

`route` is the route's template (/v1/models/{model_id:path}, not the id asked for) and "unmatched"
for paths no route has, so a scanner cannot grow the label set without bound. Each app has its own
registry, so several apps in one process (tests, notebooks) never share counters.
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import Match

from glassgpt.serve.engine import Gate, ModelHost


class Metrics:
    """The collectors of one app, in its own registry."""

    def __init__(self, host: ModelHost, gate: Gate):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("glassgpt_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=registry)
        self.latency = Histogram("glassgpt_request_seconds", "HTTP request latency, until the last byte",
                                 ["route"], registry=registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.refused = Counter("glassgpt_refused", "requests refused because the gate was full", ["status"],
                               registry=registry)
        self.tokens = Counter("glassgpt_generated_tokens", "tokens generated (/v1 completions and chat)",
                              registry=registry)
        self.first_token = Histogram("glassgpt_time_to_first_token_seconds",
                                     "from a /v1 choice's start to its first generated token",
                                     registry=registry,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.speed = Histogram("glassgpt_tokens_per_second", "a /v1 choice's tokens after the first, per "
                               "second after its first", registry=registry,
                               buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000))
        # The gate counts admitted jobs; those past max_running are the ones waiting for a turn.
        running = Gauge("glassgpt_gate_running", "jobs holding a turn in the gate", registry=registry)
        running.set_function(lambda: min(gate.admitted, gate.max_running))
        waiting = Gauge("glassgpt_gate_waiting", "jobs waiting for a turn in the gate", registry=registry)
        waiting.set_function(lambda: max(0, gate.admitted - gate.max_running))
        load = Gauge("glassgpt_model_load_seconds", "seconds the model took to load (0 before it is loaded)",
                     registry=registry)
        load.set_function(lambda: host.load_time_s or 0.0)

    def generated(self, started: float, first_token_at: float | None, tokens: int) -> None:
        """Record one generated choice (now ended): its token count and, if any came, its time to first
        token and its decoding speed (the first token comes with the prompt's prefill, so it is left out)."""
        self.tokens.inc(tokens)
        if first_token_at is not None:
            self.first_token.observe(first_token_at - started)
            decoding = time.perf_counter() - first_token_at
            if tokens > 1 and decoding > 0:
                self.speed.observe((tokens - 1) / decoding)


class MetricsMiddleware:
    """Counts and times every HTTP request (plain ASGI, so streams are timed to their end)."""

    def __init__(self, app, metrics: Metrics, routes_of: FastAPI):
        self.app = app
        self.metrics = metrics
        self.routes_of = routes_of

    def _route(self, scope) -> str:
        for route in self.routes_of.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", "mounted")
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client sees if the app fails before answering

        async def recording_send(event):
            nonlocal status
            if event["type"] == "http.response.start":
                status = event["status"]
            await send(event)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = self._route(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            if status in (429, 503) and route != "/readyz":
                self.metrics.refused.labels(str(status)).inc()


def install_metrics(app: FastAPI, host: ModelHost, gate: Gate) -> Metrics:
    """GET /metrics and the middleware that feeds it; the collectors are also app.state.metrics."""
    metrics = Metrics(host, gate)
    app.state.metrics = metrics

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    async def scrape():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, metrics=metrics, routes_of=app)
    return metrics
