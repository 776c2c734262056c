"""The page at / for fine-tuned models in real headless Chromium (see test_browser.py): a served
classifier gets the classification box (each text's label and a bar per class), an instruction-tuned
model the instruction box (the streamed response), a plain language model the generate box."""

import pytest
import torch
from conftest import ARTIFACTS, browser_tests

from glassgpt.classify import predict
from glassgpt.config import GPTConfig
from glassgpt.instruct import InstructionTemplate, respond
from glassgpt.model import GPT
from glassgpt.serve import create_app
from glassgpt.serve.background import BackgroundServer
from glassgpt.tokenizer import get_tokenizer

pytestmark = browser_tests

CLASSIFIER = GPTConfig(name="tiny-spam", vocab_size=50257, context_length=32, emb_dim=32, n_heads=2,
                       n_layers=2, tie_weights=False, n_classes=2, labels=("ham", "spam"))
LANGUAGE = GPTConfig(name="tiny-instruct", vocab_size=50257, context_length=96, emb_dim=32, n_heads=2,
                     n_layers=2)
TEXTS = ["Hi, are we still on for lunch?", "WINNER!! Claim your prize now", "ok"]


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(4)  # random weights that happen to call the first text ham and the second spam
    return GPT(CLASSIFIER).eval()


def test_a_served_classifier_gets_the_classification_box_with_labels_and_bars(page, classifier, tokenizer):
    expected = predict(classifier, tokenizer, TEXTS)
    assert {row["label"] for row in expected} == {"ham", "spam"}  # both labels are shown, not one by chance
    with BackgroundServer(create_app(classifier, tokenizer, max_classify_texts=10)) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task='classify']")
        assert page.is_hidden("#generate-box") and page.is_hidden("#instruct-box")
        assert page.title() == "glassgpt · classify"
        assert page.inner_text("#class-list") == "ham, spam" and page.inner_text("#max-texts") == "10"
        assert page.inner_text(".top nav a[href='./']") == "Classify"
        page.fill("#texts", "\n".join(TEXTS) + "\n\n")  # blank lines are not texts
        page.click("#classify-send")
        page.wait_for_selector(".prediction")
        shown = page.query_selector_all(".prediction")
        assert len(shown) == len(TEXTS)
        for card, row in zip(shown, expected, strict=True):
            assert card.query_selector(".label").inner_text() == row["label"]
            assert row["text"] in card.query_selector(".said").inner_text()
            for name, probability in row["probabilities"].items():
                bar = card.query_selector(f".bar[data-class='{name}']")
                shown_percent = bar.query_selector(".pct").inner_text()
                assert float(shown_percent.rstrip("%")) == pytest.approx(100 * probability, abs=0.051)
        page.screenshot(path=str(ARTIFACTS / "classify.png"), full_page=True)
        assert page.errors == []  # (the 422 below is logged by the browser as a failed resource)

        page.fill("#texts", "  \n ")
        page.click("#classify-send")
        page.wait_for_selector("#classify-error:has-text('Type a text first')")
        page.fill("#texts", "\n".join(["text"] * 11))  # one more than the server takes: its words
        page.click("#classify-send")
        error = page.wait_for_selector("#classify-error:has-text('texts')").inner_text()
        assert error == "texts: List should have at most 10 items after validation, not 11"


def test_an_instruction_tuned_model_gets_the_instruction_box(page, tokenizer):
    torch.manual_seed(7)
    model = GPT(LANGUAGE).eval()
    template = InstructionTemplate()
    with BackgroundServer(create_app(model, tokenizer, template=template, max_tokens_cap=20)) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task='instruct']")
        assert page.is_hidden("#generate-box") and page.is_hidden("#classify-box")
        assert page.inner_text("#template-name") == "alpaca"
        assert page.get_attribute("#instruct-max-tokens", "max") == "20"
        page.fill("#instruction", "Name a colour.")
        page.fill("#instruction-input", "")
        page.eval_on_selector("#instruct-max-tokens",
                              "el => { el.value = 12; el.dispatchEvent(new Event('input')); }")
        page.click("#instruct-send")
        timing = page.wait_for_selector("#instruct-timing:has-text('Answered in')").inner_text()
        assert "12 tokens" in timing or "end-of-text" in timing
        expected = respond(model, tokenizer, template, "Name a colour.", max_new_tokens=12)
        assert page.text_content("#response") == expected
        assert page.text_content("#instruct-prompt") == template.format_prompt("Name a colour.")
        page.screenshot(path=str(ARTIFACTS / "instruct.png"), full_page=True)
        assert page.errors == []


def test_a_plain_language_model_keeps_the_generate_box(page, tokenizer):
    torch.manual_seed(0)
    with BackgroundServer(create_app(GPT(LANGUAGE).eval(), tokenizer)) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task='generate']")
        assert page.is_visible("#generate-box") and page.is_hidden("#classify-box")
        assert page.is_hidden("#instruct-box") and page.title() == "glassgpt · generate"
        assert page.errors == []
