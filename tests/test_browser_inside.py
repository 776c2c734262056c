"""The inside page's tabs of views in real headless Chromium (see test_browser.py), against a real
uvicorn on loopback with the tiny random GPT-2-vocabulary model: each tab shows exactly the numbers
that POST /api/inspect's "views" and POST /api/patch return for the same input (fetched here with
httpx), the logit lens's last row is the model's own prediction, and /learn links into the views.
One page load covers every tab (a second one opens /learn). Screenshots go to test-artifacts/."""

import math

import httpx
import pytest
import torch
from conftest import ARTIFACTS, browser_tests

from glassgpt.serve import create_app
from glassgpt.serve.background import BackgroundServer

pytestmark = browser_tests

TEXT = "The painting was"


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with BackgroundServer(create_app(model, tokenizer)) as server:
        yield server.url


# What the page's JavaScript makes of a token and a number (common.js, inside_views.js).
def visible(text: str) -> str:
    return text.replace(" ", "·").replace("\n", "↵").replace("\t", "→")


def short(text: str, n: int = 10) -> str:
    shown = visible(text)
    return shown[:n - 1] + "…" if len(shown) > n else shown


def percent(p: float) -> str:  # glassgpt.percent: 12.3%, or two significant digits under 0.1%
    value = 100 * p
    assert value > 1e-4  # where JavaScript's toPrecision and Python's "g" write the same digits
    return (f"{value:.1f}" if value >= 0.1 else f"{value:.2g}") + "%"


def signed(value: float, digits: int) -> str:
    return ("+" if value >= 0 else "") + f"{value:.{digits}f}"


def open_tab(page, view: str) -> None:
    page.click(f"#tabs [data-view='{view}']")
    page.wait_for_selector(f"#panel-{view}[data-shown]:not([aria-busy])", timeout=30_000)
    assert page.get_attribute(f"#tabs [data-view='{view}']", "aria-selected") == "true"
    assert page.url.endswith(f"#{view}")


def views_of(server: str, text: str, view: str) -> dict:
    response = httpx.post(f"{server}/api/inspect", json={"text": text, "views": [view]}, timeout=60)
    response.raise_for_status()
    return response.json()["views"][view]


def shoot(page, view: str) -> None:
    page.locator(f"#panel-{view}").screenshot(path=str(ARTIFACTS / f"inside-{view}.png"))


def test_every_view_tab_shows_the_apis_numbers(server, page, model, tokenizer):
    page.goto(f"{server}/inside")
    page.wait_for_selector("canvas[data-drawn='0/0/3']")  # the attention tab is open first
    assert page.is_hidden("#panel-logit-lens") and page.is_visible("#panel-attention")

    # Logit lens: a depth x position grid of the top token and its probability; hover gives the top 5.
    open_tab(page, "logit-lens")
    lens = views_of(server, TEXT, "logit-lens")
    rows = page.locator("#lens-grid tr")
    assert rows.count() == 1 + len(lens["rows"]) == 1 + model.config.n_layers + 1
    assert rows.nth(0).locator("th").all_inner_texts()[1:] == [short(t["text"]) for t in lens["tokens"]]
    for row, name in enumerate(lens["rows"]):
        assert rows.nth(row + 1).locator("th").inner_text().startswith(name)
        for position, candidates in enumerate(lens["top"][row]):
            cell = page.locator(f"#lens-grid td[data-row='{row}'][data-position='{position}']")
            best = candidates[0]
            assert cell.locator(".word").inner_text() == short(best["text"])
            assert cell.locator("small").inner_text() == percent(math.exp(best["logprob"]))
    with torch.no_grad():  # independent of the API: the last row is the model's own top next token
        own = model(torch.tensor([tokenizer.encode(TEXT)]))[0].argmax(dim=-1).tolist()
    assert [cells[0]["id"] for cells in lens["top"][-1]] == own
    last = len(lens["rows"]) - 1
    page.hover(f"#lens-grid td[data-row='{last}'][data-position='2']")
    hovered = page.inner_text("#lens-hover")
    assert hovered.startswith(f"{lens['rows'][last]}, after \"·was\": ")
    assert hovered.endswith(", ".join(f"\"{visible(c['text'])}\" {percent(math.exp(c['logprob']))}"
                                      for c in lens["top"][last][2]))
    shoot(page, "logit-lens")

    # Residual stream: one bar per part at the chosen token (the last, then the first).
    open_tab(page, "residual")
    residual = views_of(server, TEXT, "residual")
    for position in (2, 0):
        if position != 2:
            page.select_option("#residual-position", str(position))
        page.wait_for_selector(f"#residual-bars[data-position='{position}']")
        assert page.locator("#residual-bars .word").all_inner_texts() == residual["names"]
        assert page.locator("#residual-bars .pct").all_inner_texts() == [
            f"{row[position]:.3f}" for row in residual["norms"]]
    assert len(residual["names"]) == 1 + 2 * model.config.n_layers
    shoot(page, "residual")

    # Patching: the form's default pair, the grid and the caption as /api/patch gives them.
    open_tab(page, "patch")
    body = {"clean": page.input_value("#patch-clean"), "corrupt": page.input_value("#patch-corrupt")}
    patch = httpx.post(f"{server}/api/patch", json=body, timeout=60).json()
    cells = page.locator("#patch-grid tr").all()
    assert len(cells) == 1 + model.config.n_layers
    for block, row in enumerate(patch["logits"]):
        assert cells[block + 1].locator("td").all_inner_texts() == [f"{v:.3f}" for v in row]
    headers = cells[0].locator("th").all_inner_texts()[1:]
    changed = [p for p, (a, b) in enumerate(zip(patch["tokens"], patch["corrupt_tokens"], strict=True))
               if a["text"] != b["text"]]
    assert changed and all(" / " in headers[p] for p in changed)  # the tokens that differ are marked
    caption = page.inner_text("#patch-caption")
    assert f"{patch['clean_logit']:.3f}" in caption and f"{patch['corrupt_logit']:.3f}" in caption
    assert f"(id {patch['target']['id']})" in caption
    shoot(page, "patch")
    page.fill("#patch-corrupt", "When Mary went")  # unequal token counts: the server's words, in the tab
    page.click("#patch-run")
    error = page.wait_for_selector("#panel-patch .view-error:has-text('equal token counts')").inner_text()
    assert error == "the clean and corrupted texts must have equal token counts: 14 and 3"

    # Head ablation: blocks x heads, each cell the change against the unablated logit.
    open_tab(page, "heads")
    heads = views_of(server, TEXT, "heads")
    grid = page.locator("#heads-grid tr").all()
    assert len(grid) == 1 + model.config.n_layers
    assert grid[0].locator("th").all_inner_texts()[1:] == [f"head {h}" for h in range(model.config.n_heads)]
    for block, row in enumerate(heads["logits"]):
        assert grid[block + 1].locator("td").all_inner_texts() == [signed(v - heads["logit"], 3) for v in row]
    assert f"{heads['logit']:.3f}" in page.inner_text("#heads-caption")
    assert heads["method"] == "exact" and "Estimated" not in page.inner_text("#heads-caption")
    shoot(page, "heads")

    # Embeddings: one point per distinct token of the tab's own text; a search shows its neighbours.
    open_tab(page, "embeddings")
    embeddings = views_of(server, page.input_value("#embeddings-text"), "embeddings")
    tokens = embeddings["token_map"]
    assert page.locator("#token-map g.point").count() == len(tokens["ids"]) == 24
    labels = page.locator("#token-map g.point text").all_text_contents()  # (SVG text has no innerText)
    assert labels == [visible(t) for t in tokens["texts"]]
    assert page.locator("#position-map circle").count() == len(embeddings["position_map"]["ids"]) == 32
    page.fill("#embeddings-search", "Paris")
    index = tokens["texts"].index(" Paris")
    page.wait_for_selector(f"#neighbours[data-index='{index}']")
    assert page.locator("#token-map g.point.match").count() == 1
    shown = page.locator("#neighbours .token").all()
    assert [s.inner_text().split("\n") for s in shown] == [
        [visible(text), f"{similarity:.3f}"]
        for text, similarity in zip(tokens["neighbour_texts"][index], tokens["similarity"][index],
                                    strict=True)]
    assert f"{100 * tokens['explained'][0]:.1f}%" in page.inner_text("#token-map-caption")
    shoot(page, "embeddings")

    # Top neurons of the last block.
    open_tab(page, "neurons")
    neurons = views_of(server, TEXT, "neurons")
    rows = page.locator("#neuron-table tr").all()[1:]
    assert len(rows) == len(neurons["neurons"]) == 10
    for row, neuron in zip(rows, neurons["neurons"], strict=True):
        unit, peak, _ = row.locator("td").all_inner_texts()
        assert (unit, peak) == (str(neuron["neuron"]), f"{neuron['peak']:.3f}")
        assert [t.split("\n") for t in row.locator(".token").all_inner_texts()] == [
            [visible(text), f"{a:.3f}"]
            for text, a in zip(neuron["tokens"], neuron["activations"], strict=True)]
    shoot(page, "neurons")

    # A new text redraws the open tab for it; the attention tab still works after the others.
    page.fill("#text", "Every effort moves you")
    page.click("#look")
    page.wait_for_function(
        "document.querySelector('#panel-neurons').dataset.shown === 'Every effort moves you'")
    assert page.locator("#neuron-table tr").count() == 11
    page.click("#tabs [data-view='attention']")
    page.wait_for_selector("canvas[data-drawn='0/0/4']")
    page.screenshot(path=str(ARTIFACTS / "inside-tabs.png"), full_page=True)
    # Chromium logs the one refused request (the unequal patching pair) as a console error: nothing else.
    assert page.errors == ["Failed to load resource: the server responded with a status of 422 "
                           "(Unprocessable Entity)"]


def test_learn_links_open_the_matching_view(server, page):
    page.goto(f"{server}/learn#layernorm")
    link = page.wait_for_selector("#inside-links a[data-view='logit-lens']")
    assert "logit lens" in link.inner_text()
    page.goto(f"{server}/learn#attention")  # a hash change: the same page load
    page.wait_for_selector("#inside-links a[data-view='heads']")
    page.click("#inside-links a[data-view='heads']")
    page.wait_for_selector("#panel-heads[data-shown]:not([aria-busy])", timeout=30_000)
    assert page.url.endswith("/inside.html#heads") and page.is_hidden("#panel-attention")
    assert page.locator("#heads-grid td").count() == 4  # 2 blocks x 2 heads
    assert page.errors == []
