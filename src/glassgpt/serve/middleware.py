"""Small ASGI middlewares: a request-body size cap, a deadline for the body, a watch for clients
that leave before their answer, and one structured access-log line per request.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so that streamed responses pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

access_log = logging.getLogger("glassgpt.serve.access")

CLIENT_CLOSED = 499  # nginx's "client closed request": what a request whose client left is logged as
_client_gone: ContextVar[threading.Event | None] = ContextVar("glassgpt_client_gone", default=None)


def client_gone() -> threading.Event | None:
    """The flag `ClientWatch` sets when the current request's client goes away before its answer is
    complete (a threading.Event, for worker threads to poll); None outside a watched request."""
    return _client_gone.get()


async def _send_json(send, status: int, body: dict, headers: tuple = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


class BodySizeLimit:
    """Refuse (413) request bodies over `max_bytes`, whether declared up front or streamed in chunks."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = {"error": f"request body too large: the limit is {self.max_bytes:,} bytes"}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, message)

        received = 0
        responded = False  # by us, with the 413; whatever the app sends afterwards is dropped

        async def counting_receive():
            nonlocal received, responded
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    if not responded:
                        responded = True
                        await _send_json(send, 413, message)
                    # To the app the client has gone; frameworks stop reading and give up quietly.
                    return {"type": "http.disconnect"}
            return event

        async def guarded_send(event):
            if not responded:
                await send(event)

        await self.app(scope, counting_receive, guarded_send)


class ReadDeadline:
    """Answer 408 and close the connection when a request's body has not arrived `seconds` after the
    request began (a client sending it a byte at a time). The headers' deadline is the server's
    (serve/connections.py). Once the body is in, receiving only waits for the client to leave (a
    stream's end): no deadline then."""

    def __init__(self, app, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_in = started = late = False

        async def timed_receive():
            nonlocal body_in, late
            if body_in or late:
                return await receive()
            try:
                event = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                late = True
                if not started:
                    await _send_json(send, 408, {"error": f"request timeout: the body did not arrive within "
                                                          f"{self.seconds:g} s"},
                                     headers=((b"connection", b"close"),))
                # To the app the client has gone; frameworks stop reading and give up quietly.
                return {"type": "http.disconnect"}
            if event["type"] != "http.request" or not event.get("more_body", False):
                body_in = True
            return event

        async def guarded_send(event):
            nonlocal started
            if late and not started:
                return  # we answered 408: what the app sends afterwards is dropped
            started = True
            await send(event)

        await self.app(scope, timed_receive, guarded_send)


class ClientWatch:
    """Notice a client that leaves before its answer is complete, and say so in `client_gone()`.

    Once the app has read the whole request body, nobody else reads from the connection, so a task
    waits on it for the server's `http.disconnect`: a client that drops a non-streaming request is
    noticed at once, not when the answer it will never read is sent. The same flag is in the scope
    (for the access log) and in a context variable that worker threads inherit (for the gate).
    """

    SCOPE_KEY = "glassgpt.client_gone"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gone = threading.Event()
        scope[self.SCOPE_KEY] = gone
        answered = False  # the last byte of the answer was handed to the server
        watcher: asyncio.Task | None = None

        def disconnected() -> None:
            # After the answer the server reports a disconnect too: that one is no cancellation.
            if not answered:
                gone.set()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected()

        async def watched_receive():
            nonlocal watcher
            event = await receive()
            if event["type"] == "http.disconnect":
                disconnected()
            elif not event.get("more_body", False) and watcher is None:
                watcher = asyncio.ensure_future(watch())
            return event

        async def watched_send(event):
            nonlocal answered
            if event["type"] == "http.response.body" and not event.get("more_body", False):
                answered = True
            await send(event)

        context = _client_gone.set(gone)
        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            _client_gone.reset(context)
            if watcher is not None:
                watcher.cancel()


class AccessLog:
    """One JSON line per request: id, method, path, status, duration, client.

    A request whose client left before its answer was complete (`ClientWatch`) is logged with
    status 499 and "cancelled": true, even a stream whose 200 was already sent.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:12]
        status = 500  # what the client sees if the app fails before answering

        async def recording_send(event):
            nonlocal status
            if event["type"] == "http.response.start":
                status = event["status"]
                event["headers"] = [*event.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(event)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            client = scope.get("client")
            gone = scope.get(ClientWatch.SCOPE_KEY)
            cancelled = gone is not None and gone.is_set()
            access_log.info(json.dumps({
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "status": CLIENT_CLOSED if cancelled else status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "client": f"{client[0]}:{client[1]}" if client else None,
                **({"cancelled": True} if cancelled else {}),
            }))
