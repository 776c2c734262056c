"""A bounded load test: `glassgpt serve` in its own process on 127.0.0.1, 32 concurrent clients,
400 requests over every endpoint, then it stops. No 5xx but the deliberate 503; memory steady."""

import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch

from glassgpt.config import GPTConfig
from glassgpt.model import GPT
from glassgpt.tokenizer import get_tokenizer
from glassgpt.weights import save_model

CLIENTS = 32
REQUESTS = 400


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("load")
    torch.manual_seed(0)
    model = GPT(GPTConfig(name="tiny-load", vocab_size=50257, context_length=64, emb_dim=32, n_heads=2,
                          n_layers=2))
    save_model(model, directory / "model", tokenizer=get_tokenizer("gpt2"))
    port = free_port()
    log = open(directory / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "glassgpt.cli", "serve", "--model", str(directory / "model"),
         "--port", str(port), "--max-tokens-cap", "16", "--max-running", "1", "--max-waiting", "8"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start: " + (directory / "server.log").read_text())
        time.sleep(0.1)
    yield url, process, directory / "server.log"
    process.terminate()
    process.wait(timeout=10)
    log.close()


def one_request(rng: random.Random) -> tuple[str, str, dict]:
    roll = rng.random()
    prompt = rng.choice(["Every effort moves you", "The painting was", "I HAD always thought", "Hello"])
    if roll < 0.55:
        return "POST", "/generate", {"prompt": prompt, "max_tokens": rng.randint(1, 16),
                                     "temperature": rng.choice([0.0, 0.7, 1.5]),
                                     "top_k": rng.choice([None, 5, 50])}
    if roll < 0.75:
        return "POST", "/generate/stream", {"prompt": prompt, "max_tokens": rng.randint(1, 16)}
    if roll < 0.85:
        return "POST", "/api/inspect", {"text": prompt}
    if roll < 0.92:
        return "POST", "/generate", {"prompt": prompt, "max_tokens": 99}  # over the cap: 422
    return "GET", rng.choice(["/healthz", "/readyz", "/api/model"]), {}


async def hammer(url: str, n_requests: int, seed: int) -> tuple[Counter, list[float]]:
    rng = random.Random(seed)
    plan = [one_request(rng) for _ in range(n_requests)]
    statuses: Counter = Counter()
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while plan:
            method, path, body = plan.pop()
            started = time.perf_counter()
            response = await http.request(method, path, json=body or None)
            if path == "/generate/stream" and response.status_code == 200:
                assert response.text.rstrip().split("\n\n")[-1].startswith("event: done")
            if response.status_code == 503:
                assert int(response.headers["retry-after"]) >= 1
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] += 1

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
    return statuses, latencies


def test_load_no_server_errors_and_steady_memory(server):
    url, process, log_path = server
    asyncio.run(hammer(url, 200, seed=1))  # warm-up: allocator caches, thread pools
    rss_before = rss_mib(process.pid)
    started = time.perf_counter()
    statuses, latencies = asyncio.run(hammer(url, REQUESTS, seed=2))
    wall = time.perf_counter() - started
    rss_after = rss_mib(process.pid)

    quantiles = statistics.quantiles(latencies, n=100)
    print(f"\n{REQUESTS} requests from {CLIENTS} clients in {wall:.1f} s; "
          f"statuses {dict(sorted(statuses.items()))}; "
          f"latency p50 {quantiles[49] * 1000:.0f} ms, p99 {quantiles[98] * 1000:.0f} ms; "
          f"server RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    assert sum(statuses.values()) == REQUESTS
    assert set(statuses) <= {200, 422, 503}, statuses  # 503 is the deliberate back-pressure
    assert statuses[200] >= REQUESTS // 4
    assert statuses[422] > 0
    assert rss_after - rss_before < 40, "server memory grew under load"
    assert process.poll() is None
    assert httpx.get(url + "/healthz").status_code == 200

    access = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert (len(access) >= REQUESTS
            and {"request_id", "method", "path", "status", "duration_ms"} <= set(access[-1]))
