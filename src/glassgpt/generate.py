"""Autoregressive generation: pick a next token from the logits, append it, feed it back.

Decoding uses the KV cache: the prompt is processed once (prefill), then each step computes only
the newest token. GPT-2's positions are learned absolute slots, so a cache cannot slide past the
context length: once prompt + generated tokens exceed it, every step recomputes the last
`context_length` tokens from scratch, exactly as the tutorial's no-cache loop does.
"""

from __future__ import annotations

import torch

from glassgpt.model import GPT


def check_sampling(temperature: float | None, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for settings that have no meaning."""
    if temperature is not None and (temperature != temperature or temperature < 0):
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus (top-p) of each row."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest set whose probability reaches top_p: a token stays if the tokens ranked
        # above it have not reached top_p yet (so the most likely token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float | None = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab). Temperature 0 or None is greedy."""
    if not temperature:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, ids: torch.Tensor, max_new_tokens: int, temperature: float | None = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """`ids` (B, T) with up to `max_new_tokens` new tokens appended.

    Greedy when temperature is 0; otherwise samples from softmax(logits / temperature) after top-k
    and top-p filtering. Generation stops early when every row has produced `eos_id` (the eos token
    itself is not appended; rows that finish earlier are padded with it).
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(seed)

    was_training = model.training
    model.eval()
    context = model.config.context_length
    cache = None
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        if use_cache and cache is not None and cache.length < context:
            logits = model(ids[:, -1:], cache=cache)               # decode: just the newest token
        elif use_cache and ids.shape[1] <= context:
            cache = model.new_cache(ids.shape[0])
            logits = model(ids, cache=cache)                        # prefill the whole prompt
        else:
            logits = model(ids[:, -context:])                       # past the context: recompute
        next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
            finished |= next_id == eos_id
            if bool(finished.all()):
                break
        ids = torch.cat([ids, next_id.unsqueeze(1)], dim=1)
    model.train(was_training)
    return ids
