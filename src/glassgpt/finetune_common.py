"""What the two fine-tuning runs share: `glassgpt.classify` (chapter 6), `glassgpt.instruct` (chapter 7).

Each brings its own head, data, loss and evaluation; around them both do the same things, kept here:
- `FinetuneSettings`: the flags they share (optimisation, precision, device, LoRA, evaluation), checked
  once; each run's settings add their own;
- `check_out_dir`: an output directory is new, empty or (where a run may replace it) an earlier
  output of the same kind, never a directory of other files; `write_output` builds it under a
  temporary name and swaps it in only when the run has written everything;
- `prepare_training`: the model on its device with what trains chosen, LoRA adapters
  (`glassgpt.lora`) as the settings ask, checked first, and the optimizer; `merge_adapters` writes
  the adapters alone if asked, then merges them into the weights, so that what is saved is an
  ordinary model every loader reads;
- `train_steps`: the optimizer steps (autocast, fp16 loss scaling, a finite-loss check, a progress
  bar), each handed back to the caller, which records it and evaluates when one is due;
- `Metrics`: the run's records, appended to metrics.jsonl as they come.
The optimizer is `glassgpt.train.make_optimizer` and the precision `glassgpt.device.resolve_precision`,
the same as `glassgpt train`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from tqdm import tqdm

from glassgpt import lora
from glassgpt.checkpoint import write_directory_atomically
from glassgpt.config import Settings
from glassgpt.device import (
    PRECISIONS,
    Precision,
    configure_cpu_threads,
    pick_device,
    resolve_precision,
)
from glassgpt.train import TrainingDiverged, make_optimizer, setting
from glassgpt.weights import GLASSGPT_META, WEIGHTS_FILE

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
ADAPTERS_FILE = "adapters.safetensors"

T = TypeVar("T")

# ---------------------------------------------------------------- settings


@dataclass
class FinetuneSettings(Settings):
    """The settings every fine-tuning run has; each field is the `--flag` of the same name and means
    what it means for `glassgpt train`. Defaults are the tutorial's: AdamW 5e-5, weight decay 0.1, batch 8."""

    max_length: int | None = setting(None, "tokens per example; longer ones are cut and counted "
                                           "(None: the model's context)")
    epochs: int = setting(2, "passes over the training examples")
    max_steps: int | None = setting(None, "optimizer steps to run instead of whole epochs")
    lr: float = setting(5e-5, "AdamW learning rate")
    batch_size: int = setting(8, "examples per step")
    weight_decay: float = setting(0.1, "AdamW decay, applied to weight matrices only")
    seed: int = setting(123, "seeds everything random: the split, the batch order, new weights (a head, "
                             "LoRA's A) and dropout")
    precision: str = setting("fp32", "fp32, bf16, fp16 (autocast; fp16 on CUDA only), or auto: bf16 where "
                                     "the device computes it natively")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    threads: int | None = setting(None, "CPU threads for torch (None: the usable cores less those other "
                                        "processes keep busy)")
    lora_rank: int | None = setting(None, "train rank-R LoRA adapters on the attention and feed-forward "
                                          "matrices instead of the weights (merged into them when saved)")
    lora_alpha: float | None = setting(None, "LoRA's update is scaled by alpha / rank (None: alpha = rank)")
    save_adapters: bool = setting(False, "also write the LoRA adapters alone (adapters.safetensors)")
    eval_every: int = setting(0, "steps between evaluations (0: at each epoch's end)")
    eval_batches: int = setting(5, "batches measured at each evaluation (the tutorial's eval_iter)")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        for key in ("epochs", "batch_size", "eval_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_length", "max_steps", "lora_rank", "threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1 (or None), got {getattr(self, key)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be 0 or positive, got {self.eval_every}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay}")
        if self.lora_rank is None and (self.lora_alpha is not None or self.save_adapters):
            raise ValueError(f"{'lora_alpha' if self.lora_alpha is not None else 'save_adapters'} "
                             "needs lora_rank")
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha}")


def resolve_max_length(max_length: int | None, config) -> int:
    """The tokens kept per example: `max_length`, at most the model's context (None: the context)."""
    context = config.context_length
    if max_length is not None and max_length > context:
        raise ValueError(f"max_length {max_length} exceeds the model's context length of {context}")
    return max_length or context


def check_tokenizer_fits(tokenizer, config) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size:,} ids but the model's vocabulary only "
                         f"{config.vocab_size:,}: they do not belong together (this tokenizer was not made "
                         "for this model)")


# ---------------------------------------------------------------- the output directory


def check_out_dir(out_dir: str | Path, what: str, replace: bool = False) -> Path:
    """`out_dir` may be new or empty; with `replace`, also an earlier output of the same kind of run
    (it holds results.json), which the finished run replaces whole, and only once it has succeeded.

    Anything else is refused before any work: a directory of other files (or a training run's
    resumable checkpoint) must not vanish because of a typo, and without `replace` a finished
    model is never written over. `what` names the run's kind ("a classifier") in the message.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (replace and (out / RESULTS_FILE).is_file()):
        model = any((out / name).exists() for name in (RESULTS_FILE, WEIGHTS_FILE, GLASSGPT_META))
        held = "a model or results" if model else f"files that are not {what}'s output"
        raise ValueError(f"{out} already holds {held}: choose a new or empty directory "
                         "(nothing there is overwritten)")
    return out


def write_output(out: Path | None, write: Callable[[Path | None], T]) -> T:
    """`write(directory)`'s result, where `directory` is a temporary sibling of `out` (`.NAME.tmp`)
    that replaces `out` only once `write` has returned: a failed or interrupted run leaves an
    earlier output untouched. With `out` None, `write(None)`: nothing is kept."""
    if out is None:
        return write(None)
    result: list[T] = []
    write_directory_atomically(out, lambda directory: result.append(write(directory)))
    return result[0]


class Metrics:
    """The records of a run (`{"event": "step" | "eval", "step": ..., ...}`), each appended to
    `directory/metrics.jsonl` as it comes when there is a directory."""

    def __init__(self, directory: Path | None):
        self.records: list[dict] = []
        self.path = directory / METRICS_FILE if directory is not None else None
        if self.path is not None:
            self.path.write_text("", encoding="utf-8")

    def add(self, record: dict) -> dict:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
        return record


# ---------------------------------------------------------------- the model


def prepare_training(model, settings: FinetuneSettings, freeze: Callable[[object], object] | None = None,
                     lora_trainable: tuple[str, ...] = ()) -> tuple[Precision, torch.optim.Optimizer, int]:
    """(precision, optimizer, trainable parameters) for training `model`, which moves to the run's device.

    With `lora_rank`, LoRA adapters (`glassgpt.lora`, seeded by `settings.seed`) wrap every block's
    attention and feed-forward matrices and everything else is frozen but the `lora_trainable`
    modules; without, `freeze(model)` chooses what trains (None: whatever requires gradients). The
    optimizer is `glassgpt train`'s AdamW, over what trains only. Settings the model or the machine
    cannot take (a LoRA rank larger than a layer, fp16 without a GPU) raise ValueError before the
    model changes.
    """
    if settings.lora_rank is not None:
        lora.find_targets(model, settings.lora_rank)
    configure_cpu_threads(settings.threads)  # training's policy: --threads, else the cores left free
    precision = resolve_precision(settings.precision, pick_device(settings.device))
    model.to(precision.device)
    if settings.lora_rank is None:
        if freeze is not None:
            freeze(model)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)  # A's random initial values
            lora.apply_lora(model, settings.lora_rank, settings.lora_alpha, trainable=lora_trainable)
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
    return precision, optimizer, lora.trainable_parameters(model)


def merge_adapters(model, directory: Path | None, save_adapters: bool) -> None:
    """After training with LoRA: write the adapters alone (`ADAPTERS_FILE`) when asked, then merge them
    into the weights (W + (alpha / r) B A), so the model is again an ordinary GPT. Nothing without LoRA."""
    if getattr(model, "lora_settings", None) is None:
        return
    if save_adapters and directory is not None:
        lora.save_adapters(model, directory / ADAPTERS_FILE)
    lora.merge_lora(model)


# ---------------------------------------------------------------- the loop


class Step(NamedTuple):
    """An optimizer step taken: its number (from 1), its batch, its loss, whether an evaluation is due."""

    number: int
    batch: object
    loss: float
    evaluate: bool


def train_steps(model, optimizer: torch.optim.Optimizer, batches, loss_of: Callable[[object], torch.Tensor],
                precision: Precision, total_steps: int, eval_every: int = 0, seed: int = 0,
                progress: bool = False, out: Path | None = None) -> Iterator[Step]:
    """`total_steps` optimizer steps over `batches` (iterated anew each epoch), yielding each `Step`.

    `loss_of(batch)` runs under the precision's autocast and returns the batch's mean loss. An
    evaluation is due every `eval_every` steps (0: at each epoch's end) and after the last step.
    `seed` seeds dropout. A loss that is not finite raises TrainingDiverged: the run stops before
    writing `out`.
    """
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise ValueError("there is no full batch to train on")
    scaler = precision.grad_scaler()
    bar = tqdm(total=total_steps, desc="finetune", unit="step", dynamic_ncols=True, disable=not progress,
               leave=False)
    torch.manual_seed(seed)  # dropout masks
    model.train()
    step = 0
    try:
        while step < total_steps:
            for batch in batches:
                with precision.autocast():
                    loss = loss_of(batch)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingDiverged(f"the training loss became {value} at step {step}; nothing was "
                                           f"written over {out or 'the output'}. Try a lower --lr or "
                                           "--precision fp32")
                bar.update()
                bar.set_postfix(loss=f"{value:.3f}")
                due = step % (eval_every or steps_per_epoch) == 0 or step == total_steps
                yield Step(step, batch, value, due)
                if step >= total_steps:
                    return
    finally:
        bar.close()
