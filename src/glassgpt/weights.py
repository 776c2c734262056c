"""Weights in and out: glassgpt's own format and Hugging Face's GPT-2 format.

glassgpt format (a directory): `model.safetensors` with glassgpt's parameter names and
`glassgpt.json` holding the GPTConfig and the tokenizer.

Hugging Face format (what `GPT2LMHeadModel.save_pretrained` writes, and how OpenAI's GPT-2 is
published): `config.json` + `model.safetensors` (or `pytorch_model.bin`). GPT-2 stores its linear
layers as "Conv1D" with the matrix transposed, (in, out), and fuses Q, K, V into one `c_attn`
whose output columns are [query | key | value] -- the same order as our `qkv` projection.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from glassgpt.config import GPTConfig
from glassgpt.model import GPT

GLASSGPT_META = "glassgpt.json"
WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------- glassgpt's own format

def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict without the tied head alias (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.config.tie_weights:
        state.pop("out_head.weight", None)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def save_model(model: GPT, directory: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write `model.safetensors` + `glassgpt.json` into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "glassgpt", "config": model.config.to_dict()}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.to_dict()
    if extra:
        meta.update(extra)
    save_file(model_state_for_saving(model), str(directory / WEIGHTS_FILE))
    (directory / GLASSGPT_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return directory


def load_state_into(model: GPT, state: dict[str, torch.Tensor], source: str) -> GPT:
    expected = set(model_state_for_saving(model))
    missing, unexpected = expected - set(state), set(state) - expected - {"out_head.weight"}
    if missing or unexpected:
        raise ValueError(
            f"weights in {source} do not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a glassgpt directory or a Hugging Face GPT-2 directory."""
    from glassgpt.tokenizer import get_tokenizer, tokenizer_from_dict

    path = Path(path)
    if (path / GLASSGPT_META).exists():
        meta = json.loads((path / GLASSGPT_META).read_text(encoding="utf-8"))
        model = GPT(GPTConfig.from_dict(meta["config"]))
        load_state_into(model, load_file(str(path / WEIGHTS_FILE)), str(path))
        tokenizer = tokenizer_from_dict(meta.get("tokenizer", {"type": "gpt2"}))
    elif (path / "config.json").exists():
        model = load_pretrained(path)
        tokenizer = get_tokenizer("gpt2")
    else:
        raise FileNotFoundError(
            f"{path} holds no model: expected {GLASSGPT_META} (glassgpt) or config.json (Hugging Face GPT-2)"
        )
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval(), tokenizer


# ---------------------------------------------------------------- Hugging Face GPT-2 format

def config_from_hf(hf: dict) -> GPTConfig:
    """A GPTConfig from a Hugging Face GPT-2 config.json."""
    activation = hf.get("activation_function", "gelu_new")
    if activation in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        activation = "gelu"
    elif activation != "relu":
        raise ValueError(f"unsupported activation_function {activation!r} (glassgpt has tanh-GELU and ReLU)")
    return GPTConfig(
        name=hf.get("_name_or_path") or hf.get("model_type", "gpt2"),
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        emb_dim=hf["n_embd"],
        n_heads=hf["n_head"],
        n_layers=hf["n_layer"],
        ff_dim=hf.get("n_inner"),
        tie_weights=hf.get("tie_word_embeddings", True),
        activation=activation,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def config_to_hf(config: GPTConfig) -> dict:
    """A Hugging Face GPT-2 config.json for `config`, or ValueError if GPT-2 cannot express it."""
    unsupported = []
    if not (config.qkv_bias and config.attn_out_bias and config.ff_bias and config.norm_bias):
        unsupported.append("missing biases (GPT-2 has bias on every projection and norm)")
    if config.head_bias:
        unsupported.append("a bias on the output head")
    if config.norm_placement != "pre":
        unsupported.append("post-LN blocks")
    if not config.final_norm:
        unsupported.append("no final norm")
    if unsupported:
        raise ValueError("transformers' GPT-2 cannot express this model: " + "; ".join(unsupported))
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.emb_dim,
        "n_head": config.n_heads,
        "n_layer": config.n_layers,
        "n_inner": config.ff_dim,
        "activation_function": "gelu_new" if config.activation == "gelu" else "relu",
        "layer_norm_epsilon": config.norm_eps,
        "tie_word_embeddings": config.tie_weights,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": 50256, "eos_token_id": 50256,
    }


def hf_names(config: GPTConfig) -> Iterator[tuple[str, str, bool]]:
    """(glassgpt name, Hugging Face name, transposed?) for every stored tensor."""
    yield "tok_emb.weight", "transformer.wte.weight", False
    yield "pos_emb.weight", "transformer.wpe.weight", False
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        pairs = [("norm1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.out_proj", "attn.c_proj"),
                 ("norm2", "ln_2"), ("ff.expand", "mlp.c_fc"), ("ff.contract", "mlp.c_proj")]
        for our_module, their_module in pairs:
            if our_module.startswith("norm"):
                yield ours + our_module + ".scale", theirs + their_module + ".weight", False
                yield ours + our_module + ".shift", theirs + their_module + ".bias", False
            else:  # Conv1D keeps (in, out); nn.Linear keeps (out, in)
                yield ours + our_module + ".weight", theirs + their_module + ".weight", True
                yield ours + our_module + ".bias", theirs + their_module + ".bias", False
    yield "final_norm.scale", "transformer.ln_f.weight", False
    yield "final_norm.shift", "transformer.ln_f.bias", False
    if not config.tie_weights:
        yield "out_head.weight", "lm_head.weight", False


def read_hf_state(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").exists():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").exists():
        # weights_only: a pickle can run code; a weights file must not be able to.
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} has config.json but neither model.safetensors nor pytorch_model.bin")


def load_pretrained(path: str | Path) -> GPT:
    """A GPT with the weights of a Hugging Face GPT-2 directory (OpenAI's released checkpoints included)."""
    directory = Path(path)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face GPT-2 directory")
    hf_config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config = config_from_hf(hf_config)
    state = read_hf_state(directory)
    # A bare GPT2Model (no LM head) saves names without the "transformer." prefix.
    if not any(name.startswith("transformer.") for name in state):
        state = {("" if name.startswith("lm_head.") else "transformer.") + name: t for name, t in state.items()}
    if not config.tie_weights and "lm_head.weight" not in state:
        raise ValueError(f"{directory}: config says the head is untied but lm_head.weight is missing")
    ours = {}
    for our_name, their_name, transposed in hf_names(config):
        if their_name not in state:
            raise ValueError(f"{directory}: {their_name} missing from the weights")
        tensor = state[their_name]
        ours[our_name] = tensor.t().contiguous() if transposed else tensor
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    load_state_into(model, {k: v.float() for k, v in ours.items()}, str(directory))
    if config.tie_weights:
        model.out_head.weight = model.tok_emb.weight
    return model.eval()


def export_hf(model: GPT, directory: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` that `GPT2LMHeadModel.from_pretrained` loads."""
    hf_config = config_to_hf(model.config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {}
    for our_name, their_name, transposed in hf_names(model.config):
        tensor = state[our_name].detach().float().cpu()
        tensors[their_name] = (tensor.t() if transposed else tensor).contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    return directory
