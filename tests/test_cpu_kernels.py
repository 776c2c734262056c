"""glassgpt.cpu_kernels: each compiled path of the one-row kernels equals PyTorch's product.

The references are PyTorch's own: `F.linear` in float32 (for the fp32 kernel), on the dequantised int8
weight (`q * scale`) and on the bf16 values widened. The fp32 and int8 kernels must match to float32
rounding; the bf16
kernel accumulates in float32 and rounds once, so it must lie within half a bf16 step of the float32
result (and within a step of PyTorch's own bf16 product). Every instruction-set path this processor
can run is built and checked (AVX-512 with bf16 dot products, AVX-512, AVX2, plain C++), so the paths
other processors take are proven here too.
"""

import platform

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, random_model

import glassgpt.int8 as int8
from glassgpt import cpu_kernels, get_preset
from glassgpt.generate import iter_tokens
from glassgpt.int8 import quantize_rows

X86 = platform.machine().lower() in ("x86_64", "amd64")
FLAGS = set(cpu_kernels._cpu_flags().split())
# A path can run here when the processor has its instructions (the portable one runs everywhere).
RUNNABLE = {
    "native": True,
    "avx512": X86 and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= FLAGS,
    "avx2": X86 and {"avx2", "fma", "bmi2"} <= FLAGS,
    "portable": X86,
}
PATHS = [pytest.param(target, marks=pytest.mark.skipif(not runnable, reason=f"no {target} here"))
         for target, runnable in RUNNABLE.items()]
# Odd sizes reach every remainder: rows that do not fill a pass, columns the vector loops leave.
SHAPES = [(2304, 768), (37, 100), (1, 7), (3, 64)]
CONFIG = get_preset("gpt2", vocab_size=97, context_length=32, emb_dim=64, n_heads=4, n_layers=2)


def kernels(target: str):
    built = cpu_kernels.ops(target)
    if built is None:
        pytest.skip(f"glassgpt's CPU kernels are not built here: {cpu_kernels._BUILT[target]}")
    return built


@pytest.mark.parametrize("target", PATHS)
def test_each_path_reports_its_instruction_set(target):
    expected = {"avx512": "avx512", "avx2": "avx2", "portable": "portable"}
    built = kernels(target)
    assert built.namespace == cpu_kernels.namespace(target)
    if target in expected:
        assert built.instruction_set == expected[target]
    elif "avx512_bf16" in FLAGS:
        assert built.instruction_set == "avx512_bf16"


@pytest.mark.parametrize("target", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_matvec_equals_the_dequantised_float32_product(target, shape, bias):
    generator = torch.Generator().manual_seed(sum(shape))
    n_rows, k_size = shape
    q, scale = quantize_rows(torch.randn(n_rows, k_size, generator=generator))
    b = torch.randn(n_rows, generator=generator) if bias else None
    # One row (decoding), and a few (a short prompt, a batch): each weight row meets them all.
    for x_shape in ((k_size,), (1, 1, k_size), (3, k_size), (2, 5, k_size)):
        x = torch.randn(x_shape, generator=generator)
        out = kernels(target).int8_matvec(x, q, scale, b)
        expected = F.linear(x, q.float() * scale[:, None], b)
        assert out.shape == expected.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * k_size ** 0.5)


@pytest.mark.parametrize("target", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_f32_matvec_equals_pytorchs_product(target, shape, bias):
    generator = torch.Generator().manual_seed(sum(shape) + 2)
    n_rows, k_size = shape
    weight = torch.randn(n_rows, k_size, generator=generator)
    b = torch.randn(n_rows, generator=generator) if bias else None
    x = torch.randn(1, 1, k_size, generator=generator)
    out = kernels(target).f32_matvec(x, weight, b)
    expected = F.linear(x, weight, b)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * k_size ** 0.5)


@pytest.mark.parametrize("target", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_matvec_rounds_the_float32_product_once(target, shape, bias):
    generator = torch.Generator().manual_seed(sum(shape) + 1)
    n_rows, k_size = shape
    weight = torch.randn(n_rows, k_size, generator=generator).bfloat16()
    b = torch.randn(n_rows, generator=generator).bfloat16() if bias else None
    x = torch.randn(1, k_size, generator=generator).bfloat16()
    out = kernels(target).bf16_matvec(x, weight, b)
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    # Half a bf16 step (2^-8 relative), plus float32 accumulation's own rounding.
    assert bool(((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5 * k_size ** 0.5).all())
    theirs = F.linear(x, weight, b).double()
    assert bool(((out.double() - theirs).abs() <= exact.abs() * 2 ** -7 + 1e-5 * k_size ** 0.5).all())


def test_the_kernels_refuse_what_they_cannot_compute_with_clear_errors():
    built = kernels("native")
    q, scale = quantize_rows(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="one row"):
        built.bf16_matvec(torch.randn(2, 16).bfloat16(), torch.randn(8, 16).bfloat16(), None)
    with pytest.raises(RuntimeError, match="does not take rows of 12"):
        built.int8_matvec(torch.randn(12), q, scale, None)
    with pytest.raises(RuntimeError, match="float32 x, int8 q"):
        built.int8_matvec(torch.randn(16).double(), q, scale, None)
    with pytest.raises(RuntimeError, match="one scale per weight row"):
        built.int8_matvec(torch.randn(16), q, scale[:4], None)
    with pytest.raises(RuntimeError, match="bfloat16 tensors only"):
        built.bf16_matvec(torch.randn(16), torch.randn(8, 16).bfloat16(), None)
    with pytest.raises(RuntimeError, match="float32 tensors only"):
        built.f32_matvec(torch.randn(16), torch.randn(8, 16), torch.randn(8).double())
    with pytest.raises(RuntimeError, match="bias must be a contiguous vector of 8"):
        built.f32_matvec(torch.randn(16), torch.randn(8, 16), torch.randn(9))
    with pytest.raises(RuntimeError, match="contiguous"):
        built.bf16_matvec(torch.randn(16).bfloat16(), torch.randn(16, 8).bfloat16().t(), None)


def test_torch_compile_traces_the_kernels_into_a_graph():
    built = kernels("native")
    weight, x = torch.randn(64, 48).bfloat16(), torch.randn(1, 1, 48).bfloat16()

    def step(x):
        return torch.ops.glassgpt.bf16_matvec(F.layer_norm(x, (48,)), weight, None).relu()

    compiled = torch.compile(step, fullgraph=True)
    assert built is not None and torch.equal(compiled(x), step(x))


def kernel_calls(profile, name: str) -> int:
    return sum(event.count for event in profile.key_averages() if event.key == name)


def test_bf16_decoding_uses_the_kernels_and_matches_pytorchs_products(monkeypatch):
    """A bf16 model decodes through the kernels by default (one whole-step call per token, `cpu_step`)
    with the logits PyTorch's own bf16 operations give, to bf16 rounding; with the kernels off, decoding
    still works."""
    kernels("native")
    model = random_model(CONFIG).to(torch.bfloat16)
    ids = random_ids(CONFIG, 1, 5, seed=4)[0]

    def decode():
        steps = []
        tokens = list(iter_tokens(model, ids, 8, observe=lambda logits, _: steps.append(logits.float())))
        return tokens, torch.cat(steps)

    with torch.autograd.profiler.profile() as profile:
        tokens, logits = decode()
    assert kernel_calls(profile, "glassgpt::decode_step") == 7  # the one-token steps after the prompt
    monkeypatch.setattr(cpu_kernels, "_BUILT", {"native": "off for this test"})
    plain_tokens, plain_logits = decode()
    torch.testing.assert_close(logits, plain_logits, atol=0.05, rtol=0)
    assert tokens == plain_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_static_cache_decoder_steps_through_the_kernels(dtype, monkeypatch):
    """The step `compile=True` compiles (here run uncompiled, which is what its trace records) sends every
    one-row product to the kernels, with PyTorch's logits: fp32 to 1e-5, bf16 to its rounding."""
    from glassgpt.cuda_graphs import GraphedDecoder

    kernels("native")
    model = random_model(CONFIG).to(dtype)
    ids = random_ids(CONFIG, 1, 5, seed=4)

    def decode():
        decoder = GraphedDecoder(model, max_length=16, compile=False)
        steps = [decoder.prefill(ids).float().clone()]
        steps += [decoder.step().float().clone() for _ in range(6)]
        return torch.cat(steps)

    with torch.autograd.profiler.profile() as profile:
        logits = decode()
    name = "glassgpt::f32_matvec" if dtype == torch.float32 else "glassgpt::bf16_matvec"
    assert kernel_calls(profile, name) == 6 * (4 * CONFIG.n_layers + 1)
    monkeypatch.setattr(cpu_kernels, "_BUILT", {"native": "off for this test"})
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(logits, decode(), atol=tolerance, rtol=0)


def test_off_switch_and_a_missing_compiler_leave_pytorchs_kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_BUILT", {})
    monkeypatch.setenv("GLASSGPT_CPU_KERNELS", "0")
    assert cpu_kernels.ops() is None and "GLASSGPT_CPU_KERNELS=0" in cpu_kernels._BUILT["native"]

    def broken(target):
        raise RuntimeError("Error building extension\nc++: command not found")

    monkeypatch.setattr(cpu_kernels, "_BUILT", {})
    monkeypatch.delenv("GLASSGPT_CPU_KERNELS")
    monkeypatch.setattr(cpu_kernels, "build", broken)
    with pytest.warns(RuntimeWarning, match="could not be built \\(c\\+\\+: command not found\\)"):
        assert cpu_kernels.ops() is None
    assert cpu_kernels.ops() is None and cpu_kernels.loaded() is None  # answered at once, warned once


def test_only_a_first_build_says_it_is_compiling(capsys, monkeypatch):
    kernels("native")  # built by now: loading it again says nothing
    cpu_kernels.build("native")
    assert "compiling" not in capsys.readouterr().err
    monkeypatch.setattr(cpu_kernels, "_kept", lambda *args: False)
    cpu_kernels.build("native")
    assert "compiling its CPU kernels for this processor" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [1, 7, int8.KERNEL_ROWS, int8.KERNEL_ROWS + 1])
def test_an_int8_layer_sends_up_to_kernel_rows_to_the_kernel(rows):
    """Decoding, short prompts and small batches go to the kernel (weights read once for all rows);
    longer prompts widen the matrix for PyTorch's product. Both are the dequantised float32 layer."""
    kernels("native")
    layer = int8.Int8Linear.from_linear(torch.nn.Linear(96, 40))
    x = torch.randn(1, rows, 96)
    with torch.inference_mode(), torch.autograd.profiler.profile() as profile:
        out = layer(x)
    assert kernel_calls(profile, "glassgpt::int8_matvec") == (1 if rows <= int8.KERNEL_ROWS else 0)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
