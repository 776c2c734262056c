"""Checkpoints: the layout load_model reads, best vs last, and atomic writes under a crash."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from glassgpt.checkpoint import (
    BEST,
    LAST,
    STATE_FILE,
    NoSpaceLeft,
    has_checkpoint,
    load_checkpoint,
    load_state,
    recover,
    resume_point,
    save_checkpoint,
    write_directory_atomically,
)
from glassgpt.integrity import CHECKSUMS_FILE, DamagedFile
from glassgpt.model import GPT
from glassgpt.tokenizer import CharTokenizer
from glassgpt.weights import load_model

TOKENIZER = CharTokenizer("abcd")


def tiny_model(fill: float) -> GPT:
    model = GPT.from_preset("tinygpt", vocab_size=4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(fill)
    return model


def stored_fill(directory) -> float:
    model, _ = load_model(directory)
    return model.tok_emb.weight[0, 0].item()


def test_layout_top_level_is_best_last_has_the_state(tmp_path):
    save_checkpoint(tmp_path, tiny_model(1.0), TOKENIZER, state={"step": 1}, best=True)
    save_checkpoint(tmp_path, tiny_model(2.0), TOKENIZER, state={"step": 2}, best=False)
    assert stored_fill(tmp_path) == 1.0  # what generate and serve load: the best model
    assert stored_fill(tmp_path / BEST) == 1.0
    assert stored_fill(tmp_path / LAST) == 2.0
    assert load_state(tmp_path)["step"] == 2
    assert has_checkpoint(tmp_path)
    _, tokenizer = load_model(tmp_path)
    assert tokenizer.decode([3, 0]) == "da"

    save_checkpoint(tmp_path, tiny_model(3.0), TOKENIZER, state={"step": 3}, best=True)
    assert stored_fill(tmp_path) == stored_fill(tmp_path / BEST) == stored_fill(tmp_path / LAST) == 3.0
    # the top-level files are copies of best's, not hard links: damage to one must not reach the other
    for name in ("model.safetensors", "glassgpt.json"):
        assert not os.path.samefile(tmp_path / name, tmp_path / BEST / name)
        assert (tmp_path / name).read_bytes() == (tmp_path / BEST / name).read_bytes()


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, tiny_model(1.0), TOKENIZER, state={"step": 1}, best=True)

    def crash_halfway(directory):
        (directory / "model.safetensors").write_bytes(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_directory_atomically(tmp_path / LAST, crash_halfway)
    assert stored_fill(tmp_path / LAST) == 1.0 and load_state(tmp_path)["step"] == 1
    # the next save cleans the leftover temporary directory
    save_checkpoint(tmp_path, tiny_model(2.0), TOKENIZER, state={"step": 2})
    assert stored_fill(tmp_path / LAST) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    save_checkpoint(tmp_path, tiny_model(1.0), TOKENIZER, state={"step": 1})
    # the swap had moved the old checkpoint aside but not yet moved the new one in
    os.replace(tmp_path / LAST, tmp_path / f".{LAST}.old")
    assert not (tmp_path / LAST).exists()
    assert load_state(tmp_path)["step"] == 1  # recovered on the way in
    assert not (tmp_path / f".{LAST}.old").exists()
    recover(tmp_path / LAST)  # nothing to do: harmless
    assert stored_fill(tmp_path / LAST) == 1.0


def test_load_checkpoint_puts_last_back_into_a_model(tmp_path):
    save_checkpoint(tmp_path, tiny_model(1.0), TOKENIZER, state={"step": 1}, best=True)
    save_checkpoint(tmp_path, tiny_model(2.0), TOKENIZER, state={"step": 2})
    model = tiny_model(0.0)
    state = load_checkpoint(tmp_path, model)
    assert state["step"] == 2  # the last checkpoint, not the best one
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in model.parameters())
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path / "elsewhere", model)


CRASHING_WRITER = textwrap.dedent("""
    import sys, torch
    from glassgpt.checkpoint import save_checkpoint
    from glassgpt.model import GPT
    from glassgpt.tokenizer import CharTokenizer
    model = GPT.from_preset("tinygpt", vocab_size=4)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        # a big state makes each write take a while, so the kill lands mid-write
        save_checkpoint(sys.argv[1], model, CharTokenizer("abcd"), best=step % 2 == 0,
                        state={"step": step, "padding": torch.zeros(4_000_000)})
        print(step, flush=True)
""")


def test_killing_the_writer_at_any_moment_leaves_a_consistent_checkpoint(tmp_path):
    for delay in (0.9, 1.3):
        out = tmp_path / f"run{delay}"
        writer = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(out)], stdout=subprocess.PIPE,
                                  text=True)
        first = writer.stdout.readline()  # at least one checkpoint is complete
        assert first.strip() == "1"
        time.sleep(delay)
        writer.kill()
        writer.wait()
        state = load_state(out)
        assert state["step"] >= 1
        assert stored_fill(out / LAST) == float(state["step"])  # weights and state from the same save
        assert (out / LAST / STATE_FILE).is_file()
        if (out / "glassgpt.json").exists():  # written after the weights, so both are there
            assert stored_fill(out) % 2 == 0  # the top level only ever holds a best (even) step


# ---------------------------------------------------------------- a full disk, damaged and crafted files


def flip_a_byte(path, where: float = 0.5) -> None:
    """Flip the bits of one byte in the middle of `path` (what the red team's corruptions did)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def two_checkpoints(out):
    """best/ at step 1 (fill 1.0), last/ at step 2 (fill 2.0)."""
    save_checkpoint(out, tiny_model(1.0), TOKENIZER, state={"step": 1, "moment": torch.ones(64)}, best=True)
    save_checkpoint(out, tiny_model(2.0), TOKENIZER, state={"step": 2, "moment": torch.ones(64)})


@pytest.mark.parametrize("name", [STATE_FILE, "model.safetensors", "glassgpt.json"])
def test_a_flipped_byte_is_caught_and_resume_falls_back_to_best(tmp_path, name):
    two_checkpoints(tmp_path)
    flip_a_byte(tmp_path / LAST / name)  # loaded silently before checksums
    directory, note = resume_point(tmp_path)
    assert directory == tmp_path / BEST
    assert f"{tmp_path / LAST / name} is corrupt: its sha256 differs" in note
    assert note.endswith(f"resuming from {tmp_path / BEST} instead")
    assert load_state(tmp_path)["step"] == 1
    model = tiny_model(0.0)
    assert load_checkpoint(tmp_path, model)["step"] == 1
    assert all(torch.equal(p, torch.full_like(p, 1.0)) for p in model.parameters())
    # damage in best/ too: one line naming both, no checkpoint loaded
    flip_a_byte(tmp_path / BEST / STATE_FILE, 0.7)
    with pytest.raises(DamagedFile) as error:
        load_state(tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.endswith("no intact checkpoint to resume from")
    assert str(tmp_path / LAST / name) in message and str(tmp_path / BEST / STATE_FILE) in message


def test_a_truncated_file_is_named_with_its_sizes(tmp_path):
    two_checkpoints(tmp_path)
    state = tmp_path / LAST / STATE_FILE
    size = state.stat().st_size
    state.write_bytes(state.read_bytes()[:size // 2])
    _, note = resume_point(tmp_path)
    assert note.startswith(f"{state} is truncated: {size // 2:,} bytes, not the {size:,} written")
    (tmp_path / LAST / "model.safetensors").unlink()
    assert resume_point(tmp_path)[1].startswith(f"{tmp_path / LAST / 'model.safetensors'} is missing")


def test_checkpoints_from_before_checksums_still_load(tmp_path):
    two_checkpoints(tmp_path)
    for name in (LAST, BEST):
        (tmp_path / name / CHECKSUMS_FILE).unlink()
    assert resume_point(tmp_path) == (tmp_path / LAST, None)
    assert load_state(tmp_path)["step"] == 2
    (tmp_path / BEST / STATE_FILE).unlink()  # the old layout: best/ held the model alone
    assert has_checkpoint(tmp_path) and load_state(tmp_path)["step"] == 2


class RunsCode:
    """A pickle that would run code when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_or_corrupt_file_is_one_error_line_naming_it(tmp_path, capsys):
    from glassgpt.cli import main

    marker = tmp_path / "code-ran"
    out = tmp_path / "run"
    two_checkpoints(out)
    for name in (LAST, BEST):  # crafted whole: no checksums to catch it, the loader must refuse it
        (out / name / CHECKSUMS_FILE).unlink()
        torch.save({"step": 9, "payload": RunsCode(marker)}, out / name / STATE_FILE)
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"glassgpt: error: {out / LAST / STATE_FILE} is corrupt, or")
    assert "weights_only" not in err and "Traceback" not in err
    assert not marker.exists()  # nothing in it ran

    (out / LAST / STATE_FILE).write_bytes(b"\x80\x02garbage")
    with pytest.raises(DamagedFile, match="trainer.pt is corrupt"):
        load_state(out)
    weights = (out / "model.safetensors").read_bytes()
    for name, damaged in (("model.safetensors", b""), ("model.safetensors", weights[:100]),
                          ("glassgpt.json", b"{not json")):
        target = out / name
        target.write_bytes(damaged)
        with pytest.raises(DamagedFile, match=f"^{target} is corrupt or truncated"):
            load_model(out)  # what generate and serve read


def fill_the_disk(obj, file, *args, **kwargs):
    """torch.save on a disk that fills halfway through, failing as the real one does (on a 2 MB tmpfs):
    RuntimeError("unexpected pos") raised while handling the OSError(ENOSPC) of the file it writes."""
    file.write(b"PK\x03\x04 half a zip")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904


def test_a_full_disk_leaves_the_last_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    two_checkpoints(tmp_path)
    monkeypatch.setattr("glassgpt.checkpoint.torch.save", fill_the_disk)
    with pytest.raises(NoSpaceLeft, match=f"^no space left on {tmp_path}$") as error:
        save_checkpoint(tmp_path, tiny_model(3.0), TOKENIZER, state={"step": 3}, best=True)
    assert error.value.errno == errno.ENOSPC and not error.value.last_saved
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {BEST, LAST, "glassgpt.json", "model.safetensors"}  # no temporary
    assert load_state(tmp_path)["step"] == 2 and stored_fill(tmp_path) == 1.0
    monkeypatch.undo()  # space is back
    save_checkpoint(tmp_path, tiny_model(3.0), TOKENIZER, state={"step": 3}, best=True)
    assert load_state(tmp_path)["step"] == 3 and stored_fill(tmp_path) == 3.0


def test_a_disk_that_fills_while_copying_the_best_model_keeps_the_old_top_level(tmp_path, monkeypatch):
    two_checkpoints(tmp_path)
    real_copy = shutil.copyfile

    def copy(source, destination):
        if destination.name == ".glassgpt.json.tmp":  # the second top-level file: the first is staged
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(source, destination)

    monkeypatch.setattr("glassgpt.checkpoint.shutil.copyfile", copy)
    with pytest.raises(NoSpaceLeft) as error:
        save_checkpoint(tmp_path, tiny_model(3.0), TOKENIZER, state={"step": 3}, best=True)
    assert error.value.last_saved  # last/ and best/ hold step 3; the top level still step 1, whole
    assert stored_fill(tmp_path / LAST) == stored_fill(tmp_path / BEST) == 3.0
    assert stored_fill(tmp_path) == 1.0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
