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
the last transformer block, the final norm and the head train, as the tutorial does; with
`lora_rank`, LoRA adapters in every block and the head (appendix E), merged into the weights before
the classifier is saved. What the loop, the output directory and LoRA's wiring share with instruction
fine-tuning lives in `glassgpt.finetune_common`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from glassgpt import finetune_common, watch
from glassgpt.classify_data import (
    DEFAULT_SPLIT,
    ClassificationData,
    EncodedTexts,
    check_labels,
    collate,
    encode_texts,
    load_classification_data,
    make_loader,
    pad_id_for,
    parse_split,
)
from glassgpt.hub import resolve_model
from glassgpt.model import GPT
from glassgpt.plots import plot_metric
from glassgpt.train import setting
from glassgpt.weights import GLASSGPT_META, config_to_hf, hf_tensors, load_model, save_model

HF_PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>, the padding id of our batches and of the HF export

# ---------------------------------------------------------------- settings


@dataclass
class ClassifySettings(finetune_common.FinetuneSettings):
    """Every setting of `glassgpt finetune classify`; each field is the flag of the same name
    (`--train-layers`, `--max-length`, ...). Optimisation flags mean what they mean for `glassgpt train`;
    the defaults are the tutorial's run (AdamW 5e-5, weight decay 0.1, 5 epochs, batch 8)."""

    fields_name: ClassVar[str] = "classification fine-tuning settings"

    labels: list[str] | None = setting(None, "the classes in head order, comma-separated (None: the labels "
                                             "found, sorted)")
    train_layers: str = setting("last", "last (the last block + final norm + head, as the tutorial), all, "
                                        "or N (the last N blocks); with lora_rank, leave it at last")
    balance: bool = setting(False, "undersample every class to the smallest one")
    split: tuple[float, float, float] = setting(DEFAULT_SPLIT, "train/val/test fractions, e.g. 70/10/20 "
                                                               "(seeded shuffle, then cut)")
    epochs: int = setting(5, "passes over the training examples")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels is not None:
            self.labels = check_labels(self.labels)  # "--labels ham,spam" or a list
        self.train_layers = str(self.train_layers).strip().lower()
        if self.train_layers not in ("last", "all") and not self.train_layers.isdigit():
            raise ValueError(f"train_layers must be last, all or a number of blocks, "
                             f"got {self.train_layers!r}")
        if self.lora_rank is not None and self.train_layers != "last":
            raise ValueError("train_layers does not combine with lora_rank: LoRA trains adapters in every "
                             "block, and the head whole")
        self.split = parse_split(self.split)


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


CLASSIFIER = "a classifier"


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
    finetune_common.check_tokenizer_fits(tokenizer, config)
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


def finetune_classifier(model: GPT, tokenizer, data: ClassificationData, out_dir: str | Path | None,
                        settings: ClassifySettings | None = None, base: str | None = None,
                        log: Callable[[str], None] | None = print) -> dict:
    """Train `model` (already a classifier: see `to_classifier`) on `data`; returns the results.

    Writes into `out_dir`: the final model (`glassgpt.weights.load_model` and `load_classifier` read
    it), `results.json`, `metrics.jsonl` (one record per step and per evaluation), `loss.png` and
    `accuracy.png`, and with `save_adapters` the LoRA adapters alone (`adapters.safetensors`). The run
    fills a temporary sibling directory (`.NAME.tmp`, where metrics.jsonl grows while it trains) that
    replaces `out_dir` only when everything is written: a failed or interrupted run leaves an earlier
    output untouched. `out_dir=None` keeps nothing.

    With `lora_rank`, LoRA adapters train on every block's attention and feed-forward matrices and
    the head trains whole; after training they are merged into the weights (in `model` too), so the
    saved classifier is an ordinary one.
    """
    settings = settings or ClassifySettings()
    say = log or (lambda message: None)
    # ---- every check before any work
    _check_data_fits(model, tokenizer, data, settings)
    out = finetune_common.check_out_dir(out_dir, CLASSIFIER, replace=True) if out_dir is not None else None
    precision, optimizer, trainable = finetune_common.prepare_training(
        model, settings, freeze=lambda model: set_trainable(model, settings.train_layers),
        lora_trainable=("out_head",))  # LoRA in the blocks, the new head trained whole
    device = precision.device
    total_parameters = model.num_parameters()
    n_classes = len(data.classes)
    pad_id = data.pad_id
    train_loader = make_loader(data.train, settings.batch_size, pad_id, shuffle=True, seed=settings.seed)
    loaders = {name: make_loader(part, settings.batch_size, pad_id)
               for name, part in (("train", data.train), ("val", data.val), ("test", data.test))}
    steps_per_epoch = len(train_loader)
    total_steps = settings.max_steps or settings.epochs * steps_per_epoch
    trained = f"LoRA rank {settings.lora_rank} + head" if settings.lora_rank else settings.train_layers
    say(f"classifier: {n_classes} classes ({', '.join(data.classes)}); {trainable:,} of {total_parameters:,} "
        f"parameters train ({trained}); examples {data.sizes()}, {data.truncated} truncated to "
        f"{data.max_length} tokens; {total_steps} steps of {settings.batch_size} on {device}, "
        f"{precision.name}")

    def loss_of(batch) -> torch.Tensor:
        ids, labels, lengths = (tensor.to(device) for tensor in batch)
        # Cross-entropy at the last real token only: one prediction per text.
        return F.cross_entropy(class_logits(model, ids, lengths).float(), labels)

    def evaluate_now(metrics: finetune_common.Metrics, step: int, examples: int) -> None:
        autocast = precision.autocast
        train = evaluate(model, loaders["train"], n_classes, device, autocast, settings.eval_batches)
        val = evaluate(model, loaders["val"], n_classes, device, autocast)
        epoch = round(step / steps_per_epoch, 3)
        metrics.add({"event": "eval", "step": step, "epoch": epoch, "examples_seen": examples,
                     "end_of_epoch": step % steps_per_epoch == 0, "train_loss": train["loss"],
                     "val_loss": val["loss"], "train_accuracy": train["accuracy"],
                     "val_accuracy": val["accuracy"]})
        val_text = f" | val loss {val['loss']:.3f} acc {val['accuracy']:.1%}" if val["examples"] else ""
        say(f"step {step:>5} | epoch {epoch:g} | train loss {train['loss']:.3f} "
            f"acc {train['accuracy']:.1%}{val_text}")

    def run(directory: Path | None) -> dict:
        if directory:
            say(f"writing into {directory} (becomes {out} when the run succeeds)")
        metrics = finetune_common.Metrics(directory)
        probe = (data.val if len(data.val) else data.train).ids[0]
        probes = watch.finetune_probes(directory, model, tokenizer, tokenizer.decode(probe))
        started = time.perf_counter()
        step = examples = 0
        for step, (_, labels, _), loss, due in finetune_common.train_steps(
                model, optimizer, train_loader, loss_of, precision, total_steps, settings.eval_every,
                settings.seed, out=out):
            examples += len(labels)
            metrics.add({"event": "step", "step": step, "epoch": round(step / steps_per_epoch, 3),
                         "examples_seen": examples, "train_loss": loss})
            if due:
                evaluate_now(metrics, step, examples)
                if probes:
                    probes.record(model, step)
        seconds = time.perf_counter() - started
        finetune_common.merge_adapters(model, directory, settings.save_adapters)

        final = {name: evaluate(model, loader, n_classes, device, precision.autocast)
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
            "seconds": round(seconds, 2), "device": str(device), "precision": precision.name,
            "data": data.source, "base_model": base, "settings": settings.to_dict(),
        }
        if directory:
            info = {"task": "classify", "classes": data.classes, "max_length": data.max_length,
                    "pad_id": pad_id, "base_model": base, "data": data.source,
                    "train_layers": settings.train_layers, "lora_rank": settings.lora_rank,
                    "test_accuracy": results["test_accuracy"], "val_accuracy": results["val_accuracy"]}
            save_model(model, directory, tokenizer, extra={"finetune": info})
            results_file = directory / finetune_common.RESULTS_FILE
            results_file.write_text(json.dumps(results, indent=2), encoding="utf-8")
            for metric, ylabel in (("loss", "cross-entropy loss"), ("accuracy", "accuracy")):
                plot_metric(metrics.records, directory / f"{metric}.png", metric, x="examples_seen",
                            xlabel="examples seen", ylabel=ylabel)
        say(f"accuracy: train {_percent(results['train_accuracy'])}, "
            f"val {_percent(results['val_accuracy'])}, test {_percent(results['test_accuracy'])}")
        return results

    return finetune_common.write_output(out, run)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def run_finetune_classify(model_spec: str, data_path: str, out_dir: str | Path | None,
                          settings: ClassifySettings | None = None,
                          log: Callable[[str], None] | None = print) -> dict:
    """`glassgpt finetune classify`: load the model (any --model spec), read and check the data,
    give the model a classification head (kept when it already classifies these classes), train.

    Every check (model, data, labels, vocabulary, output directory) runs before the first step.
    """
    settings = settings or ClassifySettings()
    if out_dir is not None:
        finetune_common.check_out_dir(out_dir, CLASSIFIER, replace=True)
    model, tokenizer, description = resolve_model(model_spec)
    max_length = finetune_common.resolve_max_length(settings.max_length, model.config)
    data = load_classification_data(data_path, tokenizer, max_length, settings.labels, settings.balance,
                                    settings.split, settings.seed)
    if not (model.config.n_classes and class_names(model.config) == data.classes):
        to_classifier(model, len(data.classes), data.classes, seed=settings.seed)
    return finetune_classifier(model, tokenizer, data, out_dir, settings, base=description, log=log)


# ---------------------------------------------------------------- using a classifier


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, object, dict]:
    """(model, tokenizer, the run's metadata: classes, max_length, ...) of a classifier directory."""
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
    tensors = hf_tensors(model)
    tensors.pop("lm_head.weight")  # the language-model head's slot; a classifier's is `score`
    tensors["score.weight"] = model.out_head.weight.detach().float().cpu().contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    return directory


__all__ = [
    "ClassifySettings", "EncodedTexts", "class_logits", "class_names", "evaluate",
    "export_hf_classifier", "finetune_classifier", "load_classifier", "predict", "run_finetune_classify",
    "set_trainable", "to_classifier",
]
