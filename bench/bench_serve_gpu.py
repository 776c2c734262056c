"""Serving on a GPU: `/v1/completions` through real HTTP against the decoder alone, and concurrent requests.

    python bench/bench_serve_gpu.py [--dtype bfloat16] [--tokens 256] [--requests 10] [--concurrency 1 4 8]

GPT-2 small's shape with random weights, saved as a checkpoint and served by `glassgpt serve
--device cuda` in a child process (uvicorn on loopback); the peers run in this process on the
same weights:
- batch 1: a `/v1/completions` request (greedy, then sampled: temperature 0.8, top-p 0.95) against
  the same generation in-process through `glassgpt.generate` (the path the server calls: a CUDA
  graph per step, the sampler outside it), against its eager path, and against the bare
  `GraphedDecoder` loop (greedy, no sampler, no detokenizing): the server's overhead is the ratio.
  Rounds alternate HTTP and in-process so both meet the same machine.
- concurrency K: K clients at once against a server started with `--max-running K` (each request
  decodes in its own thread, each through its own graphed decoder), total tokens/s, beside what
  one batched decoder of K rows gives (`GraphedDecoder(batch_size=K)`), the gain batching requests
  together would bring.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from _server import ServeProcess  # bench/ is on the path when a bench runs as a script

import glassgpt.generate as generate_module
from glassgpt.cuda_graphs import GraphedDecoder
from glassgpt.generate import generate
from glassgpt.hub import resolve_model

PROMPT = "Every effort moves you"
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 0}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call) -> float:
    synchronize()
    started = time.perf_counter()
    call()
    synchronize()
    return time.perf_counter() - started


class Server(ServeProcess):
    """`glassgpt serve --device cuda` in a child process, until `stop()`."""

    def __init__(self, checkpoint: Path, device: str, dtype: str, max_running: int, tokens: int,
                 compile: bool):
        super().__init__(["--model", str(checkpoint), "--device", device, "--dtype", dtype,
                          "--max-running", str(max_running), "--max-waiting", "64",
                          "--max-tokens-cap", str(tokens), *(["--compile"] if compile else [])])
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def complete(self, client: httpx.Client, tokens: int, **sampling) -> tuple[float, int]:
        """(seconds, completion tokens) of one /v1/completions request."""
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, **sampling}
        started = time.perf_counter()
        response = client.post(self.url + "/v1/completions", json=body, timeout=600)
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code} {response.text[:300]}\nserver log:\n{self.tail()}")
        return seconds, response.json()["usage"]["completion_tokens"]


def batch_one(server: Server, model, ids: torch.Tensor, tokens: int, requests: int,
              compile: bool) -> dict[str, float]:
    """Median tokens/s of each way to decode one sequence, alternating HTTP and in-process rounds."""
    decoder = GraphedDecoder(model, batch_size=1, compile=compile)  # as the server's (compiled or not)
    rates: dict[str, list[float]] = {}

    def record(name: str, seconds: float, produced: int) -> None:
        rates.setdefault(name, []).append(produced / seconds)

    def eager(**sampling):
        original = generate_module._graphed
        generate_module._graphed = lambda *args: False
        try:
            return generate(model, ids, tokens, **sampling)  # nothing to compile on CUDA eagerly
        finally:
            generate_module._graphed = original

    with httpx.Client() as client:
        for _ in range(2):                               # warm-up: captures, allocator, connections
            server.complete(client, tokens)
            generate(model, ids, tokens, compile=compile)
            decoder.generate(ids, tokens)
        for _ in range(requests):
            record("HTTP /v1/completions, greedy", *server.complete(client, tokens))
            record("HTTP /v1/completions, sampled", *server.complete(client, tokens, **SAMPLED))
            record("in-process generate (graphed), greedy",
                   timed(lambda: generate(model, ids, tokens, compile=compile)), tokens)
            record("in-process generate (graphed), sampled",
                   timed(lambda: generate(model, ids, tokens, compile=compile, **SAMPLED)), tokens)
            record("in-process generate (eager), greedy", timed(lambda: eager()), tokens)
            record("GraphedDecoder loop alone, greedy", timed(lambda: decoder.generate(ids, tokens)), tokens)
    return {name: statistics.median(values) for name, values in rates.items()}


def concurrent(server: Server, concurrency: int, tokens: int, per_client: int) -> float:
    """Total completion tokens/s of `concurrency` clients sending `per_client` requests each."""
    produced, failures = [], []

    def client_loop():
        with httpx.Client() as client:
            try:
                for _ in range(per_client):
                    produced.append(server.complete(client, tokens, **SAMPLED)[1])
            except RuntimeError as failure:
                failures.append(failure)

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return sum(produced) / (time.perf_counter() - started)


def batched_decoder_rate(model, ids: torch.Tensor, batch: int, tokens: int, compile: bool) -> float:
    decoder = GraphedDecoder(model, batch_size=batch, compile=compile)
    rows = ids.expand(batch, -1).contiguous()
    decoder.generate(rows, tokens)
    seconds = statistics.median(timed(lambda: decoder.generate(rows, tokens)) for _ in range(3))
    return batch * tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--compile", action="store_true", help="serve and decode with the compiled step")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the benchmark itself out")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    from glassgpt.model import GPT
    from glassgpt.tokenizer import get_tokenizer
    from glassgpt.weights import save_model

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = save_model(GPT.from_preset("gpt2"), Path(scratch) / "gpt2-random",
                                tokenizer=get_tokenizer("gpt2"))
        model, tokenizer, _ = resolve_model(checkpoint, args.device, args.dtype)
        ids = torch.tensor([tokenizer.encode(PROMPT)], device=args.device)
        where = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        print(f"GPT-2 small (124M, random weights), {args.dtype}, {where}, "
              f"prompt {ids.shape[1]} tokens + {args.tokens} new, torch {torch.__version__}")

        server = Server(checkpoint, args.device, args.dtype, 1, args.tokens, args.compile)
        try:
            print(f"server ready in {server.ready_s:.1f} s (load, warm-up, graph capture)")
            rates = batch_one(server, model, ids, args.tokens, args.requests, args.compile)
        finally:
            server.stop()
        alone = rates["GraphedDecoder loop alone, greedy"]
        print(f"\nbatch 1, median of {args.requests} alternating rounds "
              f"(tokens/s; x = decoder alone / this):")
        for name, rate in rates.items():
            print(f"  {name:42s} {rate:8.1f}   {alone / rate:5.2f}x")

        print("\nconcurrent requests (sampled), total tokens/s:")
        for concurrency in args.concurrency:
            server = Server(checkpoint, args.device, args.dtype, concurrency, args.tokens, args.compile)
            try:
                concurrent(server, concurrency, args.tokens, 1)           # warm every thread's decoder
                served = concurrent(server, concurrency, args.tokens, 3)
            finally:
                server.stop()
            batched = batched_decoder_rate(model, ids, concurrency, args.tokens, args.compile)
            print(f"  {concurrency} clients, --max-running {concurrency}: served {served:8.1f}   "
                  f"one decoder batching {concurrency} rows: {batched:8.1f}   "
                  f"(batching would give {batched / served:.2f}x)")


if __name__ == "__main__":
    main()
