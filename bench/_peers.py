"""The peer the benches measure glassgpt against: llms-from-scratch's GPTModel holding our weights.

`pip install --no-deps llms-from-scratch` (the `bench` extra) installs the tutorial's own code.
Its GPTModel computes what a pre-norm GPT-2-style glassgpt model computes, with three separate
query/key/value projections where glassgpt has one fused `qkv` matrix, so our weights copy into it
exactly; the benches check that both give the same logits before timing anything.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch

# What the tutorial's chapters import at the top for their downloads, data frames, plots and
# progress bars; the functions the benches call (the models, losses, collate, LoRA) use none of it.
_CHAPTER_EXTRAS = ("matplotlib", "matplotlib.pyplot", "matplotlib.ticker", "pandas", "tqdm", "psutil")


class _Absent:
    """Stands in for a name of a package that is not installed; any use of it says so."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute):
        return _Absent(f"{self._name}.{attribute}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is not installed (the bench imported the tutorial without it)")


def tutorial(chapter: str) -> types.ModuleType:
    """`llms_from_scratch.<chapter>` (ch05, ch06, ch07, appendix_e, ...), importable with only torch.

    Where a package the chapter imports only for its plots, data frames or progress bars is not
    installed, a placeholder module stands in while the chapter is imported, and is removed again;
    using it raises. Installed packages are used as they are.
    """
    name = f"llms_from_scratch.{chapter}"
    if name in sys.modules:
        return sys.modules[name]
    placed = []
    for extra in _CHAPTER_EXTRAS:
        if extra.partition(".")[0] not in placed:
            try:
                importlib.import_module(extra)  # the chapter imports it anyway
                continue
            except ImportError:
                pass
        module = types.ModuleType(extra)
        module.__getattr__ = lambda attribute, _extra=extra: _Absent(f"{_extra}.{attribute}")
        module.__path__ = []  # a package, so that its submodules can be imported from it
        sys.modules[extra] = module
        placed.append(extra)
    try:
        return importlib.import_module(name)
    finally:
        for extra in placed:
            del sys.modules[extra]


def check_representable(config) -> None:
    """Raise if the tutorial's GPTModel cannot hold a model of this glassgpt `config`.

    Its model has biases on the attention output and feed-forward layers, a pre-norm GELU block,
    a 4x feed-forward, a final norm and a bias-free head; anything else would be a different model.
    """
    problems = [
        what for what, ok in (
            ("attn_out_bias", config.attn_out_bias), ("ff_bias", config.ff_bias),
            ("norm_bias", config.norm_bias), ("final_norm", config.final_norm),
            ("norm_placement='pre'", config.norm_placement == "pre"),
            ("activation='gelu'", config.activation == "gelu"),
            ("ff_dim = 4 * emb_dim", config.hidden_dim == 4 * config.emb_dim),
            ("no head bias", not config.head_bias),
        ) if not ok
    ]
    if problems:
        raise ValueError(f"llms-from-scratch's GPTModel cannot hold this model: it needs "
                         f"{', '.join(problems)}")


def their_model(ours, drop_rate: float | None = None):
    """llms-from-scratch's GPTModel holding the weights of glassgpt model `ours` (on the CPU, fp32).

    `drop_rate`: its dropout (None: the same as ours).
    A tied glassgpt head is copied into the tutorial's own (untied) `out_head`: the same weights,
    as the tutorial's `load_weights_into_gpt` does with OpenAI's. The language-model head only:
    a classifier's head is for the caller to replace, as the tutorial does.
    """
    from llms_from_scratch.ch04 import GPTModel

    c = ours.config
    check_representable(c)
    theirs = GPTModel({"vocab_size": c.vocab_size, "context_length": c.context_length, "emb_dim": c.emb_dim,
                       "n_heads": c.n_heads, "n_layers": c.n_layers, "qkv_bias": c.qkv_bias,
                       "drop_rate": c.drop_rate if drop_rate is None else drop_rate})
    with torch.no_grad():
        theirs.tok_emb.weight.copy_(ours.tok_emb.weight)
        theirs.pos_emb.weight.copy_(ours.pos_emb.weight)
        for block, their_block in zip(ours.blocks, theirs.trf_blocks, strict=True):
            att, qkv = their_block.att, block.attn.qkv
            parts = (att.W_query, att.W_key, att.W_value)
            for part, weight in zip(parts, qkv.weight.split(c.emb_dim), strict=True):
                part.weight.copy_(weight)
            if qkv.bias is not None:
                for part, bias in zip(parts, qkv.bias.split(c.emb_dim), strict=True):
                    part.bias.copy_(bias)
            att.out_proj.weight.copy_(block.attn.out_proj.weight)
            att.out_proj.bias.copy_(block.attn.out_proj.bias)
            expand, contract = their_block.ff.layers[0], their_block.ff.layers[2]
            for theirs_linear, ours_linear in ((expand, block.ff.expand), (contract, block.ff.contract)):
                theirs_linear.weight.copy_(ours_linear.weight)
                theirs_linear.bias.copy_(ours_linear.bias)
            norms = ((their_block.norm1, block.norm1), (their_block.norm2, block.norm2))
            for theirs_norm, ours_norm in norms:
                theirs_norm.scale.copy_(ours_norm.scale)
                theirs_norm.shift.copy_(ours_norm.shift)
        theirs.final_norm.scale.copy_(ours.final_norm.scale)
        theirs.final_norm.shift.copy_(ours.final_norm.shift)
        if not c.n_classes:
            theirs.out_head.weight.copy_(ours.out_head.weight)
    return theirs
