"""LoRA against full fine-tuning: step time, trainable parameters, optimizer state and peak memory.

    PYTHONPATH=src python bench/bench_lora.py                          # GPT-2 small, 2 x 64 tokens
    PYTHONPATH=src python bench/bench_lora.py --preset nano --rounds 9
    PYTHONPATH=src python bench/bench_lora.py --batch-size 8 --seq 256  # on a CUDA machine

Both contenders start from the same random weights and train on the same random tokens with
AdamW (lr 1e-4, the loss from `model(inputs, targets=targets)`): "full" updates every parameter,
"lora" wraps attention qkv/out_proj and feed-forward expand/contract at rank 8 (alpha 8, see
glassgpt.lora) and updates only the adapters.

Step time: the two alternate round by round (the order flips each round), so load from other
processes on the machine falls on both alike; the median over rounds is reported. On a CPU the
process's CPU time per step is printed too: on a machine shared with other jobs it moves less than
the wall-clock time.

Memory: each contender runs again in its own fresh process (two steps, so Adam's state exists):
on CUDA the peak of `torch.cuda.max_memory_allocated` over the steps; on a CPU the process's peak
resident memory (`ru_maxrss`) minus its resident memory just before the model was built. Weights,
gradients and optimizer state are also counted exactly from the tensors, on both.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time

import torch

from glassgpt.lora import apply_lora, trainable_parameters
from glassgpt.model import GPT

CONTENDERS = ("full", "lora")


def build(kind: str, args, device: torch.device) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT.from_preset(args.preset, context_length=max(args.seq, 8), drop_rate=0.0).to(device).train()
    if kind == "lora":
        apply_lora(model, rank=args.rank)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def batch(model: GPT, args, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (args.batch_size, args.seq + 1), generator=generator)
    ids = ids.to(device)
    return ids[:, :-1], ids[:, 1:]


def step(model: GPT, optimizer, inputs, targets) -> float:
    loss = model(inputs, targets=targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # waits for the device, so the time taken covers the whole step


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def resident_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * resource.getpagesize()


def measure_memory(kind: str, args, device_name: str, queue) -> None:
    """In a fresh process: one contender's peak memory over two steps, and its exact byte counts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(device_name)
    rss_before = resident_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, optimizer = build(kind, args, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for seed in range(2):
        inputs, targets = batch(model, args, device, seed)
        loss = model(inputs, targets=targets)
        loss.backward()
        grad_bytes = tensor_bytes(p.grad for p in trainable)  # read before zero_grad frees them
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before  # ru_maxrss: KiB
    queue.put({"kind": kind, "peak": peak, "weights": tensor_bytes(model.parameters()),
               "grads": grad_bytes, "optimizer_state": tensor_bytes(state),
               "trainable": trainable_parameters(model), "total": model.num_parameters()})


def memory_figures(args, device: torch.device) -> dict[str, dict]:
    context = multiprocessing.get_context("spawn")  # a fresh process: its peak is this contender's alone
    figures = {}
    for kind in CONTENDERS:
        queue = context.Queue()
        process = context.Process(target=measure_memory, args=(kind, args, str(device), queue))
        process.start()
        figures[kind] = queue.get()
        process.join()
    return figures


def step_times(args, device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of each timed step, per contender."""
    contenders = {kind: build(kind, args, device) for kind in CONTENDERS}
    inputs, targets = batch(contenders["full"][0], args, device, seed=0)
    for model, optimizer in contenders.values():  # warm-up: allocators, Adam's state, kernel choice
        step(model, optimizer, inputs, targets)
    times: dict[str, list[float]] = {kind: [] for kind in CONTENDERS}
    cpu_times: dict[str, list[float]] = {kind: [] for kind in CONTENDERS}
    for round_index in range(args.rounds):
        inputs, targets = batch(contenders["full"][0], args, device, seed=round_index + 1)
        order = CONTENDERS if round_index % 2 == 0 else CONTENDERS[::-1]
        for kind in order:
            model, optimizer = contenders[kind]
            start, cpu_start = time.perf_counter(), time.process_time()
            step(model, optimizer, inputs, targets)
            times[kind].append(time.perf_counter() - start)
            cpu_times[kind].append(time.process_time() - cpu_start)
    return times, cpu_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2", help="model preset (default gpt2, GPT-2 small)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    memory = memory_figures(args, device)
    times, cpu_times = step_times(args, device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    peak = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS - RSS before the model"
    print(f"{args.preset}, batch {args.batch_size} x {args.seq} tokens, fp32, AdamW, LoRA rank {args.rank} "
          f"on qkv/out_proj/expand/contract; {where}; median of {args.rounds} alternating rounds")
    median = {kind: statistics.median(values) for kind, values in times.items()}
    fastest = {kind: min(values) for kind, values in times.items()}
    rows = [  # (label, {kind: value}, how to print a value)
        ("step time (s), median", median, "{:.3f}"),
        ("step time (s), fastest", fastest, "{:.3f}"),
        ("CPU time per step (s, all threads), median",
         {k: statistics.median(v) for k, v in cpu_times.items()}, "{:.3f}"),
        ("trainable parameters", {k: memory[k]["trainable"] for k in CONTENDERS}, "{:,}"),
        ("weights (MiB)", {k: memory[k]["weights"] / 2**20 for k in CONTENDERS}, "{:,.1f}"),
        ("gradients (MiB)", {k: memory[k]["grads"] / 2**20 for k in CONTENDERS}, "{:,.1f}"),
        ("optimizer state (MiB)", {k: memory[k]["optimizer_state"] / 2**20 for k in CONTENDERS}, "{:,.1f}"),
        (f"peak memory (MiB): {peak}", {k: memory[k]["peak"] / 2**20 for k in CONTENDERS}, "{:,.1f}"),
    ]
    if device.type != "cpu":  # the host's CPU time says little about a GPU's step
        rows = [row for row in rows if not row[0].startswith("CPU time")]
    print(f"| {'':<58} | {'full':>13} | {'LoRA':>13} | {'full / LoRA':>11} |")
    print(f"|{'-' * 60}|{'-' * 14}:|{'-' * 14}:|{'-' * 12}:|")
    for label, values, style in rows:
        ratio = values["full"] / values["lora"]
        print(f"| {label:<58} | {style.format(values['full']):>13} | {style.format(values['lora']):>13} "
              f"| {ratio:>10.2f}x |")
    if args.json:
        print(json.dumps({"memory": memory, "step_times": times, "cpu_times": cpu_times}))


if __name__ == "__main__":
    main()
