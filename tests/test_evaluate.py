"""`glassgpt eval`, tested against transformers' own loss on a random GPT-2 saved in its format.

The expected numbers come from `GPT2LMHeadModel(input_ids, labels=input_ids).loss`, one window at a
time (transformers shifts the labels itself), weighted by each window's predicted tokens; bytes are
counted from the text's own UTF-8 encoding. Nothing is downloaded.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glassgpt import hub
from glassgpt.cli import main
from glassgpt.config import GPTConfig
from glassgpt.data import prepare
from glassgpt.evaluate import evaluate_lm, evaluate_model, evaluate_text, window_spans
from glassgpt.model import GPT
from glassgpt.tokenizer import CharTokenizer, bundled_text, get_tokenizer
from glassgpt.weights import save_model

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

N_POSITIONS = 64
# The Verdict's opening (its first token is "I", one byte) and a line whose characters take 2-3
# UTF-8 bytes each, so bytes and characters differ.
TEXT = bundled_text()[:1500] + "\nCafé crème, naïve — déjà vu: 東京 ✓\n"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(directory, model): a small random GPT2LMHeadModel over GPT-2's vocabulary, saved with
    save_pretrained; weights scaled up so the loss is far from uniform's ln(50257)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=N_POSITIONS, n_embd=32, n_head=2, n_layer=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(10.0)
            else:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    directory = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def hf_summed_loss(model: GPT2LMHeadModel, ids: list[int], context_length: int) -> tuple[float, int, int]:
    """(summed nats, tokens predicted, windows) from transformers' loss on each window of
    `context_length + 1` ids starting every `context_length`, the last one shorter."""
    total, tokens, windows = 0.0, 0, 0
    for start in range(0, len(ids) - 1, context_length):
        window = torch.tensor([ids[start:start + context_length + 1]])
        with torch.no_grad():
            loss = model(window, labels=window).loss  # mean over the window's len - 1 predictions
        total += loss.item() * (window.shape[1] - 1)
        tokens += window.shape[1] - 1
        windows += 1
    return total, tokens, windows


def test_loss_and_perplexity_equal_transformers_on_the_same_windows(hf_dir, text_file):
    directory, hf = hf_dir
    ids = get_tokenizer("gpt2").encode(TEXT)
    context = 16  # shorter than the model's 64, so transformers can take a window of 17 ids at once
    assert (len(ids) - 1) % context, "the text should end in a partial window"
    expected_nats, expected_tokens, expected_windows = hf_summed_loss(hf, ids, context)
    expected_loss = expected_nats / expected_tokens

    result = evaluate_model(str(directory), str(text_file), device="cpu", context_length=context)

    assert result["tokens"] == expected_tokens == len(ids) - 1
    assert result["windows"] == expected_windows == math.ceil((len(ids) - 1) / context)
    assert abs(result["loss"] - expected_loss) <= 1e-4
    assert 5.0 < expected_loss and abs(expected_loss - math.log(50257)) > 0.5  # not a uniform guess
    assert result["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    # Bits per byte: the predicted text is all of it but the first token, "I" (one byte).
    assert get_tokenizer("gpt2").decode_bytes(ids[:1]) == b"I"
    n_bytes = len(TEXT.encode("utf-8")) - 1
    assert n_bytes > len(TEXT) - 1  # the accented line makes bytes and characters differ
    assert result["bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(expected_nats / math.log(2) / n_bytes, rel=1e-5)
    assert result["context_length"] == context
    assert result["data"] == str(text_file)


def test_the_models_own_context_by_default(hf_dir, text_file):
    """At the full context transformers cannot take a window of 65 ids: its logits for the 64 inputs,
    against the next ids, give the expected loss (the last, shorter window through its labels)."""
    directory, hf = hf_dir
    ids = get_tokenizer("gpt2").encode(TEXT)
    total = 0.0
    for start in range(0, len(ids) - 1, N_POSITIONS):
        window = torch.tensor(ids[start:start + N_POSITIONS + 1])
        with torch.no_grad():
            logits = hf(window[None, :-1]).logits[0]
        total += F.cross_entropy(logits, window[1:], reduction="sum").item()
    result = evaluate_model(str(directory), str(text_file), device="cpu")
    assert result["context_length"] == N_POSITIONS
    assert result["windows"] == math.ceil((len(ids) - 1) / N_POSITIONS) > 1
    assert abs(result["loss"] - total / (len(ids) - 1)) <= 1e-4


def test_a_text_shorter_than_the_context_is_one_window(hf_dir, tmp_path):
    directory, hf = hf_dir
    text = "It was a naïve plan, très simple."
    ids = get_tokenizer("gpt2").encode(text)
    assert 2 < len(ids) < N_POSITIONS
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    path = tmp_path / "short.txt"
    path.write_text(text, encoding="utf-8")
    result = evaluate_model(str(directory), str(path), device="cpu")
    assert result["windows"] == 1 and result["tokens"] == len(ids) - 1
    assert abs(result["loss"] - expected) <= 1e-4
    first = get_tokenizer("gpt2").decode_bytes(ids[:1])
    assert text.encode("utf-8").startswith(first)
    assert result["bytes"] == len(text.encode("utf-8")) - len(first)


def test_window_spans_cover_every_token_but_the_first_once():
    for n_ids, context in ((2, 4), (5, 4), (6, 4), (9, 4), (10, 4), (1000, 7)):
        spans = window_spans(n_ids, context)
        predicted = [start + 1 + offset for start, length in spans for offset in range(length)]
        assert predicted == list(range(1, n_ids))
        assert all(length == context for _, length in spans[:-1])
    assert window_spans(5, 4) == [(0, 4)]  # 5 ids = one full window of 4 inputs and 4 targets
    assert window_spans(6, 4) == [(0, 4), (4, 1)]


def test_batch_size_does_not_change_the_numbers(hf_dir):
    directory, _ = hf_dir
    model, tokenizer, _ = hub.resolve_model(str(directory))
    one = evaluate_text(model, tokenizer, TEXT, context_length=16, batch_size=1)
    many = evaluate_text(model, tokenizer, TEXT, context_length=16, batch_size=7)
    assert one.tokens == many.tokens and one.bytes == many.bytes and one.windows == many.windows
    assert many.loss == pytest.approx(one.loss, abs=1e-6)


def test_bits_per_byte_of_a_char_model_counts_utf8_bytes(tmp_path):
    """One token per character: bytes are those of the text less its first character, whatever
    their width in UTF-8, and bits per byte = nats / ln 2 / those bytes."""
    text = "héllo wörld, 東京 ok " * 5
    tokenizer = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, emb_dim=16, n_heads=2,
                          n_layers=1)).eval()
    ids = tokenizer.encode(text)
    total = 0.0
    for start in range(0, len(ids) - 1, 8):
        window = torch.tensor(ids[start:start + 9])
        with torch.no_grad():
            total += F.cross_entropy(model(window[None, :-1])[0], window[1:], reduction="sum").item()
    result = evaluate_lm(model, ids, tokenizer)
    assert result.bytes == len(text[1:].encode("utf-8")) > len(text) - 1
    assert result.loss == pytest.approx(total / (len(text) - 1), abs=1e-5)
    assert result.bits_per_byte == pytest.approx(total / math.log(2) / result.bytes, rel=1e-5)
    # and through the command, from a saved checkpoint and a text file
    save_model(model, tmp_path / "char", tokenizer)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    assert evaluate_model(str(tmp_path / "char"), str(tmp_path / "t.txt"), device="cpu")["loss"] == \
        pytest.approx(result.loss, abs=1e-6)


def test_a_prepared_directory_gives_what_its_text_gives(hf_dir, text_file, tmp_path):
    directory, _ = hf_dir
    prepare([str(text_file)], tmp_path / "prepared")
    from_text = evaluate_model(str(directory), str(text_file), device="cpu", context_length=32)
    from_prepared = evaluate_model(str(directory), str(tmp_path / "prepared"), device="cpu",
                                   context_length=32)
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "windows", "bytes"):
        assert from_prepared[key] == pytest.approx(from_text[key], rel=1e-9)


def test_json_output_parses_and_the_default_data_is_the_verdict(hf_dir, capsys):
    directory, _ = hf_dir
    assert main(["eval", "--model", str(directory), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"loss", "perplexity", "bits_per_byte", "tokens", "windows", "bytes", "model",
                           "data"}
    assert result["data"] == "bundled:the-verdict.txt"
    verdict = bundled_text()
    ids = get_tokenizer("gpt2").encode(verdict)
    assert result["tokens"] == len(ids) - 1 == 5144
    assert result["bytes"] == len(verdict.encode("utf-8")) - 1  # "I" again
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_the_command_prints_the_three_numbers(hf_dir, text_file):
    directory, _ = hf_dir
    done = subprocess.run([sys.executable, "-m", "glassgpt", "eval", "--model", str(directory), "--data",
                           str(text_file), "--device", "cpu", "--context-length", "16"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "loss" in done.stdout and "perplexity" in done.stdout and "bits per byte" in done.stdout
    assert "windows of up to 16" in done.stdout


# ---------------------------------------------------------------- bad input: clear errors, early

@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model is loaded: the error must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(hub, "resolve_model", refuse)


def test_an_empty_text_is_a_clear_error_before_loading(hf_dir, tmp_path, capsys, no_loading):
    directory, _ = hf_dir
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert main(["eval", "--model", str(directory), "--data", str(empty)]) == 2
    expected = f"glassgpt: error: {empty} is empty: there is nothing to evaluate"
    assert capsys.readouterr().err.strip() == expected
    assert main(["eval", "--model", str(directory), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", str(directory), "--data", "bundled:nope.txt"]) == 2
    assert "no bundled text named 'nope.txt'" in capsys.readouterr().err


def test_a_bad_model_is_a_clear_error_before_loading(tmp_path, capsys, no_loading):
    assert main(["eval", "--model", str(tmp_path / "nowhere")]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path)]) == 2  # a directory with no model in it
    err = capsys.readouterr().err
    assert err.startswith("glassgpt: error: ") and str(tmp_path) in err


def test_bad_sizes_are_clear_errors(hf_dir, tmp_path, capsys):
    directory, _ = hf_dir
    assert main(["eval", "--model", str(directory), "--context-length", "65", "--device", "cpu"]) == 2
    assert "context length 65 exceeds the model's 64" in capsys.readouterr().err
    assert main(["eval", "--model", str(directory), "--context-length", "0"]) == 2
    assert "context length must be positive" in capsys.readouterr().err
    assert main(["eval", "--model", str(directory), "--batch-size", "0"]) == 2
    assert "batch size must be positive" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("Hello", encoding="utf-8")
    assert main(["eval", "--model", str(directory), "--data", str(one), "--device", "cpu"]) == 2
    assert "a text of 1 token has nothing to predict" in capsys.readouterr().err


def test_ids_beyond_the_vocabulary_are_refused():
    model = GPT(GPTConfig(vocab_size=10, context_length=8, emb_dim=8, n_heads=2, n_layers=1))
    with pytest.raises(ValueError, match="tokenizer does not match the model"):
        evaluate_lm(model, np.array([1, 2, 50]), get_tokenizer("gpt2"))


def test_int8_weights_evaluate_through_the_logits(hf_dir, text_file):
    """A quantised head has no weight matrix for the model's padded loss: eval takes the logits, and
    int8 stays near float32 (here 0.01% of the loss)."""
    directory, _ = hf_dir
    full = evaluate_model(str(directory), str(text_file), device="cpu", context_length=16)
    int8 = evaluate_model(str(directory), str(text_file), dtype="int8", context_length=16)
    assert int8["model"].endswith(", int8") and int8["tokens"] == full["tokens"]
    assert int8["loss"] == pytest.approx(full["loss"], rel=1e-3)
    assert int8["loss"] != full["loss"]
