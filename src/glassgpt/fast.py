"""GPU fast paths: greedy decoding with a static KV cache, compiled once and replayed as a CUDA graph.

Decoding one token of GPT-2 small is a few hundred small kernels; launched one by one from Python,
the launches take longer than the GPU work. Here the model runs unchanged (no copy of it), on a
`StaticKVCache` whose shapes never change and whose length lives on the device, so one decode step
can be compiled (`torch.compile` fuses the small kernels) and captured as a CUDA graph: each new
token is then a single graph launch, with no host-device synchronisation until the end.
"""

from __future__ import annotations

import torch

from glassgpt.model import GPT


class GraphedDecoder:
    """Greedy decoding of `batch_size` rows at a time, each step one replay of a CUDA graph.

    `max_length` (default the model's context) bounds prompt + new tokens. On a CUDA device the
    decoder compiles and captures its graph on first use (this takes a while); later calls reuse it.
    On the CPU it runs the same step without a graph, which is how CI tests it.
    Typical use: `GraphedDecoder(model.to("cuda", torch.bfloat16)).generate(ids, 200)`.
    """

    def __init__(self, model: GPT, batch_size: int = 1, max_length: int | None = None, compile: bool = True):
        device = model.tok_emb.weight.device
        self.model = model.eval()
        self.cache = model.new_cache(batch_size, max_length, static=True)
        self.batch_size = batch_size
        self.max_length = self.cache.layers[0].keys.shape[2]
        # The graph's fixed inputs and outputs: the newest token of each row, and its logits.
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.logits = torch.zeros(batch_size, model.config.vocab_size, dtype=model.tok_emb.weight.dtype,
                                  device=device)
        self._step = torch.compile(self._decode_step, fullgraph=True) if compile else self._decode_step
        self.use_graph = device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.started = False

    def _decode_step(self) -> None:
        """Feed `token` at the cache's position; leave the greedy next token in `token`."""
        logits = self.model(self.token, cache=self.cache)[:, -1]         # (B, vocab)
        self.logits.copy_(logits)
        self.token.copy_(logits.argmax(dim=-1, keepdim=True))

    def _capture(self) -> None:
        # Warm-up runs compile and autotune; they must happen on a side stream before capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
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
            self._capture()
        self.cache.reset()
        logits = self.model(ids.to(self.token.device), cache=self.cache)[:, -1]
        self.logits.copy_(logits)
        self.token.copy_(logits.argmax(dim=-1, keepdim=True))
        self.started = True
        return self.logits

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed the pending token, pick the next one; return the logits it was picked from (B, vocab).

        The returned tensor is the graph's output buffer: the next step overwrites it.
        """
        if not self.started:
            raise RuntimeError("call prefill(ids) before step()")
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
