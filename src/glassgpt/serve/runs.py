"""The training runs under a directory, for the `/runs` page (`install_runs`): their loss curves and
the probe snapshots that `glassgpt.watch` recorded, read from disk at each request, so a run that is
still training shows its newest steps.

- `GET /api/runs`: `{"root", "runs": [{name, steps, evaluations, snapshots, updated}]}`, every directory
  directly under the root that holds a `metrics.jsonl` (a fine-tuning run still being written is
  `.NAME.tmp`), newest first;
- `GET /api/runs/{name}`: `{name, metrics: [the records], snapshots: [steps], settings, recipe,
  reference}`: `recipe` names the recipe whose settings the run has (any may add --max-steps), and
  `reference` is that recipe's measured curve (`REFERENCE_CURVES`), drawn beside the run's so that a
  person can tell whether their loss curve is normal;
- `GET /api/runs/{name}/probes/{step}`: the snapshot of that step (`glassgpt.watch.snapshot`'s fields).
A name that is not such a directory, or a step without a snapshot, answers 404 in words.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI, HTTPException

from glassgpt.train import RECIPES
from glassgpt.watch import PROBES_FILE, read_records

METRICS_FILE = "metrics.jsonl"
SETTINGS_FILES = ("train_config.json",)  # what a run was started with, where it says

# Evaluation losses of whole recipe runs on this project's 2-core CPU (docs/PERFORMANCE.md): the
# `verdict` recipe in bf16 (`python bench/bench_train_cpu.py --full --precision bf16`; one
# evaluation per epoch of 9 steps) and the `demo` recipe (`glassgpt train --recipe demo`).
REFERENCE_CURVES = {
    "verdict": {
        "source": "the verdict recipe, bf16, docs/PERFORMANCE.md",
        "steps": [9, 18, 27, 36, 45, 54, 63, 72, 81, 90],
        "train_loss": [7.418, 5.859, 5.029, 4.099, 3.332, 2.593, 1.648, 1.039, 0.569, 0.317],
        "val_loss": [7.566, 6.528, 6.439, 6.278, 6.224, 6.221, 6.263, 6.372, 6.454, 6.599],
    },
}


def recipe_of(settings: dict | None) -> str | None:
    """The recipe whose every setting the run has (its own --max-steps aside), or None."""
    if not settings:
        return None
    for name, recipe in RECIPES.items():
        if all(settings.get(key) == value for key, value in recipe.items()):
            return name
    return None


class Runs:
    """The run directories directly under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [d for d in self.root.iterdir() if d.is_dir() and (d / METRICS_FILE).is_file()]
        found.sort(key=lambda d: (d / METRICS_FILE).stat().st_mtime, reverse=True)
        return [d.name for d in found]

    def directory(self, name: str) -> Path:
        """The run called `name`, or 404: only a directory directly under the root (no `..`, no `/`)."""
        if name in self.names():
            return self.root / name
        raise HTTPException(404, f"no training run {name!r} under {self.root} (GET /api/runs lists them)")

    def summary(self, name: str) -> dict:
        directory = self.root / name
        metrics = read_records(directory / METRICS_FILE)
        snapshots = _probe_steps(directory / PROBES_FILE)
        return {"name": name, "steps": max((r.get("step", 0) for r in metrics), default=0),
                "evaluations": sum(r.get("event") == "eval" for r in metrics), "snapshots": len(snapshots),
                "updated": (directory / METRICS_FILE).stat().st_mtime}

    def run(self, name: str) -> dict:
        directory = self.directory(name)
        settings = None
        for filename in SETTINGS_FILES:
            if (directory / filename).is_file():
                settings = json.loads((directory / filename).read_text(encoding="utf-8"))
        recipe = recipe_of(settings)
        return {"name": name, "metrics": read_records(directory / METRICS_FILE),
                "snapshots": _probe_steps(directory / PROBES_FILE), "settings": settings,
                "recipe": recipe, "reference": REFERENCE_CURVES.get(recipe)}

    def probe(self, name: str, step: int) -> dict:
        directory = self.directory(name)
        for record in read_records(directory / PROBES_FILE):
            if record["step"] == step:
                return record
        raise HTTPException(404, f"run {name!r} has no snapshot at step {step} "
                                 f"(GET /api/runs/{name} lists its snapshots' steps)")


def _probe_steps(path: Path) -> list[int]:
    return sorted({record["step"] for record in read_records(path)})


# Documented, as every status code a route answers is (tests/test_serve_schema.py checks it).
ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
NOT_FOUND = {404: {"description": "no such run, or no snapshot at that step",
                   "content": {"application/json": {"schema": ERROR}}}}


def install_runs(app: FastAPI, root: str | Path) -> None:
    """GET /api/runs, /api/runs/{name} and /api/runs/{name}/probes/{step} over the runs under `root`."""
    runs = Runs(root)
    app.state.runs = runs

    @app.get("/api/runs", tags=["runs"])
    def list_runs():
        return {"root": str(runs.root), "runs": [runs.summary(name) for name in runs.names()]}

    @app.get("/api/runs/{name}", responses=NOT_FOUND, tags=["runs"])
    def one_run(name: str):
        return runs.run(name)

    @app.get("/api/runs/{name}/probes/{step}", responses=NOT_FOUND, tags=["runs"])
    def one_snapshot(name: str, step: int):
        return runs.probe(name, step)
