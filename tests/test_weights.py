"""Weights in and out, tested against transformers on random weights in the real formats.

Every test builds a small random GPT-2 in transformers (or in glassgpt), writes it the way the real
files are written, loads it on the other side and compares logits and greedy continuations.
Nothing is downloaded.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from glassgpt import hub
from glassgpt.cli import main
from glassgpt.config import GPTConfig
from glassgpt.generate import generate, generate_text, left_pad
from glassgpt.hub import find_gpt2, quantize_int8, resolve_model
from glassgpt.int8 import Int8Linear
from glassgpt.model import GPT
from glassgpt.tokenizer import get_tokenizer
from glassgpt.weights import config_to_hf, export_hf, load_model, load_openai_tf, save_model

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

PROMPT = torch.tensor([[11, 42, 7, 99, 3, 64, 5, 18]])


def random_hf_model(tied: bool = True, vocab_size: int = 120, seed: int = 0) -> GPT2LMHeadModel:
    """A small random GPT-2 whose logits are peaked enough that greedy decoding has no near-ties."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=48, n_head=4, n_layer=3,
                        tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.mul_(6.0)
            elif "ln" in name and name.endswith("weight"):
                parameter.add_(torch.randn_like(parameter) * 0.1)  # norms not all ones
            else:
                parameter.add_(torch.randn_like(parameter) * 0.05)  # biases not all zeros
    return model


def hf_logits(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def hf_greedy(model: GPT2LMHeadModel, ids: torch.Tensor, max_new_tokens: int,
              attention_mask=None) -> torch.Tensor:
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    return model.generate(ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)


# ---------------------------------------------------------------- Hugging Face format in

@pytest.mark.parametrize("tied", [True, False])
def test_hf_safetensors_logits_and_50_greedy_tokens_equal_transformers(tmp_path, tied):
    hf = random_hf_model(tied=tied)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours, tokenizer = load_model(tmp_path)
    assert ours.config.tie_weights is tied
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert (our_logits(ours, PROMPT) - hf_logits(hf, PROMPT)).abs().max() <= 1e-4
    expected = hf_greedy(hf, PROMPT, 50)
    assert expected.shape[1] == PROMPT.shape[1] + 50
    assert torch.equal(generate(ours, PROMPT, 50), expected)
    assert tokenizer.name == "gpt2"


def test_pytorch_bin_in_openai_hub_layout_loads_with_weights_only(tmp_path):
    """OpenAI's Hub repo: pytorch_model.bin, names without 'transformer.', attention-mask buffers."""
    hf = random_hf_model(seed=1)
    state = {name.removeprefix("transformer."): tensor for name, tensor in hf.state_dict().items()
             if name != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    ours, _ = load_model(tmp_path)
    assert (our_logits(ours, PROMPT) - hf_logits(hf, PROMPT)).abs().max() <= 1e-4


def test_pickled_code_in_a_bin_file_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    random_hf_model().config.to_json_file(tmp_path / "config.json")
    torch.save({"wte.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unsupported"):
        load_model(tmp_path)


def test_sharded_safetensors_load(tmp_path):
    hf = random_hf_model(seed=2)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, _ = load_model(tmp_path)
    assert (our_logits(ours, PROMPT) - hf_logits(hf, PROMPT)).abs().max() <= 1e-4


def test_unsupported_or_broken_hf_directories_raise_clearly(tmp_path):
    hf = random_hf_model()
    hf.config.scale_attn_by_inverse_layer_idx = True
    hf.save_pretrained(tmp_path / "scaled")
    with pytest.raises(ValueError, match="attention scaling"):
        load_model(tmp_path / "scaled")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model"):
        load_model(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    hf.config.scale_attn_by_inverse_layer_idx = False
    hf.config.to_json_file(tmp_path / "noweights" / "config.json")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_model(tmp_path / "noweights")


def test_left_padded_batch_equals_transformers_batched_generate(tmp_path):
    hf = random_hf_model(seed=3)
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    prompts = [[5, 9, 2, 77, 31, 8], [40, 2], [13, 13, 60]]
    ids, mask = left_pad(prompts)
    assert torch.equal(generate(ours, ids, 20, attention_mask=mask),
                       hf_greedy(hf, ids, 20, attention_mask=mask))
    for prompt, row in zip(prompts, generate(ours, prompts, 20), strict=True):
        assert row == hf_greedy(hf, torch.tensor([prompt]), 20)[0].tolist()  # each as if alone


# ---------------------------------------------------------------- OpenAI's original TensorFlow release

def write_openai_tf_checkpoint(hf: GPT2LMHeadModel, directory) -> None:
    """Write `hf`'s weights the way OpenAI released GPT-2: hparams.json + model.ckpt.* (+ BPE files)."""
    tf = pytest.importorskip("tensorflow")
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    variables = {"model/wte": state["wte.weight"], "model/wpe": state["wpe.weight"],
                 "model/ln_f/g": state["ln_f.weight"], "model/ln_f/b": state["ln_f.bias"]}
    for i in range(hf.config.n_layer):
        for tf_name, hf_name in [("ln_1/g", "ln_1.weight"), ("ln_1/b", "ln_1.bias"),
                                 ("ln_2/g", "ln_2.weight"), ("ln_2/b", "ln_2.bias"),
                                 ("attn/c_attn/b", "attn.c_attn.bias"),
                                 ("attn/c_proj/b", "attn.c_proj.bias"), ("mlp/c_fc/b", "mlp.c_fc.bias"),
                                 ("mlp/c_proj/b", "mlp.c_proj.bias")]:
            variables[f"model/h{i}/{tf_name}"] = state[f"h.{i}.{hf_name}"]
        for tf_name, hf_name in [("attn/c_attn/w", "attn.c_attn.weight"),
                                 ("attn/c_proj/w", "attn.c_proj.weight"),
                                 ("mlp/c_fc/w", "mlp.c_fc.weight"), ("mlp/c_proj/w", "mlp.c_proj.weight")]:
            variables[f"model/h{i}/{tf_name}"] = state[f"h.{i}.{hf_name}"].unsqueeze(0)  # (1, in, out)
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=str(directory / "model.ckpt"), tensor_names=names,
                      shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(variables[n].numpy()) for n in names])
    (directory / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    (directory / "hparams.json").write_text(json.dumps({
        "n_vocab": hf.config.vocab_size, "n_ctx": hf.config.n_positions, "n_embd": hf.config.n_embd,
        "n_head": hf.config.n_head, "n_layer": hf.config.n_layer}))


def test_openai_tensorflow_checkpoint_loads_with_equal_logits(tmp_path):
    hf = random_hf_model(seed=4)
    write_openai_tf_checkpoint(hf, tmp_path)
    assert (tmp_path / "model.ckpt.index").exists()
    ours = load_openai_tf(tmp_path)
    assert (our_logits(ours, PROMPT) - hf_logits(hf, PROMPT)).abs().max() <= 1e-4
    via_load_model, tokenizer = load_model(tmp_path)
    assert torch.equal(generate(via_load_model, PROMPT, 20), hf_greedy(hf, PROMPT, 20))
    assert tokenizer.name == "gpt2"


# ---------------------------------------------------------------- export to Hugging Face

def random_glassgpt(**overrides) -> GPT:
    torch.manual_seed(5)
    config = GPTConfig(vocab_size=90, context_length=32, emb_dim=32, n_heads=4, n_layers=2, name="tiny",
                       **overrides)
    model = GPT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False}, {"activation": "relu", "ff_dim": 48}])
def test_export_cli_writes_what_transformers_loads_with_equal_logits(tmp_path, capsys, overrides):
    model = random_glassgpt(**overrides)
    save_model(model, tmp_path / "ckpt", tokenizer=get_tokenizer("gpt2"))
    assert main(["export", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "hf")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[1, 5, 89, 30, 2, 2, 7]])
    assert (hf_logits(hf, ids) - our_logits(model, ids)).abs().max() <= 1e-4
    back, _ = load_model(tmp_path / "hf")  # and round trip into glassgpt
    assert torch.equal(back(ids), model(ids))


def test_export_writes_gpt2s_tokenizer_for_autotokenizer(tmp_path):
    """The export is a complete Hugging Face model directory: AutoTokenizer reads GPT-2's tokenizer
    files written beside the weights and gives tiktoken's ids, up to the model's context."""
    from transformers import AutoTokenizer

    model = random_glassgpt()
    export_hf(model, tmp_path / "hf", tokenizer=get_tokenizer("gpt2"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "It had always been his fate to have women say such things of him: 'Rickham wanted it.'"
    assert tokenizer(text)["input_ids"] == get_tokenizer("gpt2").encode(text)
    assert tokenizer.model_max_length == model.config.context_length
    assert tokenizer.eos_token_id == 50256


def shrunk(preset: str, **overrides) -> GPTConfig:
    """A preset's architecture (biases, norms, tying, activation) at a size a test builds in milliseconds."""
    from glassgpt.config import get_preset

    small = {"vocab_size": 90, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
             "ff_dim": None, "drop_rate": 0.0}
    return get_preset(preset, **small, **overrides)


@pytest.mark.parametrize("preset", ["verdict-162m", "verdict-demo-70m", "nano", "gpt2"])
def test_export_of_every_recipe_architecture_reloads_in_transformers_with_equal_logits(tmp_path, preset):
    # verdict-162m and the demo have no Q/K/V bias, nano no attention biases at all: each becomes a
    # zero bias, which transformers' GPT-2 adds as exactly nothing.
    torch.manual_seed(7)
    model = GPT(shrunk(preset)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    save_model(model, tmp_path / "ckpt", tokenizer=get_tokenizer("gpt2"))
    assert main(["export", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "hf")]) == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[1, 5, 89, 30, 2, 2, 7, 64]])
    assert (hf_logits(hf, ids) - our_logits(model, ids)).abs().max() <= 1e-5
    back, _ = load_model(tmp_path / "hf")
    assert (back(ids) - model(ids)).abs().max() <= 1e-5


def test_export_of_a_norm_without_shift_and_a_character_model_round_trips(tmp_path):
    from glassgpt.tokenizer import CharTokenizer

    model = random_glassgpt(norm_bias=False, qkv_bias=False, attn_out_bias=False, ff_bias=False)
    tokenizer = CharTokenizer.from_text("".join(chr(c) for c in range(33, 33 + 90)))  # the model's 90 ids
    save_model(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert main(["export", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "hf")]) == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[1, 5, 89, 30, 2, 2, 7]])
    assert (hf_logits(hf, ids) - our_logits(model, ids)).abs().max() <= 1e-5
    back, back_tokenizer = load_model(tmp_path / "hf")  # the character tokenizer travels with it
    assert back_tokenizer.to_dict() == tokenizer.to_dict()
    save_model(model, tmp_path / "gpt2-ckpt", tokenizer=get_tokenizer("gpt2"))  # over the same directory
    assert main(["export", str(tmp_path / "gpt2-ckpt"), "--to-hf", str(tmp_path / "hf")]) == 0
    assert load_model(tmp_path / "hf")[1].to_dict() == {"type": "gpt2"}


@pytest.mark.parametrize("overrides, named", [
    ({"norm_placement": "post"}, "post-LN"),
    ({"final_norm": False}, "no final LayerNorm"),
    ({"head_bias": True}, "bias on the output head"),
])
def test_export_refuses_exactly_what_gpt2_cannot_express(tmp_path, capsys, overrides, named):
    with pytest.raises(ValueError, match=named):
        config_to_hf(random_glassgpt(**overrides).config)
    save_model(random_glassgpt(**overrides), tmp_path / "ckpt", tokenizer=get_tokenizer("gpt2"))
    assert main(["export", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert named in error and "glassgpt's own format" in error
    assert not (tmp_path / "hf").exists()  # refused before writing anything


def test_tinygpt_is_refused_naming_each_thing_gpt2_lacks():
    from glassgpt.config import get_preset

    with pytest.raises(ValueError) as refused:
        config_to_hf(get_preset("tinygpt"))
    message = str(refused.value)
    assert "post-LN" in message and "no final LayerNorm" in message and "output head" in message
    assert "ReLU" not in message  # GPT-2 has activation_function "relu": that part exports


# ---------------------------------------------------------------- finding and downloading GPT-2

def fake_hub_cache(root, repo: str, hf: GPT2LMHeadModel):
    """The layout huggingface_hub leaves in its cache after a download."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / "0123abcd"
    hf.save_pretrained(snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0123abcd")
    return snapshot


def test_gpt2_names_resolve_from_the_hf_cache_and_from_models_dir(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "LOCAL_MODELS_DIR", tmp_path / "models")
    assert find_gpt2("gpt2-medium") is None
    with pytest.raises(FileNotFoundError, match="glassgpt download gpt2-medium"):
        resolve_model("gpt2-medium")
    hf = random_hf_model(seed=6)
    snapshot = fake_hub_cache(tmp_path / "hub", "openai-community/gpt2-medium", hf)
    assert find_gpt2("gpt2-medium") == snapshot
    model, _, description = resolve_model("gpt2-medium")
    assert "gpt2-medium" in description
    assert (our_logits(model, PROMPT) - hf_logits(hf, PROMPT)).abs().max() <= 1e-4
    hf.save_pretrained(tmp_path / "models" / "gpt2-medium")  # models/NAME wins over the cache
    assert find_gpt2("gpt2-medium") == tmp_path / "models" / "gpt2-medium"
    with pytest.raises(ValueError, match="unknown GPT-2 name"):
        find_gpt2("gpt3")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_download_fails_fast_offline_with_hand_placement_help(tmp_path, env):
    full_env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), **env}
    result = subprocess.run(
        [sys.executable, "-m", "glassgpt.cli", "download", "gpt2", "--dir", str(tmp_path / "d")],
        capture_output=True, text=True, env=full_env, timeout=60)
    assert result.returncode == 2
    assert "could not download gpt2" in result.stderr
    assert "https://huggingface.co/openai-community/gpt2/tree/main" in result.stderr
    assert "config.json and model.safetensors" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- glassgpt generate

def test_generate_cli_with_a_checkpoint_prints_prompt_and_continuation(tmp_path, capsys):
    tokenizer = get_tokenizer("gpt2")
    torch.manual_seed(7)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, emb_dim=32, n_heads=4,
                          n_layers=2, name="tiny-gpt2-vocab")).eval()
    save_model(model, tmp_path, tokenizer=tokenizer)
    prompt = "Every effort moves you"
    args = ["generate", prompt, "--model", str(tmp_path), "--max-tokens", "12", "--temperature", "0.5",
            "--top-k", "3", "--seed", "123"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    expected = generate_text(model, tokenizer, prompt, 12, temperature=0.5, top_k=3, seed=123)
    assert printed == prompt + expected + "\n"
    assert main(args + ["--stream", "--verbose"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == printed
    assert "prefill" in streamed.err and "decode" in streamed.err and "tokens/s" in streamed.err
    assert main(args + ["--compile"]) == 0  # compiled CPU kernels: the same seeded text
    assert capsys.readouterr().out == printed


def test_generate_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert "neither a directory" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", "nano"]) == 2  # vocabulary of 10,000 < GPT-2's
    assert "too small" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", "gpt2", "--temperature", "-1"]) == 2  # before any loading
    assert "temperature must be >= 0" in capsys.readouterr().err


def test_int8_quantisation_stays_close_to_fp32_and_the_cli_runs_it(tmp_path, capsys):
    hf = random_hf_model(seed=8)
    hf.save_pretrained(tmp_path)
    fp32, _ = load_model(tmp_path)
    int8, _ = load_model(tmp_path)
    quantize_int8(int8)
    assert isinstance(int8.out_head, Int8Linear)
    reference = our_logits(fp32, PROMPT)
    drift = (our_logits(int8, PROMPT) - reference).abs().max() / reference.abs().max()
    assert 0 < drift < 0.05  # changed, as quantisation must, but by a few percent at most
    agree = (our_logits(int8, PROMPT).argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree >= 0.75
    with pytest.raises(ValueError, match="fp32 model on the CPU"):
        quantize_int8(fp32.to(torch.bfloat16))
    assert main(["generate", "%", "--model", str(tmp_path), "--max-tokens", "3", "--dtype", "int8",
                 "--verbose"]) == 0
    assert "int8" in capsys.readouterr().err
