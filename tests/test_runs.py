"""The /runs page and its API (glassgpt.serve.runs): a real training run's metrics and probe snapshots
through GET /api/runs..., and in headless Chromium the step slider shows the snapshot of the chosen
step (its predictions, logit lens and attention as probes.jsonl holds them)."""

from __future__ import annotations

import json

import pytest
from conftest import ARTIFACTS, TINY, browser_tests
from fastapi.testclient import TestClient

from glassgpt import GPT
from glassgpt.cli import main
from glassgpt.serve import create_app
from glassgpt.serve.background import BackgroundServer
from glassgpt.train import TrainConfig, Trainer

TEXT = "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n" * 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs directory holding one short run ("chars") and a directory that is no run."""
    root = tmp_path_factory.mktemp("runs")
    config = TrainConfig(text=TEXT, tokenizer="char", model="nano", context_length=16, n_layers=2, n_heads=2,
                         emb_dim=32, stride=8, val_fraction=0.2, batch_size=4, max_steps=6, lr=1e-2,
                         eval_every=2, eval_batches=1, sample_prompt="All:", sample_tokens=2, progress=False,
                         out=str(root / "chars"))
    Trainer(config).fit()
    (root / "notes").mkdir()
    return root


def probes(root) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (root / "chars" / "probes.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def app(runs, tokenizer):
    return create_app(GPT(TINY), tokenizer, runs_dir=str(runs))


def test_api_lists_runs_and_serves_metrics_and_snapshots(app, runs):
    client = TestClient(app)
    listing = client.get("/api/runs").json()
    assert listing["root"] == str(runs)
    assert [r["name"] for r in listing["runs"]] == ["chars"]  # "notes" holds no metrics.jsonl
    assert listing["runs"][0] | {"updated": 0} == {"name": "chars", "steps": 6, "evaluations": 3,
                                                   "snapshots": 4, "updated": 0}
    run = client.get("/api/runs/chars").json()
    logged = [json.loads(line) for line in (runs / "chars" / "metrics.jsonl").read_text().splitlines()]
    assert run["metrics"] == logged and run["snapshots"] == [0, 2, 4, 6]
    assert run["settings"]["max_steps"] == 6
    assert run["recipe"] is None and run["reference"] is None  # no recipe's settings
    assert client.get("/api/runs/chars/probes/4").json() == probes(runs)[4]

    for path in ("/api/runs/notes", "/api/runs/..", "/api/runs/%2E%2E", "/api/runs/chars/probes/3"):
        answer = client.get(path)
        assert answer.status_code == 404, path
    assert "no snapshot at step 3" in client.get("/api/runs/chars/probes/3").json()["error"]
    assert "no training run 'notes'" in client.get("/api/runs/notes").json()["error"]


def test_serve_run_needs_a_training_run(tmp_path, capsys):
    assert main(["serve", "--run", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


MOVE = "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }"  # as a person drags it


def in_chromium(test):
    """The browser suites' marks (skipped without Chromium) on one test of this module."""
    for mark in browser_tests:
        test = mark(test)
    return test


@in_chromium
def test_slider_shows_the_snapshot_of_the_chosen_step(app, runs, browser):
    snapshots = probes(runs)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with BackgroundServer(app) as server:
        page.goto(server.url + "/runs?run=chars")
        # The newest snapshot first; then the slider moved to each step shows that step's.
        page.wait_for_selector("main[data-shown-step='6']", timeout=30_000)
        assert page.input_value("#run") == "chars"
        assert int(page.get_attribute("#chart", "data-points")) > 6
        for index, step in enumerate([0, 2, 4, 6]):
            page.eval_on_selector("#slider", MOVE, str(index))
            page.wait_for_selector(f"main[data-shown-step='{step}']")
            snapshot = snapshots[step]
            assert page.inner_text("#step-label") == str(step)
            shown = page.eval_on_selector_all("#next .word", "nodes => nodes.map(n => n.textContent)")
            visible = [t["text"].replace(" ", "·").replace("\n", "↵") for t in snapshot["next"]]
            assert shown == visible
            cells = page.eval_on_selector_all("#lens td", "nodes => nodes.map(n => n.textContent)")
            assert cells == [ranks[0].replace(" ", "·").replace("\n", "↵")
                             for row in snapshot["lens"]["text"] for ranks in row]
            weights = page.eval_on_selector_all("#attention td", "nodes => nodes.map(n => n.textContent)")
            first = snapshot["attention"][0][0]  # block 0, head 0
            assert weights == [f"{w:.2f}" if j <= i else "" for i, row in enumerate(first)
                               for j, w in enumerate(row)]
        assert snapshots[0]["next"] != snapshots[6]["next"]
        page.screenshot(path=str(ARTIFACTS / "runs.png"), full_page=True)
    page.close()
    assert errors == []


def test_a_run_of_a_recipe_is_drawn_beside_that_recipes_reference_curve():
    from glassgpt.serve.runs import REFERENCE_CURVES, recipe_of
    from glassgpt.train import recipe

    assert recipe_of(recipe("verdict", max_steps=20, out="runs/v").to_dict()) == "verdict"
    assert recipe_of(recipe("verdict", lr=1e-3).to_dict()) is None  # another run, not the recipe's
    assert recipe_of(None) is None
    for curve in REFERENCE_CURVES.values():
        assert len(curve["steps"]) == len(curve["train_loss"]) == len(curve["val_loss"])
