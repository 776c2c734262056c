"""Serving under real conditions (issue 15): dropped requests, a context-filling request, Retry-After.

    .venv/bin/python bench/bench_serve_conditions.py [--model verdict-demo-70m] [--threads 1] [--part all]

Real HTTP to uvicorn on 127.0.0.1 (glassgpt.serve.background), the model with random weights.
It uses only what every version of the server has (create_app, the gate's `admitted`), so that
`PYTHONPATH=<an older checkout>/src` measures the code before a change with the same script.

- cancel: for each generating route, 4 requests of 256 tokens (the first running, three queued)
  are dropped after 1 s; measured: seconds until the gate is empty, forward passes after the drop,
  and how long a 2-token request sent right after the drop takes. Waits at most --wait seconds.
- cost: one request with a prompt of the whole context and max_tokens = the context, against a
  short prompt whose reply fills the context: forward passes, tokens processed and seconds per
  generated token (this part calls iter_tokens directly, with slide=1, the recomputation every
  step past the context, and with the window_slide the server now uses).
- retry: 3 requests of 64 tokens one at a time (the gate learns from them), then a queue of 5
  requests of 8 tokens, and one more: its Retry-After against the time the queue takes to drain.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import httpx
import torch

from glassgpt.config import PRESETS
from glassgpt.generate import iter_tokens
from glassgpt.model import GPT
from glassgpt.serve import create_app
from glassgpt.serve.background import BackgroundServer
from glassgpt.tokenizer import get_tokenizer


class Counter:
    def __init__(self, model):
        self.calls = self.tokens = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1
        self.tokens += args[0].shape[-1]


def send_raw(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def cancel(model, tokenizer, counter, wait_s: float, only: list[str] | None) -> None:
    name = model.config.name
    routes = {
        "/generate": {"prompt": "Every effort moves you", "max_tokens": 256},
        "/generate/stream": {"prompt": "Every effort moves you", "max_tokens": 256},
        "/v1/completions": {"model": name, "prompt": "Every effort moves you", "max_tokens": 256},
        "/v1/chat/completions": {"model": name, "max_tokens": 256,
                                 "messages": [{"role": "user", "content": "Every effort moves you"}]},
    }
    routes = {path: body for path, body in routes.items() if not only or path in only}
    app = create_app(model, tokenizer, max_tokens_cap=256, max_running=1, max_waiting=8)
    gate = app.state.gate
    print("| route | gate empty after the drop | forward passes after the drop | next 2-token request |")
    print("| --- | --- | --- | --- |")
    with BackgroundServer(app) as server:
        for path, body in routes.items():
            clients = [send_raw(server.port, path, body) for _ in range(4)]
            time.sleep(1.0)
            calls = counter.calls
            dropped = time.perf_counter()
            for client in clients:
                client.close()
            while gate.admitted and time.perf_counter() - dropped < wait_s:
                time.sleep(0.005)
            empty_s = time.perf_counter() - dropped
            after = counter.calls - calls
            started = time.perf_counter()
            httpx.post(server.url + "/generate", json={"prompt": "Hi", "max_tokens": 2}, timeout=600)
            next_s = time.perf_counter() - started
            empty = f"{empty_s:.3f} s" if not gate.admitted or empty_s < wait_s else f"> {wait_s:.0f} s"
            print(f"| {path} | {empty} | {after} | {next_s:.2f} s |", flush=True)
            while gate.admitted:  # the old server: let the dropped work finish before the next route
                time.sleep(0.1)


def cost(model, tokenizer, counter, before: bool) -> None:
    from glassgpt.serve.engine import window_slide

    context = model.config.context_length
    half = context // 2
    long_ids = [(7 * i) % 5000 for i in range(half)]  # what /generate keeps of a whole-context prompt
    short_ids = tokenizer.encode("Every effort moves you")
    print("| request | forward passes / token | tokens processed / token | s / token |")
    print("| --- | --- | --- | --- |")
    runs = [(f"short prompt (4 tokens), {context - len(short_ids)} new (up to the context)", short_ids, 1),
            (f"whole-context prompt, {context} new, recompute every step (before)", long_ids, 1),
            (f"whole-context prompt, {context} new, window slides by half (after)", long_ids,
             window_slide(context))]
    for label, ids, slide in runs if before else runs[::2]:
        n = context - len(short_ids) if ids is short_ids else context
        counter.calls = counter.tokens = 0
        started = time.perf_counter()
        list(iter_tokens(model, ids, n, slide=slide))
        seconds = time.perf_counter() - started
        per_token = f"{counter.calls / n:.2f} | {counter.tokens / n:.2f} | {seconds / n:.3f}"
        print(f"| {label} | {per_token} |", flush=True)


def retry(model, tokenizer) -> None:
    app = create_app(model, tokenizer, max_tokens_cap=256, max_running=1, max_waiting=4)
    gate = app.state.gate
    with BackgroundServer(app) as server:
        for _ in range(3):
            httpx.post(server.url + "/generate", json={"prompt": "Hi", "max_tokens": 64}, timeout=600)
        threads = [threading.Thread(target=httpx.post, args=(server.url + "/generate",),
                                    kwargs={"json": {"prompt": "Hi", "max_tokens": 8}, "timeout": 600})
                   for _ in range(5)]
        for thread in threads:
            thread.start()
        while gate.admitted < 5:
            time.sleep(0.001)
        refused = httpx.post(server.url + "/generate", json={"prompt": "Hi", "max_tokens": 8}, timeout=600)
        at = time.perf_counter()
        while gate.admitted:
            time.sleep(0.005)
        drain = time.perf_counter() - at
        for thread in threads:
            thread.join()
    retry_after = int(refused.headers["retry-after"])
    print(f"Retry-After {retry_after} s (status {refused.status_code}); the queue drained in {drain:.2f} s: "
          f"{retry_after / drain:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="verdict-demo-70m", choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part", default="all", choices=("all", "cancel", "cost", "retry"))
    parser.add_argument("--wait", type=float, default=60.0, help="longest wait for a dropped request's work")
    parser.add_argument("--no-before", action="store_true", help="cost: skip the slow recomputing run")
    parser.add_argument("--routes", nargs="*", help="the routes the cancel part drops (default: all four)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(PRESETS[args.model]).eval()
    tokenizer = get_tokenizer("gpt2")
    counter = Counter(model)
    print(f"{args.model}, {args.threads} thread(s), load average {open('/proc/loadavg').read().split()[0]}")
    if args.part in ("all", "cancel"):
        cancel(model, tokenizer, counter, args.wait, args.routes)
    if args.part in ("all", "cost"):
        cost(model, tokenizer, counter, not args.no_before)
    if args.part in ("all", "retry"):
        retry(model, tokenizer)


if __name__ == "__main__":
    main()
