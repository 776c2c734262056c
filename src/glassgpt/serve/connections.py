"""What one connection may cost the server: uvicorn's limits, and a deadline for a request's headers.

uvicorn closes a keep-alive connection that sits idle for `timeout_keep_alive` seconds, but it sets
no deadline on a request's headers: a client that sends them a byte at a time holds its connection
(and one of `limit_concurrency`'s places) as long as it likes, and every byte restarts nothing.
`HeaderDeadline` closes a connection on which no request is being answered `read_timeout_s` after
it opened or answered its last request, with a 408 if the client is still talking. A request's body
has the same deadline, kept by the app's `ReadDeadline` middleware (serve/middleware.py), which
answers 408 in the app's own error shape and closes the connection.

`server_config` gives uvicorn these limits from the app's `ServeSettings`: `glassgpt serve` and
`BackgroundServer` (tests, notebooks) run with them. They bound what a slow or greedy client can do
to this process; a public deployment still sits behind a reverse proxy (nginx, Caddy) that buffers
requests, terminates TLS and limits rates per client.
"""

from __future__ import annotations

import json

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

_BODY = json.dumps({"error": "request timeout: the request did not arrive in time"}).encode()
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                   b"content-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY)


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline for a request's headers: `read_timeout_s`
    (a class attribute: `header_deadline(seconds)` makes the class uvicorn instantiates)."""

    read_timeout_s: float = 10.0
    _timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._answering():  # the headers are in: the body's deadline is the app's
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request already received
        if not self.transport.is_closing() and not self._answering():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.read_timeout_s, self._too_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_late(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._answering():
            return
        if self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]:  # part of a request came
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def header_deadline(read_timeout_s: float) -> type[HeaderDeadline]:
    """The protocol class for uvicorn's `http=`, with this deadline."""
    return type("HeaderDeadline", (HeaderDeadline,), {"read_timeout_s": read_timeout_s})


def server_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  **options) -> uvicorn.Config:
    """uvicorn's Config for `app` with the connection limits of its `ServeSettings` (defaults for an
    app that has none): `limit_concurrency` (connections and requests at once; beyond it uvicorn
    answers 503), `timeout_keep_alive` (idle keep-alive connections), `h11_max_incomplete_event_size`
    (the request line and headers; beyond it 400) and the header deadline above."""
    from glassgpt.serve.app import ServeSettings

    settings = getattr(getattr(app, "state", None), "settings", None) or ServeSettings()
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          http=header_deadline(settings.read_timeout_s),
                          limit_concurrency=settings.max_connections,
                          timeout_keep_alive=settings.keep_alive_s,
                          h11_max_incomplete_event_size=settings.max_header_bytes, **options)
