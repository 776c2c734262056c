"""GPU decode speed: glassgpt's graphed decoder against transformers' generate, in one process.

Batch-1 greedy decoding of 200 tokens after a 16-token prompt, GPT-2 small in bf16, the same random
weights in both (copied into glassgpt through its Hugging Face loader). transformers runs with its
default cache and with cache_implementation="static" (which it compiles itself); glassgpt runs
eager (glassgpt.generate) and as `GraphedDecoder` (static cache, compiled step, one CUDA graph
replay per token). Then batched throughput at batch 1/8/32/128. It also states the floor: the
bytes a token must read (weights once, plus the cache) over the measured copy bandwidth.

    PYTHONPATH=src python bench/bench_gpu_decode.py             # on a CUDA machine
    PYTHONPATH=src python bench/bench_gpu_decode.py --smoke     # tiny config, runs on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch._inductor.config
from bench_gpu_train import measure_copy_bandwidth, synchronize

from glassgpt import GPT, get_preset
from glassgpt.cuda_graphs import GraphedDecoder
from glassgpt.generate import generate


def seconds_per_call(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` including a final synchronisation (decode returns to the host)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_models(config, device, dtype):
    """transformers' GPT2LMHeadModel with random weights, and glassgpt loaded from the same weights."""
    from transformers import AutoModelForCausalLM, GPT2Config

    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.emb_dim,
        n_layer=config.n_layers, n_head=config.n_heads, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        model = GPT.from_pretrained(directory)
    return hf_model.to(device, dtype).eval(), model.to(device, dtype).eval()


def hf_generate(hf_model, ids, new_tokens, **options):
    return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True,
                             **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=200)
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-hf-static", action="store_true", help="skip transformers' static cache")
    parser.add_argument("--tune", action="store_true",
                        help="let inductor tune its kernels' launch settings "
                             "(coordinate descent; longer compile)")
    parser.add_argument("--json", default="")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, for a CPU check")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = get_preset("gpt2")
    if args.smoke:
        config = get_preset("gpt2", vocab_size=512, context_length=64, emb_dim=64, n_heads=4, n_layers=2)
        args.prompt, args.new, args.batches, args.repeats = 4, 20, "1,4", 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._inductor.config.coordinate_descent_tuning = args.tune
    hf_model, model = build_models(config, device, dtype)
    max_length = args.prompt + args.new
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    # The floor: each token reads every weight once (the tied matrix once) plus, on average, half
    # of the final cache; the embedding lookup reads one row, which we ignore.
    bandwidth = measure_copy_bandwidth(device, n_bytes=2**24 if args.smoke else 2**31)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache_bytes = 2 * config.n_layers * config.emb_dim * (args.prompt + args.new / 2) * dtype.itemsize
    floor_ms = (weight_bytes + cache_bytes) / (bandwidth * 1e9) * 1e3
    print(f"device {name}, torch {torch.__version__}; copy {bandwidth:.0f} GB/s; "
          f"{weight_bytes / 1e6:.0f} MB weights + {cache_bytes / 1e6:.1f} MB cache per token: "
          f"floor {floor_ms:.3f} ms/token ({1e3 / floor_ms:,.0f} tokens/s)", flush=True)

    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), device=device)
    rows = {}

    def record(label, seconds, batch=1):
        rows[label] = {"batch": batch, "seconds": seconds, "tokens_per_s": batch * args.new / seconds,
                       "ms_per_token": seconds / args.new * 1e3}
        print(f"  {label:40s} {rows[label]['tokens_per_s']:>12,.0f} tok/s "
              f"{rows[label]['ms_per_token']:.3f} ms/token", flush=True)

    started = time.perf_counter()
    decoder = GraphedDecoder(model, batch_size=1, max_length=max_length)
    ours = decoder.generate(prompt, args.new)
    print(f"  (graphed decoder compiled and captured in {time.perf_counter() - started:.1f} s)")
    record("glassgpt GraphedDecoder", seconds_per_call(
        lambda: decoder.generate(prompt, args.new), device, 2, args.repeats))
    record("glassgpt eager generate", seconds_per_call(
        lambda: generate(model, prompt, args.new), device, 1, args.repeats))
    theirs = hf_generate(hf_model, prompt, args.new)
    record("transformers generate (default cache)", seconds_per_call(
        lambda: hf_generate(hf_model, prompt, args.new), device, 1, args.repeats))
    if not args.no_hf_static:
        started = time.perf_counter()
        hf_generate(hf_model, prompt, args.new, cache_implementation="static")
        print(f"  (transformers static cache first call {time.perf_counter() - started:.1f} s)")
        record("transformers generate (static cache)", seconds_per_call(
            lambda: hf_generate(hf_model, prompt, args.new, cache_implementation="static"),
            device, 2, args.repeats))
    same = (ours[0] == theirs[0]).tolist()
    agree = same.index(False) if False in same else len(same)
    print(f"  greedy tokens of glassgpt and transformers agree for the first {agree - args.prompt} "
          f"of {args.new} new tokens (bf16 rounding decides near-ties on random weights)")

    hf_best = max(v["tokens_per_s"] for k, v in rows.items() if k.startswith("transformers"))
    speedup = rows["glassgpt GraphedDecoder"]["tokens_per_s"] / hf_best
    gap = rows["glassgpt GraphedDecoder"]["ms_per_token"] / floor_ms
    print(f"  GraphedDecoder: {speedup:.2f}x the faster transformers path; {gap:.2f}x the bandwidth floor")

    def batched_rows(batch: int) -> None:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt), device=device)
        batched = GraphedDecoder(model, batch_size=batch, max_length=max_length)
        record(f"glassgpt GraphedDecoder batch {batch}", seconds_per_call(
            lambda: batched.generate(prompts, args.new), device, 1, args.repeats), batch)
        record(f"transformers default cache batch {batch}", seconds_per_call(
            lambda: hf_generate(hf_model, prompts, args.new), device, 1, max(2, args.repeats // 2)), batch)

    for batch in [int(b) for b in args.batches.split(",") if b]:
        batched_rows(batch)

    print("\n| decode | tokens/s | ms/token |\n|---|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {row['tokens_per_s']:,.0f} | {row['ms_per_token']:.3f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "torch": torch.__version__, "copy_gbps": bandwidth,
                       "floor_ms_per_token": floor_ms, "rows": rows, "speedup": speedup}, handle, indent=2)


if __name__ == "__main__":
    main()
