"""glassgpt.cpu_step: the one-call decode step computes what the model computes, and decoding uses it only
where it does.

The reference is the model itself, stepping with its own cache: the step's logits must match to float32
rounding (1e-5) token after token, and the keys and values it writes into the cache too, in float32 and
for int8 layers (whose reference is the same int8 model, run layer by layer). Every config the step
takes is covered (biases or none, GELU or ReLU, a final norm or none, a long cache whose heads run on
several threads), and each thing it must not take falls back to the model.
"""

import pytest
import torch
from conftest import random_ids, random_model
from torch import nn

from glassgpt import cpu_kernels, cpu_step, get_preset
from glassgpt.generate import iter_tokens
from glassgpt.int8 import quantize_int8
from glassgpt.lora import apply_lora

CONFIG = get_preset("gpt2", vocab_size=97, context_length=32, emb_dim=64, n_heads=4, n_layers=2)
VARIANTS = {
    "gpt2": CONFIG,
    "no biases, relu, no final norm": get_preset(
        "gpt2", vocab_size=97, context_length=32, emb_dim=48, n_heads=3, n_layers=3, qkv_bias=False,
        attn_out_bias=False, ff_bias=False, activation="relu", final_norm=False, tie_weights=False),
    "head bias, odd widths": get_preset(
        "gpt2", vocab_size=101, context_length=32, emb_dim=36, n_heads=2, n_layers=1, ff_dim=70,
        head_bias=True, tie_weights=False),
}


@pytest.fixture(autouse=True)
def built():
    if cpu_kernels.ops() is None:
        pytest.skip(f"glassgpt's CPU kernels are not built here: {cpu_kernels._BUILT['native']}")


def stepped_both_ways(model, steps: int, prompt_length: int = 5):
    """The logits of `steps` greedy tokens after a prompt, from the model's own calls and from the step,
    each with its own cache (both prefilled by the model), and the two caches."""
    step = cpu_step.for_model(model)
    assert step is not None, cpu_step.unsupported(model)
    ids = random_ids(model.config, 1, prompt_length, seed=3)
    caches = model.new_cache(1), model.new_cache(1)
    with torch.inference_mode():
        for cache in caches:
            model(ids, cache=cache)
        token, plain, stepped = int(ids[0, -1]), [], []
        for _ in range(steps):
            plain.append(model(torch.tensor([[token]]), cache=caches[0]))
            stepped.append(step(token, caches[1]))
            token = int(plain[-1][0, -1].argmax())
    return torch.cat(plain), torch.cat(stepped), caches


@pytest.mark.parametrize("name", VARIANTS)
def test_the_step_computes_what_the_model_computes(name):
    model = random_model(VARIANTS[name]).eval()
    plain, stepped, (plain_cache, step_cache) = stepped_both_ways(model, steps=12)
    assert stepped.shape == plain.shape
    torch.testing.assert_close(stepped, plain, atol=1e-5, rtol=1e-5)
    assert plain_cache.length == step_cache.length == 5 + 12
    for ours, theirs in zip(step_cache.layers, plain_cache.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-5)


def test_a_long_cache_splits_the_heads_over_threads_and_still_matches():
    """From position 256 the heads of the attention run on several threads."""
    config = get_preset("gpt2", vocab_size=97, context_length=300, emb_dim=32, n_heads=4, n_layers=1)
    model = random_model(config).eval()
    plain, stepped, _ = stepped_both_ways(model, steps=10, prompt_length=250)
    torch.testing.assert_close(stepped, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", [True, False])
def test_int8_layers_step_as_the_int8_model_does(head):
    model = quantize_int8(random_model(CONFIG).eval(), head=head)
    plain, stepped, _ = stepped_both_ways(model, steps=8)
    torch.testing.assert_close(stepped, plain, atol=1e-5, rtol=1e-5)


def test_a_bf16_model_steps_as_it_does_rounding_where_it_rounds():
    """A bf16 model rounds every operation's result to bf16; the step rounds at the same points, so it
    differs only by the order of float32 sums inside them (tokens equal; logits within bf16's rounding)."""
    model = random_model(CONFIG).eval().to(torch.bfloat16)
    plain, stepped, (plain_cache, step_cache) = stepped_both_ways(model, steps=12)
    assert stepped.dtype == torch.bfloat16
    assert torch.equal(stepped.float().argmax(-1), plain.float().argmax(-1))
    torch.testing.assert_close(stepped.float(), plain.float(), atol=0.05, rtol=0)
    torch.testing.assert_close(step_cache.layers[-1].keys.float(), plain_cache.layers[-1].keys.float(),
                               atol=0.05, rtol=0)


def decode(model, n_tokens=8, **options):
    """Greedy tokens and their logits from `iter_tokens`, with the number of one-call steps it made."""
    calls, logits = [], []
    real = cpu_kernels.ops().decode_step

    def counted(*args):
        calls.append(1)
        return real(*args)

    original = cpu_step.CPUStep.__init__

    def init(self, model, kernels):
        original(self, model, kernels)
        self.decode_step = counted

    cpu_step.CPUStep.__init__ = init
    try:
        ids = options.pop("ids", random_ids(model.config, 1, 4, seed=1)[0])
        tokens = list(iter_tokens(model, ids, n_tokens, observe=lambda step, _: logits.append(step.clone()),
                                  **options))
    finally:
        cpu_step.CPUStep.__init__ = original
    return tokens, torch.cat(logits), len(calls)


def test_decoding_uses_the_step_and_gives_the_models_tokens(monkeypatch):
    model = random_model(CONFIG).train()  # generate decodes in eval mode, and then puts it back
    tokens, logits, calls = decode(model)
    assert calls == 7  # every token after the first (which the prompt's prefill gives)
    monkeypatch.setattr(cpu_step, "for_model", lambda model: None)
    plain_tokens, plain_logits, _ = decode(model)
    assert tokens == plain_tokens
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=1e-5)
    assert model.training


def test_what_the_step_does_not_compute_runs_the_model():
    model = random_model(CONFIG).eval()
    assert cpu_step.unsupported(model) is None
    handle = model.blocks[0].attn.register_forward_hook(lambda *args: None)
    assert "hooks" in cpu_step.unsupported(model)
    assert decode(model)[2] == 0  # (a hook that reads the model's insides still sees every token)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert "hooks" in cpu_step.unsupported(model)
    finally:
        handle.remove()

    assert "explicit" in cpu_step.unsupported(random_model(CONFIG).eval().set_fused(False))
    assert "pre-norm" in cpu_step.unsupported(random_model(get_preset("tinygpt")).eval())
    assert "bfloat16 model" in cpu_step.unsupported(random_model(CONFIG).eval().to(torch.float16))
    assert "training mode" in cpu_step.unsupported(random_model(CONFIG).train())
    partly = random_model(CONFIG).eval()
    partly.blocks[1].drop_resid.train()
    assert "training mode" in cpu_step.unsupported(partly)
    with_lora = apply_lora(random_model(CONFIG), rank=2).eval()
    assert "LoRA" in cpu_step.unsupported(with_lora)
    assert "Int8Linear" in cpu_step.unsupported(quantize_int8(random_model(CONFIG).eval(), compile=False))

    # Batches, padding and decoding without a cache run the model too.
    ids = random_ids(CONFIG, 2, 4, seed=5)
    assert decode(model, ids=ids)[2] == 0
    assert decode(model, ids=ids[:1], attention_mask=torch.ones(1, 4, dtype=torch.long))[2] == 0
    assert decode(model, use_cache=False)[2] == 0


def test_the_kernel_refuses_what_it_cannot_compute():
    model = random_model(CONFIG).eval()
    step = cpu_step.for_model(model)
    cache = model.new_cache(1)
    with pytest.raises(RuntimeError, match="out of range"):
        step(CONFIG.vocab_size, cache)
    with pytest.raises(RuntimeError, match="block entries"):
        step.blocks = step.blocks[:-1]
        step(0, cache)
    assert cache.length == 0
