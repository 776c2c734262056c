"""The CPU engines bench_decode_cpu.py runs beside glassgpt, fed glassgpt's own weights.

- llama.cpp through its Python binding (`llama-cpp-python`): the weights are written to a GGUF
  file with the `gguf` package (F32, BF16 or Q8_0, the GPT-2 architecture llama.cpp knows), and
  decoded token by token with `Llama.eval`, picking the argmax of the logits in Python.
- ONNX Runtime: glassgpt's modules exported by `torch.onnx.export` (TorchScript exporter) as one
  graph that takes the past keys and values and returns the new ones, so decoding feeds one token
  a step; fp32, and int8 by ONNX Runtime's own dynamic quantisation of that graph.

Both are optional (`pip install .[bench]`; llama-cpp-python builds from source, see
docs/PERFORMANCE.md): `available()` says which are installed, and the bench skips the others.
Each engine is a `Contender`: `generate(ids, n)` -> n greedy new token ids, and `logits(ids)` ->
(T, vocab) logits of every position, for checking that they compute what glassgpt computes.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from glassgpt.model import LayerNorm


def available() -> dict[str, str | None]:
    """Engine name -> None when it can run here, else why not."""
    def missing(*modules):
        absent = [m for m in modules if importlib.util.find_spec(m) is None]
        return f"not installed ({', '.join(absent)}; see docs/PERFORMANCE.md)" if absent else None

    return {"llama.cpp": missing("llama_cpp", "gguf"), "ONNX Runtime": missing("onnxruntime", "onnx")}


@dataclass
class Contender:
    generate: Callable[[list[int], int], list[int]]
    logits: Callable[[list[int]], np.ndarray]


# ---------------------------------------------------------------- llama.cpp

def _gpt2_vocab() -> tuple[list[str], list[str]]:
    """GPT-2's tokens and merges in the byte-to-unicode spelling GGUF (like Hugging Face) uses."""
    from glassgpt.bpe import BPETokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):  # GPT-2's map: printable bytes stand for themselves, the rest move past 255
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte], extra = chr(256 + extra), extra + 1
    bpe = BPETokenizer.from_tiktoken_ranks()
    spell = ["".join(chars[b] for b in token) for token in bpe.tokens]
    merges = [f"{spell[left]} {spell[right]}" for (left, right), _ in bpe.merges()]
    return spell + ["<|endoftext|>"], merges


def write_gguf(model, path: str, kind: str) -> None:
    """glassgpt GPT-2 `model` -> a GGUF file llama.cpp loads as architecture "gpt2".

    `kind`: "F32", "BF16" or "Q8_0" for the matrices (the token embedding, which is also the tied
    output head, included); norms, biases and the position embedding stay F32.
    """
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.emb_dim)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_block_count(c.n_layers)
    writer.add_head_count(c.n_heads)
    writer.add_layer_norm_eps(c.norm_eps)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    tokens, merges = _gpt2_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    quant = {"F32": gguf.GGMLQuantizationType.F32, "BF16": gguf.GGMLQuantizationType.BF16,
             "Q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]

    def add(name, tensor, matrix=False):
        data = tensor.detach().float().cpu().numpy()
        if matrix and kind != "F32":
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, data)

    add("token_embd.weight", model.tok_emb.weight, matrix=True)
    add("position_embd.weight", model.pos_emb.weight)
    for i, block in enumerate(model.blocks):
        add(f"blk.{i}.attn_norm.weight", block.norm1.scale)
        add(f"blk.{i}.attn_norm.bias", block.norm1.shift)
        add(f"blk.{i}.attn_qkv.weight", block.attn.qkv.weight, matrix=True)
        add(f"blk.{i}.attn_qkv.bias", block.attn.qkv.bias)
        add(f"blk.{i}.attn_output.weight", block.attn.out_proj.weight, matrix=True)
        add(f"blk.{i}.attn_output.bias", block.attn.out_proj.bias)
        add(f"blk.{i}.ffn_norm.weight", block.norm2.scale)
        add(f"blk.{i}.ffn_norm.bias", block.norm2.shift)
        add(f"blk.{i}.ffn_up.weight", block.ff.expand.weight, matrix=True)
        add(f"blk.{i}.ffn_up.bias", block.ff.expand.bias)
        add(f"blk.{i}.ffn_down.weight", block.ff.contract.weight, matrix=True)
        add(f"blk.{i}.ffn_down.bias", block.ff.contract.bias)
    add("output_norm.weight", model.final_norm.scale)
    add("output_norm.bias", model.final_norm.shift)
    if not c.tie_weights:
        add("output.weight", model.out_head.weight, matrix=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp(model, directory: str, kind: str, threads: int) -> Contender:
    """llama.cpp holding `model`'s weights as `kind` (F32, BF16, Q8_0), `threads` threads."""
    from llama_cpp import Llama

    path = os.path.join(directory, f"gpt2-{kind}.gguf")
    if not os.path.exists(path):
        write_gguf(model, path, kind)
    n_ctx = model.config.context_length

    def load(all_logits: bool):
        return Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                     n_threads_batch=threads, logits_all=all_logits, verbose=False)

    llm, checker = load(False), []
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # without logits_all the binding keeps no copy: read llama.cpp's
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def generate(ids: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(ids)
        out = []
        for step in range(n):
            token = int(np.argmax(last_logits()))
            out.append(token)
            if step + 1 < n:
                llm.eval([token])
        return out

    def logits(ids: list[int]) -> np.ndarray:
        if not checker:  # a second context keeping every position's logits, made on first use
            checker.append(load(True))
        checker[0].reset()
        checker[0].eval(ids)
        return np.array(checker[0].scores[:len(ids)])

    return Contender(generate, logits)


# ---------------------------------------------------------------- ONNX Runtime

class _ConcatCache:
    """A layer cache for export: the past keys/values given as inputs, the new ones appended."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values, self.length = keys, values, 0

    def append(self, keys, values):
        self.keys, self.values = torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2)
        return self.keys, self.values


class _PastStep(torch.nn.Module):
    """(ids (1, T), past keys, past values (L, 1, H, S, hd)) -> (logits (1, T, V), keys, values
    (L, 1, H, S + T, hd)): glassgpt's modules, with the mask and positions computed from S."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, past_keys, past_values):
        m = self.model
        past, n = past_keys.shape[3], ids.shape[1]
        positions = torch.arange(n) + past
        mask = torch.arange(n + past)[None, :] <= positions[:, None]     # (T, S + T): look back only
        x = m.tok_emb(ids) + m.pos_emb(positions)
        keys, values = [], []
        for i, block in enumerate(m.blocks):
            cache = _ConcatCache(past_keys[i], past_values[i])
            x = block(x, cache, mask)
            keys.append(cache.keys)
            values.append(cache.values)
        return m.out_head(m.final_norm(x)), torch.stack(keys), torch.stack(values)


def export_onnx(model, path: str) -> None:
    c = model.config
    model = copy.deepcopy(model).eval()
    for module in model.modules():  # the tracer cannot take a traced width as layer_norm's shape
        if isinstance(module, LayerNorm):
            module.forward = partial(F.layer_norm, normalized_shape=(module.scale.shape[0],),
                                     weight=module.scale, bias=module.shift, eps=module.eps)
    empty = torch.zeros(c.n_layers, 1, c.n_heads, 0, c.head_dim)
    axes = {"ids": {1: "T"}, "past_keys": {3: "S"}, "past_values": {3: "S"}, "logits": {1: "T"},
            "keys": {3: "S_T"}, "values": {3: "S_T"}}
    with torch.no_grad():
        torch.onnx.export(_PastStep(model), (torch.zeros(1, 2, dtype=torch.long), empty, empty), path,
                          input_names=["ids", "past_keys", "past_values"],
                          output_names=["logits", "keys", "values"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)


def onnx_runtime(model, directory: str, kind: str, threads: int) -> Contender:
    """ONNX Runtime running `model` exported with past keys/values: kind "fp32", or "int8"
    (`onnxruntime.quantization.quantize_dynamic`: int8 weights, activations quantised per call)."""
    import onnxruntime as ort

    path = os.path.join(directory, "gpt2-fp32.onnx")
    if not os.path.exists(path):
        export_onnx(model, path)
    if kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantised = os.path.join(directory, "gpt2-int8.onnx")
        if not os.path.exists(quantised):
            quantize_dynamic(path, quantised, weight_type=QuantType.QInt8)
        path = quantised
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    c = model.config
    empty = np.zeros((c.n_layers, 1, c.n_heads, 0, c.head_dim), dtype=np.float32)

    def run(ids, keys, values):
        return session.run(None, {"ids": np.asarray([ids], dtype=np.int64), "past_keys": keys,
                                  "past_values": values})

    def generate(ids: list[int], n: int) -> list[int]:
        logits, keys, values = run(ids, empty, empty)
        out = []
        for step in range(n):
            token = int(np.argmax(logits[0, -1]))
            out.append(token)
            if step + 1 < n:
                logits, keys, values = run([token], keys, values)
        return out

    def logits(ids: list[int]) -> np.ndarray:
        return run(ids, empty, empty)[0][0]

    return Contender(generate, logits)
