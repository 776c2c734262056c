"""The walk-through: each concept of the model, computed step by step with the model's own parts.

Every topic is a function that builds small inputs, runs them through the real components of
`glassgpt.model` (`MultiHeadAttention`, `LayerNorm`, `GELU`, `FeedForward`, `TransformerBlock`,
`GPT`) and returns the steps as plain data, so the terminal (`glassgpt explain`) and the browser
(`/learn`) show the same numbers, and the tests check them against the tutorial's: the book "Build
a Large Language Model (From Scratch)" (see the README), chapters 2 to 5. The tokenization
sentences and the untrained-loss figure come from the project's specification instead.

    list_topics()                 -> [(name, title), ...]
    run_topic("attention")        -> {"topic", "title", "steps": [{"title", "text", ...data}, ...]}
    print_topic(result)           -> the steps as text and tables in the terminal

A step carries its data under a few keys: "tensor" (nested lists) with "shape", row "labels" and
"columns" and "heatmap" (draw it as a grid of shades); "table" (rows) with "columns"; "plot"
({"x", "series": [{"name", "y"}]}); "digits" (how many decimals to show).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import tiktoken
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from glassgpt.config import GPTConfig, get_preset
from glassgpt.generate import filter_logits
from glassgpt.inspect import record_attention
from glassgpt.model import GELU, GPT, FeedForward, LayerNorm, MultiHeadAttention
from glassgpt.tokenizer import CharTokenizer, get_tokenizer

SEED = 123  # the tutorial's seed: with it, freshly built components draw the tutorial's numbers

# "Your journey starts with one step": one 3-d embedding per word, the tutorial's running example.
WORDS = ["Your", "journey", "starts", "with", "one", "step"]
EMBEDDINGS = [
    [0.43, 0.15, 0.89],
    [0.55, 0.87, 0.66],
    [0.57, 0.85, 0.64],
    [0.22, 0.58, 0.33],
    [0.77, 0.25, 0.10],
    [0.05, 0.80, 0.55],
]
SENTENCES = ["Tokenization is fun!", "Unhelpful phrasing often hinders understanding."]
SAMPLING_PROMPT = "Every effort moves you"
SHORTCUT_LAYERS = [(3, 3), (3, 3), (3, 3), (3, 3), (3, 1)]  # the tutorial's sizes [3, 3, 3, 3, 3, 1]

# tiktoken's cl100k_base ranks (GPT-3.5/4): used only if already in tiktoken's cache, never fetched.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_EXAMPLE_IDS = [3404, 2065, 374, 2523, 0]  # "Tokenization is fun!" in cl100k_base

Step = dict
TopicFunction = Callable[[GPT | None, object | None], list[Step]]
_TOPICS: dict[str, tuple[str, TopicFunction]] = {}


def list_topics() -> list[tuple[str, str]]:
    """(name, title) of every topic, in teaching order."""
    return [(name, title) for name, (title, _) in _TOPICS.items()]


def run_topic(name: str, model: GPT | None = None, tokenizer=None) -> dict:
    """Compute one topic's steps: {"topic", "title", "steps": [...]}, all JSON-able.

    `model` and `tokenizer` are used by the topics about a whole model ("block", "gpt", "sampling");
    without them those topics build a small fresh model. The other topics build the tutorial's
    small components themselves. The global random state is left as it was.
    """
    if name not in _TOPICS:
        raise ValueError(f"unknown topic {name!r}; choose one of: {', '.join(_TOPICS)}")
    title, compute = _TOPICS[name]
    # The topics seed torch to draw the tutorial's numbers; a server sampling with the global
    # generator should not notice.
    with torch.random.fork_rng():
        steps = compute(model, tokenizer)
    return {"topic": name, "title": title, "steps": steps}


def _topic(name: str, title: str) -> Callable[[TopicFunction], TopicFunction]:
    def register(function: TopicFunction) -> TopicFunction:
        _TOPICS[name] = (title, function)
        return function
    return register


def _step(title: str, text: str, tensor: torch.Tensor | None = None, **data) -> Step:
    """One step: a title, a short explanation, and optionally a tensor and other data."""
    step = {"title": title, "text": text}
    if tensor is not None:
        step["tensor"] = tensor.detach().float().cpu().tolist()
        step["shape"] = list(tensor.shape)
    step.update(data)
    return step


def _fast_path_step(text: str, explicit: torch.Tensor, fused: torch.Tensor) -> Step:
    """The closing step of a component's topic: its fused kernel computes what the explicit maths does."""
    return _step("The fast path agrees", text,
                 table=[["largest |explicit - fused|", (explicit - fused).abs().max().item()]],
                 columns=["check", "value"], digits=8)


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(n) for n in tensor.shape) + ")"


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _record_outputs(modules: dict[str, nn.Module]):
    """Forward hooks that note each module's output in call order; returns (records, remove)."""
    records: list[tuple[str, torch.Tensor]] = []

    def hook_for(label: str):
        def hook(module, inputs, output):
            records.append((label, output))
        return hook

    handles = [module.register_forward_hook(hook_for(label)) for label, module in modules.items()]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return records, remove


def _inputs() -> torch.Tensor:
    return torch.tensor(EMBEDDINGS)


def _single_head_attention(causal: bool) -> MultiHeadAttention:
    """The tutorial's one-head attention (d_in 3, d_out 2) made from the real component.

    Built right after seeding, its fused Q/K/V projection holds the numbers of the tutorial's three
    separate projections created in the order query, key, value. The tutorial's version has no
    output projection, so ours is replaced by the identity.
    """
    torch.manual_seed(SEED)
    attention = MultiHeadAttention(3, 2, n_heads=1, dropout=0.0, qkv_bias=False, causal=causal)
    attention.out_proj = nn.Identity()
    return attention.eval()


# --------------------------------------------------------------------------------------------
# Tokenization


def _word_tokens(text: str) -> list[str]:
    """Words and punctuation marks, each its own token."""
    return re.findall(r"\w+|[^\w\s]", text)


def _offline_cl100k():
    """tiktoken's cl100k_base encoding if its ranks file is already cached; None otherwise.

    Mirrors where tiktoken caches files, and checks the hash first, because on a missing or
    damaged cache file tiktoken would download it, and glassgpt never downloads at run time.
    """
    default_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", default_dir))
    if not cache_dir:
        return None
    path = Path(cache_dir) / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != CL100K_SHA256:
        return None
    return tiktoken.get_encoding("cl100k_base")


@_topic("tokenization", "Tokenization: words, characters, byte pairs")
def tokenization(model, tokenizer) -> list[Step]:
    words = [_word_tokens(s) for s in SENTENCES]
    chars = [CharTokenizer.from_text(s) for s in SENTENCES]
    gpt2 = get_tokenizer("gpt2")
    bpe_ids = [gpt2.encode(s) for s in SENTENCES]
    steps = [
        _step("Words",
              "Split at spaces and keep punctuation apart. Few tokens per sentence, but every word form "
              "needs its own id, the vocabulary never ends, and a word not seen in training has no id.",
              table=[[s, " | ".join(w), len(w)] for s, w in zip(SENTENCES, words, strict=True)],
              columns=["sentence", "tokens", "count"]),
        _step("Characters",
              "One id per character: a tiny vocabulary that can spell anything, but sequences get long "
              "and a single character carries little meaning, so the model must learn to spell first.",
              table=[[s, len(s), t.vocab_size, str(t.encode(s)[:12])[:-1] + ", ...]"]
                     for s, t in zip(SENTENCES, chars, strict=True)],
              columns=["sentence", "tokens", "distinct characters", "ids (first 12, own vocabulary)"]),
        _step("Byte-pair encoding (GPT-2)",
              "Start from bytes and repeatedly merge the most frequent neighbouring pair into a new token. "
              "Common words become one token, rare ones split into familiar pieces, and any text can be "
              "encoded. GPT-2 learned 50,000 merges; its vocabulary has 50,257 ids.",
              table=[[s, " | ".join(gpt2.token_strings(ids)), str(ids), len(ids)]
                     for s, ids in zip(SENTENCES, bpe_ids, strict=True)],
              columns=["sentence", "tokens", "ids", "count"]),
    ]
    cl100k = _offline_cl100k()
    if cl100k is None:
        steps.append(_step(
            "cl100k_base (GPT-3.5 and GPT-4)",
            "A larger byte-pair vocabulary (about 100,000 ids). No offline copy of its ranks file is "
            "available here and glassgpt never downloads at run time, so it is not shown. In it, "
            f"\"{SENTENCES[0]}\" is the ids {CL100K_EXAMPLE_IDS}.",
            available=False))
    else:
        rows = []
        for s in SENTENCES:
            ids = cl100k.encode(s)
            pieces = [cl100k.decode_single_token_bytes(i).decode("utf-8", errors="replace") for i in ids]
            rows.append([s, " | ".join(pieces), str(ids), len(ids)])
        steps.append(_step(
            "cl100k_base (GPT-3.5 and GPT-4)",
            "A larger byte-pair vocabulary (about 100,000 ids) from tiktoken's local cache: more merges, "
            "so fewer tokens for the same text.",
            table=rows, columns=["sentence", "tokens", "ids", "count"], available=True))
    steps.append(_step(
        "Counts side by side",
        "Byte pairs sit between words and characters: a bounded vocabulary and short sequences.",
        table=[["words", *(len(w) for w in words)],
               ["characters", *(len(s) for s in SENTENCES)],
               ["distinct characters", *(t.vocab_size for t in chars)],
               ["GPT-2 byte pairs", *(len(ids) for ids in bpe_ids)]],
        columns=["tokenizer", *SENTENCES]))
    return steps


# --------------------------------------------------------------------------------------------
# Attention


@_topic("attention", "Self-attention, from dot products to trainable Q, K, V")
@torch.no_grad()
def attention(model, tokenizer) -> list[Step]:
    inputs = _inputs()                                          # (6 tokens, 3)
    journey = inputs[1]
    scores = inputs @ journey                                   # (6,)
    weights = torch.softmax(scores, dim=0)
    all_weights = torch.softmax(inputs @ inputs.T, dim=-1)      # (6, 6)

    attention = _single_head_attention(causal=False)
    qkv = attention.qkv(inputs)                                 # (6, 6): queries | keys | values
    context, (head_weights,) = record_attention(attention, inputs.unsqueeze(0))
    return [
        _step("Six tokens, six vectors",
              "Each token of \"Your journey starts with one step\" is a 3-d embedding. Attention will "
              "replace each vector by a context vector: a mix of all the vectors, weighted by relevance.",
              inputs, labels=WORDS, columns=["x1", "x2", "x3"], digits=2),
        _step("Scores for \"journey\"",
              "How well does each token match \"journey\"? The dot product of the two vectors: large "
              "when they point the same way.",
              scores, labels=WORDS),
        _step("Weights for \"journey\"",
              "Softmax turns the scores into positive weights that sum to 1.",
              weights, labels=WORDS, heatmap=True),
        _step("Context vector for \"journey\"",
              "The weighted sum of all six vectors, using those weights.",
              weights @ inputs, columns=["x1", "x2", "x3"]),
        _step("Every token at once",
              "One matrix product scores every pair of tokens; softmax along each row gives each "
              "token's weights (row: the token that looks, column: the token looked at).",
              all_weights, labels=WORDS, columns=WORDS, heatmap=True),
        _step("All context vectors",
              "The weight matrix times the inputs: one context vector per token.",
              all_weights @ inputs, labels=WORDS, columns=["x1", "x2", "x3"]),
        _step("Trainable query, key and value projections",
              "Raw embeddings decide relevance only by similarity. Learned projections let the model choose: "
              "the query says what a token looks for, the key what it offers, the value what it passes on. "
              "MultiHeadAttention holds the three as one Linear layer (3 -> 6) whose rows are W_query, "
              "W_key and W_value; built right after torch.manual_seed(123), they are the tutorial's numbers.",
              attention.qkv.weight, labels=["W_query row 1", "W_query row 2", "W_key row 1", "W_key row 2",
                                            "W_value row 1", "W_value row 2"],
              columns=["x1", "x2", "x3"]),
        _step("Queries, keys and values",
              "One matrix product projects every token to a 2-d query, key and value.",
              qkv, labels=WORDS, columns=["query 1", "query 2", "key 1", "key 2", "value 1", "value 2"]),
        _step("Scaled attention weights",
              "Scores are now query . key, divided by sqrt(2) (the key width) before the softmax.",
              head_weights[0, 0], labels=WORDS, columns=WORDS, heatmap=True),
        _step("Context vectors from the values",
              "Each token's output is the weighted sum of the values (2-d now: d_out = 2).",
              context[0], labels=WORDS, columns=["out 1", "out 2"]),
    ]


@_topic("scaling", "Why scores are divided by sqrt(d)")
@torch.no_grad()
def scaling(model, tokenizer) -> list[Step]:
    scores = torch.tensor([0.1, -0.2, 0.3, -0.2, 0.5])
    torch.manual_seed(SEED)
    rows = []
    for dim in (4, 16, 64, 256, 1024):
        queries, keys = torch.randn(4000, dim), torch.randn(4000, dim)
        dots = (queries * keys).sum(dim=-1)
        rows.append([dim, dots.var().item(), (dots / math.sqrt(dim)).var().item()])
    gpt2_head = get_preset("gpt2").head_dim
    return [
        _step("Softmax of small and large scores",
              "The same scores, then multiplied by 8. Softmax of large scores is nearly one-hot: almost all "
              "the weight lands on the largest score and the gradients of the others almost vanish.",
              torch.stack([torch.softmax(scores, dim=0), torch.softmax(8 * scores, dim=0)]),
              labels=["softmax(x)", "softmax(8x)"], columns=[f"x{i}" for i in range(1, 6)], heatmap=True),
        _step("Dot products grow with the width",
              "For random queries and keys with unit variance, q . k sums d products, so its variance is "
              "about d. Dividing by sqrt(d) brings it back near 1 at every width (4,000 random pairs each).",
              table=rows, columns=["width d", "variance of q . k", "variance of q . k / sqrt(d)"],
              digits=2),
        _step("In the model",
              "MultiHeadAttention divides every score by sqrt(head_dim). "
              f"GPT-2's heads are {gpt2_head} wide, so its scores are divided by {math.sqrt(gpt2_head):g}."),
    ]


@_topic("causal", "The causal mask: no peeking at later tokens")
@torch.no_grad()
def causal(model, tokenizer) -> list[Step]:
    inputs = _inputs()
    attention = _single_head_attention(causal=True)
    context, (weights,) = record_attention(attention, inputs.unsqueeze(0))
    weights = weights[0, 0]                                     # (6, 6)
    mask = MultiHeadAttention.causal_mask(6, 6, start=0, device="cpu")
    torch.manual_seed(SEED)
    dropout = nn.Dropout(0.5).train()
    return [
        _step("The mask",
              "A language model predicts each next token from the tokens before it, so during training a "
              "token must not see later ones. 1 marks the pairs hidden from attention: everything above the "
              "diagonal.",
              mask.int(), labels=WORDS, columns=WORDS, digits=0),
        _step("Causal attention weights",
              "Hidden scores are set to -infinity before the softmax, so their weights come out exactly 0 "
              "and the remaining weights of each row are renormalised among the visible tokens "
              "(same projections as before: seed 123, no dropout).",
              weights, labels=WORDS, columns=WORDS, heatmap=True),
        _step("Every row still sums to 1",
              "The softmax ran over the visible tokens only.",
              weights.sum(dim=-1), labels=WORDS),
        _step("Causal context vectors",
              "\"Your\" sees only itself, so its output is its own value vector.",
              context[0], labels=WORDS, columns=["out 1", "out 2"]),
        _step("Dropout on the weights (training only)",
              "During training, dropout zeroes a random share of the attention weights (here half) and "
              "scales the rest by 1 / (1 - 0.5) = 2 so the expected total is unchanged. It is off when "
              "generating.",
              dropout(weights), labels=WORDS, columns=WORDS, heatmap=True),
    ]


@_topic("multihead", "Multi-head attention: one projection, split into heads")
@torch.no_grad()
def multihead(model, tokenizer) -> list[Step]:
    batch = torch.stack([_inputs(), _inputs()])                 # (2, 6, 3): two copies
    torch.manual_seed(SEED)
    attention = MultiHeadAttention(3, 2, n_heads=2, dropout=0.0, qkv_bias=False).eval()
    concatenated = []
    handle = attention.out_proj.register_forward_hook(
        lambda module, inputs, output: concatenated.append(inputs[0]))
    try:
        output, (weights,) = record_attention(attention, batch)
    finally:
        handle.remove()
    fused_output = attention(batch)
    d_out, heads = attention.d_out, attention.n_heads
    shapes = [
        ["input", _shape(batch)],
        ["queries | keys | values (one Linear 3 -> 6)", _shape(attention.qkv(batch))],
        ["queries, keys, values split into heads", f"3 x (2, {heads}, 6, {attention.head_dim})"],
        ["attention weights per head", _shape(weights)],
        ["heads concatenated", _shape(concatenated[0])],
        ["output projection", _shape(output)],
    ]
    return [
        _step("Shapes through the layer",
              f"d_out = {d_out} is split into {heads} heads of {attention.head_dim}: each head attends with "
              "its own slice of the queries, keys and values, in parallel, then the slices are concatenated "
              "and mixed by an output projection. The batch holds two copies of the six tokens.",
              table=shapes, columns=["stage", "shape"]),
        *[_step(f"Head {h + 1}: attention weights",
                "Each head computes its own causal weights from its own slice.",
                weights[0, h], labels=WORDS, columns=WORDS, heatmap=True)
          for h in range(heads)],
        _step("Heads concatenated",
              "Each head's context vectors side by side (one column per head here).",
              concatenated[0][0], labels=WORDS, columns=[f"head {h + 1}" for h in range(heads)]),
        _step("Output",
              "The output projection mixes the heads (first sequence of the batch; seed 123, dropout 0).",
              output[0], labels=WORDS, columns=["out 1", "out 2"]),
        _fast_path_step("The same layer on PyTorch's fused scaled_dot_product_attention kernel gives the "
                        "same output; the largest difference is float rounding.", output, fused_output),
    ]


# --------------------------------------------------------------------------------------------
# Normalisation, activation, shortcuts


@_topic("layernorm", "Layer normalisation")
@torch.no_grad()
def layernorm(model, tokenizer) -> list[Step]:
    torch.manual_seed(SEED)
    batch = torch.randn(2, 5)
    norm = LayerNorm(5)
    norm.fused = False  # the explicit maths; the fused kernel is compared below
    normalised = norm(batch)
    norm.fused = True
    fused = norm(batch)

    def stats(x: torch.Tensor) -> list[list]:
        return [[f"row {i + 1}", row.mean().item(), row.var(unbiased=False).item()]
                for i, row in enumerate(x)]

    return [
        _step("Two vectors", "torch.manual_seed(123); torch.randn(2, 5).", batch,
              labels=["row 1", "row 2"], table=stats(batch), columns=["", "mean", "variance"]),
        _step("Normalised",
              "Subtract each vector's mean and divide by its standard deviation (with a small eps against "
              "division by zero): every vector comes out with mean 0 and variance 1, whatever its scale, "
              "which keeps deep networks' activations in a steady range.",
              normalised, labels=["row 1", "row 2"], table=stats(normalised),
              columns=["", "mean", "variance"]),
        _step("Learned scale and shift",
              "Then each dimension is multiplied by a learned scale and shifted by a learned shift, so "
              "training can undo the normalisation where that helps. They start at 1 and 0.",
              torch.stack([norm.scale, norm.shift]), labels=["scale", "shift"], digits=1),
        _fast_path_step("torch's fused layer_norm kernel gives the same numbers.", normalised, fused),
    ]


@_topic("gelu", "GELU versus ReLU, and the feed-forward block")
@torch.no_grad()
def gelu(model, tokenizer) -> list[Step]:
    activation = GELU()
    activation.fused = False  # the tanh formula as written in the tutorial
    table_x = torch.linspace(-3, 3, 13)
    plot_x = torch.linspace(-3, 3, 61)
    torch.manual_seed(SEED)
    feed_forward = FeedForward(768, 4 * 768, activation="gelu").eval()
    x = torch.rand(2, 3, 768)
    records, remove = _record_outputs({
        "expand (768 -> 3072)": feed_forward.expand,
        "GELU": feed_forward.activation,
        "contract (3072 -> 768)": feed_forward.contract,
    })
    try:
        feed_forward(x)
    finally:
        remove()
    return [
        _step("GELU and ReLU",
              "ReLU cuts every negative input to 0 and has a kink at 0. GELU (GPT-2's tanh approximation, "
              "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))) is smooth, dips slightly below 0 for small "
              "negative inputs and lets their gradient through, which helps training.",
              table=[[x.item(), activation(x).item(), torch.relu(x).item()] for x in table_x],
              columns=["x", "GELU(x)", "ReLU(x)"],
              plot={"x": plot_x.tolist(),
                    "series": [{"name": "GELU", "y": activation(plot_x).tolist()},
                               {"name": "ReLU", "y": torch.relu(plot_x).tolist()}],
                    "x_label": "x", "y_label": "activation"}),
        _step("Where GELU sits: the feed-forward block",
              "Each token's vector is expanded 4x (768 -> 3072 in GPT-2), passed through GELU, and "
              "contracted back: room to compute features, applied to every token separately.",
              table=[["input", _shape(x)], *[[label, _shape(out)] for label, out in records]],
              columns=["stage", "shape"]),
        _step("Its parameters",
              "Two weight matrices and their biases: 768 x 3072 + 3072 + 3072 x 768 + 768.",
              table=[["expand", _count(feed_forward.expand)], ["contract", _count(feed_forward.contract)],
                     ["total", _count(feed_forward)]],
              columns=["layer", "parameters"]),
    ]


def _shortcut_gradients(use_shortcut: bool) -> list[float]:
    """Mean absolute weight gradient of each layer of the tutorial's 5-layer GELU network."""
    torch.manual_seed(SEED)
    layers = nn.ModuleList(nn.Sequential(nn.Linear(n_in, n_out), GELU()) for n_in, n_out in SHORTCUT_LAYERS)
    for layer in layers:
        # The tutorial's tanh formula; the fused kernel rounds a few last float digits differently.
        layer[1].fused = False
    x = torch.tensor([[1.0, 0.0, -1.0]])
    for layer in layers:
        out = layer(x)
        x = x + out if use_shortcut and out.shape == x.shape else out
    loss = nn.functional.mse_loss(x, torch.tensor([[0.0]]))
    loss.backward()
    return [layer[0].weight.grad.abs().mean().item() for layer in layers]


@_topic("shortcut", "Shortcut connections keep gradients alive")
def shortcut(model, tokenizer) -> list[Step]:
    gradients = torch.tensor([_shortcut_gradients(False), _shortcut_gradients(True)])
    layers = [f"layer {i}" for i in range(1, 6)]
    return [
        _step("A deep, narrow network",
              "Five Linear + GELU layers of sizes 3 -> 3 -> 3 -> 3 -> 3 -> 1 (seed 123), one input "
              "[1, 0, -1], target 0, squared-error loss. We backpropagate once and look at each layer's mean "
              "absolute weight gradient.",
              table=[[f"layer {i}", f"{n_in} -> {n_out}"]
                     for i, (n_in, n_out) in enumerate(SHORTCUT_LAYERS, 1)],
              columns=["layer", "sizes"]),
        _step("Gradients without and with shortcuts",
              "Without shortcuts the gradient shrinks at every layer on the way back: the first layer gets "
              "about 25x less than the last and barely learns. With shortcuts (x + layer(x) wherever the "
              "shapes match) the gradient flows back through the additions undiminished. Every transformer "
              "block adds its attention and feed-forward outputs to a shortcut for this reason.",
              gradients, labels=["without shortcuts", "with shortcuts"], columns=layers, digits=8),
    ]


# --------------------------------------------------------------------------------------------
# The block, the model, sampling


def _fresh(config: GPTConfig) -> GPT:
    torch.manual_seed(SEED)
    return GPT(config).eval()


@_topic("block", "The transformer block")
@torch.no_grad()
def block(model, tokenizer) -> list[Step]:
    config = model.config if model is not None else get_preset("nano")
    layer = model.blocks[0] if model is not None else _fresh(config).blocks[0]
    weight = layer.norm1.scale
    torch.manual_seed(SEED)
    x = torch.randn(2, min(4, config.context_length), config.emb_dim,
                    device=weight.device, dtype=weight.dtype)
    records, remove = _record_outputs({
        "norm1 (LayerNorm)": layer.norm1,
        f"attention ({config.n_heads} heads)": layer.attn,
        "norm2 (LayerNorm)": layer.norm2,
        "feed-forward expand": layer.ff.expand,
        f"feed-forward {config.activation.upper()}": layer.ff.activation,
        "feed-forward contract": layer.ff.contract,
    })
    try:
        out = layer(x)
    finally:
        remove()
    order = ("x + attention(norm1(x)), then x + feed-forward(norm2(x))" if config.norm_placement == "pre"
             else "norm1(x + attention(x)), then norm2(x + feed-forward(x))")
    source = ("block 0 of the loaded model" if model is not None
              else f"a fresh block of the {config.name} preset")
    return [
        _step("Inside one block",
              f"{source.capitalize()}: {order}. LayerNorm keeps the inputs of each sub-layer in range, "
              "attention mixes information between tokens, the feed-forward layer works on each token alone, "
              "and the shortcuts (the additions) carry the input and its gradient straight through.",
              table=[["emb_dim", config.emb_dim], ["n_heads", config.n_heads], ["head_dim", config.head_dim],
                     ["feed-forward width", config.hidden_dim], ["norm placement", config.norm_placement]],
              columns=["setting", "value"]),
        _step("Shapes through the block",
              "A batch of 2 sequences of random vectors, in the order the block computes them.",
              table=[["input", _shape(x)], *[[label, _shape(t)] for label, t in records],
                     ["output", _shape(out)]],
              columns=["stage", "shape"]),
        _step("Same shape in, same shape out",
              "The block maps (batch, tokens, emb_dim) to the same shape, so blocks stack: GPT-2 small has "
              "12, GPT-2 XL 48.",
              table=[["input", _shape(x)], ["output", _shape(out)]], columns=["", "shape"]),
        _step("Parameters of one block",
              "Attention: the Q/K/V projection and the output projection. Feed-forward: expand and contract. "
              "Norms: a scale and a shift each.",
              table=[["attention", _count(layer.attn)], ["feed-forward", _count(layer.ff)],
                     ["norms", _count(layer.norm1) + _count(layer.norm2)], ["total", _count(layer)]],
              columns=["part", "parameters"]),
    ]


@_topic("gpt", "The whole GPT")
@torch.no_grad()
def gpt(model, tokenizer) -> list[Step]:
    live = model is not None
    model = model if live else _fresh(get_preset("nano"))
    config = model.config
    device = model.tok_emb.weight.device
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, config.vocab_size, (2, min(4, config.context_length)),
                        generator=generator).to(device)
    watched = {"token embedding": model.tok_emb, "position embedding": model.pos_emb,
               "embeddings summed (after dropout)": model.drop_emb}
    watched |= {f"block {i}": b for i, b in enumerate(model.blocks)}
    watched |= {"final norm": model.final_norm, "output head (logits)": model.out_head}
    records, remove = _record_outputs(watched)
    try:
        model(ids)
    finally:
        remove()

    # An untrained model knows nothing, so it should spread its probability evenly over the vocabulary:
    # cross-entropy ln(vocab_size).
    fresh = _fresh(config)
    n_tokens = min(32, config.context_length)
    tokens = torch.randint(0, config.vocab_size, (4, n_tokens + 1), generator=generator)
    logits = fresh(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).item()
    source = "the loaded model" if live else f"a fresh {config.name} model"
    return [
        _step("The configuration",
              f"{source.capitalize()}: {config.n_layers} blocks of {config.n_heads} heads, "
              f"{config.emb_dim} wide.",
              table=[["vocabulary", config.vocab_size], ["context length", config.context_length],
                     ["embedding width", config.emb_dim], ["heads", config.n_heads],
                     ["blocks", config.n_layers],
                     ["feed-forward width", config.hidden_dim],
                     # Words, so the column's numbers are all counts (the page shows them as such).
                     ["tied output head", "yes" if config.tie_weights else "no"],
                     ["dropout", f"{config.drop_rate:g}"]],
              columns=["setting", "value"]),
        _step("Shapes through the model",
              "Token ids become vectors (token embedding + position embedding), pass through every block "
              "unchanged in shape, are normalised, and the output head scores every vocabulary entry as the "
              "next token.",
              table=[["token ids", _shape(ids)], *[[label, _shape(t)] for label, t in records]],
              columns=["stage", "shape"]),
        _step("Where the parameters are",
              "Counted from the modules. With a tied head the output layer reuses the token-embedding "
              "matrix.",
              table=[[name, count] for name, count in model.parameter_breakdown()],
              columns=["component", "parameters"]),
        _step("An untrained model's loss",
              f"A fresh model with this configuration, on {tokens.shape[0]} x {n_tokens} random tokens: "
              "having learned nothing, it gives every token about the same probability, so its cross-entropy "
              f"is close to ln({config.vocab_size:,}). Training starts from here (with 10,000 tokens: "
              "about 9.2 to 9.3, against ln 10,000 = 9.21).",
              table=[["loss", loss], [f"ln({config.vocab_size:,})", math.log(config.vocab_size)],
                     ["perplexity exp(loss)", math.exp(loss)]],
              columns=["", "value"], digits=4, loss=loss, ln_vocab=math.log(config.vocab_size)),
    ]


def _prompt_ids(tokenizer, context_length: int) -> tuple[str, list[int]]:
    """The sampling prompt's ids, or a few of the vocabulary's own tokens if it cannot spell it."""
    try:
        prompt = SAMPLING_PROMPT
        ids = tokenizer.encode(prompt)
    except ValueError:  # a character vocabulary without these letters
        ids = list(range(min(4, tokenizer.vocab_size)))
        prompt = tokenizer.decode(ids)
    return prompt, ids[-context_length:]


@_topic("sampling", "Choosing the next token: temperature, top-k, top-p")
@torch.no_grad()
def sampling(model, tokenizer) -> list[Step]:
    if model is None:
        # Untrained and small: its distribution is nearly flat. Pass a trained model to see preferences.
        model = _fresh(GPTConfig(name="small random", vocab_size=50257, context_length=32, emb_dim=32,
                                 n_heads=2, n_layers=2))
    if tokenizer is None:
        if model.config.vocab_size != get_tokenizer("gpt2").vocab_size:
            raise ValueError(f"the model's vocabulary has {model.config.vocab_size:,} ids, not GPT-2's: "
                             "pass its tokenizer too")
        tokenizer = get_tokenizer("gpt2")

    def piece(token_id: int) -> str:
        """The token's text in quotes, so that spaces show."""
        return repr(tokenizer.token_strings([token_id])[0])

    prompt, ids = _prompt_ids(tokenizer, model.config.context_length)
    device = model.tok_emb.weight.device
    logits = model(torch.tensor([ids], device=device))[0, -1].float().cpu()   # (vocab,)
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, min(8, len(probs))).indices.tolist()
    temperatures = (0.5, 1.0, 2.0)
    by_temperature = [torch.softmax(logits / t, dim=-1) for t in temperatures]

    def kept_rows(filtered_logits: torch.Tensor) -> tuple[list[list], int, float]:
        kept = torch.isfinite(filtered_logits)
        renormalised = torch.softmax(filtered_logits, dim=-1)
        order = torch.argsort(renormalised, descending=True)[: min(8, int(kept.sum()))].tolist()
        rows = [[piece(i), i, probs[i].item(), renormalised[i].item()] for i in order]
        return rows, int(kept.sum()), probs[kept].sum().item()

    top_k, top_p = 5, 0.9
    k_rows, k_kept, k_mass = kept_rows(filter_logits(logits, top_k=top_k))
    p_rows, p_kept, p_mass = kept_rows(filter_logits(logits, top_p=top_p))
    greedy = int(logits.argmax())
    return [
        _step("The prompt",
              f"\"{prompt}\" as {len(ids)} token ids. The model returns one row of logits per position; the "
              "last row scores every vocabulary entry as the next token.",
              table=[[piece(i), i] for i in ids], columns=["token", "id"]),
        _step("Logits to probabilities",
              f"Softmax over all {len(probs):,} logits; the most likely next tokens. Greedy decoding always "
              f"picks the first: {piece(greedy)}.",
              table=[[piece(i), i, logits[i].item(), probs[i].item()] for i in top],
              columns=["token", "id", "logit", "probability"]),
        _step("Temperature",
              "Dividing the logits by a temperature before the softmax: below 1 sharpens the distribution "
              "towards the favourite, above 1 flattens it towards uniform (more surprising text).",
              table=[[piece(i), i, *(p[i].item() for p in by_temperature)] for i in top],
              columns=["token", "id", *(f"T = {t:g}" for t in temperatures)],
              temperatures=list(temperatures),
              top_probability=[p.max().item() for p in by_temperature]),
        _step(f"Top-k (k = {top_k})",
              f"Keep only the {top_k} most likely tokens, set the others' logits to -infinity, and "
              "renormalise: the long tail of unlikely tokens can never be drawn.",
              table=k_rows, columns=["token", "id", "probability", "after top-k"],
              kept=k_kept, kept_mass=k_mass),
        _step(f"Top-p (p = {top_p:g})",
              f"Keep the smallest set of most likely tokens whose probabilities add up to {top_p:g}, then "
              f"renormalise: {p_kept:,} tokens here, holding {p_mass:.4f} of the probability. A confident "
              "model keeps few, an unsure one many.",
              table=p_rows, columns=["token", "id", "probability", "after top-p"],
              kept=p_kept, kept_mass=p_mass),
    ]


# --------------------------------------------------------------------------------------------
# The terminal view (the browser view is serve/static/learn.js)


def format_value(value, digits: int = 4) -> str:
    """A table cell: ints with thousands separators, floats to `digits` decimals (tiny ones in e-notation)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and abs(value) < 0.5 * 10 ** -digits:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def _heat(value: float, low: float, high: float) -> str:
    """A background shade for a heatmap cell: darker blue for larger values."""
    share = 0.0 if high <= low else (value - low) / (high - low)
    return f"on rgb({int(255 - 180 * share)},{int(255 - 120 * share)},255)"


def _tensor_tables(step: Step):
    """rich Tables for a step's tensor: one for a vector or matrix, one per slice above that."""
    digits = step.get("digits", 4)
    tensor = step["tensor"]
    if not isinstance(tensor, list):
        tensor = [tensor]
    if len(step["shape"]) <= 1:  # a vector reads best as one row under its labels
        matrix, labels, columns = [tensor], [""], step.get("labels") or step.get("columns")
    elif len(step["shape"]) == 2:
        matrix, labels, columns = tensor, step.get("labels"), step.get("columns")
    else:
        for index, part in enumerate(tensor):
            yield from _tensor_tables({**step, "tensor": part, "shape": step["shape"][1:], "index": index})
        return
    columns = columns or [str(j) for j in range(len(matrix[0]))]
    labels = labels or [str(i) for i in range(len(matrix))]
    values = [v for row in matrix for v in row]
    low, high = min(values), max(values)
    title = f"[{step['index']}]" if "index" in step else None
    table = Table(title=title, show_edge=False, pad_edge=False)
    table.add_column("")
    for column in columns:
        table.add_column(Text(str(column)), justify="right")
    for label, row in zip(labels, matrix, strict=True):
        cells = [Text(format_value(v, digits),
                      style=_heat(v, low, high) + " black" if step.get("heatmap") else "")
                 for v in row]
        table.add_row(Text(str(label)), *cells)
    yield table


def _data_table(step: Step):
    digits = step.get("digits", 4)
    columns = step.get("columns") or [""] * len(step["table"][0])
    table = Table(show_edge=False, pad_edge=False)
    for index, column in enumerate(columns):
        numeric = all(isinstance(row[index], int | float) and not isinstance(row[index], bool)
                      for row in step["table"])
        table.add_column(Text(str(column)), justify="right" if numeric else "left")
    for row in step["table"]:
        table.add_row(*(Text(format_value(v, digits)) for v in row))
    return table


def print_topic(result: dict, console=None) -> None:
    """Print a `run_topic` result: numbered steps, their text, tensors and tables (rich formatting)."""
    console = console or Console()
    console.rule(Text(result["title"], style="bold"))
    for number, step in enumerate(result["steps"], 1):
        console.print()
        console.print(Text(f"{number}. {step['title']}", style="bold cyan"))
        console.print(Text(step["text"]))
        if "tensor" in step:
            console.print(Text(f"shape {tuple(step['shape'])}", style="dim"))
            for table in _tensor_tables(step):
                console.print(table)
        if "table" in step:
            console.print(_data_table(step))
        if "plot" in step:
            console.print(Text("(drawn as a plot on the /learn page of `glassgpt serve`)", style="dim"))
