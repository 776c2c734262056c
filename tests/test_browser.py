"""The pages in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright), against a
real uvicorn on loopback: generate, architecture, inside, phone width, and the static site on one
origin calling the API on another. Screenshots go to test-artifacts/."""

import functools
import http.server
import threading

import pytest
import torch
from conftest import ARTIFACTS, browser_tests

from glassgpt.config import GPTConfig
from glassgpt.generate import generate_text
from glassgpt.model import GPT
from glassgpt.serve import create_app, write_site
from glassgpt.serve.background import BackgroundServer
from glassgpt.tokenizer import get_tokenizer

pytestmark = browser_tests

TINY = GPTConfig(name="tiny-browser", vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    return GPT(TINY).eval(), get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with BackgroundServer(create_app(model, tokenizer, max_tokens_cap=64)) as server:
        yield server


def set_slider(page, selector: str, value) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          str(value))


def test_generate_page_streams_the_continuation_and_its_timing(server, page, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    page.goto(server.url + "/")
    page.fill("#prompt", "Every effort moves you")
    set_slider(page, "#temperature", 0)  # greedy, so the text is known
    set_slider(page, "#max-tokens", 12)
    page.click("#send")
    timing = page.wait_for_selector("#timing:has-text('Generated in')", timeout=30_000).inner_text()
    assert timing.startswith("Generated in ") and " s (" in timing and "tokens/s)" in timing
    assert "12 new tokens" in timing
    expected = generate_text(model, tokenizer, "Every effort moves you", 12)
    assert page.inner_text("#output .completion") == expected
    assert page.inner_text("#output .prompt") == "Every effort moves you"
    assert "tiny-browser" in page.inner_text(".model-badge")
    page.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)

    page.fill("#prompt", "The painting was")  # Enter sends as well
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelector('#output .prompt').textContent === 'The painting was'"
                           " && document.querySelector('#timing').textContent.startsWith('Generated in')")
    assert page.inner_text("#output .completion") == generate_text(model, tokenizer, "The painting was", 12)
    assert page.errors == []


def test_generate_page_shows_errors_in_plain_words(server, page):
    page.goto(server.url + "/")
    page.fill("#top-p", "5")
    page.click("#send")
    error = page.wait_for_selector("#error:has-text('top_p')").inner_text()
    assert error == "top_p: Input should be less than or equal to 1"
    page.fill("#top-p", "")
    page.fill("#prompt", "")
    page.click("#send")
    page.wait_for_selector("#error:has-text('Type a prompt first.')")


def test_pages_fit_a_phone_screen(server, browser):
    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    try:
        for name, url, ready in (("generate", "/", "#send"),
                                 ("architecture", "/architecture", "#total-parameters"),
                                 ("inside", "/inside", "canvas[data-drawn]")):
            phone.goto(server.url + url)
            phone.wait_for_selector(ready)
            if name == "generate":
                phone.click("#send")
                phone.wait_for_selector("#timing:has-text('Generated in')")
            overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{url} scrolls sideways by {overflow}px at phone width"
            phone.screenshot(path=str(ARTIFACTS / f"{name}-phone.png"), full_page=True)
    finally:
        phone.close()


def test_architecture_page_shows_the_live_model(server, page, model_and_tokenizer):
    model, _ = model_and_tokenizer
    page.goto(server.url + "/architecture")
    total = page.wait_for_selector("#total-parameters").inner_text()
    assert total == f"{model.num_parameters():,}" == "1,635,744"
    cards = page.inner_text("#cards")
    for label in ("Blocks", "Heads per block", "Embedding width", "Context length", "Vocabulary", "50,257"):
        assert label in cards
    page.wait_for_selector("#flow .token")  # the example prompt's real tokens in the data flow
    flow = page.inner_text("#flow")
    assert "2 transformer blocks" in flow and "32 → 50,257 logits" in flow and "Softmax" in flow
    assert ([t.inner_text().split("\n")[1] for t in page.query_selector_all("#flow .token")]
            == ["464", "12036", "373"])
    table = page.inner_text("#breakdown-table")
    assert "token embedding" in table and "1,608,224" in table and "total" in table
    page.screenshot(path=str(ARTIFACTS / "architecture.png"), full_page=True)
    assert page.errors == []


def test_inside_page_draws_the_attention_heatmap(server, page):
    page.goto(server.url + "/inside")
    page.wait_for_selector("canvas[data-drawn='0/0/3']")
    assert ([t.inner_text().split("\n")[1] for t in page.query_selector_all("#tokens .token")]
            == ["464", "12036", "373"])
    assert len(page.query_selector_all("#next .bar")) == 10
    painted = page.evaluate("""() => {
        const canvas = document.getElementById('heatmap');
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let blue = 0;
        for (let i = 0; i < pixels.length; i += 4)
            if (pixels[i + 2] > 150 && pixels[i] < 150 && pixels[i + 3] > 0) blue++;
        return blue;
    }""")
    assert painted > 500  # the attention cells are filled in the accent blue
    page.select_option("#layer", "1")
    page.select_option("#head", "mean")
    page.wait_for_selector("canvas[data-drawn='1/mean/3']")
    page.fill("#text", "Every effort moves you forward")
    page.click("#look")
    page.wait_for_selector("canvas[data-drawn='1/mean/5']")  # the selectors survive a new text
    page.screenshot(path=str(ARTIFACTS / "inside.png"), full_page=True)
    assert page.errors == []


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def static_hosts(tmp_path):
    """Two static web servers on loopback serving the same directory (filled in by the test)."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(site))
    hosts = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
    for host in hosts:
        threading.Thread(target=host.serve_forever, daemon=True).start()
    yield site, [f"http://127.0.0.1:{host.server_address[1]}" for host in hosts]
    for host in hosts:
        host.shutdown()
        host.server_close()


def test_static_site_calls_the_api_across_origins_and_unlisted_origins_are_refused(
        static_hosts, page, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    site, (allowed_origin, other_origin) = static_hosts
    app = create_app(model, tokenizer, cors_origins=[allowed_origin])
    with BackgroundServer(app) as api:
        write_site(site, api.url)
        page.goto(allowed_origin + "/index.html")
        page.fill("#prompt", "Every effort moves you")
        set_slider(page, "#temperature", 0)
        set_slider(page, "#max-tokens", 8)
        page.click("#send")
        page.wait_for_selector("#timing:has-text('Generated in')", timeout=30_000)
        assert (page.inner_text("#output .completion")
                == generate_text(model, tokenizer, "Every effort moves you", 8))
        page.screenshot(path=str(ARTIFACTS / "site-cross-origin.png"), full_page=True)
        page.click("text=Architecture")  # the site's own links lead to its other pages
        assert page.wait_for_selector("#total-parameters").inner_text() == "1,635,744"

        page.goto(other_origin + "/index.html")  # same files, an origin the API does not list
        page.fill("#prompt", "Every effort moves you")
        page.click("#send")
        error = page.wait_for_selector("#error:has-text('Could not reach')").inner_text()
        assert api.url in error and "--cors-origin" in error
        assert page.inner_text("#output .completion") == ""
        assert page.inner_text("#timing") == ""
        page.screenshot(path=str(ARTIFACTS / "site-refused-origin.png"), full_page=True)
