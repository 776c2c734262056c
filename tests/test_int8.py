"""glassgpt.int8: weight-only int8 computes the model whose weights are `q * scale`, and stays within
the rounding bound of the float32 model.

Two references: the dequantised float32 model (`dequantized_model`, PyTorch's own float32 kernels),
which the int8 kernels must equal to float32 rounding; and PyTorch's own int8 weight-only kernel
(`aten._weight_int8pack_mm`, an independent implementation of `x @ q.T * scale`).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, random_model

import glassgpt.int8 as int8
from glassgpt import cpu_kernels, get_preset
from glassgpt.generate import generate
from glassgpt.int8 import Int8Linear, dequantized_model, quantize_int8, quantize_rows

CONFIG = get_preset("gpt2", vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2)


def test_rows_round_to_the_nearest_of_255_levels_of_their_own_scale():
    weight = torch.randn(40, 64) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different sizes
    weight[3] = 0
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale.shape == (40,)
    torch.testing.assert_close(scale[:3], weight[:3].abs().amax(dim=1) / 127)
    assert torch.all(q[3] == 0) and scale[3] == 1
    error = (q.float() * scale[:, None] - weight).abs()
    assert torch.all(error <= scale[:, None] / 2 * (1 + 1e-5))  # half a step, row by row


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("bias", [True, False])
def test_a_layer_equals_the_dequantised_linear_and_pytorchs_int8_kernel(rows, bias):
    linear = torch.nn.Linear(96, 80, bias=bias)
    layer = Int8Linear.from_linear(linear, compile=False)
    x = torch.randn(1, rows, 96)
    with torch.inference_mode():
        out = layer(x)
        expected = F.linear(x, layer.dequantized_weight(), layer.bias)
        theirs = torch.ops.aten._weight_int8pack_mm(x[0], layer.weight_int8, layer.scale)
        if bias:
            theirs = theirs + linear.bias
        exact = linear(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], theirs, atol=1e-5, rtol=1e-5)
    # The error bound: each weight is off by at most half its row's step.
    bound = x.abs().sum(-1, keepdim=True) * layer.scale / 2
    assert torch.all((out - exact).abs() <= bound + 1e-6)


def test_the_compiled_one_row_kernel_equals_the_dequantised_linear():
    layer = Int8Linear.from_linear(torch.nn.Linear(128, 72))
    x = torch.randn(1, 1, 128)
    with torch.inference_mode():
        torch.testing.assert_close(int8.compiled_int8_matvec(x, layer.weight_int8, layer.scale, layer.bias),
                                   F.linear(x, layer.dequantized_weight(), layer.bias), atol=1e-5, rtol=1e-5)
        with torch.autograd.profiler.profile() as prof:
            layer(x)
    eager = ("aten::linear", "aten::addmm", "aten::mm")
    assert not any(event.name in eager for event in prof.function_events)


def test_an_int8_model_computes_the_dequantised_model_and_decodes_its_tokens():
    model = random_model(CONFIG)
    quantised = quantize_int8(random_model(CONFIG))  # the same seed: the same weights
    plain = dequantized_model(quantised)
    assert isinstance(quantised.out_head, Int8Linear) and isinstance(plain.out_head, torch.nn.Linear)
    ids = random_ids(CONFIG, 1, 6, seed=4)
    expected = generate(plain, ids, 20)
    assert torch.equal(generate(quantised, ids, 20), expected)  # one-row steps: the compiled kernel
    with torch.inference_mode():
        torch.testing.assert_close(quantised(expected), plain(expected), atol=1e-5, rtol=1e-5)
        # And the distance to the float32 model is the rounding's: small against the logits' size.
        reference = model(expected)
        drift = (quantised(expected) - reference).abs().max() / reference.abs().max()
        print(f"int8 drift {drift:.4f}")
    assert 0 < drift < 0.02


def test_the_head_can_stay_float32_and_bad_models_are_refused():
    model = quantize_int8(random_model(CONFIG), head=False)
    assert isinstance(model.out_head, torch.nn.Linear) and isinstance(model.blocks[0].ff.expand, Int8Linear)
    assert model.out_head.weight is model.tok_emb.weight  # still tied
    with pytest.raises(ValueError, match="fp32 model on the CPU"):
        quantize_int8(random_model(CONFIG).to(torch.bfloat16))
    with pytest.raises(TypeError, match="float32 inputs"):
        model.blocks[0].ff.expand(torch.randn(1, 1, 32, dtype=torch.bfloat16))


def test_a_machine_where_compiling_fails_still_decodes_int8(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(int8, "compiled_int8_matvec", broken)
    monkeypatch.setattr(int8.COMPILED, "failure", None)
    monkeypatch.setattr(cpu_kernels, "build", broken)  # glassgpt's own kernels are built by the same compiler
    monkeypatch.setattr(cpu_kernels, "_BUILT", {})
    model = quantize_int8(random_model(CONFIG))
    ids = random_ids(CONFIG, 1, 4, seed=3)
    with pytest.warns(RuntimeWarning, match="No working C\\+\\+ compiler found"):
        out = generate(model, ids, 6)
    assert torch.equal(out, generate(dequantized_model(model), ids, 6))
