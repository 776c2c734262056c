"""Data-parallel scaling: the same training on 1 GPU and on N GPUs (torchrun), at the same global batch.

    python bench/bench_train_ddp.py --gpus 2            # on a machine with 2 GPUs
    python bench/bench_train_ddp.py --gpus 2 --steps 200 --batch-size 32

The 1-GPU run accumulates N micro-batches per step; each of the N processes takes one. Both see
the same windows at each step, so the loss curves must match; the throughput ratio is the scaling.
Model: verdict-162m (GPT-2 small, context 256) on Tiny Shakespeare with GPT-2 tokens, bf16, compiled.
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


def run(gpus: int, args, out: Path) -> list[dict]:
    settings = ["--model", "verdict-162m", "--corpus", "bundled:tinyshakespeare.txt", "--tokenizer", "gpt2",
                "--drop-rate", "0", "--batch-size", str(args.batch_size),
                "--grad-accum", str(args.gpus // gpus), "--max-steps", str(args.steps), "--lr", "6e-4",
                "--schedule", "cosine", "--warmup-steps", "20", "--grad-clip", "1.0", "--precision", "bf16",
                "--eval-every", str(args.steps), "--eval-batches", "4", "--log-every", "10",
                "--checkpoint-every", str(10 * args.steps), "--no-progress", "--sample-tokens", "10",
                "--out", str(out)]
    if args.compile:
        settings.append("--compile")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] \
        if gpus > 1 else [sys.executable]
    subprocess.run(launcher + ["-m", "glassgpt", "train", *settings], check=True, env=os.environ)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="windows per GPU per micro-batch")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--save", help="copy both metrics files here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        curves = {gpus: run(gpus, args, Path(tmp) / f"gpus{gpus}") for gpus in (1, args.gpus)}
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            for gpus, records in curves.items():
                Path(args.save, f"metrics_{gpus}gpu.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in records))
    global_batch = args.batch_size * args.gpus * 256
    print(f"\nverdict-162m, global batch {args.batch_size * args.gpus} x 256 = {global_batch:,} tokens, "
          f"{args.steps} steps, bf16{', compiled' if args.compile else ''}")
    print("step   loss 1 GPU   loss " f"{args.gpus} GPUs")
    steps = {gpus: {r["step"]: r for r in records if r["event"] == "step"}
             for gpus, records in curves.items()}
    for step in sorted(steps[1]):
        print(f"{step:>4}   {steps[1][step]['train_loss']:10.4f}   "
              f"{steps[args.gpus][step]['train_loss']:10.4f}")
    speeds = {}
    for gpus in curves:  # the first window holds compilation: leave it out
        windows = [r for r in steps[gpus].values()][1:]
        speeds[gpus] = statistics.median(r["tokens_per_s"] for r in windows)
        mfu = statistics.median(r.get("mfu", 0.0) for r in windows)
        print(f"{gpus} GPU(s): {speeds[gpus]:,.0f} tokens/s (median of the logged windows), MFU {mfu:.1%}")
    print(f"scaling: x{speeds[args.gpus] / speeds[1]:.2f} on {args.gpus} GPUs")


if __name__ == "__main__":
    main()
