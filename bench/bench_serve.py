"""Serving speed: real HTTP to `glassgpt serve` (uvicorn) on loopback, as a user would meet it.

    .venv/bin/python bench/bench_serve.py [--model verdict-162m] [--requests 20] [--tokens 50]

- cold start: from launching the server process to its first 200 (GET /readyz), and to the first
  POST /generate answered;
- warm: POST /generate for `--tokens` new tokens (top-k 50, temperature 0.7, as the reference
  page of the project's specification), p50 and p99 over `--requests` requests, one at a time.
With `--checkpoint`, the model is first saved to a temporary directory and served from there
(loading safetensors instead of initialising random weights). Ratios are printed against the
reference figures the project's specification quotes (about 10 s cold, 2-3 s warm) and our
targets (3 s, 1 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _server import ServeProcess  # bench/ is on the path when a bench runs as a script

from glassgpt.generate import generate_text
from glassgpt.hub import resolve_model

REFERENCE_COLD_S, REFERENCE_WARM_S = 10.0, 2.5
TARGET_COLD_S, TARGET_WARM_S = 3.0, 1.0


def save_checkpoint(preset: str, directory: Path) -> Path:
    from glassgpt.model import GPT
    from glassgpt.tokenizer import get_tokenizer
    from glassgpt.weights import save_model

    return save_model(GPT.from_preset(preset), directory / preset, tokenizer=get_tokenizer("gpt2"))


def measure(model: str, n_requests: int, n_tokens: int, dtype: str = "float32", threads: int = 0,
            compile: bool = False) -> dict:
    body = {"prompt": "Every effort moves you", "max_tokens": n_tokens, "temperature": 0.7, "top_k": 50,
            "seed": 0}
    options = [*(["--threads", str(threads)] if threads else []), *(["--compile"] if compile else [])]
    server = ServeProcess(["--model", model, "--dtype", dtype, *options])
    url, ready_s = server.url, server.ready_s
    try:
        started = time.perf_counter() - ready_s  # the launch, on this clock
        first = httpx.post(url + "/generate", json=body, timeout=120)
        first.raise_for_status()
        first_generate_s = time.perf_counter() - started

        # The peer, in this process: the same generation with no HTTP, alternated with the requests
        # so that both meet the same load on the machine. Their ratio is the server's overhead.
        if threads:
            torch.set_num_threads(threads)
        local_model, tokenizer, _ = resolve_model(model, dtype=dtype)
        settings = {**{k: body[k] for k in ("temperature", "top_k", "seed")}, "compile": compile}
        latencies, local_latencies, tokens_per_s = [], [], []
        for _ in range(n_requests):
            request_started = time.perf_counter()
            response = httpx.post(url + "/generate", json=body, timeout=120)
            latencies.append(time.perf_counter() - request_started)
            answer = response.json()
            assert answer["completion_tokens"] == n_tokens, answer
            tokens_per_s.append(answer["tokens_per_s"])
            local_started = time.perf_counter()
            generate_text(local_model, tokenizer, body["prompt"], n_tokens, **settings)
            local_latencies.append(time.perf_counter() - local_started)
        del local_model
        info = httpx.get(url + "/api/model").json()
    finally:
        server.stop()
    latencies.sort()
    return {
        "model": info["name"], "parameters": info["parameters"], "dtype": info["dtype"], "ready_s": ready_s,
        "first_generate_s": first_generate_s, "p50_s": statistics.median(latencies),
        # p99 of 20 samples is their maximum; with more, the 99th percentile.
        "p99_s": statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else latencies[-1],
        "tokens_per_s": statistics.median(tokens_per_s),
        "local_p50_s": statistics.median(local_latencies),
        "load_average": os.getloadavg()[0],
    }


def report(label: str, result: dict, n_requests: int, n_tokens: int) -> None:
    print(f"\n{label}: {result['model']} ({result['parameters']:,} parameters, {result['dtype']}), "
          f"{os.cpu_count()} CPUs")
    print(f"  cold start, process -> GET /readyz 200      {result['ready_s']:6.2f} s   "
          f"(reference ~{REFERENCE_COLD_S:.0f} s: {REFERENCE_COLD_S / result['ready_s']:.1f}x; "
          f"target < {TARGET_COLD_S} s)")
    print(f"  cold start, process -> first /generate 200  {result['first_generate_s']:6.2f} s   "
          f"(reference ~{REFERENCE_COLD_S:.0f} s: {REFERENCE_COLD_S / result['first_generate_s']:.1f}x)")
    print(f"  warm POST /generate, {n_tokens} tokens, {n_requests} requests: p50 {result['p50_s']:.3f} s, "
          f"p99 {result['p99_s']:.3f} s, {result['tokens_per_s']:.1f} tokens/s   "
          f"(reference ~{REFERENCE_WARM_S} s: {REFERENCE_WARM_S / result['p50_s']:.1f}x; "
          f"target < {TARGET_WARM_S} s)")
    print(f"  same generation in-process, no HTTP: p50 {result['local_p50_s']:.3f} s -> serving overhead "
          f"{result['p50_s'] / result['local_p50_s']:.2f}x   "
          f"(machine load average {result['load_average']:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="verdict-162m",
                        help="preset (random weights) or checkpoint directory")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--checkpoint", action="store_true",
                        help="also serve the preset from a saved checkpoint")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "int8", "all"], default="all")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for server and peer (0: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="serve --compile (and the peer with compile=True)")
    args = parser.parse_args()

    for dtype in ("float32", "bfloat16", "int8") if args.dtype == "all" else (args.dtype,):
        report("preset, random weights" + (", --compile" if args.compile else ""),
               measure(args.model, args.requests, args.tokens, dtype, args.threads, args.compile),
               args.requests, args.tokens)
    if args.checkpoint:
        with tempfile.TemporaryDirectory() as directory:
            saved = save_checkpoint(args.model, Path(directory))
            report("saved checkpoint (safetensors)",
                   measure(str(saved), args.requests, args.tokens, "float32", args.threads),
                   args.requests, args.tokens)


if __name__ == "__main__":
    main()
