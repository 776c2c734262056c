"""Looking inside a model while it runs, without changing what the model's code returns.

`record_attention` reads every attention layer's weights through forward hooks on its `probe`, an
identity module the explicit attention path passes its softmax weights through. The fused kernel
never forms the weights, so attention runs on the explicit path while recording; the rest of the
model (LayerNorm, GELU) stays as it is, and the output equals the fused model's up to rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from glassgpt.model import MultiHeadAttention


def record_attention(model: nn.Module, *args, **kwargs) -> tuple[Any, list[torch.Tensor]]:
    """Run `model(*args, **kwargs)` with explicit attention; return its output and the attention weights.

    `model` is a `GPT` or any module holding `MultiHeadAttention` layers (one layer alone included).
    The weights come one tensor per attention layer, in the order they ran, each (B, n_heads, T, S):
    weights[layer][b, h, i, j] is how much query i looks at key j, each row summing to 1.
    Each attention layer's `fused` flag is restored afterwards, whatever it was.
    """
    weights: list[torch.Tensor] = []
    layers = [module for module in model.modules() if isinstance(module, MultiHeadAttention)]
    previous = [layer.fused for layer in layers]
    handles = [layer.probe.register_forward_hook(lambda module, inputs, output: weights.append(output))
               for layer in layers]
    try:
        for layer in layers:
            layer.fused = False
        output = model(*args, **kwargs)
    finally:
        for layer, fused in zip(layers, previous, strict=True):
            layer.fused = fused
        for handle in handles:
            handle.remove()
    return output, weights
