"""Data-parallel scaling: the same training on 1 GPU and on N GPUs (torchrun), at the same global batch.

    python bench/bench_train_ddp.py --gpus 2                  # 1 and 2 GPUs: GPT-2 small, T=1024
    python bench/bench_train_ddp.py --gpus 2,4 --batch-size 32 --steps 200
    python bench/bench_train_ddp.py --gpus 2 --ddp-bucket-mb 100          # another bucket size
    python bench/bench_train_ddp.py --gpus 4 --fsdp --model gpt2-xl --batch-size 4 --no-one   # sharded
    python bench/bench_train_ddp.py --device cpu --gpus 2 --model nano --context-length 64 --batch-size 4 \\
        --steps 20 --precision fp32 --no-compile       # the same on CPU processes (gloo): a dry run

Each run with n GPUs takes `--batch-size` windows per GPU per micro-batch and accumulates
max(gpus) / n micro-batches, so every run sees the same windows at every step: the loss curves
must agree, and the throughput ratio is the scaling. Printed per GPU count: tokens/s (median of the
logged windows, the first, which holds compilation, left out), the scaling against 1 GPU and its
efficiency (scaling / n), MFU per GPU, peak memory per GPU, and the loss agreement with 1 GPU
(largest difference of the logged train losses over the first 20 steps, where rounding has not
yet been amplified, and over the whole run; the last validation loss). `--no-one` skips the 1-GPU
run (a model that needs FSDP does not fit one GPU): ratios are then against the smallest count run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(gpus: int, most: int, args, out: Path) -> list[dict]:
    settings = ["--model", args.model, "--context-length", str(args.context_length),
                "--corpus", "bundled:tinyshakespeare.txt", "--tokenizer", "gpt2",
                "--stride", str(max(1, args.context_length // 4)), "--drop-rate", "0",
                "--batch-size", str(args.batch_size), "--grad-accum", str(most // gpus),
                "--max-steps", str(args.steps), "--lr", "6e-4", "--schedule", "cosine",
                "--warmup-steps", "20",
                "--grad-clip", "1.0", "--precision", args.precision, "--device", args.device,
                "--eval-every", str(args.steps), "--eval-batches", "4", "--log-every", str(args.log_every),
                "--checkpoint-every", str(10 * args.steps), "--no-progress", "--sample-tokens", "10",
                "--ddp-bucket-mb", str(args.ddp_bucket_mb), "--out", str(out)]
    if args.compile:
        settings.append("--compile")
    if args.fsdp and gpus > 1:
        settings.append("--fsdp")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] \
        if gpus > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(launcher + ["-m", "glassgpt", "train", *settings], check=True, env=env)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(records: list[dict]) -> dict:
    steps = [r for r in records if r["event"] == "step"]
    windows = steps[1:] or steps  # the first window holds compilation and warm-up
    evals = [r for r in records if r["event"] == "eval"]
    return {
        "losses": {r["step"]: r["train_loss"] for r in steps},
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
        "mfu": statistics.median(r["mfu"] for r in windows) if "mfu" in windows[0] else None,
        "peak_memory_gb": max((r.get("peak_memory_gb", 0.0) for r in steps), default=0.0) or None,
        "val_loss": evals[-1].get("val_loss") if evals else None,
    }


def largest_difference(a: dict[int, float], b: dict[int, float], until: int | None = None) -> float:
    common = [step for step in a if step in b and (until is None or step <= until)]
    return max((abs(a[step] - b[step]) for step in common), default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="2", help="the GPU (process) counts to compare with 1, e.g. 2,4")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="windows per GPU per micro-batch")
    parser.add_argument("--model", default="gpt2", help="a glassgpt preset (random weights)")
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto", help="auto (the GPUs) or cpu (gloo processes)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fsdp", action="store_true", help="shard (FSDP2) instead of replicating (DDP)")
    parser.add_argument("--ddp-bucket-mb", type=float, default=25.0)
    parser.add_argument("--log-every", type=int, default=10, help="steps per logged window (each syncs)")
    parser.add_argument("--one", action=argparse.BooleanOptionalAction, default=True,
                        help="run on 1 GPU too (--no-one: a model that does not fit one)")
    parser.add_argument("--save", help="copy every run's metrics here")
    args = parser.parse_args()
    counts = sorted({int(n) for n in args.gpus.split(",")} | ({1} if args.one else set()))
    most = max(counts)
    if any(most % n for n in counts):
        parser.error(f"every GPU count must divide the largest ({most}): the global batch is shared")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for n in counts:
            runs[n] = run(n, most, args, Path(tmp) / f"gpus{n}")
            if args.save:
                Path(args.save).mkdir(parents=True, exist_ok=True)
                lines = "".join(json.dumps(r) + "\n" for r in runs[n])
                Path(args.save, f"metrics_{n}gpu.jsonl").write_text(lines)
    results = {n: summary(records) for n, records in runs.items()}
    base = counts[0]
    mode = "FSDP" if args.fsdp else "DDP"
    context = args.context_length
    print(f"\n{args.model}, T={context}, global batch {args.batch_size * most} x {context} = "
          f"{args.batch_size * most * context:,} tokens per step, {args.steps} steps, {args.precision}"
          f"{', compiled' if args.compile else ''}, {mode} (bucket {args.ddp_bucket_mb:g} MB), "
          f"device {args.device}")
    print(f"{'GPUs':>4} {'tokens/s':>11} {'per GPU':>10} {'scaling':>8} {'effic.':>7} {'MFU/GPU':>8} "
          f"{'peak GB':>8} {'max |dloss| <=20':>17} {'max |dloss|':>12} {'val loss':>9}")
    for n in counts:
        r, b = results[n], results[base]
        scaling = r["tokens_per_s"] / b["tokens_per_s"]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        peak = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] else "-"
        early = largest_difference(r["losses"], b["losses"], until=20)
        whole = largest_difference(r["losses"], b["losses"])
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(f"{n:>4} {r['tokens_per_s']:>11,.0f} {r['tokens_per_s'] / n:>10,.0f} {scaling:>7.2f}x "
              f"{scaling / (n / base):>7.1%} {mfu:>8} {peak:>8} {early:>17.2e} {whole:>12.2e} {val:>9}")
    print("\nstep " + "".join(f"{f'loss {n} GPU':>14}" for n in counts))
    for step in sorted(results[base]["losses"]):
        losses = (results[n]["losses"].get(step, float("nan")) for n in counts)
        print(f"{step:>4} " + "".join(f"{loss:>14.4f}" for loss in losses))


if __name__ == "__main__":
    main()
