"""Looking inside a model while it runs, without changing what the model's code returns.

Every view here runs the ordinary `GPT` and reads (or, for an experiment, edits) what flows
through it with forward hooks and forward pre-hooks: no copy of the model, no second forward pass
written out by hand. Each view runs in eval mode under `no_grad`, removes its hooks and puts every
module's training flag back afterwards, whatever happens.

The views, one function each (the server, the pages and `glassgpt inspect` call these, never the
model's internals):

- `record_attention`: every head's attention weights.
- `logit_lens`: what the model would predict if it stopped after the embeddings or after block l.
- `residual_contributions`: how much the embeddings and each attention and feed-forward layer write
  into the residual stream at each position.
- `patch_residual`: activation patching; which (block, position) carries the information that makes
  a clean text's answer differ from a corrupted text's.
- `ablate_heads`: how the answer changes when one attention head is silenced; `attribute_heads`
  estimates the same from one backward pass (attribution patching), for long texts.
- `embedding_map`: a 2-D map (PCA) of token and position embeddings, with nearest neighbours.
- `top_neurons`: the feed-forward units that fire most on a text, and on which tokens.

Ids are one text's token ids: a list, a 1-D tensor or a (1, T) tensor. "The head" is whatever the
model ends in: a language model's vocabulary, or a classifier's classes (`config.n_classes` > 0), in
which case every log-probability below is over the classes and a `target_id` is a class index.
Results are float32 tensors on the CPU or plain Python data.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glassgpt.model import GPT, MultiHeadAttention

IdsLike = Sequence[int] | torch.Tensor

# Token positions computed per forward pass when a view runs many copies of a text at once.
TOKENS_PER_BATCH = 8192


# ---------------------------------------------------------------- attention weights

def record_attention(model: nn.Module, *args, **kwargs) -> tuple[Any, list[torch.Tensor]]:
    """Run `model(*args, **kwargs)` with explicit attention; return its output and the attention weights.

    `model` is a `GPT` or any module holding `MultiHeadAttention` layers (one layer alone included).
    The weights come one tensor per attention layer, in the order they ran, each (B, n_heads, T, S):
    weights[layer][b, h, i, j] is how much query i looks at key j, each row summing to 1.
    Each attention layer's `fused` flag is restored afterwards, whatever it was.

    The fused kernel never forms the weights, so attention runs on the explicit path while
    recording (through the identity `probe` it passes its softmax weights through); the rest of the
    model (LayerNorm, GELU) stays as it is, and the output equals the fused model's up to rounding.
    """
    weights: list[torch.Tensor] = []
    layers = [module for module in model.modules() if isinstance(module, MultiHeadAttention)]
    previous = [layer.fused for layer in layers]
    handles = [layer.probe.register_forward_hook(lambda module, inputs, output: weights.append(output))
               for layer in layers]
    try:
        for layer in layers:
            layer.fused = False
        output = model(*args, **kwargs)
    finally:
        for layer, fused in zip(layers, previous, strict=True):
            layer.fused = fused
        for handle in handles:
            handle.remove()
    return output, weights


# ---------------------------------------------------------------- checking input, running safely

def head_size(model: GPT) -> int:
    """How many outputs the head scores: the vocabulary, or a classifier's classes."""
    return model.config.n_classes or model.config.vocab_size


def _integer(value, message: str) -> int:
    """Python, NumPy and one-element tensor integers as an int (not True, not 1.0); else ValueError."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(message)
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(message) from None


def as_ids(model: GPT, ids: IdsLike) -> torch.Tensor:
    """One text's ids as a (1, T) long tensor on the model's device, or a ValueError saying what is wrong."""
    if not isinstance(model, GPT):
        raise ValueError(f"the views read a glassgpt GPT, got {type(model).__name__}")
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids must be integers, got a {ids.dtype} tensor")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"ids must be one text: a list, a 1-D tensor or a (1, T) tensor, "
                             f"got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = list(ids)
    if not ids:
        raise ValueError("ids are empty: the views need at least one token")
    ids = [_integer(i, "ids must be integers") for i in ids]
    context, vocab = model.config.context_length, model.config.vocab_size
    if len(ids) > context:
        raise ValueError(f"{len(ids)} tokens exceed the model's context length of {context}; "
                         f"give at most {context}")
    outside = [i for i in ids if not 0 <= i < vocab]
    if outside:
        raise ValueError(f"token id {outside[0]} is outside the vocabulary (0..{vocab - 1})")
    return torch.tensor([ids], dtype=torch.long, device=model.tok_emb.weight.device)


def check_target(model: GPT, target_id: int) -> int:
    """`target_id` as an int, or a ValueError: a token id for a language model, a class for a classifier."""
    target_id = _integer(target_id, f"target_id must be an integer, got {target_id!r}")
    size = head_size(model)
    if not 0 <= target_id < size:
        if model.config.n_classes:
            labels = f" ({', '.join(model.config.labels)})" if model.config.labels else ""
            raise ValueError(f"target_id {target_id} is not a class of this classifier: "
                             f"0..{size - 1}{labels}")
        raise ValueError(f"target id {target_id} is outside the vocabulary (0..{size - 1})")
    return target_id


def check_block(model: GPT, block: int) -> int:
    """`block` as an int, or a ValueError unless it numbers one of the model's blocks (from 0)."""
    n_layers = model.config.n_layers
    message = f"block must be 0..{n_layers - 1} (the model has {n_layers} blocks), got {block!r}"
    block = _integer(block, message)
    if not 0 <= block < n_layers:
        raise ValueError(message)
    return block


@contextlib.contextmanager
def looking(model: GPT) -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    """Eval mode and no_grad for a view; yields a list to put hook handles in.

    On the way out every handle is removed and every module's training flag is what it was.
    """
    modes = [(module, module.training) for module in model.modules()]
    handles: list[torch.utils.hooks.RemovableHandle] = []
    model.eval()
    try:
        with torch.no_grad():
            yield handles
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def _keep_last_position(module, inputs, output):
    # A forward hook on the final norm: the head then scores only the last position, which is all
    # the patching and ablation views read (the head is the largest matrix: vocab x emb_dim).
    return output[:, -1:]


def _run_copies(model: GPT, ids: torch.Tensor, fan_out, module: nn.Module, n_copies: int) -> torch.Tensor:
    """The head's last-position outputs (n_copies, head_size) of one run of `ids` that `module`'s
    input is fanned out of: `fan_out(x)` turns the single run's (1, T, D) input into (n_copies, T, D).

    Everything before `module` runs once; from there on the forward pass carries n_copies rows
    (broadcasting joins them with the single residual), so each copy costs only the layers after it.
    """
    with looking(model) as handles:
        handles.append(module.register_forward_pre_hook(lambda m, args: (fan_out(args[0]), *args[1:])))
        handles.append(model.final_norm.register_forward_hook(_keep_last_position))
        return model(ids)[:, -1].float()


def _batches(n_items: int, n_tokens: int) -> Iterator[range]:
    step = max(1, TOKENS_PER_BATCH // n_tokens)
    for start in range(0, n_items, step):
        yield range(start, min(start + step, n_items))


def residual_streams(model: GPT, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream (1, T, D) entering each block, then leaving the last: n_layers + 1 tensors.

    Read with forward pre-hooks on the blocks (what `GPT.forward` hands each block) and a forward
    hook on the last block; the model's output is the final norm and the head applied to the last.
    """
    streams: list[torch.Tensor] = []
    with looking(model) as handles:
        for block in model.blocks:
            handles.append(block.register_forward_pre_hook(lambda m, args: streams.append(args[0])))
        handles.append(model.blocks[-1].register_forward_hook(lambda m, args, output: streams.append(output)))
        model(ids)
    return streams


# ---------------------------------------------------------------- logit lens

def _lens_rows(model: GPT, ids: IdsLike) -> Iterator[torch.Tensor]:
    ids = as_ids(model, ids)
    streams = residual_streams(model, ids)
    with looking(model):
        for stream in streams:
            # The same two calls, on the same shapes, as the end of GPT.forward: the last row is
            # the model's own output, bit for bit.
            yield torch.log_softmax(model.out_head(model.final_norm(stream)).float(), dim=-1)[0].cpu()


def logit_lens(model: GPT, ids: IdsLike) -> torch.Tensor:
    """Log-probabilities (n_layers + 1, T, head_size) of the next token at every depth.

    Row 0 reads the residual stream after the embeddings, row l after block l, each pushed through
    the final norm and the head as if the model ended there. The last row is the model's own output
    (`log_softmax(model(ids))`). How to read it: follow a position down the rows to see at which
    block the model settles on its prediction; early rows of a trained model often just echo the
    input token. A classifier's rows are log-probabilities over its classes.
    Memory is (n_layers + 1) x T x vocab floats: `logit_lens_top` keeps only the best k.
    """
    return torch.stack(list(_lens_rows(model, ids)))


def logit_lens_top(model: GPT, ids: IdsLike, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` most likely next tokens of the logit lens: (log-probabilities, ids), each
    (n_layers + 1, T, k), best first; one row of the full lens in memory at a time."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    tops = [row.topk(min(k, row.shape[-1]), dim=-1) for row in _lens_rows(model, ids)]
    return torch.stack([t.values for t in tops]), torch.stack([t.indices for t in tops])


# ---------------------------------------------------------------- what writes into the residual stream

def residual_contributions(model: GPT, ids: IdsLike) -> dict:
    """{"names": [...], "norms": Tensor (1 + 2 * n_layers, T)}: how much each part writes at each position.

    The residual stream is a sum: embeddings + block 0's attention output + block 0's feed-forward
    output + ... `norms[c, p]` is the length (L2 norm) of part c's vector at position p, named by
    `names[c]` ("embeddings", "block 0 attention", "block 0 feed-forward", ...). A long vector
    writes a lot; compare parts within a column. (In a post-LN model each sum is renormalised after
    it is made, so later parts are measured against a rescaled stream.)
    """
    ids = as_ids(model, ids)
    names, parts = ["embeddings"], []
    with looking(model) as handles:
        handles.append(model.blocks[0].register_forward_pre_hook(lambda m, args: parts.append(args[0])))
        for index, block in enumerate(model.blocks):
            names += [f"block {index} attention", f"block {index} feed-forward"]
            for module in (block.attn, block.ff):
                handles.append(module.register_forward_hook(lambda m, args, output: parts.append(output)))
        model(ids)
    norms = torch.stack([torch.linalg.vector_norm(part[0].float(), dim=-1) for part in parts])
    return {"names": names, "norms": norms.cpu()}


# ---------------------------------------------------------------- activation patching and head ablation

def target_logit(model: GPT, ids: IdsLike, target_id: int) -> float:
    """The head's score (logit) of `target_id` at the last position: the baseline of the two views below."""
    ids, target_id = as_ids(model, ids), check_target(model, target_id)
    with looking(model):
        return model(ids)[0, -1, target_id].float().item()


def patch_residual(model: GPT, clean_ids: IdsLike, corrupt_ids: IdsLike, target_id: int) -> torch.Tensor:
    """(n_layers, T): entry (l, p) is the logit of `target_id` at the last position of the corrupted run
    when the residual stream entering block l at position p is replaced by the clean run's.

    TransformerLens's residual-stream activation patching (`get_act_patch_resid_pre`). How to read
    it: the clean and corrupted texts differ in a few tokens (" Paris" vs " Rome"), so their answers
    differ; a cell that brings the clean answer back marks where, and at which depth, the deciding
    information sits. It starts at the changed token and moves to the last position by the end.
    Compare the cells with `target_logit` of the clean and of the corrupted text.
    """
    clean, corrupt = as_ids(model, clean_ids), as_ids(model, corrupt_ids)
    if clean.shape != corrupt.shape:
        raise ValueError(f"the clean and corrupted texts must have equal token counts: "
                         f"{clean.shape[1]} and {corrupt.shape[1]}")
    target_id = check_target(model, target_id)
    clean_streams = residual_streams(model, clean)
    n_tokens = clean.shape[1]
    result = torch.empty(model.config.n_layers, n_tokens)
    for layer, block in enumerate(model.blocks):
        for positions in _batches(n_tokens, n_tokens):
            def patch(x, layer=layer, positions=positions):
                # One copy of the corrupted stream per position, copy i patched at position i.
                where = torch.tensor(positions, device=x.device)
                x = x.repeat(len(where), 1, 1)
                x[torch.arange(len(where)), where] = clean_streams[layer][0, where]
                return x

            scores = _run_copies(model, corrupt, patch, block, len(positions))
            result[layer, positions.start:positions.stop] = scores[:, target_id].cpu()
    return result


def ablate_heads(model: GPT, ids: IdsLike, target_id: int) -> torch.Tensor:
    """(n_layers, n_heads): the logit of `target_id` at the last position when that one head's output
    (its context vectors, the head's slice of the attention output projection's input) is zeroed.

    How to read it: compare each cell with `target_logit(model, ids, target_id)`. A cell far below
    it is a head the prediction needs; one above it, a head that was arguing against it; most heads
    of a large model barely matter alone.
    """
    ids, target_id = as_ids(model, ids), check_target(model, target_id)
    n_heads, head_dim = model.config.n_heads, model.config.head_dim
    result = torch.empty(model.config.n_layers, n_heads)
    for layer, block in enumerate(model.blocks):
        for heads in _batches(n_heads, ids.shape[1]):
            def silence(context, heads=heads):
                # One copy per head; copy i has head heads[i]'s head_dim columns set to zero.
                context = context.repeat(len(heads), 1, 1)
                for row, head in enumerate(heads):
                    context[row, :, head * head_dim:(head + 1) * head_dim] = 0
                return context

            scores = _run_copies(model, ids, silence, block.attn.out_proj, len(heads))
            result[layer, heads.start:heads.stop] = scores[:, target_id].cpu()
    return result


def attribute_heads(model: GPT, ids: IdsLike, target_id: int) -> torch.Tensor:
    """(n_layers, n_heads): `ablate_heads` estimated from one forward and one backward pass.

    Attribution patching: the logit is treated as linear in each head's output z (its context
    vectors at every position), so silencing the head moves it by the gradient times the change,
    `logit + grad . (0 - z)`. Exact ablation runs the rest of the model once per head, about
    n_layers * n_heads / 2 passes of the text; this costs about three, and a long text's exact view
    takes minutes on a CPU where this takes seconds. It is an estimate: where silencing a head sets
    off large non-linear changes (a softmax that flips its choice), the two part ways. Read it as
    `ablate_heads`, and confirm a cell that matters with the exact view on a shorter text.
    """
    ids, target_id = as_ids(model, ids), check_target(model, target_id)
    n_heads, head_dim = model.config.n_heads, model.config.head_dim
    contexts: list[torch.Tensor] = []

    def leaf(module, args):
        # The residual stream entering block 0 as a leaf that needs gradients: every head's output
        # depends on it, so each is part of the graph, whether or not the weights need gradients.
        return (args[0].detach().requires_grad_(), *args[1:])

    with looking(model) as handles, torch.enable_grad():
        handles.append(model.blocks[0].register_forward_pre_hook(leaf))
        for block in model.blocks:
            handles.append(block.attn.out_proj.register_forward_pre_hook(
                lambda m, args: contexts.append(args[0])))
        handles.append(model.final_norm.register_forward_hook(_keep_last_position))
        logit = model(ids)[0, -1, target_id]
        grads = torch.autograd.grad(logit, contexts)   # the weights' gradients are never formed
    # grad . z per head: summed over positions and the head's head_dim columns of the context.
    change = torch.stack([(grad.float() * context.detach().float())[0].reshape(-1, n_heads, head_dim)
                          .sum(dim=(0, 2)) for grad, context in zip(grads, contexts, strict=True)])
    return (logit.detach().float() - change).cpu()


# ---------------------------------------------------------------- embeddings

def default_map_ids(model: GPT, count: int = 500) -> list[int]:
    """The tokens `embedding_map` shows when none are given: the whole vocabulary when it has at most
    `count` tokens (a character model), else the `count` tokens after GPT-2's 256 single bytes, which
    byte-level BPE merged first because they were the most frequent pairs in its training text."""
    vocab = model.config.vocab_size
    if vocab <= count:
        return list(range(vocab))
    start = 256 if vocab >= 256 + count else vocab - count
    return list(range(start, start + count))


def _map(table: torch.Tensor, rows: list[int], k: int) -> dict:
    """PCA to 2-D of table[rows] and each row's k nearest rows of the whole table by cosine similarity."""
    table = table.detach().float().cpu()
    index = torch.tensor(rows)
    vectors = table[index]
    centred = vectors - vectors.mean(dim=0)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
    xy = centred @ directions[:2].T
    # SVD's signs are arbitrary: point each axis the way its largest coordinate points, so a map
    # drawn twice looks the same.
    signs = torch.sign(xy.gather(0, xy.abs().argmax(dim=0, keepdim=True)))
    xy = xy * torch.where(signs == 0, 1.0, signs)
    if xy.shape[1] < 2:  # a single row has one (empty) component
        xy = F.pad(xy, (0, 2 - xy.shape[1]))
    variance = singular.pow(2)
    explained = variance[:2] / variance.sum() if variance.sum() > 0 else torch.zeros(min(2, len(variance)))
    unit = F.normalize(table, dim=-1)
    k = min(k, table.shape[0] - 1)
    neighbours, similarity = [], []
    for chunk in index.split(256):
        cosine = unit[chunk] @ unit.T                                   # (chunk, rows of the table)
        cosine[torch.arange(len(chunk)), chunk] = float("-inf")          # not itself
        top = cosine.topk(k, dim=-1)
        neighbours.append(top.indices)
        similarity.append(top.values)
    return {"ids": rows, "xy": xy, "explained": F.pad(explained, (0, 2 - len(explained))),
            "neighbours": torch.cat(neighbours), "similarity": torch.cat(similarity)}


def embedding_map(model: GPT, ids: IdsLike | None = None, k: int = 5, count: int = 500) -> dict:
    """{"tokens": map, "positions": map}: where embeddings lie relative to each other.

    Each map holds "ids" (the rows shown), "xy" (N, 2): their coordinates on the two directions
    along which those rows vary most (PCA), "explained" (2,): the share of their variance each
    direction holds, and "neighbours" / "similarity" (N, k): each row's k nearest rows of the whole
    table by cosine similarity (itself excluded). Tokens: `ids` (duplicates dropped), or
    `default_map_ids(model, count)`; positions: every position of the context.
    How to read it: tokens that sit close together (and are each other's neighbours) are used
    alike by the model, e.g. " Monday" and " Tuesday"; a trained model's positions trace a smooth
    curve, neighbouring positions next to each other.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if ids is None:
        rows = default_map_ids(model, count)
    else:
        rows = list(dict.fromkeys(as_ids(model, ids)[0].tolist()))
    positions = list(range(model.config.context_length))
    return {"tokens": _map(model.tok_emb.weight, rows, k),
            "positions": _map(model.pos_emb.weight, positions, k)}


# ---------------------------------------------------------------- feed-forward neurons

def top_neurons(model: GPT, text: str | IdsLike, block: int, k: int = 10, per_neuron: int = 5,
                tokenizer=None) -> dict:
    """The `k` feed-forward units of `block` that fire most on `text`, with the tokens they fire on.

    `text` is token ids, or a string with its `tokenizer`. A unit's activation is its value after
    the non-linearity (GELU or ReLU), one per position; units are ranked by their largest. Returns
    {"block", "ids", "neurons": [{"neuron": index in the hidden layer, "peak": largest activation,
    "positions": the `per_neuron` positions it fires most on, "activations": its values there,
    "token_ids": the tokens at those positions}, ...]}. How to read it: a unit that fires on every
    " the", or on numbers only, has learned a feature of the text; many units fire on no clear pattern.
    """
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("a text needs its tokenizer: pass tokenizer=, or give token ids")
        text = tokenizer.encode(text)
    ids, block = as_ids(model, text), check_block(model, block)
    if not isinstance(k, int) or k < 1 or not isinstance(per_neuron, int) or per_neuron < 1:
        raise ValueError(f"k and per_neuron must be positive integers, got {k!r} and {per_neuron!r}")
    found = []
    with looking(model) as handles:
        activation = model.blocks[block].ff.activation
        handles.append(activation.register_forward_hook(lambda m, args, output: found.append(output)))
        model(ids)
    values = found[0][0].float().cpu()                                  # (T, hidden)
    peaks = values.max(dim=0).values
    token_ids = ids[0].tolist()
    neurons = []
    for neuron in peaks.topk(min(k, len(peaks))).indices.tolist():
        top = values[:, neuron].topk(min(per_neuron, values.shape[0]))
        neurons.append({"neuron": neuron, "peak": peaks[neuron].item(), "positions": top.indices.tolist(),
                        "activations": top.values.tolist(),
                        "token_ids": [token_ids[p] for p in top.indices.tolist()]})
    return {"block": block, "ids": token_ids, "neurons": neurons}
