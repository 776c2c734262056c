"""The GPU fast paths compute what the readable model computes.

The static KV cache and the graphed decoder's logic run on the CPU too (CI has no GPU); the tests
marked `gpu` need CUDA and skip cleanly without it: compiled training forward, compiled +
graph-captured decoding, both against eager, on random weights.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, random_model

from glassgpt import get_preset
from glassgpt.cuda_graphs import GraphedDecoder, StaticKVCache, static_forward
from glassgpt.generate import generate

SMALL = get_preset("gpt2", vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def exact_fp32():
    """fp32 matrix products without TF32 for references (restored afterwards)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("fused", [True, False])
def test_static_cache_decoding_equals_full_forward(fused):
    model = random_model(SMALL).set_fused(fused)
    ids = random_ids(SMALL, 2, 20, seed=1)
    with torch.no_grad():
        full = model(ids)
        cache = StaticKVCache.for_model(model, batch_size=2, max_length=24)
        # A prefill, a chunk after a cached prefix, then one token at a time.
        pieces = [static_forward(model, ids[:, :7], cache), static_forward(model, ids[:, 7:10], cache)]
        pieces += [static_forward(model, ids[:, t:t + 1], cache) for t in range(10, 20)]
    assert int(cache.length) == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    # Unwritten slots stay hidden after a reset, whatever they hold.
    cache.reset()
    with torch.no_grad():
        again = static_forward(model, ids[:, :5], cache)
    torch.testing.assert_close(again, full[:, :5], atol=1e-5, rtol=1e-5)


def test_decoder_without_graph_is_greedy_generation():
    model = random_model(SMALL, spread=0.3)
    ids = random_ids(SMALL, 3, 5, seed=2)
    decoder = GraphedDecoder(model, batch_size=3, max_length=30, compile=False)
    expected = generate(model, ids, 25)
    assert torch.equal(decoder.generate(ids, 25), expected)
    assert torch.equal(decoder.generate(ids, 25), expected)  # a second sequence reuses the cache


def test_decoder_refuses_what_does_not_fit():
    decoder = GraphedDecoder(random_model(SMALL), batch_size=1, max_length=10, compile=False)
    with pytest.raises(ValueError, match="exceed"):
        decoder.generate(torch.zeros(1, 5, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="shape"):
        decoder.generate(torch.zeros(2, 5, dtype=torch.long), 3)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.step()


# GPT-2 small's widths and vocabulary, fewer blocks: the real kernels at a quick compile.
GPU_CONFIG = get_preset("gpt2", n_layers=4)


@pytest.mark.gpu
@needs_cuda
def test_compiled_bf16_training_forward_matches_eager(exact_fp32):
    model = random_model(GPU_CONFIG, device="cuda").train()
    ids = torch.randint(0, GPU_CONFIG.vocab_size, (4, 257), device="cuda")
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def loss_and_logits(forward):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()), logits

    with torch.no_grad():
        eager_loss, eager = loss_and_logits(model)                   # the same bf16 autocast, eager
        fp32 = model(inputs)
    loss, logits = torch.compile(loss_and_logits)(model)
    print(f"compiled vs eager bf16: {relative_error(logits, eager):.2e}; "
          f"eager bf16 vs fp32: {relative_error(eager, fp32):.2e}")
    assert relative_error(logits, eager) < 1e-2
    assert abs(loss.item() - eager_loss.item()) < 1e-2 * eager_loss.item()
    loss.backward()  # the compiled backward runs and reaches every parameter
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@needs_cuda
def test_training_loss_on_the_gpu_padded_head_equals_the_logits_loss(exact_fp32):
    """On CUDA `model(ids, targets=...)` pads the 50,257-token head to 50,304 with -inf logits;
    fp32 loss and gradients equal those of the plain logits, eager and compiled (bf16)."""
    ids = torch.randint(0, GPU_CONFIG.vocab_size, (2, 129), device="cuda")
    inputs, targets = ids[:, :-1], ids[:, 1:]
    results = []
    for use_targets in (True, False):
        model = random_model(GPU_CONFIG, device="cuda").train()
        loss = (model(inputs, targets=targets) if use_targets
                else F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(grad_a, grad_b, atol=1e-5, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compiled = torch.compile(lambda: model(inputs, targets=targets))()
    assert abs(compiled.item() - loss_b.item()) < 1e-2 * loss_b.item()


@pytest.mark.gpu
@needs_cuda
def test_graphed_decoder_greedy_equals_eager_for_50_tokens(exact_fp32):
    # fp32 without TF32, so near-ties between logits cannot flip a greedy choice.
    model = random_model(GPU_CONFIG, device="cuda")
    ids = torch.randint(0, GPU_CONFIG.vocab_size, (2, 16), device="cuda")
    expected = generate(model, ids, 50)
    decoder = GraphedDecoder(model, batch_size=2, max_length=66)
    assert torch.equal(decoder.generate(ids, 50), expected)
    assert torch.equal(decoder.generate(ids, 50), expected)  # replaying the captured graph again


@pytest.mark.gpu
@needs_cuda
def test_graphed_decoder_bf16_logits_match_eager(exact_fp32):
    # Weight matrices at GPT-2's initial scale: with every matrix perturbed too, this 4-block model
    # amplifies rounding so much that eager bf16 itself lands 1.5e-2 from fp32.
    model = random_model(GPU_CONFIG, device="cuda", matrices=False).to(torch.bfloat16)
    ids = torch.randint(0, GPU_CONFIG.vocab_size, (2, 16), device="cuda")
    decoder = GraphedDecoder(model, batch_size=2, max_length=80)
    # Decode 60 tokens, keeping the logits of every step, then score the same sequence eagerly.
    step_logits = [decoder.prefill(ids).clone()]
    tokens = [decoder.token.clone()]
    for _ in range(59):
        step_logits.append(decoder.step().clone())
        tokens.append(decoder.token.clone())
    step_logits = torch.stack(step_logits, dim=1)                    # (2, 60, vocab)
    sequence = torch.cat([ids, *tokens], dim=1)                      # (2, 16 + 60)
    with torch.no_grad():
        eager = model(sequence[:, :-1])[:, 15:]                      # logits that picked each new token
        fp32 = random_model(GPU_CONFIG, device="cuda", matrices=False)(sequence[:, :-1])[:, 15:]
    print(f"graphed vs eager bf16: {relative_error(step_logits, eager):.2e}; "
          f"eager bf16 vs fp32: {relative_error(eager, fp32):.2e}")
    assert relative_error(step_logits, eager) < 1e-2
    # The tokens are the argmax of the logits the graph returned.
    assert torch.equal(step_logits.argmax(-1), sequence[:, 16:])
