"""Training data: text -> token ids -> overlapping windows of (input, target) pairs.

A language model learns to predict each next token, so a window of `context_length + 1` ids gives
one training example: the input is its first `context_length` ids and the target the same ids
shifted left by one. Windows start every `stride` tokens (stride = context_length: no overlap).

Corpora come in two forms:
- raw text files, tokenised in memory when training starts (fine for megabytes), or
- a prepared directory (`glassgpt prepare`): `tokens.bin`, the ids as a flat uint16/uint32 array,
  plus `meta.json`. Training memory-maps it, so a multi-gigabyte corpus never has to fit in RAM.

The windows and the split are the tutorial's (the book "Build a Large Language Model (From
Scratch)", chapters 2 and 5; see the README), so the `verdict` recipe sees the same batches.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from glassgpt.tokenizer import ASSETS, CharTokenizer, Tokenizer, get_tokenizer, tokenizer_from_dict

TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
BUNDLED_PREFIX = "bundled:"  # "bundled:the-verdict.txt" names a text shipped inside the package
CHUNK_CHARS = 1 << 24  # prepare() tokenises big files 16 M characters at a time


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: uint16 below 65,536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


# ---------------------------------------------------------------- windows, split, loaders

class TokenWindows(Dataset):
    """Windows over a 1-D array of ids: item i is (ids[s : s+T], ids[s+1 : s+T+1]) with s = i * stride.

    Windows start at 0, stride, 2 * stride, ... as long as a full target still fits, which is
    `range(0, len(ids) - context_length, stride)`: the same windows as the tutorial's GPTDatasetV1.
    `ids` may be a numpy memmap; only the window asked for is read.
    """

    def __init__(self, ids: np.ndarray | Sequence[int], context_length: int, stride: int | None = None):
        stride = context_length if stride is None else stride
        if context_length < 1 or stride < 1:
            raise ValueError(f"context_length and stride must be positive, got {context_length} and {stride}")
        self.ids = ids if isinstance(ids, np.ndarray) else np.asarray(ids, dtype=np.int64)
        self.context_length = context_length
        self.stride = stride
        self.starts = range(0, len(self.ids) - context_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[index]
        window = torch.from_numpy(self.ids[start:start + self.context_length + 1].astype(np.int64))
        return window[:-1], window[1:]


def split_ids(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the first 1 - val_fraction of the tokens, then the rest.

    The cut falls on a token boundary and validation comes last, as in the tutorial, so the
    model is validated on text it has never seen, not on windows interleaved with training ones.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cut = int(round(len(ids) * (1.0 - val_fraction)))
    return ids[:cut], ids[cut:]


def make_loader(dataset: TokenWindows, batch_size: int, train: bool, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> DataLoader:
    """Batches of (inputs, targets), each (batch_size, context_length).

    Training loaders shuffle (a fresh order each epoch: call `loader.sampler.set_epoch(epoch)`),
    drop the last incomplete batch, and give each of `world_size` processes its own shard of the
    windows. The order depends only on (seed, epoch), never on the global random state, which is
    what lets a resumed run see exactly the batches an uninterrupted one would.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                 seed=seed, drop_last=train)
    # Its own generator: creating an iterator would otherwise draw from the global RNG (dropout's).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                      generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- corpora

def read_source(path: str | Path, what: str = "corpus file", bundled: str = "text") -> tuple[str, str]:
    """(the UTF-8 text of a file, its name for messages); "bundled:NAME" reads a file shipped with
    glassgpt. A missing file is a FileNotFoundError naming it as `what` (or as a `bundled` NAME)."""
    path = str(path)
    if path.startswith(BUNDLED_PREFIX):
        name = path[len(BUNDLED_PREFIX):]
        resource = ASSETS / name
        if not name or not resource.is_file():
            raise FileNotFoundError(f"no bundled {bundled} named {name!r}")
        return resource.read_text(encoding="utf-8"), path
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} does not exist")
    try:
        return file.read_text(encoding="utf-8"), path
    except UnicodeDecodeError as error:
        raise ValueError(f"{file} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_corpus_text(path: str | Path) -> str:
    """The text of a corpus file; "bundled:NAME" reads a text shipped with glassgpt."""
    return read_source(path)[0]


def jsonl_values(text: str, where: Callable[[int], str]) -> Iterator[tuple[int, object]]:
    """(line number from 1, parsed value) of each non-blank line of JSONL `text`; a line that is not
    JSON is a ValueError starting with `where(line number)`."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where(number)}: not valid JSON ({error.msg} at column "
                             f"{error.colno})") from None


def is_prepared(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / TOKENS_FILE).is_file()


def load_prepared(directory: str | Path) -> tuple[np.ndarray, Tokenizer]:
    """(ids as a read-only memmap, tokenizer) of a directory written by `prepare`."""
    directory = Path(directory)
    if not is_prepared(directory):
        raise FileNotFoundError(f"{directory} is not a prepared corpus (no {META_FILE} and {TOKENS_FILE})")
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    n_tokens = meta["n_tokens"]
    if n_tokens == 0:
        raise ValueError(f"prepared corpus {directory} holds no tokens")
    ids = np.memmap(directory / TOKENS_FILE, dtype=np.dtype(meta["dtype"]), mode="r", shape=(n_tokens,))
    return ids, tokenizer_from_dict(meta["tokenizer"])


def load_corpus(sources: Sequence[str], tokenizer_name: str = "gpt2", text: str | None = None,
                tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, Tokenizer]:
    """(token ids, tokenizer) for raw text files, one prepared directory, or an inline `text`.

    Several text files are joined; with the GPT-2 tokenizer an end-of-text token separates them.
    The char tokenizer's vocabulary is every character of the corpus. A `tokenizer` given (a trained
    model's own) encodes the text instead of one made by name; a prepared directory keeps its own.
    """
    if text is not None:
        if sources:
            raise ValueError("give either a corpus or an inline text, not both")
        texts = [text]
    else:
        if not sources:
            raise ValueError("no corpus given: name one or more text files or a prepared directory")
        if len(sources) == 1 and Path(sources[0]).is_dir():
            return load_prepared(sources[0])
        texts = [read_corpus_text(source) for source in sources]
    for source, content in zip(sources or ["the inline text"], texts, strict=True):
        if not content.strip():
            raise ValueError(f"corpus {source} is empty")
    if tokenizer is None:
        tokenizer = get_tokenizer(tokenizer_name, text="".join(texts) if tokenizer_name == "char" else None)
    ids: list[int] = []
    for index, content in enumerate(texts):
        if index and tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        ids.extend(tokenizer.encode(content))
    return np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size)), tokenizer


# ---------------------------------------------------------------- prepare

def text_chunks(path: str | Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """A text file in pieces of about `chunk_chars` characters, cut where tokenisation is unaffected.

    GPT-2's pre-tokeniser always starts a new piece at a space that follows a non-space character
    and precedes another (" word", " 42", " --"), so cutting just before such a space gives the same
    ids as encoding the whole file at once. A chunk with no such space is cut at its end.
    """
    safe_cut = re.compile(r"(?<=\S)(?= \S)")
    carry = ""
    with open(path, encoding="utf-8") as file:
        while True:
            block = file.read(chunk_chars)
            if not block:
                break
            text = carry + block
            cuts = [m.start() for m in safe_cut.finditer(text, max(0, len(text) - chunk_chars // 4))]
            if not cuts:
                cuts = [m.start() for m in safe_cut.finditer(text)]
            if cuts and cuts[-1] > 0:
                yield text[:cuts[-1]]
                carry = text[cuts[-1]:]
            else:
                carry = text
        if carry:
            yield carry


def prepare(sources: Sequence[str], out_dir: str | Path, tokenizer_name: str = "gpt2",
            chunk_chars: int = CHUNK_CHARS) -> dict:
    """Tokenise text files once into `out_dir/tokens.bin` (flat ids) + `out_dir/meta.json`.

    Files are read and written chunk by chunk, so the corpus never sits in memory whole.
    Returns the metadata: tokenizer, dtype, n_tokens, and each source's token count.
    """
    if not sources:
        raise ValueError("prepare needs at least one text file")
    paths = [Path(s) for s in sources]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        if path.stat().st_size == 0:
            raise ValueError(f"corpus file {path} is empty")
    if tokenizer_name == "char":  # the vocabulary is every character of the corpus: one pass to find it
        chars: set[str] = set()
        for path in paths:
            for chunk in text_chunks(path, chunk_chars):
                chars.update(chunk)
        tokenizer: Tokenizer = CharTokenizer(sorted(chars))
    else:
        tokenizer = get_tokenizer(tokenizer_name)
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / (TOKENS_FILE + ".partial")
    counts = []
    with open(partial, "wb") as out:
        for index, path in enumerate(paths):
            count = 0
            if index and tokenizer.eos_id is not None:
                out.write(np.asarray([tokenizer.eos_id], dtype=dtype).tobytes())
            for chunk in text_chunks(path, chunk_chars):
                ids = np.asarray(tokenizer.encode(chunk), dtype=dtype)
                out.write(ids.tobytes())
                count += len(ids)
            counts.append({"path": str(path), "n_tokens": count})
        out.flush()
        os.fsync(out.fileno())
    n_tokens = partial.stat().st_size // dtype.itemsize
    os.replace(partial, out_dir / TOKENS_FILE)
    meta = {"tokenizer": tokenizer.to_dict(), "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
            "n_tokens": n_tokens, "sources": counts}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta
