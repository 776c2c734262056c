"""`glassgpt train --init-from MODEL`: training continues a trained model, checked against transformers.

A random GPT-2 saved by transformers is trained for one step at a learning rate of 1e-12: the model
the run writes must give transformers' logits for that GPT-2 (so training really started from its
weights, architecture and tokenizer). Bad starting points fail before anything is written.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from glassgpt import hub
from glassgpt.cli import main
from glassgpt.config import GPTConfig
from glassgpt.data import prepare
from glassgpt.model import GPT
from glassgpt.tokenizer import get_tokenizer
from glassgpt.train import RECIPES, TrainConfig, Trainer, recipe
from glassgpt.weights import load_model, save_model

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n"
        ) * 4
GPT2_VOCAB = 50257  # the model must fit GPT-2's tokenizer, which a Hugging Face directory comes with
FAST = ["--batch-size", "1", "--max-steps", "1", "--lr", "1e-12", "--no-progress", "--device", "cpu",
        "--eval-batches", "1", "--sample-tokens", "2"]


def random_gpt2(tied: bool = True, n_positions: int = 64, seed: int = 0) -> GPT2LMHeadModel:
    """A small random GPT-2 (GPT-2's vocabulary) whose biases and norms are not at their defaults."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=n_positions, n_embd=32, n_head=2, n_layer=2,
                        tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(4.0)
            else:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def saved_gpt2(directory, **kwargs) -> GPT2LMHeadModel:
    model = random_gpt2(**kwargs)
    model.save_pretrained(directory)
    return model


def hf_logits(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def random_ids(n: int, vocab: int = GPT2_VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def tree(directory) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: a snapshot to show nothing was written."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- starting from a model


@pytest.mark.parametrize("tied", [True, False])
def test_one_step_at_lr_1e_12_from_a_hf_directory_keeps_its_logits(tmp_path, tied):
    hf = saved_gpt2(tmp_path / "hf", tied=tied)
    out = tmp_path / "out"
    assert main(["train", "--init-from", str(tmp_path / "hf"), "--corpus", "bundled:the-verdict.txt",
                 "--out", str(out), *FAST]) == 0

    ours, tokenizer = load_model(out)
    assert tokenizer.name == "gpt2"  # the model's own tokenizer, with no --tokenizer given
    assert (ours.config.tie_weights, ours.config.context_length, ours.config.qkv_bias) == (tied, 64, True)
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = random_ids(64)
    assert (our_logits(ours, ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "step"] == [1]  # a step did run
    # Where the run started is recorded with the model and in its settings.
    training = json.loads((out / "glassgpt.json").read_text())["training"]
    assert training["init_from"] == str(tmp_path / "hf")
    assert str(tmp_path / "hf") in training["init_from_source"]
    assert json.loads((out / "train_config.json").read_text())["init_from"] == str(tmp_path / "hf")


def test_a_shorter_context_keeps_the_first_positions(tmp_path):
    hf = saved_gpt2(tmp_path / "hf")
    out = tmp_path / "out"
    assert main(["train", "--init-from", str(tmp_path / "hf"), "--text", TEXT, "--context-length", "16",
                 "--val-fraction", "0", "--out", str(out), *FAST]) == 0
    ours, _ = load_model(out)
    assert ours.config.context_length == 16 and ours.pos_emb.weight.shape == (16, 32)
    ids = random_ids(16, seed=2)
    assert (our_logits(ours, ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_a_glassgpt_run_continues_with_its_own_architecture_and_char_tokenizer(tmp_path):
    """No Q/K/V or attention-output bias, a char vocabulary: everything comes from the run's directory."""
    first = TrainConfig(text=TEXT, tokenizer="char", model="nano", context_length=16, n_layers=2, n_heads=2,
                        emb_dim=32, stride=8, val_fraction=0.0, batch_size=4, max_steps=3, lr=3e-3,
                        sample_prompt="All:", sample_tokens=2, progress=False,
                        out=str(tmp_path / "first"))
    Trainer(first).fit()
    before, char = load_model(tmp_path / "first")
    second = TrainConfig(text=TEXT, init_from=str(tmp_path / "first"), stride=8, val_fraction=0.0,
                         batch_size=4, max_steps=1, lr=1e-12, sample_prompt="All:", sample_tokens=2,
                         progress=False, out=str(tmp_path / "second"))
    trainer = Trainer(second)
    assert trainer.tokenizer.to_dict() == char.to_dict()  # not a new char table built from the text
    trainer.fit()
    after, tokenizer = load_model(tmp_path / "second")
    assert after.config == before.config and not after.config.qkv_bias and not after.config.attn_out_bias
    assert tokenizer.to_dict() == char.to_dict()
    ids = torch.tensor([char.encode("All:\nSpeak, speak")[:16]])
    assert (our_logits(after, ids) - our_logits(before, ids)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="character 'Z' is not in"):  # text the model has no ids for
        Trainer(second.replace(text=TEXT + "Zebra", out=None))


def test_resuming_a_run_that_began_from_a_model_is_exact_and_does_not_read_it_again(tmp_path):
    saved_gpt2(tmp_path / "hf")
    config = TrainConfig(init_from=str(tmp_path / "hf"), corpus=["bundled:the-verdict.txt"],
                         context_length=32, drop_rate=0.1, stride=32, batch_size=2, grad_accum=2,
                         max_steps=6, lr=1e-3, schedule="cosine", warmup_steps=2, eval_every=3,
                         eval_batches=1, sample_tokens=4, progress=False, device="cpu",
                         out=str(tmp_path / "straight"))
    straight = Trainer(config).fit()
    cut = config.replace(out=str(tmp_path / "cut"))
    Trainer(cut).fit(until_step=5)  # checkpoint at step 3; steps 4-5 are lost as in a kill
    shutil.rmtree(tmp_path / "hf")  # the starting model is gone: the run must resume from its own files
    resumed = Trainer(cut, resume=True)
    assert resumed.step == 3 and resumed.model.config.drop_rate == 0.1
    records = resumed.fit()

    def steps(rs):
        return [(r["step"], r["train_loss"]) for r in rs if r["event"] == "step"]

    assert steps(records) == steps(straight)  # bit for bit
    a, _ = load_model(tmp_path / "straight" / "last")
    b, _ = load_model(tmp_path / "cut" / "last")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    training = json.loads((tmp_path / "cut" / "glassgpt.json").read_text())["training"]
    assert training["step"] == 6 and training["init_from"] == str(tmp_path / "hf")
    assert str(tmp_path / "hf") in training["init_from_source"]  # kept through the resume


# ---------------------------------------------------------------- bad starts


@pytest.fixture
def gpt2_dir(tmp_path):
    saved_gpt2(tmp_path / "hf")
    return str(tmp_path / "hf")


@pytest.mark.parametrize("arguments, message", [
    (["--init-from", "{tmp}/nothing"], "no such directory, and not a GPT-2 name"),
    (["--init-from", "{tmp}/empty"], "holds no model"),
    (["--init-from", "nano"], "that is a preset"),
    (["--init-from", "gpt2-xl"], "Run `glassgpt download gpt2-xl`"),
    (["--init-from", "{hf}", "--tokenizer", "char"], "--tokenizer char does not match"),
    (["--init-from", "{hf}", "--context-length", "128"], "context_length 128 exceeds the 64"),
    (["--init-from", "{hf}", "--n-layers", "3"], "--n-layers cannot change it"),
    (["--init-from", "{small}"], "has 50,257 ids, but the model has embeddings for 120"),
    (["--init-from", "{classifier}"], "is a classifier (2 classes), not a language model"),
])
def test_a_bad_start_is_refused_before_anything_is_written(tmp_path, gpt2_dir, monkeypatch, capsys,
                                                           arguments, message):
    monkeypatch.setattr(hub, "find_gpt2", lambda name: None)  # no GPT-2 on this machine
    (tmp_path / "empty").mkdir()
    small = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=32, n_embd=16, n_head=2, n_layer=1))
    small.save_pretrained(tmp_path / "small")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a directory that holds something already
    classifier = GPTConfig(vocab_size=GPT2_VOCAB, context_length=16, emb_dim=16, n_heads=2, n_layers=1,
                           n_classes=2, tie_weights=False)
    save_model(GPT(classifier), tmp_path / "classifier", get_tokenizer("gpt2"))
    places = dict(tmp=tmp_path, hf=gpt2_dir, small=tmp_path / "small", classifier=tmp_path / "classifier")
    arguments = [a.format(**places) for a in arguments]
    assert main(["train", *arguments, "--text", TEXT, "--out", str(out), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert tree(out) == {"notes.txt": b"mine"}


def test_a_prepared_corpus_must_use_the_models_tokenizer(tmp_path, gpt2_dir, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    for name in ("char", "gpt2"):
        prepare([str(tmp_path / "text.txt")], tmp_path / name, tokenizer_name=name)
    out = tmp_path / "out"
    assert main(["train", "--init-from", gpt2_dir, "--corpus", str(tmp_path / "char"), "--out", str(out),
                 *FAST]) == 2
    assert "the prepared corpus is tokenized with char" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", "--init-from", gpt2_dir, "--corpus", str(tmp_path / "gpt2"), "--out", str(out),
                 *FAST]) == 0


def test_a_good_run_survives_bad_resumes(tmp_path, gpt2_dir, capsys):
    out = tmp_path / "out"
    assert main(["train", "--init-from", gpt2_dir, "--text", TEXT, "--out", str(out), *FAST]) == 0
    before = tree(out)
    for arguments, message in [
        (["--tokenizer", "char"], "--tokenizer char does not match"),
        (["--context-length", "128"], "context_length 128 exceeds the 64"),
        (["--init-from", str(tmp_path / "other")], "init_from cannot change"),
    ]:
        assert main(["train", "--resume", str(out), *arguments]) == 2
        assert message in capsys.readouterr().err
        assert tree(out) == before
    assert main(["train", "--init-from", gpt2_dir, "--text", TEXT, "--out", str(out), *FAST]) == 2
    assert "already holds a training checkpoint" in capsys.readouterr().err
    assert tree(out) == before


# ---------------------------------------------------------------- the recipe


def test_verdict_finetune_continues_gpt2_on_the_verdict(tmp_path, monkeypatch, capsys):
    settings = recipe("verdict-finetune")
    assert (settings.init_from, settings.tokenizer, settings.context_length) == ("gpt2", "gpt2", 256)
    assert settings.corpus == ["bundled:the-verdict.txt"] and settings.lr == 5e-5 and settings.epochs == 3
    assert RECIPES["verdict-finetune"]["init_from"] == "gpt2"

    out = tmp_path / "out"
    monkeypatch.setattr(hub, "find_gpt2", lambda name: None)  # GPT-2 is not on this machine
    assert main(["train", "--recipe", "verdict-finetune", "--out", str(out)]) == 2
    assert "gpt2 is not on this machine. Run `glassgpt download gpt2`" in capsys.readouterr().err
    assert not out.exists()

    # With "gpt2" found (a small random stand-in with GPT-2's vocabulary and context of 1,024), the
    # recipe runs and keeps the stand-in's weights at the recipe's 256 positions.
    hf = saved_gpt2(tmp_path / "gpt2", n_positions=1024)
    monkeypatch.setattr(hub, "find_gpt2", lambda name: tmp_path / "gpt2")
    assert main(["train", "--recipe", "verdict-finetune", "--out", str(out), "--max-steps", "1",
                 "--lr", "1e-12", "--no-progress", "--sample-tokens", "2"]) == 0
    ours, _ = load_model(out)
    assert ours.config.context_length == 256
    ids = random_ids(256, seed=3)
    assert (our_logits(ours, ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- LoRA in train

LORA_TARGETS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out_proj", "mlp.c_fc": "ff.expand",
                "mlp.c_proj": "ff.contract"}  # peft's module names on GPT2LMHeadModel -> ours


def peft_with_our_adapters(hf: GPT2LMHeadModel, adapters_path, rank: int, alpha: float):
    """transformers' GPT-2 with peft's LoRA holding the A and B matrices of our adapter file."""
    peft = pytest.importorskip("peft")  # the test-only peer (the dev extra)
    from safetensors.torch import load_file

    ours = load_file(str(adapters_path))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, fan_in_fan_out=True,
                             target_modules=["c_attn", "c_proj", "c_fc"])
    theirs = peft.get_peft_model(hf, config).eval()
    copied = 0
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if hasattr(module, "lora_A") and ".h." in name:
                block, part = name.split(".h.")[1].split(".", 1)
                mine = f"blocks.{block}.{LORA_TARGETS[part]}"
                module.lora_A["default"].weight.copy_(ours[f"{mine}.A"])
                module.lora_B["default"].weight.copy_(ours[f"{mine}.B"])
                copied += 1
    assert copied == 2 * 4  # 2 blocks x 4 targets
    return theirs


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_lora_trains_adapters_only_and_saves_the_merged_model(tmp_path, gpt2_dir, capsys):
    hf = random_gpt2()  # the same weights as in gpt2_dir
    out = tmp_path / "out"
    assert main(["train", "--init-from", gpt2_dir, "--text", TEXT, "--out", str(out), "--lora-rank", "4",
                 "--lora-alpha", "8", "--save-adapters", "--batch-size", "2", "--max-steps", "3",
                 "--lr", "1e-2", "--no-progress", "--device", "cpu", "--sample-tokens", "2"]) == 0
    meta = json.loads((out / "glassgpt.json").read_text())["training"]
    theirs = peft_with_our_adapters(random_gpt2(), out / "adapters.safetensors", rank=4, alpha=8)
    assert meta["trainable_parameters"] == theirs.get_nb_trainable_parameters()[0] == 2 * 4 * (
        (32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))  # r x (in + out), four layers, two blocks
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["qkv", "out_proj", "expand", "contract"]}
    assert f"trainable_parameters {meta['trainable_parameters']:,}" in capsys.readouterr().out

    merged, _ = load_model(out)  # an ordinary model: what generate, serve and export load
    assert not any("lora" in type(m).__name__.lower() for m in merged.modules())
    ids = random_ids(32, seed=4)
    with torch.no_grad():
        adapted = theirs(input_ids=ids).logits
    assert (our_logits(merged, ids) - adapted).abs().max().item() <= 1e-4
    assert (adapted - hf_logits(hf, ids)).abs().max().item() > 1e-2  # the adapters did learn something
    # Everything but the adapters stayed frozen: embeddings, norms and biases are the original ones.
    original, _ = load_model(gpt2_dir)
    frozen = ["tok_emb.weight", "pos_emb.weight", "final_norm.scale", "blocks.1.norm2.shift",
              "blocks.0.attn.qkv.bias", "blocks.1.ff.contract.bias"]
    for name in frozen:
        assert torch.equal(merged.state_dict()[name], original.state_dict()[name]), name
    for directory in (out, out / "best", out / "last"):
        assert (directory / "adapters.safetensors").is_file()

    # A base model plus these adapters is a starting point: it starts from the merged weights.
    again = tmp_path / "again"
    assert main(["train", "--init-from", gpt2_dir, "--adapters", str(out / "adapters.safetensors"),
                 "--text", TEXT, "--out", str(again), *FAST]) == 0
    continued, _ = load_model(again)
    assert (our_logits(continued, ids) - our_logits(merged, ids)).abs().max().item() <= 1e-5
    assert "+ adapters" in json.loads((again / "glassgpt.json").read_text())["training"]["init_from_source"]


def test_resuming_a_lora_run_is_exact(tmp_path, gpt2_dir):
    config = TrainConfig(init_from=gpt2_dir, text=TEXT, context_length=16, drop_rate=0.1, stride=8,
                         batch_size=2, grad_accum=2, max_steps=6, lr=1e-2, schedule="cosine", warmup_steps=2,
                         eval_every=3, eval_batches=1, sample_tokens=4, progress=False, device="cpu",
                         lora_rank=2, save_adapters=True, out=str(tmp_path / "straight"))
    straight = Trainer(config).fit()
    cut = config.replace(out=str(tmp_path / "cut"))
    Trainer(cut).fit(until_step=5)
    resumed = Trainer(cut, resume=True)
    assert resumed.step == 3
    records = resumed.fit()

    def steps(rs):
        return [(r["step"], r["train_loss"]) for r in rs if r["event"] == "step"]

    assert steps(records) == steps(straight) and len(steps(straight)) == 6  # bit for bit
    for name in ("last/model.safetensors", "last/adapters.safetensors"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


@pytest.mark.parametrize("arguments, message", [
    (["--lora-rank", "0"], "LoRA rank must be a positive integer"),
    (["--lora-rank", "33"], "LoRA rank 33 is larger than the layer"),
    (["--lora-alpha", "8"], "--lora-alpha needs --lora-rank"),
    (["--save-adapters"], "--save-adapters needs --lora-rank"),
    (["--adapters", "{tmp}/a.safetensors"], "give --init-from BASE too"),
    (["--init-from", "{hf}", "--adapters", "{tmp}/a.safetensors"], "no adapter file"),
])
def test_bad_lora_settings_are_refused_before_anything_is_written(tmp_path, gpt2_dir, capsys, arguments,
                                                                  message):
    out = tmp_path / "out"
    arguments = [a.format(tmp=tmp_path, hf=gpt2_dir) for a in arguments]
    if "--init-from" not in arguments:
        arguments += ["--tokenizer", "char", "--model", "nano", "--n-layers", "1", "--emb-dim", "32",
                      "--n-heads", "2", "--context-length", "16", "--sample-prompt", "All:"]
    assert main(["train", *arguments, "--text", TEXT, "--out", str(out), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_adapters_for_another_model_and_a_changed_rank_on_resume_are_refused(tmp_path, gpt2_dir, capsys):
    out = tmp_path / "out"
    assert main(["train", "--init-from", gpt2_dir, "--text", TEXT, "--out", str(out), "--lora-rank", "2",
                 "--save-adapters", *FAST]) == 0
    before = tree(out)
    assert main(["train", "--resume", str(out), "--lora-rank", "4"]) == 2
    assert "lora_rank cannot change" in capsys.readouterr().err
    assert tree(out) == before
    other = tmp_path / "other"
    GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, n_positions=64, n_embd=16, n_head=2, n_layer=2)
                    ).save_pretrained(other)
    assert main(["train", "--init-from", str(other), "--adapters", str(out / "adapters.safetensors"),
                 "--text", TEXT, "--out", str(tmp_path / "new"), *FAST]) == 2
    assert "do not fit this model" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
