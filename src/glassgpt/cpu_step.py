"""Decoding a token on a CPU in one call: the whole model step in glassgpt's C++ kernels.

A decoded token of GPT-2 small is 49 matrix-vector products, which read every weight once, and about
a hundred small operations between them: layer norms, the attention over the cache, GELU, residual
adds. Run one at a time from Python each small operation costs a few microseconds, more right after a
product has streamed megabytes of weights through the caches the interpreter was using, and together
they cost a sixth of the token (docs/PERFORMANCE.md). `CPUStep` hands the whole token to one kernel
call, `torch.ops.glassgpt.decode_step` (`cpu_kernels.cpp`), which computes exactly what `model.GPT`
computes for it and writes its keys and values into the model's own `KVCache`.

`glassgpt.generate` uses it for batch-1 decoding on a CPU wherever it computes the same thing as the
model: a pre-norm GPT in float32 (int8 layers included) or bf16, on the fused path, with plain layers (no
LoRA adapters) and no hooks, which a caller who reads the model's insides (`glassgpt.inspect`) puts on
it. Everything else, prompts included, runs the model itself. `for_model` says which and why.
"""

from __future__ import annotations

import torch
from torch import nn

from glassgpt import cpu_kernels
from glassgpt.fast import Linear
from glassgpt.int8 import Int8Linear
from glassgpt.model import GELU, GPT, KVCache, LayerCache, LayerNorm, MultiHeadAttention


def _layer(linear: nn.Module) -> list[torch.Tensor | None]:
    """A layer as the kernel takes it: (weight, row scales or None, bias or None)."""
    if isinstance(linear, Int8Linear):
        return [linear.weight_int8, linear.scale, linear.bias]
    return [linear.weight, None, linear.bias]


def _norm(norm: LayerNorm) -> list[torch.Tensor | None]:
    return [norm.scale, norm.shift]


class CPUStep:
    """One model's decode step for a batch of one, in one kernel call; made by `for_model`."""

    def __init__(self, model: GPT, kernels):
        self.model = model
        self.decode_step = kernels.decode_step
        self.blocks = []
        for block in model.blocks:
            self.blocks += [*_norm(block.norm1), *_layer(block.attn.qkv), *_layer(block.attn.out_proj),
                            *_layer(block.ff.expand), *_layer(block.ff.contract), *_norm(block.norm2)]
        final = model.final_norm
        final_norm = _norm(final) if isinstance(final, LayerNorm) else [None, None]
        self.ending = [*final_norm, *_layer(model.out_head)]
        self.gelu = isinstance(model.blocks[0].ff.activation, GELU)

    def __call__(self, token: int, cache: KVCache) -> torch.Tensor:
        """The logits (1, 1, n_outputs) after `token`, which goes at position `cache.length`; the cache
        grows by one, as a model call with it would."""
        model, config = self.model, self.model.config
        caches = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        embeddings = model.tok_emb.weight, model.pos_emb.weight
        logits = self.decode_step(token, cache.length, *embeddings, self.blocks, caches, self.ending,
                                  config.n_heads, config.norm_eps, self.gelu)
        cache.advance(1)
        return logits


def unsupported(model: GPT) -> str | None:
    """Why the one-call step would not compute what `model` computes (or cannot run), or None."""
    config, dtype = model.config, model.tok_emb.weight.dtype
    if model.tok_emb.weight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return "not a float32 or bfloat16 model on a CPU"
    if config.norm_placement != "pre":
        return "not a pre-norm model"
    dropouts = (module for module in model.modules() if isinstance(module, (nn.Dropout, MultiHeadAttention)))
    if any(module.training for module in dropouts):
        return "dropout is in training mode"
    hooks = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)
    if any(hooks) or any(module._forward_hooks or module._forward_pre_hooks for module in model.modules()):
        return "hooks are watching the model's modules"
    norms = [model.final_norm] if isinstance(model.final_norm, LayerNorm) else []
    layers = [model.out_head]
    for block in model.blocks:
        attention, feed_forward = block.attn, block.ff
        if not (isinstance(attention, MultiHeadAttention) and attention.fused and attention.causal):
            return "attention is on its explicit path"
        if not (isinstance(feed_forward.activation, nn.ReLU)
                or (isinstance(feed_forward.activation, GELU) and feed_forward.activation.fused)):
            return "an activation other than fused GELU or ReLU"
        norms += [block.norm1, block.norm2]
        layers += [attention.qkv, attention.out_proj, feed_forward.expand, feed_forward.contract]
    if not all(type(norm) is LayerNorm and norm.fused and norm.eps == config.norm_eps for norm in norms):
        return "a norm on its explicit path or with its own eps"
    tensors = [model.pos_emb.weight, *(t for norm in norms for t in _norm(norm))]
    for layer in layers:
        if type(layer) is Linear:
            tensors += [layer.weight, layer.bias]
        elif type(layer) is Int8Linear and layer.compile and dtype == torch.float32:
            tensors += [layer.bias]  # (its int8 weight and float32 scales are its own)
        else:
            return f"a {type(layer).__name__} layer (only glassgpt's Linear; Int8Linear in a float32 model)"
    if not all(t is None or (t.dtype == dtype and t.is_contiguous()) for t in tensors):
        return f"a layer or norm whose tensors are not contiguous {dtype}, as the model's embedding is"
    return None


def for_model(model: GPT) -> CPUStep | None:
    """`model`'s one-call step, or None where decoding must run the model itself (see `unsupported`) or
    glassgpt's kernels are not built here."""
    if unsupported(model) is not None or (kernels := cpu_kernels.ops()) is None:
        return None
    return CPUStep(model, kernels)


def serves(cache, attention_mask: torch.Tensor | None, fed: torch.Tensor) -> bool:
    """Whether a model call (one token, a batch of one, a plain cache, no padding) is the step's to make."""
    return (fed.numel() == 1 and attention_mask is None and type(cache) is KVCache
            and all(type(layer) is LayerCache for layer in cache.layers) and not torch.is_grad_enabled())
