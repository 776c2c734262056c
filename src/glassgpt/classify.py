"""Fine-tuning a GPT to classify texts: the tutorial's spam classifier (chapter 6), for any labels.

    model, tokenizer, _ = resolve_model("gpt2")
    data = load_classification_data("bundled:sms-spam-collection.tsv", tokenizer, 1024, balanced=True)
    to_classifier(model, len(data.classes), data.classes, seed=123)
    results = finetune_classifier(model, tokenizer, data, "runs/spam", ClassifySettings())
    predict(model, tokenizer, ["You won a prize! Call now"])

(`run_finetune_classify` does those steps from a --model spec and a data file.)

The language model's output head, which scores every token of the vocabulary at each position, is
replaced by a small fresh head that scores the classes. Causal attention lets only the last token
of a text see the whole text, so the classifier reads the head's output there: at the last *real*
token, never at padding (the pitfall of reading position -1 of a padded batch). By default only
the last transformer block, the final norm and the head train, as the tutorial does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glassgpt.classify_data import (
    DEFAULT_SPLIT,
    ClassificationData,
    EncodedTexts,
    collate,
    encode_texts,
    load_classification_data,
    make_loader,
    pad_id_for,
    parse_split,
)
from glassgpt.model import GPT

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
HF_PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>, the padding id of our batches and of the HF export

# ---------------------------------------------------------------- settings


@dataclass
class ClassifySettings:
    """Every setting of `glassgpt finetune classify`; each field is the flag of the same name
    (`--train-layers`, `--max-length`, ...). Optimisation flags mean what they mean for `glassgpt train`;
    the defaults are the tutorial's run (AdamW 5e-5, weight decay 0.1, 5 epochs, batch 8)."""

    labels: list[str] | None = field(default=None, metadata={
        "help": "the classes in head order, comma-separated (None: the labels found, sorted)"})
    train_layers: str = field(default="last", metadata={
        "help": "last (the last block + final norm + head, as the tutorial), all, or N (the last N blocks)"})
    balance: bool = field(default=False, metadata={"help": "undersample every class to the smallest one"})
    split: tuple[float, float, float] = field(default=DEFAULT_SPLIT, metadata={
        "help": "train/val/test fractions, e.g. 70/10/20 (seeded shuffle, then cut)"})
    max_length: int | None = field(default=None, metadata={
        "help": "tokens kept per text (longer ones are cut and counted; None: the model's context)"})
    epochs: int = field(default=5, metadata={"help": "passes over the training examples"})
    max_steps: int | None = field(default=None, metadata={
        "help": "optimizer steps to run instead of whole epochs"})
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    weight_decay: float = field(default=0.1, metadata={
        "help": "AdamW decay, applied to weight matrices only"})
    seed: int = field(default=123, metadata={
        "help": "seeds balancing, the split, the new head and the batch order"})
    precision: str = field(default="fp32", metadata={
        "help": "fp32, bf16 (autocast), or auto: bf16 where the device computes it natively"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    lora_rank: int | None = field(default=None, metadata={
        "help": "train LoRA adapters of this rank (not yet available)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scale numerator (None: the rank)"})
    eval_every: int = field(default=0, metadata={
        "help": "steps between loss evaluations (0: each epoch's end)"})
    eval_batches: int = field(default=5, metadata={
        "help": "training batches whose accuracy is measured at each evaluation (the tutorial's eval_iter)"})

    def __post_init__(self) -> None:
        if isinstance(self.labels, str):  # "--labels ham,spam"
            self.labels = [label.strip() for label in self.labels.split(",")]
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)
                                        or not all(self.labels)):
            raise ValueError(f"labels must name at least two distinct classes, got {self.labels}")
        self.train_layers = str(self.train_layers).strip().lower()
        if self.train_layers not in ("last", "all") and not self.train_layers.isdigit():
            raise ValueError(f"train_layers must be last, all or a number of blocks, "
                             f"got {self.train_layers!r}")
        self.split = parse_split(self.split)
        for key in ("epochs", "batch_size", "eval_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_length", "max_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be 0 or positive, got {self.eval_every}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must not be negative, got {self.weight_decay}")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be fp32, bf16 or auto, got {self.precision!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if self.lora_alpha is not None and (self.lora_rank is None or not self.lora_alpha > 0):
            raise ValueError("lora_alpha needs a lora_rank and must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- the classification head


def class_names(config) -> list[str]:
    """The classes' names in head order ("0", "1", ... where the config names none)."""
    return list(config.labels) if config.labels else [str(i) for i in range(config.n_classes)]


def to_classifier(model: GPT, n_classes: int, labels: Sequence[str] | None = None,
                  seed: int | None = None) -> GPT:
    """Replace `model`'s output head by a fresh `n_classes` head (in place; returns the model).

    The head is `nn.Linear(emb_dim, n_classes, bias=False)` with PyTorch's default initialisation
    (uniform in +-1/sqrt(emb_dim)), as the tutorial's `torch.nn.Linear` head; without the bias the
    tutorial's head has, so that Hugging Face's GPT2ForSequenceClassification (whose `score` has no
    bias) holds exactly the same model. It is never tied to the token embedding. `seed` makes its
    initial weights reproducible without touching the global random state.
    """
    if n_classes < 2:
        raise ValueError(f"a classifier needs at least two classes, got {n_classes}")
    config = model.config.replace(n_classes=n_classes, labels=tuple(labels or ()), tie_weights=False,
                                  head_bias=False)
    reference = model.tok_emb.weight
    with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        head = nn.Linear(config.emb_dim, n_classes, bias=False)
    model.out_head = head.to(device=reference.device, dtype=reference.dtype)
    model.config = config
    return model


def set_trainable(model: GPT, train_layers: str | int = "last") -> int:
    """Freeze everything except what `train_layers` names; returns the number of trainable parameters.

    "last": the last block, the final norm and the head (the tutorial's choice: the last block
    adapts the features the head reads, the earlier ones keep what pretraining taught). N: the last
    N blocks + final norm + head (0: the final norm and the head only). "all": every parameter.
    """
    layers = str(train_layers).strip().lower()
    n_layers = model.config.n_layers
    if layers == "all":
        model.requires_grad_(True)
    else:
        count = 1 if layers == "last" else int(layers) if layers.isdigit() else -1
        if not 0 <= count <= n_layers:
            raise ValueError(f"train_layers must be last, all or a number of blocks from 0 to {n_layers}, "
                             f"got {train_layers!r}")
        model.requires_grad_(False)
        for module in [*model.blocks[n_layers - count:], model.final_norm, model.out_head]:
            module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def class_logits(model: GPT, ids: torch.Tensor, lengths: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Class logits (B, n_classes) of right-padded texts `ids` (B, T), read at each text's last real token.

    `lengths` (B,): real tokens per row (None: every row is full); or an `attention_mask` (B, T) of
    right padding (1 for real tokens, then 0s). The model runs without a mask: attention is causal,
    so padding *after* a row's last real token cannot change anything computed up to it, and each
    row's logits there are exactly those of its text alone. (Left padding would shift positions:
    refused.)
    """
    if not model.config.n_classes:
        raise ValueError("this model is a language model, not a classifier: convert it with to_classifier")
    batch, width = ids.shape
    if attention_mask is not None:
        if lengths is not None:
            raise ValueError("give lengths or attention_mask, not both")
        mask = attention_mask.to(ids.device).bool()
        lengths = mask.sum(dim=-1)
        if not torch.equal(mask, torch.arange(width, device=ids.device) < lengths[:, None]):
            raise ValueError("attention_mask must be right padding: each row's real tokens, then padding")
    logits = model(ids)                                                  # (B, T, n_classes)
    if lengths is None:
        return logits[:, -1]
    lengths = lengths.to(ids.device)
    if bool(((lengths < 1) | (lengths > width)).any()):
        raise ValueError(f"lengths must be between 1 and the batch's width {width}")
    return logits[torch.arange(batch, device=ids.device), lengths - 1]


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: GPT, loader, n_classes: int, device: torch.device, autocast=nullcontext,
             max_batches: int | None = None) -> dict:
    """Mean cross-entropy, accuracy and confusion matrix (rows: true class, columns: predicted) over
    the loader's first `max_batches` batches (all when None), with dropout off."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    loss_sum, count = 0.0, 0
    for index, (ids, labels, lengths) in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        ids, labels, lengths = ids.to(device), labels.to(device), lengths.to(device)
        with autocast():
            logits = class_logits(model, ids, lengths).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        predicted = logits.argmax(dim=-1)
        confusion += torch.bincount((labels * n_classes + predicted).cpu(),
                                    minlength=n_classes * n_classes).view(n_classes, n_classes)
        count += len(labels)
    model.train(was_training)
    if count == 0:
        return {"loss": None, "accuracy": None, "confusion": None, "examples": 0}
    return {"loss": loss_sum / count, "accuracy": confusion.diag().sum().item() / count,
            "confusion": confusion.tolist(), "examples": count}


# ---------------------------------------------------------------- training


class ClassifierDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing was written over the output directory."""


def check_out_dir(out_dir: str | Path) -> Path:
    """`out_dir` may be new, empty, or the output of an earlier run (it is replaced only on success).

    Anything else is refused: the finished run replaces the whole directory, and a directory of
    other files (or a training run's resumable checkpoint) must not vanish because of a typo.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / RESULTS_FILE).is_file():
        raise ValueError(f"--out {out} already holds files that are not a classifier's output; "
                         "choose a new or empty directory")
    return out


def _optimizer(model: GPT, settings: ClassifySettings) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, decaying weight matrices only (as `glassgpt train` does)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_embedding = name.startswith(("tok_emb.", "pos_emb."))
        (decay if parameter.dim() >= 2 and not is_embedding else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    device_type = next(model.parameters()).device.type
    fused = {"fused": True} if device_type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr, **fused)


def _check_data_fits(model: GPT, tokenizer, data: ClassificationData, settings: ClassifySettings) -> None:
    """Every mismatch between model, tokenizer and data, before any work."""
    config = model.config
    if not config.n_classes:
        raise ValueError("the model is a language model: convert it with to_classifier(model, n_classes)")
    if config.n_classes != len(data.classes):
        raise ValueError(f"the model's head has {config.n_classes} classes, the data {len(data.classes)} "
                         f"({', '.join(data.classes)})")
    if config.labels and list(config.labels) != list(data.classes):
        raise ValueError(f"the model's classes {list(config.labels)} differ from the data's {data.classes}")
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size:,} ids but the model's vocabulary only "
                         f"{config.vocab_size:,}: they do not belong together")
    for name, part in (("train", data.train), ("val", data.val), ("test", data.test)):
        longest = max((len(ids) for ids in part.ids), default=0)
        if longest > config.context_length:
            raise ValueError(f"a {name} text has {longest} tokens, more than the model's context of "
                             f"{config.context_length}: use max_length <= {config.context_length}")
        largest = max((max(ids) for ids in part.ids), default=0)
        if largest >= config.vocab_size:
            raise ValueError(f"a {name} text holds token id {largest}, outside the model's vocabulary of "
                             f"{config.vocab_size:,}")
    if len(data.train) < settings.batch_size:
        raise ValueError(f"{len(data.train)} training examples make no full batch of {settings.batch_size}: "
                         "lower --batch-size or use more data")


def _precision(settings: ClassifySettings, device: torch.device):
    from glassgpt.device import has_native_bf16

    precision = settings.precision
    if precision == "auto":
        precision = "bf16" if has_native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16 support: use --precision fp32")
    if precision == "bf16":
        return precision, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return precision, nullcontext


def finetune_classifier(model: GPT, tokenizer, data: ClassificationData, out_dir: str | Path | None,
                        settings: ClassifySettings | None = None, base: str | None = None,
                        log: Callable[[str], None] | None = print) -> dict:
    """Train `model` (already a classifier: see `to_classifier`) on `data`; returns the results.

    Writes into `out_dir`: the final model (`glassgpt.weights.load_model` and `load_classifier` read
    it), `results.json`, `metrics.jsonl` (one record per step and per evaluation), `loss.png` and
    `accuracy.png`. The run fills a temporary sibling directory (`.NAME.tmp`, where metrics.jsonl
    grows while it trains) that replaces `out_dir` only when everything is written: a failed or
    interrupted run leaves an earlier output untouched. `out_dir=None` keeps nothing.
    """
    from glassgpt.checkpoint import write_directory_atomically
    from glassgpt.device import pick_device

    settings = settings or ClassifySettings()
    say = log or (lambda message: None)
    # ---- every check before any work
    if settings.lora_rank is not None:
        # TODO(lora): glassgpt.lora.apply_lora(model, settings.lora_rank, settings.lora_alpha or rank,
        # targets=<default four>, trainable=("out_head",)) in place of set_trainable, merged before saving.
        raise NotImplementedError("--lora-rank is not available for classification yet")
    _check_data_fits(model, tokenizer, data, settings)
    out = check_out_dir(out_dir) if out_dir is not None else None
    device = pick_device(settings.device)
    precision, autocast = _precision(settings, device)

    torch.manual_seed(settings.seed)  # dropout
    model.to(device)
    trainable = set_trainable(model, settings.train_layers)
    total_parameters = model.num_parameters()
    optimizer = _optimizer(model, settings)
    n_classes = len(data.classes)
    pad_id = data.pad_id
    train_loader = make_loader(data.train, settings.batch_size, pad_id, shuffle=True, seed=settings.seed)
    loaders = {name: make_loader(part, settings.batch_size, pad_id)
               for name, part in (("train", data.train), ("val", data.val), ("test", data.test))}
    steps_per_epoch = len(train_loader)
    total_steps = settings.max_steps or settings.epochs * steps_per_epoch
    say(f"classifier: {n_classes} classes ({', '.join(data.classes)}); {trainable:,} of {total_parameters:,} "
        f"parameters train ({settings.train_layers}); examples {data.sizes()}, {data.truncated} truncated to "
        f"{data.max_length} tokens; {total_steps} steps of {settings.batch_size} on {device}, {precision}")

    def run(directory: Path | None) -> dict:
        metrics = directory / METRICS_FILE if directory else None
        if metrics:
            metrics.write_text("", encoding="utf-8")
            say(f"writing into {directory} (becomes {out} when the run succeeds)")
        records: list[dict] = []

        def record(entry: dict) -> None:
            records.append(entry)
            if metrics:
                with open(metrics, "a", encoding="utf-8") as file:
                    file.write(json.dumps(entry) + "\n")

        def evaluate_now(step: int, examples: int, end_of_epoch: bool) -> None:
            train = evaluate(model, loaders["train"], n_classes, device, autocast, settings.eval_batches)
            val = evaluate(model, loaders["val"], n_classes, device, autocast)
            entry = {"event": "eval", "step": step, "epoch": round(step / steps_per_epoch, 3),
                     "examples_seen": examples, "end_of_epoch": end_of_epoch,
                     "train_loss": train["loss"], "val_loss": val["loss"],
                     "train_accuracy": train["accuracy"], "val_accuracy": val["accuracy"]}
            record(entry)
            val_text = f" | val loss {val['loss']:.3f} acc {val['accuracy']:.1%}" if val["examples"] else ""
            say(f"step {step:>5} | epoch {entry['epoch']:g} | train loss {train['loss']:.3f} "
                f"acc {train['accuracy']:.1%}{val_text}")

        started = time.perf_counter()
        step = examples = 0
        model.train()
        while step < total_steps:
            for ids, labels, lengths in train_loader:
                ids, labels, lengths = ids.to(device), labels.to(device), lengths.to(device)
                with autocast():
                    logits = class_logits(model, ids, lengths)
                # Cross-entropy at the last real token only: one prediction per text.
                loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step, examples = step + 1, examples + len(labels)
                value = loss.item()
                if not math.isfinite(value):
                    raise ClassifierDiverged(
                        f"the loss became {value} at step {step}; nothing was written over "
                        f"{out or 'the output'}. Try a lower --lr or --precision fp32")
                record({"event": "step", "step": step, "epoch": round(step / steps_per_epoch, 3),
                        "examples_seen": examples, "train_loss": value})
                end_of_epoch = step % steps_per_epoch == 0
                scheduled = settings.eval_every and step % settings.eval_every == 0
                if end_of_epoch or step == total_steps or scheduled:
                    evaluate_now(step, examples, end_of_epoch)
                if step >= total_steps:
                    break

        final = {name: evaluate(model, loader, n_classes, device, autocast)
                 for name, loader in loaders.items()}
        model.eval()
        results = {
            "train_accuracy": final["train"]["accuracy"], "val_accuracy": final["val"]["accuracy"],
            "test_accuracy": final["test"]["accuracy"],
            "loss": {name: result["loss"] for name, result in final.items()},
            "confusion": {name: result["confusion"] for name, result in final.items()},
            "classes": data.classes, "trainable_parameters": trainable, "total_parameters": total_parameters,
            "examples": data.sizes(), "class_counts": data.counts, "truncated": data.truncated,
            "max_length": data.max_length, "steps": step, "epochs": round(step / steps_per_epoch, 3),
            "seconds": round(time.perf_counter() - started, 2), "device": str(device), "precision": precision,
            "data": data.source, "base_model": base, "settings": settings.to_dict(),
        }
        if directory:
            from glassgpt.weights import save_model

            info = {"task": "classify", "classes": data.classes, "max_length": data.max_length,
                    "pad_id": pad_id, "base_model": base, "data": data.source,
                    "train_layers": settings.train_layers,
                    "test_accuracy": results["test_accuracy"], "val_accuracy": results["val_accuracy"]}
            save_model(model, directory, tokenizer, extra={"finetune": info})
            (directory / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
            plot_curves(records, directory)
        say(f"accuracy: train {_percent(results['train_accuracy'])}, "
            f"val {_percent(results['val_accuracy'])}, test {_percent(results['test_accuracy'])}")
        return results

    if out is None:
        return run(None)
    results: dict = {}
    write_directory_atomically(out, lambda directory: results.update(run(directory)))
    return results


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def plot_curves(records: list[dict], directory: Path) -> None:
    """`loss.png` (cross-entropy against examples seen) and `accuracy.png` (per evaluation)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval"]
    plots = (("loss.png", "loss", "cross-entropy loss"), ("accuracy.png", "accuracy", "accuracy"))
    for name, key, ylabel in plots:
        figure = Figure(figsize=(7, 4), dpi=110)
        axes = figure.subplots()
        if key == "loss" and steps:
            axes.plot([r["examples_seen"] for r in steps], [r["train_loss"] for r in steps],
                      color="tab:blue", alpha=0.3, linewidth=0.8, label="train (each step)")
        for split_name, color in (("train", "tab:blue"), ("val", "tab:orange")):
            points = [r for r in evals if r.get(f"{split_name}_{key}") is not None]
            if points:
                axes.plot([r["examples_seen"] for r in points], [r[f"{split_name}_{key}"] for r in points],
                          "o-", color=color, label="validation" if split_name == "val" else "train")
        axes.set_xlabel("examples seen")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        tmp = directory / f".{name}.tmp"
        figure.savefig(tmp, format="png")
        os.replace(tmp, directory / name)


def run_finetune_classify(model_spec: str, data_path: str, out_dir: str | Path | None,
                          settings: ClassifySettings | None = None,
                          log: Callable[[str], None] | None = print) -> dict:
    """`glassgpt finetune classify`: load the model (any --model spec), read and check the data,
    give the model a classification head (kept when it already classifies these classes), train.

    Every check (model, data, labels, vocabulary, output directory) runs before the first step.
    """
    from glassgpt.hub import resolve_model

    settings = settings or ClassifySettings()
    if out_dir is not None:
        check_out_dir(out_dir)
    model, tokenizer, description = resolve_model(model_spec)
    context = model.config.context_length
    max_length = settings.max_length or context
    if max_length > context:
        raise ValueError(f"max_length {max_length} exceeds the model's context of {context}")
    data = load_classification_data(data_path, tokenizer, max_length, settings.labels, settings.balance,
                                    settings.split, settings.seed)
    if not (model.config.n_classes and class_names(model.config) == data.classes):
        to_classifier(model, len(data.classes), data.classes, seed=settings.seed)
    return finetune_classifier(model, tokenizer, data, out_dir, settings, base=description, log=log)


# ---------------------------------------------------------------- using a classifier


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, object, dict]:
    """(model, tokenizer, the run's metadata: classes, max_length, ...) of a classifier directory."""
    from glassgpt.weights import GLASSGPT_META, load_model

    model, tokenizer = load_model(path, device)
    if not model.config.n_classes:
        raise ValueError(f"{path} holds a language model, not a classifier (train one with "
                         "glassgpt finetune classify)")
    meta_file = Path(path) / GLASSGPT_META
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    return model, tokenizer, meta.get("finetune", {})


@torch.no_grad()
def predict(model: GPT, tokenizer, texts: Sequence[str], batch_size: int = 8,
            max_length: int | None = None) -> list[dict]:
    """Each text's class: a list of {"text", "label", "probabilities": {class: p}} in the order given.

    Texts longer than `max_length` (default: the model's context; pass the length the classifier
    was trained with, which `load_classifier` returns) keep their first `max_length` tokens.
    """
    if isinstance(texts, str):
        texts = [texts]
    classes = class_names(model.config)
    max_length = min(max_length or model.config.context_length, model.config.context_length)
    encoded, _ = encode_texts(texts, tokenizer, max_length)
    device = model.tok_emb.weight.device
    pad_id = pad_id_for(tokenizer)
    was_training = model.training
    model.eval()
    results = []
    for start in range(0, len(encoded), batch_size):
        batch = [(ids, 0) for ids in encoded[start:start + batch_size]]
        ids, _, lengths = collate(batch, pad_id)
        probabilities = torch.softmax(class_logits(model, ids.to(device), lengths.to(device)).float(), dim=-1)
        for offset, row in enumerate(probabilities.cpu().tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            results.append({"text": texts[start + offset], "label": classes[best],
                            "probabilities": dict(zip(classes, row, strict=True))})
    model.train(was_training)
    return results


# ---------------------------------------------------------------- Hugging Face export


def export_hf_classifier(model: GPT, directory: str | Path, pad_token_id: int = HF_PAD_TOKEN_ID) -> Path:
    """Write a `GPT2ForSequenceClassification` directory (config.json + model.safetensors).

    The head becomes `score.weight`; config.json gets `num_labels`, `id2label`, `label2id` and
    `pad_token_id`. Transformers pools at the *rightmost token that is not pad_token_id* (50256,
    end-of-text, what our batches pad with), where glassgpt uses the real lengths: the two agree on
    every text except one whose own last token is the pad id (a text ending in "<|endoftext|>"),
    which transformers reads one token earlier.
    """
    from safetensors.torch import save_file

    from glassgpt.weights import config_to_hf, hf_names

    config = model.config
    if not config.n_classes:
        raise ValueError("this model is a language model: export it with export_hf")
    if not 0 <= pad_token_id < config.vocab_size:
        raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary of {config.vocab_size}")
    if model.out_head.bias is not None:
        raise ValueError("GPT2ForSequenceClassification's score layer has no bias; this head has one")
    names = class_names(config)
    hf_config = config_to_hf(config)
    hf_config.update({
        "architectures": ["GPT2ForSequenceClassification"], "num_labels": config.n_classes,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "pad_token_id": pad_token_id, "problem_type": "single_label_classification",
    })
    state = model.state_dict()
    tensors = {}
    for our_name, their_name, transposed in hf_names(config):
        if our_name == "out_head.weight":  # the language-model head's slot; a classifier's is `score`
            continue
        tensor = state[our_name].detach().float().cpu()
        tensors[their_name] = (tensor.t() if transposed else tensor).contiguous()
    tensors["score.weight"] = model.out_head.weight.detach().float().cpu().contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    return directory


__all__ = [
    "ClassifySettings", "ClassifierDiverged", "EncodedTexts", "class_logits", "class_names", "evaluate",
    "export_hf_classifier", "finetune_classifier", "load_classifier", "predict", "run_finetune_classify",
    "set_trainable", "to_classifier",
]
