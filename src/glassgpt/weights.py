"""Weights in and out: glassgpt's own format, Hugging Face's GPT-2 format, OpenAI's original release.

glassgpt format (a directory): `model.safetensors` with glassgpt's parameter names and
`glassgpt.json` holding the GPTConfig and the tokenizer.

Hugging Face format (what `GPT2LMHeadModel.save_pretrained` writes, and how OpenAI's GPT-2 is
published on the Hub): `config.json` + `model.safetensors` (or `pytorch_model.bin`). GPT-2 stores
its linear layers as "Conv1D" with the matrix transposed, (in, out), and fuses Q, K, V into one
`c_attn` whose output columns are [query | key | value] -- the same order as our `qkv` projection.

OpenAI's original release (what the tutorial, the book "Build a Large Language Model (From
Scratch)", downloads in chapter 5): `hparams.json` + a TensorFlow checkpoint `model.ckpt.*` +
`encoder.json`/`vocab.bpe`. The same tensors under names like `model/h0/attn/c_attn/w`, with a
leading 1 on the Conv1D weights. Reading it needs TensorFlow (`pip install 'glassgpt[tf]'`); the BPE
files are GPT-2's, which glassgpt bundles already.

Finding a model by name (GPT-2 sizes, presets) and downloading are `glassgpt.hub`'s.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from glassgpt.bpe import BPETokenizer
from glassgpt.config import GPTConfig
from glassgpt.integrity import read_json, read_pickle, read_tensors
from glassgpt.model import GPT
from glassgpt.tokenizer import get_tokenizer, tokenizer_from_dict

GLASSGPT_META = "glassgpt.json"
WEIGHTS_FILE = "model.safetensors"
# Beside an exported Hugging Face directory: the tokenizer of a model whose tokenizer is not GPT-2's.
HF_TOKENIZER_FILE = "glassgpt_tokenizer.json"


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


def model_format(path: str | Path) -> str:
    """"glassgpt", "hf" or "openai-tf": the format of the model in directory `path`, from its
    marker file alone (nothing else is read), or FileNotFoundError."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory holding a model")
    for marker, name in ((GLASSGPT_META, "glassgpt"), ("config.json", "hf"), ("hparams.json", "openai-tf")):
        if (path / marker).exists():
            return name
    raise FileNotFoundError(
        f"{path} holds no model: expected {GLASSGPT_META} (glassgpt), config.json (Hugging Face "
        "GPT-2) or hparams.json + model.ckpt.* (OpenAI's original GPT-2 release)"
    )


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a directory in any format glassgpt reads.

    glassgpt (`glassgpt.json`), Hugging Face GPT-2 (`config.json`) or OpenAI's original release
    (`hparams.json` + TensorFlow checkpoint). The model comes back in eval mode.
    """
    path = Path(path)
    kind = model_format(path)
    if kind == "glassgpt":
        # A damaged or crafted file is one line naming it (glassgpt.integrity), not a traceback.
        meta = read_json(path / GLASSGPT_META)
        model = _build(GPTConfig.from_dict(meta["config"]), read_tensors(path / WEIGHTS_FILE), str(path))
        tokenizer = tokenizer_from_dict(meta.get("tokenizer", {"type": "gpt2"}))
    else:  # OpenAI's GPT-2, in either of its formats: GPT-2's own tokenizer
        model = load_pretrained(path) if kind == "hf" else load_openai_tf(path)
        tokenizer = get_tokenizer("gpt2")
        if (path / HF_TOKENIZER_FILE).exists():  # exported by glassgpt with its own tokenizer
            saved = json.loads((path / HF_TOKENIZER_FILE).read_text(encoding="utf-8"))
            tokenizer = tokenizer_from_dict(saved)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval(), tokenizer


# ---------------------------------------------------------------- Hugging Face GPT-2 format

def config_from_hf(hf: dict) -> GPTConfig:
    """A GPTConfig from a Hugging Face GPT-2 config.json, or ValueError for variants glassgpt lacks."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json describes a {hf.get('model_type')!r} model; glassgpt reads GPT-2 only")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ValueError("unsupported attention scaling in config.json (glassgpt scales by 1/sqrt(head_dim))")
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
    """A Hugging Face GPT-2 config.json for `config`, or ValueError naming what GPT-2 cannot express.

    Exported exactly: a missing bias (as a zero bias, which adds nothing), a LayerNorm without a
    shift (a zero shift), ReLU (GPT-2's `activation_function: relu`), an untied head, any sizes.
    Not expressible, so refused rather than approximated: post-LN blocks (GPT-2 normalises before
    each sub-layer, always); no final norm (GPT-2 always applies `ln_f`, and no LayerNorm is the
    identity: even scale 1 and shift 0 still normalises); a bias on the output head (`lm_head` has
    none, and it cannot move into the final norm's shift unless it lies in the head's column space).
    """
    unsupported = []
    if config.norm_placement != "pre":
        unsupported.append("post-LN blocks (GPT-2 puts each LayerNorm before its sub-layer)")
    if not config.final_norm:
        unsupported.append("no final LayerNorm (GPT-2 always applies ln_f, and no LayerNorm is the identity)")
    if config.head_bias:
        unsupported.append("a bias on the output head (GPT-2's lm_head has none)")
    if unsupported:
        raise ValueError(
            f"transformers' GPT-2 cannot express {config.name!r} exactly: " + "; ".join(unsupported)
            + ". Keep it in glassgpt's own format (model.safetensors + glassgpt.json), which "
            "`glassgpt generate/serve --model DIR` and `glassgpt.weights.load_model` read")
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
    """Every tensor of a Hugging Face directory: safetensors (one file or shards) or pytorch_model.bin."""
    def shards(index_name: str) -> list[Path]:
        index = json.loads((directory / index_name).read_text(encoding="utf-8"))
        return [directory / name for name in sorted(set(index["weight_map"].values()))]

    def read_bin(file: Path) -> dict[str, torch.Tensor]:
        # weights_only: a pickle can run code; a weights file must not be able to.
        return read_pickle(file)

    if (directory / "model.safetensors").exists():
        return read_tensors(directory / "model.safetensors")
    if (directory / "model.safetensors.index.json").exists():
        return {k: v for shard in shards("model.safetensors.index.json")
                for k, v in read_tensors(shard).items()}
    if (directory / "pytorch_model.bin").exists():
        return read_bin(directory / "pytorch_model.bin")
    if (directory / "pytorch_model.bin.index.json").exists():
        return {k: v for shard in shards("pytorch_model.bin.index.json") for k, v in read_bin(shard).items()}
    raise FileNotFoundError(
        f"{directory} has config.json but neither model.safetensors nor pytorch_model.bin")


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
        state = {("" if name.startswith("lm_head.") else "transformer.") + name: t
                 for name, t in state.items()}
    if not config.tie_weights and "lm_head.weight" not in state:
        raise ValueError(f"{directory}: config says the head is untied but lm_head.weight is missing")
    ours = {}
    for our_name, their_name, transposed in hf_names(config):
        if their_name not in state:
            raise ValueError(f"{directory}: {their_name} missing from the weights")
        tensor = state[their_name]
        ours[our_name] = tensor.t().contiguous() if transposed else tensor
    return _build(config, ours, str(directory))


def hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Every tensor of `model` under Hugging Face GPT-2 names (transposed into Conv1D's (in, out)),
    float32 on the CPU. A projection or norm built without a bias gets a zero bias: GPT-2 has a slot
    for every one, and a zero there adds exactly nothing."""
    state = model.state_dict()
    tensors = {}
    for our_name, their_name, transposed in hf_names(model.config):
        if our_name in state:
            tensor = state[our_name].detach().float().cpu()
        else:  # a bias this model was built without: `<module>.bias`, or a norm's `.shift`
            module = model.get_submodule(our_name.rsplit(".", 1)[0])
            width = module.scale.shape[0] if hasattr(module, "scale") else module.weight.shape[0]
            tensor = torch.zeros(width)
        tensors[their_name] = (tensor.t() if transposed else tensor).contiguous()
    return tensors


def export_hf(model: GPT, directory: str | Path, tokenizer=None) -> Path:
    """Write `config.json` + `model.safetensors` that `GPT2LMHeadModel.from_pretrained` loads, with
    logits equal to `model`'s; ValueError (before writing anything) if GPT-2 cannot express it.

    A tokenizer other than GPT-2's (a character model, ...) is written beside them as
    `glassgpt_tokenizer.json`, which `load_model` reads back (transformers ignores it); GPT-2's as
    Hugging Face's tokenizer files (`AutoTokenizer.from_pretrained(directory)` reads them)."""
    hf_config = config_to_hf(model.config)
    tensors = hf_tensors(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    if tokenizer is not None and tokenizer.to_dict().get("type") != "gpt2":
        (directory / HF_TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_dict()), encoding="utf-8")
    else:  # GPT-2's, what load_model assumes: an earlier export's file here would now be wrong
        (directory / HF_TOKENIZER_FILE).unlink(missing_ok=True)
        # ... and the files transformers' AutoTokenizer (and lm-eval, ...) read for it
        _gpt2_bpe().save_hf(directory, model_max_length=model.config.context_length)
    return directory


@functools.cache
def _gpt2_bpe() -> BPETokenizer:
    """GPT-2's table as a from-scratch BPE, kept: its merge list takes seconds to recover."""
    return BPETokenizer.from_tiktoken_ranks()


def _build(config: GPTConfig, state: dict[str, torch.Tensor], source: str) -> GPT:
    """A GPT of `config` holding `state` (glassgpt names), without a wasted random initialisation."""
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    for name, tensor in state.items():
        expected = model.get_parameter(name).shape
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the config expects {tuple(expected)}")
    load_state_into(model, {k: v.float() for k, v in state.items()}, source)
    if config.tie_weights:
        model.out_head.weight = model.tok_emb.weight
    return model.eval()


# ---------------------------------------------------------------- OpenAI's original TensorFlow release

def openai_tf_names(config: GPTConfig) -> Iterator[tuple[str, str, bool]]:
    """(glassgpt name, TensorFlow variable name, transposed?) for OpenAI's GPT-2 checkpoints."""
    yield "tok_emb.weight", "model/wte", False
    yield "pos_emb.weight", "model/wpe", False
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"model/h{i}/"
        for our_norm, their_norm in (("norm1", "ln_1"), ("norm2", "ln_2")):
            yield ours + our_norm + ".scale", theirs + their_norm + "/g", False
            yield ours + our_norm + ".shift", theirs + their_norm + "/b", False
        for our_linear, their_linear in (("attn.qkv", "attn/c_attn"), ("attn.out_proj", "attn/c_proj"),
                                         ("ff.expand", "mlp/c_fc"), ("ff.contract", "mlp/c_proj")):
            yield ours + our_linear + ".weight", theirs + their_linear + "/w", True
            yield ours + our_linear + ".bias", theirs + their_linear + "/b", False
    yield "final_norm.scale", "model/ln_f/g", False
    yield "final_norm.shift", "model/ln_f/b", False


def load_openai_tf(path: str | Path) -> GPT:
    """A GPT with the weights of OpenAI's original release (hparams.json + model.ckpt.* files)."""
    directory = Path(path)
    hparams_file = directory / "hparams.json"
    if not hparams_file.exists():
        raise FileNotFoundError(f"{directory} has no hparams.json: not an OpenAI GPT-2 release directory")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter, not errors
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            "reading OpenAI's TensorFlow checkpoint needs TensorFlow: pip install 'glassgpt[tf]' "
            "(or load the same weights in Hugging Face format, which needs nothing extra)"
        ) from None
    hparams = json.loads(hparams_file.read_text(encoding="utf-8"))
    config = GPTConfig(name=directory.name or "gpt2", vocab_size=hparams["n_vocab"],
                       context_length=hparams["n_ctx"], emb_dim=hparams["n_embd"],
                       n_heads=hparams["n_head"], n_layers=hparams["n_layer"])
    checkpoint = tf.train.latest_checkpoint(str(directory)) or str(directory / "model.ckpt")
    if not Path(checkpoint + ".index").exists():
        raise FileNotFoundError(f"{directory} has hparams.json but no model.ckpt.index checkpoint")
    reader = tf.train.load_checkpoint(checkpoint)
    available = set(reader.get_variable_to_shape_map())
    state = {}
    for our_name, their_name, transposed in openai_tf_names(config):
        if their_name not in available:
            raise ValueError(f"{checkpoint}: variable {their_name} missing")
        array = reader.get_tensor(their_name)
        tensor = torch.from_numpy(array.squeeze(0) if transposed else array)  # Conv1D: (1, in, out)
        state[our_name] = tensor.t().contiguous() if transposed else tensor
    return _build(config, state, checkpoint)

