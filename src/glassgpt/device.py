"""Which device to run on, and what it computes fast: the trainer and the server both ask here."""

from __future__ import annotations

from pathlib import Path

import torch


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
