"""Instruction fine-tuning: teach a language model to answer instructions (the tutorial's chapter 7).

The pieces, in the order a run uses them:
- `InstructionTemplate`: the Alpaca prompt around an instruction (and its optional input); it is
  saved in the checkpoint's metadata, so whatever generates from the model formats prompts the
  same way (`load_template`).
- `load_instructions` / `split_instructions`: Alpaca-style examples from JSON or JSONL, checked
  entry by entry, and a seeded 85/5/10 train/validation/test split.
- `tokenize_instructions` / `collate`: token ids of prompt + response, batched with the
  end-of-text id as padding; the targets are the inputs shifted by one, where only the first
  padding token counts (it teaches the model to stop) and the rest are -100 (ignored by
  cross-entropy); `mask_prompt` ignores the prompt's tokens too, so only the response is learned.
- `finetune_instruct`: AdamW over those batches, then the losses, the test set's responses and
  the checkpoint (with its template) in one output directory.
- `respond`: a prompt in, only the response text out, stopping at the end-of-text token.

This module knows nothing about the command line; `glassgpt finetune instruct` parses its
arguments into `InstructSettings` and calls `finetune_instruct`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from glassgpt.model import GPT

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: targets with it add nothing to the loss
BUNDLED_PREFIX = "bundled:"
RESULTS_FILE = "results.json"
RESPONSES_FILE = "test_responses.jsonl"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"

# ---------------------------------------------------------------- the prompt template


@dataclass(frozen=True)
class InstructionTemplate:
    """How an instruction (and its optional input) becomes a prompt; the response follows it.

    The defaults are the Alpaca format the tutorial uses (`preamble` is one line):

        {preamble}

        ### Instruction:
        {instruction}

        ### Input:          <- these two lines and the blank line before them only when there is an input
        {input}

        ### Response:
        {output}<|endoftext|>    <- the end-of-text token is added by `collate`, not by the template
    """

    preamble: str = ("Below is an instruction that describes a task. "
                     "Write a response that appropriately completes the request.")
    instruction_header: str = "### Instruction:"
    input_header: str = "### Input:"
    response_header: str = "### Response:"
    separator: str = "\n\n"
    name: str = "alpaca"

    def format_prompt(self, instruction: str, input: str = "") -> str:  # noqa: A002 (the data's own key)
        """The text the model continues: everything up to and including the response header's line."""
        sep = self.separator
        prompt = f"{self.preamble}{sep}{self.instruction_header}\n{instruction}"
        if input:
            prompt += f"{sep}{self.input_header}\n{input}"
        return f"{prompt}{sep}{self.response_header}\n"

    def format_example(self, example: dict) -> str:
        """Prompt + response of one example ({"instruction", "input", "output"}), as training reads it."""
        return self.format_prompt(example["instruction"], example.get("input", "")) + example["output"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> InstructionTemplate:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown instruction template fields: {', '.join(unknown)}")
        wrong = sorted(key for key, value in data.items() if not isinstance(value, str))
        if wrong:
            raise ValueError(f"instruction template fields must be strings: {', '.join(wrong)}")
        return cls(**data)


TEMPLATE_KEY = "instruction_template"  # where the template sits in a checkpoint's glassgpt.json


def load_template(path: str | Path) -> InstructionTemplate | None:
    """The instruction template saved with the glassgpt checkpoint in `path` (None if it has none)."""
    from glassgpt.weights import GLASSGPT_META

    meta_file = Path(path) / GLASSGPT_META
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    return InstructionTemplate.from_dict(meta[TEMPLATE_KEY]) if TEMPLATE_KEY in meta else None


# ---------------------------------------------------------------- data

REQUIRED_KEYS = ("instruction", "output")


def _check_example(entry, where: str) -> dict:
    """{"instruction", "input", "output"} from one parsed entry, or a ValueError saying `where` it is."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with \"instruction\", \"input\" and \"output\", "
                         f"got {type(entry).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)} "
                         f"(has {', '.join(repr(k) for k in entry) or 'no keys'})")
    example = {"instruction": entry["instruction"], "input": entry.get("input", "") or "",
               "output": entry["output"]}
    for key, value in example.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not example["instruction"].strip():
        raise ValueError(f"{where}: the instruction is empty")
    return example


def load_instructions(path: str | Path) -> list[dict]:
    """Alpaca-style examples, each {"instruction", "input", "output"} (input "" when absent).

    `path`: a JSON file holding a list of objects, a JSONL file (one object a line; blank lines
    skipped), or "bundled:NAME" for a data set shipped with glassgpt (`bundled:instruction-data.json`,
    the tutorial's 1,100 examples). Raises FileNotFoundError or ValueError naming the file and the
    entry (JSON, counted from 1) or line (JSONL) at fault.
    """
    from glassgpt.tokenizer import ASSETS

    path = str(path)
    if path.startswith(BUNDLED_PREFIX):
        name = path[len(BUNDLED_PREFIX):]
        resource = ASSETS / name
        if not name or not resource.is_file():
            raise FileNotFoundError(f"no bundled data set named {name!r} (try bundled:instruction-data.json)")
        text, source = resource.read_text(encoding="utf-8"), path
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"instruction data file {file} does not exist")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{file} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        source = str(file)
    if not text.strip():
        raise ValueError(f"{source} is empty: expected a JSON list of objects with \"instruction\", "
                         "\"input\" and \"output\", or one such object per line (JSONL)")

    # A JSON file starts with "[": a list. Anything else is read as JSONL, one object per line.
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error.msg} at line {error.lineno}, "
                             f"column {error.colno}") from None
        examples = [_check_example(entry, f"{source}, entry {number}")
                    for number, entry in enumerate(entries, start=1)]
    else:
        examples = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}, line {number}: not valid JSON ({error.msg} at column "
                                 f"{error.colno})") from None
            examples.append(_check_example(entry, f"{source}, line {number}"))
    if not examples:
        raise ValueError(f"{source} holds no examples")
    return examples


class InstructionSplits(NamedTuple):
    train: list[dict]
    val: list[dict]
    test: list[dict]

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def split_instructions(examples: Sequence[dict], train_fraction: float = 0.85, test_fraction: float = 0.10,
                       seed: int | None = 123) -> InstructionSplits:
    """Train / validation / test as the tutorial cuts them: int(n x 0.85), the rest, int(n x 0.1).

    The examples are first shuffled by a private generator seeded with `seed` (the same seed gives
    the same split on every machine); `seed=None` keeps the file's order, which is the tutorial's
    split exactly (its data is already in random order). 1,100 examples give 935 / 55 / 110.
    """
    if not (0 < train_fraction <= 1 and 0 <= test_fraction < 1 and train_fraction + test_fraction <= 1):
        raise ValueError(f"fractions must satisfy 0 < train <= 1, 0 <= test and train + test <= 1; "
                         f"got train {train_fraction}, test {test_fraction}")
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    # The tiny epsilon keeps products such as 0.85 x 20 = 16.999999999999996 from losing an example.
    n_train = int(len(order) * train_fraction + 1e-9)
    n_test = int(len(order) * test_fraction + 1e-9)
    picked = [examples[i] for i in order]
    return InstructionSplits(train=picked[:n_train], val=picked[n_train + n_test:],
                             test=picked[n_train:n_train + n_test])


@dataclass
class TokenizedExample:
    """Token ids of prompt + response (the end-of-text id is added by `collate`).

    `ids` holds at most max_length + 1 ids: the last one of a truncated example is only ever a
    target. `prompt_length` counts the prompt's ids (for `mask_prompt`).
    """

    ids: list[int]
    prompt_length: int
    truncated: bool = False


def tokenize_instructions(examples: Sequence[dict], tokenizer, template: InstructionTemplate,
                          max_length: int) -> tuple[list[TokenizedExample], int]:
    """(tokenized examples, how many were truncated to `max_length` input tokens).

    The prompt and the response are encoded separately and joined, so the prompt's ids are
    exactly those `respond` feeds the model at inference (encoding the joined text could merge
    the prompt's last characters with the response's first ones).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    tokenized, truncated = [], 0
    for example in examples:
        prompt = tokenizer.encode(template.format_prompt(example["instruction"], example.get("input", "")))
        ids = prompt + tokenizer.encode(example["output"])
        # The sequence trained on is ids + [end of text]; a position's target is the next id, so
        # max_length inputs need max_length + 1 ids. Without truncation the last target is the end of text.
        cut = len(ids) > max_length
        truncated += cut
        tokenized.append(TokenizedExample(ids[:max_length + 1] if cut else ids, len(prompt), cut))
    return tokenized, truncated


def collate(batch: Sequence[Sequence[int]], pad_id: int, ignore_index: int = IGNORE_INDEX,
            max_length: int | None = None, prompt_lengths: Sequence[int] | None = None,
            device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, T): the tutorial's `custom_collate_fn`, plus prompt masking.

    Each sequence gets one end-of-text id (`pad_id`) appended, then more of them up to the longest
    sequence + 1; inputs drop the last id, targets drop the first (the next token of each
    position). In the targets, the first end-of-text after a sequence stays (the model learns to
    stop there) and every later one becomes `ignore_index`. The ignored positions are found by
    length, not by value, so an end-of-text id inside a text is still a target.
    `max_length`: inputs and targets cut to this many positions (T <= max_length).
    `prompt_lengths`: each sequence's prompt length P; targets 0 .. P-2 (those that predict the
    prompt's own ids 1 .. P-1) become `ignore_index`, so the loss covers only the response and
    its end-of-text.

        collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_id=50256) ->
        inputs  [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
        targets [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    """
    if not batch:
        raise ValueError("collate needs at least one sequence")
    if prompt_lengths is not None and len(prompt_lengths) != len(batch):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(batch)} sequences")
    width = max(len(item) for item in batch)  # = the longest sequence + 1 (its end of text), minus 1
    if max_length is not None:
        width = min(width, max_length)
    inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width), ignore_index, dtype=torch.long)
    for row, item in enumerate(batch):
        sequence = torch.tensor([*item, pad_id], dtype=torch.long)[:width + 1]   # ids + end of text
        inputs[row, :len(sequence) - 1] = sequence[:-1]
        targets[row, :len(sequence) - 1] = sequence[1:]
        if prompt_lengths is not None:
            targets[row, :max(0, prompt_lengths[row] - 1)] = ignore_index
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)
    return inputs, targets


# ---------------------------------------------------------------- responding


def _response_text(tokenizer, ids: Sequence[int], eos_id: int | None) -> str:
    if eos_id is not None and eos_id in ids:
        ids = ids[:list(ids).index(eos_id)]
    return tokenizer.decode(list(ids)).strip()


def respond_many(model: GPT, tokenizer, template: InstructionTemplate, examples: Sequence[dict],
                 max_new_tokens: int = 256, batch_size: int = 8, **sampling) -> list[str]:
    """The response to each example's instruction (and input): `respond`, several prompts per batch.

    Prompts of different lengths are left-padded with an attention mask, so each row computes
    what it would alone.
    """
    from glassgpt.generate import generate

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    eos_id = tokenizer.eos_id
    prompts = [tokenizer.encode(template.format_prompt(e["instruction"], e.get("input", "")))
               for e in examples]
    responses = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        outputs = generate(model, chunk, max_new_tokens, eos_id=eos_id, **sampling)
        responses += [_response_text(tokenizer, out[len(prompt):], eos_id)
                      for prompt, out in zip(chunk, outputs, strict=True)]
    return responses


def respond(model: GPT, tokenizer, template: InstructionTemplate, instruction: str, input: str = "",  # noqa: A002
            max_new_tokens: int = 256, **sampling) -> str:
    """The model's response to `instruction` (and `input`): only the response's text, stripped.

    The prompt is `template.format_prompt(instruction, input)`; generation (greedy unless
    `sampling` says otherwise: temperature, top_k, top_p, seed) stops at the tokenizer's
    end-of-text token or after `max_new_tokens`.
    """
    from glassgpt.generate import generate

    prompt = tokenizer.encode(template.format_prompt(instruction, input))
    out = generate(model, prompt, max_new_tokens, eos_id=tokenizer.eos_id, **sampling)
    return _response_text(tokenizer, out[0, len(prompt):].tolist(), tokenizer.eos_id)


# ---------------------------------------------------------------- settings

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class InstructSettings:
    """Every setting of `glassgpt finetune instruct`; each field is the `--flag` of the same name.

    The defaults are the tutorial's run: AdamW 5e-5, weight decay 0.1, 2 epochs, batch 8,
    evaluation every 5 steps over 5 batches, responses of up to 256 tokens.
    """

    mask_prompt: bool = field(default=False, metadata=_help(
        "ignore the prompt's tokens in the loss: learn only the responses (the tutorial's exercise)"))
    max_length: int | None = field(default=None, metadata=_help(
        "tokens per example; longer ones are truncated and counted (None: the model's context)"))
    epochs: int = field(default=2, metadata=_help("passes over the training examples"))
    max_steps: int | None = field(default=None, metadata=_help("optimizer steps instead of whole epochs"))
    lr: float = field(default=5e-5, metadata=_help("AdamW learning rate"))
    batch_size: int = field(default=8, metadata=_help("examples per step"))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW decay, on weight matrices only"))
    seed: int = field(default=123, metadata=_help("seeds the shuffling and dropout"))
    precision: str = field(default="fp32", metadata=_help(
        "fp32, bf16, fp16 (autocast; fp16 on CUDA only), or auto (bf16 where the device has it natively)"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps"))
    threads: int | None = field(default=None, metadata=_help("CPU threads for torch (None: torch's default)"))
    lora_rank: int | None = field(default=None, metadata=_help(
        "train rank-R LoRA adapters instead of the weights (merged into them when saved)"))
    lora_alpha: float | None = field(default=None, metadata=_help(
        "LoRA's scale is alpha / rank (None: alpha = rank)"))
    eval_every: int = field(default=5, metadata=_help("steps between evaluations (0: at each epoch's end)"))
    eval_batches: int = field(default=5, metadata=_help("batches averaged for each evaluation's losses"))
    max_new_tokens: int = field(default=256, metadata=_help("longest response generated for a test example"))
    test_responses: int | None = field(default=None, metadata=_help("test examples to answer (None: all)"))
    progress: bool = field(default=True, metadata=_help("show a progress bar and messages"))

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        for key in ("epochs", "batch_size", "eval_batches", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_length", "max_steps", "lora_rank", "threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1 (or None), got {getattr(self, key)}")
        if self.test_responses is not None and self.test_responses < 0:
            raise ValueError(f"test_responses must be >= 0 (or None), got {self.test_responses}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay}")
        if self.lora_alpha is not None:
            if self.lora_rank is None:
                raise ValueError("lora_alpha needs lora_rank")
            if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
                raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha}")

    def replace(self, **changes) -> InstructSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> InstructSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown instruction fine-tuning settings: {', '.join(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------- training data


class InstructionBatches:
    """Collated batches of tokenized examples: in order, or shuffled anew each pass by a seeded generator."""

    def __init__(self, examples: list[TokenizedExample], batch_size: int, pad_id: int, max_length: int,
                 mask_prompt: bool, shuffle: bool = False, drop_last: bool = False, seed: int = 0):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.max_length, self.mask_prompt = max_length, mask_prompt
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        whole, rest = divmod(len(self.examples), self.batch_size)
        return whole + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.examples)
        order = torch.randperm(n, generator=self.generator).tolist() if self.shuffle else list(range(n))
        for index in range(len(self)):
            chosen = [self.examples[i] for i in order[index * self.batch_size:(index + 1) * self.batch_size]]
            prompt_lengths = [e.prompt_length for e in chosen] if self.mask_prompt else None
            yield collate([e.ids for e in chosen], self.pad_id, max_length=self.max_length,
                          prompt_lengths=prompt_lengths)


def _as_splits(splits) -> InstructionSplits:
    if isinstance(splits, dict):
        missing = [key for key in ("train", "val", "test") if key not in splits]
        if missing:
            raise ValueError(f"splits needs the keys train, val and test; missing {', '.join(missing)}")
        splits = (splits["train"], splits["val"], splits["test"])
    if len(splits) != 3:
        raise ValueError(f"splits must be (train, val, test), got {len(splits)} parts")
    splits = InstructionSplits(*(list(part) for part in splits))
    for name, part in zip(InstructionSplits._fields, splits, strict=True):
        for number, example in enumerate(part, start=1):
            part[number - 1] = _check_example(example, f"{name} example {number}")
    if not splits.train:
        raise ValueError("there are no training examples")
    return splits


@dataclass
class PreparedData:
    """The splits, tokenized and checked against a model, ready to batch."""

    splits: InstructionSplits
    tokenized: dict[str, list[TokenizedExample]]
    truncated: dict[str, int]
    max_length: int
    pad_id: int


def prepare_data(splits, tokenizer, template: InstructionTemplate, model: GPT,
                 max_length: int | None = None, mask_prompt: bool = False) -> PreparedData:
    """Check the examples, the tokenizer and the lengths against `model`, then tokenize every split.

    Raises ValueError before any work: a tokenizer without an end-of-text token or with more ids
    than the model's vocabulary, a `max_length` past the context, or (with `mask_prompt`) a
    prompt that fills `max_length`, leaving no target to learn.
    """
    splits = _as_splits(splits)
    if tokenizer.eos_id is None:
        raise ValueError(f"the {tokenizer.name} tokenizer has no end-of-text token, and instruction "
                         "fine-tuning ends each response with one (use the gpt2 tokenizer)")
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size:,} ids but the model's vocabulary only "
                         f"{vocab:,}: this tokenizer was not made for this model")
    context = model.config.context_length
    max_length = max_length or context
    if max_length > context:
        raise ValueError(f"max_length {max_length} exceeds the model's context length of {context}")
    tokenized, truncated = {}, {}
    for name, part in zip(InstructionSplits._fields, splits, strict=True):
        tokenized[name], truncated[name] = tokenize_instructions(part, tokenizer, template, max_length)
        for number, example in enumerate(tokenized[name], start=1):
            # Masked, a prompt of P tokens leaves targets from position P - 1 on: none if P > max_length.
            if mask_prompt and example.prompt_length > max_length:
                instruction = getattr(splits, name)[number - 1]["instruction"]
                raise ValueError(
                    f"{name} example {number} ({instruction[:40]!r}): its prompt alone is "
                    f"{example.prompt_length} tokens, so with "
                    f"mask_prompt and max_length {max_length} nothing is left to learn; raise max_length "
                    "or shorten the example")
    return PreparedData(splits, tokenized, truncated, max_length, tokenizer.eos_id)


# ---------------------------------------------------------------- training


def trainable_parameter_groups(model: GPT, weight_decay: float) -> list[dict]:
    """AdamW groups over the parameters that require gradients, decaying weight matrices only.

    Biases, LayerNorm scales and shifts, and the embeddings are not decayed (as in `glassgpt
    train`); frozen parameters (LoRA's base weights) get no optimizer state at all.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_embedding = name.startswith(("tok_emb.", "pos_emb."))
        (decay if parameter.dim() >= 2 and not is_embedding else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def plot_curves(records: list[dict], path: Path) -> None:
    """The loss curves as a PNG: each step's training loss; each evaluation's train and validation loss."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.subplots()
    steps = [r for r in records if r["event"] == "step"]
    axes.plot([r["step"] for r in steps], [r["train_loss"] for r in steps], color="tab:blue", alpha=0.3,
              linewidth=0.8, label="train (each step)")
    for key, color, label in (("train_loss", "tab:blue", "train"), ("val_loss", "tab:orange", "validation")):
        evals = [r for r in records if r["event"] == "eval" and r.get(key) is not None]
        if evals:
            axes.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", color=color, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)


def _holds_results(directory: Path) -> bool:
    from glassgpt.weights import GLASSGPT_META, WEIGHTS_FILE

    return any((directory / name).exists() for name in (GLASSGPT_META, WEIGHTS_FILE, RESULTS_FILE))


def save_model_atomically(model: GPT, out_dir: Path, tokenizer, extra: dict) -> None:
    """`weights.save_model` into `out_dir` without ever leaving a half-written model file there.

    The files are written and fsynced in a temporary directory, then moved in one at a time with
    `os.replace`: the weights first, last the metadata that makes the directory a model.
    """
    from glassgpt.checkpoint import fsync_directory, fsync_tree
    from glassgpt.weights import GLASSGPT_META, WEIGHTS_FILE, save_model

    tmp = out_dir / ".model.tmp"
    if tmp.exists():  # left by a crash in an earlier save
        shutil.rmtree(tmp)
    save_model(model, tmp, tokenizer, extra=extra)
    fsync_tree(tmp)
    for name in (WEIGHTS_FILE, GLASSGPT_META):
        os.replace(tmp / name, out_dir / name)
    fsync_directory(out_dir)
    shutil.rmtree(tmp)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _lora_module(settings: InstructSettings):
    """glassgpt.lora when LoRA is asked for (None otherwise); a clear error where it cannot be done."""
    if not settings.lora_rank:
        return None
    try:
        from glassgpt import lora
    except ImportError:
        raise ValueError("lora_rank needs glassgpt.lora, which this installation does not have") from None
    missing = [name for name in ("apply_lora", "merge_lora") if not hasattr(lora, name)]
    if missing:
        raise ValueError(f"glassgpt.lora has no {' or '.join(missing)}: LoRA fine-tuning is not available")
    return lora


class InstructionTrainer:
    """One instruction fine-tuning run over prepared data; `finetune_instruct` is its front door."""

    def __init__(self, model: GPT, data: PreparedData, settings: InstructSettings, out: Path | None):
        from glassgpt.device import has_native_bf16, pick_device

        self.model, self.data, self.settings, self.out = model, data, settings, out
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = pick_device(settings.device)
        precision = settings.precision
        if precision == "auto":
            precision = "bf16" if has_native_bf16(self.device) else "fp32"
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 training needs a CUDA GPU; on a CPU use precision bf16")
        if precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bf16 support; use precision fp16")
        self.precision = precision
        self.steps_per_epoch = len(data.tokenized["train"]) // settings.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(data.tokenized['train'])} training examples make no full batch of "
                             f"{settings.batch_size}: lower batch_size")
        self.total_steps = settings.max_steps or settings.epochs * self.steps_per_epoch
        self.records: list[dict] = []
        self.step = self.tokens_seen = 0

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    def batches(self, split: str, shuffle: bool = False) -> InstructionBatches:
        d, s = self.data, self.settings
        return InstructionBatches(d.tokenized[split], s.batch_size, d.pad_id, d.max_length, s.mask_prompt,
                                  shuffle=shuffle, drop_last=shuffle, seed=s.seed)

    @torch.no_grad()
    def mean_loss(self, split: str, max_batches: int | None = None) -> float | None:
        """Mean cross-entropy per counted target over the split's first `max_batches` batches (None: all)."""
        if not self.data.tokenized[split]:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for index, (inputs, targets) in enumerate(self.batches(split)):
            if max_batches is not None and index >= max_batches:
                break
            n_targets = int((targets != IGNORE_INDEX).sum())
            with self.autocast():
                loss = self.model(inputs.to(self.device), targets=targets.to(self.device))
            total += loss.item() * n_targets  # the batch's mean back to a sum: every target weighs the same
            count += n_targets
        self.model.train(was_training)
        return total / count

    def log(self, event: str, **values) -> dict:
        record = {"event": event, "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3),
                  "tokens": self.tokens_seen, **values}
        self.records.append(record)
        if self.out is not None:
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
        return record

    def evaluate(self, say) -> None:
        s = self.settings
        losses = {"train_loss": self.mean_loss("train", s.eval_batches),
                  "val_loss": self.mean_loss("val", s.eval_batches)}
        self.log("eval", **losses)
        val = f" | val {losses['val_loss']:.3f}" if losses["val_loss"] is not None else ""
        say(f"step {self.step:>5} | epoch {self.step / self.steps_per_epoch:.2f} | "
            f"train {losses['train_loss']:.3f}{val}")

    def fit(self, say) -> float:
        """Train for the planned steps; returns the seconds it took. Raises TrainingDiverged on a NaN loss."""
        from tqdm import tqdm

        from glassgpt.train import TrainingDiverged

        s, model = self.settings, self.model
        torch.manual_seed(s.seed)  # dropout masks
        groups = trainable_parameter_groups(model, s.weight_decay)
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {"foreach": True}
        optimizer = torch.optim.AdamW(groups, lr=s.lr, **fused)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        train_batches = self.batches("train", shuffle=True)
        bar = tqdm(total=self.total_steps, desc="finetune", unit="step", dynamic_ncols=True,
                   disable=not s.progress, leave=False)
        model.train()
        started = time.perf_counter()
        try:
            while self.step < self.total_steps:
                for inputs, targets in train_batches:
                    if self.step >= self.total_steps:
                        break
                    inputs, targets = inputs.to(self.device), targets.to(self.device)
                    with self.autocast():
                        # GPT's loss is F.cross_entropy, whose default ignore_index is -100 = IGNORE_INDEX.
                        loss = model(inputs, targets=targets)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.tokens_seen += inputs.numel()
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise TrainingDiverged(f"the training loss became {loss_value} at step {self.step}; "
                                               "no model was saved. Try a lower lr or precision fp32")
                    self.log("step", train_loss=loss_value, lr=s.lr)
                    bar.update()
                    bar.set_postfix(loss=f"{loss_value:.3f}")
                    due = (self.step % s.eval_every == 0 if s.eval_every
                           else self.step % self.steps_per_epoch == 0)
                    if due or self.step == self.total_steps:
                        self.evaluate(say)
        finally:
            bar.close()
        return time.perf_counter() - started


def finetune_instruct(model: GPT, tokenizer, splits, out_dir: str | Path | None,
                      settings: InstructSettings | None = None,
                      template: InstructionTemplate | None = None) -> dict:
    """Fine-tune `model` in place to follow instructions; returns the results (`out_dir/results.json`).

    `splits`: (train, val, test) lists of {"instruction", "input", "output"}: an
    `InstructionSplits`, a dict with those keys, or a 3-sequence; val and test may be empty.
    Everything is checked before the first step (settings, data, tokenizer, lengths, LoRA) and
    `out_dir` must not already hold a model or results: nothing is ever written over one.

    `out_dir` receives `metrics.jsonl` (a record per step and per evaluation, as training goes),
    `loss.png`, the model with its tokenizer and template (`weights.load_model(out_dir)`,
    `load_template(out_dir)`), `results.json` (losses over each whole split, example, token and
    truncation counts, trainable parameters, settings) and `test_responses.jsonl` (instruction,
    input, expected, generated: greedy, up to `max_new_tokens`, stopped at the end-of-text token).
    `out_dir=None` keeps nothing on disk.
    """
    from tqdm import tqdm

    settings = settings or InstructSettings()
    template = template or InstructionTemplate()
    say = tqdm.write if settings.progress else (lambda message: None)

    # Everything that can be refused is refused here, before a file is written or a step taken.
    data = prepare_data(splits, tokenizer, template, model, settings.max_length, settings.mask_prompt)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and (not out.is_dir() or _holds_results(out)):
        raise ValueError(f"{out} already holds a model or results (or is a file): choose another output "
                         "directory; nothing there is overwritten")
    lora = _lora_module(settings)
    trainer = InstructionTrainer(model, data, settings, out)
    if lora is not None:
        alpha = settings.lora_alpha if settings.lora_alpha is not None else settings.lora_rank
        lora.apply_lora(model, settings.lora_rank, alpha)
    model.to(trainer.device)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text("", encoding="utf-8")

    counts = data.splits.counts()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"model {model.config.name}: {model.num_parameters():,} parameters, {trainable:,} trained; "
        f"context {model.config.context_length}")
    say(f"data: {counts['train']:,} train / {counts['val']:,} val / {counts['test']:,} test examples, "
        f"max length {data.max_length} ({sum(data.truncated.values())} truncated); "
        f"{trainer.steps_per_epoch} steps per epoch, {trainer.total_steps} steps; the loss "
        f"covers {'the responses only' if settings.mask_prompt else 'prompts and responses'}")
    say(f"device {trainer.device}, {trainer.precision}, AdamW lr {settings.lr:g}, "
        f"weight decay {settings.weight_decay:g}")
    train_seconds = trainer.fit(say)

    if lora is not None:
        lora.merge_lora(model)  # an ordinary model again, which every loader reads
    losses = {f"{name}_loss": trainer.mean_loss(name) for name in InstructionSplits._fields}
    results = {
        **losses,
        "examples": counts,
        "truncated": data.truncated,
        "tokens": {name: sum(min(len(e.ids), data.max_length) for e in part)
                   for name, part in data.tokenized.items()},
        "max_length": data.max_length,
        "steps": trainer.step,
        "epochs": round(trainer.step / trainer.steps_per_epoch, 3),
        "tokens_seen": trainer.tokens_seen,
        "train_seconds": round(train_seconds, 2),
        "trainable_parameters": trainable,
        "precision": trainer.precision,
        "device": str(trainer.device),
        "template": template.to_dict(),
        "settings": settings.to_dict(),
    }
    say("losses: " + ", ".join(f"{name} {value:.3f}" for name, value in losses.items() if value is not None))
    if out is not None:
        summary = {key: results[key] for key in ("train_loss", "val_loss", "test_loss", "steps", "examples")}
        extra = {TEMPLATE_KEY: template.to_dict(),
                 "finetune": {"task": "instruct", **summary, "settings": settings.to_dict()}}
        save_model_atomically(model, out, tokenizer, extra)
        plot_curves(trainer.records, out / PLOT_FILE)

    test = data.splits.test if settings.test_responses is None else data.splits.test[:settings.test_responses]
    if test:
        say(f"answering {len(test)} test instructions (up to {settings.max_new_tokens} tokens each)")
    generated = respond_many(model, tokenizer, template, test, settings.max_new_tokens,
                             batch_size=settings.batch_size) if test else []
    rows = [{"instruction": e["instruction"], "input": e["input"], "expected": e["output"], "generated": g}
            for e, g in zip(test, generated, strict=True)]
    results["test_responses"] = len(rows)
    if out is not None:
        _write_atomically(out / RESPONSES_FILE, "".join(json.dumps(row) + "\n" for row in rows))
        _write_atomically(out / RESULTS_FILE, json.dumps(results, indent=2))
        say(f"saved the model, results.json and {RESPONSES_FILE} in {out}")
    return results
