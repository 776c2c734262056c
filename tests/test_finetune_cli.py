"""The fine-tuning verbs through `glassgpt.cli.main`: finetune classify/instruct (flags, recipes, bad
input), classify, generate --instruction, eval and export of a classifier. Tiny models only."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from glassgpt.bpe import BPETokenizer
from glassgpt.classify import class_logits, set_trainable, to_classifier
from glassgpt.classify_data import collate, encode_texts
from glassgpt.cli import main
from glassgpt.config import GPTConfig
from glassgpt.instruct import InstructionTemplate, load_instructions, respond, split_instructions
from glassgpt.model import GPT
from glassgpt.tokenizer import CharTokenizer, get_tokenizer
from glassgpt.weights import load_model, save_model


@pytest.fixture
def one_thread():
    """A tiny model's steps run fastest on one thread (and far faster than on two busy ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_z_data(path, n=40):
    """Label "yes" when the text holds a "z": a task a tiny char model can learn."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        chars = list(rng.choice(list("abcd"), size=int(rng.integers(3, 9))))
        if i % 2 == 0:
            chars[int(rng.integers(len(chars)))] = "z"
        lines.append(f"{'yes' if i % 2 == 0 else 'no'}\t{''.join(chars)}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def char_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("char")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=5, context_length=16, emb_dim=16, n_heads=2, n_layers=2, tie_weights=False)
    save_model(GPT(config), root / "base", CharTokenizer("abcdz"))
    write_z_data(root / "data.tsv")
    return root


# ---------------------------------------------------------------- finetune classify


def test_finetune_classify_maps_every_flag_to_its_setting(char_base, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "finetune", "classify", "--model", char_base / "base", "--data",
                          char_base / "data.tsv", "--out", out, "--labels", "yes,no", "--train-layers", "all",
                          "--split", "80/10/10", "--max-steps", "2", "--lr", "1e-3", "--batch-size", "4",
                          "--weight-decay", "0", "--seed", "7", "--precision", "fp32", "--device", "cpu",
                          "--max-length", "12", "--epochs", "3", "--eval-batches", "1")
    assert code == 0, stdout
    assert f"classifier in {out}" in stdout
    results = json.loads((out / "results.json").read_text())
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "classes", "trainable_parameters",
                "examples"):
        assert key in results
    assert results["classes"] == ["yes", "no"]  # --labels fixes the head's order
    assert results["examples"] == {"train": 32, "val": 4, "test": 4}
    assert results["steps"] == 2 and results["max_length"] == 12
    settings = results["settings"]
    assert (settings["lr"], settings["batch_size"]) == (1e-3, 4)
    assert (settings["weight_decay"], settings["seed"]) == (0, 7)
    assert (settings["epochs"], settings["max_steps"], settings["train_layers"]) == (3, 2, "all")
    assert settings["split"] == pytest.approx([0.8, 0.1, 0.1]) and settings["balance"] is False
    model, _ = load_model(out)
    assert results["trainable_parameters"] == model.num_parameters()  # --train-layers all
    for name in ("model.safetensors", "glassgpt.json", "metrics.jsonl", "loss.png", "accuracy.png"):
        assert (out / name).is_file(), name


def test_the_spam_recipe_is_the_tutorials_run_and_flags_override_it(tmp_path, capsys, one_thread):
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=2))
    save_model(base, tmp_path / "base", get_tokenizer("gpt2"))
    out = tmp_path / "spam"
    code, stdout, _ = run(capsys, "finetune", "classify", "--recipe", "spam", "--model", tmp_path / "base",
                          "--out", out, "--max-steps", "2", "--lr", "1e-4", "--device", "cpu")
    assert code == 0, stdout
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == "bundled:sms-spam-collection.tsv"  # the recipe's data
    assert results["class_counts"]["balanced"] == {"ham": 747, "spam": 747}
    assert results["examples"] == {"train": 1045, "val": 149, "test": 300}  # the tutorial's 70/10/20
    settings = results["settings"]
    assert settings["balance"] and settings["split"] == pytest.approx([0.7, 0.1, 0.2])
    assert (settings["train_layers"], settings["epochs"], settings["batch_size"]) == ("last", 5, 8)
    assert (settings["lr"], settings["weight_decay"]) == (1e-4, 0.1)  # --lr overrides the recipe's 5e-5
    with torch.device("meta"):
        expected = set_trainable(to_classifier(GPT(base.config), 2), "last")
    assert results["trainable_parameters"] == expected  # last block + final norm + head
    assert results["truncated"] > 0  # texts longer than the 32-token context are cut and counted

    # The classifier exports to transformers' GPT2ForSequenceClassification with the same logits.
    transformers = pytest.importorskip("transformers")
    code, stdout, _ = run(capsys, "export", out, "--to-hf", tmp_path / "hf")
    assert code == 0 and "GPT2ForSequenceClassification" in stdout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_labels"] == 2 and config["id2label"] == {"0": "ham", "1": "spam"}
    assert config["pad_token_id"] == 50256
    theirs = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    ours, tokenizer = load_model(out)
    texts = ["WINNER!! Claim your prize now, call 09061701461", "Ok lar... Joking wif u oni...", "Hi",
             "Are you coming to the party tonight? Bring some snacks and drinks"]
    ids, _ = encode_texts(texts, tokenizer, 32)
    batch, _, lengths = collate([(row, 0) for row in ids], tokenizer.eos_id)
    mask = (torch.arange(batch.shape[1]) < lengths[:, None]).long()
    with torch.no_grad():
        expected_logits = theirs(input_ids=batch, attention_mask=mask).logits
        our_logits = class_logits(ours.eval(), batch, lengths)
    assert our_logits.abs().max() > 0.05  # not a trivial agreement of zeros
    torch.testing.assert_close(our_logits, expected_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    (dict(labels="no,maybe"), "label 'yes' is not one of the given labels"),
    (dict(data="one.tsv"), "classification needs at least two classes"),
    (dict(data="empty.tsv"), "holds no examples"),
    (dict(data="bad.tsv"), "bad.tsv line 3: expected label<TAB>text"),
    (dict(model="nowhere"), "no model at"),
    (dict(lora_rank="0"), "lora_rank must be at least 1"),
    (dict(out=None), "--out DIR"),
    (dict(model=None), "--model MODEL"),
    (dict(data=None), "--data FILE"),
    (dict(train_layers="first"), "train_layers must be last, all or a number"),
])
def test_bad_input_is_refused_before_training_and_keeps_the_earlier_output(char_base, tmp_path, capsys,
                                                                          change, message):
    (tmp_path / "one.tsv").write_text("yes\tabz\nyes\tzz\n")
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "bad.tsv").write_text("yes\tabz\nno\tabc\nno abc\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')  # a previous run's output
    arguments = dict(model=str(char_base / "base"), data=str(char_base / "data.tsv"), out=str(out),
                     max_steps="1", device="cpu")
    for key, value in change.items():
        arguments[key] = str(tmp_path / value) if key in ("data", "model") and value else value
    argv = ["finetune", "classify"]
    for key, value in arguments.items():
        if value is not None:
            argv += ["--" + key.replace("_", "-"), value]
    code, stdout, stderr = run(capsys, *argv)
    assert code == 2
    assert stderr.startswith("glassgpt: error: ") and message in stderr, stderr
    assert "step" not in stdout
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert (out / "results.json").read_text() == '{"earlier": true}'
    assert not list(tmp_path.glob(".out*"))


def test_a_recipe_of_the_other_task_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "instruct", "--recipe", "spam", "--out", "x"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'spam'" in capsys.readouterr().err


# ---------------------------------------------------------------- classify and eval


@pytest.fixture(scope="module")
def last_z(tmp_path_factory):
    """A classifier built by hand: "yes" exactly when a text's last character is "z".

    Every block's parameters are zero, so each block adds nothing to the residual stream, and the
    position embeddings are zero: the final norm sees the last character's embedding alone.
    """
    root = tmp_path_factory.mktemp("lastz")
    config = GPTConfig(vocab_size=5, context_length=16, emb_dim=4, n_heads=2, n_layers=1, tie_weights=False)
    model = to_classifier(GPT(config), 2, ["no", "yes"])
    with torch.no_grad():
        for parameter in model.blocks.parameters():
            parameter.zero_()
        model.pos_emb.weight.zero_()
        model.tok_emb.weight.copy_(torch.tensor([[-1.0, 1, 0, 0]] * 4 + [[1.0, -1, 0.5, 0]]))  # a b c d z
        model.out_head.weight.copy_(torch.tensor([[-0.5, 0.5, 0, 0.25], [1.0, -1, 0, 0]]))
    save_model(model, root / "model", CharTokenizer("abcdz"))
    return root


def by_hand(text: str) -> dict[str, float]:
    """The last-z classifier's probabilities, computed with numpy from its weights' definition."""
    x = np.array([1.0, -1, 0.5, 0]) if text[-1] == "z" else np.array([-1.0, 1, 0, 0])
    normed = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
    logits = np.array([[-0.5, 0.5, 0, 0.25], [1.0, -1, 0, 0]]) @ normed
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return {"no": p[0], "yes": p[1]}


def test_classify_prints_labels_and_probabilities(last_z, capsys):
    texts = ["abz", "zab", "dz", "cccc"]
    code, stdout, _ = run(capsys, "classify", *texts, "--model", last_z / "model", "--json")
    assert code == 0
    results = json.loads(stdout)
    assert [r["text"] for r in results] == texts
    assert [r["label"] for r in results] == ["yes", "no", "yes", "no"]
    for result in results:
        expected = by_hand(result["text"])
        assert result["probabilities"] == pytest.approx(expected, abs=1e-5)
        assert list(result["probabilities"]) == ["no", "yes"]
    code, stdout, _ = run(capsys, "classify", "abz", "cccc", "--model", last_z / "model")
    lines = stdout.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("yes\t") and lines[0].endswith("\tabz")
    assert f"yes {by_hand('abz')['yes']:.3f}" in lines[0] and lines[1].startswith("no\t")


def test_classify_refuses_a_language_model(char_base, capsys):
    for model in (char_base / "base", "verdict-162m"):
        code, _, stderr = run(capsys, "classify", "hello", "--model", model)
        assert code == 2 and "language model, not a classifier" in stderr, stderr


LABELLED = [("yes", "abz"), ("yes", "z"), ("yes", "zab"), ("no", "abc"), ("no", "dz"), ("no", "cd"),
            ("no", "zzd")]


def test_eval_of_a_classifier_is_its_accuracy_and_confusion_counted_by_hand(last_z, tmp_path, capsys):
    data = tmp_path / "labelled.tsv"
    data.write_text("".join(f"{label}\t{text}\n" for label, text in LABELLED))
    code, stdout, _ = run(capsys, "eval", "--model", last_z / "model", "--data", data, "--json",
                          "--device", "cpu", "--batch-size", "3")
    assert code == 0
    result = json.loads(stdout)
    # By hand: yes-abz, yes-z right; yes-zab called no; no-abc, no-cd, no-zzd right; no-dz called yes.
    assert result["classes"] == ["no", "yes"] and result["examples"] == 7
    assert result["confusion"] == [[3, 1], [1, 2]]  # rows: true class, columns: predicted
    assert result["accuracy"] == pytest.approx(5 / 7)
    code, stdout, _ = run(capsys, "eval", "--model", last_z / "model", "--data", data, "--device", "cpu")
    assert code == 0 and "accuracy  71.43% (5 of 7)" in stdout
    assert stdout.splitlines()[-1].split() == ["yes", "1", "2"]

    # A file may hold only some of the classes (its other rows are zeros) -- never a label the model lacks.
    data.write_text("yes\taz\nyes\tab\n")
    code, stdout, _ = run(capsys, "eval", "--model", last_z / "model", "--data", data, "--json")
    assert code == 0 and json.loads(stdout)["confusion"] == [[0, 0], [1, 1]]
    data.write_text("yes\taz\nmaybe\tab\n")
    code, _, stderr = run(capsys, "eval", "--model", last_z / "model", "--data", data)
    assert code == 2 and "label 'maybe' is not one of the given labels (no, yes)" in stderr


def test_eval_of_a_classifier_needs_a_labelled_file(last_z, capsys):
    code, _, stderr = run(capsys, "eval", "--model", last_z / "model")
    assert code == 2 and "is a classifier (no, yes): evaluate it on a labelled file, --data FILE" in stderr


def test_generate_refuses_a_classifier(last_z, capsys):
    code, _, stderr = run(capsys, "generate", "abc", "--model", last_z / "model")
    assert code == 2 and "is a classifier" in stderr


# ---------------------------------------------------------------- finetune instruct, generate --instruction


@pytest.fixture(scope="module")
def instruct_run(tmp_path_factory):
    """A small model fine-tuned through the command line until it knows its training examples by heart.

    A 2-block, 64-wide model over a 400-token byte-level BPE learned from the examples (with GPT-2's
    end-of-text token), so a step costs milliseconds.
    """
    root = tmp_path_factory.mktemp("instruct")
    examples = [e for e in load_instructions("bundled:instruction-data.json") if len(e["output"]) < 60][:10]
    (root / "data.json").write_text(json.dumps(examples))
    template = InstructionTemplate()
    tokenizer = BPETokenizer().train("".join(template.format_example(e) for e in examples), 400)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=96, emb_dim=64, n_heads=4, n_layers=2)
    save_model(GPT(config), root / "base", tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["finetune", "instruct", "--model", str(root / "base"), "--data", str(root / "data.json"),
                     "--out", str(root / "run"), "--mask-prompt", "--lr", "3e-3", "--max-steps", "80",
                     "--batch-size", "8", "--weight-decay", "0", "--eval-every", "40", "--eval-batches", "1",
                     "--max-new-tokens", "40", "--device", "cpu", "--threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return root, examples


def test_finetune_instruct_writes_its_results_with_the_flags_settings(instruct_run):
    root, examples = instruct_run
    out = root / "run"
    results = json.loads((out / "results.json").read_text())
    assert results["examples"] == {"train": 8, "val": 1, "test": 1}  # 85/5/10 of 10
    assert results["steps"] == 80 and results["train_loss"] < 0.1
    settings = results["settings"]
    assert settings["mask_prompt"] and (settings["lr"], settings["batch_size"], settings["weight_decay"]) == (
        3e-3, 8, 0.0)
    rows = [json.loads(line) for line in (out / "test_responses.jsonl").read_text().splitlines()]
    test = split_instructions(examples, seed=123).test  # the split is seeded with --seed (default 123)
    assert [(r["instruction"], r["input"], r["expected"]) for r in rows] == [
        (e["instruction"], e["input"], e["output"]) for e in test]
    for name in ("model.safetensors", "glassgpt.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name


def test_generate_instruction_answers_with_exactly_the_learned_response(instruct_run, capsys, one_thread):
    root, examples = instruct_run
    train = split_instructions(examples, seed=123).train
    assert any(e["input"] for e in train)
    for example in train:
        argv = ["generate", "--model", root / "run", "--instruction", example["instruction"],
                "--max-tokens", "60"]
        if example["input"]:
            argv += ["--input", example["input"]]
        code, stdout, stderr = run(capsys, *argv)
        # Only the response, stopped at the end-of-text token (60 tokens would run well past it).
        assert code == 0 and stdout == example["output"] + "\n", (stdout, stderr)
        assert "warning" not in stderr
    code, stdout, _ = run(capsys, *argv, "--stream")
    assert code == 0 and stdout == train[-1]["output"] + "\n"


def test_generate_instruction_without_a_saved_template_warns_and_uses_alpaca(instruct_run, capsys,
                                                                            one_thread):
    root, examples = instruct_run
    code, stdout, stderr = run(capsys, "generate", "--model", root / "base", "--instruction",
                               examples[0]["instruction"], "--max-tokens", "8")
    assert code == 0 and "has no saved instruction template" in stderr and "Alpaca" in stderr
    model, tokenizer = load_model(root / "base")
    expected = respond(model, tokenizer, InstructionTemplate(), examples[0]["instruction"], max_new_tokens=8)
    assert stdout == expected + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--input", "x"], "give a prompt to continue, or --instruction"),
    (["hello", "--input", "x"], "--input goes with --instruction"),
    (["hello", "--instruction", "Say hi"], "not both"),
])
def test_generate_refuses_mixed_prompts(instruct_run, capsys, argv, message):
    root, _ = instruct_run
    code, _, stderr = run(capsys, "generate", "--model", root / "run", *argv)
    assert code == 2 and message in stderr, stderr


def test_the_instruct_recipe_is_the_tutorials_run(instruct_run, tmp_path, capsys, monkeypatch):
    """The recipe's settings, data and split reach the library (its training is stubbed out here)."""
    import glassgpt.instruct as instruct

    root, _ = instruct_run
    seen = {}

    def fake_finetune(model, tokenizer, splits, out_dir, settings=None, template=None):
        seen.update(model=model, splits=splits, out=out_dir, settings=settings)
        return {"steps": 0, "test_loss": math.nan}

    monkeypatch.setattr(instruct, "finetune_instruct", fake_finetune)
    code, stdout, _ = run(capsys, "finetune", "instruct", "--recipe", "instruct", "--model", root / "base",
                          "--out", tmp_path / "out", "--epochs", "3")
    assert code == 0, stdout
    settings = seen["settings"]
    assert (settings.lr, settings.weight_decay, settings.batch_size) == (5e-5, 0.1, 8)
    assert settings.epochs == 3  # the flag overrides the recipe's 2
    assert seen["splits"].counts() == {"train": 935, "val": 55, "test": 110}
    expected = split_instructions(load_instructions("bundled:instruction-data.json"), seed=123)
    assert seen["splits"] == expected
    assert seen["model"].config.vocab_size == 400 and str(seen["out"]) == str(tmp_path / "out")


@pytest.mark.parametrize("content, flags, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', [],
     "data.jsonl, line 2: not valid JSON"),
    ('{"instruction": "a", "input": "b"}\n', [], "data.jsonl, line 1: missing 'output'"),
    ("", [], "is empty"),
    ('{"instruction": "a", "output": "b"}\n', ["--lora-rank", "0"], "lora_rank must be at least 1"),
    ('{"instruction": "a", "output": "b"}\n', ["--model", "nowhere"], "no model at"),
    ('{"instruction": "a", "output": "b"}\n', ["--model", "CLASSIFIER"], "is a classifier"),
])
def test_finetune_instruct_refuses_bad_input_before_training(instruct_run, last_z, tmp_path, capsys,
                                                             content, flags, message):
    root, _ = instruct_run
    (tmp_path / "data.jsonl").write_text(content)
    flags = [str(last_z / "model") if flag == "CLASSIFIER" else str(tmp_path / flag) if flag == "nowhere"
             else flag for flag in flags]
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "finetune", "instruct", "--model", root / "base", "--data",
                          tmp_path / "data.jsonl", "--out", out, "--max-steps", "1", "--device", "cpu",
                          *flags)
    assert code == 2 and stderr.startswith("glassgpt: error: ") and message in stderr, stderr
    assert not out.exists()
