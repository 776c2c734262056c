"""Instruction fine-tuning: teach a language model to answer instructions.

The method, data, template and defaults are chapter 7 of the tutorial, the book "Build a Large
Language Model (From Scratch)" (see the README).

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
- `finetune_instruct`: AdamW over those batches (every weight, or LoRA adapters merged after
  training), then the losses, the test set's responses and the checkpoint (with its template) in
  one output directory. The loop, the output directory and LoRA's wiring are shared with
  classification (`glassgpt.finetune_common`).
- `respond`: a prompt in, only the response text out, stopping at the end-of-text token.

This module knows nothing about the command line; `glassgpt finetune instruct` parses its
arguments into `InstructSettings` and calls `finetune_instruct`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from tqdm import tqdm

from glassgpt import finetune_common, watch
from glassgpt.config import Settings
from glassgpt.data import jsonl_values, read_source
from glassgpt.device import Precision
from glassgpt.generate import generate
from glassgpt.model import GPT
from glassgpt.plots import plot_metric
from glassgpt.train import setting
from glassgpt.weights import GLASSGPT_META, save_model

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: targets with it add nothing to the loss
RESPONSES_FILE = "test_responses.jsonl"
PLOT_FILE = "loss.png"

# ---------------------------------------------------------------- the prompt template


@dataclass(frozen=True)
class InstructionTemplate(Settings):
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

    fields_name: ClassVar[str] = "instruction template fields"

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

    @classmethod
    def from_dict(cls, data: dict) -> InstructionTemplate:
        cls.check_names(data)
        wrong = sorted(key for key, value in data.items() if not isinstance(value, str))
        if wrong:
            raise ValueError(f"instruction template fields must be strings: {', '.join(wrong)}")
        return cls(**data)


TEMPLATE_KEY = "instruction_template"  # where the template sits in a checkpoint's glassgpt.json


def load_template(path: str | Path) -> InstructionTemplate | None:
    """The instruction template saved with the glassgpt checkpoint in `path` (None if it has none)."""
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
    text, source = read_source(path, "instruction data file", "data set")
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
        examples = [_check_example(entry, f"{source}, line {number}")
                    for number, entry in jsonl_values(text, lambda number: f"{source}, line {number}")]
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
    prompt = tokenizer.encode(template.format_prompt(instruction, input))
    out = generate(model, prompt, max_new_tokens, eos_id=tokenizer.eos_id, **sampling)
    return _response_text(tokenizer, out[0, len(prompt):].tolist(), tokenizer.eos_id)


# ---------------------------------------------------------------- settings


@dataclass
class InstructSettings(finetune_common.FinetuneSettings):
    """Every setting of `glassgpt finetune instruct`; each field is the `--flag` of the same name.

    The defaults are the tutorial's run: AdamW 5e-5, weight decay 0.1, 2 epochs, batch 8,
    evaluation every 5 steps over 5 batches, responses of up to 256 tokens.
    """

    fields_name: ClassVar[str] = "instruction fine-tuning settings"

    mask_prompt: bool = setting(False, "ignore the prompt's tokens in the loss: learn only the responses "
                                       "(the tutorial's exercise)")
    eval_every: int = setting(5, "steps between evaluations (0: at each epoch's end)")
    max_new_tokens: int = setting(256, "longest response generated for a test example")
    test_responses: int | None = setting(None, "test examples to answer (None: all)")
    progress: bool = setting(True, "show a progress bar and messages")

    fields_name: ClassVar[str] = "instruction fine-tuning settings"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.test_responses is not None and self.test_responses < 0:
            raise ValueError(f"test_responses must be >= 0 (or None), got {self.test_responses}")


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
    finetune_common.check_tokenizer_fits(tokenizer, model.config)
    max_length = finetune_common.resolve_max_length(max_length, model.config)
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

INSTRUCTION_RUN = "an instruction fine-tuning run"


@torch.no_grad()
def mean_loss(model: GPT, batches: InstructionBatches, precision: Precision,
              max_batches: int | None = None) -> float | None:
    """Mean cross-entropy per counted target over the first `max_batches` batches (None: all), dropout off."""
    if not batches.examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in islice(batches, max_batches):
        n_targets = int((targets != IGNORE_INDEX).sum())
        with precision.autocast():
            loss = model(inputs.to(precision.device), targets=targets.to(precision.device))
        total += loss.item() * n_targets  # the batch's mean back to a sum: every target weighs the same
        count += n_targets
    model.train(was_training)
    return total / count


def finetune_instruct(model: GPT, tokenizer, splits, out_dir: str | Path | None,
                      settings: InstructSettings | None = None,
                      template: InstructionTemplate | None = None) -> dict:
    """Fine-tune `model` in place to follow instructions; returns the results (`out_dir/results.json`).

    `splits`: (train, val, test) lists of {"instruction", "input", "output"}: an
    `InstructionSplits`, a dict with those keys, or a 3-sequence; val and test may be empty.
    Everything is checked before the first step (settings, data, tokenizer, lengths, LoRA) and
    `out_dir` must be new or empty: nothing is ever written over a model or results.

    `out_dir` receives `metrics.jsonl` (a record per step and per evaluation, as training goes),
    `loss.png`, the model with its tokenizer and template (`weights.load_model(out_dir)`,
    `load_template(out_dir)`), `results.json` (losses over each whole split, example, token and
    truncation counts, trainable parameters, settings), `test_responses.jsonl` (instruction,
    input, expected, generated: greedy, up to `max_new_tokens`, stopped at the end-of-text token)
    and with `save_adapters` the LoRA adapters alone (`adapters.safetensors`). It is filled under a
    temporary name (`.NAME.tmp`) and appears only when all of it is written. `out_dir=None` keeps
    nothing on disk. With `lora_rank`, the adapters are merged into the weights (of `model` too)
    after training, so the saved model is an ordinary one.
    """
    settings = settings or InstructSettings()
    template = template or InstructionTemplate()
    say = tqdm.write if settings.progress else (lambda message: None)

    # Everything that can be refused is refused here, before a file is written or a step taken.
    data = prepare_data(splits, tokenizer, template, model, settings.max_length, settings.mask_prompt)
    out = finetune_common.check_out_dir(out_dir, INSTRUCTION_RUN) if out_dir is not None else None

    def batches(split: str, shuffle: bool = False) -> InstructionBatches:
        return InstructionBatches(data.tokenized[split], settings.batch_size, data.pad_id, data.max_length,
                                  settings.mask_prompt, shuffle, drop_last=shuffle, seed=settings.seed)

    train_batches = batches("train", shuffle=True)
    steps_per_epoch = len(train_batches)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data.tokenized['train'])} training examples make no full batch of "
                         f"{settings.batch_size}: lower batch_size")
    total_steps = settings.max_steps or settings.epochs * steps_per_epoch

    # With LoRA only the adapters train; without, every parameter that requires gradients (all of a
    # freshly loaded model's).
    precision, optimizer, trainable = finetune_common.prepare_training(model, settings)
    counts = data.splits.counts()
    say(f"model {model.config.name}: {model.num_parameters():,} parameters, {trainable:,} trained"
        f"{f' (LoRA rank {settings.lora_rank})' if settings.lora_rank else ''}; "
        f"context {model.config.context_length}")
    say(f"data: {counts['train']:,} train / {counts['val']:,} val / {counts['test']:,} test examples, "
        f"max length {data.max_length} ({sum(data.truncated.values())} truncated); "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps; the loss "
        f"covers {'the responses only' if settings.mask_prompt else 'prompts and responses'}")
    say(f"device {precision.device}, {precision.name}, AdamW lr {settings.lr:g}, "
        f"weight decay {settings.weight_decay:g}")

    def loss_of(batch) -> torch.Tensor:
        inputs, targets = batch
        # GPT's loss is F.cross_entropy, whose default ignore_index is -100 = IGNORE_INDEX.
        return model(inputs.to(precision.device), targets=targets.to(precision.device))

    def run(directory: Path | None) -> dict:
        metrics = finetune_common.Metrics(directory)
        example = (data.splits.val or data.splits.train)[0]
        probes = watch.finetune_probes(directory, model, tokenizer,
                                       template.format_prompt(example["instruction"], example["input"]))
        started = time.perf_counter()
        step = tokens_seen = 0
        for step, (inputs, _), loss, due in finetune_common.train_steps(
                model, optimizer, train_batches, loss_of, precision, total_steps, settings.eval_every,
                settings.seed, settings.progress, out):
            tokens_seen += inputs.numel()
            record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "tokens": tokens_seen}
            metrics.add({"event": "step", **record, "train_loss": loss, "lr": settings.lr})
            if due:
                losses = {f"{name}_loss": mean_loss(model, batches(name), precision, settings.eval_batches)
                          for name in ("train", "val")}
                metrics.add({"event": "eval", **record, **losses})
                if probes:
                    probes.record(model, step)
                val = f" | val {losses['val_loss']:.3f}" if losses["val_loss"] is not None else ""
                say(f"step {step:>5} | epoch {step / steps_per_epoch:.2f} | "
                    f"train {losses['train_loss']:.3f}{val}")
        train_seconds = time.perf_counter() - started
        finetune_common.merge_adapters(model, directory, settings.save_adapters)

        losses = {f"{name}_loss": mean_loss(model, batches(name), precision)
                  for name in InstructionSplits._fields}
        results = {
            **losses, "examples": counts, "truncated": data.truncated,
            "tokens": {name: sum(min(len(e.ids), data.max_length) for e in part)
                       for name, part in data.tokenized.items()},
            "max_length": data.max_length, "steps": step, "epochs": round(step / steps_per_epoch, 3),
            "tokens_seen": tokens_seen, "train_seconds": round(train_seconds, 2),
            "trainable_parameters": trainable, "precision": precision.name, "device": str(precision.device),
            "template": template.to_dict(), "settings": settings.to_dict(),
        }
        say("losses: " + ", ".join(f"{name} {value:.3f}" for name, value in losses.items()
                                   if value is not None))

        test = data.splits.test[:settings.test_responses]  # [:None]: all of them
        if test:
            say(f"answering {len(test)} test instructions (up to {settings.max_new_tokens} tokens each)")
        generated = respond_many(model, tokenizer, template, test, settings.max_new_tokens,
                                 batch_size=settings.batch_size) if test else []
        rows = [{"instruction": e["instruction"], "input": e["input"], "expected": e["output"],
                 "generated": g} for e, g in zip(test, generated, strict=True)]
        results["test_responses"] = len(rows)
        if directory is not None:
            summary = {key: results[key]
                       for key in ("train_loss", "val_loss", "test_loss", "steps", "examples")}
            extra = {TEMPLATE_KEY: template.to_dict(),
                     "finetune": {"task": "instruct", **summary, "settings": settings.to_dict()}}
            save_model(model, directory, tokenizer, extra=extra)
            plot_metric(metrics.records, directory / PLOT_FILE, x="step", xlabel="optimizer step")
            (directory / RESPONSES_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows),
                                                    encoding="utf-8")
            results_file = directory / finetune_common.RESULTS_FILE
            results_file.write_text(json.dumps(results, indent=2), encoding="utf-8")
            say(f"saved the model, results.json and {RESPONSES_FILE} in {out}")
        return results

    return finetune_common.write_output(out, run)
