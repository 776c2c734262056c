"""GPU training throughput: glassgpt against transformers' GPT2LMHeadModel, in one process.

Both models train GPT-2 small on random tokens at the same micro-batch and sequence length, with
bf16 autocast, fused AdamW, gradient clipping, TF32 for what stays in fp32, and the same loss code;
each runs eager and under torch.compile. The script measures the GPU's bf16 matrix-product peak
itself and prints tokens/s, ms/step, MFU and the ratio to transformers compiled.

    PYTHONPATH=src python bench/bench_gpu_train.py                 # on a CUDA machine
    PYTHONPATH=src python bench/bench_gpu_train.py --smoke         # tiny config, runs on a CPU

Variant names say what runs: glassgpt or transformers; glassgpt computes its loss with
`model(inputs, targets=targets)`, whose head is padded to a multiple of 64 on the GPU with -inf
logits for the padding (the loss and gradients of GPT-2's 50,257 tokens, on evenly tiled kernels);
"logits": glassgpt's logits through the shared loss code instead; "vocab50304": nanoGPT's padded
vocabulary, a model with 50,304 outputs (a multiple of 128, so the head's matrix products tile
evenly; the 47 extra tokens are never targets) -- faster, but its logits are not GPT-2's 50,257;
"compiled": torch.compile; "tuned": inductor's coordinate-descent tuning of its kernels; "graphs":
compile mode "reduce-overhead" (CUDA graphs); "own-loss": transformers' loss from `labels=` instead
of the shared loss code.

MFU counts 6N + 12·L·H·Q·T FLOPs per token (N: parameters less the position table), over the
measured peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
import torch._inductor.config
import torch.nn.functional as F

from glassgpt import GPT, get_preset


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 20) -> float:
    """The bf16 matrix-product rate this GPU reaches (median of `repeats`, random data), TFLOP/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = time_calls(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * size**3 / statistics.median(times) / 1e12


def measure_copy_bandwidth(device: torch.device, n_bytes: int = 2**31, repeats: int = 20) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written, in GB/s."""
    source = torch.randn(n_bytes // 4, device=device)
    target = torch.empty_like(source)
    times = time_calls(lambda: target.copy_(source), device, warmup=3, repeats=repeats)
    return 2 * n_bytes / statistics.median(times) / 1e9


def time_calls(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds taken by each of `repeats` calls of `fn`, after `warmup` calls.

    On a GPU each call is bracketed by CUDA events and the host never waits in between, so the
    timings hold no synchronisation and no launch gaps that the real loop would not have.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
    events[0].record()
    for index in range(repeats):
        fn()
        events[index + 1].record()
    torch.cuda.synchronize(device)
    return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(repeats)]


def time_attention_backends(device: torch.device, batch: int, seq: int, n_heads: int = 12,
                            head_dim: int = 64) -> dict[str, float]:
    """ms for one causal bf16 attention forward + backward through each fused SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, n_heads, seq, head_dim, device=device, dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def forward_backward(backend=backend):
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
        try:
            results[backend.name] = statistics.median(time_calls(forward_backward, device, 3, 20)) * 1e3
        except RuntimeError as error:  # a backend this build or GPU does not offer
            results[backend.name] = float("nan")
            print(f"  {backend.name}: {str(error).splitlines()[0]}")
    return results


def flops_per_token(config) -> float:
    """6N + 12·L·H·Q·T: matrix products forward and backward, attention scores and mixing included."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = GPT(config)
    n_params = model.num_parameters() - model.pos_emb.weight.numel()
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * config.context_length
    return 6 * n_params + attention


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def glassgpt_model(variant, config, device):
    """(model, loss_of(inputs, targets))."""
    if "vocab50304" in variant:  # nanoGPT's trick: 47 extra output tokens that are never targets
        config = config.replace(vocab_size=50304)
    model = GPT(config).to(device)
    if "logits" in variant:  # the logits handed back, then the shared loss code
        return model, lambda inputs, targets: cross_entropy(model(inputs), targets)
    return model, lambda inputs, targets: model(inputs, targets=targets)


def transformers_model(variant, config, device):
    from transformers import AutoModelForCausalLM, GPT2Config

    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.emb_dim,
        n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(device)
    if "own-loss" in variant:  # transformers' own loss path (labels shifted inside the model)
        return model, lambda inputs, targets: model(input_ids=inputs, labels=inputs).loss
    return model, lambda inputs, targets: cross_entropy(model(input_ids=inputs).logits, targets)


def make_train_step(model, loss_of, device: torch.device, compile: bool, graphs: bool = False,
                    accum: int = 1):
    """One optimisation step over `accum` micro-batches of (inputs, targets): returns the last loss
    as a tensor (no host sync)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
        lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda",
    )

    def compute_loss(inputs, targets):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return loss_of(inputs, targets)

    if graphs and accum > 1:
        # Each micro-batch's backward would write its gradients into the same graph-owned buffers
        # that the previous one's accumulated gradients still point to.
        raise ValueError("CUDA graphs (\"graphs\" variants) need --accum 1")
    if compile:
        # "reduce-overhead" also replays forward and backward as CUDA graphs (no launch gaps).
        compute_loss = torch.compile(compute_loss, mode="reduce-overhead" if graphs else "default")

    def step(micro_batches):
        for inputs, targets in micro_batches:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be reused
            loss = compute_loss(inputs, targets)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def run_variant(name, build, config, args, device) -> dict:
    torch.manual_seed(0)
    model, loss_of = build(name, config, device)
    model.train()
    step = make_train_step(model, loss_of, device, compile="compiled" in name, graphs="graphs" in name,
                           accum=args.accum)
    # A few batches of random tokens, made up front so the loop does nothing but train.
    batches = [torch.randint(0, config.vocab_size, (args.micro_batch, args.seq + 1), device=device)
               for _ in range(4)]
    counter = iter(range(10**9))

    def one_step():
        micro_batches = [batches[next(counter) % len(batches)] for _ in range(args.accum)]
        return step([(tokens[:, :-1], tokens[:, 1:]) for tokens in micro_batches])

    started = time.perf_counter()
    first_loss = one_step().item()
    warmup_seconds = time.perf_counter() - started
    times = time_calls(one_step, device, warmup=args.warmup, repeats=args.steps)
    last_loss = one_step().item()
    seconds = statistics.median(times)
    result = {
        "variant": name, "ms_per_step": seconds * 1e3,
        "tokens_per_s": args.accum * args.micro_batch * args.seq / seconds,
        "spread_ms": (max(times) - min(times)) * 1e3, "first_step_s": warmup_seconds,
        "first_loss": first_loss, "last_loss": last_loss,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
    }
    if args.profile and name == args.profile:
        profile_steps(one_step, device)
    return result


def profile_steps(one_step, device: torch.device, n_steps: int = 3) -> None:
    """Print where the GPU time of a few steps goes (torch.profiler, top kernels)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            one_step()
        synchronize(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default="glassgpt-eager,glassgpt-compiled,glassgpt-compiled-graphs,"
                        "glassgpt-logits-compiled,glassgpt-vocab50304-compiled,transformers-eager,"
                        "transformers-compiled,transformers-own-loss-compiled")
    parser.add_argument("--profile", default="",
                        help="variant to profile after timing, e.g. glassgpt-compiled")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and batch, for a CPU check")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = get_preset("gpt2", context_length=args.seq)
    if args.smoke:
        config = get_preset("gpt2", vocab_size=512, context_length=64, emb_dim=64, n_heads=4, n_layers=2)
        args.micro_batch, args.seq, args.steps, args.warmup = 2, 64, 3, 1
    # TF32 for the matrix products that stay in fp32 (autocast runs the rest in bf16).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    peak = measure_matmul_tflops(device, size=1024 if args.smoke else 8192)
    bandwidth = measure_copy_bandwidth(device, n_bytes=2**24 if args.smoke else 2**31)
    per_token = flops_per_token(config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}; measured bf16 matmul peak {peak:.0f} TFLOP/s, "
          f"copy {bandwidth:.0f} GB/s; {per_token / 1e6:.1f} MFLOP per token; "
          f"micro-batch {args.micro_batch} x {args.seq}, {args.accum} per optimizer step", flush=True)

    if device.type == "cuda":
        backends = time_attention_backends(device, args.micro_batch, args.seq, config.n_heads,
                                           config.head_dim)
        print("  causal attention fwd+bwd per layer: " +
              ", ".join(f"{name} {ms:.2f} ms" for name, ms in backends.items()), flush=True)

    builders = {"glassgpt": glassgpt_model, "transformers": transformers_model}
    results = []
    for variant in args.variants.split(","):
        # "tuned": inductor also tunes its generated kernels' launch settings (longer compile).
        torch._inductor.config.coordinate_descent_tuning = "tuned" in variant
        torch._dynamo.reset()  # compile each variant afresh, with its own settings
        row = run_variant(variant, builders[variant.split("-")[0]], config, args, device)
        if device.type == "cuda":  # the variant's model and optimizer are gone: free their memory
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        row["mfu"] = per_token * row["tokens_per_s"] / (peak * 1e12)
        results.append(row)
        print(f"  {variant:28s} {row['tokens_per_s']:>10,.0f} tok/s {row['ms_per_step']:8.2f} ms/step "
              f"MFU {row['mfu']:6.1%}  (first step {row['first_step_s']:.1f} s, loss {row['first_loss']:.3f}"
              f" -> {row['last_loss']:.3f}, {row['peak_memory_gib']:.1f} GiB)", flush=True)

    reference = {r["variant"]: r for r in results}.get("transformers-compiled")
    print("\n| variant | tokens/s | ms/step | MFU | vs transformers compiled |\n|---|---:|---:|---:|---:|")
    for row in results:
        ratio = f"{row['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else "-"
        print(f"| {row['variant']} | {row['tokens_per_s']:,.0f} | {row['ms_per_step']:.1f} "
              f"| {row['mfu']:.1%} | {ratio} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "torch": torch.__version__, "peak_tflops": peak,
                       "copy_gbps": bandwidth, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
