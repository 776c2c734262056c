"""CPU training speed: glassgpt's `verdict` step against llms-from-scratch's, side by side.

    python bench/bench_train_cpu.py                 # s/step of both, same weights and batches, + ratios
    python bench/bench_train_cpu.py --steps 6       # more steps per contender
    python bench/bench_train_cpu.py --full          # the whole verdict recipe: loss, wall time, tokens/s
    python bench/bench_train_cpu.py --full --precision fp32 --out runs/verdict-fp32

The peer is the tutorial's own model and loop (the book "Build a Large Language Model (From
Scratch)": its code is on PyPI, `pip install --no-deps llms-from-scratch`, the `bench` extra):
GPTModel, AdamW over all parameters (lr 4e-4, weight decay 0.1), cross-entropy on 2 x 256-token
batches of The Verdict. Our weights are copied into theirs, so both start from the same point and
see the same batches; the contenders alternate step by step, so load from other processes on the
machine falls on both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _peers import their_model  # bench/ is on the path when a bench runs as a script

from glassgpt.train import Trainer, recipe


def their_step(model, optimizer, inputs, targets) -> float:
    """The tutorial's train_model_simple, one batch of it."""
    optimizer.zero_grad()
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()
    return loss.item()


def side_by_side(steps: int) -> None:
    contenders = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(recipe("verdict", precision=precision, progress=False))
        contenders[f"glassgpt {precision}"] = trainer
    reference = contenders["glassgpt fp32"]
    theirs = their_model(reference.model)
    # Same weights: both models give the same logits (dropout off) before any step.
    batch = next(iter(reference.train_eval_loader))
    theirs.eval(), reference.model.eval()
    with torch.no_grad():
        gap = (theirs(batch[0]) - reference.model(batch[0])).abs().max().item()
    theirs.train(), reference.model.train()
    contenders["glassgpt bf16"].model.load_state_dict(reference.model.state_dict())
    print(f"same weights: max |logit difference| = {gap:.2e}")
    their_optimizer = torch.optim.AdamW(theirs.parameters(), lr=4e-4, weight_decay=0.1)

    batches = reference.batches(0)
    times: dict[str, list[float]] = {"llms-from-scratch fp32": [], **{name: [] for name in contenders}}
    losses: dict[str, list[float]] = {name: [] for name in times}
    for step in range(steps + 1):  # the first step of each warms up allocators and is not timed
        micro_batches = next(batches)
        inputs, targets = micro_batches[0]
        for name in times:
            start = time.perf_counter()
            if name.startswith("llms"):
                loss = their_step(theirs, their_optimizer, inputs, targets)
            else:
                loss = contenders[name].train_step(micro_batches).item()
            if step:
                times[name].append(time.perf_counter() - start)
            losses[name].append(loss)
    print(f"{steps} timed steps of 2 x 256 tokens, verdict-162m, {torch.get_num_threads()} threads")
    base = statistics.median(times["llms-from-scratch fp32"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<24} {median:6.2f} s/step  (min {min(values):.2f})  x{base / median:4.2f}  "
              f"losses {' '.join(f'{v:.3f}' for v in losses[name][:4])}")


def full_run(precision: str, out: str | None, epochs: int) -> None:
    trainer = Trainer(recipe("verdict", precision=precision, out=out, epochs=epochs))
    start = time.perf_counter()
    records = trainer.fit()
    wall = time.perf_counter() - start
    steps = [r for r in records if r["event"] == "step"]
    print(f"\nverdict recipe, {precision}: {trainer.step} steps in {wall:.0f} s "
          f"({wall / trainer.step:.2f} s/step with evaluation and checkpoints), "
          f"{trainer.step * trainer.tokens_per_step / wall:.0f} tokens/s")
    print(f"train loss, first step {steps[0]['train_loss']:.3f}, last step {steps[-1]['train_loss']:.3f}")
    print("epoch  train   val   sample")
    for r in records:
        if r["event"] == "eval":
            print(f"{r['epoch']:>5g}  {r['train_loss']:.3f}  {r['val_loss']:.3f}  "
                  f"{' '.join(r['sample'].split())[:70]!r}")
    if out:
        size = sum(f.stat().st_size for f in Path(out, "last").iterdir() if f.name == "model.safetensors")
        print(f"checkpoint weights: {size / 2**20:.0f} MiB (fp32)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per contender")
    parser.add_argument("--full", action="store_true", help="run the whole verdict recipe instead")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="for --full")
    parser.add_argument("--epochs", type=int, default=10, help="for --full")
    parser.add_argument("--out", help="for --full: keep checkpoints, metrics and loss.png here")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.full:
        full_run(args.precision, args.out, args.epochs)
    else:
        side_by_side(args.steps)


if __name__ == "__main__":
    main()
