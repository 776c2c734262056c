"""Decoding on a GPU, each new token one replay of a captured CUDA graph.

Decoding one token is a few hundred small kernels; launched one by one from Python, the launches
take longer than the GPU's work. A CUDA graph records the launches of one step once and replays
them as a whole, but it replays fixed work on fixed memory: no shape may change between steps and
no number may come from the host. So the decoder runs the model's own modules (no copy of them) on
a `StaticKVCache`, whose buffers have one shape for the whole sequence and whose length is a tensor
on the device: positions and the causal mask are computed there, and attention reads the whole
buffer with the unwritten slots masked out. The step is compiled once (`torch.compile` fuses the
small kernels) and captured; there is no host-device synchronisation until the end.
`glassgpt.generate` decodes through a `GraphedDecoder` on CUDA (`DECODERS`), for every sampling
mode: the graph computes the logits, the sampler picks the token outside it and feeds it back.
On a CPU, `generate(..., compile=True)` decodes through the same decoder without a graph: the whole
step compiled once into fused C++ loops (gpt-fast's way), where per-product compiling pays a call
overhead 49 times a token. (Inductor's "freezing", which folds the weights into the step as
constants, made bf16 faster still but let a decoder made after a weight update reuse the old
weights: not used.) Measurements: docs/PERFORMANCE.md ("Decode", "CPU decode").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from glassgpt import cpu_kernels
from glassgpt.config import GPTConfig
from glassgpt.fast import CompileState
from glassgpt.model import GPT, KVCache, LayerCache

_CAPTURING = threading.Lock()
# Compiling the CPU decode step needs the C++ compiler torch.compile uses on a CPU; where it fails,
# decoders go on running their step eagerly (one warning).
CPU_STEP = CompileState()
# Measured faster than per-product compiling on torch 2.13 (docs/PERFORMANCE.md); on torch 2.11 the
# int8 model's compiled step ran at a third of its eager speed, so older releases keep that path.
COMPILES_CPU_STEP = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 13)


class StaticLayerCache(LayerCache):
    """One block's keys and values, written at a position held in a device tensor."""

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys/values (B, H, T, hd); return the whole buffer.

        Attention then reads every slot, and the mask from `static_forward` hides those not yet written.
        """
        slots = self.length + torch.arange(keys.shape[2], device=keys.device)
        # Under autocast (a trainer's sample) new keys come in bf16 while the cache holds the model's
        # dtype; index_copy_ does not convert as the eager cache's slice assignment does.
        self.keys.index_copy_(2, slots, keys.to(self.keys.dtype))
        self.values.index_copy_(2, slots, values.to(self.values.dtype))
        return self.keys, self.values


class StaticKVCache(KVCache):
    """A KV cache whose length is a 0-d tensor on the device instead of a Python int.

    Every step reads and writes the same buffers at positions computed on the device, so nothing in
    a decode step depends on a host-side number. The price is attention over the whole buffer each
    step, and no host-side overflow check: the caller keeps prompt + new tokens within `max_length`;
    and no `attention_mask` (rows of one batch share their positions).
    """

    layer_type = StaticLayerCache

    def __init__(self, config: GPTConfig, batch_size: int, max_length: int | None = None,
                 device=None, dtype=torch.float32):
        super().__init__(config, batch_size, max_length, device, dtype)
        self.max_length = self.layers[0].keys.shape[2]
        self.length = torch.zeros((), dtype=torch.long, device=device)
        # Every layer shares the one length tensor, which advance() and reset() update in place.
        for layer in self.layers:
            layer.length = self.length

    @classmethod
    def for_model(cls, model: GPT, batch_size: int = 1, max_length: int | None = None) -> StaticKVCache:
        """An empty static cache for `model`, on its device and in its dtype."""
        weight = model.tok_emb.weight
        return cls(model.config, batch_size, max_length, device=weight.device, dtype=weight.dtype)

    def advance(self, n_tokens: int) -> None:
        self.length.add_(n_tokens)

    def reset(self) -> None:
        self.length.zero_()


def static_forward(model: GPT, ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """`model(ids, cache=...)` for a `StaticKVCache`: logits (B, T, vocab) of the tokens `ids` (B, T)
    that follow those in the cache, computed without reading any number back to the host.

    The same modules in the same order as `GPT.forward` (without its checks and padded batches);
    what differs is where positions and the causal mask come from.
    """
    positions = cache.length + torch.arange(ids.shape[1], device=ids.device)       # on the device
    # Each query sees the slots up to its own position; later slots, written or not, stay hidden.
    visible = torch.arange(cache.max_length, device=ids.device) <= positions[:, None]  # (T, S)
    x = model.drop_emb(model.tok_emb(ids) + model.pos_emb(positions))
    for index, block in enumerate(model.blocks):
        x = block(x, cache.layers[index], visible)
    cache.advance(ids.shape[1])
    return model.out_head(model.final_norm(x))


class GraphedDecoder:
    """Decoding of `batch_size` rows at a time, each step one replay of a CUDA graph.

    `max_length` (default the model's context) bounds prompt + new tokens. On a CUDA device the
    decoder compiles and captures its graph on first use (this takes a while); later calls reuse it.
    On the CPU it runs the same step without a graph, which is how CI tests it.
    Typical use: `GraphedDecoder(model.to("cuda", torch.bfloat16)).generate(ids, 200)`.
    """

    def __init__(self, model: GPT, batch_size: int = 1, max_length: int | None = None, compile: bool = True):
        device = model.tok_emb.weight.device
        self.model = model.eval()
        self.cache = StaticKVCache.for_model(model, batch_size, max_length)
        self.batch_size = batch_size
        self.max_length = self.cache.max_length
        # The graph's fixed inputs and outputs: the newest token of each row, and its logits.
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.logits = torch.zeros(batch_size, model.config.vocab_size, dtype=model.tok_emb.weight.dtype,
                                  device=device)
        # On a CPU, the model's layers send one-row products to glassgpt's own kernels
        # (glassgpt.cpu_kernels), built here, before a trace of the step needs them.
        if device.type == "cpu":
            cpu_kernels.ops()
        self._compiled = torch.compile(self._decode_step, fullgraph=True) if compile else None
        self.use_graph = device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.started = False

    def _decode_step(self) -> torch.Tensor:
        """Feed `token` at the cache's position; leave the greedy next token in `token`.

        A sampler overwrites `token` with its own choice before the next step (`step(next_ids)`).
        """
        logits = static_forward(self.model, self.token, self.cache)[:, -1]  # (B, vocab)
        self.logits.copy_(logits)
        self.token.copy_(logits.argmax(dim=-1, keepdim=True))
        return self.logits

    def _step(self) -> None:
        if self._compiled is None:
            self._decode_step()
        elif self.use_graph:
            self._compiled()
        elif CPU_STEP.attempt(self._compiled, instead="decoding with the step uncompiled") is None:
            self._decode_step()

    def _capture(self) -> None:
        # Warm-up runs compile and autotune; they must happen on a side stream before capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Other threads may be decoding meanwhile (a server's concurrent requests): "thread_local"
        # lets their CUDA calls go on during this capture instead of failing it.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), torch.no_grad():
            self._step()
        # The warm-up steps wrote into the cache; resetting its length hides those slots again.
        self.cache.reset()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence from prompts `ids` (B, T); return the last position's logits (B, vocab).

        The greedy next token is left ready for `step()`.
        """
        if ids.dim() != 2 or ids.shape[0] != self.batch_size:
            raise ValueError(f"ids must have shape ({self.batch_size}, n_tokens), got {tuple(ids.shape)}")
        if not 0 < ids.shape[1] <= self.max_length:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens does not fit in {self.max_length}")
        if self.use_graph and self.graph is None:
            with _CAPTURING:  # one capture (and compile) at a time in this process
                self._capture()
        self.cache.reset()
        logits = static_forward(self.model, ids.to(self.token.device), self.cache)[:, -1]
        self.logits.copy_(logits)
        self.token.copy_(logits.argmax(dim=-1, keepdim=True))
        self.started = True
        return self.logits

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Feed the pending token, pick the next one; return the logits it was picked from (B, vocab).

        The pending token is the greedy choice of the last step, or `next_ids` (B,) when given (a
        sampled choice). The returned tensor is the graph's output buffer: the next step overwrites it.
        """
        if not self.started:
            raise RuntimeError("call prefill(ids) before step()")
        if next_ids is not None:
            self.token.copy_(next_ids.view(self.batch_size, 1))
        if self.use_graph:
            self.graph.replay()
        else:
            self._step()
        return self.logits

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """`ids` (B, T) followed by `max_new_tokens` greedily chosen tokens: (B, T + max_new_tokens)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # The last new token is never fed back, so it needs no slot in the cache.
        if ids.shape[1] + max_new_tokens - 1 > self.max_length:
            raise ValueError(f"{ids.shape[1]} prompt + {max_new_tokens} new tokens exceed the decoder's "
                             f"max_length of {self.max_length}")
        self.prefill(ids)
        new_tokens = torch.empty(self.batch_size, max_new_tokens, dtype=torch.long, device=self.token.device)
        new_tokens[:, :1] = self.token
        for index in range(1, max_new_tokens):
            self.step()
            new_tokens[:, index:index + 1] = self.token
        return torch.cat([ids.to(new_tokens.device), new_tokens], dim=1)


@dataclass
class _Pool:
    """The decoders made for one (model, batch size, compile), while the parameters stay put."""

    signature: tuple[int, ...]  # where the parameters were when the decoders captured their graphs
    made: int = 0
    idle: list[GraphedDecoder] = field(default_factory=list)


class _ModelDecoders(dict):
    """The pools of one model, kept on the model itself, so that they live and die with it (a global
    table of decoders, each holding its model, would keep every model alive). Never copied with the
    model: a graph belongs to the memory it was captured on."""

    def __deepcopy__(self, memo) -> _ModelDecoders:
        return _ModelDecoders()

    def __reduce__(self):
        return _ModelDecoders, ()


class _Decoders:
    """`GraphedDecoder`s per (model, batch size, compile), made on first use and kept with the model.

    A captured graph reads the parameters at the addresses they had at capture, so decoders are
    remade when they move (`model.to(...)`, a dtype change); updates in place (training, loading a
    state dict) are seen. A decoder serves one sequence at a time; sequences decoded at once (a
    server's concurrent requests, each in its own thread) get one each, up to `per_key`; past
    that `borrow` gives None and the caller decodes eagerly.
    """

    per_key = 8
    attribute = "_graphed_decoders"

    def __init__(self):
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self, model: GPT, batch_size: int, compile: bool,
               max_length: int | None = None) -> Iterator[GraphedDecoder | None]:
        """An idle decoder for `model` (or a new one), held for the `with` block; `max_length`, the
        static cache's length (default the context): a CPU step attends over all of it."""
        signature = tuple(p.data_ptr() for p in model.parameters())
        key, decoder, make = (batch_size, compile, max_length), None, False
        with self._lock:
            pools = model.__dict__.get(self.attribute)
            if pools is None:
                pools = model.__dict__[self.attribute] = _ModelDecoders()
            pool = pools.get(key)
            if pool is None or pool.signature != signature:
                pool = pools[key] = _Pool(signature)
            if pool.idle:
                decoder = pool.idle.pop()
            elif pool.made < self.per_key:
                pool.made += 1
                make = True
        if make:
            decoder = GraphedDecoder(model, batch_size, max_length, compile=compile)
        try:
            yield decoder
        finally:
            if decoder is not None:
                with self._lock:
                    pool.idle.append(decoder)


DECODERS = _Decoders()
