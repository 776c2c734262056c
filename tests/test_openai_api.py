"""The OpenAI-compatible API (glassgpt.serve.openai_api) through a real uvicorn on loopback, driven by
the official `openai` client: completions, chat, streams, n > 1, stop strings, echo + logprobs
scoring a text as `glassgpt eval` does, log-probabilities against transformers, errors as the
client's exception types. Tiny random GPT-2-vocabulary model."""

import copy
import json
import math
import time

import httpx
import openai
import pytest
import torch

from glassgpt.config import GPTConfig
from glassgpt.evaluate import evaluate_text
from glassgpt.generate import generate_text, iter_tokens
from glassgpt.instruct import InstructionTemplate
from glassgpt.model import GPT
from glassgpt.serve import create_app
from glassgpt.serve.background import BackgroundServer

TINY = GPTConfig(name="tiny-openai", vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2)
PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(TINY).eval()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with BackgroundServer(create_app(model, tokenizer, max_tokens_cap=32)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy_ids(model, tokenizer, prompt, n):
    return list(iter_tokens(model, tokenizer.encode(prompt), n))


# ---------------------------------------------------------------- the observe hook

def test_iter_tokens_observe_sees_the_logits_each_token_was_picked_from(model, tokenizer):
    seen = []
    ids = tokenizer.encode(PROMPT)
    tokens = list(iter_tokens(model, ids, 5, observe=lambda logits, next_ids: seen.append(
        (logits.clone(), next_ids.clone()))))
    assert [int(n[0]) for _, n in seen] == tokens
    with torch.no_grad():
        full = model(torch.tensor([ids + tokens]))[0]
    for step, (logits, _) in enumerate(seen):
        assert logits.shape == (1, TINY.vocab_size)
        torch.testing.assert_close(logits[0], full[len(ids) - 1 + step], atol=1e-4, rtol=1e-4)
        assert int(logits[0].argmax()) == tokens[step]  # greedy picks the top of what it saw


# ---------------------------------------------------------------- /v1/models

def test_models_lists_the_served_model(client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["tiny-openai"]
    assert listed.data[0].owned_by == "glassgpt" and listed.data[0].object == "model"
    assert client.models.retrieve("tiny-openai").id == "tiny-openai"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


# ---------------------------------------------------------------- /v1/completions

def test_completion_is_the_greedy_continuation_with_usage(client, model, tokenizer):
    answer = client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=7, temperature=0)
    assert answer.object == "text_completion" and answer.model == "tiny-openai"
    assert answer.choices[0].text == generate_text(model, tokenizer, PROMPT, 7)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == 4 and answer.usage.completion_tokens == 7
    assert answer.usage.total_tokens == 11


def test_completion_logprobs_are_the_models_own_with_the_greedy_token_on_top(client, model, tokenizer):
    answer = client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=6, temperature=0,
                                       logprobs=3)
    lp = answer.choices[0].logprobs
    ids = tokenizer.encode(PROMPT)
    generated = greedy_ids(model, tokenizer, PROMPT, 6)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids + generated]))[0].float(), dim=-1)
    assert lp.tokens == [tokenizer.decode([i]) for i in generated]
    for step, token_id in enumerate(generated):
        row = expected[len(ids) - 1 + step]
        assert lp.token_logprobs[step] == pytest.approx(float(row[token_id]), abs=1e-4)
        assert len(lp.top_logprobs[step]) == 3
        best = max(lp.top_logprobs[step].items(), key=lambda kv: kv[1])
        assert best[0] == lp.tokens[step] and best[1] == pytest.approx(lp.token_logprobs[step], abs=1e-6)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_log_probabilities_equal_transformers_on_the_same_weights(client, model, tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from glassgpt.weights import export_hf

    hf = transformers.GPT2LMHeadModel.from_pretrained(export_hf(model, tmp_path / "hf")).eval()
    text = "The quick brown fox jumps over the lazy dog."
    answer = client.completions.create(model="tiny-openai", prompt=text, max_tokens=0, echo=True,
                                       logprobs=2)
    ids = tokenizer.encode(text)
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    got = answer.choices[0].logprobs.token_logprobs
    assert got[0] is None
    for position in range(1, len(ids)):
        assert got[position] == pytest.approx(float(reference[position - 1, ids[position]]), abs=1e-4)


def test_echo_with_max_tokens_0_scores_a_text_as_glassgpt_eval(client, model, tokenizer):
    text = "I had always thought Jack Gisburn rather a cheap genius, though a good fellow enough."
    answer = client.completions.create(model="tiny-openai", prompt=text, max_tokens=0, echo=True, logprobs=0)
    choice = answer.choices[0]
    assert choice.text == text and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [tokenizer.decode([i]) for i in tokenizer.encode(text)]
    assert "".join(choice.logprobs.tokens) == text
    scored = sum(choice.logprobs.token_logprobs[1:])
    evaluation = evaluate_text(model, tokenizer, text)
    assert scored == pytest.approx(-evaluation.loss * evaluation.tokens, abs=1e-4)
    assert answer.usage.completion_tokens == 0


def test_echo_with_generation_puts_the_prompt_in_front(client, model, tokenizer):
    answer = client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=3, temperature=0,
                                       echo=True, logprobs=1)
    choice = answer.choices[0]
    assert choice.text == PROMPT + generate_text(model, tokenizer, PROMPT, 3)
    assert len(choice.logprobs.tokens) == 4 + 3 and choice.logprobs.token_logprobs[0] is None


def test_end_of_text_ends_a_choice_and_is_reported_among_its_tokens(model, tokenizer):
    """A model that always says <|endoftext|>: the text stops (finish "stop"), the token still appears
    in the logprobs (lm-eval slices echoed tokens by position) and in the usage."""
    ending = copy.deepcopy(model)
    with torch.no_grad():  # every position's final state is v, and the eos row of the head is 100 v
        v = torch.randn(TINY.emb_dim)
        ending.final_norm.scale.zero_()
        ending.final_norm.shift.copy_(v)
        ending.out_head.weight[tokenizer.eos_id] = 100 * v
    with BackgroundServer(create_app(ending, tokenizer)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=5, temperature=0,
                                           echo=True, logprobs=1)
        chunks = list(client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=5,
                                                temperature=0, logprobs=1, stream=True))
    choice = answer.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "stop"
    prompt_tokens = [tokenizer.decode([i]) for i in tokenizer.encode(PROMPT)]
    assert choice.logprobs.tokens == [*prompt_tokens, "<|endoftext|>"]
    assert choice.logprobs.token_logprobs[-1] == pytest.approx(0.0, abs=1e-4)
    assert answer.usage.completion_tokens == 1
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == ["<|endoftext|>"] and chunks[-1].choices[0].finish_reason == "stop"


def test_stop_string_ends_the_text_before_it(client, model, tokenizer):
    full = generate_text(model, tokenizer, PROMPT, 12)
    stop = full[5:8]
    assert stop.strip()
    answer = client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=12, temperature=0,
                                       stop=[stop])
    assert answer.choices[0].text == full[:full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_n_choices_and_a_list_of_prompts(client):
    answer = client.completions.create(model="tiny-openai", prompt=[PROMPT, "Hello there"], n=3,
                                       max_tokens=5, temperature=1.0, seed=7)
    assert [c.index for c in answer.choices] == list(range(6))
    texts = [c.text for c in answer.choices]
    assert len(set(texts[:3])) > 1  # the n samples of one prompt differ (seed + choice)
    again = client.completions.create(model="tiny-openai", prompt=[PROMPT, "Hello there"], n=3,
                                      max_tokens=5, temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == texts  # and the request is reproducible
    assert answer.usage.completion_tokens == 30


def test_a_prompt_filling_the_context_is_scored_and_continued_past_it(client, model, tokenizer):
    """lm-eval sends context-length prompts with echo and max_tokens 1: scored in one pass, then one
    token decoded past the context: the window moves half a context forward (engine.window_slide)
    and is recomputed once, rather than a whole window per token."""
    ids = (tokenizer.encode(PROMPT) * 20)[:TINY.context_length]
    answer = client.completions.create(model="tiny-openai", prompt=ids, max_tokens=2, temperature=0,
                                       echo=True, logprobs=1)
    lp = answer.choices[0].logprobs
    assert len(lp.tokens) == TINY.context_length + 2
    half = TINY.context_length // 2
    expected = list(iter_tokens(model, ids, 2, slide=half))
    assert lp.tokens[-2:] == [tokenizer.decode([i]) for i in expected]
    with torch.no_grad():
        window = torch.log_softmax(model(torch.tensor([ids[half:] + expected[:1]]))[0, -1], dim=-1)
    assert lp.token_logprobs[-1] == pytest.approx(float(window[expected[1]]), abs=1e-4)


def test_token_id_prompts_as_lm_eval_sends_them(client, model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    answer = client.completions.create(model="tiny-openai", prompt=[ids], max_tokens=4, temperature=0)
    assert answer.choices[0].text == generate_text(model, tokenizer, PROMPT, 4)


def test_streamed_completion_joins_to_the_whole_answer(client, model, tokenizer):
    chunks = list(client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=9,
                                            temperature=0, stream=True, logprobs=1))
    assert "".join(c.choices[0].text for c in chunks) == generate_text(model, tokenizer, PROMPT, 9)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    whole = client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=9, temperature=0,
                                      logprobs=1)
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-6)


def test_streams_end_with_the_usage_when_asked(client, tokenizer):
    chunks = list(client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 4 and all(c.usage is None for c in chunks[:-1])
    chat = list(client.chat.completions.create(model="tiny-openai", max_tokens=3, temperature=0, stream=True,
                                               messages=[{"role": "user", "content": "Hi"}],
                                               stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.total_tokens == chat[-1].usage.prompt_tokens + 3


def test_raw_stream_is_server_sent_data_lines_ending_in_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "model": "tiny-openai", "prompt": PROMPT, "max_tokens": 3, "stream": True}) as response:
        blocks = [b for b in response.read().decode().split("\n\n") if b]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(b.startswith("data: ") for b in blocks) and blocks[-1] == "data: [DONE]"


# ---------------------------------------------------------------- /v1/chat/completions

def test_chat_on_a_plain_model_continues_the_documented_rendering(client, model, tokenizer):
    answer = client.chat.completions.create(
        model="tiny-openai", temperature=0, max_tokens=6, logprobs=True, top_logprobs=2,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert answer.object == "chat.completion"
    rendered = "System: Be brief.\nUser: Hi\nAssistant:"
    expected = generate_text(model, tokenizer, rendered, 6, stop=["\nUser:"])
    message = answer.choices[0].message
    assert message.role == "assistant" and message.content == expected
    assert answer.usage.prompt_tokens == len(tokenizer.encode(rendered))
    content = answer.choices[0].logprobs.content
    assert "".join(t.token for t in content).startswith(expected)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    assert all(math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-6) for t in content)


def test_chat_stream_and_n(client):
    kwargs = dict(model="tiny-openai", messages=[{"role": "user", "content": "Tell me a story"}],
                  max_completion_tokens=5, temperature=0.9, seed=3, n=2)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[index].message.content
        assert mine[-1].finish_reason == whole.choices[index].finish_reason


def test_chat_on_an_instruction_model_uses_its_template(model, tokenizer):
    template = InstructionTemplate()
    with BackgroundServer(create_app(model, tokenizer, template=template)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="tiny-openai", temperature=0, max_tokens=5,
            messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi"}])
    prompt = template.format_prompt("Say hi", "System: Be kind.")
    assert answer.choices[0].message.content == generate_text(model, tokenizer, prompt, 5)


# ---------------------------------------------------------------- errors

def test_errors_are_the_clients_exception_types_in_openais_shape(client, server):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi")
    assert missing.value.code == "model_not_found"
    for bad in (dict(max_tokens=10_000), dict(temperature=3.0), dict(logprobs=9), dict(n=0),
                dict(max_tokens=1, prompt="word " * 80)):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(**{"model": "tiny-openai", "prompt": "Hi", **bad})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-openai", messages=[])
    with pytest.raises(openai.BadRequestError, match="context"):  # refused before the stream starts
        client.completions.create(model="tiny-openai", prompt="word " * 80, stream=True)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny-openai", stream=True,
                                       messages=[{"role": "user", "content": "word " * 80}])
    body = httpx.post(server.url + "/v1/completions", content=b"{not json").json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"


def test_a_full_gate_is_a_rate_limit_with_retry_after(model, tokenizer):
    app = create_app(model, tokenizer, max_running=1, max_waiting=0)
    with BackgroundServer(app) as server:
        ticket = app.state.gate.admit()  # the one place, taken
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError) as busy:
                client.completions.create(model="tiny-openai", prompt="Hi", max_tokens=2)
            assert int(busy.value.response.headers["retry-after"]) >= 1
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="tiny-openai", stream=True,
                                               messages=[{"role": "user", "content": "Hi"}])
        finally:
            ticket.cancel()


# ---------------------------------------------------------------- GET /metrics

def scrape(url: str) -> dict[str, float]:
    """Every sample of a /metrics scrape: 'name{labels}' -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_metrics_move_with_requests(model, tokenizer):
    app = create_app(model, tokenizer, max_running=1, max_waiting=0)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        before = scrape(server.url)
        assert before["glassgpt_model_load_seconds{}"] >= 0
        assert before["glassgpt_gate_running{}"] == 0 and before["glassgpt_gate_waiting{}"] == 0
        client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=5, temperature=0)
        list(client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=4, temperature=0,
                                       stream=True))
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt=PROMPT)
        # The streamed request's worker gives its place back just after its last chunk: wait for it.
        deadline = time.monotonic() + 10
        while app.state.gate.admitted and time.monotonic() < deadline:
            time.sleep(0.01)
        ticket = app.state.gate.admit()
        try:
            held = scrape(server.url)
            assert held["glassgpt_gate_running{}"] == 1
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="tiny-openai", prompt=PROMPT, max_tokens=2)
        finally:
            ticket.cancel()
        after = scrape(server.url)
    ok = 'glassgpt_requests_total{method="POST",route="/v1/completions",status="200"}'
    assert after[ok] - before.get(ok, 0) == 2
    assert after['glassgpt_requests_total{method="POST",route="/v1/completions",status="404"}'] == 1
    assert after['glassgpt_refused_total{status="429"}'] == 1
    assert after["glassgpt_generated_tokens_total{}"] - before["glassgpt_generated_tokens_total{}"] == 9
    assert after["glassgpt_time_to_first_token_seconds_count{}"] == 2
    assert after["glassgpt_tokens_per_second_count{}"] == 2
    assert after["glassgpt_tokens_per_second_sum{}"] > 0
    latency = 'glassgpt_request_seconds_count{route="/v1/completions"}'
    assert after[latency] == 4
    assert after['glassgpt_requests_total{method="GET",route="/metrics",status="200"}'] >= 2


# ---------------------------------------------------------------- the shapes are the openai package's

def fields_are_known(body, model_type) -> None:
    """Every key of `body` is a field of the openai type (recursively for nested models), and the
    type validates it: the wire shape cannot drift from the SDK's."""
    import pydantic

    model_type.model_validate(body)
    unknown = set(body) - set(model_type.model_fields)
    assert not unknown, (model_type.__name__, unknown)
    for name, value in body.items():
        annotation = model_type.model_fields[name].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            inner = getattr(candidate, "__args__", ())
            for kind in [candidate, *inner]:
                if isinstance(kind, type) and issubclass(kind, pydantic.BaseModel):
                    items = value if isinstance(value, list) else [value]
                    for item in items:
                        if isinstance(item, dict):
                            fields_are_known(item, kind)


def test_responses_and_chunks_have_the_openai_types_fields(server):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    # Not echo: the first echoed token has no log-probability, null on OpenAI's wire (and vLLM's,
    # which lm-eval reads past), though the package's type says float.
    completion = httpx.post(server.url + "/v1/completions", json={
        "model": "tiny-openai", "prompt": PROMPT, "max_tokens": 3, "logprobs": 2}).json()
    fields_are_known(completion, Completion)
    chat = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "tiny-openai", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
        "logprobs": True, "top_logprobs": 2}).json()
    fields_are_known(chat, ChatCompletion)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "model": "tiny-openai", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "stream": True, "logprobs": True}) as response:
        blocks = [b[len("data: "):] for b in response.read().decode().split("\n\n") if b]
    for block in blocks[:-1]:
        fields_are_known(json.loads(block), ChatCompletionChunk)


def test_a_classifier_refuses_completions_with_a_400_naming_classify(tokenizer):
    torch.manual_seed(0)
    classifier = GPT(GPTConfig(name="tiny-cls", vocab_size=50257, context_length=32, emb_dim=32, n_heads=2,
                               n_layers=2, n_classes=2, tie_weights=False)).eval()
    with BackgroundServer(create_app(classifier, tokenizer)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="/classify"):
            client.completions.create(model="tiny-cls", prompt="Hi", max_tokens=2)
