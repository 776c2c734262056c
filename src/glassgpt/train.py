"""Training: named recipes, their settings (`TrainConfig`), and the `Trainer` that runs them.

    from glassgpt.train import Trainer, recipe
    Trainer(recipe("verdict", out="runs/verdict")).fit()

The loop is the textbook one -- batch -> forward -> cross-entropy -> backward -> AdamW step --
with what a real run needs around it: a learning-rate schedule (warmup, then constant or cosine),
gradient accumulation and clipping, bf16/fp16 autocast, optional torch.compile, evaluation with a
sample continuation, a progress bar, a JSONL metrics log, `loss.png` (`glassgpt.plots`), atomic
checkpoints (`glassgpt.checkpoint`) and exact resume. The `--flags` live in `glassgpt.cli`. Under
torchrun it trains data-parallel:

    torchrun --nproc_per_node 2 -m glassgpt train --recipe verdict --out runs/verdict

Each process reads its own shard of every epoch's windows, gradients are averaged across
processes only on the last micro-batch of an accumulation (`no_sync` before it), and only rank 0
logs and writes. The global batch is batch_size x grad_accum x number of processes. With `--fsdp`
the weights, gradients and optimizer state are sharded instead, and each process writes its
shards of every checkpoint; `glassgpt.distributed` holds all of that.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import ClassVar

import torch
from tqdm import tqdm

from glassgpt import watch
from glassgpt.checkpoint import (
    NoSpaceLeft,
    checkpoint_model,
    has_checkpoint,
    is_disk_full,
    load_checkpoint,
    load_state,
    read_metrics,
    resume_point,
    save_checkpoint,
)
from glassgpt.config import PRESETS, GPTConfig, Settings, get_preset
from glassgpt.data import TokenWindows, load_corpus, make_loader, split_ids
from glassgpt.device import configure_cpu_threads, peak_flops, pick_device, resolve_precision
from glassgpt.distributed import (
    DEFAULT_BUCKET_MB,
    Distributed,
    PeerLost,
    check_parallel_settings,
    full_model_state,
    gradient_sync,
    load_shards,
    lost_peer_error,
    prune_shards,
    save_shards,
    shard,
    wrap_ddp,
)
from glassgpt.hub import GPT2_NAMES, resolve_model
from glassgpt.lora import (
    apply_lora,
    check_settings,
    load_adapters,
    lora_layers,
    merge_lora,
    save_adapters,
    trainable_parameters,
)
from glassgpt.model import GPT
from glassgpt.plots import plot_losses
from glassgpt.tokenizer import Tokenizer

ADAPTERS_FILE = "adapters.safetensors"  # with --save-adapters, beside each checkpoint's model
DEFAULT_SAMPLE_PROMPT = "Every effort moves you"

# ---------------------------------------------------------------- settings and recipes


def setting(default, help: str):
    """A settings field with the help text of its --flag (a list default is copied per config)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig(Settings):
    """Every setting of a training run. Recipes fill these in; the command line overrides any of them."""

    fields_name: ClassVar[str] = "training settings"

    out: str | None = setting(None, "directory for checkpoints, metrics and loss.png (None: keep nothing)")
    # data
    corpus: list[str] = setting([], "text files (or 'bundled:NAME'), or one prepared directory")
    text: str | None = setting(None, "an inline training text instead of a corpus")
    tokenizer: str | None = setting(None, "gpt2 or char (None: the --init-from model's own, else gpt2; "
                                          "ignored for a prepared directory)")
    val_fraction: float = setting(0.1, "the last fraction of the tokens, held out for validation")
    stride: int | None = setting(None, "tokens between window starts (None: the context length)")
    # model
    model: str = setting("verdict-162m", "a preset of glassgpt.config.PRESETS (random weights)")
    init_from: str | None = setting(None, "start from this trained model instead of a preset: its weights, "
                                          "architecture and tokenizer (a GPT-2 name, a glassgpt run or "
                                          "checkpoint, a Hugging Face or OpenAI GPT-2 directory)")
    adapters: str | None = setting(None, "with --init-from: a LoRA adapter file (--save-adapters wrote it) "
                                         "merged into that model before training")
    model_name: str | None = setting(None, "the name saved with the model (None: the preset's, suffixed "
                                           "when resized, or the --init-from model's)")
    context_length: int | None = setting(None, "tokens per window (None: the model's; at most the preset's "
                                               "or the --init-from model's)")
    n_layers: int | None = setting(None, "blocks (None: the preset's)")
    n_heads: int | None = setting(None, "attention heads (None: the preset's)")
    emb_dim: int | None = setting(None, "embedding width (None: the preset's)")
    drop_rate: float | None = setting(None, "dropout (None: the preset's)")
    init: str = setting("gpt2", "random weights: gpt2 (N(0, 0.02), scaled residual projections) or pytorch "
                                "(each layer's PyTorch default, as the tutorial's); unused with --init-from")
    # LoRA: train low-rank adapters beside frozen weights (glassgpt.lora)
    lora_rank: int | None = setting(None, "train LoRA adapters of this rank on attention qkv and output and "
                                          "feed-forward expand and contract, everything else frozen (None: "
                                          "train all weights); checkpoints hold the merged model")
    lora_alpha: float | None = setting(None, "LoRA updates are scaled by alpha / rank (None: alpha = rank)")
    save_adapters: bool = setting(False, "with --lora-rank: also write the adapters alone, "
                                         "adapters.safetensors beside each checkpoint's model")
    # optimisation
    batch_size: int = setting(2, "windows per micro-batch, per process")
    grad_accum: int = setting(1, "micro-batches summed into each optimizer step")
    epochs: int = setting(10, "passes over the training windows")
    max_steps: int | None = setting(None, "optimizer steps to run instead of whole epochs")
    optimizer: str = setting("adamw", "adamw or adam")
    lr: float = setting(4e-4, "peak learning rate")
    weight_decay: float = setting(0.1, "AdamW decay, applied to weight matrices only")
    decay_embeddings: bool = setting(False, "decay the embedding matrices too")
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = setting("constant", "constant or cosine (after the warmup)")
    warmup_steps: int = setting(0, "steps of linear warmup from 0 to lr")
    min_lr_fraction: float = setting(0.1, "cosine decays to lr x this")
    grad_clip: float | None = setting(None, "clip the gradient norm to this (None: no clipping)")
    precision: str = setting("fp32", "fp32, bf16, fp16 (autocast; fp16 on CUDA only), or auto: bf16 where "
                                     "the GPU or CPU computes it natively, else fp32")
    compile: bool = setting(False, "torch.compile the model")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    threads: int | None = setting(None, "CPU threads for torch (None: the usable cores less those other "
                                        "processes keep busy, as for generate and serve)")
    # several processes (torchrun; glassgpt.distributed)
    fsdp: bool = setting(False, "under torchrun: shard weights, gradients and optimizer state across the "
                                "processes (FSDP2, per block) instead of replicating them (DDP)")
    ddp_bucket_mb: float = setting(DEFAULT_BUCKET_MB, "DDP: megabytes of gradients per all-reduce bucket")
    seed: int = 123
    # evaluation, logging, checkpoints
    eval_every: int = setting(0, "steps between evaluations (0: at the end of each epoch)")
    eval_batches: int = setting(5, "fixed batches averaged for the train and validation loss")
    sample_prompt: str = setting(DEFAULT_SAMPLE_PROMPT, "prompt continued at each evaluation (a character "
                                                        "model: its characters the corpus lacks are skipped; "
                                                        "the default is then the corpus's first characters)")
    sample_tokens: int = 25
    sample_temperature: float = setting(0.0, "0: greedy; otherwise seeded sampling")
    log_every: int = setting(1, "steps between metric records (each one syncs with the device)")
    checkpoint_every: int = setting(0, "steps between checkpoints (0: at each evaluation)")
    keep_best: bool = setting(True, "the top-level model is the lowest validation loss (else the last)")
    progress: bool = setting(True, "show a progress bar")
    # watching it learn (glassgpt.watch)
    probe_text: str | None = setting(None, "text whose inside view is recorded at step 0 and each evaluation "
                                           "in probes.jsonl (None: the sample prompt; '': none)")
    tensorboard: str | None = setting(None, "also write the metrics, the gradient norm and each layer's "
                                            "update/weight ratio as TensorBoard scalars to this directory")

    def __post_init__(self) -> None:
        choices = {"init": ("gpt2", "pytorch"), "optimizer": ("adamw", "adam"),
                   "schedule": ("constant", "cosine"), "precision": ("fp32", "bf16", "fp16", "auto")}
        if self.tokenizer is not None:
            choices["tokenizer"] = ("gpt2", "char")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        positive = ("batch_size", "grad_accum", "epochs", "eval_batches", "log_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.tensorboard is not None:
            watch.check_tensorboard()
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        preset = get_preset(self.model)
        self._check_lora()
        check_parallel_settings(self.fsdp, self.lora_rank, self.precision, self.ddp_bucket_mb)
        if self.init_from is not None:
            self._check_init_from()
        elif self.context_length is not None and self.context_length > preset.context_length:
            raise ValueError(
                f"context_length {self.context_length} exceeds the {self.model} preset's "
                f"{preset.context_length} (its position table has no slots beyond that)"
            )

    def _check_lora(self) -> None:
        if self.lora_rank is not None:
            check_settings(self.lora_rank, self.lora_rank if self.lora_alpha is None else self.lora_alpha)
        elif self.lora_alpha is not None or self.save_adapters:
            raise ValueError(f"{'--lora-alpha' if self.lora_alpha is not None else '--save-adapters'} "
                             "needs --lora-rank")
        if self.adapters is not None and self.init_from is None:
            raise ValueError("--adapters are merged into the --init-from model: give --init-from BASE too")

    def _check_init_from(self) -> None:
        """The settings that cannot go with --init-from (its context is checked against the model)."""
        if not self.init_from:
            raise ValueError("init_from is empty: name a model, or leave it out to start from a preset")
        fixed = [f"--{key.replace('_', '-')}" for key in ("n_layers", "n_heads", "emb_dim")
                 if getattr(self, key) is not None]
        if fixed:
            raise ValueError(f"--init-from {self.init_from} trains that model's architecture: "
                             f"{', '.join(fixed)} cannot change it (--context-length may shorten it, "
                             "--drop-rate sets its dropout)")


RECIPES: dict[str, dict] = {
    # The tutorial's run: the 162M model on The Verdict, 2 x 256-token batches, AdamW, 10 epochs.
    # Precision auto: bf16 on a CPU with AVX-512 BF16 is 2-3x faster per step, and its losses stayed
    # within 0.01 of fp32's over the whole run (docs/PERFORMANCE.md).
    "verdict": dict(
        model="verdict-162m", corpus=["bundled:the-verdict.txt"], tokenizer="gpt2",
        batch_size=2, stride=256, val_fraction=0.1, optimizer="adamw", lr=4e-4, weight_decay=0.1,
        epochs=10, init="pytorch", precision="auto", eval_batches=2, sample_prompt="Every effort moves you",
    ),
    # TinyGPT: 2,453 parameters learn "hello hello" from its 7 windows of 4 characters, in seconds.
    "tinygpt": dict(
        model="tinygpt", text="hello hello", tokenizer="char", stride=1, val_fraction=0.0,
        batch_size=7, optimizer="adam", lr=0.01, weight_decay=0.0, epochs=200,
        eval_every=50, eval_batches=1, sample_prompt="hell", sample_tokens=14, progress=False,
    ),
    # A character-level model on Tiny Shakespeare, sized for a laptop CPU (val loss <= 1.9 within
    # minutes). On a GPU, nanoGPT's baby GPT: --n-layers 6 --n-heads 6 --emb-dim 384
    # --context-length 256 --batch-size 64 --drop-rate 0.2 --max-steps 5000 --precision bf16.
    "shakespeare-char": dict(
        model="nano", corpus=["bundled:tinyshakespeare.txt"], tokenizer="char",
        context_length=64, n_layers=4, n_heads=4, emb_dim=128, drop_rate=0.0, stride=1,
        batch_size=16, max_steps=3000, optimizer="adamw", lr=1e-3, weight_decay=0.1, beta2=0.99,
        schedule="cosine", warmup_steps=100, grad_clip=1.0, eval_every=500, eval_batches=20,
        log_every=10, sample_prompt="ROMEO:", sample_tokens=100, sample_temperature=0.8,
    ),
    # The README's main job: the 70M-parameter cut of the verdict model (6 blocks, 512 wide, context
    # 256) learns The Verdict well enough to quote it back in ~2 minutes on a 2-core CPU.
    "demo": dict(
        model="verdict-demo-70m", corpus=["bundled:the-verdict.txt"], tokenizer="gpt2", init="pytorch",
        batch_size=2, val_fraction=0.1, epochs=12, optimizer="adamw", lr=4e-4, weight_decay=0.1,
        precision="auto", eval_every=27, eval_batches=2, sample_prompt="Every effort moves you",
        keep_best=False,
    ),
    # Continue OpenAI's GPT-2 small on The Verdict (nanoGPT's finetune_shakespeare, for our text):
    # its weights, tied head and tokenizer. Context 256 as in the verdict recipe: the story's 514
    # validation tokens hold no window of 1,024, and 256 gives 18 training windows rather than 4.
    # A small lr (5e-5, the tutorial's fine-tuning rate) for 3 epochs (27 steps): the model moves to
    # the story's style without forgetting English; the best validation loss is kept.
    # Needs GPT-2's weights on this machine: `glassgpt download gpt2`.
    "verdict-finetune": dict(
        init_from="gpt2", corpus=["bundled:the-verdict.txt"], tokenizer="gpt2", context_length=256,
        stride=256, batch_size=2, val_fraction=0.1, optimizer="adamw", lr=5e-5, weight_decay=0.1,
        epochs=3, precision="auto", eval_batches=2, sample_prompt="Every effort moves you",
    ),
}


def recipe(name: str, **overrides) -> TrainConfig:
    """The settings of a named recipe, with some replaced."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[name], **overrides})


# ---------------------------------------------------------------- pieces of the loop


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped without overwriting the last checkpoint."""


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
                  min_lr_fraction: float = 0.1) -> float:
    """The fraction of the peak learning rate used for optimizer step `step` (counted from 0).

    Linear warmup over the first `warmup_steps` (step 0 already gets 1 / warmup_steps), then
    either the peak forever (constant) or half a cosine down to `min_lr_fraction` at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_fraction + (1.0 - min_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), decay_embeddings: bool = False,
                   kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or Adam) over the parameters that train (requires_grad), with weight decay on the weight
    matrices only; `glassgpt train` and the fine-tuning runs all build theirs here.

    Biases and LayerNorm scales/shifts are not decayed: shrinking them towards 0 has no
    regularising meaning. Embeddings are left alone too unless `decay_embeddings` is set. Frozen
    parameters (LoRA's base weights, a classifier's lower blocks) are not given to the optimizer at all.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():  # a tied head appears once, as tok_emb
        if not parameter.requires_grad:
            continue
        is_embedding = name.startswith(("tok_emb.", "pos_emb."))
        if parameter.dim() >= 2 and (decay_embeddings or not is_embedding):
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    weight_decay = weight_decay if kind == "adamw" else 0.0
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters: nothing to optimise")
    # The fused kernel updates every tensor of a group in one pass: on a CPU it takes 0.07 s per
    # verdict-162m step where the default loop takes 0.46 s. (Elsewhere, foreach: one kernel per op.)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=lr, betas=betas, **({"fused": True} if fused else {"foreach": True}))


def build_optimizer(model: GPT, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer a training run's settings ask for (`make_optimizer`)."""
    return make_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2),
                          config.decay_embeddings, config.optimizer)


def model_config_for(config: TrainConfig, vocab_size: int) -> GPTConfig:
    """The preset with the run's overrides; the vocabulary always follows the tokenizer."""
    preset = get_preset(config.model)
    overrides = {key: getattr(config, key) for key in ("context_length", "n_layers", "n_heads", "emb_dim",
                                                       "drop_rate") if getattr(config, key) is not None}
    if config.emb_dim is not None and preset.ff_dim is not None:
        overrides["ff_dim"] = 4 * config.emb_dim  # keep GPT-2's 4x expansion when the width changes
    resized = any(key in overrides for key in ("n_layers", "n_heads", "emb_dim"))
    name = config.model_name or (f"{preset.name}-resized" if resized else preset.name)
    return preset.replace(vocab_size=vocab_size, name=name, **overrides)


def pytorch_default_init(model: GPT) -> GPT:
    """Re-initialise every layer as PyTorch would: N(0, 1) embeddings, uniform(+-1/sqrt(fan_in)) linears.

    The tutorial builds its model from plain nn.Embedding / nn.Linear and keeps these defaults.
    On a text as small as The Verdict they memorise far faster than GPT-2's N(0, 0.02): unit-scale
    embeddings give every token and position a distinct code from the first step. (With a tied
    head the shared matrix ends up with the head's initialisation.)
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.reset_parameters()
    return model


def load_init_model(spec: str) -> tuple[GPT, Tokenizer, str]:
    """(model on the CPU in fp32, its tokenizer, where it came from) for `--init-from SPEC`.

    Any trained model `glassgpt generate --model` takes (`glassgpt.hub.resolve_model`); a preset is
    refused, as its weights would be random: that is what `--model` trains.
    """
    if not Path(spec).is_dir():
        if spec in PRESETS and spec not in GPT2_NAMES:
            raise ValueError(f"--init-from {spec}: that is a preset, a shape without trained weights; "
                             f"train it from random weights with --model {spec}")
        if spec not in GPT2_NAMES:
            raise FileNotFoundError(
                f"--init-from {spec}: no such directory, and not a GPT-2 name ({', '.join(GPT2_NAMES)}). "
                "Give a glassgpt run or checkpoint directory, a Hugging Face GPT-2 directory, OpenAI's "
                "TensorFlow release, or a GPT-2 name (`glassgpt download gpt2` fetches its weights)")
    return resolve_model(spec, device="cpu", dtype=torch.float32, presets=False)


def gpt_from_state(config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
    """A GPT of `config` holding the tensors of `state` themselves (no copy, no random initialisation)."""
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True)
    if config.tie_weights:  # assigning made two parameters of the one tied matrix: make them one again
        model.out_head.weight = model.tok_emb.weight
    return model


def reshaped(model: GPT, config: GPTConfig) -> GPT:
    """`model`'s weights in a GPT of `config`: the same architecture, with another dropout or a shorter
    context (the first position vectors are kept: the only positions a shorter window uses)."""
    state = model.state_dict()
    state["pos_emb.weight"] = state["pos_emb.weight"][:config.context_length].clone()
    return gpt_from_state(config, state)


def merged_copy(model: GPT) -> GPT:
    """The plain GPT that a LoRA-wrapped `model` computes: each adapter's (alpha / r) B A added into its
    layer's weight. `model` keeps its adapters (training goes on); the copy shares every other tensor."""
    layers = dict(lora_layers(model))
    state = {name: tensor for name, tensor in model.state_dict().items()
             if name.rpartition(".")[0] not in layers and name.rpartition(".base.")[0] not in layers}
    with torch.no_grad():
        for name, layer in layers.items():
            # (LoRALinear.merged() would build an nn.Linear, whose initialisation draws random numbers:
            # that would shift the dropout masks of a run that saves against one that resumes.)
            state[f"{name}.weight"] = layer.base.weight + layer.delta_weight().to(layer.base.weight.dtype)
            if layer.base.bias is not None:
                state[f"{name}.bias"] = layer.base.bias.detach()
    return gpt_from_state(model.config, state)


def check_tokenizer(tokenizer: Tokenizer, model_tokenizer: Tokenizer, spec: str) -> None:
    """Refuse a prepared corpus's tokenizer other than the one the --init-from model was trained with."""
    if tokenizer.to_dict() != model_tokenizer.to_dict():
        raise ValueError(f"the prepared corpus is tokenized with {tokenizer.name} ({tokenizer.vocab_size:,} "
                         f"ids), but --init-from {spec} was trained with {model_tokenizer.name} "
                         f"({model_tokenizer.vocab_size:,} ids): the same ids would mean other tokens; "
                         f"prepare it with --tokenizer {model_tokenizer.name}")


def flops_per_token(model_config: GPTConfig, n_parameters: int, n_trainable: int | None = None) -> float:
    """Training FLOPs per token: 6 per parameter (forward 2, backward 2 for the input's gradient and 2
    for the weight's; frozen weights skip the last) plus attention's scores."""
    c = model_config
    n_trainable = n_parameters if n_trainable is None else n_trainable
    return 4 * n_parameters + 2 * n_trainable + 12 * c.n_layers * c.emb_dim * c.context_length


# ---------------------------------------------------------------- the trainer


class Trainer:
    """Runs one `TrainConfig`: `Trainer(config).fit()`; `Trainer(config, resume=True)` continues `config.out`.

    `build_model` makes the model (from a preset, or from the `init_from` model that `_load_start`
    reads); everything around it (optimizer, schedule, precision, data-parallel, evaluation, metrics,
    checkpoints) works on whatever model it returns.
    """

    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.dist = Distributed.from_env()
        # The same thread policy as decoding (device.configure_cpu_threads, issue 16): --threads, else
        # the cores other processes leave free now. Training's many short parallel regions stall as
        # decoding's do when a core is busy: the demo took 5.44 s/step with 2 threads beside a busy
        # process, 2.34 with 1.
        configure_cpu_threads(config.threads)
        self.device = pick_device(config.device, self.dist.local_rank)
        self.dist.start(self.device)
        self.out = Path(config.out) if config.out else None
        # Called with the trainer after each optimizer step and its metric record (before any
        # evaluation): how `glassgpt demo` times its first steps to say how long the run will take.
        self.step_hooks: list[Callable[[Trainer], None]] = []
        if self.out and not resume and has_checkpoint(self.out):
            raise ValueError(f"{self.out} already holds a training checkpoint: pass --resume to continue it, "
                             "or choose another --out")
        self._setup_precision()
        self._load_start(resume)
        self._setup_data()

        torch.manual_seed(config.seed)  # the same initial weights (and LoRA A matrices) on every process
        self.model = self.build_model()
        if config.lora_rank is not None:  # bad ranks fail here, before anything is written
            apply_lora(self.model, config.lora_rank, config.lora_alpha)
        self.model = self.model.to(self.device)
        self.trainable_parameters = trainable_parameters(self.model)
        if self.dist.rank:  # but different dropout masks
            torch.manual_seed(config.seed + self.dist.rank)
        self.train_model = self.model
        if self.dist.world_size > 1 and config.fsdp:
            shard(self.model, self.precision)  # in place, before the optimizer sees its parameters
        elif self.dist.world_size > 1:
            self.train_model = wrap_ddp(self.model, self.device, config.ddp_bucket_mb,
                                        static_graph=not config.compile and config.grad_accum == 1)
        if config.compile:  # around DDP, not inside it (glassgpt.distributed says why)
            self.train_model = torch.compile(self.train_model)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_multiplier(
            step, self.total_steps, config.warmup_steps, config.schedule, config.min_lr_fraction))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        self.step = 0
        self.best_val = math.inf
        self.last_checkpoint_step: int | None = None
        self.records: list[dict] = []
        self.flops_per_step = (flops_per_token(self.model.config, self.model.num_parameters(),
                                               self.trainable_parameters) * self.tokens_per_step)
        self.peak_flops = peak_flops(self.device)
        if resume:
            self._load_checkpoint()
        elif self.out and self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("", encoding="utf-8")
            (self.out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2),
                                                        encoding="utf-8")
        self.watch = watch.attach(self, resume)  # probes.jsonl (step 0 now) and --tensorboard

    # ------------------------------------------------------------ setup

    def build_model(self) -> GPT:
        """The model to train (on the CPU): the `init_from` model (with the run's context and dropout
        where given), else a fresh one from the settings."""
        c = self.config
        if self.start_model is not None:
            start = self.start_model.config
            drop_rate = start.drop_rate if c.drop_rate is None else c.drop_rate
            config = start.replace(context_length=self.context_length, drop_rate=drop_rate,
                                   name=c.model_name or start.name)
            return reshaped(self.start_model, config)
        model = GPT(model_config_for(c, self.tokenizer.vocab_size))
        return pytorch_default_init(model) if c.init == "pytorch" else model

    def _load_start(self, resume: bool) -> None:
        """With `init_from`: the model training starts from, its tokenizer, and the run's context length.

        A resumed run takes the architecture from its own checkpoint (whose weights then replace these)
        and never reads the `init_from` model again: it may have changed or gone since.
        """
        c = self.config
        self.start_model: GPT | None = None
        self.start_tokenizer: Tokenizer | None = None
        self.init_source: str | None = None
        if resume:
            self._check_same_start()
        if not c.init_from:
            self.context_length = c.context_length or get_preset(c.model).context_length
            return
        if resume:
            self.start_model, self.start_tokenizer = checkpoint_model(self.out)
        else:
            self.start_model, self.start_tokenizer, self.init_source = load_init_model(c.init_from)
            if c.adapters:  # a base model + adapters trained on it: start from their merged weights
                merge_lora(load_adapters(self.start_model, c.adapters)).requires_grad_(True)
                self.init_source += f" + adapters {c.adapters}"
        model_config = self.start_model.config
        if model_config.n_classes:
            raise ValueError(f"--init-from {c.init_from} is a classifier ({model_config.n_classes} classes), "
                             "not a language model: `glassgpt finetune classify --model` trains it further")
        if c.context_length is not None and c.context_length > model_config.context_length:
            raise ValueError(f"context_length {c.context_length} exceeds the {model_config.context_length} "
                             f"of --init-from {c.init_from} (its position table has no slots beyond that)")
        if self.start_tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(f"--init-from {c.init_from}: its tokenizer ({self.start_tokenizer.name}) has "
                             f"{self.start_tokenizer.vocab_size:,} ids, but the model has embeddings for "
                             f"{model_config.vocab_size:,}")
        if c.tokenizer is not None and c.tokenizer != self.start_tokenizer.name:
            raise ValueError(f"--tokenizer {c.tokenizer} does not match --init-from {c.init_from}, which was "
                             f"trained with {self.start_tokenizer.name} ({model_config.vocab_size:,} ids): "
                             "the same ids would mean other tokens; leave --tokenizer unset to train with "
                             "the model's own")
        self.context_length = c.context_length or model_config.context_length

    def _check_same_start(self) -> None:
        """A resumed run keeps the starting point and the adapters it was begun with (its saved
        settings say which): its checkpoint holds that model, not another."""
        settings = self.out / "train_config.json"
        if not settings.is_file():
            return
        began = json.loads(settings.read_text(encoding="utf-8"))
        for key in ("init_from", "adapters", "lora_rank", "lora_alpha"):
            if began.get(key) != getattr(self.config, key):
                raise ValueError(f"{self.out} began with {key}={began.get(key)!r}; a resumed run continues "
                                 f"its own checkpoint, so {key} cannot change (to "
                                 f"{getattr(self.config, key)!r})")

    def _setup_precision(self) -> None:
        precision = resolve_precision(self.config.precision, self.device)
        self.precision, self.autocast = precision.name, precision.autocast

    def _setup_data(self) -> None:
        c = self.config
        ids, self.tokenizer = load_corpus(c.corpus, c.tokenizer or "gpt2", c.text,
                                          tokenizer=self.start_tokenizer)
        if self.start_tokenizer is not None:  # a prepared corpus brings its own tokenizer
            check_tokenizer(self.tokenizer, self.start_tokenizer, c.init_from)
        context = self.context_length
        train_ids, val_ids = split_ids(ids, c.val_fraction)
        self.train_set = TokenWindows(train_ids, context, c.stride)
        if len(self.train_set) == 0:
            raise ValueError(
                f"the training text has {len(train_ids)} tokens, fewer than one window of "
                f"{context + 1} (context length + 1): use more text or a smaller --context-length"
            )
        # Evaluation reads non-overlapping windows (whatever the training stride), so its few
        # batches cover as much text as they can rather than one passage shifted a token at a time.
        self.val_set = TokenWindows(val_ids, context, context) if c.val_fraction else None
        if self.val_set is not None and len(self.val_set) == 0:
            self.say(f"note: the validation tokens ({len(val_ids)}) make no window of {context + 1}; "
                     "training without validation")
            self.val_set = None
        d = self.dist
        self.train_loader = make_loader(self.train_set, c.batch_size, train=True, seed=c.seed,
                                        rank=d.rank, world_size=d.world_size)
        # Evaluation reads the same leading windows every time, unshuffled, on every process.
        self.train_eval_loader = make_loader(TokenWindows(train_ids, context, context), c.batch_size,
                                             train=False)
        self.val_loader = make_loader(self.val_set, c.batch_size, train=False) if self.val_set else None
        self.steps_per_epoch = len(self.train_loader) // c.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.train_set)} training windows make no full step of {c.batch_size} x "
                f"{c.grad_accum} x {d.world_size} windows: lower --batch-size or --grad-accum, "
                "or use more text"
            )
        self.total_steps = c.max_steps or c.epochs * self.steps_per_epoch
        # The cadence, in steps, decided once: 0 means evaluate at the end of each epoch and checkpoint
        # at each evaluation. (The last step does both whatever the cadence.)
        self.eval_every = c.eval_every or self.steps_per_epoch
        self.checkpoint_every = c.checkpoint_every or self.eval_every
        self.tokens_per_step = c.batch_size * c.grad_accum * d.world_size * context
        self.prompt_ids = self._sample_prompt_ids(train_ids)
        self.n_train_tokens, self.n_val_tokens = len(train_ids), len(val_ids)

    def _sample_prompt_ids(self, train_ids) -> list[int]:
        """The sample prompt's ids. A character vocabulary holds only the corpus's characters, which may
        lack some of the prompt's (the default "Every effort moves you" needs E, v, y...): the default
        prompt is then the corpus's own first characters, another loses those it cannot encode."""
        prompt = self.config.sample_prompt
        if not prompt or self.tokenizer.name != "char":
            return self.tokenizer.encode(prompt) if prompt else []

        def encodable(ch: str) -> bool:
            try:
                return bool(self.tokenizer.encode(ch))
            except ValueError:
                return False

        missing = sorted({ch for ch in prompt if not encodable(ch)})
        if not missing:
            return self.tokenizer.encode(prompt)
        kept = "".join(ch for ch in prompt if ch not in missing)
        lacks = f"the corpus has no {', '.join(map(repr, missing))}, which the sample prompt {prompt!r} needs"
        if prompt == DEFAULT_SAMPLE_PROMPT or not kept:
            ids = [int(i) for i in train_ids[:min(len(prompt), self.context_length)]]
            self.say(f"note: {lacks}: sampling from the corpus's first characters, "
                     f"{self.tokenizer.decode(ids)!r}, instead (--sample-prompt sets another)")
            return ids
        self.say(f"warning: {lacks}: sampling from {kept!r}, without them")
        return self.tokenizer.encode(kept)

    # ------------------------------------------------------------ the loop

    def say(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def batches(self, start_step: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The micro-batches of each optimizer step from `start_step` on, epoch after epoch.

        The order depends only on (seed, epoch), so starting at step k mid-epoch gives exactly
        the batches an uninterrupted run sees at step k.
        """
        accum = self.config.grad_accum
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            self.train_loader.sampler.set_epoch(epoch)
            loader = iter(self.train_loader)
            for _ in islice(loader, offset * accum):  # skip the steps already taken
                pass
            for _ in range(offset, self.steps_per_epoch):
                yield [next(loader) for _ in range(accum)]
            epoch, offset = epoch + 1, 0

    def train_step(self, micro_batches) -> torch.Tensor:
        """One optimizer step over the micro-batches; returns the mean loss (a tensor: no sync)."""
        accum = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for index, (inputs, targets) in enumerate(micro_batches):
            if self.device.type == "cuda":
                # A copy from pageable memory first waits for every kernel queued on the GPU: a host
                # sync per micro-batch. From pinned memory it is queued like a kernel.
                inputs, targets = inputs.pin_memory(), targets.pin_memory()
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            # Averaging gradients across processes is needed once per step, on the last micro-batch.
            syncing = index == accum - 1 or self.dist.world_size == 1
            with gradient_sync(self.train_model, syncing), self.autocast():
                # The model computes the loss itself (on a GPU through a vocabulary-padded head).
                loss = self.train_model(inputs, targets=targets) / accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def fit(self, until_step: int | None = None) -> list[dict]:
        """Train to the end of the plan (or stop after `until_step`, keeping the plan's schedule).

        Returns the metric records (also in OUT/metrics.jsonl). Raises TrainingDiverged if the
        loss stops being finite; the last checkpoint on disk is then the last good state.
        """
        c = self.config
        end = self.total_steps if until_step is None else min(until_step, self.total_steps)
        if self.step == 0:
            self._announce()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (c.progress and self.dist.is_main), leave=False)
        self.model.train()
        window_start, window_steps = time.perf_counter(), 0
        try:
            for micro_batches in self.batches(self.step):
                if self.step >= end:
                    break
                lr = self.optimizer.param_groups[0]["lr"]
                loss = self.train_step(micro_batches)
                self.step += 1
                window_steps += 1
                bar.update()
                last = self.step == self.total_steps
                evaluate = self.step % self.eval_every == 0 or last
                if self.step % c.log_every == 0 or evaluate or self.step == end:
                    loss_value = self._mean_across_processes(loss)
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * self.tokens_per_step / elapsed
                    self._check_finite(loss_value)
                    record = self._record("step", train_loss=loss_value, lr=lr,
                                          tokens_per_s=round(tokens_per_s, 1))
                    if self.peak_flops:
                        # Per GPU: the step's FLOPs are spread over world_size devices of this peak.
                        flops_per_s = window_steps * self.flops_per_step / elapsed / self.dist.world_size
                        record["mfu"] = round(flops_per_s / self.peak_flops, 4)
                    if self.device.type == "cuda":  # per GPU: what --fsdp saves (a counter: no sync)
                        peak = torch.cuda.max_memory_allocated(self.device)
                        record["peak_memory_gb"] = round(peak / 2**30, 2)
                    self._log(record)
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                for hook in self.step_hooks:
                    hook(self)
                evaluation = self.evaluate_and_log() if evaluate else None
                if self.step % self.checkpoint_every == 0 or last:
                    self.save(val_loss=evaluation["val_loss"] if evaluation else None)
                if evaluate:
                    # Evaluating and saving are not training speed.
                    window_start, window_steps = time.perf_counter(), 0
        except KeyboardInterrupt:
            self.say(f"interrupted at step {self.step}: {self._where_to_resume()}")
            raise
        except Exception as error:
            if self.out and is_disk_full(error):
                # One line that says what happened and what is safe; the write cleaned up after itself.
                where = (f"the checkpoint of step {self.last_checkpoint_step} is intact in "
                         f"{self.out / 'last'}; free some space, then --resume {self.out} continues from it"
                         if self.last_checkpoint_step else "no checkpoint had been written yet")
                raise NoSpaceLeft(f"no space left on {self.out}: {where}") from error
            if self.dist.world_size == 1 or not isinstance(error, RuntimeError) or not lost_peer_error(error):
                raise
            # Another process died (or its machine): every collective now fails. What was saved stays.
            message = (f"rank {self.dist.rank}: another process of this {self.dist.world_size}-process job "
                       f"stopped answering at step {self.step} ({type(error).__name__}: "
                       f"{str(error).splitlines()[0][:200]}); {self._where_to_resume()}")
            tqdm.write(message)
            raise PeerLost(message) from error
        finally:
            bar.close()
        return self.records

    def _where_to_resume(self) -> str:
        if self.out and self.last_checkpoint_step:
            return (f"the checkpoint of step {self.last_checkpoint_step} is in {self.out / 'last'}; "
                    f"--resume {self.out} continues from it")
        return "no checkpoint was written yet"

    def _announce(self) -> None:
        c, m = self.config, self.model.config
        self.say(f"model {m.name}: {self.model.num_parameters():,} parameters ({m.n_layers} blocks, "
                 f"{m.n_heads} heads, emb {m.emb_dim}, context {m.context_length}, vocab {m.vocab_size:,})")
        if self.init_source:
            self.say(f"starting from the weights of {self.init_source}")
        if c.lora_rank is not None:
            settings = self.model.lora_settings
            self.say(f"LoRA rank {settings.rank}, alpha {settings.alpha:g} on {len(settings.modules)} "
                     f"layers: trainable_parameters {self.trainable_parameters:,} (the rest frozen)")
        self.say(f"data: {self.n_train_tokens:,} training tokens -> {len(self.train_set):,} windows; "
                 f"{self.n_val_tokens:,} validation tokens; {self.steps_per_epoch:,} steps per epoch of "
                 f"{self.tokens_per_step:,} tokens; {self.total_steps:,} steps")
        mode = ("" if self.dist.world_size == 1 else
                " (FSDP: sharded)" if c.fsdp else f" (DDP, buckets of {c.ddp_bucket_mb:g} MB)")
        self.say(f"device {self.device} x {self.dist.world_size}{mode}, {self.precision}, {c.optimizer} "
                 f"lr {c.lr:g} ({c.schedule}), out {self.out or '(nothing kept)'}")

    def _mean_across_processes(self, value: torch.Tensor) -> float:
        if self.dist.world_size > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)  # SUM: gloo has no AVG
            value /= self.dist.world_size
        return value.item()

    def _check_finite(self, loss: float) -> None:
        if math.isfinite(loss):
            return
        kept = (f"the last good checkpoint (step {self.last_checkpoint_step}) is kept in {self.out / 'last'}"
                if self.out and self.last_checkpoint_step else "no checkpoint had been written")
        message = (f"the training loss became {loss} at step {self.step}; training stopped and {kept}. "
                   "Try a lower --lr, --grad-clip 1.0, or --precision fp32")
        self.say(message)
        raise TrainingDiverged(message)

    def _record(self, event: str, **values) -> dict:
        return {"event": event, "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3),
                "tokens": self.step * self.tokens_per_step, **values}

    def _log(self, record: dict) -> None:
        self.watch.on_record(record)
        self.records.append(record)
        if self.out and self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Mean loss over the first `eval_batches` training and validation batches (dropout off)."""
        was_training = self.model.training
        self.model.eval()
        losses: dict[str, float | None] = {}
        for name, loader in (("train_loss", self.train_eval_loader), ("val_loss", self.val_loader)):
            if loader is None:
                losses[name] = None
                continue
            total, count = torch.zeros((), device=self.device), 0
            for inputs, targets in islice(loader, self.config.eval_batches):
                with self.autocast():
                    total += self.model(inputs.to(self.device), targets=targets.to(self.device))
                count += 1
            losses[name] = (total / count).item()
        self.model.train(was_training)
        return losses

    @torch.no_grad()
    def sample(self) -> str:
        """The sample prompt continued by the current model (greedy, or seeded sampling)."""
        if not self.prompt_ids:
            return ""
        c, context = self.config, self.model.config.context_length
        ids = torch.tensor([self.prompt_ids[-context:]], device=self.device)
        with self.autocast():
            out = self.model.generate(ids, c.sample_tokens, temperature=c.sample_temperature,
                                      top_k=50 if c.sample_temperature else None, seed=c.seed)
        return self.tokenizer.decode(out[0].tolist())

    def evaluate_and_log(self) -> dict:
        losses = self.evaluate()
        # Sharded, the model runs only with every process taking part.
        text = self.sample() if self.dist.is_main or self.config.fsdp else ""
        record = self._record("eval", **losses, lr=self.optimizer.param_groups[0]["lr"], sample=text)
        self._log(record)
        self.watch.on_eval(self.model, self.step)
        val = f" | val {losses['val_loss']:.3f}" if losses["val_loss"] is not None else ""
        self.say(f"step {self.step:>5} | epoch {record['epoch']:g} | train {losses['train_loss']:.3f}{val} | "
                 f"{' '.join(text.split())!r}")
        if self.out and self.dist.is_main:
            plot_losses(self.records, self.out / "loss.png")
        return record

    # ------------------------------------------------------------ checkpoints

    def save(self, val_loss: float | None = None) -> None:
        """Write OUT/last, and OUT/best + the top level when `val_loss` (this step's) is the lowest yet.

        With --no-keep-best, or no validation set, every checkpoint is the best one.
        """
        sharded = self.config.fsdp and self.dist.world_size > 1
        if not self.out or not (self.dist.is_main or sharded):
            return
        if self.config.keep_best and val_loss is not None:
            best = val_loss < self.best_val
        else:
            best = not self.config.keep_best or self.val_set is None
        if best and val_loss is not None:
            self.best_val = min(self.best_val, val_loss)
        state = {
            "step": self.step,
            "best_val": self.best_val,
            "config": self.config.to_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "init_from_source": self.init_source,
        }
        c = self.config
        training = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "val_loss": val_loss,
                    "trainable_parameters": self.trainable_parameters}
        if c.init_from:  # where the weights came from (the preset's name means nothing then)
            training.update(init_from=c.init_from, init_from_source=self.init_source)
        else:
            training["recipe_model"] = c.model
        model, more_files = self.model, {}
        if sharded:
            # Every process writes its shards of the weights and optimizer state; rank 0 then the whole
            # model, as ordinary model files (generate, serve, export), and `last` naming the shards.
            state["shards"] = save_shards(self.out, self.step, self.model, self.optimizer)
            full = full_model_state(self.model)
            if not self.dist.is_main:
                self.last_checkpoint_step = self.step
                return
            model = gpt_from_state(self.model.config, full)
        else:
            state["optimizer"] = self.optimizer.state_dict()
        if c.lora_rank is not None:
            # Every saved model is an ordinary one, the adapters merged in. Resuming needs the unmerged
            # weights and adapters themselves (W + (alpha / r) B A cannot be split back exactly): the
            # trainer state keeps them.
            settings = self.model.lora_settings
            training["lora"] = {"rank": settings.rank, "alpha": settings.alpha,
                                "targets": list(settings.targets)}
            state["model_state"] = {name: t.detach().cpu() for name, t in self.model.state_dict().items()}
            model = merged_copy(self.model)
            if c.save_adapters:
                more_files[ADAPTERS_FILE] = lambda directory: save_adapters(self.model,
                                                                            directory / ADAPTERS_FILE)
        try:
            save_checkpoint(self.out, model, self.tokenizer, state=state, best=best,
                            extra={"training": training}, more_files=more_files)
        except NoSpaceLeft as error:
            if error.last_saved:  # best/ or the top level failed, after last/ was written
                self.last_checkpoint_step = self.step
            raise
        if sharded:
            prune_shards(self.out, keep=state["shards"])
        self.last_checkpoint_step = self.step

    def _load_checkpoint(self) -> None:
        sharded = self.config.fsdp and self.dist.world_size > 1
        _, fallback = resume_point(self.out)  # last/, or best/ when last/ is damaged: say so
        if fallback:
            self.say(f"note: {fallback}")
        if sharded:
            state = load_state(self.out)
            if "shards" not in state:
                raise ValueError(f"{self.out} was trained without --fsdp: resume it without --fsdp")
            load_shards(self.out / state["shards"], self.model, self.optimizer)
        else:
            state = load_checkpoint(self.out, self.model)
            if "shards" in state:
                raise ValueError(f"{self.out} was trained sharded (--fsdp): resume it under torchrun, on 2 "
                                 "or more processes")
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = self.last_checkpoint_step = state["step"]
        self.best_val = state["best_val"]
        self.init_source = state.get("init_from_source")
        if self.dist.is_main:
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            if state["rng"]["cuda"] and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        else:
            torch.manual_seed(self.config.seed + self.dist.rank + 7919 * self.step)
        # Keep the metrics up to the checkpoint; later ones belong to the run that was cut short.
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            records, dropped = read_metrics(metrics)  # a line cut short by a full disk is dropped
            if dropped:
                self.say(f"note: {dropped}")
            self.records = [r for r in records if r["step"] <= self.step]
            if self.dist.is_main:
                metrics.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
        self.say(f"resumed {self.out} at step {self.step} of {self.total_steps}")


def saved_config(out: str | Path) -> TrainConfig:
    """The settings of the run checkpointed in `out` (to resume it)."""
    return TrainConfig.from_dict(load_state(out)["config"])


def train(config: TrainConfig, resume: bool = False) -> Trainer:
    """Run `config` to the end (continuing `config.out` if `resume`) and return the trainer."""
    trainer = Trainer(config, resume=resume)
    trainer.fit()
    return trainer
