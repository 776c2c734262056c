"""Checkpoints: the layout load_model reads, best vs last, and atomic writes under a crash."""

from __future__ import annotations

import os
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
    has_checkpoint,
    load_checkpoint,
    load_state,
    recover,
    save_checkpoint,
    write_directory_atomically,
)
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
