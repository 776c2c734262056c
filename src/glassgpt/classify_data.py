"""Labelled texts for classification: read, check, balance, split, tokenise, batch.

    data = load_classification_data("bundled:sms-spam-collection.tsv", tokenizer, balance=True,
                                    max_length=model.config.context_length)

Files hold one (label, text) pair per example, in one of three formats, chosen by extension:
- TSV (`.tsv`, `.txt`): `label<TAB>text` per line, no header (the bundled SMS Spam Collection);
- CSV (`.csv`): a header row naming (at least) the columns `label` and `text`; quoted fields may
  span lines, as the csv module reads them;
- JSONL (`.jsonl`, `.json`): one object `{"label": ..., "text": ...}` per line.
Labels are strings (JSON integers are read as their decimal text). Every problem is reported with
the file and the line it was found on, before any model work starts.

Batches are padded on the right. A GPT's attention is causal, so tokens after a text's last real
token cannot change anything computed up to it: the classifier reads the last real token
(`glassgpt.classify.class_logits`), and the padding's id and amount do not matter.
"""

from __future__ import annotations

import csv
import io
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from glassgpt.data import BUNDLED_PREFIX, jsonl_values, read_source

FORMATS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
DEFAULT_SPLIT = (0.7, 0.1, 0.2)  # train / validation / test, as the tutorial


@dataclass
class LabelledTexts:
    """Texts and their class indices into `classes`; `lines` says where each came from in `source`."""

    texts: list[str]
    labels: list[int]
    classes: list[str]
    source: str = ""
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        lines = [self.lines[i] for i in indices] if self.lines else []
        return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                             self.classes, self.source, lines)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {name: counts.get(index, 0) for index, name in enumerate(self.classes)}


# ---------------------------------------------------------------- reading files


def data_format(path: str | Path) -> str:
    """tsv, csv or jsonl, from the file name's extension."""
    suffix = Path(str(path).removeprefix(BUNDLED_PREFIX)).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the format of {path} from its extension: use .tsv (label<TAB>text), "
                         ".csv (label,text header) or .jsonl ({{\"label\": ..., \"text\": ...}} per line)")
    return FORMATS[suffix]


def _pairs_tsv(content: str, source: str) -> list[tuple[int, str, str]]:
    pairs = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing one, say) hold no example
        if "\t" not in line:
            raise ValueError(f"{source} line {number}: expected label<TAB>text, found no tab: {line[:60]!r}")
        label, text = line.split("\t", 1)
        pairs.append((number, label, text))
    return pairs


def _pairs_csv(content: str, source: str) -> list[tuple[int, str, str]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    columns = reader.fieldnames or []
    if not columns:
        return []
    missing = [name for name in ("label", "text") if name not in columns]
    if missing:
        raise ValueError(f"{source} line 1: the CSV header must name the columns label and text; "
                         f"it names {', '.join(columns)}")
    pairs = []
    start = reader.line_num + 1  # the line a row starts on (a quoted field may span several)
    for row in reader:
        if None in row or row.get("label") is None or row.get("text") is None:
            found = len([value for value in row.values() if value is not None])
            raise ValueError(f"{source} line {start}: expected {len(columns)} fields "
                             f"({', '.join(columns)}), found {found}")
        if any((value or "").strip() for value in row.values() if isinstance(value, str)):
            pairs.append((start, row["label"], row["text"]))
        start = reader.line_num + 1
    return pairs


def _pairs_jsonl(content: str, source: str) -> list[tuple[int, str, str]]:
    pairs = []
    for number, record in jsonl_values(content, lambda number: f"{source} line {number}"):
        if not isinstance(record, dict) or "label" not in record or "text" not in record:
            raise ValueError(f"{source} line {number}: expected an object with \"label\" and \"text\"")
        label, text = record["label"], record["text"]
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str) or not isinstance(text, str):
            raise ValueError(f"{source} line {number}: \"label\" must be a string (or an integer) and "
                             "\"text\" a string")
        pairs.append((number, label, text))
    return pairs


def check_labels(labels: str | Sequence[str]) -> list[str]:
    """The class names `labels` gives ("ham,spam" or a list), stripped; at least two, distinct, non-empty."""
    classes = [label.strip() for label in (labels.split(",") if isinstance(labels, str) else labels)]
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(classes):
        raise ValueError(f"labels must name at least two distinct classes, got {classes}")
    return classes


def load_labelled(path: str | Path, labels: Sequence[str] | None = None,
                  format: str | None = None, allow_missing: bool = False) -> LabelledTexts:
    """Every (label, text) of a TSV, CSV or JSONL file (or `bundled:NAME`), checked.

    The classes are the labels found, sorted, unless `labels` fixes them and their order; then a
    label outside `labels` is an error, and so is one of `labels` that never occurs (unless
    `allow_missing`: a test file may hold only some of a classifier's classes). Empty files,
    malformed lines, empty labels or texts, and a single class are errors naming the file and line.
    """
    fmt = format or data_format(path)
    readers = {"tsv": _pairs_tsv, "csv": _pairs_csv, "jsonl": _pairs_jsonl}
    if fmt not in readers:
        raise ValueError(f"unknown data format {fmt!r}; choose one of: {', '.join(readers)}")
    content, source = read_source(path, "data file", "data file")
    pairs = readers[fmt](content.removeprefix("\ufeff"), source)  # a byte-order mark is not data
    if not pairs:
        raise ValueError(f"{source} holds no examples (it is empty)")
    cleaned = []
    for number, label, text in pairs:
        label = label.strip()
        if not label:
            raise ValueError(f"{source} line {number}: the label is empty")
        if not text.strip():
            raise ValueError(f"{source} line {number}: the text is empty")
        cleaned.append((number, label, text))

    if labels is not None:
        classes = check_labels(labels)
        for number, label, _ in cleaned:
            if label not in classes:
                raise ValueError(f"{source} line {number}: label {label!r} is not one of the given labels "
                                 f"({', '.join(classes)})")
        unused = sorted(set(classes) - {label for _, label, _ in cleaned})
        if unused and not allow_missing:
            raise ValueError(f"{source}: label(s) {', '.join(unused)} given but never found in the file")
    else:
        classes = sorted({label for _, label, _ in cleaned})
        if len(classes) < 2:
            raise ValueError(f"{source}: every example has the label {classes[0]!r}; classification needs "
                             "at least two classes")
    index = {name: i for i, name in enumerate(classes)}
    return LabelledTexts(texts=[text for _, _, text in cleaned],
                         labels=[index[label] for _, label, _ in cleaned], classes=classes, source=source,
                         lines=[number for number, _, _ in cleaned])


# ---------------------------------------------------------------- balance and split


def balance(data: LabelledTexts, seed: int = 123) -> LabelledTexts:
    """Every class undersampled to the size of the smallest one (a seeded random choice per class).

    What the tutorial does to the SMS data: 747 of the 4,827 ham messages kept beside the 747 spam.
    The examples kept stay in file order.
    """
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(data.labels):
        by_class.setdefault(label, []).append(position)
    smallest = min(len(positions) for positions in by_class.values())
    rng = random.Random(seed)
    kept = [i for label in sorted(by_class) for i in rng.sample(by_class[label], smallest)]
    return data.subset(sorted(kept))


def parse_split(text: str | Sequence[float]) -> tuple[float, float, float]:
    """(train, val, test) fractions from "70/10/20", "0.7,0.1,0.2" or three numbers; they must sum to 1."""
    if isinstance(text, str):
        parts = [part for part in text.replace(",", "/").split("/") if part.strip()]
        try:
            values = [float(part) for part in parts]
        except ValueError:
            raise ValueError(f"split must be three numbers like 70/10/20, got {text!r}") from None
    else:
        values = [float(v) for v in text]
    if len(values) != 3 or any(v < 0 for v in values):
        raise ValueError(f"split must be three non-negative numbers (train/val/test), got {text!r}")
    total = sum(values)
    if total > 1.0 + 1e-9:  # percentages: 70/10/20
        values = [v / 100.0 for v in values]
        total = sum(values)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"the split's fractions must sum to 1 (or 100), got {text!r}")
    if values[0] == 0:
        raise ValueError("the split leaves no training examples")
    return values[0], values[1], values[2]


def split(data: LabelledTexts, fractions: Sequence[float] = DEFAULT_SPLIT,
          seed: int = 123) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
    """(train, val, test): the examples shuffled with `seed`, then cut by `fractions`.

    As the tutorial's random_split: train = int(n * f_train), val = int(n * f_val), test the rest,
    so the balanced SMS data (1,494) gives 1,045 / 149 / 300.
    """
    train_fraction, val_fraction, _ = parse_split(fractions)
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    train_end = int(len(order) * train_fraction)
    val_end = train_end + int(len(order) * val_fraction)
    return data.subset(order[:train_end]), data.subset(order[train_end:val_end]), data.subset(order[val_end:])


# ---------------------------------------------------------------- tokens and batches


@dataclass
class EncodedTexts(Dataset):
    """Token ids and class indices of one split; item i is (ids, label)."""

    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.ids[index], self.labels[index]


def encode_texts(texts: Sequence[str], tokenizer, max_length: int, source: str = "",
                 lines: Sequence[int] | None = None) -> tuple[list[list[int]], int]:
    """(token ids of each text, cut to its first `max_length` tokens as the tutorial does;
    the number of texts cut)."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    encoded, truncated = [], 0
    for position, text in enumerate(texts):
        where = f"{source} line {lines[position]}" if lines else f"text {position}"
        try:
            ids = tokenizer.encode(text)
        except ValueError as error:  # a character tokenizer meeting a character it lacks
            raise ValueError(f"{where}: {error}") from None
        if not ids:
            raise ValueError(f"{where}: the text gives no tokens")
        if len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        encoded.append(ids)
    return encoded, truncated


def pad_id_for(tokenizer) -> int:
    """The padding id: end-of-text where the tokenizer has one (as the tutorial), else 0.

    Any id would do: right padding is never read (see the module's docstring).
    """
    return tokenizer.eos_id if getattr(tokenizer, "eos_id", None) is not None else 0


def collate(batch: Sequence[tuple[Sequence[int], int]], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with `pad_id` to the batch's longest text, labels (B,), lengths (B,))."""
    lengths = [len(ids) for ids, _ in batch]
    width = max(lengths)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for row, (tokens, _) in enumerate(batch):
        ids[row, :len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
    return ids, torch.tensor([label for _, label in batch], dtype=torch.long), torch.tensor(lengths)


def make_loader(dataset: EncodedTexts, batch_size: int, pad_id: int, shuffle: bool = False,
                seed: int = 0) -> DataLoader:
    """Batches of `collate`. Training loaders shuffle (seeded: each epoch's order depends only on the
    seed and the epoch) and drop the last incomplete batch, as the tutorial's."""
    def collate_fn(batch):
        return collate(batch, pad_id)

    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                      collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


@dataclass
class ClassificationData:
    """The splits of a labelled file, tokenised: what `glassgpt.classify.finetune_classifier` trains on."""

    classes: list[str]
    train: EncodedTexts
    val: EncodedTexts
    test: EncodedTexts
    max_length: int
    truncated: int  # texts cut to max_length, over all splits
    source: str = ""
    pad_id: int = 0
    counts: dict = field(default_factory=dict)  # examples per class: in the file, and after balancing

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def load_classification_data(path: str | Path, tokenizer, max_length: int,
                             labels: Sequence[str] | None = None, balanced: bool = False,
                             fractions: Sequence[float] = DEFAULT_SPLIT, seed: int = 123,
                             format: str | None = None) -> ClassificationData:
    """Read, check, optionally balance, split and tokenise a labelled file (see the module docstring)."""
    data = load_labelled(path, labels, format)
    counts = {"file": data.class_counts()}
    if balanced:
        data = balance(data, seed)
        counts["balanced"] = data.class_counts()
    splits = split(data, fractions, seed)
    encoded, truncated = [], 0
    for part in splits:
        ids, cut = encode_texts(part.texts, tokenizer, max_length, part.source, part.lines)
        encoded.append(EncodedTexts(ids, part.labels))
        truncated += cut
    return ClassificationData(classes=data.classes, train=encoded[0], val=encoded[1], test=encoded[2],
                              max_length=max_length, truncated=truncated, source=data.source,
                              pad_id=pad_id_for(tokenizer), counts=counts)
