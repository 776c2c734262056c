"""The /learn page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright), against a
real uvicorn on loopback: every topic of the walk-through renders from the live API. Screenshots go
to test-artifacts/ (as in test_browser.py). The tutorial: the book "Build a Large Language Model
(From Scratch)" (see the README)."""

import re

import httpx
import pytest
from conftest import ARTIFACTS, browser_tests

from glassgpt import GPT, get_preset
from glassgpt.serve import create_app
from glassgpt.serve.background import BackgroundServer
from glassgpt.tokenizer import CharTokenizer

pytestmark = browser_tests


@pytest.fixture(scope="module")
def server():
    """The 2,453-parameter TinyGPT with its character tokenizer: the model-wide topics run on it."""
    model = GPT(get_preset("tinygpt")).eval()
    with BackgroundServer(create_app(model, CharTokenizer.from_text("hello hello"))) as server:
        yield server.url


def test_every_topic_renders_its_steps(server, page):
    topics = httpx.get(f"{server}/api/explain").json()
    assert [t["name"] for t in topics][:3] == ["tokenization", "attention", "scaling"]
    page.goto(f"{server}/learn")
    page.wait_for_selector("#topics a")
    assert page.locator("#topics a").count() == len(topics)
    for topic in topics:
        page.click(f"#topics a[data-topic='{topic['name']}']")
        page.wait_for_selector(f"#steps[data-topic='{topic['name']}']:not([aria-busy])", timeout=20_000)
        expected = httpx.get(f"{server}/api/explain/{topic['name']}").json()["steps"]
        headings = page.locator("#steps article h3").all_inner_texts()
        numbers, titles = zip(*(h.split(".", 1) for h in headings), strict=True)
        assert list(numbers) == [str(i) for i in range(1, len(expected) + 1)]
        assert [t.strip() for t in titles] == [s["title"] for s in expected]
        assert page.locator("#topic-title").inner_text() == topic["title"]
        assert page.locator("#topics a[aria-current='true']").inner_text() == topic["name"]
        assert page.locator("#error").inner_text() == ""
    page.screenshot(path=str(ARTIFACTS / "learn-sampling.png"), full_page=True)
    assert page.errors == []


def test_attention_shows_the_tutorial_numbers_as_a_heatmap(server, page):
    page.goto(f"{server}/learn#attention")
    page.wait_for_selector("#steps[data-topic='attention']:not([aria-busy])")
    heatmap_cells = page.locator("#steps table.heatmap td.num")
    assert heatmap_cells.count() >= 36
    text = page.locator("#steps").inner_text()
    for number in ("0.2379", "0.4419", "0.6515", "0.5683", "-0.5337", "-0.1051"):
        assert number in text
    # Shaded by value: the largest weight in a row is darker than the smallest.
    shades = page.eval_on_selector_all(
        "#steps table.heatmap td.num", "cells => cells.map(c => c.style.background)")
    assert len(set(shades)) > 5


def test_gelu_is_drawn_as_a_plot(server, page):
    page.goto(f"{server}/learn#gelu")
    page.wait_for_selector("#steps[data-topic='gelu']:not([aria-busy])")
    assert page.locator("#steps svg.plot polyline").count() == 2
    assert "GELU" in page.locator("#steps svg.plot").inner_html()
    page.screenshot(path=str(ARTIFACTS / "learn-gelu.png"), full_page=True)


def test_tables_show_numbers_as_the_terminal_does(server, page):
    """Every cell of every data table reads as `glassgpt explain` prints it: whole numbers as counts
    (the whole GPT's vocabulary is "5", never "5.0000"), other numbers to the step's digits."""
    from glassgpt.explain import format_value

    for topic in httpx.get(f"{server}/api/explain").json():
        name = topic["name"]
        page.goto(f"{server}/learn#{name}")
        page.wait_for_selector(f"#steps[data-topic='{name}']:not([aria-busy])", timeout=20_000)
        steps = httpx.get(f"{server}/api/explain/{name}").json()["steps"]
        shown = page.eval_on_selector_all(
            "#steps article", "articles => articles.map(a => [...a.querySelectorAll('table.data tr')]"
            ".slice(1).map(r => [...r.querySelectorAll('td')].map(c => c.textContent)))")
        for step, rows in zip(steps, shown, strict=True):
            digits = step.get("digits", 4)
            expected = [[format_value(v, digits) for v in row] for row in step.get("table", [])]
            assert rows == expected, (name, step["title"])
    assert page.errors == []


def test_blocks_are_numbered_from_0_on_learn_and_inside_alike(server, page):
    """One convention, the code's (`model.blocks[0]`, `--block 0`, /api/inspect's layers): from 0."""
    page.goto(f"{server}/learn#gpt")
    page.wait_for_selector("#steps[data-topic='gpt']:not([aria-busy])")
    stages = page.eval_on_selector_all("#steps table.data td.label", "cells => cells.map(c => c.textContent)")
    assert [s for s in stages if re.fullmatch(r"block \d+", s)] == ["block 0"]  # TinyGPT has one block
    page.goto(f"{server}/inside")
    page.fill("#text", "hell")  # TinyGPT reads 4 characters at most
    page.click("#look")
    page.wait_for_selector("#layer option", state="attached")
    assert page.eval_on_selector_all("#layer option", "o => o.map(x => x.textContent)") == ["block 0"]
    heads = page.eval_on_selector_all("#head option", "o => o.map(x => x.textContent)")
    assert heads == ["head 0", "head 1", "mean of all heads"]  # as `glassgpt inspect --view heads` names them
    # (page.errors holds the 422 of the page's own first text, too long for TinyGPT's 4 characters.)
