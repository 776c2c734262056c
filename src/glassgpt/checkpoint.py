"""Training checkpoints that survive a kill at any moment, a full disk and a damaged file.

Layout of a training output directory `OUT` (`glassgpt train --out OUT`):

    OUT/model.safetensors, OUT/glassgpt.json   the best model (lowest validation loss; the last one
                                               when there is no validation set): what
                                               `glassgpt.weights.load_model(OUT)`, generate and serve load;
                                               copies of best/'s files, not hard links, so that damage
                                               to one cannot reach the other
    OUT/best/                                  the best checkpoint: a copy of last/ as it was saved
                                               (model + `trainer.pt`), what `--resume` falls back to
    OUT/last/                                  the latest model + `trainer.pt` (optimizer, scheduler,
                                               step, random states; with LoRA, the unmerged model):
                                               what `--resume OUT` continues from (`load_checkpoint`)
    OUT/{last,best}/checksums.json             the size and sha256 of each file beside it
                                               (`glassgpt.integrity`), checked whenever it is loaded
    OUT/adapters.safetensors (+ best/, last/)  LoRA adapters, when the trainer asks for them (`more_files`)
    OUT/metrics.jsonl, OUT/loss.png, OUT/train_config.json

Every write is atomic. A checkpoint directory is built under a temporary name, its files fsynced,
then swapped in with renames; a crash mid-swap leaves `.last.old`, which `recover` puts back. A
write that fails removes its temporary (a full disk needs that space back) and leaves the previous
checkpoint; a full disk is `NoSpaceLeft`. The top-level files are all copied first, then each
replaced with `os.replace`, so they never hold a half-written file.

Loading checks the checksums: `resume_point` takes last/, or best/ when last/ is damaged, and a file
that cannot be read is one `DamagedFile` line naming it. Checkpoints from before checksums load unverified.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from glassgpt.integrity import DamagedFile, damage, read_pickle, read_tensors, write_checksums
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


class NoSpaceLeft(OSError):
    """The disk (or a quota) filled while writing; the previous checkpoint is intact and no temporary
    is left. `last_saved`: OUT/last already held this checkpoint (best/ or the top level failed)."""

    def __init__(self, message: str, last_saved: bool = False):
        super().__init__(errno.ENOSPC, message)
        self.message, self.last_saved = message, last_saved

    def __str__(self) -> str:
        return self.message


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it arose from, is a full disk or quota. torch.save into a file
    object raises RuntimeError("unexpected pos ...") while handling the OSError(ENOSPC); safetensors
    raises its own error saying "os error 28"."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or f"os error {errno.ENOSPC})" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_directory_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` to fill a fresh directory, then swap it in as `target`.

    If `write` raises, its temporary directory is removed; if the process dies, the next write removes
    it. Either way `target` still holds its previous contents.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = target.parent / f".{target.name}.tmp"
    old = target.parent / f".{target.name}.old"
    if tmp.exists():  # left by a crash in an earlier write
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # on a full disk, the space the next try needs
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_directory(target.parent)
    if old.exists():
        shutil.rmtree(old)
    return target


def copy_files(source: Path, destination: Path) -> None:
    """Copy every file of directory `source` into `destination` (a whole checkpoint: best from last)."""
    for file in sorted(source.iterdir()):
        if file.is_file():
            shutil.copyfile(file, destination / file.name)


def copy_model_files(source: Path, destination: Path, names=MODEL_FILES) -> None:
    """Put copies of `source`'s files `names` in `destination`: all copied first (where a full disk
    fails, nothing replaced yet), then each swapped in atomically. Copies, never hard links: a file
    damaged in one place must stay intact in the other."""
    staged = [destination / f".{name}.tmp" for name in names]
    try:
        for name, tmp in zip(names, staged, strict=True):
            shutil.copyfile(source / name, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
        raise
    for name, tmp in zip(names, staged, strict=True):
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
    A full disk raises `NoSpaceLeft`, having removed what it had half written.
    """
    out_dir = Path(out_dir)
    more_files = more_files or {}

    def write_last(directory: Path) -> None:
        save_model(model, directory, tokenizer, extra=extra)
        for write in more_files.values():
            write(directory)
        if state is not None:
            # Into a file object: torch.save's own file writer reports a full disk only as
            # "unexpected pos"; through Python's the OSError(ENOSPC) stays attached.
            with open(directory / STATE_FILE, "wb") as file:
                torch.save(state, file)
        write_checksums(directory)

    last_saved = False
    try:
        write_directory_atomically(out_dir / LAST, write_last)
        last_saved = True
        if best:
            write_directory_atomically(out_dir / BEST, lambda tmp: copy_files(out_dir / LAST, tmp))
            copy_model_files(out_dir / BEST, out_dir, MODEL_FILES + tuple(more_files))
    except Exception as error:
        if is_disk_full(error):
            raise NoSpaceLeft(f"no space left on {out_dir}", last_saved=last_saved) from error
        raise


def has_checkpoint(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a checkpoint a run can resume from (last/, or best/ alone)."""
    for name in (LAST, BEST):
        directory = Path(out_dir) / name
        recover(directory)
        if (directory / STATE_FILE).is_file():
            return True
    return False


def resume_point(out_dir: str | Path) -> tuple[Path, str | None]:
    """(the checkpoint directory that `--resume out_dir` continues from, a note when it is not last/).

    OUT/last, unless its checksums say a file is damaged or missing: then OUT/best, when that is
    intact and holds a trainer state. Neither: DamagedFile naming what is wrong (FileNotFoundError
    when there is no checkpoint at all).
    """
    out_dir = Path(out_dir)
    problems: list[str] = []
    damaged = False
    for name in (LAST, BEST):
        directory = out_dir / name
        recover(directory)
        problem = damage(directory)
        damaged = damaged or problem is not None
        if problem is None and (directory / STATE_FILE).is_file():
            note = f"{'; '.join(problems)}: resuming from {directory} instead" if problems else None
            return directory, note
        problems.append(problem or f"{directory / STATE_FILE} does not exist")
    if not damaged:
        raise FileNotFoundError(f"no checkpoint to resume from: {out_dir / LAST / STATE_FILE} does not exist")
    raise DamagedFile(f"{'; '.join(problems)}: no intact checkpoint to resume from")


def load_state(out_dir: str | Path) -> dict:
    """The trainer state saved in `out_dir`'s resume point (tensors on the CPU)."""
    directory, _ = resume_point(out_dir)
    # weights_only: a checkpoint is data; it must not be able to run code when loaded.
    return read_pickle(directory / STATE_FILE)


def load_checkpoint(out_dir: str | Path, model) -> dict:
    """Put the weights of `out_dir/last` (or best/, `resume_point`) into `model` (onto its device) and
    return the trainer state saved beside them (what `save_checkpoint` was given as `state`). A state
    that holds the trainer's own "model_state" (LoRA's unmerged weights and adapters) restores that
    rather than the saved model."""
    directory, _ = resume_point(out_dir)  # it recovers an interrupted swap and says when nothing is there
    state = read_pickle(directory / STATE_FILE)
    if "model_state" in state:
        model.load_state_dict(state.pop("model_state"))
        return state
    weights = read_tensors(directory / WEIGHTS_FILE, device=str(next(model.parameters()).device))
    load_state_into(model, weights, str(directory))
    return state


def checkpoint_model(out_dir: str | Path):
    """(model, tokenizer) saved in `out_dir`'s resume point: the architecture of a checkpointed run,
    for a run whose shape came from another model (`--init-from`) rather than from its settings."""
    directory, _ = resume_point(out_dir)
    return load_model(directory)


def read_metrics(path: str | Path) -> tuple[list[dict], str | None]:
    """The records of a `metrics.jsonl`, and a note when some could not be read: a full disk or a
    crash while a line was being appended leaves it cut short (or NUL bytes), and the checkpoint
    itself is fine, so such lines are dropped rather than refused."""
    path = Path(path)
    records, dropped = [], []
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record")
        except ValueError:
            dropped.append(number)
            continue
        records.append(record)
    if not dropped:
        return records, None
    if dropped == [len(lines) - (lines[-1] == "")]:
        return records, (f"{path}: dropped its last record (line {dropped[0]}), cut short as it was written "
                         "(a crash or a full disk)")
    where = ", ".join(map(str, dropped))
    return records, f"{path}: dropped {len(dropped)} unreadable records (lines {where})"
