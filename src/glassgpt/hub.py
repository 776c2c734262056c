"""Finding a model by what the user types: the one resolver behind every `--model` argument.

A `--model` (or `GPT.from_pretrained`) argument is, in the order tried:

1. a directory: a glassgpt checkpoint or run directory, a Hugging Face GPT-2 directory, or OpenAI's
   original TensorFlow release (`weights.py` reads the formats);
2. the name of one of OpenAI's four GPT-2 sizes, found on this machine in `models/NAME/` or in the
   Hugging Face cache (nothing is downloaded: `glassgpt download NAME` does that);
3. a preset name: random weights of that shape, to try the pipeline.

`check_model_spec` answers "can this be loaded?" without reading any weights, so a server or a
command can refuse bad input before heavy work starts; `resolve_model` loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError

from glassgpt import int8
from glassgpt.config import PRESETS
from glassgpt.model import GPT
from glassgpt.tokenizer import get_tokenizer
from glassgpt.weights import load_model, model_format

# ---------------------------------------------------------------- OpenAI's GPT-2, by name

GPT2_REPOS = {  # the four released sizes and where the Hugging Face Hub keeps them
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
GPT2_NAMES = tuple(GPT2_REPOS)
GPT2_FILES = ["config.json", "model.safetensors"]
LOCAL_MODELS_DIR = Path("models")  # `models/gpt2/` next to where glassgpt runs is found by name

# How weights are held in memory, by the names the commands take. int8 is loaded in float32 and
# then quantised (`quantize_int8`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}


def _check_gpt2_name(name: str) -> None:
    if name not in GPT2_REPOS:
        raise ValueError(f"unknown GPT-2 name {name!r}; choose one of: {', '.join(GPT2_NAMES)}")


def _hand_placement_help(name: str) -> str:
    return (f"place the files by hand: download {' and '.join(GPT2_FILES)} from "
            f"https://huggingface.co/{GPT2_REPOS[name]}/tree/main into {LOCAL_MODELS_DIR / name}/ "
            f"(found by name) or any directory you then pass as --model DIR")


def find_gpt2(name: str) -> Path | None:
    """The directory of a GPT-2 already on this machine: `models/NAME/`, else the Hugging Face cache."""
    _check_gpt2_name(name)
    local = LOCAL_MODELS_DIR / name
    if (local / "config.json").exists():
        return local
    for repo in (GPT2_REPOS[name], name):  # the Hub's current id, and the legacy one ("gpt2")
        config_path = try_to_load_from_cache(repo, "config.json")
        if isinstance(config_path, str):
            snapshot = Path(config_path).parent
            if any((snapshot / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
                return snapshot
    return None


def download_gpt2(name: str, directory: str | Path | None = None) -> Path:
    """Fetch OpenAI's GPT-2 `name` from the Hugging Face Hub: into `directory`, else the HF cache.

    Returns the directory holding config.json + model.safetensors. Without network (or with
    HF_HUB_OFFLINE=1) it fails at once with a ConnectionError that says how to place the files by hand.
    """
    _check_gpt2_name(name)
    try:
        path = snapshot_download(GPT2_REPOS[name], allow_patterns=GPT2_FILES,
                                 local_dir=str(directory) if directory else None)
    except (HfHubHTTPError, OSError) as error:  # offline, unreachable, refused, or no such repo
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConnectionError(
            f"could not download {name} from the Hugging Face Hub ({reason}).\n"
            f"To use it offline, {_hand_placement_help(name)}."
        ) from None
    return Path(path)


# ---------------------------------------------------------------- the resolver

def _locate(spec: str, presets: bool = True) -> tuple[str, Path | None]:
    """("directory" | "gpt2" | "preset", the directory to read) for `spec`, reading no weights.

    Raises FileNotFoundError or ValueError, saying what to do, for anything that cannot load.
    """
    if Path(spec).is_dir():
        model_format(Path(spec))  # a directory that holds no model fails here, not after a wait
        return "directory", Path(spec)
    if spec in GPT2_REPOS:
        directory = find_gpt2(spec)
        if directory is None:
            raise FileNotFoundError(f"{spec} is not on this machine. Run `glassgpt download {spec}` or "
                                    f"{_hand_placement_help(spec)}")
        return "gpt2", directory
    if spec in PRESETS:
        if not presets:
            raise ValueError(f"{spec} is a preset, a shape without trained weights; "
                             f"GPT.from_preset({spec!r}) builds it with random weights")
        vocab_size, gpt2_vocab_size = PRESETS[spec].vocab_size, get_tokenizer("gpt2").vocab_size
        if vocab_size < gpt2_vocab_size:
            usable = ", ".join(name for name, c in PRESETS.items() if c.vocab_size >= gpt2_vocab_size)
            raise ValueError(f"preset {spec} has a vocabulary of {vocab_size:,}, too small for GPT-2's "
                             f"{gpt2_vocab_size:,} tokens, the only tokenizer a preset comes with; use a "
                             f"checkpoint trained from it (glassgpt train --recipe ...) or a preset with "
                             f"GPT-2's vocabulary: {usable}")
        return "preset", None
    raise FileNotFoundError(
        f"no model at {spec!r}: it is neither a directory, a GPT-2 name ({', '.join(GPT2_NAMES)}) nor a "
        f"preset ({', '.join(PRESETS)}). Train one with `make demo` (it writes runs/demo), or give a "
        f"checkpoint directory, a GPT-2 on this machine (--model gpt2) or a preset for random weights "
        f"(--model verdict-162m)"
    )


def check_model_spec(spec: str | Path) -> None:
    """Raise FileNotFoundError or ValueError, saying what to do, unless `spec` names a model that
    `resolve_model` can load; cheap (no weights are read), so callers check before heavy work."""
    _locate(str(spec))


def resolve_model(spec: str | Path, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype | None = None, presets: bool = True):
    """(model in eval mode, tokenizer, description) for a --model argument (see the module's docstring).

    `dtype`: a torch dtype or a name in `DTYPES`; "int8" quantises the Linear layers after loading
    (CPU only). `presets=False` refuses preset names, for callers that want trained weights.
    """
    spec = str(spec)
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    int8 = dtype == "int8"
    if int8 and torch.device(device).type != "cpu":
        raise ValueError("int8 weight-only quantisation needs an fp32 model on the CPU")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    kind, directory = _locate(spec, presets)
    if kind == "preset":
        model, tokenizer = GPT.from_preset(spec), get_tokenizer("gpt2")
        model = model.to(device=device, dtype=torch_dtype) if torch_dtype else model.to(device)
        description = f"preset {spec} (random weights)"
    else:
        model, tokenizer = load_model(directory, device, torch_dtype)
        description = f"{spec} ({model.config.name})" if kind == "directory" else f"{spec} from {directory}"
    if int8:
        model = quantize_int8(model)
        description += ", int8"
    return model.eval(), tokenizer, description


def quantize_int8(model: GPT, head: bool = True) -> GPT:
    """`model` with every Linear layer held as int8 weights with a float32 scale per output row, in
    place (`glassgpt.int8`: weight-only, activations stay float32; CPU only).

    Weights are read as int8, a quarter of the bytes of fp32, and decoding on a CPU is bound by
    reading weights; only the weights are rounded, so the logits stay within a small documented
    distance of fp32's (docs/PERFORMANCE.md). Embeddings and norms stay fp32; `head=False` keeps
    the output head fp32 too.
    """
    return int8.quantize_int8(model, head=head)
