"""A real uvicorn server in a background thread: for notebooks, tests and benchmarks.

    with BackgroundServer(create_app(model, tokenizer=tokenizer)) as server:
        httpx.post(server.url + "/generate", json={"prompt": "Hello"})
"""

from __future__ import annotations

import threading
import time

import uvicorn

from glassgpt.serve.connections import server_config


class BackgroundServer:
    """Serve an ASGI app on `host`:`port` (0 picks a free port) until the `with` block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        # The connection limits `glassgpt serve` runs with (serve/connections.py), from the app's settings.
        self.server = uvicorn.Server(server_config(app, host, port, log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="glassgpt-server", daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]  # the one port 0 picked
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
