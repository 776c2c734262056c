"""Serving: a FastAPI app with the generation API, a view inside the model, and its web pages.

    from glassgpt.serve import serve
    serve("runs/demo")                      # http://127.0.0.1:8000
    serve(model, tokenizer=tokenizer, port=8001, max_running=2)
"""

from __future__ import annotations

import errno
import logging
import socket

import uvicorn

from glassgpt.serve.app import ServeSettings, create_app
from glassgpt.serve.connections import server_config
from glassgpt.serve.site import write_site

__all__ = ["PortUnavailable", "ServeSettings", "create_app", "serve", "write_site"]


class PortUnavailable(ValueError):
    """The address cannot be served (a ValueError: the CLI answers it in one line, as a bad argument)."""


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port`, or PortUnavailable saying what to do. Binding first, before the
    model loads, makes a busy port a one-line error in a second, not uvicorn's after a long load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise PortUnavailable(f"cannot serve on host {host!r}: {error.strerror}; give --host an "
                              "address of this machine (127.0.0.1: this machine only, 0.0.0.0: every "
                              "network)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise PortUnavailable(f"port {port} on {host} is already in use (another glassgpt serve?): stop "
                                  f"that server, or choose another port with --port {port + 1}") from None
        raise PortUnavailable(f"cannot serve on {host}:{port}: {error.strerror}; choose another --port "
                              "(ports below 1024 need root) or --host") from None
    return sock


def serve(model="runs/demo", host: str = "127.0.0.1", port: int = 8000, tokenizer=None,
          log_level: str = "info", **settings) -> None:
    """Serve `model` (checkpoint dir, preset name, or GPT object with `tokenizer`) until Ctrl-C.

    Binds to loopback unless `host` says otherwise. `settings` are `ServeSettings` fields. The port
    is taken and the model loaded (unless lazy) before the server starts, so a busy port or a model
    that cannot load is an exception here (PortUnavailable, ValueError, FileNotFoundError), not a
    traceback in the server's log.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("glassgpt.serve.access")  # JSON lines, one per request, as they are
    if not access.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.propagate = False
    sock = bind(host, port)
    try:
        app = create_app(model, tokenizer, **settings)
        if not app.state.settings.lazy:
            app.state.host.get()  # the lifespan's load then finds it loaded
        print(f"glassgpt: serving {app.state.host.name} on http://{host}:{port}/  (Ctrl-C stops)", flush=True)
        # Our AccessLog middleware writes one JSON line per request instead of uvicorn's access log.
        uvicorn.Server(server_config(app, host, port, log_level)).run(sockets=[sock])
    finally:
        sock.close()
