"""glassgpt's own one-row CPU kernels against PyTorch's, over the 49 matrices a GPT-2 small token reads.

    python bench/bench_cpu_kernels.py [--threads 2] [--rounds 7] [--paths native,avx512,avx2]

For each precision (fp32, bf16, int8 weight-only with a scale per row), one token's products: every
matrix of GPT-2 small (12 blocks of 2304x768, 768x768, 3072x768, 768x3072, and the 50257x768 head)
times one random row. PyTorch's side is `F.linear` (fp32: MKL or oneDNN; bf16: its bf16 kernel) and,
for int8, `aten._weight_int8pack_mm` (PyTorch's int8 weight-only kernel, which needs bf16 activations),
the int8 matrix widened to fp32 per call, and the torch.compile'd loop glassgpt decoded with before.
The ratio is against the first of each precision's rows.
The contenders alternate round by round; each figure is the median over the rounds, in ms per token
and in GB/s of weights read, beside the memory's read speed (one pass over 1 GiB, same threads).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from glassgpt import cpu_kernels
from glassgpt.int8 import compiled_int8_matvec, quantize_rows

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]


def memory_read_speed(repeats: int = 5) -> float:
    block = torch.ones(1 << 28)  # 1 GiB of fp32
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block.sum()
        times.append(time.perf_counter() - start)
    return block.numel() * 4 / min(times) / 1e9


def contenders(paths: list[str]) -> dict[str, tuple[object, int]]:
    """name -> (a function running one token's products, bytes per weight)."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.02 for shape in SHAPES]
    rows = [torch.randn(1, weight.shape[1], generator=generator) for weight in weights]
    halves = [weight.bfloat16() for weight in weights]
    half_rows = [row.bfloat16() for row in rows]
    quantised = [quantize_rows(weight) for weight in weights]

    def token(product, matrices, inputs):  # one token's 49 products, timed as one
        return lambda: [product(x, w) for w, x in zip(matrices, inputs, strict=True)]

    table = {
        "fp32 PyTorch F.linear": (token(F.linear, weights, rows), 4),
        "bf16 PyTorch F.linear": (token(F.linear, halves, half_rows), 2),
        "int8 PyTorch _weight_int8pack_mm (bf16 x)": (
            token(lambda x, qs: torch.ops.aten._weight_int8pack_mm(x, qs[0], qs[1].bfloat16()),
                  quantised, half_rows), 1),
        "int8 PyTorch widened + F.linear": (
            token(lambda x, qs: F.linear(x, qs[0].float()) * qs[1], quantised, rows), 1),
        "int8 glassgpt before (torch.compile'd loop)": (
            token(lambda x, qs: compiled_int8_matvec(x, qs[0], qs[1], None), quantised, rows), 1),
    }
    for path in paths:
        kernels = cpu_kernels.ops(path)
        if kernels is None:
            print(f"(glassgpt {path}: not built here: {cpu_kernels._BUILT[path]})")
            continue
        label = f"glassgpt {path} ({kernels.instruction_set})"
        table[f"fp32 {label}"] = (token(lambda x, w, k=kernels: k.f32_matvec(x, w, None), weights, rows), 4)
        table[f"bf16 {label}"] = (
            token(lambda x, w, k=kernels: k.bf16_matvec(x, w, None), halves, half_rows), 2)
        table[f"int8 {label}"] = (
            token(lambda x, qs, k=kernels: k.int8_matvec(x, qs[0], qs[1], None), quantised, rows), 1)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--paths", default="native", help="builds to time: native, avx512, avx2, portable")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = contenders(args.paths.split(","))
    n_weights = sum(rows * columns for rows, columns in SHAPES)
    seconds: dict[str, list[float]] = {name: [] for name in table}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (run, _) in table.items():
                run()  # warm: the first call after another contender pays for the cache it left
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {args.threads} threads, medians of {args.rounds} alternating rounds; "
          f"memory read speed {memory_read_speed():.1f} GB/s")
    heading = "one token of GPT-2 small (49 one-row products)"
    print(f"  {heading:48s} {'ms':>7s} {'GB/s':>6s} {'vs PyTorch':>10s}")
    baseline = {}
    for name, (_, width) in table.items():
        median = statistics.median(seconds[name])
        precision = name.split()[0]
        baseline.setdefault(precision, median)  # PyTorch's F.linear comes first in each precision
        print(f"  {name:48s} {median * 1e3:7.2f} {n_weights * width / median / 1e9:6.1f} "
              f"{baseline[precision] / median:9.2f}x")


if __name__ == "__main__":
    main()
