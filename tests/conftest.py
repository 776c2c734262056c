"""Shared test helpers: models with random weights and random token ids, and the browser tests'
set-up (Debian's headless Chromium driven by Playwright). Test modules import the plain helpers
with `from conftest import ...`; none imports another test module."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from glassgpt import GPT, GPTConfig
from glassgpt.tokenizer import get_tokenizer


def random_model(config: GPTConfig, seed: int = 0, spread: float = 0.05, device: str = "cpu",
                 matrices: bool = True) -> GPT:
    """GPT-2's initialisation plus N(0, spread) noise on every parameter (with `matrices=False`, on
    biases and norms only), so that biases and norms are not at their trivial initial values."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if matrices or p.dim() == 1:
                p.add_(spread * torch.randn_like(p))
    return model.to(device).eval()


def random_ids(config: GPTConfig, batch: int, n: int, seed: int = 1) -> torch.Tensor:
    """A (batch, n) tensor of token ids drawn from a seeded generator: the same ids on every run."""
    return torch.randint(0, config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags that keep Chromium off the network: on this machine's closed network its background
# connections are refused and it fails to look up Google's hosts at every start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"  # screenshots, git-ignored

browser_tests = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="Chromium is not installed (apt-get install chromium)"),
]


# Module scope: Playwright's sync API keeps an event loop running on this thread while open, which
# would break later tests that call asyncio.run.
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A desktop-sized page that records JavaScript errors in `page.errors`."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    yield page
    page.close()


def sse_events(body: str) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a server-sent-events body (the serving tests' streams)."""
    events = []
    for block in body.split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((lines["event"], json.loads(lines["data"])))
    return events


# The serving tests' model: GPT-2's vocabulary on a 2-block, 32-wide body, fast on any CPU.
TINY = GPTConfig(name="tiny", vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2)


@pytest.fixture(scope="module")
def tokenizer():
    """GPT-2's tokenizer; a test module that needs another defines its own `tokenizer` fixture."""
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model():
    """A `TINY` model with seeded random weights; a module may define its own `model` instead."""
    torch.manual_seed(0)
    return GPT(TINY).eval()
