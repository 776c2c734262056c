"""One dataclass describes every model glassgpt can build; presets name the ones it is checked against.

The presets: OpenAI's four GPT-2 sizes, the model the tutorial (the book "Build a Large Language
Model (From Scratch)", see the README) trains, and two small teaching models from the project's
specification.

Every number about a model's shape lives here. The model reads a `GPTConfig` and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Self


class Settings:
    """What every glassgpt settings dataclass can do (GPTConfig, training and fine-tuning settings).

    `from_dict` refuses names the dataclass does not have, so a typo in a saved file or a request
    is an error rather than a silently ignored setting; `fields_name` is how that error names them.
    """

    fields_name: ClassVar[str] = "settings"

    def replace(self, **changes) -> Self:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def check_names(cls, data: dict) -> None:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.fields_name}: {', '.join(unknown)}")

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        cls.check_names(data)
        return cls(**data)


@dataclass(frozen=True)
class GPTConfig(Settings):
    """The shape of a GPT-2-architecture model.

    The defaults are OpenAI's GPT-2 small (124M): 12 blocks of 12 heads, 768 wide, context 1024.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    ff_dim: int | None = None  # feed-forward hidden width; None means 4 * emb_dim as in GPT-2
    drop_rate: float = 0.0
    qkv_bias: bool = True  # bias on the query, key and value projections
    attn_out_bias: bool = True  # bias on the attention output projection
    ff_bias: bool = True  # bias on the two feed-forward layers
    norm_bias: bool = True  # LayerNorm's learned shift
    head_bias: bool = False  # bias on the output head (vocabulary logits)
    tie_weights: bool = True  # output head shares the token-embedding matrix
    # LayerNorm before (GPT-2) or after (the original Transformer) each sub-layer
    norm_placement: Literal["pre", "post"] = "pre"
    activation: Literal["gelu", "relu"] = "gelu"
    final_norm: bool = True  # LayerNorm after the last block
    norm_eps: float = 1e-5
    name: str = field(default="custom", compare=False)
    # A classifier (glassgpt.classify): the output head scores n_classes classes at each position
    # instead of the vocabulary's tokens; 0 is a language model. A classification head is never tied.
    n_classes: int = 0
    # The classes' names, in head order. Metadata like `name` (compare=False: renaming a class does
    # not change the model), kept here so they travel with the model through every loader.
    labels: tuple[str, ...] = field(default=(), compare=False)

    fields_name: ClassVar[str] = "GPTConfig fields"

    def __post_init__(self) -> None:
        positive = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{key} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}): "
                "each head gets an equal slice of the embedding"
            )
        if self.ff_dim is not None and self.ff_dim < 1:
            raise ValueError(f"ff_dim must be positive or None, got {self.ff_dim}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.norm_placement not in ("pre", "post"):
            raise ValueError(f"norm_placement must be 'pre' or 'post', got {self.norm_placement!r}")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {self.activation!r}")
        self._check_classes()

    def _check_classes(self) -> None:
        if not isinstance(self.n_classes, int) or self.n_classes < 0 or self.n_classes == 1:
            raise ValueError(f"n_classes must be 0 (a language model) or at least 2, got {self.n_classes!r}")
        if self.n_classes and self.tie_weights:
            raise ValueError("a classification head (n_classes > 0) cannot be tied to the token embedding: "
                             "set tie_weights=False")
        labels = tuple(self.labels or ())  # JSON gives a list back; the config keeps a tuple
        object.__setattr__(self, "labels", labels)
        if labels and len(labels) != self.n_classes:
            raise ValueError(f"{len(labels)} labels given for n_classes={self.n_classes}")
        if not all(isinstance(label, str) and label for label in labels) or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct non-empty strings, got {list(labels)}")

    @property
    def hidden_dim(self) -> int:
        """Width of the feed-forward hidden layer."""
        return self.ff_dim if self.ff_dim is not None else 4 * self.emb_dim

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["labels"] = list(self.labels)  # as JSON gives it back: equal after a round trip
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _gpt2(name: str, emb_dim: int, n_heads: int, n_layers: int) -> GPTConfig:
    return GPTConfig(name=name, emb_dim=emb_dim, n_heads=n_heads, n_layers=n_layers)


PRESETS: dict[str, GPTConfig] = {
    # TinyGPT: a one-block character model over the 5 characters of "hello hello" (" ", e, h, l, o),
    # in the original Transformer's post-LN form with ReLU: 2,453 parameters.
    "tinygpt": GPTConfig(
        name="tinygpt", vocab_size=5, context_length=4, emb_dim=16, n_heads=2, n_layers=1, ff_dim=32,
        qkv_bias=True, attn_out_bias=True, head_bias=True, tie_weights=False,
        norm_placement="post", activation="relu", final_norm=False,
    ),
    # The specification's "Putting it all together" model: 4 blocks, 256 wide, no attention biases,
    # tied head: 5,846,528.
    "nano": GPTConfig(
        name="nano", vocab_size=10_000, context_length=512, emb_dim=256, n_heads=4, n_layers=4,
        ff_dim=1024, qkv_bias=False, attn_out_bias=False,
    ),
    # OpenAI's four released sizes: 124M / 355M / 774M / 1558M.
    "gpt2": _gpt2("gpt2", 768, 12, 12),
    "gpt2-medium": _gpt2("gpt2-medium", 1024, 16, 24),
    "gpt2-large": _gpt2("gpt2-large", 1280, 20, 36),
    "gpt2-xl": _gpt2("gpt2-xl", 1600, 25, 48),
    # The model the tutorial trains on The Verdict (chapter 5) and glassgpt serves: GPT-2 small with a
    # 256 context, an untied head and no Q/K/V bias: 162,419,712 parameters.
    "verdict-162m": GPTConfig(
        name="verdict-162m", context_length=256, qkv_bias=False, tie_weights=False, drop_rate=0.1,
    ),
    # The README demo's cut of it: 6 blocks of 8 heads, 512 wide, no dropout: 70,500,352 parameters,
    # small enough to learn The Verdict in about two minutes on a 2-core CPU.
    "verdict-demo-70m": GPTConfig(
        name="verdict-demo-70m", context_length=256, emb_dim=512, n_heads=8, n_layers=6,
        qkv_bias=False, tie_weights=False, drop_rate=0.0,
    ),
}


def get_preset(name: str, **overrides) -> GPTConfig:
    """The named preset, optionally with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config
