"""Tokenizers: text <-> token ids behind one small interface.

- `CharTokenizer`: one id per distinct character of a text (TinyGPT, Tiny Shakespeare).
- `GPT2Tokenizer`: OpenAI's GPT-2 byte-pair encoding through tiktoken, from a ranks file shipped
  in the package, so it works offline.
- The from-scratch byte-level BPE for teaching lives in `glassgpt.bpe`, which also owns what it
  teaches and `GPT2Tokenizer` reuses: GPT-2's split pattern, its end-of-text token and its table.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Protocol

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from glassgpt.bpe import GPT2_EOS, GPT2_RANKS, GPT2_SPLIT_PATTERN, BPETokenizer

ASSETS = resources.files("glassgpt") / "assets"


class Tokenizer(Protocol):
    """What every tokenizer offers (`CharTokenizer`, `GPT2Tokenizer`, `bpe.BPETokenizer`)."""

    name: str
    vocab_size: int
    eos_id: int | None  # the end-of-text id, or None for a tokenizer without one

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The UTF-8 bytes `ids` stand for: one token may hold part of a character."""
        ...

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id's own text (U+FFFD where its bytes are only part of a character)."""
        ...

    def to_dict(self) -> dict:
        """A JSON-ready description that `tokenizer_from_dict` rebuilds the tokenizer from."""
        ...


class CharTokenizer:
    """One id per distinct character, in sorted order: "hello hello" -> ' ' 0, e 1, h 2, l 3, o 4."""

    name = "char"
    eos_id = None

    def __init__(self, chars: str | list[str]):
        chars = sorted(set(chars))
        if not chars:
            raise ValueError("a character tokenizer needs at least one character")
        self.chars = chars
        self.id_of = {ch: i for i, ch in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.id_of[ch] for ch in text]
        except KeyError as error:
            raise ValueError(
                f"character {error.args[0]!r} is not in this tokenizer's vocabulary of "
                f"{self.vocab_size} characters"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.token_strings(ids))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def token_strings(self, ids: list[int]) -> list[str]:
        for i in ids:
            if not 0 <= int(i) < self.vocab_size:  # a negative id must not index from the end
                raise ValueError(f"token id out of range for a vocabulary of {self.vocab_size}")
        return [self.chars[int(i)] for i in ids]

    def to_dict(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50,257 ids; `<|endoftext|>` = 50256) via tiktoken, fully offline."""

    name = "gpt2"

    def __init__(self, ranks_path: str | Path | None = None):
        path = Path(ranks_path) if ranks_path else Path(str(GPT2_RANKS))
        ranks = load_tiktoken_bpe(str(path))
        self.eos_id = len(ranks)  # 50256: the one special token sits right after the merges
        self.encoding = tiktoken.Encoding(
            name="gpt2-glassgpt",
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOS: self.eos_id},
        )
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; the literal "<|endoftext|>" becomes the end-of-text id."""
        return self.encoding.encode(text, allowed_special={GPT2_EOS})

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; a byte sequence cut mid-character decodes with U+FFFD in its place."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(self._checked(ids))

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id's own text (bytes shown with replacement characters where not valid UTF-8)."""
        return [self.encoding.decode_single_token_bytes(i).decode("utf-8", errors="replace")
                for i in self._checked(ids)]

    def _checked(self, ids: list[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:  # tiktoken would fail with a bare KeyError
                raise ValueError(f"token id {i} out of range for GPT-2's {self.vocab_size} ids")
        return ids

    def to_dict(self) -> dict:
        return {"type": "gpt2"}


_GPT2: GPT2Tokenizer | None = None


def get_tokenizer(name: str = "gpt2", text: str | None = None) -> Tokenizer:
    """A tokenizer by name: "gpt2" (shared instance), or "char" built from `text`."""
    global _GPT2
    if name == "gpt2":
        if _GPT2 is None:
            _GPT2 = GPT2Tokenizer()
        return _GPT2
    if name == "char":
        if text is None:
            raise ValueError("the char tokenizer is built from a text: pass text=...")
        return CharTokenizer.from_text(text)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'gpt2' or 'char'")


def tokenizer_from_dict(data: dict) -> Tokenizer:
    """Rebuild a tokenizer saved with `to_dict` (as checkpoints store it)."""
    kind = data.get("type")
    if kind == "gpt2":
        return get_tokenizer("gpt2")
    if kind == "char":
        return CharTokenizer(data["chars"])
    if kind == "bpe":  # the from-scratch BPE stores its whole token table
        return BPETokenizer.from_dict(data)
    raise ValueError(f"unknown tokenizer type {kind!r} in saved tokenizer")


def bundled_text(name: str = "the-verdict.txt") -> str:
    """A text shipped with the package (The Verdict)."""
    return (ASSETS / name).read_text(encoding="utf-8")
