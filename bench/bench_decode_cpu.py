"""CPU decode and prefill speed: glassgpt against transformers and the tutorial's no-cache loop.

    python bench/bench_decode_cpu.py                # GPT-2 small, fp32, batch 1, 2 threads
    python bench/bench_decode_cpu.py --repeats 5    # more alternating rounds (medians are printed)
    python bench/bench_decode_cpu.py --quick        # a 2-block model, to check the script runs

One random GPT-2 small is built in transformers, saved with `save_pretrained` and loaded into
glassgpt, so both sides hold the same weights (their greedy tokens are checked equal). The
tutorial's model (the book "Build a Large Language Model (From Scratch)": llms-from-scratch's
GPTModel, `pip install --no-deps llms-from-scratch`) gets the same weights too. Contenders alternate
round by round, so load from other processes falls on all of them alike; each figure is the median
over rounds.

- decode: 50 new tokens after an 8-token prompt. "decode tokens/s" counts the 49 tokens after
  the first (time of a 50-token run minus a 1-token run, which is the prefill); "end to end" is
  50 tokens over the whole call.
- long prompt: 50 new tokens after a 512-token prompt, glassgpt (KV cache) against the
  tutorial's `generate_text_simple`, which recomputes the whole window every step.
- prefill: one forward pass over 256 tokens that also fills the KV cache.
- reduced precision (optional, --precision): glassgpt decode in bf16 and int8 dynamic
  quantisation, with perplexity on The Verdict against fp32 (meaningful with --model pointing at
  trained weights, e.g. a GPT-2 directory; random weights only show the numerical drift).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from functools import partial

import torch
from _peers import their_model  # bench/ is on the path when a bench runs as a script

from glassgpt.fast import cpu_inference_kernels
from glassgpt.generate import generate
from glassgpt.weights import load_model


def build_models(quick: bool):
    """(glassgpt model, transformers model) holding the same random GPT-2 weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2) if quick else GPT2Config()  # GPT-2 small: 124M parameters
    hf = GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours, _ = load_model(directory)
    return ours, hf


def tutorial_model(ours):
    """llms-from-scratch's GPTModel (the tutorial's) holding glassgpt's weights, biases included."""
    return their_model(ours, drop_rate=0.0).eval()


def seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def ours_generate(model, ids, n, compile=False):
    return generate(model, ids, n, compile=compile)


def hf_generate(model, ids, n):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def tutorial_generate(model, ids, n):
    from llms_from_scratch.ch04 import generate_text_simple

    return generate_text_simple(model, ids, n, context_size=model.pos_emb.weight.shape[0])


def ours_prefill(model, ids):
    with torch.inference_mode(), cpu_inference_kernels():  # as generate() runs its prefill
        return model(ids, cache=model.new_cache(ids.shape[0]))


def hf_prefill(model, ids):
    with torch.inference_mode():
        return model(ids, use_cache=True).logits


def rounds(contenders: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each contender, calling them in turn for `repeats` rounds."""
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def perplexity(model, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of `ids` (1-D)."""
    losses, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start:start + window + 1]
            if chunk.numel() < 2:
                break
            logits = model(chunk[:-1].unsqueeze(0)).float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[1:], reduction="sum")
            losses, count = losses + loss.item(), count + chunk.numel() - 1
    return math.exp(losses / count)


def reduced_precision(ours, args, prompt) -> None:
    from glassgpt.hub import resolve_model
    from glassgpt.tokenizer import bundled_text, get_tokenizer

    model = ours
    if args.model:
        model, _, description = resolve_model(args.model)
        print(f"\nreduced precision on {description}")
    else:
        print("\nreduced precision on the random weights (perplexity shows only the numerical drift)")
    text_ids = torch.tensor(get_tokenizer("gpt2").encode(bundled_text("the-verdict.txt")))
    window = min(256, model.config.context_length)
    variants = {"fp32": model, "bf16": _copy(model).to(torch.bfloat16)}
    try:
        variants["int8 dynamic"] = torch.ao.quantization.quantize_dynamic(_copy(model), {torch.nn.Linear},
                                                                          dtype=torch.qint8)
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        print(f"  int8 dynamic quantisation unavailable: {error}")
    one = {name: (lambda m=m: ours_generate(m, prompt, 1)) for name, m in variants.items()}
    full = {name: (lambda m=m: ours_generate(m, prompt, 50)) for name, m in variants.items()}
    t1, t50 = rounds(one, args.repeats), rounds(full, args.repeats)
    base_ppl = perplexity(model, text_ids, window)
    for name, variant in variants.items():
        decode = 49 / (t50[name] - t1[name])
        ppl = base_ppl if name == "fp32" else perplexity(variant, text_ids, window)
        print(f"  {name:<13} decode {decode:7.1f} tokens/s "
              f"({decode / (49 / (t50['fp32'] - t1['fp32'])):4.2f}x fp32)"
              f"   perplexity on The Verdict {ppl:10.2f} ({(ppl / base_ppl - 1) * 100:+.2f}%)")


def _copy(model):
    import copy

    return copy.deepcopy(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a 2-block GPT-2, to check the script runs")
    parser.add_argument("--skip-tutorial", action="store_true", help="leave out the no-cache loop (slow)")
    parser.add_argument("--precision", action="store_true", help="also bf16 and int8 decode + perplexity")
    parser.add_argument("--model", default=None, help="trained weights for --precision (a --model value)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, hf = build_models(args.quick)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, ours.config.vocab_size, (1, 8), generator=generator)
    long_prompt = torch.randint(0, ours.config.vocab_size, (1, 512), generator=generator)
    prefill_ids = torch.randint(0, ours.config.vocab_size, (1, 256), generator=generator)
    print(f"GPT-2 {'(2 blocks) ' if args.quick else 'small '}{ours.num_parameters() / 1e6:.1f}M parameters, "
          f"fp32, batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}")

    expected = hf_generate(hf, prompt, 50)
    print(f"greedy 50 tokens equal to transformers: {torch.equal(ours_generate(ours, prompt, 50), expected)}")
    started = time.perf_counter()
    same = torch.equal(ours_generate(ours, prompt, 50, compile=True), expected)
    print(f"  and with compile=True: {same} "
          f"(first call, compiling included: {time.perf_counter() - started:.1f} s)")

    runs = {"glassgpt": partial(ours_generate, ours),
            "glassgpt compile": partial(ours_generate, ours, compile=True),
            "transformers": partial(hf_generate, hf)}
    one = rounds({name: partial(run, prompt, 1) for name, run in runs.items()}, args.repeats)
    full = rounds({name: partial(run, prompt, 50) for name, run in runs.items()}, args.repeats)
    decode = {name: 49 / (full[name] - one[name]) for name in full}
    end_to_end = {name: 50 / full[name] for name in full}
    print("\ndecode, 8-token prompt + 50 new tokens")
    for name in full:
        print(f"  {name:<16} decode {decode[name]:7.1f} tokens/s   "
              f"end to end {end_to_end[name]:7.1f} tokens/s   "
              f"ratio to transformers: decode {decode[name] / decode['transformers']:.2f}x, "
              f"end to end {end_to_end[name] / end_to_end['transformers']:.2f}x")
    floor = 34e9 / (ours.num_parameters() * 4)
    print(f"  memory-bandwidth bound (34 GB/s / fp32 weights): {floor:.0f} tokens/s; glassgpt reaches "
          f"{decode['glassgpt'] / floor:.0%} of it, "
          f"{decode['glassgpt compile'] / floor:.0%} with compile=True")

    prefill = rounds({"glassgpt": lambda: ours_prefill(ours, prefill_ids),
                      "transformers": lambda: hf_prefill(hf, prefill_ids)}, args.repeats)
    print("\nprefill, 256 tokens")
    for name, t in prefill.items():
        print(f"  {name:<13} {256 / t:7.1f} tokens/s")
    print(f"  ratio glassgpt / transformers: {prefill['transformers'] / prefill['glassgpt']:.2f}x")

    if not args.skip_tutorial:
        tutorial = tutorial_model(ours)
        same = torch.equal(ours_generate(ours, long_prompt, 5), tutorial_generate(tutorial, long_prompt, 5))
        long = rounds({"glassgpt": lambda: ours_generate(ours, long_prompt, 50),
                       "tutorial": lambda: tutorial_generate(tutorial, long_prompt, 50)},
                      max(1, args.repeats - 1))
        print(f"\nlong prompt, 512 tokens + 50 new (greedy tokens equal to the tutorial's: {same})")
        for name, t in long.items():
            print(f"  {name:<13} {50 / t:7.1f} tokens/s end to end")
        print("  ratio glassgpt (KV cache) / tutorial (no cache): "
              f"{long['tutorial'] / long['glassgpt']:.2f}x")

    if args.precision:
        reduced_precision(ours, args, prompt)


if __name__ == "__main__":
    main()
