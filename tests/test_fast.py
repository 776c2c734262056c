"""glassgpt.fast's CPU kernels compute what PyTorch's default kernels compute.

`cpu_inference_kernels()` sends fp32 `F.linear` on a CPU to oneDNN (or, with compile=True, one-row
products to a compiled matrix-vector kernel); results may differ only by rounding order, tokens
not at all, and nothing that needs autograd, autocast or another dtype is touched.
(The GPU fast paths are tested in tests/test_gpu.py.)
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, random_model

from glassgpt import cpu_kernels, get_preset
from glassgpt.cuda_graphs import COMPILES_CPU_STEP
from glassgpt.fast import (
    HAS_ONEDNN_LINEAR,
    ONEDNN_FOR_ONE_ROW,
    CPULinear,
    compiled_matvec,
    cpu_inference_kernels,
    matvec,
)
from glassgpt.generate import generate, iter_tokens

# With and without Q/K/V biases, tied and untied heads.
CONFIGS = {
    "gpt2": get_preset("gpt2", vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2),
    "verdict-162m": get_preset("verdict-162m", vocab_size=97, context_length=32, emb_dim=32, n_heads=4,
                               n_layers=2, drop_rate=0.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_logits_equal_the_default_kernels(name):
    config = CONFIGS[name]
    model = random_model(config)
    ids = random_ids(config, 2, 20, seed=1)
    with torch.inference_mode():
        expected = model(ids)
        with cpu_inference_kernels():
            cache = model.new_cache(batch_size=2)
            pieces = ([model(ids[:, :12], cache=cache)]
                      + [model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)])
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-5, rtol=1e-5)


def kernels_used(x, weight, bias) -> set[str]:
    with torch.inference_mode(), torch.autograd.profiler.profile() as prof, cpu_inference_kernels():
        F.linear(x, weight, bias)
    return {event.name for event in prof.function_events} & {"mkldnn::_linear_pointwise", "aten::linear"}


@pytest.mark.parametrize("rows", [1, 3])
def test_the_mode_sends_each_product_to_the_kernel_chosen_for_this_cpu(rows):
    """Not a pass-through: several rows go to oneDNN on x86-64, one row on AMD only; same results.
    (One-row products of the model's own layers go to glassgpt's kernels without the mode.)"""
    x, weight, bias = torch.randn(rows, 64), torch.randn(48, 64), torch.randn(48)
    with torch.inference_mode():
        expected = F.linear(x, weight, bias)
        with cpu_inference_kernels():
            result = F.linear(x, weight, bias)
            unbiased = F.linear(x, weight)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unbiased, x @ weight.T, atol=1e-5, rtol=1e-5)
    onednn = ONEDNN_FOR_ONE_ROW if rows == 1 else HAS_ONEDNN_LINEAR
    assert kernels_used(x, weight, bias) == {"mkldnn::_linear_pointwise" if onednn else "aten::linear"}


def test_training_autocast_and_other_dtypes_keep_pytorchs_own_linear():
    x = torch.randn(3, 64, requires_grad=True)
    weight = torch.randn(48, 64, requires_grad=True)
    with cpu_inference_kernels():
        out = F.linear(x, weight)                    # autograd needed: the default path, with its gradient
        out.sum().backward()
        assert x.grad is not None and weight.grad is not None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert F.linear(x, weight).dtype == torch.bfloat16  # autocast still applies
        with torch.no_grad():
            half = F.linear(x.bfloat16(), weight.bfloat16())
    assert half.dtype == torch.bfloat16


def test_matvec_is_a_one_row_linear():
    x, weight, bias = torch.randn(1, 1, 200), torch.randn(70, 200), torch.randn(70)
    torch.testing.assert_close(matvec(x, weight, bias), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matvec(x, weight, None), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    assert matvec(x, weight, bias).shape == (1, 1, 70)


def test_compiled_decoding_gives_the_same_tokens_and_logits():
    """compile=True: one-token steps through the compiled matrix-vector kernel; prompts stay on oneDNN."""
    config = CONFIGS["gpt2"]
    model = random_model(config)
    ids = random_ids(config, 1, 5, seed=2)
    expected = generate(model, ids, 20)
    assert torch.equal(generate(model, ids, 20, compile=True), expected)
    x, weight, bias = torch.randn(1, 1, 32), torch.randn(96, 32), torch.randn(96)
    with torch.inference_mode():
        torch.testing.assert_close(compiled_matvec(x, weight, bias), F.linear(x, weight, bias),
                                   atol=1e-5, rtol=1e-5)
        with CPULinear(compile=True), torch.autograd.profiler.profile() as prof:
            F.linear(x, weight, bias)
    assert not any(event.name in ("aten::linear", "mkldnn::_linear_pointwise")
                   for event in prof.function_events)


def test_a_machine_where_compiling_fails_still_decodes(monkeypatch):
    """No C++ compiler (say): one warning, then the eager kernels, with the same tokens. (A padded
    batch decodes step by step with compiled products; the whole-step path is tested below.)"""
    import glassgpt.fast as fast

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(fast, "compiled_matvec", broken)
    monkeypatch.setattr(fast.COMPILED, "failure", None)
    monkeypatch.setattr(cpu_kernels, "build", broken)  # glassgpt's own kernels need the same compiler
    monkeypatch.setattr(cpu_kernels, "_BUILT", {})
    config = CONFIGS["verdict-162m"]
    model = random_model(config)
    ids = random_ids(config, 1, 4, seed=3)
    padding = torch.ones_like(ids)
    with pytest.warns(RuntimeWarning, match="No working C\\+\\+ compiler found"):
        out = generate(model, ids, 6, compile=True, attention_mask=padding)
    assert torch.equal(out, generate(model, ids, 6))
    assert fast.COMPILED.failure == "InvalidCxxCompiler: No working C++ compiler found"


needs_cpu_step = pytest.mark.skipif(not COMPILES_CPU_STEP, reason="torch < 2.13 compiles per product")


@needs_cpu_step
def test_where_the_whole_step_cannot_compile_decoding_goes_on_uncompiled(monkeypatch):
    import glassgpt.cuda_graphs as cuda_graphs

    def no_compiler(function, **options):
        def broken(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return broken

    monkeypatch.setattr(cuda_graphs.torch, "compile", no_compiler)
    monkeypatch.setattr(cuda_graphs.CPU_STEP, "failure", None)
    config = CONFIGS["gpt2"]
    model = random_model(config)
    ids = random_ids(config, 2, 4, seed=3)  # a batch: what compile=True compiles on a CPU
    with pytest.warns(RuntimeWarning, match="No working C\\+\\+ compiler found"):
        out = generate(model, ids, 6, compile=True)
    assert torch.equal(out, generate(model, ids, 6))
    assert cuda_graphs.CPU_STEP.failure == "InvalidCxxCompiler: No working C++ compiler found"


def test_compiled_decoding_of_bf16_weights_matches_fp32_within_bf16_rounding():
    x, weight, bias = torch.randn(1, 1, 256), torch.randn(80, 256), torch.randn(80)
    with torch.inference_mode():
        expected = F.linear(x, weight, bias)
        result = compiled_matvec(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    assert result.dtype == torch.bfloat16
    assert ((result.float() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("rows", [1, 8])
def test_the_mode_stays_out_of_calls_where_it_would_change_nothing(rows, monkeypatch):
    import glassgpt.fast as fast

    # Without glassgpt's own kernels (a machine that cannot build them):
    monkeypatch.setattr(cpu_kernels, "_BUILT", {"native": "not here"})
    for one_row_onednn in (True, False):  # an AMD, then an Intel processor
        monkeypatch.setattr(fast, "ONEDNN_FOR_ONE_ROW", one_row_onednn)
        useful = one_row_onednn if rows == 1 else fast.HAS_ONEDNN_LINEAR
        assert isinstance(fast.cpu_inference_kernels(rows=rows), CPULinear) == useful
        assert isinstance(fast.cpu_inference_kernels(compile=True, rows=rows), CPULinear)
        assert not isinstance(fast.cpu_inference_kernels(rows=rows, dtype=torch.bfloat16), CPULinear)
    # With them, the model's own `Linear` layers send one-row products there: the mode has nothing
    # to add to a one-row step; prompts of bf16 models have nothing to gain either.
    monkeypatch.setattr(cpu_kernels, "_BUILT", {"native": cpu_kernels.build("native")})
    for one_row_onednn in (True, False):
        monkeypatch.setattr(fast, "ONEDNN_FOR_ONE_ROW", one_row_onednn)
        for dtype in (torch.float32, torch.bfloat16):
            useful = rows > 1 and fast.HAS_ONEDNN_LINEAR and dtype == torch.float32
            assert isinstance(fast.cpu_inference_kernels(rows=rows, dtype=dtype), CPULinear) == useful
            compiled = fast.cpu_inference_kernels(compile=True, rows=rows, dtype=dtype)
            assert isinstance(compiled, CPULinear) == (rows > 1)


# ---------------------------------------------------------------- the whole decode step compiled (CPU)

def decode_with_logits(model, ids, n, **settings) -> tuple[list[list[int]], torch.Tensor]:
    """Each row's tokens and every step's logits (steps x rows, vocab), decoding the (B, T) `ids`."""
    steps = []
    tokens = list(iter_tokens(model, ids, n, observe=lambda logits, _: steps.append(logits.clone()),
                              **settings))
    return torch.stack(tokens, dim=1).tolist(), torch.cat(steps).float()


@needs_cpu_step
def test_compiled_cpu_decoding_runs_one_compiled_step_and_matches_eager_decoding():
    """compile=True on a CPU: a batch decodes through a static-cache decoder whose whole step is compiled
    (cuda_graphs), with the same tokens and logits as eager decoding, greedy and sampled."""
    from glassgpt.cuda_graphs import DECODERS

    config = CONFIGS["verdict-162m"]
    model = random_model(config)
    ids = random_ids(config, 2, 5, seed=5)
    tokens, logits = decode_with_logits(model, ids, 20, compile=True)
    expected_tokens, expected_logits = decode_with_logits(model, ids, 20)
    assert tokens == expected_tokens
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    pools = model.__dict__[DECODERS.attribute]
    assert list(pools) == [(2, True, 32)]  # batch 2, compiled, a cache of min(context 32, 128) slots
    decoder = pools[(2, True, 32)].idle[0]
    assert decoder._compiled is not None and not decoder.use_graph
    sampled = dict(temperature=0.9, top_k=20, seed=3)
    assert decode_with_logits(model, ids, 20, compile=True, **sampled)[0] == decode_with_logits(
        model, ids, 20, **sampled)[0]


@needs_cpu_step
def test_compiled_cpu_decoding_of_int8_and_bf16_models_keeps_their_tokens():
    """int8 layers trace into the compiled step; and the step reads the weights as they are now: a
    change in place (a training step, say) is decoded with, never the weights it was compiled with."""
    from glassgpt.int8 import quantize_int8

    config = CONFIGS["gpt2"]
    ids = random_ids(config, 2, 5, seed=6)
    int8 = quantize_int8(random_model(config))
    assert decode_with_logits(int8, ids, 16, compile=True)[0] == decode_with_logits(int8, ids, 16)[0]

    bf16 = random_model(config).to(torch.bfloat16)
    tokens, logits = decode_with_logits(bf16, ids, 16, compile=True)
    expected_tokens, expected_logits = decode_with_logits(bf16, ids, 16)
    assert tokens == expected_tokens
    torch.testing.assert_close(logits, expected_logits, atol=0.05, rtol=0)
    with torch.no_grad():
        bf16.out_head.weight.mul_(-1)           # in place: same memory, new numbers
    assert decode_with_logits(bf16, ids, 16, compile=True)[0] == decode_with_logits(bf16, ids, 16)[0]


@needs_cpu_step
def test_compile_leaves_a_single_sequence_to_the_faster_one_call_step(monkeypatch):
    """A batch of one that `cpu_step` serves compiles nothing: its one-call step is the faster one."""
    import glassgpt.cuda_graphs as cuda_graphs
    from glassgpt.cuda_graphs import DECODERS

    def no_compiling(*args, **kwargs):
        raise AssertionError("compile=True compiled a step that the one-call step serves")

    monkeypatch.setattr(cuda_graphs.torch, "compile", no_compiling)
    config = CONFIGS["gpt2"]
    model = random_model(config)
    ids = random_ids(config, 1, 5, seed=7)
    tokens, logits = decode_with_logits(model, ids, 12, compile=True)
    expected_tokens, expected_logits = decode_with_logits(model, ids, 12)
    assert tokens == expected_tokens and torch.equal(logits, expected_logits)
    assert DECODERS.attribute not in model.__dict__
