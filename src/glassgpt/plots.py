"""Pictures of a run: named curves against one x axis, written to a PNG atomically (`loss.png`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Curve:
    """One line of a plot. `faint`: thin and translucent, no markers (a noisy value of every step)."""

    x: Sequence[float]
    y: Sequence[float]
    color: str | None = None
    faint: bool = False


def plot_curves(path: Path, curves: dict[str, Curve], xlabel: str, ylabel: str) -> None:
    """Draw each non-empty curve under its name into the PNG `path`, replaced atomically."""
    # Imported here: matplotlib takes about a second to import, paid only by runs that plot.
    # The Figure API rather than pyplot: no global state, no display needed.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.subplots()
    for label, curve in curves.items():
        if not curve.x:
            continue
        if curve.faint:
            axes.plot(curve.x, curve.y, color=curve.color, alpha=0.3, linewidth=0.8, label=label)
        else:
            axes.plot(curve.x, curve.y, "o-", color=curve.color, label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)


def plot_metric(records: list[dict], path: Path, metric: str = "loss", x: str = "tokens",
                xlabel: str = "tokens seen", ylabel: str = "cross-entropy loss") -> None:
    """`metric` from the metric records of a run (metrics.jsonl's) against the records' `x`: faint,
    each step's `train_{metric}` where steps record it; with markers, each evaluation's train and
    validation value."""
    def curve(event: str, key: str, **style) -> Curve:
        points = [r for r in records if r["event"] == event and r.get(key) is not None]
        return Curve([r[x] for r in points], [r[key] for r in points], **style)

    plot_curves(path, {
        "train (each step)": curve("step", f"train_{metric}", color="tab:blue", faint=True),
        "train": curve("eval", f"train_{metric}", color="tab:blue"),
        "validation": curve("eval", f"val_{metric}", color="tab:orange"),
    }, xlabel=xlabel, ylabel=ylabel)


def plot_losses(records: list[dict], path: Path) -> None:
    """`loss.png`: train and validation loss against tokens seen, from the metric records of a run."""
    plot_metric(records, path)
