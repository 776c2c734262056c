"""glassgpt's own CPU matrix-vector kernels for decoding in fp32, bf16 and int8, compiled for this machine.

A decoded token is little but products of one row with every weight matrix, so on a CPU it goes as
fast as the weights stream from memory. PyTorch's one-row kernels stream bf16 and int8 weights at
about half the memory's speed (fp32 a little below it); `cpu_kernels.cpp` does only this product,
with a path per instruction set (AVX-512 with its bf16 dot product, AVX-512, AVX2) and software prefetches
(why: the C++ file's header). It is compiled on first use by `torch.utils.cpp_extension` with the C++
compiler torch.compile already needs on a CPU (about 10 s, once: the build is kept under
`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions) and registers three PyTorch operators,
`torch.ops.glassgpt.f32_matvec`, `.bf16_matvec` and `.int8_matvec`, which torch.compile sees
through their shape functions here, so a compiled decode step calls them too; and a fourth,
`.decode_step`, a whole decoded token with the same kernels (what `glassgpt.cpu_step` calls).

They are optional: where the build fails (no compiler: one warning) or the processor has neither
AVX2 nor AVX-512, `ops()` says None and decoding keeps PyTorch's kernels, computing the same
numbers. `GLASSGPT_CPU_KERNELS=0` turns them off. Tests hold each path to PyTorch's product.
Measurements: docs/PERFORMANCE.md ("CPU decode").
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# What a build compiles for. "native": the machine it runs on (what decoding uses). The others exist
# so that tests reach, on one machine, the paths other processors take.
TARGETS = {
    "native": ["-mcpu=native"] if platform.machine().lower() in ("aarch64", "arm64") else ["-march=native"],
    "avx512": ["-march=x86-64-v4", "-mno-avx512bf16"],
    "avx2": ["-march=x86-64-v3"],
    "portable": ["-march=x86-64"],
}
# The paths that are faster than PyTorch's kernels; plain C++ ("portable") only proves the others.
FAST_PATHS = ("avx512_bf16", "avx512", "avx2")

_LOCK = threading.Lock()
_BUILT: dict[str, SimpleNamespace | str] = {}  # target -> its operators, or why it could not be built


def namespace(target: str = "native") -> str:
    """The operators' namespace under torch.ops: `glassgpt` for the native build."""
    return "glassgpt" if target == "native" else f"glassgpt_{target}"


def build(target: str = "native") -> SimpleNamespace:
    """Compile (or load the kept build of) `cpu_kernels.cpp` for `target`; its operators.

    Raises what the compiler raised. The build's name carries the torch version and the processor's
    features, so a build is never loaded by a torch or a machine it was not made for.
    """
    from torch.utils import cpp_extension

    ops = namespace(target)
    machine = f"{torch.__version__} {TARGETS[target]} {_cpu_flags()}"
    fingerprint = hashlib.sha256(machine.encode()).hexdigest()
    name = f"{ops}_cpu_kernels_{fingerprint[:12]}"
    if target == "native" and not _kept(cpp_extension, name):
        print("glassgpt: compiling its CPU kernels for this processor (once, about 10-40 s)", file=sys.stderr)
    cpp_extension.load(name=name, sources=[str(SOURCE)],
                       extra_cflags=["-O3", "-fopenmp", f"-DGLASSGPT_OPS={ops}", *TARGETS[target]],
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    _register_shapes(ops)
    library = getattr(torch.ops, ops)
    return SimpleNamespace(f32_matvec=library.f32_matvec, bf16_matvec=library.bf16_matvec,
                           int8_matvec=library.int8_matvec, decode_step=library.decode_step,
                           instruction_set=library.instruction_set(),
                           namespace=ops)


def ops(target: str = "native") -> SimpleNamespace | None:
    """The kernels for decoding (`.f32_matvec`, `.bf16_matvec`, `.int8_matvec`), built on first use;
    None where they are off (`GLASSGPT_CPU_KERNELS=0`), cannot be built here, or would not be faster
    than PyTorch's.
    The first failure is warned about once; later calls answer at once."""
    built = _BUILT.get(target)
    if built is None:
        with _LOCK:
            built = _BUILT.get(target)
            if built is None:
                built = _BUILT[target] = _try_build(target)
    return built if isinstance(built, SimpleNamespace) else None


def loaded() -> SimpleNamespace | None:
    """The native kernels if `ops()` has already built them, else None; never builds."""
    built = _BUILT.get("native")
    return built if isinstance(built, SimpleNamespace) else None


def for_this_call() -> SimpleNamespace | None:
    """What a layer calls: `ops()`, except while torch.compile traces a step, where it is `loaded()`
    (a trace does not build; `cuda_graphs.GraphedDecoder` builds them before compiling its step)."""
    return loaded() if torch.compiler.is_compiling() else ops()


def _try_build(target: str) -> SimpleNamespace | str:
    if os.environ.get("GLASSGPT_CPU_KERNELS", "1") == "0":
        return "turned off by GLASSGPT_CPU_KERNELS=0"
    try:
        built = build(target)
    except Exception as error:  # a compiler fails in many ways; all of them mean "not here"
        message = str(error).strip()
        reason = message.splitlines()[-1] if message else type(error).__name__
        warnings.warn(f"glassgpt's CPU kernels could not be built ({reason}); decoding uses PyTorch's "
                      "kernels (same numbers, slower)", RuntimeWarning, stacklevel=3)
        return reason
    if target == "native" and built.instruction_set not in FAST_PATHS:
        return f"this processor has no AVX2 or AVX-512 (path: {built.instruction_set})"
    return built


def _kept(cpp_extension, name: str) -> bool:
    """Whether an earlier process left a build of `name` (then loading it takes a moment)."""
    try:
        return (Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so").exists()
    except Exception:  # a private helper of torch's: if it changes, only the notice is lost
        return True


def _register_shapes(ops: str) -> None:
    """What torch.compile needs to trace the operators without running them: their outputs' shapes."""

    def one_row_output(x: torch.Tensor, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], n_rows), dtype=dtype)

    torch.library.register_fake(f"{ops}::int8_matvec")(
        lambda x, q, scale, bias: one_row_output(x, q.shape[0], torch.float32))
    torch.library.register_fake(f"{ops}::bf16_matvec")(
        lambda x, weight, bias: one_row_output(x, weight.shape[0], torch.bfloat16))
    torch.library.register_fake(f"{ops}::f32_matvec")(
        lambda x, weight, bias: one_row_output(x, weight.shape[0], torch.float32))


def cpu_info(*fields: str) -> str:
    """The value of the first /proc/cpuinfo line that starts with one of `fields` ("flags",
    "vendor_id", ...; Linux), or the processor's name as the platform gives it elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(fields):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cpu_flags() -> str:
    """The processor's feature flags (x86 "flags", Arm "Features")."""
    return cpu_info("flags", "Features")
