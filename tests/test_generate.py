"""Generation: sampling rules, the KV-cache loop against recomputation, batches, streaming text.

The recomputing loop is the tutorial's `generate_text_simple` (the book "Build a Large Language
Model (From Scratch)"; see the README).
"""

import pytest
import torch

from glassgpt.config import GPTConfig
from glassgpt.generate import (
    check_sampling,
    detokenize_stream,
    filter_logits,
    generate,
    generate_text,
    iter_tokens,
    left_pad,
    sample_next,
    stream_text,
)
from glassgpt.model import GPT
from glassgpt.tokenizer import CharTokenizer, get_tokenizer


def small_model(context_length=16, vocab_size=50, seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=32, n_heads=4,
                       n_layers=2, name="test", **overrides)
    model = GPT(config).eval()
    # Larger weights than GPT-2's init make the logits peaked, so greedy ties are impossible.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(8.0 if parameter.dim() > 1 else 1.0)
    return model


def reference_loop(model: GPT, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The tutorial's loop: feed the last context_length tokens, take the argmax, append."""
    context = model.config.context_length
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(ids[:, -context:])
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids


# ---------------------------------------------------------------- sampling rules

def test_invalid_settings_raise_before_any_step():
    model = small_model()
    for bad in [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=0), dict(top_k=2.5),
                dict(top_p=0.0), dict(top_p=1.2), dict(top_p=-0.5)]:
        with pytest.raises(ValueError):
            check_sampling(bad.get("temperature"), bad.get("top_k"), bad.get("top_p"))
        with pytest.raises(ValueError):
            iter_tokens(model, [1, 2], 3, **bad)  # raises at the call, not at the first next()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2], -1)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [1, 50], 2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, torch.zeros((1, 0), dtype=torch.long), 2)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def kept(top_p):
        return torch.isfinite(filter_logits(logits, top_p=top_p))[0].tolist()

    assert kept(0.5) == [False, True, False, False]       # 0.5 alone reaches 0.5
    assert kept(0.79) == [False, True, False, True]       # 0.5 + 0.3 = 0.8 >= 0.79
    assert kept(0.81) == [False, True, True, True]        # needs 0.15 too: 0.95
    assert kept(0.96) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2))[0].tolist() == [False, True, True, False]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.79, generator=generator)
    share_of_1 = (draws == 1).float().mean().item()
    assert set(draws.unique().tolist()) == {1, 3}
    assert abs(share_of_1 - 0.5 / 0.8) < 0.02             # renormalised over the kept set


def test_top_k_1_equals_greedy_and_temperature_0_is_greedy():
    model = small_model()
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    greedy = generate(model, prompt, 12)
    assert torch.equal(generate(model, prompt, 12, temperature=1.3, top_k=1, seed=7), greedy)
    assert torch.equal(generate(model, prompt, 12, temperature=0.0, top_k=5, top_p=0.3), greedy)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = small_model()
    prompt = [3, 1, 4]
    first = generate(model, prompt, 20, temperature=1.0, seed=123)
    torch.manual_seed(999)  # the global generator must not matter
    again = generate(model, prompt, 20, temperature=1.0, seed=123)
    other = generate(model, prompt, 20, temperature=1.0, seed=124)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# ---------------------------------------------------------------- the decoding loop

def test_iter_tokens_yields_the_continuation_of_generate():
    model = small_model()
    out = generate(model, [3, 1, 4], 9)
    assert list(iter_tokens(model, [3, 1, 4], 9)) == out[0, 3:].tolist()
    assert all(isinstance(i, int) for i in iter_tokens(model, torch.tensor([3, 1, 4]), 2))


def test_cached_decoding_equals_recomputation_across_the_context_crop():
    model = small_model(context_length=8)
    prompt = torch.tensor([[7, 3, 9, 2, 5]])
    reference = reference_loop(model, prompt, 20)  # 25 tokens: crosses the context of 8 twice over
    assert torch.equal(generate(model, prompt, 20), reference)
    assert torch.equal(generate(model, prompt, 20, use_cache=False), reference)
    long_prompt = torch.randint(0, 50, (1, 11), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(model, long_prompt, 6), reference_loop(model, long_prompt, 6))


def test_cached_and_uncached_sampling_agree_with_a_seed():
    model = small_model(context_length=8)
    cached = generate(model, [1, 2, 3], 15, temperature=0.8, top_k=10, seed=5)
    uncached = generate(model, [1, 2, 3], 15, temperature=0.8, top_k=10, seed=5, use_cache=False)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_equals_each_prompt_alone():
    model = small_model(context_length=10)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1], [4, 2, 8]]
    batch = generate(model, prompts, 9)  # rows cross the context of 10 at different steps
    for prompt, row in zip(prompts, batch, strict=True):
        alone = reference_loop(model, torch.tensor([prompt]), 9)[0].tolist()
        assert row == alone
    ids, mask = left_pad(prompts)
    assert mask.tolist()[1] == [0, 0, 0, 0, 0, 0, 1]
    tensor_batch = generate(model, ids, 9, attention_mask=mask)
    assert tensor_batch[:, 7:].tolist() == [row[len(p):] for p, row in zip(prompts, batch, strict=True)]


def test_padded_batch_in_the_explicit_path_matches_the_fused_path():
    model = small_model(context_length=12)
    ids, mask = left_pad([[5, 6, 7, 8], [1, 2]])
    fused = model(ids, attention_mask=mask)
    explicit = model.set_fused(False)(ids, attention_mask=mask)
    model.set_fused(True)
    assert torch.allclose(fused, explicit, atol=1e-4)
    assert torch.isfinite(explicit).all()  # padding positions too


def test_eos_ends_each_row_and_the_batch():
    model = small_model()
    greedy = generate(model, [3, 1, 4], 10)[0, 3:].tolist()
    eos = greedy[4]
    stopped = generate(model, [[3, 1, 4]], 10, eos_id=eos)[0]
    assert stopped == [3, 1, 4] + greedy[:greedy.index(eos) + 1]
    assert list(iter_tokens(model, [3, 1, 4], 10, eos_id=eos)) == greedy[:greedy.index(eos) + 1]


def test_generation_leaves_training_mode_and_grad_mode_alone():
    model = small_model().train()
    steps = iter_tokens(model, [1, 2], 3)
    next(steps)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    list(steps)
    assert model.training


# ---------------------------------------------------------------- text and streaming

def test_streamed_pieces_never_split_a_character():
    tokenizer = get_tokenizer("gpt2")
    text = "Déjà vu 🙂 日本語のテキスト 🎉🎉 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces = list(detokenize_stream(tokenizer, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_strings_cut_the_text_and_are_held_back():
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .")
    ids = tokenizer.encode("hello world. more")
    assert "".join(detokenize_stream(tokenizer, ids, stop="o w")) == "hell"
    assert "".join(detokenize_stream(tokenizer, ids, stop=[".", "xyz"])) == "hello world"
    assert "".join(detokenize_stream(tokenizer, ids, stop="worlds")) == "hello world. more"
    pieces = list(detokenize_stream(tokenizer, ids, stop="wor"))
    assert pieces == list("hello ")  # "w" and "wo", possible starts of the stop, were never shown


def test_stream_text_joined_equals_the_decoded_continuation():
    tokenizer = get_tokenizer("gpt2")
    model = small_model(vocab_size=tokenizer.vocab_size, context_length=32)
    prompt = "Every effort moves you"
    pieces = list(stream_text(model, tokenizer, prompt, 24, temperature=2.0, seed=3))
    ids = generate(model, tokenizer.encode(prompt), 24, temperature=2.0, seed=3)[0].tolist()
    continuation = ids[len(tokenizer.encode(prompt)):]
    if tokenizer.eos_id in continuation:
        continuation = continuation[:continuation.index(tokenizer.eos_id)]
    assert "".join(pieces) == tokenizer.decode(continuation)
    assert generate_text(model, tokenizer, prompt, 24, temperature=2.0, seed=3) == "".join(pieces)
    with pytest.raises(ValueError):
        stream_text(model, tokenizer, prompt, 5, top_p=2.0)  # raises at the call


def test_stream_text_stops_at_a_stop_string_with_a_char_model():
    tokenizer = CharTokenizer("abcdefgh")
    model = small_model(vocab_size=tokenizer.vocab_size)
    full = generate_text(model, tokenizer, "abc", 12)
    assert len(full) == 12
    stop = full[5:7]
    assert generate_text(model, tokenizer, "abc", 12, stop=stop) == full[:full.index(stop)]


@pytest.mark.parametrize("temperature", [4e-295, 1e-12, 2e-5])
def test_tiny_temperatures_are_greedy_not_nan(temperature):
    # Found by the serving fuzz pass: logits / 4e-295 overflowed and softmax returned NaN.
    logits = torch.tensor([[1.0, 30.0, 2.0], [5.0, -3.0, 4.0]])
    assert sample_next(logits, temperature=temperature, top_p=0.5).tolist() == [1, 0]
