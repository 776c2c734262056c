import subprocess
import sys

import pytest

from glassgpt.cli import main


def test_info_prints_the_breakdown_and_sizes(capsys):
    assert main(["info", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out
    assert "38,597,376" in out  # token embedding 50257 x 768
    assert "474.7 MiB" in out and "237.4 MiB" in out


def test_info_per_block_for_tinygpt(capsys):
    assert main(["info", "tinygpt", "--per-block"]) == 0
    out = capsys.readouterr().out
    assert "2,453" in out and "block 0 attention" in out and "1,088" in out


def test_tokenize_prints_ids(capsys):
    assert main(["tokenize", "The painting was"]) == 0
    out = capsys.readouterr().out
    assert "12036" in out and "' painting'" in out and "3 tokens" in out


def test_tokenize_char(capsys):
    assert main(["tokenize", "hello hello", "--tokenizer", "char"]) == 0
    assert "11 tokens" in capsys.readouterr().out


def test_python_m_glassgpt_is_the_command_with_its_error_policy():
    """What torchrun starts (`torchrun -m glassgpt train ...`): the same verbs, the same refusals."""
    result = subprocess.run([sys.executable, "-m", "glassgpt", "train", "--recipe", "tinygpt"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "glassgpt: error: say where the run goes: --out DIR"


def test_generate_defaults_to_the_demo_model_as_serve_does(tmp_path, capsys, monkeypatch):
    """After `make demo`, `glassgpt generate "hi"` runs the model the demo trained (runs/demo)."""
    from conftest import random_model

    from glassgpt import GPTConfig
    from glassgpt.tokenizer import CharTokenizer
    from glassgpt.weights import save_model

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "hi"]) == 2  # no demo model yet: say how to get one
    error = capsys.readouterr().err
    assert "runs/demo" in error and "make demo" in error
    tokenizer = CharTokenizer.from_text("hi there")
    config = GPTConfig(vocab_size=len(tokenizer.chars), context_length=16, emb_dim=16, n_heads=2, n_layers=1)
    save_model(random_model(config), tmp_path / "runs" / "demo", tokenizer=tokenizer)
    assert main(["generate", "hi", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out.startswith("hi") and len(out) == 2 + 5 and set(out) <= set("hi there")


@pytest.mark.parametrize("argv", [["explain"], ["info", "gpt2"],
                                  ["tokenize", "a " * 20_000]])
def test_a_reader_that_closes_early_ends_the_command_quietly(argv):
    """`glassgpt explain | head`: the reader goes away, the command stops without a traceback (for
    every verb: the entry point handles it). Here the reader reads one line (or none) and closes."""
    process = subprocess.Popen([sys.executable, "-m", "glassgpt", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    if argv[0] == "tokenize":  # 20,000 lines: the command is still writing when the reader leaves
        process.stdout.readline()
    process.stdout.close()  # the others write after the reader has gone
    error = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1
    assert error == ""


def test_the_demo_estimates_its_time_from_the_steps_it_measured():
    """Not a constant ("about 3 minutes"): 2.5 s per step measured here, 100 steps and 4 evaluations
    of 2 + 2 forward passes left -> (100 + 4 x 4/3) x 2.5 s = 263 s, "4 minutes"."""
    from types import SimpleNamespace

    from glassgpt.cli import StepTimer, about

    said = []
    now = [0.0]
    trainer = SimpleNamespace(step=1, total_steps=104, eval_every=27, config=SimpleNamespace(eval_batches=2),
                              say=said.append)
    timer = StepTimer(steps=3, clock=lambda: now[0])
    timer(trainer)  # step 1: warm-up, not timed
    for step in (2, 3, 4):
        now[0] += 2.5
        trainer.step = step
        timer(trainer)
    assert len(said) == 1
    assert "2.50 s per step (steps 2-4" in said[0]
    assert "the 100 steps left and 4 evaluations take about 4 minutes" in said[0]
    trainer.step = 5
    timer(trainer)
    assert len(said) == 1  # said once
    assert [about(s) for s in (4, 44, 263, 5400)] == ["4 seconds", "40 seconds", "4 minutes", "1 h 30 min"]
