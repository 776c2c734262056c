"""Small ASGI middlewares: a request-body size cap, a deadline for the body, and one structured
access-log line per request.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so that streamed responses pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from datetime import UTC, datetime

access_log = logging.getLogger("glassgpt.serve.access")


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


class AccessLog:
    """One JSON line per request: id, method, path, status, duration, client."""

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
            access_log.info(json.dumps({
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "client": f"{client[0]}:{client[1]}" if client else None,
            }))
