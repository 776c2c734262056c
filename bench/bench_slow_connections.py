"""Slow connections against `glassgpt serve` (issue 15): how long a client that sends its headers or
its body a byte at a time, or nothing, holds its connection, and what normal clients meet meanwhile.

    .venv/bin/python bench/bench_slow_connections.py [--clients 16] [--interval 0.5] [--read-timeout 10]

Starts `glassgpt serve` as its own process with its default limits (a small random GPT-2-vocabulary
model: this measures connections, not generation), opens `--clients` connections of each kind
(slow headers, slow body, silent), and while they are held sends normal requests one after another
(GET /healthz and POST /generate of 8 tokens). Prints the time from connecting to the server's
close for each kind (median and maximum), what the slow clients were answered, and the normal
requests' statuses and latency (p50, p95).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _server import ServeProcess  # bench/ is on the path when a bench runs as a script

from glassgpt import GPT, GPTConfig
from glassgpt.tokenizer import get_tokenizer
from glassgpt.weights import save_model

KINDS = {
    "slow headers": (b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " + b"s" * 400
                     + b"\r\n\r\n"),
    "slow body": (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 400\r\n\r\n", b'{"prompt": "' + b"a" * 386 + b'"}'),
    "silent": (b"", b""),
}


def slow_client(port: int, prefix: bytes, data: bytes, interval: float, out: list) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    started = time.monotonic()
    stop = threading.Event()

    def drip():
        try:
            sock.sendall(prefix)
            for byte in data:
                if stop.wait(interval):
                    return
                sock.send(bytes([byte]))
        except OSError:
            pass

    threading.Thread(target=drip, daemon=True).start()
    received = b""
    sock.settimeout(300)
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except OSError:
        pass
    stop.set()
    sock.close()
    answer = received.split(b"\r\n", 1)[0].decode() or "(closed, nothing sent)"
    out.append((time.monotonic() - started, answer))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="slow connections of each kind")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between a slow client's bytes")
    parser.add_argument("--read-timeout", type=float, default=None,
                        help="serve's --read-timeout (default: its own)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        config = GPTConfig(name="bench-small", vocab_size=50257, context_length=64, emb_dim=64, n_heads=2,
                           n_layers=2)
        save_model(GPT(config), Path(tmp) / "model", tokenizer=get_tokenizer("gpt2"))
        command = ["--model", str(Path(tmp) / "model"), "--dtype", "float32", "--threads", "1"]
        if args.read_timeout is not None:
            command += ["--read-timeout", str(args.read_timeout)]
        server = ServeProcess(command, timeout_s=120)
        url, port = server.url, int(server.url.rsplit(":", 1)[1])
        try:
            results = {kind: [] for kind in KINDS}
            threads = [threading.Thread(target=slow_client,
                                        args=(port, prefix, data, args.interval, results[kind]))
                       for kind, (prefix, data) in KINDS.items() for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            # At least 10 s of normal requests (with --clients 0: the baseline).
            statuses, latencies, until = {}, [], time.monotonic() + 10
            with httpx.Client(base_url=url, timeout=30) as client:
                while any(thread.is_alive() for thread in threads) or time.monotonic() < until:
                    for request in (lambda: client.get("/healthz"),
                                    lambda: client.post("/generate", json={"prompt": "Hi", "max_tokens": 8})):
                        started = time.perf_counter()
                        status = request().status_code
                        latencies.append(time.perf_counter() - started)
                        statuses[status] = statuses.get(status, 0) + 1
                    time.sleep(0.05)
            for thread in threads:
                thread.join()
        finally:
            server.stop()

    print(f"{args.clients} clients of each kind, a byte every {args.interval} s")
    for kind, rows in results.items():
        if not rows:
            continue
        times = [elapsed for elapsed, _ in rows]
        answers = sorted({answer for _, answer in rows})
        print(f"  {kind:13} closed after median {statistics.median(times):.2f} s, max {max(times):.2f} s; "
              f"answered: {', '.join(answers)}")
    latencies.sort()
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"  normal requests meanwhile: {sum(statuses.values())} ({statuses}); "
          f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
