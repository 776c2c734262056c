"""Slow connections (issue 15): a client that sends its headers or its body a byte at a time, or
nothing at all, is answered 408 and cut off within the read deadline, while other clients keep
being served. A real uvicorn on loopback with the limits `glassgpt serve` sets (serve/connections.py),
the deadline shortened to READ_TIMEOUT so the test takes seconds."""

import socket
import threading
import time

import httpx
import pytest

from glassgpt.serve import ServeSettings, create_app
from glassgpt.serve.background import BackgroundServer

READ_TIMEOUT = 1.0
SLACK = 1.5  # the loop's timer plus a busy 2-core machine


@pytest.fixture(scope="module")
def server(model, tokenizer):
    app = create_app(model, tokenizer, max_tokens_cap=4, read_timeout_s=READ_TIMEOUT)
    with BackgroundServer(app) as server:
        yield server


def trickle(port: int, data: bytes, interval: float = 0.1, prefix: bytes = b"") -> tuple[float, bytes]:
    """Send `prefix` at once, then `data` a byte every `interval` s until the server closes the
    connection: (seconds from connecting to the close, what the server sent)."""
    sock = socket.create_connection(("127.0.0.1", port))
    started = time.monotonic()
    sock.sendall(prefix)
    stop = threading.Event()

    def drip():
        try:
            for byte in data:
                if stop.wait(interval):
                    return
                sock.send(bytes([byte]))
        except OSError:  # the server closed the connection
            pass

    sender = threading.Thread(target=drip, daemon=True)
    sender.start()
    received = b""
    sock.settimeout(30)
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    elapsed = time.monotonic() - started
    stop.set()
    sender.join(timeout=5)
    sock.close()
    return elapsed, received


SLOW_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " + b"s" * 200 + b"\r\n\r\n"
SLOW_BODY_HEADERS = (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n")


def test_slow_headers_get_408_and_are_closed_within_the_deadline(server):
    elapsed, received = trickle(server.port, SLOW_HEADERS)
    assert READ_TIMEOUT - 0.05 <= elapsed <= READ_TIMEOUT + SLACK
    assert received.startswith(b"HTTP/1.1 408 ") and b'"error": "request timeout' in received


def test_a_silent_connection_is_closed_within_the_deadline(server):
    elapsed, received = trickle(server.port, b"", interval=0)
    assert READ_TIMEOUT - 0.05 <= elapsed <= READ_TIMEOUT + SLACK
    assert received == b""  # nothing was asked: nothing to answer


def test_a_slow_body_gets_408_in_the_apps_error_shape_and_is_closed(server):
    # The headers at once, then the body a byte at a time.
    elapsed, received = trickle(server.port, b'{"prompt": "' + b"a" * 200, prefix=SLOW_BODY_HEADERS)
    assert READ_TIMEOUT - 0.05 <= elapsed <= READ_TIMEOUT + SLACK
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    assert body == b'{"error": "request timeout: the body did not arrive within 1 s"}'


def test_normal_requests_keep_being_served_while_slow_clients_hold_connections(server):
    results = []
    slow = [threading.Thread(target=lambda: results.append(trickle(server.port, SLOW_HEADERS)))
            for _ in range(8)]
    for thread in slow:
        thread.start()
    served = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        deadline = time.monotonic() + READ_TIMEOUT + 0.5
        while time.monotonic() < deadline:
            served.append(client.get("/healthz").status_code)
            time.sleep(0.05)
        generated = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2})
    for thread in slow:
        thread.join(timeout=30)
    assert len(served) >= 5 and set(served) == {200}
    assert generated.status_code == 200 and generated.json()["completion_tokens"] == 2
    assert len(results) == 8 and all(elapsed <= READ_TIMEOUT + SLACK for elapsed, _ in results)


def test_a_keep_alive_connection_serves_many_requests_and_the_server_sets_uvicorns_limits(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:  # one connection, kept alive
        assert [client.get("/healthz").status_code for _ in range(5)] == [200] * 5
    config, defaults = server.server.config, ServeSettings()
    assert config.limit_concurrency == defaults.max_connections == 64
    assert config.timeout_keep_alive == defaults.keep_alive_s == 5
    assert config.h11_max_incomplete_event_size == defaults.max_header_bytes == 16 * 1024
    assert config.http_protocol_class.read_timeout_s == READ_TIMEOUT


@pytest.mark.parametrize("bad, message", [({"read_timeout_s": 0}, "read_timeout_s must be > 0"),
                                          ({"max_connections": 0}, "max_connections must be at least 1"),
                                          ({"keep_alive_s": 0}, "keep_alive_s must be at least 1")])
def test_connection_limits_are_checked_when_set(bad, message):
    with pytest.raises(ValueError, match=message):
        ServeSettings(**bad)
