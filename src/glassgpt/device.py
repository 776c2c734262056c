"""Which device to run on, and what it computes fast: the trainers and the server all ask here."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`name` as a device; "auto": this process's GPU, else Apple's MPS, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matrix products in hardware (CUDA, or a CPU with AVX-512 BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs, for MFU (None where unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    known = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("4090", 165e12))
    for marker, flops in known:
        if marker in name:
            return flops
    return None


@dataclass(frozen=True)
class Precision:
    """How a training run computes: "fp32", or "bf16" / "fp16" autocast on `device`."""

    name: str
    device: torch.device

    def autocast(self) -> AbstractContextManager:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16's loss scaling (its small range would flush small gradients to 0); a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`name` (one of PRECISIONS) checked against `device`; "auto": bf16 where it is native, else fp32.

    On CUDA it also lets fp32 matrix products use the tensor cores (TF32), as every run there should.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {name!r}")
    if name == "auto":
        name = "bf16" if has_native_bf16(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16 training needs a CUDA GPU; on a CPU use --precision bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16 support; use --precision fp16 or fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Precision(name, device)
