"""Autoregressive generation: pick a next token from the logits, append it, feed it back.

Decoding uses the KV cache: the prompt is processed once (prefill), then each step computes only
the newest token. GPT-2's positions are learned absolute slots, so a cache cannot slide past the
context length: once prompt + generated tokens exceed it, every step recomputes the last
`context_length` tokens from scratch, exactly as the tutorial's no-cache loop does
(`generate_text_simple` in the book "Build a Large Language Model (From Scratch)"; see the README).
That costs a whole window per token; `slide=s` caps it: the window moves s tokens at once, is
prefilled once, and the next s - 1 steps decode from the cache again (what the server does).

`Sampling` holds the settings (temperature, top-k, top-p, seed, end-of-text id, stop strings) as
one object; every function below takes it, or its fields by name. Three layers, each built on
the one before:
- `iter_tokens` yields next-token ids one step at a time (the decoding loop itself);
- `generate` collects them into the prompt ids (batches of prompts of different lengths too);
- `stream_text` turns them into text pieces, never splitting a UTF-8 character, and honours stop
  strings; `generate_text` joins those pieces.
"""

from __future__ import annotations

import codecs
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from glassgpt import cpu_step
from glassgpt.cuda_graphs import COMPILES_CPU_STEP, DECODERS
from glassgpt.fast import cpu_inference_kernels
from glassgpt.model import GPT


def check_sampling(temperature: float | None, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for settings that have no meaning."""
    if temperature is not None and (temperature != temperature or temperature < 0):
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@dataclass(frozen=True)
class Sampling:
    """How each next token is picked, and what ends a generation before `max_new_tokens`.

    Greedy when `temperature` is 0 (or None); otherwise sampled from softmax(logits / temperature)
    after top-k and top-p filtering, with a private generator seeded by `seed` (same seed, same
    text). `eos_id` ends a sequence when it is produced; `stop` strings end a text (`stream_text`,
    which also takes the tokenizer's end-of-text id when `eos_id` is None). Bad settings raise
    ValueError when the object is made, so before any step runs.
    """

    temperature: float | None = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_id: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        object.__setattr__(self, "stop", stop)  # one string or a list in, a tuple kept

    @classmethod
    def of(cls, sampling: Sampling | None = None, **settings) -> Sampling:
        """`sampling` (default: greedy) with the fields named in `settings` replaced.

        The keyword API's way in: `generate(model, ids, 20, temperature=0.8, seed=1)` and
        `generate(model, ids, 20, Sampling(temperature=0.8, seed=1))` are the same call.
        """
        if sampling is not None and not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__} "
                            f"(name the settings: temperature=..., top_k=...)")
        return replace(sampling or cls(), **settings)


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
        # A top_p below float32's smallest number rounds to 0 and would drop everything.
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


MIN_TEMPERATURE = 1e-5


def sample_next(logits: torch.Tensor, temperature: float | None = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab). Temperature 0 or None is greedy."""
    # Below float32's resolution, logits / temperature overflows and softmax turns into NaN;
    # such a temperature means greedy anyway.
    if not temperature or temperature < MIN_TEMPERATURE:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    logits = filter_logits(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    # Inverse-CDF sampling: one uniform number per row, found in the running sum of the
    # probabilities. Exact, like torch.multinomial, but one random draw instead of a pass of the
    # generator over the whole vocabulary (25x faster on a CPU for GPT-2's 50,257 tokens).
    # right=True picks the first token whose running sum exceeds u, so a token of probability 0
    # (filtered by top-k/top-p) is never chosen.
    cumulative = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cumulative[:, -1:]
    picked = torch.searchsorted(cumulative, u, right=True).clamp_(max=probs.shape[-1] - 1)
    return picked.squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (ids, attention_mask), both (B, longest), padded on the left.

    Left padding lines up every prompt's last token in the last column, so one decoding step
    serves the whole batch; the mask (1 real, 0 padding) keeps the padding out of the maths.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    return ids, mask


def _check_prompt(model: GPT, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Raise ValueError for prompts the model cannot read."""
    batch, prompt_length = ids.shape
    if prompt_length == 0:
        raise ValueError("the prompt needs at least one token")
    vocab_size = model.config.vocab_size
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise ValueError(f"prompt ids must lie in [0, {vocab_size}) for this model's vocabulary "
                         f"(is the tokenizer the one the model was made for?)")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, prompt_length):
            raise ValueError(f"attention_mask must have the shape of ids {(batch, prompt_length)}, "
                             f"got {tuple(attention_mask.shape)}")
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError("every row of attention_mask needs at least one real token")


def _model_call(model: GPT, compile: bool) -> Callable[..., torch.Tensor]:
    """The model call every decoding step makes, chosen once before the loop (which never knows).

    On a CPU, a decoded token of a batch of one is one call of the whole step in glassgpt's kernels
    where that computes what the model does (`glassgpt.cpu_step`); other one-token products go to
    glassgpt's own kernels through the model's own layers (`fast.Linear`); prompts' fp32 products go
    to multi-threaded kernels (see glassgpt.fast), and
    without glassgpt's kernels, compile=True sends one-token products to compiled ones. The kernel
    mode stays out of calls it would not change, sparing their operations its dispatch.
    """
    weight = model.tok_emb.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return model
    # A kernel mode holds no state, so these two serve every call (and every thread).
    one_row = cpu_inference_kernels(compile, rows=1, dtype=weight.dtype)
    several_rows = cpu_inference_kernels(compile, dtype=weight.dtype)
    steps = []  # the model's one-call decode step, looked for at the first decoded token (in eval mode)

    def call(fed: torch.Tensor, **inputs) -> torch.Tensor:
        cache = inputs.get("cache")
        if cpu_step.serves(cache, inputs.get("attention_mask"), fed):  # (one position: logits_to_keep=1)
            if not steps:
                steps.append(cpu_step.for_model(model))
            if steps[0] is not None:
                return steps[0](int(fed), cache)
        with one_row if fed.numel() == 1 else several_rows:
            return model(fed, **inputs)

    return call


def _graphed(model: GPT, batch: int, total_length: int, attention_mask: torch.Tensor | None, use_cache: bool,
             compile: bool) -> bool:
    """Whether decoding runs through a `cuda_graphs.GraphedDecoder`: a CUDA graph, or on a CPU with
    compile=True the whole step compiled once, except for a batch of one that `cpu_step` serves, whose
    one-call step is already faster than the compiled one, and compiles nothing.

    When the rows share their positions (no padding) and the sequence fits the context: the last
    new token is never fed back, so it needs no slot in the static cache.
    """
    device = _model_device(model).type
    compiled_cpu = (device == "cpu" and compile and COMPILES_CPU_STEP
                    and not (batch == 1 and cpu_step.for_model(model) is not None))
    return (use_cache and attention_mask is None and (device == "cuda" or compiled_cpu)
            and total_length - 1 <= model.config.context_length)


def _static_length(model: GPT, total_length: int) -> int | None:
    """The static cache a decoder gets: the context on a GPU (one graph serves every length); on a
    CPU, whose compiled step attends over every slot, the next power of two from 128 that holds the
    sequence (at most the context), so a short answer does not read a long cache each token."""
    if _model_device(model).type != "cpu":
        return None
    slots = total_length - 1  # the last new token is never fed back
    return min(model.config.context_length, max(128, 1 << (slots - 1).bit_length()))


def _decode_steps(model: GPT, forward: Callable[..., torch.Tensor], ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, max_new_tokens: int, sampling: Sampling,
                  use_cache: bool, observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                  compile: bool = False, slide: int = 1, cancelled=None) -> Iterator[torch.Tensor]:
    """The decoding loop on a checked (B, T) batch: yields each step's next ids (B,).

    `forward` is the model call (`_model_call`). Tokens live in one pre-allocated buffer (no growing
    concatenation); rows that produced `eos_id` keep yielding it, and the loop ends once every row
    has. Inference mode is entered per step, never held across a `yield`, so the caller's own code
    between steps is unaffected. `observe(logits, next_ids)`, if given, sees each step's
    last-position logits (B, vocab), the very ones the sampler picked from, before the step yields.
    On CUDA the model calls are replays of a captured graph where `_graphed` allows (the sampler,
    whichever it is, picks from the graph's logits and hands its choice back), on a CPU with
    compile=True calls of the compiled step, else eager calls.
    `slide` and `cancelled`: see `iter_tokens`.
    """
    batch, prompt_length = ids.shape
    device = ids.device
    seed = sampling.seed
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    total = prompt_length + max_new_tokens
    with torch.inference_mode():
        tokens = torch.empty((batch, total), dtype=torch.long, device=device)
        tokens[:, :prompt_length] = ids
        mask = None
        if attention_mask is not None:
            mask = torch.ones((batch, total), dtype=torch.long, device=device)
            mask[:, :prompt_length] = attention_mask
        finished = torch.zeros(batch, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    graphed = _graphed(model, batch, total, attention_mask, use_cache, compile)
    try:
        with (DECODERS.borrow(model, batch, compile, _static_length(model, total)) if graphed
              else contextlib.nullcontext()) as decoder:
            yield from _sampled_steps(model, forward, decoder, tokens, mask, prompt_length, sampling,
                                      generator, finished, use_cache, observe, slide, cancelled)
    finally:
        model.train(was_training)


def _sampled_steps(model, forward, decoder, tokens, mask, prompt_length, sampling, generator, finished,
                   use_cache, observe, slide, cancelled) -> Iterator[torch.Tensor]:
    """`_decode_steps`' loop: a model call (eager, or a graph replay by `decoder`), a sampled token.

    With a decoder, each step's replay is launched as soon as its token is picked, before that token
    is yielded: the GPU computes the next logits while the host reads this token (a caller that
    stops early leaves one replay unread, which costs nothing but its time).
    """
    eos_id = sampling.eos_id
    cache = logits = None
    start = 0  # the eager cache holds tokens[:, start:length]
    last = tokens.shape[1] - 1
    for length in range(prompt_length, tokens.shape[1]):
        # Checked before the step, not after: a client that left costs no further forward pass.
        if cancelled is not None and cancelled.is_set():
            return
        with torch.inference_mode():
            if decoder is None:
                logits, cache, start = _step(model, forward, tokens, mask, length, cache, start, use_cache,
                                             slide)
            elif logits is None:
                logits = decoder.prefill(tokens[:, :length])
            next_ids = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
            if eos_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, eos_id), next_ids)
                finished |= next_ids == eos_id
            tokens[:, length] = next_ids
            picked_from = logits
            if decoder is not None and length < last:
                # The replay overwrites the decoder's logits: an observer gets a copy.
                picked_from = logits.clone() if observe is not None else None
                logits = decoder.step(next_ids)
            if observe is not None:
                observe(picked_from, next_ids)
        yield next_ids
        if eos_id is not None and bool(finished.all()):
            return


def _step(model: GPT, forward: Callable[..., torch.Tensor], tokens: torch.Tensor, mask: torch.Tensor | None,
          length: int, cache, start: int, use_cache: bool, slide: int):
    """One model call over tokens[:, :length]: (last-position logits (B, vocab), the next step's cache
    and the first token it holds).

    While the window tokens[start:length] fits the context, the cache serves it (a prefill, then
    one new token a step). Past the context, with slide == 1, every step recomputes the last
    `context_length` tokens without a cache (exactly the tutorial's loop); with slide > 1 the window
    moves `slide` tokens forward at once and is prefilled into a fresh cache (positions restart at
    0, as they do in a recomputed window), so the next slide - 1 steps are cached steps again.
    """
    context = model.config.context_length
    if use_cache and length - start <= context:
        if cache is None:
            cache, begin = model.new_cache(tokens.shape[0]), start     # prefill the whole window
        else:
            begin = length - 1                                         # decode: just the newest token
        step_cache, mask_begin = cache, start                          # the mask covers cached tokens too
    elif use_cache and slide > 1:                                      # past the context: slide
        start = length - (context + 1 - slide)
        cache = model.new_cache(tokens.shape[0])
        begin, step_cache, mask_begin = start, cache, start
    else:                                                              # past the context: recompute
        begin = max(0, length - context)
        step_cache, mask_begin = None, begin
    logits = forward(tokens[:, begin:length], cache=step_cache, logits_to_keep=1,
                     attention_mask=mask[:, mask_begin:length] if mask is not None else None)
    return logits[:, -1, :], cache, start


def _as_batch(ids) -> tuple[torch.Tensor, bool]:
    """(B, T) long tensor from a list of ids, a 1-D or a 2-D tensor; and whether it was one sequence."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(list(ids), dtype=torch.long)
    if ids.dim() == 1:
        return ids.unsqueeze(0).long(), True
    if ids.dim() != 2:
        raise ValueError(f"ids must be a sequence of token ids or a (batch, n_tokens) tensor, "
                         f"got {ids.dim()} dims")
    return ids.long(), False


def _model_device(model: GPT) -> torch.device:
    return model.tok_emb.weight.device


def iter_tokens(model: GPT, ids, max_new_tokens: int, sampling: Sampling | None = None, *,
                attention_mask: torch.Tensor | None = None, use_cache: bool = True, compile: bool = False,
                observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None, slide: int = 1,
                cancelled=None, **settings) -> Iterator:
    """Yield the next token ids one step at a time, up to `max_new_tokens` of them.

    `ids`: one prompt (a list of ids or a 1-D tensor) -> yields ints; a batch (B, T) tensor ->
    yields (B,) tensors (with `attention_mask` (B, T) when the prompts are left-padded).
    `sampling` (a `Sampling`), or its fields by name (`temperature=0.8, top_k=40, seed=1, eos_id=...`),
    say how tokens are picked; the default is greedy. `eos_id` is yielded when produced and ends a
    single sequence; in a batch, finished rows repeat it until every row has finished. Bad settings
    raise ValueError here, before any step runs.
    `compile=True`: on a CPU, batches decode through the whole step compiled once (`cuda_graphs`,
    torch 2.13+; a first-use compile of tens of seconds), while a single sequence keeps the one-call
    step of `glassgpt.cpu_step`, which is faster still and compiles nothing; on CUDA, the graphed
    decode step is compiled before capture (fused kernels, after a first-use compile of a minute or
    so); elsewhere it changes nothing.
    `observe(logits, next_ids)`: called at each step with the logits the token was picked from
    (B, vocab) and the picked ids (B,), before they are yielded (how the server reports
    log-probabilities without a decoding loop of its own).
    `slide`: how far the window moves once prompt + generated tokens fill the context. 1 (the
    default) recomputes the last `context_length` tokens at every step, a whole window per token;
    s > 1 recomputes a window of context - s + 1 tokens once every s steps and decodes from the
    cache in between (each token then sees at least context - s previous tokens, not context - 1).
    `cancelled`: an object with `is_set()` (a threading.Event), checked before every step; once
    set, generation ends there, as if `max_new_tokens` had been reached.
    """
    sampling = Sampling.of(sampling, **settings)
    context = model.config.context_length
    if int(slide) != slide or not 1 <= slide <= context:
        raise ValueError(f"slide must be an integer from 1 to the context length {context}, got {slide}")
    if sampling.stop:
        raise ValueError("stop strings end a text, not a list of ids: use stream_text or generate_text")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    batch_ids, single = _as_batch(ids)
    device = _model_device(model)
    batch_ids = batch_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    _check_prompt(model, batch_ids, attention_mask)
    steps = _decode_steps(model, _model_call(model, compile), batch_ids, attention_mask, max_new_tokens,
                          sampling, use_cache, observe, compile, int(slide), cancelled)
    return (int(next_ids[0]) for next_ids in steps) if single else steps


def generate(model: GPT, ids, max_new_tokens: int, sampling: Sampling | None = None, *,
             attention_mask: torch.Tensor | None = None, use_cache: bool = True, compile: bool = False,
             **settings):
    """The prompt ids with up to `max_new_tokens` generated ids appended.

    - `ids` (B, T) tensor -> (B, T + n) tensor. Left-padded prompts need `attention_mask` (B, T);
      rows that reach `eos_id` first are filled with it while the others finish.
    - `ids` a list of prompts (lists of ids, possibly of different lengths) -> a list of lists,
      each its prompt + its own continuation (ending at its eos, if any).
    - `ids` a 1-D tensor -> (1, T + n) tensor.
    See `iter_tokens` for the sampling settings.
    """
    sampling = Sampling.of(sampling, **settings)
    if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], (list, tuple)):
        padded, mask = left_pad(ids)
        out = generate(model, padded, max_new_tokens, sampling, attention_mask=mask, use_cache=use_cache,
                       compile=compile)
        results = []
        for prompt, row in zip(ids, out[:, padded.shape[1]:].tolist(), strict=True):
            if sampling.eos_id is not None and sampling.eos_id in row:
                row = row[:row.index(sampling.eos_id) + 1]
            results.append(list(prompt) + row)
        return results
    batch_ids, _ = _as_batch(ids)
    batch_ids = batch_ids.to(_model_device(model))
    steps = list(iter_tokens(model, batch_ids, max_new_tokens, sampling, attention_mask=attention_mask,
                             use_cache=use_cache, compile=compile))
    if not steps:
        return batch_ids
    return torch.cat([batch_ids, torch.stack(steps, dim=1)], dim=1)


def _text_decoder(tokenizer):
    """A function id -> text piece that holds back bytes until they form whole characters."""
    # Byte-level BPE: one emoji or CJK character can span several tokens. The incremental
    # decoder keeps an incomplete UTF-8 sequence until its last byte arrives; invalid bytes
    # become U+FFFD, as `tokenizer.decode` does on the whole text.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return (lambda token_id: utf8.decode(tokenizer.decode_bytes([token_id])),
            lambda: utf8.decode(b"", final=True))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def detokenize_stream(tokenizer, ids: Iterable[int],
                      stop: str | Sequence[str] | None = None) -> Iterator[str]:
    """Turn token ids, as they arrive, into text pieces that never hold a broken UTF-8 character.

    Ends at the tokenizer's end-of-text id (not shown), when `ids` runs out, or at the first stop
    string (not shown either): text that could begin a stop string is held back until it is clear
    that it does not. The pieces joined equal `tokenizer.decode(ids)` cut before the stop string.
    """
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    eos_id = tokenizer.eos_id
    decode_piece, flush = _text_decoder(tokenizer)
    pending = ""
    for token_id in ids:
        if token_id == eos_id:
            break
        pending += decode_piece(int(token_id))
        cut = _first_stop(pending, stops)
        if cut >= 0:
            if cut:
                yield pending[:cut]
            return
        ready = len(pending) - _held_back(pending, stops)
        if ready:
            yield pending[:ready]
            pending = pending[ready:]
    pending += flush()
    cut = _first_stop(pending, stops)
    pending = pending[:cut] if cut >= 0 else pending
    if pending:
        yield pending


def _first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in `text`, or -1."""
    return min((text.find(s) for s in stops if s in text), default=-1)


@dataclass
class Timing:
    """How long a generation took: the prompt (prefill, up to the first new token) and the rest."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, per second of decoding (the first one comes with the prefill)."""
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0

    def timed(self, tokens: Iterator[int], prompt_tokens: int) -> Iterator[int]:
        """Pass `tokens` through, recording the times into this object as they arrive."""
        self.prompt_tokens, self.new_tokens = prompt_tokens, 0
        started = time.perf_counter()
        first = None
        for token in tokens:
            now = time.perf_counter()
            if first is None:
                first = now
                self.prefill_seconds = now - started
            self.new_tokens += 1
            self.decode_seconds = now - first
            yield token


def stream_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, sampling: Sampling | None = None, *,
                timing: Timing | None = None, compile: bool = False, slide: int = 1, cancelled=None,
                **settings) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces while tokens are generated.

    Pieces never hold a broken UTF-8 character. Generation ends at the tokenizer's end-of-text
    token (not shown), after `max_new_tokens`, or at the first stop string (not shown either).
    See `Sampling` for the settings (an object or its fields by name, `stop` strings included)
    and `detokenize_stream` for the text. Pass a `Timing()` to have it filled in with prefill and
    decode speeds. `slide` and `cancelled`: see `iter_tokens`. Bad settings raise ValueError here,
    before any text is produced.
    """
    sampling = Sampling.of(sampling, **settings)
    ids = tokenizer.encode(prompt)
    eos_id = tokenizer.eos_id
    if not ids:
        if eos_id is None:
            raise ValueError("the prompt is empty; give at least one character")
        ids = [eos_id]  # GPT-2 was trained with <|endoftext|> between documents: a neutral start
    until = replace(sampling, stop=(), eos_id=eos_id if sampling.eos_id is None else sampling.eos_id)
    tokens = iter_tokens(model, ids, max_new_tokens, until, compile=compile, slide=slide, cancelled=cancelled)
    if timing is not None:
        tokens = timing.timed(tokens, len(ids))
    return _stream(tokenizer, tokens, sampling.stop)


def _stream(tokenizer, tokens, stop):
    try:
        yield from detokenize_stream(tokenizer, tokens, stop)
    finally:
        tokens.close()  # a stop string ends generation at once, not when the generator is collected


def generate_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, **options) -> str:
    """The continuation of `prompt` as one string (`stream_text` joined; same options)."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **options))
