"""CPU decode and prefill speed: glassgpt against transformers, llama.cpp, ONNX Runtime and the
tutorial's no-cache loop, at fp32, 16-bit and 8-bit, on the same random GPT-2 small weights.

    python bench/bench_decode_cpu.py --threads 2                 # everything, 5 alternating rounds
    taskset -c 0,1 python bench/bench_decode_cpu.py --threads 2  # on a bigger machine: two cores
    python bench/bench_decode_cpu.py --quick                     # a 2-block model, to check it runs

One random GPT-2 small is built in transformers, saved with `save_pretrained` and loaded into
glassgpt, so both sides hold the same weights (their greedy tokens are checked equal). llama.cpp
(GGUF F32, BF16, Q8_0 written from glassgpt's weights) and ONNX Runtime (glassgpt's modules
exported with past keys and values; fp32 and its own int8 dynamic quantisation) get the same
weights too (bench/_engines.py); an engine that is not installed is skipped with a note
(`pip install .[bench]`: docs/PERFORMANCE.md says how llama-cpp-python was built). The tutorial's
model (llms-from-scratch's GPTModel) runs the long-prompt comparison.

Each table holds one precision; its contenders alternate round by round, so load from other
processes falls on all of them alike, and each figure is the median over the rounds.
- decode tokens/s: a 16-token prompt + 128 new tokens, greedy, batch 1; the 127 tokens after the
  first (time of a 128-token run minus a 1-token run, which is the prefill).
- ceiling: the memory's read speed (one pass over 1 GiB, measured here with the same threads)
  over the bytes of weights a token reads (4, 2 or 1 per parameter).
- first token: time to the first new token after a 256-token prompt (the prefill).
- quality (16- and 8-bit): against glassgpt fp32 on the fp32 greedy sequence, the largest logit
  difference (every position of prompt + 128 tokens, teacher-forced), how many of the 128 greedy
  tokens agree before the first difference, and the perplexity on The Verdict (256-token windows;
  with random weights only the change means anything).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
import warnings
from functools import partial

import _engines  # bench/ is on the path when a bench runs as a script
import numpy as np
import torch
from _engines import Contender
from _peers import their_model

from glassgpt.fast import cpu_inference_kernels
from glassgpt.generate import generate
from glassgpt.int8 import quantize_int8
from glassgpt.tokenizer import bundled_text, get_tokenizer
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


def rounds(contenders: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each contender, calling them in turn for `repeats` rounds."""
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


PROMPT_TOKENS = 16  # the decode prompt, as in issue 16's measurements


def torch_contender(model, compile=False) -> Contender:
    """A glassgpt model as a `Contender` (token ids in and out as lists, like the engines')."""
    def gen(ids, n):
        return generate(model, torch.tensor([ids]), n, compile=compile)[0, len(ids):].tolist()

    def logits(ids):
        with torch.inference_mode(), cpu_inference_kernels():
            return model(torch.tensor([ids]))[0].float().numpy()

    return Contender(gen, logits)


def hf_contender(hf) -> Contender:
    def gen(ids, n):
        return hf_generate(hf, torch.tensor([ids]), n)[0, len(ids):].tolist()

    def logits(ids):
        with torch.inference_mode():
            return hf(torch.tensor([ids])).logits[0].float().numpy()

    return Contender(gen, logits)


def read_bandwidth() -> float:
    """Bytes per second of one pass over 1 GiB (a sum), the median of 5, with torch's threads."""
    data = torch.ones(2 ** 28)
    data.sum()
    return 2 ** 30 / statistics.median(seconds(data.sum) for _ in range(5))


def contenders_for(precision: str, ours, hf, args, directory: str) -> tuple[dict[str, Contender], list[str]]:
    """The table's contenders ({name: Contender}) and notes on those skipped."""
    table, notes = {}, []
    status = _engines.available()
    if precision == "fp32":
        table["glassgpt"] = torch_contender(ours)
        if args.compile:
            table["glassgpt compile=True"] = torch_contender(ours, compile=True)
        table["transformers"] = hf_contender(hf)
        engines = {"llama.cpp F32": ("llama.cpp", _engines.llama_cpp, "F32"),
                   "ONNX Runtime fp32": ("ONNX Runtime", _engines.onnx_runtime, "fp32")}
    elif precision == "16-bit":
        bf16 = copy.deepcopy(ours).to(torch.bfloat16)
        table["glassgpt bf16"] = torch_contender(bf16)
        if args.compile:
            table["glassgpt bf16 compile=True"] = torch_contender(bf16, compile=True)
        engines = {"llama.cpp BF16": ("llama.cpp", _engines.llama_cpp, "BF16")}
        notes.append("ONNX Runtime: no bf16 matrix kernels on the CPU; transformers: not timed in 16-bit")
    else:
        int8 = quantize_int8(copy.deepcopy(ours))
        table["glassgpt int8 (weight-only)"] = torch_contender(int8)
        if args.compile:
            table["glassgpt int8 compile=True"] = torch_contender(int8, compile=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = copy.deepcopy(ours)
            for module in plain.modules():  # torch.ao's dynamic quantisation takes exact nn.Linear only
                if isinstance(module, torch.nn.Linear):
                    module.__class__ = torch.nn.Linear
            dynamic = torch.ao.quantization.quantize_dynamic(plain, {torch.nn.Linear}, dtype=torch.qint8)
        table["glassgpt int8 dynamic (before)"] = torch_contender(dynamic)
        engines = {"llama.cpp Q8_0": ("llama.cpp", _engines.llama_cpp, "Q8_0"),
                   "ONNX Runtime int8 dynamic": ("ONNX Runtime", _engines.onnx_runtime, "int8")}
    for name, (engine, make, kind) in engines.items():
        if status[engine] is not None:
            notes.append(f"{name}: skipped, {engine} {status[engine]}")
            continue
        try:
            table[name] = make(ours, directory, kind, args.threads)
        except Exception as error:  # an engine that fails to load is reported, not fatal
            notes.append(f"{name}: skipped, {type(error).__name__}: {str(error).strip()[:200]}")
    return table, notes


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many tokens agree before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def perplexity(logits_of, ids: list[int], window: int) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of `ids`."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = torch.from_numpy(np.asarray(logits_of(chunk[:-1]), dtype=np.float32))
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def timed_table(precision, table, notes, ceiling, args, prompt, prefill_prompt, reference) -> None:
    """Time the table's contenders in alternating rounds and print decode, ceiling and first token."""
    n = args.new_tokens
    one = {name: partial(c.generate, prompt, 1) for name, c in table.items()}
    full = {name: partial(c.generate, prompt, n) for name, c in table.items()}
    first = {name: partial(c.generate, prefill_prompt, 1) for name, c in table.items()}
    for fn in full.values():  # warm-up: compiles, loads, first-touch of the weights
        fn()
    t1, tn, tf = rounds(one, args.repeats), rounds(full, args.repeats), rounds(first, args.repeats)
    print(f"\n{precision}: decode {len(prompt)}-token prompt + {n} new tokens, batch 1, greedy; "
          f"ceiling {ceiling:.0f} tokens/s (memory read speed / weight bytes)")
    print(f"  {'contender':<30} {'decode tok/s':>12} {'of ceiling':>10} "
          f"{'first token, ' + str(len(prefill_prompt)) + ' prompt':>26} {'greedy = glassgpt fp32':>23}")
    for name, contender in table.items():
        decode = (n - 1) / (tn[name] - t1[name])
        same = leading_agreement(contender.generate(prompt, n), reference)
        print(f"  {name:<30} {decode:12.1f} {decode / ceiling:10.0%} {tf[name] * 1000:23.1f} ms "
              f"{same:>15d}/{n} tokens")
    for note in notes:
        print(f"  ({note})")


def quality(table, fp32, reference_ids, text_ids, window) -> None:
    """Logit error, greedy agreement and perplexity change of each contender against glassgpt fp32."""
    expected = fp32.logits(reference_ids)
    n = len(reference_ids) - PROMPT_TOKENS
    base = perplexity(fp32.logits, text_ids, window)
    print(f"  quality against glassgpt fp32 (perplexity on The Verdict {base:.2f}):")
    for name, contender in table.items():
        error = np.abs(np.asarray(contender.logits(reference_ids), dtype=np.float32) - expected).max()
        same = leading_agreement(contender.generate(reference_ids[:PROMPT_TOKENS], n),
                                 reference_ids[PROMPT_TOKENS:])
        ppl = perplexity(contender.logits, text_ids, window)
        print(f"  {name:<30} max |logit difference| {error:7.4f}   greedy agrees for {same:3d}/{n} tokens   "
              f"perplexity {ppl:10.2f} ({(ppl / base - 1) * 100:+.3f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch, llama.cpp and ONNX Runtime threads")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (medians are printed)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--precisions", default="fp32,16-bit,8-bit", help="comma-separated tables to run")
    parser.add_argument("--quick", action="store_true", help="a 2-block GPT-2, to check the script runs")
    parser.add_argument("--no-quality", action="store_true", help="leave out logit error and perplexity")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out the compile=True contenders (their compiling takes minutes)")
    parser.add_argument("--tutorial", action="store_true", help="also the no-cache loop, 512-token prompt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, hf = build_models(args.quick)
    generator = torch.Generator().manual_seed(1)
    vocab = ours.config.vocab_size
    prompt = torch.randint(0, vocab, (PROMPT_TOKENS,), generator=generator).tolist()
    prefill_prompt = torch.randint(0, vocab, (256,), generator=generator).tolist()
    print(f"GPT-2 {'(2 blocks) ' if args.quick else 'small '}{ours.num_parameters() / 1e6:.1f}M parameters, "
          f"batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}; medians of "
          f"{args.repeats} alternating rounds")
    fp32 = torch_contender(ours)
    reference = fp32.generate(prompt, args.new_tokens)
    print(f"greedy {args.new_tokens} tokens equal to transformers': "
          f"{reference == hf_contender(hf).generate(prompt, args.new_tokens)}")
    bandwidth = read_bandwidth()
    print(f"memory read speed: {bandwidth / 1e9:.1f} GB/s (one pass over 1 GiB, {args.threads} threads)")
    text_ids = get_tokenizer("gpt2").encode(bundled_text("the-verdict.txt"))
    bytes_per_weight = {"fp32": 4, "16-bit": 2, "8-bit": 1}
    with tempfile.TemporaryDirectory() as directory:
        for precision in args.precisions.split(","):
            if precision not in bytes_per_weight:
                parser.error(f"unknown precision {precision!r}; choose from {', '.join(bytes_per_weight)}")
            table, notes = contenders_for(precision, ours, hf, args, directory)
            ceiling = bandwidth / (ours.num_parameters() * bytes_per_weight[precision])
            timed_table(precision, table, notes, ceiling, args, prompt, prefill_prompt, reference)
            if precision != "fp32" and not args.no_quality:
                window = min(256, ours.config.context_length)
                quality(table, fp32, prompt + reference, text_ids, window)
            del table

    if args.tutorial:
        tutorial = tutorial_model(ours)
        long_prompt = torch.randint(0, vocab, (1, 512), generator=generator)
        same = torch.equal(ours_generate(ours, long_prompt, 5), tutorial_generate(tutorial, long_prompt, 5))
        long = rounds({"glassgpt": lambda: ours_generate(ours, long_prompt, 50),
                       "tutorial": lambda: tutorial_generate(tutorial, long_prompt, 50)},
                      max(1, args.repeats - 2))
        print(f"\nlong prompt, 512 tokens + 50 new (greedy tokens equal to the tutorial's: {same})")
        for name, t in long.items():
            print(f"  {name:<13} {50 / t:7.1f} tokens/s end to end")
        print("  ratio glassgpt (KV cache) / tutorial (no cache): "
              f"{long['tutorial'] / long['glassgpt']:.2f}x")

if __name__ == "__main__":
    main()
