"""The server for fine-tuned models (glassgpt.serve): POST /classify on a classifier, POST /instruct
and /instruct/stream on an instruction-tuned checkpoint, GET /api/model's task, and the clear 409
each route answers when the served model does not do what it asks. Tiny random models, in process."""


import pytest
import torch
from conftest import sse_events
from fastapi.testclient import TestClient

from glassgpt.classify import predict
from glassgpt.config import GPTConfig
from glassgpt.instruct import InstructionTemplate, respond
from glassgpt.model import GPT
from glassgpt.serve import create_app
from glassgpt.tokenizer import get_tokenizer
from glassgpt.weights import save_model

MAX_LENGTH = 8  # the classifier's training length: longer texts keep their first 8 tokens
CLASSIFIER = GPTConfig(name="tiny-spam", vocab_size=50257, context_length=32, emb_dim=32, n_heads=2,
                       n_layers=2, tie_weights=False, n_classes=2, labels=("ham", "spam"))
# Context for the Alpaca template's ~40 tokens plus a response; the head's bias lets a test make
# end-of-text the greedy choice at a chosen step.
LANGUAGE = GPTConfig(name="tiny-instruct", vocab_size=50257, context_length=96, emb_dim=32, n_heads=2,
                     n_layers=2, head_bias=True)
TEXTS = ["Hi, are we still on for lunch?", "WINNER!! You have been selected for a prize of 1000 pounds, call",
         "ok", "Sorry, I'll call later"]


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizer):
    """(model, its checkpoint directory), saved as `glassgpt finetune classify` saves one."""
    torch.manual_seed(1)
    model = GPT(CLASSIFIER).eval()
    directory = tmp_path_factory.mktemp("classifier")
    run = {"task": "classify", "classes": ["ham", "spam"], "max_length": MAX_LENGTH}
    save_model(model, directory, tokenizer, extra={"finetune": run})
    return model, directory


@pytest.fixture(scope="module")
def classify_client(classifier):
    with TestClient(create_app(str(classifier[1]), max_classify_texts=5)) as client:
        yield client


@pytest.fixture(scope="module")
def language_model():
    torch.manual_seed(2)
    return GPT(LANGUAGE).eval()


@pytest.fixture(scope="module")
def lm_client(language_model, tokenizer):
    with TestClient(create_app(language_model, tokenizer, max_tokens_cap=40)) as client:
        yield client


# ---------------------------------------------------------------- POST /classify

def test_classify_answers_exactly_what_predict_gives_at_the_trained_length(classify_client, classifier,
                                                                          tokenizer):
    model, _ = classifier
    body = classify_client.post("/classify", json={"texts": TEXTS}).json()
    # What `glassgpt classify --json` prints: predict at the length the classifier was trained with.
    assert body == predict(model, tokenizer, TEXTS, max_length=MAX_LENGTH)
    assert [row["text"] for row in body] == TEXTS
    # Independently: each text alone, cut to the trained length, read at its last token.
    for row, text in zip(body, TEXTS, strict=True):
        ids = tokenizer.encode(text)[:MAX_LENGTH]
        with torch.no_grad():
            expected = torch.softmax(model(torch.tensor([ids]))[0, -1].double(), dim=-1).tolist()
        assert list(row["probabilities"]) == ["ham", "spam"]
        assert list(row["probabilities"].values()) == pytest.approx(expected, abs=1e-6)
        assert row["label"] == ["ham", "spam"][max(range(2), key=expected.__getitem__)]
    # The long text was cut: its answer is that of its first 8 tokens, not of the whole text.
    assert len(tokenizer.encode(TEXTS[1])) > MAX_LENGTH
    assert body[1] != predict(model, tokenizer, TEXTS[1:2])[0]


def test_one_text_is_answered_as_a_list_of_one(classify_client, classifier, tokenizer):
    body = classify_client.post("/classify", json={"text": "ok"}).json()
    assert body == predict(classifier[0], tokenizer, ["ok"], max_length=MAX_LENGTH)
    assert len(body) == 1


ONE_OF = 'give "texts" (a list of texts) or "text" (one text), not both or neither'


@pytest.mark.parametrize("request_body, message", [
    ({}, ONE_OF),
    ({"texts": ["a"], "text": "b"}, ONE_OF),
    ({"texts": []}, "texts: List should have at least 1 item after validation, not 0"),
    ({"texts": ["a"] * 6}, "texts: List should have at most 5 items after validation, not 6"),
    ({"texts": ["fine", ""]}, "texts.1 must not be empty"),
    ({"text": ""}, "text must not be empty"),
    ({"text": "a" * 20_001}, "text: String should have at most 20000 characters"),
    ({"texts": "one text"}, "texts: Input should be a valid list"),
    ({"texts": ["a"], "labels": ["x"]}, "unknown field 'labels'"),
])
def test_classify_refuses_bad_requests_in_words(classify_client, request_body, message):
    response = classify_client.post("/classify", json=request_body)
    assert response.status_code == 422
    assert response.json()["error"] == message


def test_a_classifier_refuses_what_only_a_language_model_does(classify_client):
    """/generate, its stream, /instruct, /api/inspect and the walk-through: 409, naming /classify."""
    message = ("the served model is a classifier (classes: ham, spam): it scores texts and has no next "
               "tokens to generate or show; use POST /classify")
    for path, body in (("/generate", {"prompt": "Hello"}), ("/generate/stream", {"prompt": "Hello"}),
                       ("/instruct", {"instruction": "Say hi"}),
                       ("/instruct/stream", {"instruction": "Say hi"}), ("/api/inspect", {"text": "Hello"})):
        response = classify_client.post(path, json=body)
        assert response.status_code == 409, path
        assert response.json() == {"error": message}
    topic = classify_client.get("/api/explain").json()[0]["name"]
    assert classify_client.get(f"/api/explain/{topic}").json() == {"error": message}


def test_model_endpoint_says_it_is_a_classifier_and_its_bounds(classify_client, classifier):
    info = classify_client.get("/api/model").json()
    assert (info["task"], info["classes"], info["template"]) == ("classify", ["ham", "spam"], None)
    assert info["parameters"] == classifier[0].num_parameters()
    assert info["config"]["n_classes"] == 2 and info["config"]["labels"] == ["ham", "spam"]
    assert info["limits"]["max_texts"] == 5 and info["limits"]["max_text_chars"] == 20_000


def test_a_language_model_refuses_classify_naming_its_routes(lm_client, language_model, tokenizer):
    response = lm_client.post("/classify", json={"texts": ["hello"]})
    assert response.status_code == 409
    assert response.json()["error"] == "the served model is not a classifier: it is a language model; " \
                                       "use POST /generate"
    info = lm_client.get("/api/model").json()
    assert (info["task"], info["classes"], info["template"]) == ("generate", None, None)
    assert "max_texts" not in info["limits"]
    refused = lm_client.post("/instruct", json={"instruction": "Say hi"})
    assert refused.status_code == 409 and "not instruction-tuned" in refused.json()["error"]


def test_a_lazy_classifier_is_loaded_before_its_kind_is_known(classifier, tokenizer):
    with TestClient(create_app(str(classifier[1]), lazy=True)) as client:
        response = client.post("/generate", json={"prompt": "Hello"})
        assert response.status_code == 409 and "is a classifier" in response.json()["error"]
        assert client.post("/classify", json={"text": "ok"}).json() == predict(
            classifier[0], tokenizer, ["ok"], max_length=MAX_LENGTH)


def test_an_int8_classifier_answers_close_to_the_float_one(classifier, tokenizer):
    with TestClient(create_app(str(classifier[1]), dtype="int8")) as client:
        body = client.post("/classify", json={"texts": TEXTS}).json()
    expected = predict(classifier[0], tokenizer, TEXTS, max_length=MAX_LENGTH)
    for got, want in zip(body, expected, strict=True):
        assert got["probabilities"]["spam"] == pytest.approx(want["probabilities"]["spam"], abs=0.02)


# ---------------------------------------------------------------- POST /instruct

INSTRUCTION, INPUT = "Rewrite the sentence using a simile.", "The car is very fast."


def make_eos_the_greedy_choice_at(model: GPT, prompt: list[int], eos_id: int, steps: int = 20) -> int:
    """Raise the head's bias for end-of-text so that greedy decoding of `prompt` picks it as new token
    number k (0-based, k >= 2) and no earlier; return k.

    Only end-of-text's logit moves, so the tokens before it stay the ones the model picked anyway:
    the bias sits between the smallest lead of the winner over end-of-text before step k and that
    lead at step k.
    """
    ids, leads = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            leads.append((logits.max() - logits[eos_id]).item())
            ids.append(int(logits.argmax()))
    step = next(k for k in range(2, steps) if leads[k] < min(leads[:k]) - 1e-3)
    with torch.no_grad():
        model.out_head.bias[eos_id] += (leads[step] + min(leads[:step])) / 2
    return step


@pytest.fixture(scope="module")
def instruct_model(tmp_path_factory, tokenizer):
    """(model, template, checkpoint directory, k): a checkpoint saved with a non-default template
    (so a route using the default one would be caught), whose greedy response to INSTRUCTION +
    INPUT ends with end-of-text as its token k."""
    torch.manual_seed(7)  # a model whose greedy response is not one token repeated (see the helper)
    model = GPT(LANGUAGE).eval()
    template = InstructionTemplate(response_header="### Answer:", name="custom")
    prompt = tokenizer.encode(template.format_prompt(INSTRUCTION, INPUT))
    step = make_eos_the_greedy_choice_at(model, prompt, tokenizer.eos_id)
    directory = tmp_path_factory.mktemp("instruct")
    save_model(model, directory, tokenizer, extra={"instruction_template": template.to_dict()})
    return model, template, directory, step


@pytest.fixture(scope="module")
def instruct_client(instruct_model):
    with TestClient(create_app(str(instruct_model[2]), max_tokens_cap=40)) as client:
        yield client


def test_instruct_answers_the_response_to_the_saved_templates_prompt(instruct_client, instruct_model,
                                                                     tokenizer):
    model, template, _, step = instruct_model
    body = instruct_client.post("/instruct", json={"instruction": INSTRUCTION, "input": INPUT,
                                                   "max_tokens": 30}).json()
    assert body["prompt"] == template.format_prompt(INSTRUCTION, INPUT)
    assert "### Answer:\n" in body["prompt"] and "### Response:" not in body["prompt"]
    assert body["response"] == respond(model, tokenizer, template, INSTRUCTION, INPUT, max_new_tokens=30)
    assert body["response"] == body["completion"].strip() and body["response"]
    # It stopped at end-of-text (token `step`, counted), long before max_tokens.
    assert body["completion_tokens"] == step + 1 < 30
    assert body["prompt_tokens"] == len(tokenizer.encode(body["prompt"]))
    assert (body["instruction"], body["input"], body["template"]) == (INSTRUCTION, INPUT, "custom")


def test_instruct_without_input_and_with_sampling_matches_respond(instruct_client, instruct_model, tokenizer):
    model, template, _, _ = instruct_model
    body = instruct_client.post("/instruct", json={"instruction": "Name a colour.", "max_tokens": 12}).json()
    assert body["prompt"] == template.format_prompt("Name a colour.") and "### Input:" not in body["prompt"]
    assert body["response"] == respond(model, tokenizer, template, "Name a colour.", max_new_tokens=12)
    sampled = {"instruction": "Name a colour.", "max_tokens": 12, "temperature": 1.5, "top_k": 50, "seed": 7}
    body = instruct_client.post("/instruct", json=sampled).json()
    assert body["response"] == respond(model, tokenizer, template, "Name a colour.", max_new_tokens=12,
                                       temperature=1.5, top_k=50, seed=7)


def test_instruct_stream_pieces_join_to_the_plain_answer(instruct_client):
    request = {"instruction": INSTRUCTION, "input": INPUT, "max_tokens": 30}
    plain = instruct_client.post("/instruct", json=request).json()
    response = instruct_client.post("/instruct/stream", json=request)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"piece"}
    assert "".join(data["text"] for _, data in events[:-1]) == plain["completion"]
    done = events[-1][1]
    assert done["response"] == plain["response"] and done["prompt"] == plain["prompt"]


def test_model_endpoint_says_it_is_instruction_tuned(instruct_client):
    info = instruct_client.get("/api/model").json()
    assert (info["task"], info["classes"], info["template"]) == ("instruct", None, "custom")


def test_generate_on_an_instruction_tuned_model_continues_the_raw_prompt(instruct_client, instruct_model,
                                                                         tokenizer):
    from glassgpt.generate import generate_text

    body = instruct_client.post("/generate", json={"prompt": "Every effort", "max_tokens": 5}).json()
    assert body["completion"] == generate_text(instruct_model[0], tokenizer, "Every effort", 5)


def test_instruct_refuses_what_it_cannot_answer_in_words(instruct_client):
    blank = instruct_client.post("/instruct", json={"instruction": "   "})
    assert blank.status_code == 422
    assert blank.json()["error"] == "instruction: the instruction must not be blank"
    assert instruct_client.post("/instruct", json={"input": "x"}).json()["error"] == "instruction is required"
    assert instruct_client.post("/instruct", json={"instruction": "a", "prompt": "b"}).json()["error"] == \
        "unknown field 'prompt'"
    # 96 positions; with 40 new tokens at most 56 prompt tokens fit: refused, not cut (cutting would
    # drop the template's first lines).
    long = instruct_client.post("/instruct", json={"instruction": "word " * 40, "max_tokens": 40})
    assert long.status_code == 422
    assert long.json()["error"].startswith("the prompt (the instruction in the custom template) is ")
    assert "with max_tokens 40 at most 56 fit the model's context of 96" in long.json()["error"]
    # Issue 15: the stream refuses it as /instruct does (422), before the stream starts; it used to
    # answer 200 and an error event.
    stream = instruct_client.post("/instruct/stream", json={"instruction": "word " * 40, "max_tokens": 40})
    assert stream.status_code == 422 and stream.json() == long.json()


def test_a_gpt_object_can_be_served_with_a_template(language_model, tokenizer):
    template = InstructionTemplate()
    with TestClient(create_app(language_model, tokenizer, template=template)) as client:
        assert client.get("/api/model").json()["template"] == "alpaca"
        body = client.post("/instruct", json={"instruction": "Say hi", "max_tokens": 6}).json()
        assert body["response"] == respond(language_model, tokenizer, template, "Say hi", max_new_tokens=6)


def test_a_broken_saved_template_fails_at_start_up(tmp_path, language_model, tokenizer):
    save_model(language_model, tmp_path / "bad", tokenizer, extra={"instruction_template": {"header": "x"}})
    with pytest.raises(ValueError, match="unknown instruction template fields: header"):
        create_app(str(tmp_path / "bad"))


# ---------------------------------------------------------------- fuzzing the new routes' schemas

try:
    import schemathesis
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - schemathesis is in the dev extra
    schemathesis = None

if schemathesis is not None:
    torch.manual_seed(0)
    _CLASSIFY_SCHEMA = schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(GPT(CLASSIFIER).eval(), get_tokenizer("gpt2"), max_classify_texts=4,
                                    max_prompt_chars=200)).include(path="/classify")
    _INSTRUCT_SCHEMA = schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(GPT(LANGUAGE).eval(), get_tokenizer("gpt2"), max_tokens_cap=4,
                                    max_prompt_chars=200, template=InstructionTemplate()),
    ).include(path_regex="^/instruct")

    def _check(case):
        response = case.call()
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        if response.status_code in (409, 422):
            assert response.json()["error"]  # every refusal says why, in words

    @_CLASSIFY_SCHEMA.parametrize()
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    def test_fuzzed_classify_requests_never_get_a_server_error(case):
        _check(case)

    @_INSTRUCT_SCHEMA.parametrize()
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    def test_fuzzed_instruct_requests_never_get_a_server_error(case):
        _check(case)
