"""LoRA: fine-tune a large model by training two thin matrices next to each frozen weight.

A linear layer computes y = W x + b with W of shape (out, in). Fine-tuning all of W means storing a
gradient and two Adam moments for every one of its out * in numbers. LoRA (low-rank adaptation,
Hu et al. 2021) freezes W and learns a *change* to it that has rank r:

    y = W x + b + (alpha / r) * B A x        A: (r, in), B: (out, r), r much smaller than in and out

so only r * (in + out) numbers train. A starts random and B starts at zero, so at step 0 the
adapted layer computes exactly what the original did, and training moves away from there.
alpha / r scales the update: with alpha fixed, changing r does not change how big the first steps
are, so a learning rate found at one rank carries over to another.

After training, B A is an ordinary (out, in) matrix: `merge_lora` adds (alpha / r) B A into W, and
the model is again a plain GPT that every loader, exporter and generator understands.

The shapes and the initialisation follow Hugging Face's `peft` (A is (r, in) with Kaiming-uniform
values, a = sqrt(5), as nn.Linear initialises its own weight; B is zeros; scale alpha / r), so a
test can give both the same starting values and compare a training step. The tutorial's appendix E
stores A as (in, r) and B as (r, out) and multiplies by alpha itself rather than by alpha / r: with
its rank=16, alpha=16, its scale is 16; here alpha=256 at rank 16 gives that same scale.

    model = apply_lora(GPT.from_preset("gpt2"), rank=8)     # wraps attention and feed-forward
    trainable_parameters(model)                             # 1,179,648
    ... train ...
    save_adapters(model, "adapters.safetensors")            # a few MB: A, B and the settings
    merge_lora(model)                                       # a plain GPT again, ready to save
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# The four matrices of every transformer block (module names in glassgpt.model): the attention's
# fused query/key/value projection and output projection, the feed-forward's expand and contract.
DEFAULT_TARGETS = ("qkv", "out_proj", "expand", "contract")

# Key of the JSON settings in the adapter file's safetensors header.
METADATA_KEY = "glassgpt_lora"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + (alpha / rank) * x A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        alpha = default_alpha(rank) if alpha is None else alpha
        check_settings(rank, alpha, dropout)
        if rank > min(base.in_features, base.out_features):
            raise ValueError(f"LoRA rank {rank} is larger than the layer: a ({base.out_features} x "
                             f"{base.in_features}) matrix has rank at most "
                             f"{min(base.in_features, base.out_features)}")
        self.base = base
        base.requires_grad_(False)  # the pretrained weight and bias never change
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        weight = base.weight
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.empty(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        # Dropout on the adapter's input only (as peft's lora_dropout): the frozen path sees x unchanged.
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A: Kaiming-uniform (bound 1 / sqrt(in), as nn.Linear's own weight); B: zeros, so B A = 0."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x A^T is (..., rank): the input squeezed through r directions, then B^T lifts it back to
        # (..., out). Two thin products instead of materialising the (out, in) matrix B A.
        return self.base(x) + self.scaling * (self.dropout(x) @ self.A.T @ self.B.T)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) * B A: the (out, in) change this adapter makes to the base weight."""
        return self.scaling * (self.B @ self.A)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """An ordinary nn.Linear with weight W + (alpha / rank) B A (computed in fp32) and the same bias."""
        base = self.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        # In fp32 so that a bf16 model's small update is not rounded away before it is added.
        delta = self.scaling * (self.B.float() @ self.A.float())
        merged.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(base.weight.requires_grad)
        return merged

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


@dataclass(frozen=True)
class LoRASettings:
    """What `apply_lora` did to a model; kept as `model.lora_settings` and saved with the adapters."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    trainable: tuple[str, ...] = ()
    dropout: float = 0.0
    modules: tuple[str, ...] = ()  # the full names of the wrapped linears, e.g. "blocks.0.attn.qkv"


def default_alpha(rank: int) -> float:
    """alpha = rank, a scale alpha / rank of 1: peft's defaults (r=8, lora_alpha=8) and the pairing
    of the tutorial's appendix E (rank=16, alpha=16). A common alternative is alpha = 2 * rank."""
    return float(rank)


def check_settings(rank, alpha, dropout: float = 0.0) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0 or math.isinf(alpha):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _matches(name: str, patterns) -> bool:
    """A pattern names a module by its last parts: "qkv" and "attn.qkv" both match "blocks.3.attn.qkv"."""
    return any(name == pattern or name.endswith("." + pattern) for pattern in patterns)


def _as_names(value, what: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if any(not isinstance(name, str) or not name for name in names):
        raise ValueError(f"LoRA {what} must be module names, got {value!r}")
    return names


def find_targets(model: nn.Module, rank: int, targets=DEFAULT_TARGETS) -> list[str]:
    """The full names of the linears `apply_lora` would wrap; errors if any target is unusable.

    Runs before anything is changed, so bad settings leave the model as it was.
    """
    targets = _as_names(targets, "targets")
    if not targets:
        raise ValueError("LoRA needs at least one target module")
    if getattr(model, "lora_settings", None) is not None:
        raise ValueError("this model already has LoRA adapters; merge_lora(model) first, or train these")
    # Parameters held by more than one module (a tied head and token embedding) cannot be wrapped:
    # merging would change the shared matrix for both.
    holders: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            holders[id(parameter)] = holders.get(id(parameter), 0) + 1
    found: list[str] = []
    for name, module in model.named_modules():
        if not _matches(name, targets):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not a linear layer")
        if name.split(".")[-1] == "out_head":
            # GPT.next_token_loss reads out_head.weight directly, so an adapter there would be
            # skipped by the training loss; train a head whole instead.
            raise ValueError("LoRA cannot wrap the output head (the loss reads its weight directly); "
                             "pass trainable=('out_head',) to train it whole")
        if holders[id(module.weight)] > 1:
            raise ValueError(f"LoRA target {name!r} shares its weight with another module (tied weights)")
        out_features, in_features = module.out_features, module.in_features
        if rank > min(in_features, out_features):
            raise ValueError(f"LoRA rank {rank} is larger than the layer {name!r}: a ({out_features} x "
                             f"{in_features}) matrix has rank at most {min(in_features, out_features)}")
        found.append(name)
    missing = [t for t in targets if not any(_matches(name, (t,)) for name in found)]
    if missing:
        linears = sorted({name.split(".")[-1] for name, m in model.named_modules()
                          if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {missing} match no module; "
                         f"linear layers are named: {', '.join(linears)}")
    return found


def apply_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, targets=DEFAULT_TARGETS,
               trainable=(), dropout: float = 0.0) -> nn.Module:
    """Wrap the target linears of `model` in `LoRALinear` and freeze everything else; returns `model`.

    `targets`: module names or name endings (default: attention `qkv` and `out_proj`, feed-forward
    `expand` and `contract`, in every block). `trainable`: modules trained whole, e.g. a classification
    head `("out_head",)` (a head tied to the token embedding trains the embedding too). `alpha`
    defaults to `rank` (scale 1, see `default_alpha`). Bad settings raise before the model changes.
    """
    alpha = default_alpha(rank) if alpha is None else alpha
    check_settings(rank, alpha, dropout)
    targets, trainable = _as_names(targets, "targets"), _as_names(trainable, "trainable modules")
    names = find_targets(model, rank, targets)
    modules = dict(model.named_modules())
    unknown = [t for t in trainable if not any(_matches(name, (t,)) for name in modules if name)]
    if unknown:
        raise ValueError(f"trainable modules {unknown} match no module of the model")

    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(modules[name], rank, alpha, dropout))
    for name, module in modules.items():
        if name and _matches(name, trainable):
            module.requires_grad_(True)
    model.lora_settings = LoRASettings(rank=rank, alpha=float(alpha), targets=targets, trainable=trainable,
                                       dropout=dropout, modules=tuple(names))
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers training updates (parameters with requires_grad; a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by an ordinary nn.Linear holding W + (alpha / r) B A; returns `model`.

    Other parameters keep their requires_grad flags. The model computes the same outputs (up to
    rounding), and its state dict has the names of a model that never had adapters.
    """
    for name, module in lora_layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merged())
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything training changes: each adapter's A and B ("blocks.0.attn.qkv.A") and the parameters
    of the modules trained whole (e.g. "out_head.weight"), detached."""
    if getattr(model, "lora_settings", None) is None:
        raise ValueError("this model has no LoRA adapters (apply_lora first)")
    return {name: parameter.detach() for name, parameter in model.named_parameters()
            if parameter.requires_grad}


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write `lora_state_dict(model)` as safetensors, with the settings as JSON in its header.

    Written to a temporary file and renamed, so a failure never leaves half a file over a good one.
    """
    path = Path(path)
    state = {name: tensor.contiguous().cpu() for name, tensor in lora_state_dict(model).items()}
    settings = asdict(model.lora_settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(state, temporary, metadata={METADATA_KEY: json.dumps(settings)})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def read_adapters(path: str | Path) -> tuple[LoRASettings, dict[str, torch.Tensor]]:
    """The settings and tensors of an adapter file written by `save_adapters`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a safetensors file: {error}") from error
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} holds no glassgpt LoRA settings (was it written by save_adapters?)")
    raw = json.loads(metadata[METADATA_KEY])
    settings = LoRASettings(rank=raw["rank"], alpha=raw["alpha"], targets=tuple(raw["targets"]),
                            trainable=tuple(raw.get("trainable", ())), dropout=raw.get("dropout", 0.0),
                            modules=tuple(raw.get("modules", ())))
    return settings, tensors


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply LoRA to `model` with the settings saved in `path`, then load A, B (and the modules trained
    whole). Every name and shape is checked before the model is changed."""
    settings, tensors = read_adapters(path)
    current = getattr(model, "lora_settings", None)
    if current is not None and current != settings:
        raise ValueError(f"this model already has different LoRA adapters ({current}); "
                         f"load {path} into the base model")
    if current is None:
        names = find_targets(model, settings.rank, settings.targets)
        if settings.modules and tuple(names) != settings.modules:
            only_file = sorted(set(settings.modules) - set(names))
            only_model = sorted(set(names) - set(settings.modules))
            raise ValueError(f"the adapters in {path} do not fit this model: "
                             f"targets {list(settings.targets)} match {len(names)} layers here, "
                             f"{len(settings.modules)} in the file "
                             f"(only in the file: {only_file[:4]}, only here: {only_model[:4]})")
        # The shapes A and B and the whole-trained parameters will have once LoRA is applied.
        modules = dict(model.named_modules())
        expected = {}
        for name in names:
            linear = modules[name]
            expected[f"{name}.A"] = (settings.rank, linear.in_features)
            expected[f"{name}.B"] = (linear.out_features, settings.rank)
        # Named as named_parameters names them (a head tied to the embedding is "tok_emb.weight").
        whole = {id(p) for name, module in modules.items() if name and _matches(name, settings.trainable)
                 for p in module.parameters()}
        for name, parameter in model.named_parameters():
            if id(parameter) in whole:
                owner, _, leaf = name.rpartition(".")
                # A wrapped linear inside a module trained whole keeps its weight as "....base.weight".
                expected[f"{owner}.base.{leaf}" if owner in names else name] = tuple(parameter.shape)
    else:
        expected = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the adapters in {path} do not fit this model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    wrong = [f"{name}: file {tuple(tensors[name].shape)}, model {shape}"
             for name, shape in expected.items() if tuple(tensors[name].shape) != shape]
    if wrong:
        raise ValueError(f"the adapters in {path} do not fit this model (shapes differ): "
                         f"{'; '.join(wrong[:4])}")

    if current is None:
        apply_lora(model, settings.rank, settings.alpha, settings.targets, settings.trainable,
                   settings.dropout)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    return model
