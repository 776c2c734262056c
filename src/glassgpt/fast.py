"""Faster kernels for inference matrix products on a CPU, changing no number the model computes.

One decoded token is little but matrix-vector products over every weight, so decoding on a CPU is
bound by how fast those products read memory. The model's layers are `Linear`, an `nn.Linear` that
sends those one-row products to glassgpt's own kernels (`glassgpt.cpu_kernels`) where they are
built. Without them: PyTorch's CPU build sends every fp32 product to MKL, whose matrix-vector
kernel runs on one thread on AMD processors; oneDNN, the other CPU library inside the same
PyTorch, splits the same products over all threads. `cpu_inference_kernels()`
routes the model's `F.linear` calls to the kernel that was measured faster for the processor and
the number of rows, or with `compile=True` one-row products to a compiled matrix-vector loop;
`glassgpt.generate` enters it around each CPU decoding step. Measurements on AMD and Intel
processors: docs/PERFORMANCE.md ("the CPU kernels of `glassgpt.fast`").
(Fast decoding on a GPU, with CUDA graphs, is `glassgpt.cuda_graphs`.)
"""

from __future__ import annotations

import platform
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from glassgpt import cpu_kernels

# Measured on x86-64 only (AMD and Intel); elsewhere (Arm) PyTorch's default BLAS stays in charge.
HAS_ONEDNN_LINEAR = (platform.machine().lower() in ("x86_64", "amd64")
                     and torch.backends.mkldnn.is_available()
                     and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
# oneDNN is faster for products of several rows on x86-64; for one row (decoding) only where MKL's
# matrix-vector kernel is the slow one (AMD; on Intel, MKL's is the faster).
ONEDNN_FOR_ONE_ROW = HAS_ONEDNN_LINEAR and "AuthenticAMD" in cpu_kernels.cpu_info("vendor_id")


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for an input of one row, written as what it is: each output is the dot product of one
    weight row with x. Compiled (`compiled_matvec`), it becomes one loop that streams the weights
    once, split over all threads."""
    out = (weight * x.reshape(1, -1)).sum(dim=-1)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class CompileState:
    """The process's compiled `matvec` kernel (made on first use), and why compiling failed, once it has."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget both: the next compiled product compiles (and may fail) again."""
        self.kernel = None
        self.failure: str | None = None

    def attempt(self, call, *args, instead: str) -> torch.Tensor | None:
        """`call(*args)`, or None where compiling fails here (a machine without the C++ compiler that
        torch.compile needs on a CPU): the first failure is kept and warned about once, saying what
        happens `instead`, and later calls give None at once, so decoding goes on eagerly."""
        if self.failure is not None:
            return None
        try:
            return call(*args)
        except Exception as error:  # compilers fail in many ways; all of them mean "not here"
            message = str(error).strip()
            self.failure = message.splitlines()[0] if message else type(error).__name__
            warnings.warn(f"torch.compile does not work here ({self.failure}); {instead}", RuntimeWarning,
                          stacklevel=3)
            return None


COMPILED = CompileState()


def compiled_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`matvec` through torch.compile, compiled on first use.

    With symbolic shapes one kernel serves every weight shape (two: with and without a bias), so
    the first compiled step compiles once, not once per weight shape, and streams as fast.
    """
    if COMPILED.kernel is None:
        COMPILED.kernel = torch.compile(matvec, dynamic=True)
    # Detached, parameters are plain tensors to the compiler, which would otherwise hold their
    # shapes fixed and compile once per shape after all.
    return COMPILED.kernel(x, weight.detach(), None if bias is None else bias.detach())


class CPULinear(TorchFunctionMode):
    """While active, `F.linear` on a CPU without autograd runs on faster kernels; all else is
    untouched.

    The same function, x @ W.T + b, differing only by rounding order: in fp32 through oneDNN's
    kernel (`mkldnn._linear_pointwise`, the op PyTorch's own compiler emits for CPU linears) for
    products of several rows, and of one row on AMD processors; or, with `compile=True`, one-row
    products in fp32 or bf16 through `compiled_matvec`, which needs the C++ compiler torch.compile
    uses on a CPU and costs seconds on first use (faster still on AMD; not faster than MKL on Intel).
    """

    def __init__(self, compile: bool = False):
        super().__init__()
        self.compile = compile

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _cpu_inference(x, weight, bias):
                one_row = x.numel() == x.shape[-1]
                if self.compile and one_row and x.dtype in (torch.float32, torch.bfloat16):
                    out = COMPILED.attempt(compiled_matvec, x, weight, bias, instead="decoding without it")
                    if out is not None:
                        return out
                if x.dtype == torch.float32 and (ONEDNN_FOR_ONE_ROW or (HAS_ONEDNN_LINEAR and not one_row)):
                    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


class Linear(nn.Linear):
    """`nn.Linear`, whose one-row inference products on a CPU (decoding a token) go to glassgpt's own
    kernels (`glassgpt.cpu_kernels`, fp32 and bf16); every other call is `F.linear`, as in nn.Linear.

    The model's layers are these, so decoding reaches the kernels without a TorchFunctionMode, whose
    dispatch of every other operation of a step cost more than the kernels gained (docs/PERFORMANCE.md).
    Training (autograd on), autocast, other devices and dtypes, and prompts keep PyTorch's own product.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if (not torch.jit.is_tracing()  # (an ONNX export records PyTorch's own product)
                and x.numel() == x.shape[-1] and x.dtype in (torch.float32, torch.bfloat16)
                and weight.is_contiguous() and _cpu_inference(x, weight, bias)
                and (kernels := cpu_kernels.for_this_call()) is not None):
            matvec = kernels.f32_matvec if x.dtype == torch.float32 else kernels.bf16_matvec
            return matvec(x.contiguous(), weight, bias)
        return F.linear(x, weight, bias)


def _cpu_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A CPU product of one dtype throughout, with no autograd and no autocast to honour."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def cpu_inference_kernels(compile: bool = False, rows: int | None = None,
                          dtype: torch.dtype = torch.float32) -> CPULinear | nullcontext:
    """A context manager: faster kernels for the CPU's inference matrix products (`CPULinear`).

    Use it around inference calls: `with torch.inference_mode(), cpu_inference_kernels(): model(ids)`.
    `rows` and `dtype`, the token rows a call feeds and the model's dtype, when the caller knows them:
    where the mode would hand every product of such a call back to PyTorch (one fp32 row on an Intel
    CPU, say), it is not entered at all, sparing each of the step's few hundred operations its dispatch.
    """
    if rows == 1 and cpu_kernels.ops() is not None:
        return nullcontext()  # the model's `Linear` layers send one-row products to the kernels themselves
    if rows == 1:
        useful = ONEDNN_FOR_ONE_ROW and dtype == torch.float32  # without glassgpt's: oneDNN on AMD only
    else:
        useful = HAS_ONEDNN_LINEAR and dtype == torch.float32
    return CPULinear(compile) if compile or useful else nullcontext()
