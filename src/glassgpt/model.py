"""The GPT model, hand-coded from PyTorch primitives, in the order a walk-through teaches it.

LayerNorm -> GELU -> multi-head causal self-attention -> feed-forward -> transformer block
-> the GPT (embeddings, blocks, final norm, output head) -> the KV cache used for decoding.

Each component has an *explicit* path, written out as the maths, and a *fused* path that calls
PyTorch's fused kernels (layer_norm, gelu, scaled_dot_product_attention). Tests prove the two equal;
`GPT.set_fused(False)` switches a whole model to the explicit path.

The model only computes. Reading its attention weights is `glassgpt.inspect`'s job; fast GPU
decoding (a static cache, CUDA graphs) is `glassgpt.cuda_graphs`'s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glassgpt.config import GPTConfig, get_preset
from glassgpt.fast import Linear  # nn.Linear; decoding a token on a CPU uses glassgpt's own kernels


class LayerNorm(nn.Module):
    """Normalise each vector to mean 0 and variance 1, then apply a learned scale and shift.

    Keeps activations in a steady range however deep the network is, which keeps training stable.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim)) if bias else None
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        # The biased variance (divide by n, not n - 1), as GPT-2 and torch's LayerNorm use.
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        normed = (x - mean) / torch.sqrt(var + self.eps)
        return normed * self.scale + self.shift if self.shift is not None else normed * self.scale


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation: smooth like ReLU, but lets small negatives through."""

    def __init__(self):
        super().__init__()
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.gelu(x, approximate="tanh")
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class MultiHeadAttention(nn.Module):
    """Causal self-attention with several heads, each looking at its own slice of the embedding.

    Queries ask, keys offer, values carry: every token scores every earlier token (query . key,
    scaled by 1/sqrt(head_dim)), softmax turns the scores into weights that sum to 1, and the token's
    output is the weighted sum of the values. The causal mask hides later tokens, so a token can
    only look back. Heads run in parallel and are concatenated, then mixed by an output projection.
    """

    def __init__(self, d_in: int, d_out: int, n_heads: int, dropout: float = 0.0,
                 qkv_bias: bool = False, out_bias: bool = True, causal: bool = True):
        super().__init__()
        if d_out % n_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_heads ({n_heads})")
        self.d_out = d_out
        self.n_heads = n_heads
        self.head_dim = d_out // n_heads
        # One matrix computes queries, keys and values together: its rows are [W_query; W_key; W_value].
        # (Same numbers as three separate projections, in one matrix product instead of three.)
        self.qkv = Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = Linear(d_out, d_out, bias=out_bias)
        self.dropout = dropout
        self.attn_dropout = nn.Dropout(dropout)
        # Passes the attention weights through unchanged: forward hooks on it read them on the
        # explicit path (`glassgpt.inspect.record_attention`), so forward returns one tensor.
        self.probe = nn.Identity()
        # causal=False lets every token see every token (the walk-through's unmasked first steps in
        # `glassgpt.explain`); it always runs the explicit path.
        self.causal = causal
        self.fused = True

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`, optional, broadcastable to (B, H, T, S): True where a query may see a key (a padded
        batch gives each row its own). Without it each query sees the keys up to its own position (every
        key when `causal=False`)."""
        batch, n_tokens, _ = x.shape                                  # x: (B, T, d_in)
        queries, keys, values = self.qkv(x).split(self.d_out, dim=2)  # each (B, T, d_out)

        # Split the embedding into heads: (B, T, d_out) -> (B, n_heads, T, head_dim).
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, n_tokens, self.n_heads, self.head_dim).transpose(1, 2)

        queries, keys, values = heads(queries), heads(keys), heads(values)
        start = 0
        if cache is not None:
            # Earlier tokens' keys and values come from the cache; only the new ones are computed.
            start = cache.length
            keys, values = cache.append(keys, values)                 # (B, H, start + T, head_dim)

        if self.fused and self.causal:
            context = self._fused(queries, keys, values, start, mask)
        else:
            context = self._explicit(queries, keys, values, start, mask)

        # Concatenate the heads again: (B, H, T, head_dim) -> (B, T, d_out), then mix them.
        context = context.transpose(1, 2).reshape(batch, n_tokens, self.d_out)
        return self.out_proj(context)

    @staticmethod
    def causal_mask(n_queries: int, n_keys: int, start: int, device) -> torch.Tensor:
        """True where query i (at position start + i) must not see key j, i.e. j is in its future."""
        query_positions = start + torch.arange(n_queries, device=device)
        return torch.arange(n_keys, device=device) > query_positions[:, None]  # (T, S)

    @classmethod
    def padded_allowed(cls, n_queries: int, key_mask: torch.Tensor, start: int) -> torch.Tensor:
        """(B, 1, T, S) True where a query may attend: past or present keys that are not padding."""
        n_keys = key_mask.shape[-1]
        allowed = ~cls.causal_mask(n_queries, n_keys, start, key_mask.device) & key_mask[:, None, None, :]
        # A padding token sees no real key; letting it see itself keeps its unused output finite.
        itself = torch.ones(n_queries, n_keys, dtype=torch.bool, device=key_mask.device)
        return allowed | (itself.triu(diagonal=start) & itself.tril(diagonal=start))

    def _explicit(self, queries, keys, values, start, mask=None):
        scores = queries @ keys.transpose(2, 3)                       # (B, H, T, S)
        # Dividing by sqrt(head_dim) keeps the scores' variance near 1, so softmax stays soft.
        scores = scores / math.sqrt(self.head_dim)
        if mask is None and self.causal:
            mask = ~self.causal_mask(scores.shape[-2], scores.shape[-1], start, scores.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = self.probe(torch.softmax(scores, dim=-1))
        return self.attn_dropout(weights) @ values                    # (B, H, T, head_dim)

    def _fused(self, queries, keys, values, start, mask=None):
        dropout = self.dropout if self.training else 0.0
        n_queries, n_keys = queries.shape[-2], keys.shape[-2]
        if mask is None and n_queries == n_keys:  # no cached prefix: the ordinary causal triangle
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout, is_causal=True)
        if mask is None and n_queries > 1:  # a chunk after a cached prefix: the triangle, shifted
            mask = ~self.causal_mask(n_queries, n_keys, start, queries.device)
        # (One new token with no mask sees every key, itself included.)
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout)


class FeedForward(nn.Module):
    """Expand each token's vector (4x in GPT-2), apply the non-linearity, contract it back."""

    def __init__(self, emb_dim: int, hidden_dim: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.expand = Linear(emb_dim, hidden_dim, bias=bias)
        self.activation = GELU() if activation == "gelu" else nn.ReLU()
        self.contract = Linear(hidden_dim, emb_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.contract(self.activation(self.expand(x)))


class TransformerBlock(nn.Module):
    """Attention then feed-forward, each wrapped in a residual (shortcut) connection.

    Pre-LN (GPT-2): x + sublayer(norm(x)); the shortcut carries gradients straight through depth.
    Post-LN (the original Transformer, used by TinyGPT): norm(x + sublayer(x)).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm1 = LayerNorm(config.emb_dim, config.norm_eps, config.norm_bias)
        self.attn = MultiHeadAttention(
            config.emb_dim, config.emb_dim, config.n_heads, config.drop_rate,
            qkv_bias=config.qkv_bias, out_bias=config.attn_out_bias,
        )
        self.norm2 = LayerNorm(config.emb_dim, config.norm_eps, config.norm_bias)
        self.ff = FeedForward(config.emb_dim, config.hidden_dim, config.activation, config.ff_bias)
        self.drop_resid = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop_resid(self.attn(self.norm1(x), cache, mask))
            return x + self.drop_resid(self.ff(self.norm2(x)))
        x = self.norm1(x + self.drop_resid(self.attn(x, cache, mask)))
        return self.norm2(x + self.drop_resid(self.ff(x)))


class GPT(nn.Module):
    """Token ids (B, T) -> logits over the vocabulary (B, T, vocab_size) for the next token."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        # Learned absolute positions: one vector per slot of the context window.
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.final_norm = (LayerNorm(config.emb_dim, config.norm_eps, config.norm_bias)
                           if config.final_norm else nn.Identity())
        # A classifier (config.n_classes > 0, see glassgpt.classify) scores classes instead of tokens.
        n_outputs = config.n_classes or config.vocab_size
        self.out_head = Linear(config.emb_dim, n_outputs, bias=config.head_bias)
        if config.tie_weights:
            # Weight tying: reading a token in and writing it out use the same matrix (GPT-2 does
            # this; it saves vocab_size * emb_dim parameters, 38.6M for GPT-2 small).
            self.out_head.weight = self.tok_emb.weight
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPT:
        """A freshly initialised model of a named preset (see `glassgpt.config.PRESETS`)."""
        return cls(get_preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, spec, device="cpu", dtype=None) -> GPT:
        """Trained weights: a GPT-2 name found on this machine ("gpt2", ...), a Hugging Face GPT-2
        directory, or a glassgpt checkpoint or run directory (`glassgpt.hub.resolve_model`)."""
        from glassgpt.hub import resolve_model  # hub builds GPTs: imported here, not at the top

        return resolve_model(spec, device, dtype, presets=False)[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit norms.

        The projections that write into the residual stream (attention output, feed-forward
        contraction) get std 0.02 / sqrt(2 * n_layers): each block adds two such terms to the
        stream, and the scaling keeps the stream's variance from growing with depth.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("attn.out_proj", "ff.contract"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.scale)
                if module.shift is not None:
                    nn.init.zeros_(module.shift)

    def set_fused(self, fused: bool = True) -> GPT:
        """Use PyTorch's fused kernels (True, the default) or the explicit maths (False)."""
        for module in self.modules():
            if hasattr(module, "fused"):
                module.fused = fused
        return self

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                logits_to_keep: int = 0):
        """Logits for every position of `ids` (B, T); with `targets` (B, T), the training loss instead.

        With a `cache`, `ids` are the tokens that follow those already in the cache: only they are
        computed, their keys and values are appended, and the cache's length grows by T.
        `attention_mask` (B, T_total), for batches of prompts of different lengths padded on the
        left: 1 for real tokens, 0 for padding, covering the cached tokens and `ids`. Padding is
        hidden from attention and positions count real tokens only, so each row computes what it
        would alone.
        `targets`: the next token of each position; the result is then the mean cross-entropy
        (see `next_token_loss`) and nothing else, computed without handing the logits back.
        `logits_to_keep` (transformers' name): n > 0 gives the logits of the last n positions only
        (B, n, vocab_size). Decoding needs only the last one after a prompt, and the output head
        is about a third of GPT-2 small's work per position.
        """
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            raise ValueError("ids must be an integer tensor of shape (batch, n_tokens)")
        batch, n_tokens = ids.shape
        start = cache.length if cache is not None else 0
        if n_tokens == 0:
            raise ValueError("ids must hold at least one token")
        context = self.config.context_length
        if start + n_tokens > context:
            raise ValueError(f"{start + n_tokens} tokens exceed the model's context length of {context}; "
                             f"crop the input to its last {context} tokens")
        if cache is not None and cache.batch_size != batch:
            raise ValueError(f"cache was made for batch size {cache.batch_size}, got {batch}")

        mask = None  # without one, each attention applies the causal rule itself
        if attention_mask is None:
            positions = start + torch.arange(n_tokens, device=ids.device)
        else:
            if tuple(attention_mask.shape) != (batch, start + n_tokens):
                raise ValueError(f"attention_mask must have shape (batch, cached + new tokens) = "
                                 f"{(batch, start + n_tokens)}, got {tuple(attention_mask.shape)}")
            key_mask = attention_mask.bool()
            positions = (key_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, start:]  # (B, T)
            mask = MultiHeadAttention.padded_allowed(n_tokens, key_mask, start)  # (B, 1, T, S)
        x = self.drop_emb(self.tok_emb(ids) + self.pos_emb(positions))  # (B, T, emb_dim)
        for index, block in enumerate(self.blocks):
            x = block(x, cache.layers[index] if cache is not None else None, mask)
        if cache is not None:
            cache.advance(n_tokens)
        x = self.final_norm(x)
        if targets is not None:
            return self.next_token_loss(x, targets)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.out_head(x)                                           # (B, T, vocab_size)

    def next_token_loss(self, hidden: torch.Tensor, targets: torch.Tensor, pad_vocab_to: int | None = None):
        """Mean cross-entropy of the output head's logits for `hidden` (B, T, emb_dim) against `targets`.

        Equals `F.cross_entropy(out_head(hidden), targets)`, but on a GPU it is faster: the head's
        matrix is padded with zero rows up to a multiple of `pad_vocab_to` (64 on CUDA, none on a CPU,
        where padding would only cost a copy), and the padded logits get a bias of -inf. Tensor cores
        tile a width like 50,304 evenly, where GPT-2's 50,257 falls back to a slower kernel; a -inf
        logit takes no probability, so the loss and every gradient are those of the real vocabulary.
        """
        weight, bias = self.out_head.weight, self.out_head.bias
        vocab_size = weight.shape[0]
        multiple = pad_vocab_to or (64 if hidden.is_cuda else 1)
        padding = -vocab_size % multiple
        if padding:
            weight = F.pad(weight, (0, 0, 0, padding))
            if bias is None:
                bias = torch.zeros(vocab_size, device=weight.device, dtype=weight.dtype)
            bias = F.pad(bias, (0, padding), value=float("-inf"))
        logits = F.linear(hidden, weight, bias)                           # (B, T, padded vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def new_cache(self, batch_size: int = 1, max_length: int | None = None) -> KVCache:
        """An empty KV cache for this model, on its device and in its dtype."""
        weight = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_length, device=weight.device, dtype=weight.dtype)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """`ids` with up to `max_new_tokens` generated tokens appended; see `glassgpt.generate`."""
        from glassgpt.generate import generate  # generate drives a GPT: imported here, not at the top

        return generate(self, ids, max_new_tokens, **sampling)

    def num_parameters(self) -> int:
        """Trainable parameters, counting a tied matrix once."""
        return sum(p.numel() for p in self.parameters())

    def parameter_breakdown(self) -> list[tuple[str, int]]:
        """(component, parameter count) rows computed from the modules, ending with the total."""
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        rows = [("token embedding", count(self.tok_emb)), ("position embedding", count(self.pos_emb))]
        for index, block in enumerate(self.blocks):
            rows += [
                (f"block {index} attention", count(block.attn)),
                (f"block {index} feed-forward", count(block.ff)),
                (f"block {index} norms", count(block.norm1) + count(block.norm2)),
            ]
        rows.append(("final norm", count(self.final_norm)))
        head = count(self.out_head)
        if self.config.tie_weights:  # the tied matrix is already counted in the token embedding
            head -= self.out_head.weight.numel()
        rows.append(("output head" + (" (tied to token embedding)" if self.config.tie_weights else ""), head))
        rows.append(("total", self.num_parameters()))
        return rows


class LayerCache:
    """One block's keys and values, pre-allocated for `max_length` tokens."""

    def __init__(self, shape: tuple[int, ...], device, dtype):
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys/values (B, H, T, hd); return all stored so far."""
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache is full: {end} tokens do not fit in {self.keys.shape[2]}")
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of every block for the tokens seen so far, so decoding computes only new ones.

    Learned absolute positions mean a cache cannot slide: once the context is full, generation
    recomputes from the last `context_length` tokens (see `glassgpt.generate`).
    """

    layer_type = LayerCache  # a subclass may store its layers differently (glassgpt.cuda_graphs)

    def __init__(self, config: GPTConfig, batch_size: int, max_length: int | None = None,
                 device=None, dtype=torch.float32):
        max_length = min(max_length or config.context_length, config.context_length)
        shape = (batch_size, config.n_heads, max_length, config.head_dim)
        self.layers = [self.layer_type(shape, device, dtype) for _ in range(config.n_layers)]
        self.batch_size = batch_size
        self.length = 0

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens
        for layer in self.layers:
            layer.length = self.length

    def reset(self) -> None:
        self.advance(-self.length)
