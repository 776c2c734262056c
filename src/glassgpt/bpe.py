"""Byte-level byte-pair encoding (BPE), from scratch, in plain Python, to read.

How GPT-2 turns text into ids, in three steps:

1. Pre-tokenise: a regular expression cuts the text into chunks (a word with its leading space, a
   number, a run of punctuation, a run of spaces), so no token ever spans two words.
2. Bytes: each chunk becomes its UTF-8 bytes. The 256 byte values are the first 256 tokens, so any
   text at all can be encoded: there is no "unknown" token.
3. Merge: inside each chunk, repeatedly join the adjacent pair of tokens whose joined bytes form
   the earliest-learned token (the lowest rank), until no adjacent pair forms a token.

Training learns the token table: start from the 256 bytes, count the adjacent pairs inside the
chunks, make the most frequent pair a new token, and repeat until the vocabulary is the size asked.

GPT-2's own table (`assets/gpt2.tiktoken`) is a table of tokens, not of merges; with the merge rule
above it encodes exactly like tiktoken (`BPETokenizer.from_tiktoken_ranks()`), only slower, since
tiktoken is written in Rust. The rest of glassgpt uses `glassgpt.tokenizer.GPT2Tokenizer`.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from importlib import resources
from itertools import pairwise
from pathlib import Path

import regex

# GPT-2's pre-tokenisation (step 1): words with their leading space, numbers, punctuation runs and
# spaces, so merges never cross a word boundary (and "'s", "'ll" etc. stay separate).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOS = "<|endoftext|>"  # GPT-2's one special token, between documents; its id follows the table
GPT2_RANKS = resources.files("glassgpt") / "assets" / "gpt2.tiktoken"  # GPT-2's table, one token a line
NOT_A_TOKEN = float("inf")  # the "rank" of a byte string that is not in the table
CACHE_LIMIT = 100_000  # distinct chunks remembered before the cache starts over


class BPETokenizer:
    """A byte-level BPE: a table of tokens (id -> bytes), special tokens, and GPT-2's split pattern.

    `BPETokenizer()` starts with only the 256 byte tokens; `train(text, vocab_size)` learns merges;
    `BPETokenizer.from_tiktoken_ranks()` loads GPT-2's 50,257-token table.
    """

    name = "bpe"

    def __init__(
        self,
        tokens: list[bytes] | None = None,
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_SPLIT_PATTERN,
    ):
        """`tokens[i]` is the bytes of token id i (default: the 256 single bytes, in byte order);
        `special_tokens` maps strings such as "<|endoftext|>" to ids after the ordinary tokens."""
        self.pattern = pattern
        self.chunk_regex = regex.compile(pattern)
        self._set_table([bytes([byte]) for byte in range(256)] if tokens is None else tokens, special_tokens)

    def _set_table(self, tokens: list[bytes], special_tokens: dict[str, int] | None) -> None:
        tokens = [bytes(token) for token in tokens]
        special_tokens = dict(special_tokens or {})
        rank_of = {token: rank for rank, token in enumerate(tokens)}
        if len(rank_of) != len(tokens):
            repeated = next(t for t, n in Counter(tokens).items() if n > 1)
            raise ValueError(f"the token table lists {repeated!r} more than once")
        missing = [byte for byte in range(256) if bytes([byte]) not in rank_of]
        if missing:
            raise ValueError(f"the token table lacks {len(missing)} single bytes (first: {missing[0]}); "
                             "a byte-level BPE needs all 256 so that any text can be encoded")
        for text, token_id in special_tokens.items():
            if not text:
                raise ValueError("a special token cannot be the empty string")
            if token_id < len(tokens):
                raise ValueError(f"special token {text!r} has id {token_id}, which an ordinary token "
                                 f"already uses (ids 0..{len(tokens) - 1})")
        if len(set(special_tokens.values())) != len(special_tokens):
            raise ValueError("two special tokens share one id")

        self.tokens = tokens
        self.rank_of = rank_of
        self.special_tokens = special_tokens
        self.special_of_id = {token_id: text for text, token_id in special_tokens.items()}
        self.special_regex = _special_splitter(special_tokens)
        self.cache: dict[str, list[int]] = {}
        self._merges: list[tuple[tuple[int, int], int]] | None = None  # merges(), found once

    # ---- the common tokenizer interface --------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return max([len(self.tokens) - 1, *self.special_tokens.values()]) + 1

    @property
    def eos_id(self) -> int | None:
        return self.special_tokens.get(GPT2_EOS)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in the text (e.g. "<|endoftext|>") become their id."""
        if self.special_regex is None:
            return self.encode_ordinary(text)
        ids = []
        # With a capturing group, split() returns the special tokens too, at the odd positions.
        for position, piece in enumerate(self.special_regex.split(text)):
            if position % 2:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, reading special-token strings as plain text."""
        ids = []
        for chunk in self.chunk_regex.findall(text):
            # Text repeats its words, so most chunks were merged before: remember their ids.
            chunk_ids = self.cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = [self.rank_of[part] for part in self.merge_bytes(chunk.encode("utf-8"))]
                if len(self.cache) >= CACHE_LIMIT:
                    self.cache.clear()
                self.cache[chunk] = chunk_ids
            ids.extend(chunk_ids)
        return ids

    def merge_bytes(self, data: bytes, max_rank: float = NOT_A_TOKEN) -> list[bytes]:
        """Split `data` into single bytes, then merge adjacent pairs lowest rank first, leftmost
        first among equals, using only tokens ranked below `max_rank`; returns the merged parts."""
        parts = [data[i : i + 1] for i in range(len(data))]
        # pair_ranks[i] is the rank of parts[i] + parts[i + 1], the token that pair would form.
        pair_ranks = [self.rank_of.get(left + right, NOT_A_TOKEN) for left, right in pairwise(parts)]
        while pair_ranks:
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= max_rank:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
            del pair_ranks[best]
            # Only the pairs that touch the merged part have changed.
            if best > 0:
                pair_ranks[best - 1] = self.rank_of.get(parts[best - 1] + parts[best], NOT_A_TOKEN)
            if best < len(pair_ranks):
                pair_ranks[best] = self.rank_of.get(parts[best] + parts[best + 1], NOT_A_TOKEN)
        return parts

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes `ids` stand for, joined."""
        pieces = []
        for token_id in ids:
            token_id = int(token_id)
            if 0 <= token_id < len(self.tokens):
                pieces.append(self.tokens[token_id])
            elif token_id in self.special_of_id:
                pieces.append(self.special_of_id[token_id].encode("utf-8"))
            else:
                raise ValueError(
                    f"token id {token_id} is not in this tokenizer's vocabulary of {self.vocab_size}")
        return b"".join(pieces)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; a byte sequence cut mid-character decodes with U+FFFD in its place."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id's own text (with replacement characters where its bytes are not valid UTF-8)."""
        return [self.decode([token_id]) for token_id in ids]

    # ---- learning a table ------------------------------------------------------------------------

    def train(
        self,
        text: str,
        vocab_size: int,
        special_tokens: tuple[str, ...] = (GPT2_EOS,),
        verbose: bool = False,
    ) -> BPETokenizer:
        """Learn a table of `vocab_size` tokens from `text`: the 256 bytes, then one merged token per
        merge, then `special_tokens`. Replaces this tokenizer's table and returns the tokenizer."""
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is too small: the 256 byte tokens and "
                             f"{len(special_tokens)} special tokens need at least "
                             f"{256 + len(special_tokens)}")
        if len(set(special_tokens)) != len(special_tokens) or "" in special_tokens:
            raise ValueError(f"special tokens must be distinct, non-empty strings, got {special_tokens!r}")
        splitter = _special_splitter(dict.fromkeys(special_tokens, 0))
        pieces = splitter.split(text)[::2] if splitter else [text]  # special tokens are never merged
        # Merging works on distinct chunks, each weighted by how often it occurs: " the" is
        # counted once per merge however many times the text says it.
        chunk_counts = Counter(chunk for piece in pieces for chunk in self.chunk_regex.findall(piece))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        weights = list(chunk_counts.values())

        tokens = [bytes([byte]) for byte in range(256)]
        for step in range(n_merges):
            pair_counts: Counter[tuple[int, int]] = Counter()
            for ids, weight in zip(words, weights, strict=True):
                for pair in pairwise(ids):
                    pair_counts[pair] += weight
            if not pair_counts:
                raise ValueError(f"the text has no pairs left to merge after {step} merges; give more "
                                 f"text or ask for vocab_size {256 + step + len(special_tokens)} or less")
            # The most frequent pair; among equals the smallest ids, so training is deterministic.
            pair = min(pair_counts, key=lambda p: (-pair_counts[p], p))
            new_id = len(tokens)
            tokens.append(tokens[pair[0]] + tokens[pair[1]])
            words = [_merge_pair(ids, pair, new_id) for ids in words]
            if verbose:
                print(f"merge {step + 1}/{n_merges}: {pair[0]} + {pair[1]} -> {new_id} "
                      f"{_show(tokens[new_id])} ({pair_counts[pair]:,} times)")

        specials = {text: len(tokens) + i for i, text in enumerate(special_tokens)}
        self._set_table(tokens, specials)
        return self

    def merges(self) -> list[tuple[tuple[int, int], int]]:
        """Each merged token as ((left id, right id), its id), in rank order: the pair of earlier
        tokens it is built from, found by merging its own bytes with only the tokens before it."""
        if self._merges is not None:
            return self._merges
        merges = []
        for rank, token in enumerate(self.tokens):
            if len(token) < 2:
                continue
            parts = self.merge_bytes(token, max_rank=rank)
            if len(parts) != 2:
                raise ValueError(
                    f"token {rank} {_show(token)} cannot be built from one pair of earlier tokens")
            merges.append(((self.rank_of[parts[0]], self.rank_of[parts[1]]), rank))
        self._merges = merges
        return merges

    # ---- files -----------------------------------------------------------------------------------

    @classmethod
    def from_tiktoken_ranks(cls, path: str | Path | None = None) -> BPETokenizer:
        """GPT-2's table from a tiktoken ranks file (one "base64-bytes rank" per line; default: the
        bundled `assets/gpt2.tiktoken`); `<|endoftext|>` takes the id after the last rank (50256)."""
        path = Path(path) if path else Path(str(GPT2_RANKS))
        ranked = {}
        for line_number, line in enumerate(path.read_text(encoding="ascii").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                encoded, rank = line.split()
                ranked[int(rank)] = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise ValueError(
                    f"{path}:{line_number}: expected 'base64-bytes rank', got {line[:60]!r}") from None
        if sorted(ranked) != list(range(len(ranked))):
            raise ValueError(f"{path}: ranks must run 0, 1, 2, ... without gaps")
        tokens = [ranked[rank] for rank in range(len(ranked))]
        return cls(tokens, {GPT2_EOS: len(tokens)})

    def to_dict(self) -> dict:
        """A JSON-ready description: each token as its text where its bytes are valid UTF-8, else as
        a list of byte values (e.g. [226, 128])."""
        return {
            "type": "bpe",
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "tokens": [_token_to_json(token) for token in self.tokens],
        }

    @classmethod
    def from_dict(cls, data: dict) -> BPETokenizer:
        """Rebuild a tokenizer from `to_dict()`'s output."""
        if data.get("type") != "bpe":
            raise ValueError(f"not a BPE tokenizer description (type {data.get('type')!r})")
        tokens = [token.encode("utf-8") if isinstance(token, str) else bytes(token)
                  for token in data["tokens"]]
        return cls(tokens, data.get("special_tokens"), data.get("pattern", GPT2_SPLIT_PATTERN))

    def save(self, path: str | Path) -> None:
        """Write `to_dict()` as JSON with one token per line, in id order, so a reader can look up an
        id by line number (token id i is on line i + 6)."""
        data = self.to_dict()
        fields = [f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}"
                  for key, value in data.items() if key != "tokens"]
        tokens = [f"  {json.dumps(token, ensure_ascii=False)}" for token in data["tokens"]]
        text = "{\n" + ",\n".join(fields) + ',\n "tokens": [\n' + ",\n".join(tokens) + "\n ]\n}\n"
        Path(path).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a table written by `save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def save_hf(self, directory: str | Path, model_max_length: int = 1024) -> list[Path]:
        """Write the table as Hugging Face's GPT-2 tokenizer files (vocab.json, merges.txt and
        tokenizer_config.json), which `transformers.AutoTokenizer.from_pretrained(directory)` reads.

        Those files name bytes by printable characters (GPT-2's byte-to-character table below) and
        list the merges in rank order: each token as the pair of earlier tokens it is built from.
        """
        shown = _printable_bytes()
        text_of = ["".join(shown[byte] for byte in token) for token in self.tokens]
        vocab = {text: rank for rank, text in enumerate(text_of)} | self.special_tokens
        merges = [f"{text_of[left]} {text_of[right]}" for (left, right), _ in self.merges()]
        eos = next(iter(self.special_tokens), None)
        config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
                  "add_prefix_space": False, **({"bos_token": eos, "eos_token": eos, "unk_token": eos}
                                                if eos else {})}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
                 "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
                 "tokenizer_config.json": json.dumps(config, indent=2)}
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")
        return [directory / name for name in files]


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """`ids` with every non-overlapping occurrence of `pair`, left to right, replaced by `new_id`."""
    merged = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def _special_splitter(special_tokens: dict[str, int]) -> regex.Pattern | None:
    """A pattern whose split() keeps the special tokens; longest first, so one that contains
    another wins."""
    if not special_tokens:
        return None
    alternatives = "|".join(regex.escape(text) for text in sorted(special_tokens, key=len, reverse=True))
    return regex.compile(f"({alternatives})")


def _printable_bytes() -> list[str]:
    """GPT-2's table from byte values to printable characters, as its vocab.json and merges.txt
    write bytes: printable Latin-1 bytes stand for themselves, the other 68 (control characters,
    space, ...) take the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    shown, extra = [], 0
    for byte in range(256):
        if byte in printable:
            shown.append(chr(byte))
        else:
            shown.append(chr(256 + extra))
            extra += 1
    return shown


def _token_to_json(token: bytes) -> str | list[int]:
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return list(token)


def _show(token: bytes) -> str:
    return repr(token.decode("utf-8", errors="replace"))
