"""The model's components and whole: both attention paths agree, the tutorial's numbers come out (the
book "Build a Large Language Model (From Scratch)", chapters 3 and 4; see the README), bad input is
refused."""

import math

import pytest
import torch
from conftest import random_ids, random_model

from glassgpt import GPT, get_preset
from glassgpt.inspect import record_attention
from glassgpt.model import GELU, LayerNorm, MultiHeadAttention

# One small model per preset family: the same switches (norm placement, activation, biases, tying,
# final norm) at a size that runs in milliseconds.
FAMILIES = {
    "tinygpt": get_preset("tinygpt"),
    "nano": get_preset("nano", vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                       ff_dim=64),
    "gpt2": get_preset("gpt2", vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2),
    "verdict-162m": get_preset("verdict-162m", vocab_size=97, context_length=16, emb_dim=32, n_heads=4,
                               n_layers=2, drop_rate=0.0),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_explicit_and_fused_paths_agree_in_outputs_and_gradients(family):
    config = FAMILIES[family]
    ids = random_ids(config, 3, config.context_length)
    results = []
    for fused in (True, False):
        model = random_model(config).set_fused(fused)
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused_logits, fused_grads), (explicit_logits, explicit_grads) = results
    torch.testing.assert_close(fused_logits, explicit_logits, atol=1e-5, rtol=1e-5)
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], explicit_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_decoding_equals_full_forward(family, fused):
    config = FAMILIES[family]
    model = random_model(config).set_fused(fused)
    n = config.context_length
    ids = random_ids(config, 2, n)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2)
        prefill = n // 2 if n > 2 else 1
        pieces = [model(ids[:, :prefill], cache=cache)]
        # A chunk of several tokens after a cached prefix exercises the offset causal mask...
        pieces.append(model(ids[:, prefill:prefill + 2], cache=cache))
        # ...then one token at a time, as decoding does.
        for t in range(prefill + 2, n):
            pieces.append(model(ids[:, t:t + 1], cache=cache))
    assert cache.length == n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [1, 3])
def test_logits_to_keep_gives_the_last_positions_logits(keep):
    config = FAMILIES["gpt2"]
    model = random_model(config)
    ids = random_ids(config, 2, 6)
    with torch.no_grad():
        full = model(ids)
        kept = model(ids, logits_to_keep=keep)
    assert kept.shape == (2, keep, config.vocab_size)
    torch.testing.assert_close(kept, full[:, -keep:], atol=1e-6, rtol=1e-6)


def test_cache_refuses_wrong_batch_and_overflow():
    config = FAMILIES["gpt2"]
    model = random_model(config)
    cache = model.new_cache(batch_size=1)
    with pytest.raises(ValueError, match="batch size"):
        model(random_ids(config, 2, 3), cache=cache)
    model(random_ids(config, 1, config.context_length), cache=cache)
    with pytest.raises(ValueError, match="context length"):
        model(random_ids(config, 1, 1), cache=cache)
    cache.reset()
    assert cache.length == 0
    model(random_ids(config, 1, 1), cache=cache)


def test_input_longer_than_context_is_a_clear_error():
    config = FAMILIES["gpt2"]
    model = random_model(config)
    with pytest.raises(ValueError, match="context length of 16"):
        model(random_ids(config, 1, 17))


@pytest.mark.parametrize("bad", [torch.zeros(5, dtype=torch.long), torch.zeros(1, 4),
                                 torch.zeros(1, 0, dtype=torch.long)])
def test_bad_ids_are_a_clear_error(bad):
    with pytest.raises(ValueError, match="ids|token"):
        random_model(FAMILIES["gpt2"])(bad)


def test_attention_weights_are_causal_distributions():
    config = FAMILIES["gpt2"]
    model = random_model(config)
    logits, weights = record_attention(model, random_ids(config, 2, 10))
    assert logits.shape == (2, 10, config.vocab_size)
    assert len(weights) == config.n_layers
    for w in weights:
        assert w.shape == (2, config.n_heads, 10, 10)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, config.n_heads, 10))
        assert torch.all(w.triu(diagonal=1) == 0)
    torch.testing.assert_close(logits, model(random_ids(config, 2, 10)), atol=1e-5, rtol=1e-5)


def test_layernorm_explicit_matches_torch_and_normalises():
    torch.manual_seed(123)
    x = torch.randn(2, 5)
    ours = LayerNorm(5)
    ours.fused = False
    reference = torch.nn.LayerNorm(5)
    torch.testing.assert_close(ours(x), reference(x))
    out = ours(x)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    # The tutorial's first row: torch.manual_seed(123); torch.randn(2, 5) normalised.
    torch.testing.assert_close(out[0], torch.tensor([0.5528, 1.0693, -0.0223, 0.2656, -1.8654]),
                               atol=1e-4, rtol=0)


def test_gelu_explicit_matches_tanh_approximation():
    x = torch.linspace(-6, 6, 1001)
    explicit = GELU()
    explicit.fused = False
    torch.testing.assert_close(explicit(x), torch.nn.functional.gelu(x, approximate="tanh"))
    assert explicit(torch.tensor(-1.0)).item() == pytest.approx(-0.1588, abs=1e-4)  # not zero, unlike ReLU


# The tutorial's six 3-d embeddings of "Your journey starts with one step".
INPUTS = torch.tensor([
    [0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
    [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55],
])


def test_attention_without_trainable_weights_matches_the_tutorial():
    weights = torch.softmax(INPUTS @ INPUTS.T, dim=-1)
    context = weights @ INPUTS
    torch.testing.assert_close(weights[1], torch.tensor([0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(context[1], torch.tensor([0.4419, 0.6515, 0.5683]), atol=1e-4, rtol=0)
    torch.testing.assert_close(context[0], torch.tensor([0.4421, 0.5931, 0.5790]), atol=1e-4, rtol=0)


def test_causal_mask_softmax_rows_sum_to_one_with_zeros_above_diagonal():
    scores = INPUTS @ INPUTS.T
    mask = MultiHeadAttention.causal_mask(6, 6, start=0, device="cpu")
    weights = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))
    assert torch.all(weights.triu(diagonal=1) == 0)
    assert weights[0, 0] == 1.0


def test_multihead_attention_matches_the_tutorial_numbers():
    # Two heads splitting one projection, d_in 3, d_out 2, created right after manual_seed(123):
    # the fused qkv matrix draws the same numbers as separate query, key, value projections.
    torch.manual_seed(123)
    mha = MultiHeadAttention(d_in=3, d_out=2, n_heads=2, dropout=0.0, qkv_bias=False).eval()
    batch = torch.stack([INPUTS, INPUTS])
    out = mha(batch)
    assert out.shape == (2, 6, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.3190, 0.4858]), atol=1e-4, rtol=0)


def test_meta_device_build_of_the_largest_preset():
    with torch.device("meta"):
        model = GPT.from_preset("gpt2-xl")
    assert model.tok_emb.weight.is_meta
    assert model.num_parameters() == 1_557_611_200


def test_weight_tying_shares_the_matrix():
    model = GPT(FAMILIES["gpt2"])
    assert model.out_head.weight is model.tok_emb.weight
    assert GPT(FAMILIES["verdict-162m"]).out_head.weight is not GPT(FAMILIES["verdict-162m"]).tok_emb.weight


def test_fresh_model_predicts_near_uniform():
    # GPT-2's small initialisation: before training the loss is close to ln(vocab).
    config = get_preset("nano", context_length=32)
    torch.manual_seed(0)
    model = GPT(config).eval()
    ids = random_ids(config, 2, 32)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
    assert abs(loss.item() - math.log(10_000)) < 0.1


def test_dropout_only_in_training_mode():
    config = FAMILIES["gpt2"].replace(drop_rate=0.5)
    model = random_model(config)
    ids = random_ids(config, 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids))
        model.train()
        assert not torch.allclose(model(ids), model(ids))



@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_from_targets_equals_cross_entropy_of_logits_in_value_and_gradients(family):
    """`model(ids, targets=...)`, the trainer's path, is the textbook loss on the logits."""
    config = FAMILIES[family]
    ids = random_ids(config, 3, config.context_length)
    targets = random_ids(config, 3, config.context_length, seed=2)
    results = []
    for use_targets in (True, False):
        model = random_model(config).train()
        torch.manual_seed(5)  # the same dropout masks in both runs
        if use_targets:
            loss = model(ids, targets=targets)
        else:
            loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    assert loss_a.item() > 0.5 * math.log(config.vocab_size)  # a real loss, not a trivial zero
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_vocabulary_head_changes_neither_loss_nor_gradients(family):
    """The GPU's head padded to a multiple of 64 (97 -> 128 here) with -inf logits is exact."""
    config = FAMILIES[family]
    model = random_model(config)
    targets = random_ids(config, 2, 8, seed=2)
    hidden = torch.randn(2, 8, config.emb_dim, generator=torch.Generator().manual_seed(3))
    results = []
    for pad_vocab_to in (1, 64):
        model.zero_grad()
        leaf = hidden.clone().requires_grad_()
        loss = model.next_token_loss(leaf, targets, pad_vocab_to=pad_vocab_to)
        loss.backward()
        head = model.out_head
        results.append((loss.detach(), leaf.grad, head.weight.grad.clone(),
                        None if head.bias is None else head.bias.grad.clone()))
    assert torch.isfinite(results[1][0])
    for unpadded, padded in zip(*results, strict=True):
        if unpadded is not None:
            assert padded.shape == unpadded.shape  # the padding never leaks out
            torch.testing.assert_close(padded, unpadded, atol=1e-6, rtol=1e-5)
