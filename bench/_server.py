"""`glassgpt serve` in a child process, as the serving benchmarks start it (real uvicorn, loopback)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """`python -m glassgpt serve ARGS --port P`, started and ready (GET /readyz answered 200).

    `url` is where it answers, `ready_s` how long it took to get there from the launch; its log
    goes to a temporary file that `tail()` reads (the error a failure raises includes it).
    `stop()` ends it. Use as a context manager to stop it whatever happens.
    """

    def __init__(self, args: list[str], timeout_s: float = 600):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")
        started = time.perf_counter()
        command = [sys.executable, "-m", "glassgpt", "serve", *args, "--port", str(port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.perf_counter() - started > timeout_s:
                self.stop()
                raise RuntimeError("the server did not start:\n" + self.tail())
            time.sleep(0.02)
        self.ready_s = time.perf_counter() - started

    def tail(self, lines: int = 40) -> str:
        self.log.seek(0)
        return "".join(self.log.readlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
