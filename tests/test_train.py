"""The Trainer: schedule, optimizer groups, accumulation, errors, exact resume, recipes end to end, DDP."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from glassgpt.checkpoint import NoSpaceLeft
from glassgpt.cli import main
from glassgpt.train import (
    DEFAULT_SAMPLE_PROMPT,
    RECIPES,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    build_optimizer,
    lr_multiplier,
    recipe,
)
from glassgpt.weights import load_model

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
        "All:\nResolved. resolved.\n") * 3


def tiny(**overrides) -> TrainConfig:
    """A 2-block character model on a few lines: a step takes milliseconds."""
    settings = dict(
        text=TEXT, tokenizer="char", model="nano", context_length=16, n_layers=2, n_heads=2, emb_dim=32,
        drop_rate=0.1, stride=8, val_fraction=0.2, batch_size=4, grad_accum=2, epochs=2, lr=3e-3,
        schedule="cosine", warmup_steps=2, grad_clip=1.0, eval_every=3, eval_batches=2,
        sample_prompt="All:", sample_tokens=8, progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def step_losses(records) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in records if r["event"] == "step"]


def test_warmup_then_cosine_down_to_the_floor():
    values = [lr_multiplier(s, 12, warmup_steps=2, schedule="cosine", min_lr_fraction=0.1) for s in range(12)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0)  # the cosine starts at the peak...
    assert values[-1] == pytest.approx(0.1)  # ...and reaches the floor on the last step
    assert values[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert all(a >= b for a, b in zip(values[1:], values[2:], strict=False))
    assert [lr_multiplier(s, 10, 0, "constant") for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(1, 10, 4, "constant") == pytest.approx(0.5)


def test_weight_decay_only_on_weight_matrices():
    from glassgpt.model import GPT

    model = GPT.from_preset("nano", vocab_size=50, n_layers=1, emb_dim=32, n_heads=2, qkv_bias=True)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == ["blocks.0.attn.out_proj.weight", "blocks.0.attn.qkv.weight",
                       "blocks.0.ff.contract.weight", "blocks.0.ff.expand.weight"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    with_embeddings = build_optimizer(model, TrainConfig(decay_embeddings=True)).param_groups[0]["params"]
    assert len(with_embeddings) == 6  # + token and position embeddings (the tied head is the token one)


@pytest.mark.filterwarnings("ignore:Seems like")
def test_two_half_batches_accumulate_to_the_full_batch_gradient():
    trainer = Trainer(tiny(drop_rate=0.0, grad_clip=None))
    inputs, targets = next(iter(trainer.train_eval_loader))  # 4 windows
    gradients = []

    def capture(*args, **kwargs):
        gradients.append([p.grad.clone() for p in trainer.model.parameters()])

    trainer.optimizer.step = capture  # look at the gradients instead of stepping
    trainer.train_step([(inputs[:2], targets[:2]), (inputs[2:], targets[2:])])
    full_loss = trainer.train_step([(inputs, targets)])
    half_loss = trainer.train_step([(inputs[:2], targets[:2]), (inputs[2:], targets[2:])])
    assert half_loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    accumulated, full = gradients[0], gradients[1]
    assert max((a - f).abs().max().item() for a, f in zip(accumulated, full, strict=True)) < 1e-6
    assert max(f.abs().max().item() for f in full) > 1e-3  # the gradients are not trivially zero


def test_interrupted_and_resumed_run_gives_the_same_losses(tmp_path):
    """Dropout on, accumulation, cosine schedule, mid-epoch stop: resume must still be exact."""
    config = tiny(out=str(tmp_path / "straight"))
    straight = Trainer(config).fit()
    assert len(step_losses(straight)) == 12  # 2 epochs of 6 steps

    cut = config.replace(out=str(tmp_path / "cut"))
    Trainer(cut).fit(until_step=5)  # checkpoint at step 3 (an evaluation); steps 4-5 are lost like a kill
    assert json.loads((tmp_path / "cut" / "last" / "glassgpt.json").read_text())["training"]["step"] == 3
    with pytest.raises(ValueError, match="--resume"):
        Trainer(cut)  # a fresh run must not overwrite a checkpoint
    resumed = Trainer(cut, resume=True)
    assert resumed.step == 3
    records = resumed.fit()

    assert step_losses(records) == step_losses(straight)  # bit for bit
    evals = [(r["step"], r["val_loss"], r["sample"]) for r in records if r["event"] == "eval"]
    assert evals == [(r["step"], r["val_loss"], r["sample"]) for r in straight if r["event"] == "eval"]
    logged = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert step_losses(logged) == step_losses(straight)  # the lost steps' records were dropped
    model_a, _ = load_model(tmp_path / "straight" / "last")
    model_b, _ = load_model(tmp_path / "cut" / "last")
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_best_is_the_lowest_validation_loss(tmp_path):
    records = Trainer(tiny(out=str(tmp_path), epochs=3, eval_every=2)).fit()
    evals = [r for r in records if r["event"] == "eval"]
    best = min(evals, key=lambda r: r["val_loss"])
    saved = json.loads((tmp_path / "glassgpt.json").read_text())["training"]
    assert saved["step"] == best["step"] and saved["val_loss"] == best["val_loss"]
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "train_config.json").read_text())["context_length"] == 16


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    trainer = Trainer(tiny(out=str(tmp_path)))
    real_step = trainer.train_step

    def diverging(micro_batches):
        loss = real_step(micro_batches)
        return loss * float("nan") if trainer.step >= 4 else loss  # the 5th step blows up

    trainer.train_step = diverging
    with pytest.raises(TrainingDiverged, match="step 5"):
        trainer.fit()
    assert "last good checkpoint (step 3)" in capsys.readouterr().out
    model, _ = load_model(tmp_path / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((tmp_path / "last" / "glassgpt.json").read_text())["training"]["step"] == 3


def test_bad_settings_are_refused_in_plain_words(tmp_path):
    with pytest.raises(ValueError, match="exceeds the nano preset's 512"):
        tiny(context_length=1024)
    with pytest.raises(ValueError, match="fewer than one window"):
        Trainer(tiny(text="too short", context_length=64))
    with pytest.raises(ValueError, match="empty"):
        Trainer(tiny(text="   "))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(tiny(text=None, corpus=[str(tmp_path / "nothing.txt")]))
    with pytest.raises(ValueError, match="precision must be one of"):
        tiny(precision="fp8")
    with pytest.raises(ValueError, match="fp16 training needs a CUDA GPU"):
        Trainer(tiny(precision="fp16", device="cpu"))
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("gpt5")


def test_bf16_autocast_trains_on_cpu():
    records = Trainer(tiny(precision="bf16", drop_rate=0.0)).fit()
    losses = [loss for _, loss in step_losses(records)]
    assert losses[-1] < losses[0] - 0.3


def test_pytorch_init_matches_the_tutorials_model_scales():
    trainer = Trainer(tiny(init="pytorch", emb_dim=64))
    model = trainer.model
    assert model.pos_emb.weight.std().item() == pytest.approx(1.0, abs=0.1)  # nn.Embedding: N(0, 1)
    bound = 1 / math.sqrt(64)  # nn.Linear: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max().item() <= bound and qkv.abs().max().item() > 0.9 * bound
    gpt2 = Trainer(tiny(emb_dim=64)).model
    assert gpt2.pos_emb.weight.std().item() == pytest.approx(0.02, abs=0.003)


def test_recipes_hold_the_tutorials_settings():
    verdict = recipe("verdict")
    assert ((verdict.model, verdict.batch_size, verdict.stride, verdict.val_fraction)
            == ("verdict-162m", 2, 256, 0.1))
    assert (verdict.optimizer, verdict.lr, verdict.weight_decay, verdict.epochs) == ("adamw", 4e-4, 0.1, 10)
    assert verdict.init == "pytorch"  # the tutorial's model keeps PyTorch's layer defaults
    assert set(RECIPES) >= {"verdict", "tinygpt", "shakespeare-char", "demo"}
    for name in RECIPES:
        recipe(name)  # every recipe is a valid TrainConfig


def test_tinygpt_recipe_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["train", "--recipe", "tinygpt", "--out", str(out), "--eval-every", "100"]) == 0
    model, tokenizer = load_model(out)  # the output directory is what generate and serve load
    ids = model.generate(torch.tensor([tokenizer.encode("hell")]), 14)
    assert tokenizer.decode(ids[0].tolist()) == "hello hello hello "
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(step_losses(records)) == 200 and records[-1]["train_loss"] < 0.06
    assert "hello hello" in capsys.readouterr().out
    # running it again into the same directory is refused; --resume of a finished run does nothing more
    assert main(["train", "--recipe", "tinygpt", "--out", str(out)]) == 2
    assert main(["train", "--resume", str(out)]) == 0


def test_demo_verb_trains_once_then_reuses_the_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--recipe", "tinygpt", "--out", str(out), "--no-serve"]) == 0
    first = capsys.readouterr().out
    assert "training the 'tinygpt' recipe" in first and "hello hello hello" in first
    assert "this machine: " in first and " s per step (steps 2-4" in first  # measured, not promised
    assert main(["demo", "--recipe", "tinygpt", "--out", str(out), "--no-serve"]) == 0
    second = capsys.readouterr().out
    assert "using the model already trained" in second and "hello hello hello" in second


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    """torchrun, gloo, 2 CPU processes with batch 2 each == 1 process with batch 4."""
    common = ["--text", TEXT, "--tokenizer", "char", "--model", "nano", "--context-length", "16",
              "--n-layers", "2", "--n-heads", "2", "--emb-dim", "32", "--drop-rate", "0", "--stride", "4",
              "--val-fraction", "0.2", "--epochs", "1", "--max-steps", "6", "--lr", "3e-3",
              "--eval-every", "3", "--no-progress", "--threads", "1", "--sample-prompt", "All:"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "glassgpt", "train"]
    two = subprocess.run(torchrun + common + ["--batch-size", "2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    one = Trainer(TrainConfig.from_dict({**json.loads((tmp_path / "two" / "train_config.json").read_text()),
                                         "batch_size": 4, "out": None})).fit()

    def losses(records):
        return [loss for _, loss in step_losses(records)]

    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses(logged)) == 6
    assert losses(logged) == pytest.approx(losses(one), rel=1e-4)
    assert [r["tokens"] for r in logged if r["event"] == "step"] == [64 * s for s in range(1, 7)]


# ---------------------------------------------------------------- failures a run survives


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_full_disk_stops_in_one_line_and_resume_is_exact(tmp_path, monkeypatch, capsys):
    """The disk fills during the second checkpoint (step 6), tearing metrics.jsonl's last line too."""
    config = tiny(out=str(tmp_path / "straight"))
    straight = Trainer(config).fit()
    out = tmp_path / "full"
    real_save, saves = torch.save, []

    def filling(obj, file, *args, **kwargs):
        saves.append(obj["step"])
        if len(saves) == 1:
            return real_save(obj, file, *args, **kwargs)
        with open(out / "metrics.jsonl", "a") as metrics:
            metrics.write('{"event": "step", "step": 7, "ep')  # an append the full disk cut short
        file.write(b"PK\x03\x04 half a zip")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:  # how torch.save really reports it
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr("glassgpt.checkpoint.torch.save", filling)
    with pytest.raises(NoSpaceLeft) as error:
        Trainer(config.replace(out=str(out))).fit()
    assert str(error.value) == (f"no space left on {out}: the checkpoint of step 3 is intact in "
                                f"{out / 'last'}; free some space, then --resume {out} continues from it")
    assert not [p for p in out.rglob(".*")]  # no temporary left to hold the space
    # still full: the command line resumes past the torn record and stops again, in one line
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"{out / 'metrics.jsonl'}: dropped its last record (line" in captured.out
    assert captured.err == f"glassgpt: error: {error.value}\n"
    assert saves == [3, 6, 6]

    monkeypatch.undo()  # space is back
    resumed = Trainer(config.replace(out=str(out)), resume=True)
    assert "dropped its last record" in capsys.readouterr().out
    assert resumed.step == 3
    records = resumed.fit()
    assert step_losses(records) == step_losses(straight)  # bit for bit
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert step_losses(logged) == step_losses(straight)


def test_a_damaged_last_checkpoint_resumes_exactly_from_best(tmp_path, capsys):
    config = tiny(out=str(tmp_path / "straight"))
    straight = Trainer(config).fit()
    cut = config.replace(out=str(tmp_path / "cut"))
    Trainer(cut).fit(until_step=5)  # one checkpoint, step 3: last/ and its copy best/
    flip_a_byte(tmp_path / "cut" / "last" / "trainer.pt")
    capsys.readouterr()
    resumed = Trainer(cut, resume=True)
    said = capsys.readouterr().out
    assert f"{tmp_path / 'cut' / 'last' / 'trainer.pt'} is corrupt: its sha256 differs" in said
    assert f"resuming from {tmp_path / 'cut' / 'best'} instead" in said
    assert step_losses(resumed.fit()) == step_losses(straight)
    # the top level is its own copy: damaging it leaves best/ whole
    flip_a_byte(tmp_path / "cut" / "model.safetensors")
    load_model(tmp_path / "cut" / "best")


def test_a_character_model_samples_from_its_corpus_when_the_prompt_does_not_fit(tmp_path, capsys):
    """The default prompt needs an 'E' that TEXT lacks: it used to stop the run before it began."""
    records = Trainer(tiny(sample_prompt=DEFAULT_SAMPLE_PROMPT, max_steps=3)).fit()
    prompt = TEXT[:16]  # the corpus's own first characters, as many as the prompt's 22 that fit in context
    assert [r["sample"][:len(prompt)] for r in records if r["event"] == "eval"] == [prompt]
    said = capsys.readouterr().out
    assert "the corpus has no 'E', which the sample prompt 'Every effort moves you' needs" in said
    # another prompt keeps the characters it can encode
    trainer = Trainer(tiny(sample_prompt="All: Zebra", max_steps=1))
    assert trainer.tokenizer.decode(trainer.prompt_ids) == "All: era"
    assert "warning: the corpus has no 'Z', 'b'" in capsys.readouterr().out
