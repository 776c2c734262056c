"""POST /api/inspect's "views" and POST /api/patch: the numbers of glassgpt.inspect_report, bounded,
with clear 422s. Tiny random GPT-2-vocabulary model, in process."""

import pytest
import torch
from fastapi.testclient import TestClient

from glassgpt import inspect as views_lib
from glassgpt import inspect_report
from glassgpt.serve import create_app
from glassgpt.serve.app import INSPECT_VIEWS

TEXT = "The painting was"


@pytest.fixture(scope="module")
def client(model, tokenizer):
    app = create_app(model, tokenizer, inspect_max_tokens=10, patch_max_tokens=6)
    with TestClient(app) as client:
        yield client


def test_no_views_is_todays_answer(client):
    plain = client.post("/api/inspect", json={"text": TEXT}).json()
    assert set(plain) == {"tokens", "next_tokens", "attention", "n_layers", "n_heads"}  # no "views"
    assert client.post("/api/inspect", json={"text": TEXT, "views": None}).json() == plain
    with_views = client.post("/api/inspect", json={"text": TEXT, "views": ["residual"]}).json()
    assert {k: v for k, v in with_views.items() if k != "views"} == plain


@pytest.mark.parametrize("view", INSPECT_VIEWS)
def test_each_view_is_the_librarys_report_of_the_same_text(client, model, tokenizer, view):
    body = client.post("/api/inspect", json={"text": TEXT, "views": [view]}).json()
    assert list(body["views"]) == [view]
    assert body["views"][view] == inspect_report.report(model, tokenizer, TEXT, view)


def test_the_logit_lens_last_row_is_the_models_own_prediction(client, model, tokenizer):
    """Independent of inspect_report: the last depth's top tokens are the model's log-softmax top 5."""
    body = client.post("/api/inspect", json={"text": TEXT, "views": ["logit-lens", "heads"]}).json()
    assert list(body["views"]) == ["logit-lens", "heads"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokenizer.encode(TEXT)]))[0].double(), dim=-1)
    last = body["views"]["logit-lens"]["top"][-1]
    for position, cells in enumerate(last):
        expected = logprobs[position].topk(5)
        assert [c["id"] for c in cells] == expected.indices.tolist()
        assert [c["logprob"] for c in cells] == pytest.approx(expected.values.tolist(), abs=1e-4)
    heads = body["views"]["heads"]
    assert torch.tensor(heads["logits"]).shape == (2, 2)  # layers x heads
    assert heads["target"]["id"] == int(logprobs[-1].argmax())


def test_views_are_bounded_and_checked(client):
    def error(body):
        response = client.post("/api/inspect", json=body)
        assert response.status_code == 422
        return response.json()["error"]

    assert error({"text": TEXT, "views": ["attention-rollout"]}) == (
        "views.0: Input should be 'logit-lens', 'heads', 'embeddings', 'neurons' or 'residual'")
    assert "patch" not in INSPECT_VIEWS
    assert error({"text": TEXT, "views": ["patch"]})  # two texts: POST /api/patch
    assert "once" in error({"text": TEXT, "views": ["heads", "heads"]})
    assert error({"text": TEXT, "views": []})
    assert error({"text": TEXT, "views": list(INSPECT_VIEWS) + ["residual"]})  # more than there are
    # the exact heads view's tighter cap (6 here), before any work; the others keep the text cap (10)
    exact = {"views": ["heads"], "heads_method": "exact"}
    assert client.post("/api/inspect", json={"text": " a" * 6, **exact}).status_code == 200
    assert error({"text": " a" * 7, **exact}).startswith(
        "text is 7 tokens; the heads view takes at most 6")
    assert error({"text": TEXT, "views": ["heads"], "heads_method": "guess"}).startswith("heads_method:")
    assert client.post("/api/inspect", json={"text": " a" * 10, "views": ["residual"]}).status_code == 200
    assert error({"text": " a" * 11, "views": ["residual"]}).startswith("text is 11 tokens")


def test_heads_past_the_exact_bound_are_estimated_and_say_so(client, model, tokenizer):
    """heads_method "auto" (the default): exact up to patch_max_tokens (6), attribution patching past
    it, up to the text cap (10); "attribution" asks for the estimate on any text."""
    short, long = " a b c", " the cat sat on the mat and"   # 3 and 7 tokens
    views = {"views": ["heads"]}
    within = client.post("/api/inspect", json={"text": short, **views}).json()["views"]["heads"]
    assert within["method"] == "exact"
    assert within == inspect_report.report(model, tokenizer, short, "heads", method="exact")
    past = client.post("/api/inspect", json={"text": long, **views}).json()["views"]["heads"]
    assert past["method"] == "attribution"
    ids = tokenizer.encode(long)
    torch.testing.assert_close(torch.tensor(past["logits"]),
                               views_lib.attribute_heads(model, ids, past["target"]["id"]), atol=1e-5, rtol=0)
    asked = client.post("/api/inspect", json={"text": short, **views, "heads_method": "attribution"}).json()
    assert asked["views"]["heads"]["method"] == "attribution"


# ---------------------------------------------------------------- POST /api/patch

def test_patch_is_the_librarys_grid(client, model, tokenizer):
    clean, corrupt = "The cat sat", "The dog sat"
    body = client.post("/api/patch", json={"clean": clean, "corrupt": corrupt, "target": " down"}).json()
    assert body == inspect_report.report(model, tokenizer, clean, "patch", corrupt=corrupt, target=" down")
    grid = torch.tensor(body["logits"])
    assert grid.shape == (2, 3)  # layers x positions
    # Independent check: the stream entering block 0 is the embeddings, so patching it at the one
    # token that differs (1) makes the clean run (clean logit), and elsewhere changes nothing.
    target = tokenizer.encode(" down")[0]
    with torch.no_grad():
        logit = {text: float(model(torch.tensor([tokenizer.encode(text)]))[0, -1, target])
                 for text in (clean, corrupt)}
    assert body["clean_logit"] == pytest.approx(logit[clean], abs=1e-4)
    assert body["corrupt_logit"] == pytest.approx(logit[corrupt], abs=1e-4)
    assert grid[0].tolist() == pytest.approx([logit[corrupt], logit[clean], logit[corrupt]], abs=1e-4)
    default = client.post("/api/patch", json={"clean": clean, "corrupt": corrupt}).json()
    expected = inspect_report.pick_target(model, tokenizer, tokenizer.encode(clean), None)
    assert default["target"]["id"] == expected


def test_patch_is_bounded_and_checked(client):
    def error(body):
        response = client.post("/api/patch", json=body)
        assert response.status_code == 422
        return response.json()["error"]

    assert error({"clean": "The cat sat", "corrupt": "The big dog sat"}) == (
        "the clean and corrupted texts must have equal token counts: 3 and 4")
    assert client.post("/api/patch", json={"clean": " a" * 6, "corrupt": " b" * 6}).status_code == 200
    assert error({"clean": " a" * 7, "corrupt": " b" * 7}).startswith(
        "the texts are 7 and 7 tokens; /api/patch takes at most 6")
    assert "one token" in error({"clean": "The cat", "corrupt": "The dog", "target": " table cloth"})
    assert error({"clean": "", "corrupt": "The dog"})
    assert "at most 120 characters" in error({"clean": "a" * 121, "corrupt": "b"})
    assert error({"clean": "a", "corrupt": "b", "layer": 1})  # unknown fields refused
