"""The inside views' speed: POST /api/inspect with every view on a 256-token text of verdict-162m.

    PYTHONPATH=src python bench/bench_inspect.py [--tokens 256] [--rounds 3] [--peer] [--patch-tokens 32]

verdict-162m's shape (GPT-2 small's body with an untied 50,257-token head, 162M parameters) with
seeded random weights, GPT-2's tokenizer, and the first `--tokens` tokens of The Verdict. The app
runs in a real uvicorn on loopback (serve.background) with its token bounds raised to the text's
length, and is called over HTTP as the /inside page calls it:

- "no views": /api/inspect's plain answer (tokens, the top-10 next tokens, every head's attention);
- each view alone: the work /api/inspect does for it (`inspect_report.report`, the server's own
  call), in process, with the size of its JSON; the heads view as the server runs it past its exact
  bound (attribution patching), and with `--exact-heads` the exact ablation as well;
- "all views": one POST /api/inspect naming every view, end to end (model work, JSON, transfer);
- /api/patch on a clean and corrupted pair of `--patch-tokens` tokens (the server's default bound).

With `--peer`, TransformerLens 4 (its TransformerBridge over transformers' GPT2LMHeadModel holding the
same weights, exported with glassgpt.weights.export_hf) computes the logit lens (run_with_cache, the
final norm and the unembedding on each stream, the top 5) and the head ablation (run_with_hooks
zeroing one head's hook_z, one forward pass per head), the way tests/test_inspect.py proves ours equal
to it; the bench checks the two answers agree before timing. Medians over `--rounds`, with the
process's CPU seconds beside the wall time (the server runs in this process): on a machine that other
jobs keep busy the CPU seconds move far less than the wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from glassgpt import inspect as views
from glassgpt import inspect_report
from glassgpt.model import GPT
from glassgpt.serve import create_app
from glassgpt.serve.app import INSPECT_VIEWS
from glassgpt.serve.background import BackgroundServer
from glassgpt.tokenizer import get_tokenizer

VERDICT = Path(__file__).resolve().parent.parent / "src" / "glassgpt" / "assets" / "the-verdict.txt"


def text_of(tokenizer, n_tokens: int, skip: int = 0) -> str:
    """The Verdict's tokens skip..skip+n as text that encodes back to exactly n tokens."""
    ids = tokenizer.encode(VERDICT.read_text(encoding="utf-8"))[skip:]
    for cut in range(n_tokens, n_tokens + 8):  # a cut inside a word may re-encode differently
        text = tokenizer.decode(ids[:cut])
        if len(tokenizer.encode(text)) == n_tokens:
            return text
    raise RuntimeError(f"no prefix of The Verdict encodes to {n_tokens} tokens")


CPU: dict[str, list[float]] = {}  # name -> the process's CPU seconds of each timing (server included)


def timed(work, name: str | None = None) -> tuple[float, object]:
    """Wall seconds of `work()` and its result; with a name, the process's CPU seconds go to CPU[name]
    (the server runs in this process): on a machine that other jobs keep busy they move far less
    than the wall time."""
    start, cpu = time.perf_counter(), time.process_time()
    result = work()
    if name is not None:
        CPU.setdefault(name, []).append(time.process_time() - cpu)
    return time.perf_counter() - start, result


def peer_bridge(model: GPT, processed: bool):
    """TransformerLens's TransformerBridge over transformers' GPT-2 holding `model`'s weights."""
    from transformer_lens import TransformerBridge
    from transformers import GPT2LMHeadModel

    from glassgpt.weights import export_hf

    with tempfile.TemporaryDirectory() as directory:
        export_hf(model, directory)
        hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    # The bridge wants a tokenizer; the ids are given directly, so a word-level one built in memory
    # keeps TransformerLens off the network.
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"t0": 0}, unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="t0", bos_token="t0",
                                        unk_token="t0", pad_token="t0", name_or_path="ids",
                                        add_bos_token=True)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, device="cpu", tokenizer=tokenizer)
    if processed:
        bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def peer_logit_lens(bridge, ids: torch.Tensor, n_layers: int, k: int = 5):
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
        streams = [cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(n_layers)]
        streams.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"])
        tops = [torch.log_softmax(bridge.unembed(bridge.ln_final(s)), dim=-1)[0].topk(k) for s in streams]
    return torch.stack([t.values for t in tops]), torch.stack([t.indices for t in tops])


def peer_heads(bridge, ids: torch.Tensor, layers: range, n_heads: int, target: int) -> torch.Tensor:
    result = torch.empty(len(layers), n_heads)
    for layer in layers:
        for head in range(n_heads):
            def zero(z, hook, head=head):
                z[:, :, head] = 0                                       # z: (batch, pos, head, d_head)
                return z

            with torch.no_grad():
                logits = bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
            result[layer, head] = logits[0, -1, target]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="verdict-162m")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--patch-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer", action="store_true", help="time TransformerLens too (logit lens, heads)")
    parser.add_argument("--exact-heads", action="store_true",
                        help="also time the exact head ablation on the whole text (about 3 TFLOP at 256 "
                             "tokens: minutes on a small CPU); the server estimates it past --patch-tokens")
    parser.add_argument("--peer-blocks", type=int, default=0,
                        help="time TransformerLens's head ablation on the first N blocks only and "
                             "scale it to all (each of its ablations is one whole forward pass, whatever "
                             "the block); 0: all blocks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    # transformers' GPT-2 (the peer's host) has a bias on every projection: with --peer both models get
    # the query/key/value bias that verdict-162m leaves out (0.03% of its parameters).
    model = GPT.from_preset(args.preset, drop_rate=0.0, **({"qkv_bias": True} if args.peer else {})).eval()
    tokenizer = get_tokenizer("gpt2")
    text = text_of(tokenizer, args.tokens)
    clean = text_of(tokenizer, args.patch_tokens)
    corrupt = text_of(tokenizer, args.patch_tokens, skip=args.patch_tokens)
    print(f"{args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, {args.tokens}-token text, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    rows: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    reports: dict[str, dict] = {}
    # The server's own bound for the exact heads view (--patch-tokens, its default 32): past it, the
    # default heads_method "auto" estimates the view by attribution patching.
    app = create_app(model, tokenizer, inspect_max_tokens=args.tokens, patch_max_tokens=args.patch_tokens,
                     max_body_bytes=1 << 20)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=None) as http:
        def post(path: str, body: dict) -> httpx.Response:
            response = http.post(path, json=body)
            response.raise_for_status()
            return response

        everything = {"text": text, "views": list(INSPECT_VIEWS)}
        pair = {"clean": clean, "corrupt": corrupt}
        post("/api/inspect", {"text": "warm up", "views": list(INSPECT_VIEWS)})
        for round_ in range(args.rounds):
            seconds, response = timed(lambda: post("/api/inspect", {"text": text}), "no views (HTTP)")
            rows.setdefault("no views (HTTP)", []).append(seconds)
            sizes["no views (HTTP)"] = len(response.content)
            timings = [(view, view, "exact") for view in INSPECT_VIEWS if view != "heads"]
            timings.append(("heads", "heads (attribution)", "attribution"))
            if args.exact_heads:
                timings.append(("heads", "heads (exact)", "exact"))
            for view, name, method in timings:
                seconds, report = timed(lambda view=view, method=method: inspect_report.report(
                    model, tokenizer, text, view, method=method), name)
                rows.setdefault(name, []).append(seconds)
                sizes[name] = len(json.dumps(report))
                reports[name] = report
            seconds, response = timed(lambda: post("/api/inspect", everything), "all views (HTTP)")
            rows.setdefault("all views (HTTP)", []).append(seconds)
            sizes["all views (HTTP)"] = len(response.content)
            patching = f"/api/patch, {args.patch_tokens} tokens (HTTP)"
            seconds, response = timed(lambda: post("/api/patch", pair), patching)
            rows.setdefault(patching, []).append(seconds)
            sizes[f"/api/patch, {args.patch_tokens} tokens (HTTP)"] = len(response.content)
            print(f"round {round_ + 1}: "
                  + ", ".join(f"{name} {times[-1]:.2f} s" for name, times in rows.items()), flush=True)

    if args.exact_heads:  # how close the estimate the server sends is to the exact view, on this text
        baseline = reports["heads (exact)"]["logit"]
        exact, estimate = (torch.tensor(reports[name]["logits"]) - baseline
                           for name in ("heads (exact)", "heads (attribution)"))
        correlation = torch.corrcoef(torch.stack([exact.flatten(), estimate.flatten()]))[0, 1]
        print(f"heads: attribution against exact, correlation of the changes {correlation:.3f}, "
              f"max |difference| {(exact - estimate).abs().max():.3f} "
              f"(largest change {exact.abs().max():.3f}), "
              f"the same head most important: {bool(exact.abs().argmax() == estimate.abs().argmax())}")

    peer: dict[str, tuple[float, float]] = {}  # view -> TransformerLens's wall and CPU seconds
    if args.peer:
        ids = torch.tensor([tokenizer.encode(text)])
        n_layers, n_heads = model.config.n_layers, model.config.n_heads
        processed, plain = peer_bridge(model, processed=True), peer_bridge(model, processed=False)
        ours_lp, ours_ids = views.logit_lens_top(model, ids, 5)
        theirs_lp, theirs_ids = peer_logit_lens(processed, ids, n_layers)
        agree = (ours_ids == theirs_ids).float().mean().item()
        print(f"logit lens: top-5 ids agree on {agree:.2%}, max |logprob difference| "
              f"{(ours_lp - theirs_lp).abs().max().item():.1e}")
        target = inspect_report.pick_target(model, tokenizer, ids[0].tolist(), None)
        lens_times, head_times = [], []
        blocks = range(args.peer_blocks or n_layers)
        for _ in range(args.rounds):
            lens_times.append(timed(lambda: peer_logit_lens(processed, ids, n_layers), "peer logit-lens")[0])
            seconds, theirs = timed(lambda: peer_heads(plain, ids, blocks, n_heads, target), "peer heads")
            head_times.append(seconds * n_layers / len(blocks))
            print(f"TransformerLens: logit lens {lens_times[-1]:.2f} s, heads {head_times[-1]:.2f} s"
                  + (f" ({seconds:.2f} s for {len(blocks)} of {n_layers} blocks, scaled)"
                     if len(blocks) < n_layers else ""), flush=True)
        ours = views.ablate_heads(model, ids, target)[:len(blocks)]
        print(f"heads: max |logit difference| {(ours - theirs).abs().max().item():.1e}")
        scale = n_layers / len(blocks)
        peer = {"logit-lens": (statistics.median(lens_times), statistics.median(CPU["peer logit-lens"])),
                "heads": (statistics.median(head_times), statistics.median(CPU["peer heads"]) * scale)}

    print(f"\n| request or view | wall s (median of {args.rounds}) | CPU s | JSON | TransformerLens wall s "
          "| CPU s | vs TransformerLens (wall) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, times in rows.items():
        ours = statistics.median(times)
        versus = "| | | |"
        if name in peer:
            wall, cpu = peer[name]
            versus = f"| {wall:.2f} | {cpu:.2f} | x{wall / ours:.1f} |"
        print(f"| {name} | {ours:.2f} | {statistics.median(CPU[name]):.2f} | {sizes[name] / 1e6:.2f} MB "
              f"{versus}")


if __name__ == "__main__":
    main()
