"""Measuring a model: `glassgpt eval`. A language model's loss, perplexity and bits per byte on a text.

    model, tokenizer, _ = resolve_model("runs/verdict")
    evaluate_text(model, tokenizer, bundled_text())  # LMEvaluation(loss=..., perplexity=..., ...)

The windows are training's evaluation windows (`data.TokenWindows` with stride = context): window k
holds the ids `ids[kT : kT + T + 1]` for a context of T tokens; its first T ids are the input and
the same ids shifted left by one the targets. Consecutive windows share one boundary id, the last
target of one being the first input of the next, so **every token of the text except its first
is predicted exactly once**, and the first token of each window is predicted with no context
before it, as in training. Training drops the remainder that does not fill a whole window; here
it is a last, shorter window: `ids[FT : N]` for N ids and F full windows (F = (N - 1) // T),
predicting the last N - 1 - FT tokens. A text of at most T + 1 tokens is that one window.

With N ids, then:

- `tokens` = N - 1, the tokens predicted;
- `loss` = the mean cross-entropy in nats over those tokens (each window's sum, added, divided by
  N - 1: a mean per token, not per window, so the short last window weighs what its tokens do);
- `perplexity` = exp(loss);
- `bits_per_byte` = the summed cross-entropy / ln 2 / `bytes`, where `bytes` is the length of the
  predicted text in UTF-8: `tokenizer.decode_bytes(ids[1:])`, which is the text's bytes less those
  of its first token (GPT-2's tokens are byte strings, so this is exact; the end-of-text id counts
  the 13 bytes of `<|endoftext|>`, the text that encodes to it). Unlike loss per token, bits per
  byte compares models whose tokenizers differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glassgpt.classify import class_names, predict
from glassgpt.classify_data import LabelledTexts, load_labelled
from glassgpt.config import GPTConfig
from glassgpt.data import is_prepared, load_prepared, read_corpus_text
from glassgpt.device import pick_device
from glassgpt.hub import check_model_spec, resolve_model
from glassgpt.model import GPT
from glassgpt.tokenizer import Tokenizer
from glassgpt.weights import GLASSGPT_META

DEFAULT_DATA = "bundled:the-verdict.txt"
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class LMEvaluation:
    """What `evaluate_lm` measured (see the module's docstring for each definition)."""

    loss: float  # nats per predicted token
    perplexity: float  # exp(loss)
    bits_per_byte: float  # summed loss / ln 2 / bytes
    tokens: int  # tokens predicted: the text's tokens less one
    windows: int  # windows evaluated, the last one possibly shorter
    bytes: int  # UTF-8 bytes of the predicted tokens
    context_length: int  # tokens of input per window (the last may have fewer)

    def to_dict(self) -> dict:
        return asdict(self)


def window_spans(n_ids: int, context_length: int) -> list[tuple[int, int]]:
    """(start, predicted tokens) of each window over `n_ids` ids: full windows of `context_length`
    targets starting every `context_length` ids, then a shorter one for the remainder (if any)."""
    if context_length < 1:
        raise ValueError(f"context_length must be positive, got {context_length}")
    if n_ids < 2:
        raise ValueError(f"a text of {n_ids} token{'s' if n_ids != 1 else ''} has nothing to predict: "
                         "evaluating needs at least two tokens")
    return [(start, min(context_length, n_ids - 1 - start)) for start in range(0, n_ids - 1, context_length)]


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:  # a loss above ~709 nats: a broken model, still a number to print
        return math.inf


@torch.no_grad()
def evaluate_lm(model: GPT, ids: np.ndarray | Sequence[int], tokenizer: Tokenizer,
                context_length: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> LMEvaluation:
    """Loss, perplexity and bits per byte of `model` on the token ids `ids` (the module's docstring
    defines the windows and each number). `context_length` (default: the model's) may be shorter
    than the model's; full windows go `batch_size` at a time, the last short one alone."""
    model_context = model.config.context_length
    context_length = context_length or model_context
    if not 1 <= context_length <= model_context:
        raise ValueError(f"context length {context_length} must be between 1 and the model's "
                         f"{model_context}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    ids = ids if isinstance(ids, np.ndarray) else np.asarray(ids, dtype=np.int64)
    spans = window_spans(len(ids), context_length)
    if int(ids.max()) >= model.config.vocab_size:
        raise ValueError(f"the text holds token id {int(ids.max())}, beyond the model's vocabulary of "
                         f"{model.config.vocab_size:,}: the tokenizer does not match the model")
    device = model.tok_emb.weight.device
    full = [start for start, length in spans if length == context_length]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    if spans[-1][1] < context_length:  # the remainder: a window of its own, of its own length
        batches.append([spans[-1][0]])
    plain_head = isinstance(getattr(model.out_head, "weight", None), torch.Tensor)
    was_training = model.training
    model.eval()
    total_nats, n_bytes = 0.0, 0
    for starts in batches:
        length = min(context_length, len(ids) - 1 - starts[0])
        windows = torch.from_numpy(np.stack([ids[s:s + length + 1] for s in starts]).astype(np.int64))
        inputs, targets = windows[:, :-1].to(device), windows[:, 1:].to(device)
        if plain_head:
            # The model's own training loss (a mean over the batch's tokens, in float32), times the
            # count: every window in a batch has the same length, so this is the summed cross-entropy.
            total_nats += model(inputs, targets=targets).item() * targets.numel()
        else:  # an int8-quantised head has no weight matrix for that loss to pad: from the logits
            logits = model(inputs).float().flatten(0, 1)
            total_nats += F.cross_entropy(logits, targets.flatten(), reduction="sum").item()
        n_bytes += sum(len(tokenizer.decode_bytes(row)) for row in windows[:, 1:].tolist())
    model.train(was_training)
    tokens = len(ids) - 1
    loss = total_nats / tokens
    return LMEvaluation(loss=loss, perplexity=_perplexity(loss),
                        bits_per_byte=total_nats / math.log(2) / n_bytes if n_bytes else math.inf,
                        tokens=tokens, windows=len(spans), bytes=n_bytes, context_length=context_length)


def evaluate_text(model: GPT, tokenizer: Tokenizer, text: str, context_length: int | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> LMEvaluation:
    """`evaluate_lm` on `text`, tokenised with `tokenizer` (the model's)."""
    if not text:
        raise ValueError("the text is empty: there is nothing to evaluate")
    return evaluate_lm(model, tokenizer.encode(text), tokenizer, context_length, batch_size)


# ---------------------------------------------------------------- a classifier

def evaluate_classifier(model: GPT, tokenizer: Tokenizer, labelled,
                        batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None) -> dict:
    """A classifier's `accuracy` and `confusion` matrix (rows: the true class, columns: the predicted
    one, both in the order of `classes`, the model's) on `labelled` texts, with `classes`, `examples`
    and `max_length`.

    `labelled`: a `classify_data.LabelledTexts` or a file `load_labelled` reads (TSV, CSV, JSONL,
    `bundled:NAME`). Its labels are matched to the model's classes by name; a file may hold only
    some of them (its rows for the others are zeros), never another. Each text is classified as
    `classify.predict` does, cut to `max_length` tokens (the length the classifier trained with;
    default the model's context).
    """
    if not model.config.n_classes:
        raise ValueError("this model is a language model, not a classifier: evaluate it on a text")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    classes = class_names(model.config)
    if not isinstance(labelled, LabelledTexts):
        labelled = load_labelled(labelled, classes, allow_missing=True)
    if not len(labelled):
        raise ValueError(f"{labelled.source or 'the data'} holds no examples")
    index = {name: i for i, name in enumerate(classes)}
    foreign = [name for name in labelled.classes if name not in index]
    if foreign:
        raise ValueError(f"{labelled.source or 'the data'} has labels the model does not know: "
                         f"{', '.join(foreign)} (its classes: {', '.join(classes)})")
    truth = [index[labelled.classes[label]] for label in labelled.labels]
    max_length = min(max_length or model.config.context_length, model.config.context_length)
    predicted = [index[p["label"]] for p in predict(model, tokenizer, labelled.texts, batch_size, max_length)]
    confusion = [[0] * len(classes) for _ in classes]
    for true, guess in zip(truth, predicted, strict=True):
        confusion[true][guess] += 1
    correct = sum(confusion[i][i] for i in range(len(classes)))
    return {"accuracy": correct / len(truth), "confusion": confusion, "classes": classes,
            "examples": len(truth), "max_length": max_length}


def saved_classifier(spec: str | Path) -> dict | None:
    """{"classes", "max_length"} of the glassgpt classifier in directory `spec`, read from its
    metadata without loading weights; None when `spec` is not one (a language model, a name)."""
    import json

    meta_file = Path(spec) / GLASSGPT_META
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    config = GPTConfig.from_dict(meta["config"]) if "config" in meta else None
    if config is None or not config.n_classes:
        return None
    return {"classes": class_names(config), "max_length": meta.get("finetune", {}).get("max_length")}


# ---------------------------------------------------------------- from a --model and a --data

def read_eval_data(data: str | Path) -> str | None:
    """The text of `data` (a text file or `bundled:NAME`), or None for a prepared directory (read
    later, memory-mapped); a missing or empty file fails here, before any model is loaded."""
    if is_prepared(data):
        return None
    text = read_corpus_text(data)
    if not text:
        raise ValueError(f"{data} is empty: there is nothing to evaluate")
    return text


def eval_ids(data: str | Path, text: str | None, tokenizer: Tokenizer) -> np.ndarray:
    """The ids to evaluate: `text` in the model's `tokenizer`, or the prepared directory `data`,
    whose saved tokenizer must be the model's."""
    if text is not None:
        return np.asarray(tokenizer.encode(text), dtype=np.int64)
    ids, saved = load_prepared(data)
    if saved.to_dict() != tokenizer.to_dict():
        raise ValueError(f"{data} was prepared with the {saved.name} tokenizer, the model uses "
                         f"{tokenizer.name}: prepare the corpus again with the model's tokenizer")
    return ids


def evaluate_model(model_spec: str | Path, data: str | Path | None = None, device: str = "auto",
                   dtype: str | None = None, context_length: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """`glassgpt eval`: load `model_spec` (any --model), evaluate it on `data`, and return the numbers
    with `model` (what was loaded) and `data`. Bad input fails before any weights are read.

    A language model is measured on a text (default `bundled:the-verdict.txt`): `evaluate_lm`'s
    numbers. A classifier needs a labelled file (`data` is then required): `evaluate_classifier`'s.
    """
    check_model_spec(model_spec)
    if context_length is not None and context_length < 1:
        raise ValueError(f"context length must be positive, got {context_length}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if dtype == "int8" and device == "auto":  # int8 runs on the CPU only
        device = "cpu"
    classifier = saved_classifier(model_spec)
    if classifier is not None:
        if data is None:
            classes = ", ".join(classifier["classes"])
            raise ValueError(f"{model_spec} is a classifier ({classes}): evaluate it on a labelled file, "
                             "--data FILE (TSV label<TAB>text, CSV or JSONL)")
        if context_length is not None:
            raise ValueError("--context-length is for language models; a classifier reads each text up to "
                             "the length it was trained with")
        labelled = load_labelled(data, classifier["classes"], allow_missing=True)
        model, tokenizer, description = resolve_model(model_spec, pick_device(device), dtype)
        result = evaluate_classifier(model, tokenizer, labelled, batch_size, classifier["max_length"])
        return {"model": description, "data": str(data), **result}
    data = DEFAULT_DATA if data is None else data
    text = read_eval_data(data)
    model, tokenizer, description = resolve_model(model_spec, pick_device(device), dtype)
    if model.config.n_classes:  # a classifier in a format whose metadata we did not read above
        raise ValueError(f"{model_spec} is a classifier: evaluate it on a labelled file with --data")
    if context_length is not None and context_length > model.config.context_length:
        raise ValueError(f"context length {context_length} exceeds the model's {model.config.context_length}")
    result = evaluate_lm(model, eval_ids(data, text, tokenizer), tokenizer, context_length, batch_size)
    return {"model": description, "data": str(data), **result.to_dict()}
