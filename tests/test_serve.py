"""The HTTP API (glassgpt.serve): every endpoint, every bound, the stream format, back-pressure,
body cap, CORS, pages, the static site and the CLI verbs. Tiny GPT-2-vocabulary model, in process."""

import asyncio
import json
import logging
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import torch
from conftest import TINY, sse_events
from fastapi.testclient import TestClient

from glassgpt import cpu_kernels
from glassgpt.cli import main
from glassgpt.generate import Sampling, generate_text
from glassgpt.inspect import record_attention
from glassgpt.model import GPT
from glassgpt.serve import ServeSettings, create_app, write_site
from glassgpt.serve import app as app_module
from glassgpt.serve.engine import Busy, Gate, fit_prompt, run_generation
from glassgpt.tokenizer import get_tokenizer
from glassgpt.weights import save_model

CAP = 12


@pytest.fixture(scope="module")
def client(model, tokenizer):
    with TestClient(create_app(model, tokenizer, max_tokens_cap=CAP, inspect_max_tokens=10)) as client:
        yield client


# ---------------------------------------------------------------- POST /generate

def test_generate_answers_the_greedy_continuation_with_counts(client, model, tokenizer):
    prompt = "Every effort moves you"
    body = client.post("/generate", json={"prompt": prompt, "max_tokens": 7}).json()
    expected = generate_text(model, tokenizer, prompt, 7)
    assert body["completion"] == expected
    assert body["text"] == prompt + expected
    assert body["prompt_tokens"] == len(tokenizer.encode(prompt)) == 4
    assert body["completion_tokens"] == 7
    assert body["model"] == "tiny"
    assert body["truncated"] is False and body["dropped_prompt_tokens"] == 0
    assert body["tokens_per_s"] == pytest.approx(7 / body["time_s"], rel=0.02)


@pytest.mark.parametrize("one_call_step", [True, False], ids=["one-call step", "no one-call step"])
def test_compiled_serving_warms_up_its_kernels_and_answers_the_same_text(model, tokenizer, one_call_step,
                                                                          monkeypatch):
    """--compile: the warm-up compiles the decode step (so requests don't), same greedy text; a model the
    one-call step of `cpu_step` serves (built here) compiles nothing, that step being the faster."""
    import copy

    import glassgpt.cpu_step as cpu_step
    import glassgpt.fast as fast
    from glassgpt.cuda_graphs import COMPILES_CPU_STEP, DECODERS

    served = copy.deepcopy(model)  # without decoders other tests made
    if not one_call_step:
        monkeypatch.setattr(cpu_step, "for_model", lambda model: None)
    stepped = cpu_step.for_model(served.eval()) is not None
    assert stepped == (one_call_step and cpu_kernels.ops() is not None)
    fast.COMPILED.reset()
    with TestClient(create_app(served, tokenizer, compile=True)) as client:
        # compiled at start-up, before any request: the whole step, on a decoder kept with the
        # model (torch 2.13+), or else the one-token kernels
        pools = served.__dict__.get(DECODERS.attribute, {})
        if stepped:
            assert not pools and fast.COMPILED.kernel is None
        elif COMPILES_CPU_STEP:
            assert [pool.made for pool in pools.values()] == [1]
        else:
            assert fast.COMPILED.kernel is not None
        for prompt in ("Every effort moves you", "I had always thought"):
            body = client.post("/generate", json={"prompt": prompt, "max_tokens": 9}).json()
            assert body["completion"] == generate_text(model, tokenizer, prompt, 9)
        if COMPILES_CPU_STEP and not stepped:
            assert [pool.made for pool in pools.values()] == [1]  # the requests reused it


def test_generate_defaults_to_50_tokens_capped_by_the_server(model, tokenizer):
    with TestClient(create_app(model, tokenizer, max_tokens_cap=60)) as client:
        assert client.post("/generate", json={"prompt": "Hi"}).json()["completion_tokens"] == 50
    with TestClient(create_app(model, tokenizer, max_tokens_cap=5)) as client:
        assert client.post("/generate", json={"prompt": "Hi"}).json()["completion_tokens"] == 5


def test_same_seed_same_text_other_seed_other_text(client):
    request = {"prompt": "The painting was", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    first = client.post("/generate", json=request).json()["completion"]
    again = client.post("/generate", json=request).json()["completion"]
    other = client.post("/generate", json={**request, "seed": 8}).json()["completion"]
    assert first == again
    assert first != other


def test_stop_string_ends_the_completion_before_it(client, model, tokenizer):
    full = generate_text(model, tokenizer, "Hello", CAP)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    body = client.post("/generate", json={"prompt": "Hello", "max_tokens": CAP, "stop": [stop]}).json()
    assert body["completion"] == full[:full.index(stop)]


@pytest.mark.parametrize("change, message", [
    ({"prompt": ""}, "prompt must not be empty"),
    ({"prompt": None}, "prompt: Input should be a valid string"),
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"max_tokens": CAP + 1}, f"max_tokens: Input should be less than or equal to {CAP}"),
    ({"max_tokens": "many"}, "max_tokens: Input should be a valid integer"),
    ({"temperature": -0.1}, "temperature: Input should be greater than or equal to 0"),
    ({"temperature": 2.01}, "temperature: Input should be less than or equal to 2"),
    ({"top_p": 0}, "top_p: Input should be greater than 0"),
    ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
    ({"top_k": 0}, "top_k: Input should be greater than or equal to 1"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop: List should have at most 4 items"),
    ({"stop": [""]}, "each stop string must be 1 to 64 characters"),
    ({"prompt": "bad \ud800 surrogate"}, "prompt: Input should be a valid string"),
    ({"prompt": "x" * 20_001}, "prompt: String should have at most 20000 characters"),
    ({"tempreature": 0.5}, "unknown field 'tempreature'"),
])
def test_generate_refuses_out_of_bounds_values_in_words(client, change, message):
    body = json.dumps({"prompt": "Hi", "max_tokens": 2, **change})  # ASCII: a lone surrogate as \ud800
    for path in ("/generate", "/generate/stream"):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert message in response.json()["error"]


@pytest.mark.parametrize("path, body", [
    ("/generate", {"max_tokens": "2"}), ("/generate", {"max_tokens": True}), ("/generate", {"seed": "5"}),
    ("/generate", {"top_k": False}), ("/generate", {"temperature": "0.5"}), ("/generate", {"top_p": True}),
    ("/generate/stream", {"max_tokens": "2"}), ("/api/inspect", {"text": "Hi", "views": "logit-lens"}),
    ("/generate", {"prompt": 5}), ("/generate", {"max_tokens": 2.5}),
])
def test_numbers_and_booleans_are_strict_as_the_schema_says(client, path, body):
    """Issue 15: an integer field took "5" and true; now only what the schema's type allows."""
    response = client.post(path, json=body if path == "/api/inspect" else {"prompt": "Hi", **body})
    assert response.status_code == 422, response.text
    assert "Input should be a valid" in response.json()["error"]


def test_integral_numbers_are_integers_as_json_schema_counts_them(client):
    """JSON Schema's "integer" takes 2.0, so the server does too (a schema-valid request is served)."""
    body = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2.0, "seed": 7.0}).json()
    assert body["completion_tokens"] == 2


def test_the_published_seed_bound_is_exact_and_accepted(client):
    """Issue 15: the schema said seed <= 9.223372036854776e18 (2**63 - 1 as a float: 2**63), which the
    server refused. The bound is published as exclusive 2**63, exact as a float, and its edge is served."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    seed = schemas["GenerateRequest"]["properties"]["seed"]
    [bounds] = [option for option in seed["anyOf"] if option["type"] == "integer"]
    assert bounds["minimum"] == 0 and bounds["exclusiveMaximum"] == 2**63 and "maximum" not in bounds
    assert isinstance(bounds["exclusiveMaximum"], int)  # not 9.223372036854776e18: floats round past it
    edge = int(bounds["exclusiveMaximum"]) - 1
    for seed, status in ((edge, 200), (edge + 1, 422)):
        response = client.post("/generate", json={"prompt": "Hi", "max_tokens": 1, "seed": seed})
        assert response.status_code == status


@pytest.mark.parametrize("path", ["/", "/inside", "/learn.html", "/healthz", "/readyz"])
def test_head_answers_as_get_without_the_body(client, path):
    """Issue 15: HEAD was 405; load balancers probe with it."""
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and get.content
    assert head.headers["content-type"] == get.headers["content-type"]


def test_generate_accepts_the_edges_of_every_range(client):
    for edge in ({"max_tokens": CAP}, {"max_tokens": 1}, {"temperature": 2.0, "top_p": 1.0, "top_k": 1},
                 {"temperature": 0.0, "seed": 2**63 - 1}, {"top_p": 1e-9, "temperature": 1.0},
                 {"top_p": 5e-324, "top_k": 1, "temperature": 2.0}):  # found by the fuzz pass
        response = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2, **edge})
        assert response.status_code == 200, (edge, response.text)


def test_missing_prompt_and_broken_json_are_422(client):
    assert client.post("/generate", json={"max_tokens": 3}).json()["error"] == "prompt is required"
    response = client.post("/generate", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["error"]


def test_a_prompt_longer_than_the_context_is_cut_at_its_start(client, tokenizer):
    prompt = " ".join(f"w{i}" for i in range(40))  # 80 tokens for a 32-token context
    n_tokens = len(tokenizer.encode(prompt))
    body = client.post("/generate", json={"prompt": prompt, "max_tokens": 4}).json()
    assert body["truncated"] is True
    assert body["prompt_tokens"] == 32 - 4  # room left for the 4 new tokens
    assert body["dropped_prompt_tokens"] == n_tokens - 28
    assert body["completion_tokens"] == 4
    assert body["text"].startswith(prompt)


def test_fit_prompt_keeps_at_least_half_the_context(tokenizer):
    text = " a" * 100
    kept, n_kept, dropped = fit_prompt(tokenizer, text, context_length=32, max_tokens=30)
    assert (n_kept, dropped) == (16, 84)
    assert kept == " a" * 16
    assert fit_prompt(tokenizer, "short", 32, 30) == ("short", 1, 0)


# ---------------------------------------------------------------- POST /generate/stream

def test_stream_is_server_sent_events_joining_to_the_plain_answer(client):
    request = {"prompt": "Every effort moves you", "max_tokens": 8}
    response = client.post("/generate/stream", json=request)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.text.endswith("\n\n")
    events = sse_events(response.text)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"piece"} and len(kinds) >= 2
    done = events[-1][1]
    assert "".join(data["text"] for _, data in events[:-1]) == done["completion"]
    plain = client.post("/generate", json=request).json()
    for key in ("text", "completion", "prompt_tokens", "completion_tokens", "truncated", "model"):
        assert done[key] == plain[key]


def test_stream_refuses_a_prompt_generate_refuses_with_422_before_it_starts(model, caplog):
    """Issue 15: the stream answered 200 and an error event (and logged a traceback at ERROR) where
    /generate answers 422; now both answer 422, and the refusal is one log line."""
    char_tokenizer = get_tokenizer("char", text="hello ")  # 4 ids: fits the model's vocabulary
    with TestClient(create_app(model, char_tokenizer)) as client, caplog.at_level(logging.INFO):
        response = client.post("/generate/stream", json={"prompt": "hex", "max_tokens": 2})
        plain = client.post("/generate", json={"prompt": "hex", "max_tokens": 2})
    assert response.status_code == plain.status_code == 422
    assert response.headers["content-type"] == "application/json"
    assert "'x' is not in this tokenizer's vocabulary" in response.json()["error"]
    assert response.json() == plain.json()
    refusals = [r for r in caplog.records if r.name == "glassgpt.serve" and "refused" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno < logging.ERROR and refusals[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_run_generation_stops_when_cancelled(model, tokenizer):
    cancelled = threading.Event()
    pieces = []

    def on_piece(piece):
        pieces.append(piece)
        cancelled.set()  # the client went away after the first piece

    result = run_generation(model, tokenizer, "Hello", 10, Sampling(), on_piece, cancelled)
    assert len(pieces) == 1
    assert result["completion"] == pieces[0]
    assert result["completion_tokens"] < 10


# ---------------------------------------------------------------- GET /api/model, POST /api/inspect

def test_model_endpoint_describes_the_live_model(client, model):
    info = client.get("/api/model").json()
    assert info["parameters"] == model.num_parameters() == 1_634_720
    assert [(row["name"], row["parameters"]) for row in info["breakdown"]] == model.parameter_breakdown()
    assert info["size_bytes"] == 4 * model.num_parameters()  # fp32, the tied head counted once
    assert info["config"] == TINY.to_dict()
    assert ((info["device"], info["dtype"], info["tokenizer"], info["name"])
            == ("cpu", "float32", "gpt2", "tiny"))
    assert info["limits"] == {"max_tokens": CAP, "inspect_max_tokens": 10, "max_prompt_chars": 20_000}


def test_inspect_returns_tokens_next_token_probabilities_and_attention(client, model, tokenizer):
    text = "The painting was"
    body = client.post("/api/inspect", json={"text": text}).json()
    ids = tokenizer.encode(text)
    assert [t["id"] for t in body["tokens"]] == ids
    assert [t["text"] for t in body["tokens"]] == ["The", " painting", " was"]

    with torch.no_grad():
        logits, weights = record_attention(model, torch.tensor([ids]))
    probs = torch.softmax(logits[0, -1].double(), dim=-1)
    expected = probs.topk(10)
    assert [t["id"] for t in body["next_tokens"]] == expected.indices.tolist()
    assert [t["prob"] for t in body["next_tokens"]] == pytest.approx(expected.values.tolist(), abs=1e-6)
    assert body["next_tokens"][0]["text"] == tokenizer.decode([expected.indices[0].item()])

    attention = torch.tensor(body["attention"], dtype=torch.float64)
    assert attention.shape == (2, 2, 3, 3) and (body["n_layers"], body["n_heads"]) == (2, 2)
    assert torch.allclose(attention, torch.stack([w[0] for w in weights]).double(), atol=5e-5)
    assert torch.allclose(attention.sum(-1), torch.ones(2, 2, 3, dtype=torch.float64), atol=1e-3)
    assert attention.triu(diagonal=1).abs().max() == 0  # the causal mask: nothing from the future


def test_inspect_caps_the_text_length(client):
    assert client.post("/api/inspect", json={"text": " a" * 10}).status_code == 200
    response = client.post("/api/inspect", json={"text": " a" * 11})
    assert response.status_code == 422
    assert response.json()["error"].startswith("text is 11 tokens; /api/inspect takes at most 10")
    assert client.post("/api/inspect", json={"text": ""}).json()["error"] == "text must not be empty"
    assert "at most 200 characters" in client.post("/api/inspect", json={"text": "a" * 201}).json()["error"]
    assert client.post("/api/inspect", json={"text": "a", "layer": 1}).status_code == 422


# ---------------------------------------------------------------- health, readiness, lazy loading

def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_lazy_app_loads_its_checkpoint_on_the_first_request(tmp_path, model, tokenizer):
    save_model(model, tmp_path / "ckpt", tokenizer=tokenizer)
    with TestClient(create_app(str(tmp_path / "ckpt"), lazy=True)) as client:
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200
        body = client.post("/generate", json={"prompt": "Every effort moves you", "max_tokens": 5}).json()
        assert body["completion"] == generate_text(model, tokenizer, "Every effort moves you", 5)
        assert body["model"] == "ckpt"
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["load_time_s"] > 0


def test_a_checkpoint_can_be_served_in_bfloat16_or_int8(tmp_path, model, tokenizer):
    save_model(model, tmp_path / "ckpt", tokenizer=tokenizer)
    with TestClient(create_app(str(tmp_path / "ckpt"), dtype="bfloat16")) as client:
        info = client.get("/api/model").json()
        assert info["dtype"] == "bfloat16" and info["size_bytes"] == 2 * model.num_parameters()
        body = client.post("/generate", json={"prompt": "Hello", "max_tokens": 3}).json()
        assert body["completion_tokens"] == 3
    with TestClient(create_app(str(tmp_path / "ckpt"), dtype="int8")) as client:
        info = client.get("/api/model").json()
        assert info["dtype"].startswith("int8") and info["parameters"] == model.num_parameters()
        assert [(r["name"], r["parameters"]) for r in info["breakdown"]] == model.parameter_breakdown()
        assert (client.post("/generate", json={"prompt": "Hello", "max_tokens": 3})
                .json()["completion_tokens"] == 3)
        inspected = client.post("/api/inspect", json={"text": "The painting was"}).json()
        assert len(inspected["attention"]) == 2
    with pytest.raises(ValueError, match="dtype must be 'float32', 'bfloat16' or 'int8'"):
        ServeSettings(dtype="float16x")


def test_a_missing_model_fails_at_creation_saying_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="make demo"):
        create_app(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="needs its tokenizer"):
        create_app(GPT(TINY))
    with pytest.raises(ValueError, match="unknown serve settings: max_tokens"):
        create_app(GPT(TINY), get_tokenizer("gpt2"), max_tokens=3)


def test_cli_serve_without_a_model_says_how_to_get_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    assert main(["serve"]) == 2
    error = capsys.readouterr().err
    assert "runs/demo" in error and "make demo" in error and "--model" in error


def _one_error_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.startswith("glassgpt: error: ") and error.count("\n") == 1, error  # no traceback
    return error


def test_cli_serve_answers_a_preset_without_gpt2s_vocabulary_in_one_line(capsys):
    """Issue 15: `serve --model nano` printed a 34-line traceback; the error names the presets that work."""
    assert main(["serve", "--model", "nano", "--port", "0"]) == 2
    error = _one_error_line(capsys)
    assert "nano has a vocabulary of 10,000" in error and "gpt2, gpt2-medium" in error
    assert "verdict-162m" in error and "tinygpt" not in error.split("GPT-2's vocabulary:")[1]


def test_cli_serve_answers_a_model_that_cannot_load_in_one_line_before_serving(tmp_path, capsys):
    """A checkpoint that fails only when loaded (here: a tokenizer larger than the model's vocabulary)
    is loaded before the server starts, so it is one line, not a traceback from uvicorn's start-up."""
    save_model(GPT(TINY.replace(vocab_size=100)), tmp_path / "small", tokenizer=get_tokenizer("gpt2"))
    assert main(["serve", "--model", str(tmp_path / "small"), "--port", "0", "--dtype", "float32"]) == 2
    assert "only has 100 token embeddings" in _one_error_line(capsys)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_passes_port_through():
    """Issue 15: `make demo PORT=8001` served on 8000 anyway."""
    root = Path(__file__).resolve().parent.parent
    for extra, expected in ((["PORT=8123"], "glassgpt demo --port 8123"), ([], "glassgpt demo")):
        commands = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(root), "demo", *extra],
                                  capture_output=True, text=True, check=True).stdout
        [command] = [line.strip() for line in commands.splitlines() if "glassgpt demo" in line]
        assert command.endswith(expected), command


def test_cli_serve_checks_the_port_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """Issue 15: a busy port failed with uvicorn's error after the model had loaded."""
    import socket

    import glassgpt.serve

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the port is busy")

    monkeypatch.setattr(glassgpt.serve, "create_app", must_not_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "gpt2", "--port", str(port), "--dtype", "float32"]) == 2
    error = _one_error_line(capsys)
    assert f"port {port} on 127.0.0.1 is already in use" in error and f"--port {port + 1}" in error


# ---------------------------------------------------------------- back-pressure: 503 + Retry-After

def test_gate_admits_up_to_capacity_then_refuses():
    gate = Gate(max_running=1, max_waiting=2)
    tickets = [gate.admit() for _ in range(3)]
    with pytest.raises(Busy) as refused:
        gate.admit()
    assert refused.value.retry_after_s == 3  # 3 jobs ahead, one at a time, ~1 s each (initial guess)
    with tickets[0]:
        pass
    tickets[1].cancel()
    assert gate.admitted == 1
    gate.admit()


def test_a_saturated_queue_answers_503_with_retry_after(client):
    gate = client.app.state.gate
    held = [gate.admit() for _ in range(gate.capacity)]  # every running slot and queue place taken
    try:
        for path, body in (("/generate", {"prompt": "Hi"}), ("/generate/stream", {"prompt": "Hi"}),
                           ("/api/inspect", {"text": "Hi"})):
            response = client.post(path, json=body)
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"].startswith("the server is busy; try again in")
    finally:
        for ticket in held:
            ticket.cancel()
    assert client.post("/generate", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_concurrent_requests_beyond_the_queue_are_refused_not_queued(model, tokenizer, monkeypatch):
    release = threading.Event()
    real_run = app_module.run_generation

    def blocked_run(*args, **kwargs):
        release.wait(timeout=30)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(app_module, "run_generation", blocked_run)
    app = create_app(model, tokenizer, max_running=1, max_waiting=1)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            requests = [asyncio.create_task(http.post("/generate", json={"prompt": "Hi", "max_tokens": 2}))
                        for _ in range(5)]
            while sum(task.done() for task in requests) < 3:  # 1 runs, 1 waits, 3 are turned away
                await asyncio.sleep(0.01)
            assert app.state.gate.admitted == 2
            release.set()
            return [response.status_code for response in await asyncio.gather(*requests)]

    statuses = asyncio.run(scenario())
    assert sorted(statuses) == [200, 200, 503, 503, 503]
    assert app.state.gate.admitted == 0


# ---------------------------------------------------------------- body cap, CORS, access log

def test_request_bodies_over_the_cap_get_413(model, tokenizer):
    with TestClient(create_app(model, tokenizer, max_body_bytes=1000)) as client:
        assert client.post("/generate", json={"prompt": "x" * 900, "max_tokens": 1}).status_code == 200
        response = client.post("/generate", json={"prompt": "x" * 1000, "max_tokens": 1})
        assert response.status_code == 413
        assert response.json()["error"] == "request body too large: the limit is 1,000 bytes"

        def chunks():  # no Content-Length: the cap is counted as the body arrives
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        chunked = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413


def test_cors_allows_only_listed_origins(model, tokenizer):
    allowed, other = "http://127.0.0.1:8080", "http://evil.example"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with TestClient(create_app(model, tokenizer, cors_origins=[allowed])) as client:
        ok = client.options("/generate", headers={"Origin": allowed, **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == allowed
        refused = client.options("/generate", headers={"Origin": other, **preflight})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        answer = client.post("/generate", json={"prompt": "Hi", "max_tokens": 1}, headers={"Origin": allowed})
        assert answer.headers["access-control-allow-origin"] == allowed
        answer = client.post("/generate", json={"prompt": "Hi", "max_tokens": 1}, headers={"Origin": other})
        assert "access-control-allow-origin" not in answer.headers
    with TestClient(create_app(model, tokenizer)) as client:  # no list: no origin at all
        answer = client.post("/generate", json={"prompt": "Hi", "max_tokens": 1}, headers={"Origin": allowed})
        assert "access-control-allow-origin" not in answer.headers
    with pytest.raises(ValueError, match="must look like http://host:port"):
        ServeSettings(cors_origins=("example.com",))


def test_every_request_gets_one_structured_access_log_line(client, caplog):
    with caplog.at_level(logging.INFO, logger="glassgpt.serve.access"):
        response = client.get("/healthz?probe=1")
    [record] = [r for r in caplog.records if r.name == "glassgpt.serve.access"]
    line = json.loads(record.getMessage())
    assert (line["method"], line["path"], line["status"]) == ("GET", "/healthz", 200)
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["duration_ms"] >= 0


def test_unknown_paths_are_404_in_the_same_error_shape(client):
    response = client.get("/nope")
    assert response.status_code == 404 and response.json() == {"error": "Not Found"}


def test_openapi_schema_shows_the_configured_bounds(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
    assert schema["properties"]["max_tokens"]["maximum"] == CAP
    assert schema["properties"]["temperature"]["maximum"] == 2.0
    assert schema["additionalProperties"] is False


# ---------------------------------------------------------------- pages, /learn, /api/explain

@pytest.mark.parametrize("url, title", [("/", "generate"), ("/architecture", "architecture"),
                                        ("/inside", "inside"), ("/inside.html", "inside")])
def test_pages_are_served_with_a_nav_to_every_page(client, url, title):
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert f"<title>glassgpt · {title}</title>" in response.text
    for link in ('href="./"', 'href="architecture.html"', 'href="inside.html"', 'href="learn.html"'):
        assert link in response.text
    assert client.get("/static/style.css").status_code == 200


def test_explain_routes_run_the_walk_through_on_the_live_model(client, model):
    explain = pytest.importorskip("glassgpt.explain")
    topics = client.get("/api/explain").json()
    assert topics == [{"name": name, "title": title} for name, title in explain.list_topics()]
    missing = client.get("/api/explain/no-such-topic")
    assert missing.status_code == 404 and "unknown topic 'no-such-topic'; topics: " in missing.json()["error"]
    name = topics[0]["name"]
    body = client.get(f"/api/explain/{name}").json()
    assert body["topic"] == name and body["steps"]


# ---------------------------------------------------------------- glassgpt site

def test_site_writes_the_pages_pointed_at_a_remote_api(tmp_path, capsys, client):
    assert main(["site", str(tmp_path / "site"), "--api", "http://127.0.0.1:9000/"]) == 0
    site = tmp_path / "site"
    for page in ("index.html", "architecture.html", "inside.html"):
        assert (site / page).read_text() == client.get(f"/{page}").text  # as the server renders them
    assert (site / "static" / "style.css").exists() and (site / "static" / "generate.js").exists()
    assert 'window.GLASSGPT_API = "http://127.0.0.1:9000";' in (site / "static" / "config.js").read_text()
    assert "--cors-origin" in capsys.readouterr().out
    with pytest.raises(ValueError, match="must be an http"):
        write_site(tmp_path / "other", "127.0.0.1:9000")


# ---------------------------------------------------------------- fuzzing the OpenAPI schema

try:
    import schemathesis
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - schemathesis is in the dev extra
    schemathesis = None

if schemathesis is not None:
    torch.manual_seed(0)
    FUZZ_SCHEMA = schemathesis.openapi.from_asgi(
        "/openapi.json",
        create_app(GPT(TINY).eval(), get_tokenizer("gpt2"), max_tokens_cap=4, inspect_max_tokens=8))

    @FUZZ_SCHEMA.parametrize()
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    def test_fuzzed_requests_never_get_a_server_error(case):
        response = case.call()
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        if response.status_code in (422, 404):
            assert response.json()["error"]  # every refusal says why, in words
else:
    @pytest.mark.skip(reason="schemathesis is not installed (pip install -e '.[dev]')")
    def test_fuzzed_requests_never_get_a_server_error():
        pass
