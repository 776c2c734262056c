"""The one resolver behind --model and GPT.from_pretrained: every kind of argument, checked early.

Finding GPT-2 in the Hugging Face cache and downloading are tested in test_weights.py.
"""

import pytest
import torch

from glassgpt import hub
from glassgpt.config import GPTConfig
from glassgpt.hub import check_model_spec, resolve_model
from glassgpt.int8 import Int8Linear
from glassgpt.model import GPT
from glassgpt.tokenizer import CharTokenizer, get_tokenizer
from glassgpt.weights import save_model

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

IDS = torch.tensor([[11, 42, 7, 99, 3, 64, 5, 18]])


def small_hf_model() -> GPT2LMHeadModel:
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_head=4, n_layer=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def test_from_pretrained_takes_a_gpt2_name_a_hf_directory_and_a_glassgpt_run(tmp_path, monkeypatch):
    hf = small_hf_model()
    with torch.no_grad():
        expected = hf(IDS).logits
    hf.save_pretrained(tmp_path / "hf")
    assert (logits(GPT.from_pretrained(tmp_path / "hf")) - expected).abs().max() <= 1e-4

    monkeypatch.setattr(hub, "LOCAL_MODELS_DIR", tmp_path / "models")
    hf.save_pretrained(tmp_path / "models" / "gpt2-large")  # found by name, nothing downloaded
    assert (logits(GPT.from_pretrained("gpt2-large")) - expected).abs().max() <= 1e-4

    ours = GPT(GPTConfig(name="run", vocab_size=40, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    save_model(ours, tmp_path / "run", tokenizer=CharTokenizer("abc"))
    loaded = GPT.from_pretrained(str(tmp_path / "run"), dtype=torch.bfloat16)
    assert loaded.tok_emb.weight.dtype == torch.bfloat16 and not loaded.training
    assert torch.equal(loaded.tok_emb.weight, ours.tok_emb.weight.bfloat16())
    with pytest.raises(ValueError, match=r"preset.*GPT\.from_preset\('verdict-162m'\)"):
        GPT.from_pretrained("verdict-162m")  # random weights are not pretrained ones


def test_check_model_spec_refuses_bad_input_before_reading_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "LOCAL_MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(hub, "find_gpt2", lambda name: None)  # an empty Hugging Face cache
    monkeypatch.setattr(hub, "load_model", None)  # checking must not load anything
    with pytest.raises(FileNotFoundError, match=r"no model at .*neither a directory.*make demo"):
        check_model_spec(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model"):
        check_model_spec(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="glassgpt download gpt2-xl"):
        check_model_spec("gpt2-xl")
    with pytest.raises(ValueError, match="too small"):
        check_model_spec("nano")  # 10,000 ids, fewer than GPT-2's tokenizer makes
    check_model_spec("verdict-162m")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    check_model_spec(tmp_path / "hf")


def test_resolve_model_holds_weights_as_named(tmp_path):
    small_hf_model().save_pretrained(tmp_path)
    fp32, tokenizer, description = resolve_model(tmp_path)
    assert tokenizer is get_tokenizer("gpt2") and str(tmp_path) in description
    bf16, _, _ = resolve_model(tmp_path, dtype="bfloat16")
    assert bf16.tok_emb.weight.dtype == torch.bfloat16
    int8, _, description = resolve_model(tmp_path, dtype="int8")
    assert description.endswith(", int8")
    assert isinstance(int8.out_head, Int8Linear)  # weight-only int8 (glassgpt.int8)
    assert int8.tok_emb.weight.dtype == torch.float32  # embeddings stay fp32
    drift = (logits(int8) - logits(fp32)).abs().max() / logits(fp32).abs().max()
    assert 0 < drift < 0.05
    with pytest.raises(ValueError, match="unknown dtype 'float16x'"):
        resolve_model(tmp_path, dtype="float16x")
    with pytest.raises(ValueError, match="fp32 model on the CPU"):
        resolve_model(tmp_path, device="meta", dtype="int8")  # refused before loading
