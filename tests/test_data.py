"""Sliding windows, the train/validation split, loaders, and prepared (memory-mapped) corpora.

The expected batches are the tutorial's (the book "Build a Large Language Model (From Scratch)",
chapter 5; see the README).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glassgpt.data import (
    TokenWindows,
    load_corpus,
    load_prepared,
    make_loader,
    prepare,
    split_ids,
    text_chunks,
    token_dtype,
)
from glassgpt.tokenizer import bundled_text, get_tokenizer


def test_windows_are_inputs_and_targets_shifted_by_one():
    ids = np.arange(10)
    windows = TokenWindows(ids, context_length=4, stride=4)
    assert len(windows) == 2  # starts 0 and 4; a window at 8 would need ids up to 12
    inputs, targets = windows[1]
    assert inputs.tolist() == [4, 5, 6, 7]
    assert targets.tolist() == [5, 6, 7, 8]
    assert inputs.dtype == torch.long


def test_stride_one_gives_every_window():
    windows = TokenWindows(np.arange(11), context_length=4, stride=1)
    assert len(windows) == 7
    assert [windows[i][0][0].item() for i in range(7)] == list(range(7))


def test_too_short_text_gives_no_window():
    assert len(TokenWindows(np.arange(4), context_length=4)) == 0


def test_split_at_token_boundary_validation_last():
    ids = np.arange(100)
    train, val = split_ids(ids, 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    train, val = split_ids(ids, 0.0)
    assert len(train) == 100 and len(val) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_ids(ids, 1.0)


def test_verdict_gives_the_tutorials_batches():
    ids, tokenizer = load_corpus(["bundled:the-verdict.txt"], "gpt2")
    assert len(ids) == 5145 and ids.dtype == np.uint16
    assert ids[:10].tolist() == [40, 367, 2885, 1464, 1807, 3619, 402, 271, 10899, 2138]
    train, val = split_ids(ids, 0.1)
    train_windows, val_windows = TokenWindows(train, 256, 256), TokenWindows(val, 256, 256)
    # 9 batches of 2 per epoch and one validation batch, as in the tutorial's chapter 5 loop.
    assert len(make_loader(train_windows, 2, train=True)) == 9
    assert len(val_windows) == 2


def test_training_loader_shuffles_by_seed_and_epoch_and_drops_last():
    windows = TokenWindows(np.arange(21), context_length=2, stride=2)  # 10 windows
    loader = make_loader(windows, batch_size=3, train=True, seed=7)
    assert len(loader) == 3  # 10 // 3: the last partial batch is dropped

    def order(epoch: int, seed: int = 7) -> list[int]:
        loader = make_loader(windows, batch_size=3, train=True, seed=seed)
        loader.sampler.set_epoch(epoch)
        return [int(x) // 2 for inputs, _ in loader for x in inputs[:, 0]]

    assert order(0) == order(0)  # reproducible
    assert order(0) != order(1)  # reshuffled each epoch
    assert order(0) != order(0, seed=8)
    assert len(set(order(0))) == 9
    assert order(0) != sorted(order(0))


def test_processes_get_disjoint_shards_of_each_epoch():
    windows = TokenWindows(np.arange(33), context_length=2, stride=2)  # 16 windows
    seen = []
    for rank in range(2):
        loader = make_loader(windows, batch_size=2, train=True, seed=1, rank=rank, world_size=2)
        loader.sampler.set_epoch(3)
        seen.append([int(x) // 2 for inputs, _ in loader for x in inputs[:, 0]])
    assert len(seen[0]) == len(seen[1]) == 8
    assert sorted(seen[0] + seen[1]) == list(range(16))


def test_validation_loader_is_in_order_and_keeps_the_last_batch():
    windows = TokenWindows(np.arange(21), context_length=2, stride=2)
    loader = make_loader(windows, batch_size=3, train=False)
    firsts = [int(x) for inputs, _ in loader for x in inputs[:, 0]]
    assert firsts == list(range(0, 20, 2))


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(100_277) == np.uint32


def test_chunked_reading_gives_the_same_gpt2_ids(tmp_path):
    text = bundled_text("the-verdict.txt")
    path = tmp_path / "verdict.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(text_chunks(path, chunk_chars=1000))
    assert len(chunks) > 15 and "".join(chunks) == text
    tokenizer = get_tokenizer("gpt2")
    assert [i for chunk in chunks for i in tokenizer.encode(chunk)] == tokenizer.encode(text)


def test_prepare_writes_a_memory_mapped_token_file(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("Every effort moves you.\nIt was a cheap genius.", encoding="utf-8")
    second.write_text("I had always thought Jack Gisburn rather a cheap genius.", encoding="utf-8")
    meta = prepare([str(first), str(second)], tmp_path / "prepared", tokenizer_name="gpt2", chunk_chars=16)
    tokenizer = get_tokenizer("gpt2")
    expected = tokenizer.encode(first.read_text()) + [50256] + tokenizer.encode(second.read_text())
    assert meta["n_tokens"] == len(expected) and meta["dtype"] == "uint16"
    assert (tmp_path / "prepared" / "tokens.bin").stat().st_size == 2 * len(expected)
    ids, loaded_tokenizer = load_prepared(tmp_path / "prepared")
    assert isinstance(ids, np.memmap)
    assert ids.tolist() == expected
    assert loaded_tokenizer.vocab_size == 50257
    # load_corpus takes a prepared directory as the corpus, as training does
    ids, _ = load_corpus([str(tmp_path / "prepared")])
    assert ids.tolist() == expected


def test_prepare_char_vocabulary_covers_every_file(tmp_path):
    (tmp_path / "a.txt").write_text("abba", encoding="utf-8")
    (tmp_path / "b.txt").write_text("cab", encoding="utf-8")
    prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "out", tokenizer_name="char")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer"] == {"type": "char", "chars": "abc"}
    ids, tokenizer = load_prepared(tmp_path / "out")
    assert ids.tolist() == [0, 1, 1, 0, 2, 0, 1]  # no separator: the char vocabulary has no end-of-text
    assert tokenizer.decode(ids.tolist()) == "abbacab"


def test_corpus_errors_say_what_is_wrong(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_corpus([str(empty)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="no corpus"):
        load_corpus([])
    with pytest.raises(FileNotFoundError, match="no bundled text"):
        load_corpus(["bundled:nothing.txt"])
    (tmp_path / "zero.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        prepare([str(tmp_path / "zero.txt")], tmp_path / "prepared")


def test_prepare_verb_then_train_on_the_prepared_directory(tmp_path, capsys):
    from glassgpt.cli import main

    corpus = tmp_path / "story.txt"
    corpus.write_text(bundled_text("the-verdict.txt")[:3000], encoding="utf-8")
    assert main(["prepare", str(corpus), "--tokenizer", "char", "--out", str(tmp_path / "prepared")]) == 0
    assert "3,000 tokens (uint16" in capsys.readouterr().out
    assert main(["train", "--corpus", str(tmp_path / "prepared"), "--out", str(tmp_path / "run"),
                 "--model", "nano", "--n-layers", "1", "--emb-dim", "32", "--n-heads", "2",
                 "--context-length", "32", "--max-steps", "2", "--sample-prompt", "I", "--no-progress"]) == 0
    config = json.loads((tmp_path / "run" / "glassgpt.json").read_text())["config"]
    assert config["vocab_size"] == len(set(corpus.read_text()))  # the prepared char vocabulary
