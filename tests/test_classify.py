"""Classification fine-tuning: data files, balance/split, last-real-token pooling, training, export."""

import json
import random
import shutil

import pytest
import torch

from glassgpt.classify import (
    ClassifySettings,
    class_logits,
    export_hf_classifier,
    finetune_classifier,
    load_classifier,
    predict,
    run_finetune_classify,
    set_trainable,
    to_classifier,
)
from glassgpt.classify_data import (
    balance,
    collate,
    encode_texts,
    load_classification_data,
    load_labelled,
    parse_split,
    split,
)
from glassgpt.config import GPTConfig, get_preset
from glassgpt.model import GPT
from glassgpt.tokenizer import CharTokenizer, get_tokenizer
from glassgpt.weights import load_model, save_model

SPAM = "bundled:sms-spam-collection.tsv"


# ---------------------------------------------------------------- reading labelled files


def test_the_bundled_spam_collection_has_the_documented_counts():
    data = load_labelled(SPAM)
    assert len(data) == 5574
    assert data.classes == ["ham", "spam"]
    assert data.class_counts() == {"ham": 4827, "spam": 747}
    assert data.texts[1] == "Ok lar... Joking wif u oni..." and data.labels[1] == 0
    assert data.lines[:3] == [1, 2, 3]


def test_tsv_csv_and_jsonl_give_the_same_examples(tmp_path):
    rows = [("spam", "Win a prize, now!"), ("ham", 'He said "hi"\tand left'), ("ham", "ok")]
    (tmp_path / "d.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in rows) + "\n")
    (tmp_path / "d.csv").write_text('id,label,text\n1,spam,"Win a prize, now!"\n'
                                    '2,ham,"He said ""hi""\tand left"\n3,ham,ok\n')
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"label": label, "text": text}) + "\n"
                                              for label, text in rows))
    loaded = [load_labelled(tmp_path / name) for name in ("d.tsv", "d.csv", "d.jsonl")]
    for data in loaded:
        assert data.classes == ["ham", "spam"]  # sorted
        assert data.texts == [text for _, text in rows]
        assert data.labels == [1, 0, 0]
    assert loaded[1].lines == [2, 3, 4]  # the CSV header is line 1


def test_labels_fix_the_class_order(tmp_path):
    (tmp_path / "d.tsv").write_text("ham\ta\nspam\tb\n")
    data = load_labelled(tmp_path / "d.tsv", labels=["spam", "ham"])
    assert data.classes == ["spam", "ham"] and data.labels == [1, 0]


def test_jsonl_integer_labels_are_read_as_text(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"label": 1, "text": "a"}\n{"label": 0, "text": "b"}\n')
    assert load_labelled(tmp_path / "d.jsonl").classes == ["0", "1"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.tsv", "", "holds no examples"),
    ("blank.tsv", "\n  \n", "holds no examples"),
    ("notab.tsv", "ham\thello\nspam hello\n", "line 2: expected label<TAB>text"),
    ("nolabel.tsv", "ham\thello\n\tbye\n", "line 2: the label is empty"),
    ("notext.tsv", "ham\thello\nspam\t  \n", "line 2: the text is empty"),
    ("one.tsv", "ham\ta\nham\tb\n", "every example has the label 'ham'"),
    ("header.csv", "category,text\nham,a\n", "line 1: the CSV header must name the columns label and text"),
    ("fields.csv", "label,text\nham,a\nspam,b,c\n", "line 3: expected 2 fields"),
    ("empty.csv", "", "holds no examples"),
    ("bad.jsonl", '{"label": "ham", "text": "a"}\n{"label": "spam", "text": \n', "line 2: not valid JSON"),
    ("keys.jsonl", '{"label": "ham", "text": "a"}\n{"label": "spam"}\n', "line 2: expected an object"),
    ("types.jsonl", '{"label": "ham", "text": "a"}\n{"label": "spam", "text": 3}\n', 'line 2: "label" must'),
    ("data.xlsx", "x", "cannot tell the format"),
])
def test_bad_files_are_refused_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_labelled(path)
    assert name in str(error.value)


def test_unknown_and_unused_labels_are_refused(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("ham\ta\nspam\tb\neggs\tc\n")
    with pytest.raises(ValueError, match=r"d.tsv line 3: label 'eggs' is not one of the given labels"):
        load_labelled(path, labels=["ham", "spam"])
    path.write_text("ham\ta\nspam\tb\n")
    with pytest.raises(ValueError, match="eggs given but never found"):
        load_labelled(path, labels=["ham", "spam", "eggs"])
    with pytest.raises(ValueError, match="at least two distinct"):
        load_labelled(path, labels=["ham", "ham"])
    with pytest.raises(FileNotFoundError):
        load_labelled(tmp_path / "missing.tsv")
    with pytest.raises(FileNotFoundError):
        load_labelled("bundled:missing.tsv")


# ---------------------------------------------------------------- balance, split, tokens


def test_balance_undersamples_every_class_to_the_smallest_seeded():
    data = load_labelled(SPAM)
    balanced = balance(data, seed=123)
    assert balanced.class_counts() == {"ham": 747, "spam": 747}
    assert balanced.texts == balance(data, seed=123).texts  # deterministic
    assert balanced.texts != balance(data, seed=7).texts
    spam = [t for t, label in zip(data.texts, data.labels, strict=True) if label == 1]
    assert [t for t, label in zip(balanced.texts, balanced.labels, strict=True) if label == 1] == spam
    assert balanced.lines == sorted(balanced.lines)  # file order kept


def test_split_counts_match_the_tutorial_and_are_deterministic():
    data = balance(load_labelled(SPAM), seed=123)
    train, val, test = split(data, (0.7, 0.1, 0.2), seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)  # the tutorial's figures
    again = split(data, (0.7, 0.1, 0.2), seed=123)
    assert [part.lines for part in again] == [train.lines, val.lines, test.lines]
    assert sorted(train.lines + val.lines + test.lines) == data.lines  # disjoint and complete
    assert split(data, (0.7, 0.1, 0.2), seed=1)[0].lines != train.lines


def test_parse_split_accepts_percentages_and_fractions():
    assert parse_split("70/10/20") == pytest.approx((0.7, 0.1, 0.2))
    assert parse_split("0.8,0.2,0") == pytest.approx((0.8, 0.2, 0.0))
    assert parse_split((0.7, 0.1, 0.2)) == pytest.approx((0.7, 0.1, 0.2))
    for bad in ("70/10", "50/10/20", "0/50/50", "a/b/c", "-10/60/50"):
        with pytest.raises(ValueError):
            parse_split(bad)


def test_encoding_truncates_and_counts_and_collate_pads_on_the_right():
    tokenizer = get_tokenizer("gpt2")
    texts = ["Hello there", "one two three four five six seven"]
    ids, truncated = encode_texts(texts, tokenizer, max_length=4)
    assert truncated == 1
    assert ids[0] == tokenizer.encode(texts[0]) and ids[1] == tokenizer.encode(texts[1])[:4]
    batch, labels, lengths = collate([(ids[0], 1), (ids[1], 0)], pad_id=tokenizer.eos_id)
    assert batch.tolist() == [ids[0] + [50256] * (4 - len(ids[0])), ids[1]]
    assert labels.tolist() == [1, 0] and lengths.tolist() == [len(ids[0]), 4]


def test_a_character_the_tokenizer_lacks_names_the_line(tmp_path):
    (tmp_path / "d.tsv").write_text("a\tab\nb\tba\nb\tabc\n")
    with pytest.raises(ValueError, match="d.tsv line 3: character 'c'"):
        load_classification_data(tmp_path / "d.tsv", CharTokenizer("ab"), 8, fractions=(1.0, 0, 0))


# ---------------------------------------------------------------- the model


def test_config_carries_classes_through_json():
    config = GPTConfig(vocab_size=10, context_length=8, emb_dim=8, n_heads=2, n_layers=1, tie_weights=False,
                       n_classes=2, labels=["ham", "spam"])
    again = GPTConfig.from_dict(json.loads(config.to_json()))
    assert again == config and again.labels == ("ham", "spam") and again.n_classes == 2
    for bad in (dict(n_classes=2), dict(n_classes=1, tie_weights=False),
                dict(n_classes=2, tie_weights=False, labels=["a"]),
                dict(n_classes=2, tie_weights=False, labels=["a", "a"])):
        with pytest.raises(ValueError):
            GPTConfig(vocab_size=10, context_length=8, emb_dim=8, n_heads=2, n_layers=1, **bad)


def small_classifier(n_classes=3, vocab_size=50257, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, context_length=32, emb_dim=32, n_heads=4, n_layers=2))
    to_classifier(model, n_classes, [f"class {i}" for i in range(n_classes)], seed=seed)
    return model.eval()


def test_to_classifier_replaces_the_head():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, context_length=16, emb_dim=16, n_heads=2, n_layers=2))
    embedding = model.tok_emb.weight.detach().clone()
    to_classifier(model, 2, ["a", "b"], seed=5)
    assert model.out_head.weight.shape == (2, 16) and model.out_head.bias is None
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    assert torch.equal(model.tok_emb.weight, embedding)
    assert model.config.n_classes == 2 and not model.config.tie_weights and model.config.labels == ("a", "b")
    # PyTorch's nn.Linear default: uniform in +-1/sqrt(in_features), reproducible from the seed alone.
    bound = 1 / 16 ** 0.5
    assert model.out_head.weight.abs().max() <= bound
    fresh = GPT(GPTConfig(vocab_size=100, context_length=16, emb_dim=16, n_heads=2, n_layers=2))
    other = to_classifier(fresh, 2, seed=5)
    assert torch.equal(other.out_head.weight, model.out_head.weight)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 2)


def test_class_logits_read_the_last_real_token_whatever_the_padding():
    model = small_classifier()
    rng = random.Random(0)
    texts = [[rng.randrange(50257) for _ in range(n)] for n in (3, 9, 1, 6)]
    alone = torch.cat([class_logits(model, torch.tensor([ids])) for ids in texts])
    assert torch.equal(alone[0], model(torch.tensor([texts[0]]))[0, -1])
    for pad_id in (50256, 0, 123):
        batch, _, lengths = collate([(ids, 0) for ids in texts], pad_id)
        padded = class_logits(model, batch, lengths)
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
        mask = (torch.arange(batch.shape[1]) < lengths[:, None]).long()
        torch.testing.assert_close(class_logits(model, batch, attention_mask=mask), padded, atol=0, rtol=0)
    # Reading position -1 of the padded batch (the tutorial's pitfall) gives other numbers.
    assert not torch.allclose(model(batch)[:, -1], alone, atol=1e-3)
    with pytest.raises(ValueError, match="right padding"):
        class_logits(model, batch, attention_mask=mask.flip(-1))
    with pytest.raises(ValueError, match="lengths"):
        class_logits(model, batch, torch.tensor([0, 1, 1, 1]))


def test_trainable_parameters_of_the_last_block_on_gpt2_small():
    with torch.device("meta"):
        model = to_classifier(GPT(get_preset("gpt2")), 2)
    d, hidden = 768, 3072
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + 2 * (2 * d)
    expected = block + 2 * d + 2 * d  # + final norm (scale, shift) + head (2 x 768, no bias)
    assert expected == 7_090_944
    assert set_trainable(model, "last") == expected
    assert set_trainable(model, 1) == expected
    assert set_trainable(model, "3") == 3 * block + 4 * d
    assert set_trainable(model, 0) == 4 * d
    assert set_trainable(model, "all") == model.num_parameters()
    assert sum(p.numel() for p in model.blocks[0].parameters() if p.requires_grad) == block
    set_trainable(model, "last")
    assert not any(p.requires_grad for p in model.blocks[10].parameters())
    assert not model.tok_emb.weight.requires_grad
    with pytest.raises(ValueError, match="from 0 to 12"):
        set_trainable(model, 13)


# ---------------------------------------------------------------- training end to end


def write_separable_data(path, n=160, seed=0):
    """Label "yes" when the text holds a "z" anywhere: the last token must attend to find it."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        chars = [rng.choice("abcd") for _ in range(rng.randint(4, 12))]
        if i % 2 == 0:
            chars[rng.randrange(len(chars))] = "z"
        lines.append(f"{'yes' if i % 2 == 0 else 'no'}\t{''.join(chars)}")
    path.write_text("\n".join(lines) + "\n")


TINY = dict(train_layers="all", lr=5e-3, epochs=6, batch_size=16, weight_decay=0.0, device="cpu",
            eval_batches=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    write_separable_data(root / "data.tsv")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=5, context_length=16, emb_dim=32, n_heads=2, n_layers=2, tie_weights=False)
    save_model(GPT(config), root / "base", CharTokenizer("abcdz"))
    results = run_finetune_classify(str(root / "base"), str(root / "data.tsv"), root / "out",
                                    ClassifySettings(**TINY), log=None)
    return root, results


def test_a_tiny_model_learns_a_separable_task(trained):
    root, results = trained
    assert (results["train_accuracy"], results["val_accuracy"], results["test_accuracy"]) == (1.0, 1.0, 1.0)
    assert results["classes"] == ["no", "yes"]
    assert results["examples"] == {"train": 112, "val": 16, "test": 32}
    assert results["truncated"] == 0
    base, _ = load_model(root / "base")
    assert results["trainable_parameters"] == base.num_parameters() - 5 * 32 + 2 * 32  # head: 2 classes
    out = root / "out"
    for name in ("model.safetensors", "glassgpt.json", "results.json", "metrics.jsonl", "loss.png",
                 "accuracy.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["test_accuracy"] == 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval"]
    assert len(steps) == results["steps"] == 6 * (112 // 16) and len(evals) == 6
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert not (root / ".out.tmp").exists()


def test_a_saved_classifier_loads_back_with_the_same_probabilities(trained):
    root, _ = trained
    model, tokenizer, info = load_classifier(root / "out")
    assert model.config.n_classes == 2 and model.config.labels == ("no", "yes")
    assert info["classes"] == ["no", "yes"] and info["max_length"] == 16
    texts = ["abzab", "abcdabcd", "dzdd", "cabd"]
    predictions = predict(model, tokenizer, texts, max_length=info["max_length"])
    assert [p["label"] for p in predictions] == ["yes", "no", "yes", "no"]
    assert predict(model, tokenizer, ["abcdz"], max_length=4)[0]["label"] == "no"  # cut before the z
    assert [p["text"] for p in predictions] == texts
    assert all(sum(p["probabilities"].values()) == pytest.approx(1.0) for p in predictions)
    again, _ = load_model(root / "out")  # the ordinary loader reads a classifier too
    for before, after in zip(predictions, predict(again, tokenizer, texts, batch_size=3, max_length=16),
                             strict=True):
        assert after["probabilities"] == pytest.approx(before["probabilities"], abs=1e-6)


def test_a_failed_run_keeps_the_earlier_output(trained, monkeypatch):
    import glassgpt.classify as classify

    root, _ = trained
    out = root / "again"
    shutil.copytree(root / "out", out)
    before = {name: (out / name).read_bytes() for name in ("model.safetensors", "results.json")}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(classify, "plot_metric", broken)  # fails after the new model is written
    with pytest.raises(OSError, match="disk full"):
        run_finetune_classify(str(root / "out"), str(root / "data.tsv"), out,
                              ClassifySettings(**{**TINY, "max_steps": 2}), log=None)
    assert {name: (out / name).read_bytes() for name in before} == before


def capture_before_merging(monkeypatch) -> dict:
    """Keep a copy of the model as it is just before fine-tuning merges its LoRA adapters."""
    import copy

    import glassgpt.finetune_common as finetune_common

    captured, merge = {}, finetune_common.merge_adapters

    def capture(model, directory, save_adapters):
        captured["model"] = copy.deepcopy(model).eval()
        merge(model, directory, save_adapters)

    monkeypatch.setattr(finetune_common, "merge_adapters", capture)
    return captured


def test_lora_trains_adapters_and_the_head_and_saves_an_ordinary_classifier(trained, monkeypatch):
    from glassgpt.lora import LoRALinear, load_adapters

    root, _ = trained
    captured = capture_before_merging(monkeypatch)
    settings = ClassifySettings(**{**TINY, "train_layers": "last", "epochs": 2}, lora_rank=2, lora_alpha=4,
                                save_adapters=True)
    results = run_finetune_classify(str(root / "base"), str(root / "data.tsv"), root / "lora", settings,
                                    log=None)
    out = root / "lora"

    # rank x (in + out) per wrapped matrix (qkv d->3d, out_proj d->d, expand d->4d, contract 4d->d) in each
    # of the 2 blocks, + the 2-class head trained whole (2 x d, no bias); d = 32.
    d, rank = 32, 2
    expected = 2 * rank * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d)) + 2 * d
    assert expected == 2112
    assert results["trainable_parameters"] == expected
    assert json.loads((out / "results.json").read_text())["trainable_parameters"] == expected

    # Before merging: adapters in every block, the base weights as loaded (frozen), B trained away from 0.
    unmerged = captured["model"]
    adapters = [m for m in unmerged.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 8 and all(m.B.abs().sum() > 0 for m in adapters)
    base, tokenizer = load_model(root / "base")
    assert torch.equal(unmerged.blocks[0].attn.qkv.base.weight, base.blocks[0].attn.qkv.weight)

    # Saved: an ordinary classifier (plain Linear layers, a plain GPT's names) with the same logits.
    saved, _ = load_model(out)
    assert not any(isinstance(m, LoRALinear) for m in saved.modules())
    assert set(saved.state_dict()) == set(GPT(saved.config).state_dict())
    texts = ["abzab", "abcdabcd", "dzdd", "cabd", "zzzz"]
    ids, _ = encode_texts(texts, tokenizer, 16)
    batch, _, lengths = collate([(row, 0) for row in ids], 0)
    with torch.no_grad():
        before = class_logits(unmerged, batch, lengths)
        torch.testing.assert_close(class_logits(saved, batch, lengths), before, atol=1e-5, rtol=1e-5)
        # The adapters file alone, loaded onto the base model with a fresh head, is the unmerged model.
        rebuilt = load_adapters(to_classifier(base, 2, ["no", "yes"]), out / "adapters.safetensors").eval()
        torch.testing.assert_close(class_logits(rebuilt, batch, lengths), before, atol=1e-5, rtol=1e-5)


def test_lora_settings_are_checked():
    with pytest.raises(ValueError, match="lora_rank must be at least 1"):
        ClassifySettings(lora_rank=0)
    with pytest.raises(ValueError, match="save_adapters needs lora_rank"):
        ClassifySettings(save_adapters=True)
    with pytest.raises(ValueError, match="train_layers does not combine with lora_rank"):
        ClassifySettings(lora_rank=2, train_layers="all")


def test_max_steps_stops_mid_epoch_in_bf16_keeping_nothing(tmp_path):
    write_separable_data(tmp_path / "data.tsv", n=60)
    tokenizer = CharTokenizer("abcdz")
    data = load_classification_data(tmp_path / "data.tsv", tokenizer, 16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=5, context_length=16, emb_dim=16, n_heads=2, n_layers=2,
                          tie_weights=False))
    to_classifier(model, 2, data.classes, seed=0)
    records = []
    settings = ClassifySettings(**{**TINY, "max_steps": 3, "precision": "bf16", "batch_size": 4})
    results = finetune_classifier(model, tokenizer, data, None, settings, log=records.append)
    assert results["steps"] == 3 and results["precision"] == "bf16"
    assert results["epochs"] == round(3 / (42 // 4), 3)
    assert all(0.0 <= results[f"{name}_accuracy"] <= 1.0 for name in ("train", "val", "test"))
    assert any("step     3" in line for line in records)  # the evaluation at the last step
    assert not any(tmp_path.glob(".*"))


def test_bad_input_fails_before_anything_is_written(tmp_path):
    write_separable_data(tmp_path / "data.tsv", n=20)
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=5, context_length=16, emb_dim=8, n_heads=2, n_layers=1)),
               tmp_path / "base", CharTokenizer("abcdz"))
    out = tmp_path / "out"
    base, data = str(tmp_path / "base"), str(tmp_path / "data.tsv")
    settings = ClassifySettings(**TINY)
    with pytest.raises(ValueError, match="label 'yes' is not one of"):
        run_finetune_classify(base, data, out, ClassifySettings(**TINY, labels="no,maybe"), log=None)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run_finetune_classify(base, data, out, ClassifySettings(**TINY, max_length=17), log=None)
    with pytest.raises(ValueError, match="no full batch"):
        run_finetune_classify(base, data, out, ClassifySettings(**{**TINY, "batch_size": 64}), log=None)
    with pytest.raises(ValueError, match="LoRA rank 9 is larger than the layer"):  # emb_dim 8
        lora = ClassifySettings(**{**TINY, "train_layers": "last", "batch_size": 4}, lora_rank=9)
        run_finetune_classify(base, data, out, lora, log=None)
    with pytest.raises(ValueError, match="lora_rank"):
        ClassifySettings(lora_rank=0)
    assert not out.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a classifier's output"):
        run_finetune_classify(base, data, tmp_path / "mine", settings, log=None)
    # A model whose vocabulary is smaller than the tokenizer's: GPT-2 ids would not fit.
    small = GPT(GPTConfig(vocab_size=100, context_length=16, emb_dim=8, n_heads=2, n_layers=1))
    model = to_classifier(small, 2)
    gpt2 = get_tokenizer("gpt2")
    (tmp_path / "words.tsv").write_text("a\thello world\nb\tgoodbye\n" * 10)
    classes = load_classification_data(tmp_path / "words.tsv", gpt2, 16)
    with pytest.raises(ValueError, match="do not belong together"):
        finetune_classifier(model, gpt2, classes, out, settings, log=None)
    assert not out.exists()


def test_settings_parse_the_flags_text():
    settings = ClassifySettings(labels="ham, spam", train_layers=3, split="80/10/10")
    assert settings.labels == ["ham", "spam"] and settings.train_layers == "3"
    assert settings.split == pytest.approx((0.8, 0.1, 0.1))
    assert (settings.lr, settings.weight_decay, settings.epochs, settings.batch_size) == (5e-5, 0.1, 5, 8)
    for bad in (dict(train_layers="first"), dict(labels="ham"), dict(precision="fp8"), dict(lr=0)):
        with pytest.raises(ValueError):
            ClassifySettings(**bad)


# ---------------------------------------------------------------- Hugging Face


def test_export_to_gpt2_for_sequence_classification_gives_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = small_classifier(n_classes=3)
    for parameter in model.parameters():  # non-trivial norms and biases, so every tensor is checked
        torch.nn.init.normal_(parameter, std=0.3)
    export_hf_classifier(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["num_labels"] == 3
    assert config["pad_token_id"] == 50256 and config["id2label"]["2"] == "class 2"
    theirs = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = get_tokenizer("gpt2")
    texts = ["Free entry to win a prize!", "Ok lar... Joking wif u oni", "Hi", "See you at 5 then, bring tea"]
    ids, _ = encode_texts(texts, tokenizer, 32)
    batch, _, lengths = collate([(row, 0) for row in ids], tokenizer.eos_id)
    mask = (torch.arange(batch.shape[1]) < lengths[:, None]).long()
    with torch.no_grad():
        expected = theirs(input_ids=batch, attention_mask=mask).logits
        ours = class_logits(model, batch, lengths)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="language model"):
        language_model = GPT(GPTConfig(vocab_size=10, context_length=4, emb_dim=8, n_heads=2, n_layers=1))
        export_hf_classifier(language_model, tmp_path / "lm")
