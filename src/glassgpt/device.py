"""Which device to run on, what it computes fast, and how many CPU threads inference should use:
the trainers, the CLI and the server all ask here."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
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


# CPU threads for inference (issue 16). Decoding one token runs hundreds of short parallel regions,
# and torch's OpenMP threads spin-wait for each other at the end of every one: when another process
# holds one of the cores, the thread that was switched out stalls every region, and 2 threads on a
# 2-core machine beside one busy process decoded at 4 tok/s where 1 thread gave 54. So the default
# leaves out the cores other processes are using now, measured by a short look at /proc/stat.
# OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning) also ends the collapse, but it cost
# ~30% of the 2-thread speed on a less busy machine, and libgomp reads it only when torch is loaded,
# which `import glassgpt` already does: a user who wants it sets it in the shell.

# The busy cores measured (a sum of fractions over the usable cores) are rounded up from this
# fraction: spinning threads lose 80-90% beside a competitor, where one thread fewer on a quiet
# machine loses far less (docs/PERFORMANCE.md, "Busy CPU"), so a partly busy core is left alone.
BUSY_CORE = 0.25
PROBE_SECONDS = 0.1


def usable_cores() -> int:
    """How many cores this process may run on (its affinity mask; all of them where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity masks
        return os.cpu_count() or 1


def cpu_times(stat: str, cores: set[int]) -> tuple[float, float] | None:
    """(idle, total) clock ticks of `cores` so far in `stat`, the text of /proc/stat; None if none."""
    idle = total = 0.0
    for line in stat.splitlines():
        name, *fields = line.split() or [""]
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        # user nice system idle iowait irq softirq steal (guest time is already inside user);
        # steal is time the hypervisor gave to someone else: busy, as far as we are concerned
        ticks = [float(field) for field in fields[:8]]
        idle += ticks[3] + ticks[4]
        total += sum(ticks)
    return (idle, total) if total else None


def busy_cores(seconds: float = PROBE_SECONDS) -> float | None:
    """How many of this process's cores other processes kept busy over the next `seconds` (0.0 to
    the usable cores), measured while this process sleeps; None where /proc/stat is not there."""
    try:
        cores = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cores = set(range(os.cpu_count() or 1))
    try:
        before = cpu_times(Path("/proc/stat").read_text(), cores)
        time.sleep(seconds)
        after = cpu_times(Path("/proc/stat").read_text(), cores)
    except OSError:  # not Linux
        return None
    if before is None or after is None or after[1] <= before[1]:
        return None
    idle_share = (after[0] - before[0]) / (after[1] - before[1])
    return max(0.0, 1.0 - idle_share) * len(cores)


def choose_threads(requested: int | None, *, usable: int, busy: float | None, default: int,
                   environ: Mapping[str, str]) -> int | None:
    """The intra-op thread count for CPU inference; None: leave torch's own choice.

    `requested` (--threads) always wins; so does a user's OMP_NUM_THREADS (torch already follows
    it). Otherwise torch's `default`, capped at the `usable` cores less those other processes keep
    `busy` (a core counts once it is more than BUSY_CORE busy), and at least 1.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1; got {requested}")
        return requested
    if environ.get("OMP_NUM_THREADS"):
        return None
    taken = math.floor(busy + 1 - BUSY_CORE) if busy is not None else 0
    return max(1, min(default, usable, usable - taken))


def inference_threads(requested: int | None = None) -> int | None:
    """choose_threads with this process's facts: its cores, their load now, torch's default."""
    if requested is not None or os.environ.get("OMP_NUM_THREADS"):
        busy = None  # the answer does not depend on it: skip the probe's sleep
    else:
        busy = busy_cores()
    return choose_threads(requested, usable=usable_cores(), busy=busy, default=torch.get_num_threads(),
                          environ=os.environ)


def configure_cpu_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count for inference (see inference_threads); returns the count.

    Once per process, before the work: torch's default, which caps the choice, is what it was set to.
    """
    threads = inference_threads(requested)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
