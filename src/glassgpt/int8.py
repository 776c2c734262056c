"""Weight-only int8: each weight row stored as int8 with one float32 scale, activations kept in float32.

Decoding on a CPU reads every weight once per token, so a quarter of fp32's bytes is up to four
times the speed. How the bytes are cut decides what the answer keeps:

- PyTorch's dynamic quantisation (what `--dtype int8` was) also rounds each layer's *input* to 8
  bits, with one scale for the whole vector; GPT-2's activations have a few large outliers, so
  most of the vector lands on a handful of levels, and the greedy token changed from the first step.
- Here only the weights are rounded, each output row (channel) with its own scale
  `max |row| / 127`, and the product runs in float32 on the exact int8 values:
  `y = (x @ q.T) * scale + bias`. The only error is each weight's rounding, at most half a step
  (`scale / 2`), a relative error of about 0.3% of the row's largest weight.

`Int8Linear.forward` on up to `KERNEL_ROWS` token rows (decoding, a short prompt, a small batch)
runs glassgpt's own CPU kernel (`glassgpt.cpu_kernels`: it reads each int8 weight once and widens it
in registers), or where that cannot be built, one row through `int8_matvec` compiled by torch.compile
into such a loop. On more rows (a long prompt) the int8 matrix is widened to float32 once per call
and multiplied by PyTorch's own kernels, the widening costing little against a product of many rows.
All compute the same function as the float32 model whose weights are `q * scale`
(`dequantized_model`), to float32 rounding; tests prove it, and measure the distance to the
unquantised model. Measurements: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from glassgpt import cpu_kernels
from glassgpt.fast import CompileState

QMAX = 127  # symmetric: -127..127, so that 0 is exact and the range is the same on both sides


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per row) with `weight ~= q * scale[:, None]`, rounding to nearest.

    A row of zeros gets scale 1 (any would do: its codes are all 0).
    """
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, q * scale[:, None], bias)` for an input of one row, as a dot product per weight row.

    Compiled (`compiled_int8_matvec`) it becomes one loop over the int8 bytes, split over all threads.
    """
    out = (q * x.reshape(1, -1)).sum(dim=-1) * scale   # int8 * float32 promotes to float32
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], q.shape[0])


COMPILED = CompileState()
# Up to this many token rows go to glassgpt's own kernel, which reads the int8 weights once for all
# of them; beyond it, widening the matrix once and using PyTorch's float32 product is faster (the
# crossover, measured between 32 and 64 rows: docs/PERFORMANCE.md).
KERNEL_ROWS = 32


def compiled_int8_matvec(x, q, scale, bias) -> torch.Tensor:
    """`int8_matvec` through torch.compile (symbolic shapes: one kernel for every weight shape)."""
    if COMPILED.kernel is None:
        COMPILED.kernel = torch.compile(int8_matvec, dynamic=True)
    return COMPILED.kernel(x, q, scale, bias)


class Int8Linear(nn.Module):
    """A Linear layer whose weight is int8 with a float32 scale per output row (no autograd).

    Holds buffers, not parameters: it is for inference (`quantize_int8` builds it from a trained
    `nn.Linear`). `compile=False` keeps every product on PyTorch's eager kernels, neither glassgpt's
    own nor compiled ones (for tests, or a machine without a C++ compiler; the warning paths do the
    same on their own).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, compile: bool = True):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise ValueError("Int8Linear needs an int8 (out, in) weight and one scale per output row")
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.compile = compile

    @classmethod
    def from_linear(cls, linear: nn.Linear, compile: bool = True) -> Int8Linear:
        q, scale = quantize_rows(linear.weight)
        return cls(q, scale, linear.bias, compile)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer computes with: `q * scale` per row."""
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"Int8Linear takes float32 inputs, got {x.dtype}")
        rows = x.numel() // max(x.shape[-1], 1)
        one_row = rows == 1
        if self.compile and rows <= KERNEL_ROWS and x.device.type == "cpu":
            # glassgpt's own kernel where it is built (inside a compiled step too: torch.compile calls it).
            if (kernels := cpu_kernels.for_this_call()) is not None:
                return kernels.int8_matvec(x.contiguous(), self.weight_int8, self.scale, self.bias)
        if one_row and torch.compiler.is_compiling():  # inside a compiled step: one graph, no nesting
            return int8_matvec(x, self.weight_int8, self.scale, self.bias)
        if self.compile and one_row and x.device.type == "cpu":
            out = COMPILED.attempt(compiled_int8_matvec, x, self.weight_int8, self.scale, self.bias,
                                   instead="int8 decodes with PyTorch's eager kernels (same numbers, slower)")
            if out is not None:
                return out
        # Several rows (or no compiler): widen the int8 matrix once and let PyTorch multiply.
        out = F.linear(x, self.weight_int8.float()) * self.scale
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 weight, float32 scale per output row")


def quantize_int8(model: nn.Module, head: bool = True, compile: bool = True) -> nn.Module:
    """`model` with its Linear layers replaced by `Int8Linear`, in place; embeddings and norms stay fp32.

    `head=False` keeps the output head (GPT-2's is tied to the token embedding: a third of GPT-2
    small's weights) in float32, for a smaller error at a lower speed. A tied head gets its own int8
    copy; the embedding it was tied to stays float32 for the input lookup.
    """
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError("int8 weight-only quantisation needs an fp32 model on the CPU")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (head or name != "out_head")]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(module, compile))
    return model


def dequantized_model(model: nn.Module) -> nn.Module:
    """A float32 copy of an int8 `model` whose Linear weights are exactly `q * scale`: the model an
    `Int8Linear` computes, to float32 rounding (what the tests hold the int8 kernels to)."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, Int8Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent_name) if parent_name else plain, child, linear)
    return plain
