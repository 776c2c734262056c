"""Training checkpoints that survive a kill at any moment.

Layout of a training output directory `OUT` (`glassgpt train --out OUT`):

    OUT/model.safetensors, OUT/glassgpt.json   the best model (lowest validation loss; the last one
                                               when there is no validation set): what
                                               `glassgpt.weights.load_model(OUT)`, generate and serve load
    OUT/best/                                  the same best model, as its own directory
    OUT/last/                                  the latest model + `trainer.pt` (optimizer, scheduler,
                                               step, random states; with LoRA, the unmerged model):
                                               what `--resume OUT` continues from (`load_checkpoint`)
    OUT/adapters.safetensors (+ best/, last/)  LoRA adapters, when the trainer asks for them (`more_files`)
    OUT/metrics.jsonl, OUT/loss.png, OUT/train_config.json

Every write is atomic. A checkpoint directory is built under a temporary name, its files fsynced,
then swapped in with renames; a crash mid-swap leaves `.last.old`, which `recover` puts back.
The top-level model files are hard links to `best/`'s, replaced one at a time with `os.replace`,
so they never hold a half-written file (and cost no disk space).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from glassgpt.weights import GLASSGPT_META, WEIGHTS_FILE, load_model, load_state_into, save_model

LAST = "last"
BEST = "best"
STATE_FILE = "trainer.pt"
MODEL_FILES = (WEIGHTS_FILE, GLASSGPT_META)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    for file in directory.iterdir():
        if file.is_file():
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
    fsync_directory(directory)


def recover(target: Path) -> None:
    """Undo a swap that a crash interrupted: `.NAME.old` is the last good copy of NAME."""
    old = target.parent / f".{target.name}.old"
    if old.is_dir():
        if target.is_dir():
            shutil.rmtree(old)
        else:
            os.replace(old, target)


def write_directory_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` to fill a fresh directory, then swap it in as `target`.

    If `write` raises or the process dies, `target` still holds its previous contents.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = target.parent / f".{target.name}.tmp"
    old = target.parent / f".{target.name}.old"
    if tmp.exists():  # left by a crash in an earlier write
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    fsync_tree(tmp)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_directory(target.parent)
    if old.exists():
        shutil.rmtree(old)
    return target


def link_model_files(source: Path, destination: Path, names=MODEL_FILES) -> None:
    """Point `destination`'s model files at `source`'s, each replaced atomically."""
    for name in names:
        tmp = destination / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source / name, tmp)
        except OSError:  # a filesystem without hard links: copy instead
            shutil.copyfile(source / name, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, destination / name)
    fsync_directory(destination)


def save_checkpoint(out_dir: str | Path, model, tokenizer, *, state: dict | None = None,
                    best: bool = False, extra: dict | None = None,
                    more_files: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Write `out_dir/last` (model + trainer `state`) and, if `best`, `out_dir/best` and the top level.

    `extra` (step, losses...) is stored in glassgpt.json beside the config. `more_files`: name ->
    a function that writes that file into the directory it is given, beside the model (LoRA adapters).
    A `state` holding "model_state" is the trainer's own model, when it is not the saved model (LoRA:
    the saved one has its adapters merged); `load_checkpoint` restores that instead.
    """
    out_dir = Path(out_dir)
    more_files = more_files or {}

    def write_model(directory: Path) -> None:
        save_model(model, directory, tokenizer, extra=extra)
        for write in more_files.values():
            write(directory)

    def write_last(directory: Path) -> None:
        write_model(directory)
        if state is not None:
            torch.save(state, directory / STATE_FILE)

    write_directory_atomically(out_dir / LAST, write_last)
    if best:
        write_directory_atomically(out_dir / BEST, write_model)
        link_model_files(out_dir / BEST, out_dir, MODEL_FILES + tuple(more_files))


def has_checkpoint(out_dir: str | Path) -> bool:
    last = Path(out_dir) / LAST
    recover(last)
    return (last / STATE_FILE).is_file()


def load_state(out_dir: str | Path) -> dict:
    """The trainer state saved in `out_dir/last` (tensors on the CPU)."""
    last = Path(out_dir) / LAST
    recover(last)
    path = last / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    # weights_only: a checkpoint is data; it must not be able to run code when loaded.
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(out_dir: str | Path, model) -> dict:
    """Put the weights of `out_dir/last` into `model` (onto its device) and return the trainer state
    saved beside them (what `save_checkpoint` was given as `state`). A state that holds the trainer's
    own "model_state" (LoRA's unmerged weights and adapters) restores that rather than the saved model."""
    last = Path(out_dir) / LAST
    state = load_state(out_dir)  # first: it recovers an interrupted swap and says when nothing is there
    if "model_state" in state:
        model.load_state_dict(state.pop("model_state"))
        return state
    weights = load_file(str(last / WEIGHTS_FILE), device=str(next(model.parameters()).device))
    load_state_into(model, weights, str(last))
    return state


def checkpoint_model(out_dir: str | Path):
    """(model, tokenizer) saved in `out_dir/last`: the architecture of a checkpointed run, for a run
    whose shape came from another model (`--init-from`) rather than from its settings."""
    last = Path(out_dir) / LAST
    recover(last)
    if not (last / GLASSGPT_META).is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {last / GLASSGPT_META} does not exist")
    return load_model(last)
