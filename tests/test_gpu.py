"""The GPU fast paths compute what the readable model computes.

The static KV cache and the graphed decoder's logic run on the CPU too (CI has no GPU); the tests
marked `gpu` need CUDA and skip cleanly without it: compiled training forward, compiled +
graph-captured decoding, both against eager, on random weights.
"""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, random_model

from glassgpt import get_preset
from glassgpt.cuda_graphs import GraphedDecoder, StaticKVCache, static_forward
from glassgpt.generate import generate, iter_tokens

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


# ---------------------------------------------------------------- generate's graphed path
# On CUDA, `generate` decodes through a borrowed GraphedDecoder for every sampling mode. The
# decoder runs its step without a graph on the CPU, so the path's logic is tested here by
# letting `_graphed` choose it on the CPU too; the GPU tests below replay real graphs.

@pytest.fixture
def graphed_on_cpu(monkeypatch):
    import glassgpt.generate as generate_module
    chosen = []

    def graphed(model, batch, total_length, attention_mask, use_cache, compile):
        choice = use_cache and attention_mask is None and total_length - 1 <= model.config.context_length
        chosen.append(choice)
        return choice

    monkeypatch.setattr(generate_module, "_graphed", graphed)
    return chosen


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.9, "seed": 3},
                                      {"temperature": 1.3, "top_k": 7, "seed": 4},
                                      {"temperature": 0.7, "top_p": 0.8, "seed": 5}])
def test_generate_through_the_decoder_equals_eager_for_every_sampling_mode(graphed_on_cpu, settings):
    model = random_model(SMALL, spread=0.3)
    ids = random_ids(SMALL, 2, 6, seed=6)
    eager = generate(model, ids, 20, use_cache=True, attention_mask=torch.ones_like(ids), **settings)
    assert graphed_on_cpu == [False]                   # a mask keeps the eager path
    seen = []
    tokens = list(iter_tokens(model, ids, 20, observe=lambda logits, _: seen.append(logits.clone()),
                              **settings))
    assert graphed_on_cpu == [False, True]
    assert torch.equal(torch.cat([ids, torch.stack(tokens, dim=1)], dim=1), eager)
    with torch.no_grad():  # the observed logits are those of the whole sequence's forward pass
        full = model(eager[:, :-1])[:, 5:]
    torch.testing.assert_close(torch.stack(seen, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generate_ends_rows_at_eos_through_the_decoder(graphed_on_cpu):
    model = random_model(SMALL, spread=0.3)
    ids = random_ids(SMALL, 1, 4, seed=7)
    eager = generate(model, ids, 15, attention_mask=torch.ones_like(ids))
    eos = int(eager[0, 8])                              # a token greedy decoding produces
    ended = list(iter_tokens(model, ids[0], 15, eos_id=eos))
    assert graphed_on_cpu[-1] is True
    new = eager[0, 4:].tolist()
    assert ended == new[:new.index(eos) + 1]            # up to and including the first eos


def test_busy_decoders_and_moved_weights(graphed_on_cpu, monkeypatch):
    from glassgpt.cuda_graphs import DECODERS
    model = random_model(SMALL, spread=0.3)
    ids = random_ids(SMALL, 1, 5, seed=8)
    expected = generate(model, ids, 10, attention_mask=torch.ones_like(ids))
    monkeypatch.setattr(DECODERS, "per_key", 2)
    with DECODERS.borrow(model, 1, False) as first, DECODERS.borrow(model, 1, False) as second:
        assert first is not None and second is not None and first is not second  # one per sequence
        with DECODERS.borrow(model, 1, False) as third:
            assert third is None                                  # past per_key: decode eagerly
            assert torch.equal(generate(model, ids, 10), expected)
    with DECODERS.borrow(model, 1, False) as again:
        assert again in (first, second)                           # given back, then reused
    model.to(torch.float64).to(torch.float32)                     # the parameters move: capture afresh
    with DECODERS.borrow(model, 1, False) as fresh:
        assert fresh not in (first, second)
    assert torch.equal(generate(model, ids, 10), expected)
    # The decoders live on the model, and copies of the model start without them.
    assert copy.deepcopy(model).__dict__[DECODERS.attribute] == {}
    dead = weakref.ref(model)
    del model, first, second, again, fresh, third
    gc.collect()
    assert dead() is None                                         # no global table keeps it alive


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("settings", [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 11},
                                      {"temperature": 1.0, "top_k": 50, "seed": 12}])
def test_generate_on_cuda_replays_a_graph_and_equals_eager(exact_fp32, monkeypatch, settings):
    import glassgpt.generate as generate_module
    from glassgpt.cuda_graphs import DECODERS
    model = random_model(GPU_CONFIG, device="cuda", matrices=False)
    ids = torch.randint(0, GPU_CONFIG.vocab_size, (1, 16), device="cuda")
    graphed = generate(model, ids, 40, **settings)
    with DECODERS.borrow(model, 1, False) as decoder:
        assert decoder.graph is not None                 # generate captured and replayed it
    monkeypatch.setattr(generate_module, "_graphed", lambda *args: False)
    eager = generate(model, ids, 40, **settings)
    # Same seed, same generator draws, logits equal to float rounding: the same tokens.
    assert torch.equal(graphed, eager)


def test_the_static_cache_takes_keys_computed_under_autocast():
    """A trainer samples its fp32 model under bf16 autocast: the static cache stores the bf16 keys in
    its own dtype, as the eager cache does, and the greedy tokens are the eager ones under autocast."""
    from glassgpt.cuda_graphs import GraphedDecoder

    model = random_model(SMALL, spread=0.3).eval()
    ids = random_ids(SMALL, 1, 5, seed=9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = GraphedDecoder(model, max_length=16, compile=False)
        graphed = decoder.generate(ids, 6)
        eager = generate(model, ids, 6, attention_mask=torch.ones_like(ids))
    assert decoder.cache.layers[0].keys.dtype == torch.float32
    assert torch.equal(graphed, eager)
