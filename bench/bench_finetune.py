"""Fine-tuning step time: glassgpt against the tutorial's own code, same weights, same batches.

    PYTHONPATH=src python bench/bench_finetune.py --smoke                    # tiny model, < 30 s on a CPU
    PYTHONPATH=src python bench/bench_finetune.py --rounds 5                 # GPT-2 small, both tasks
    PYTHONPATH=src python bench/bench_finetune.py --device cuda --preset gpt2 --rounds 5
    PYTHONPATH=src python bench/bench_finetune.py --device cuda --preset gpt2-medium --dtype bf16

The peer is the tutorial's code itself (llms-from-scratch, `pip install --no-deps llms-from-scratch`):
its GPTModel holding our weights (bench/_peers.py), its chapter 6 loss (`ch06.calc_loss_batch`,
the logits of the last position) and chapter 7 batches and loss (`ch07.InstructionDataset`,
`ch07.custom_collate_fn`, `ch05.calc_loss_batch`), its optimizer (AdamW over `model.parameters()`,
lr 5e-5, weight decay 0.1) and its LoRA (appendix E, `replace_linear_with_lora`). glassgpt runs
what `glassgpt finetune classify` / `finetune instruct` run: `to_classifier` + `set_trainable`,
`class_logits`, `instruct.tokenize_instructions` + `instruct.collate`, `GPT(ids, targets=...)`,
AdamW from `train.make_optimizer` (weight matrices decayed), `lora.apply_lora`.

Tasks (each a batch of 8, as the tutorial's):
- classify: the language-model head replaced by a 2-class head; the last block, the final norm
  and the head train (the rest frozen); 8 SMS texts of the bundled SMS Spam Collection, each
  repeated to exactly --seq tokens (120 by default, the tutorial's longest), so the tutorial's
  read at position -1 and ours at the last real token are the same position; cross-entropy
  there, backward, AdamW step.
- instruct: every parameter trains; 8 examples of the bundled instruction-data.json in the
  Alpaca template, each side tokenizing and padding them with its own code (checked equal);
  next-token cross-entropy with -100 ignored, backward, AdamW step.
- LoRA (both tasks): glassgpt wraps attention qkv/out_proj and feed-forward expand/contract at
  rank --lora-rank (alpha = rank, scale 1), plus the classification head trained whole; the
  tutorial's appendix E wraps *every* nn.Linear, the separate query/key/value projections and the
  output head included (alpha 1, its scale), everything else frozen. Not the same work: the
  trainable parameters are printed for each.

Both start from the same random weights of --preset (an untied head, as the tutorial's GPTModel
has, unless --tied), dropout off. The contenders alternate round by round (the order rotates
each round), so load from other processes falls on all alike; each figure is the median over
--rounds of the mean step time of --steps steps. On CUDA each contender also runs alone, twice,
for its peak `torch.cuda.max_memory_allocated` (reset in between; weights, gradients, AdamW's
state and activations of that contender only). Imports only torch, tiktoken, safetensors, numpy
and llms_from_scratch (no serve, no plotting).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# bench/ is on the path when a bench runs as a script
from _peers import check_representable, their_model, tutorial

from glassgpt.classify import class_logits, set_trainable, to_classifier
from glassgpt.classify_data import collate as classify_collate
from glassgpt.classify_data import load_labelled
from glassgpt.instruct import InstructionTemplate, load_instructions, tokenize_instructions
from glassgpt.instruct import collate as instruct_collate
from glassgpt.lora import apply_lora
from glassgpt.model import GPT
from glassgpt.tokenizer import get_tokenizer
from glassgpt.train import make_optimizer

LR, WEIGHT_DECAY, BATCH_SIZE = 5e-5, 0.1, 8  # the tutorial's chapters 6 and 7
TUTORIAL, GLASSGPT = "llms-from-scratch", "glassgpt"
TUTORIAL_LORA, GLASSGPT_LORA = "llms-from-scratch LoRA", "glassgpt LoRA"
SMOKE = {"emb_dim": 64, "n_heads": 2, "n_layers": 2, "context_length": 128}


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[tuple], float]  # one optimisation step on a batch; returns the loss (syncs the device)
    trainable: int = 0
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # this process's CPU seconds, all threads
    losses: list[float] = field(default_factory=list)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def our_optimizer(model, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as `finetune classify` and `finetune instruct` build it (`train.make_optimizer`): the
    trainable parameters only, weight matrices decayed, biases/norms/embeddings not."""
    return make_optimizer(model, LR, WEIGHT_DECAY)


def their_optimizer(model) -> torch.optim.Optimizer:
    """The tutorial's: `torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)` (frozen
    parameters get no gradient, so AdamW skips them)."""
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def their_lora(model, rank: int, alpha: float):
    """Appendix E: freeze every parameter, then wrap every nn.Linear (head included) in LinearWithLoRA."""
    model.requires_grad_(False)
    tutorial("appendix_e").replace_linear_with_lora(model, rank, alpha)
    return model


# ---------------------------------------------------------------- classification


def classify_batches(tokenizer, n: int, seq: int, seed: int) -> list[tuple]:
    """`n` batches (ids (8, seq), labels (8,), lengths (8,)) of SMS texts each repeated to `seq` tokens."""
    data = load_labelled("bundled:sms-spam-collection.tsv")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = []
    for index in order[:n * BATCH_SIZE]:
        ids = tokenizer.encode(data.texts[index])
        rows.append(((ids * (seq // len(ids) + 1))[:seq], data.labels[index]))
    return [classify_collate(rows[i:i + BATCH_SIZE], pad_id=tokenizer.eos_id)
            for i in range(0, len(rows), BATCH_SIZE)]


def classify_contenders(base: GPT, args, device, autocast) -> dict[str, Callable[[], Contender]]:
    """Builders of the classification contenders (each builds its own copy of the weights on `device`)."""
    calc_loss_batch = tutorial("ch06").calc_loss_batch

    classifier = to_classifier(copy.deepcopy(base), 2, seed=args.seed)  # the new head, seeded: one for all

    def ours(lora: bool) -> Contender:
        model = copy.deepcopy(classifier)
        if lora:
            torch.manual_seed(args.seed)  # LoRA's random A
            apply_lora(model, rank=args.lora_rank, trainable=("out_head",))
        else:
            set_trainable(model, "last")
        model.to(device).train()
        optimizer = our_optimizer(model, device)

        def step(batch) -> float:  # finetune_classifier's loop body
            ids, labels, lengths = batch
            with autocast():
                logits = class_logits(model, ids, lengths)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.item()

        return Contender(GLASSGPT_LORA if lora else GLASSGPT, model, optimizer, step, trainable_count(model))

    def theirs(lora: bool) -> Contender:
        model = their_model(classifier)
        model.requires_grad_(False)  # chapter 6: freeze, new head, unfreeze the last block and final norm
        model.out_head = torch.nn.Linear(base.config.emb_dim, 2)
        with torch.no_grad():  # our head's initial weights (ours has no bias: zero), so both start equal
            model.out_head.weight.copy_(classifier.out_head.weight)
            model.out_head.bias.zero_()
        if lora:
            torch.manual_seed(args.seed)
            their_lora(model, args.lora_rank, 1.0)
        else:
            model.trf_blocks[-1].requires_grad_(True)
            model.final_norm.requires_grad_(True)
        model.to(device).train()
        optimizer = their_optimizer(model)

        def step(batch) -> float:  # train_classifier_simple's loop body
            ids, labels, _ = batch
            optimizer.zero_grad()
            with autocast():
                loss = calc_loss_batch(ids, labels, model, device)
            loss.backward()
            optimizer.step()
            return loss.item()

        return Contender(TUTORIAL_LORA if lora else TUTORIAL, model, optimizer, step, trainable_count(model))

    builders = {TUTORIAL: lambda: theirs(False), GLASSGPT: lambda: ours(False)}
    if args.lora:
        builders |= {TUTORIAL_LORA: lambda: theirs(True), GLASSGPT_LORA: lambda: ours(True)}
    return builders


def classify_same_start(contenders: dict[str, Contender], batch) -> str:
    ids, _, lengths = batch
    with torch.no_grad():
        ours = contenders[GLASSGPT].model.eval()
        theirs = contenders[TUTORIAL].model.eval()
        gap = (class_logits(ours, ids, lengths).float() - theirs(ids)[:, -1].float()).abs().max().item()
        ours.train(), theirs.train()
    return f"same start: max |class logit difference| = {gap:.1e}"


# ---------------------------------------------------------------- instruction following


def instruct_batches(tokenizer, n: int, max_length: int, seed: int) -> tuple[list[tuple], list[tuple], str]:
    """`n` batches of 8 examples, collated by glassgpt and by the tutorial; and a line saying whether
    their token ids and tensors are equal."""
    ch07 = tutorial("ch07")
    examples = load_instructions("bundled:instruction-data.json")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [examples[i] for i in order[:n * BATCH_SIZE]]
    ours_tokenized, _ = tokenize_instructions(chosen, tokenizer, InstructionTemplate(), max_length)
    theirs_tokenized = ch07.InstructionDataset(chosen, tokenizer).encoded_texts
    ours, theirs = [], []
    for i in range(0, len(chosen), BATCH_SIZE):
        ours.append(instruct_collate([e.ids for e in ours_tokenized[i:i + BATCH_SIZE]], tokenizer.eos_id,
                                     max_length=max_length))
        theirs.append(ch07.custom_collate_fn(theirs_tokenized[i:i + BATCH_SIZE],
                                             pad_token_id=tokenizer.eos_id, allowed_max_length=max_length))
    differing = sum(not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
                    for a, b in zip(ours, theirs, strict=True))
    widths = [batch[0].shape[1] for batch in ours]
    line = (f"batches: {len(ours)} of 8 examples, widths {min(widths)}-{max(widths)} tokens "
            f"(median {statistics.median(widths):g}); glassgpt's and the tutorial's inputs and targets "
            f"{'equal in every batch' if not differing else f'differ in {differing} batches'}")
    return ours, theirs, line


def instruct_contenders(base: GPT, args, device, autocast) -> dict[str, Callable[[], Contender]]:
    calc_loss_batch = tutorial("ch05").calc_loss_batch

    def ours(lora: bool) -> Contender:
        model = copy.deepcopy(base)
        if lora:
            torch.manual_seed(args.seed)
            apply_lora(model, rank=args.lora_rank)
        model.to(device).train()
        optimizer = our_optimizer(model, device)

        def step(batch) -> float:  # InstructionTrainer.fit's loop body (fp32/bf16: no grad scaler)
            inputs, targets = batch[0]
            with autocast():
                loss = model(inputs, targets=targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        return Contender(GLASSGPT_LORA if lora else GLASSGPT, model, optimizer, step, trainable_count(model))

    def theirs(lora: bool) -> Contender:
        model = their_model(base)
        if lora:
            torch.manual_seed(args.seed)
            their_lora(model, args.lora_rank, 1.0)
        model.to(device).train()
        optimizer = their_optimizer(model)

        def step(batch) -> float:  # train_model_simple's loop body
            inputs, targets = batch[1]
            optimizer.zero_grad()
            with autocast():
                loss = calc_loss_batch(inputs, targets, model, device)
            loss.backward()
            optimizer.step()
            return loss.item()

        return Contender(TUTORIAL_LORA if lora else TUTORIAL, model, optimizer, step, trainable_count(model))

    builders = {TUTORIAL: lambda: theirs(False), GLASSGPT: lambda: ours(False)}
    if args.lora:
        builders |= {TUTORIAL_LORA: lambda: theirs(True), GLASSGPT_LORA: lambda: ours(True)}
    return builders


def instruct_same_start(contenders: dict[str, Contender], batch) -> str:
    inputs = batch[0][0]
    with torch.no_grad():
        ours, theirs = contenders[GLASSGPT].model.eval(), contenders[TUTORIAL].model.eval()
        gap = (ours(inputs).float() - theirs(inputs).float()).abs().max().item()
        ours.train(), theirs.train()
    return f"same start: max |logit difference| = {gap:.1e}"


# ---------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(builders: dict[str, Callable[[], Contender]], batches: list, device: torch.device) -> dict:
    """Each contender alone on the GPU for two steps: its peak allocated bytes above what was there."""
    peaks = {}
    for name, build in builders.items():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        contender = build()
        for batch in batches[:2]:
            contender.step(batch)
        peaks[name] = torch.cuda.max_memory_allocated(device) - before
        del contender
    gc.collect()
    torch.cuda.empty_cache()
    return peaks


def race(builders: dict[str, Callable[[], Contender]], batches: list, args, device,
         same_start: Callable) -> tuple[dict[str, Contender], str]:
    """Every contender built and `same_start` checked on them, one warm-up step each, then `rounds`
    rounds of `steps` steps each, in an order that rotates every round."""
    contenders = {name: build() for name, build in builders.items()}
    checked = same_start(contenders, batches[0])
    for contender in contenders.values():  # warm-up: allocators, AdamW's state, kernel choices
        contender.losses.append(contender.step(batches[0]))
    names = list(contenders)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            contender = contenders[name]
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for step in range(args.steps):
                index = 1 + (round_index * args.steps + step) % (len(batches) - 1)
                contender.losses.append(contender.step(batches[index]))
            contender.times.append((time.perf_counter() - start) / args.steps)
            contender.cpu_times.append((time.process_time() - cpu_start) / args.steps)
    return contenders, checked


def report(task: str, contenders: dict[str, Contender], peaks: dict | None, lines: list[str],
           on_cpu: bool) -> dict:
    """The table: one row per contender; "tutorial / it" compares each row with the tutorial's row of
    the same kind (full or LoRA). On a CPU, the process's CPU time per step too: on a machine shared
    with other jobs it moves less than the wall-clock time."""
    for line in lines:
        print(f"  {line}")
    medians = {name: statistics.median(c.times) for name, c in contenders.items()}
    cpu = {name: statistics.median(c.cpu_times) for name, c in contenders.items()}
    peer = {GLASSGPT: TUTORIAL, GLASSGPT_LORA: TUTORIAL_LORA}
    cpu_head, cpu_rule = (f" {'CPU s/step':>10} | {'tutorial / it':>13} |", "-" * 12 + ":|" + "-" * 14 + ":|")
    if not on_cpu:  # the host's CPU time says little about a GPU's step
        cpu_head = cpu_rule = ""
    memory_head, memory_rule = (" peak MiB |", "-" * 10 + ":|") if peaks else ("", "")
    print(f"  | {'contender':<24} | {'trainable':>12} | {'s/step median':>13} | {'fastest':>8} | "
          f"{'tutorial / it':>13} |{cpu_head}{memory_head} first losses")
    print(f"  |{'-' * 26}|{'-' * 13}:|{'-' * 14}:|{'-' * 9}:|{'-' * 14}:|{cpu_rule}{memory_rule}---")
    for name, contender in contenders.items():
        other = peer.get(name, name)
        cpu_cells = f" {cpu[name]:10.3f} | {cpu[other] / cpu[name]:12.2f}x |" if on_cpu else ""
        memory = f" {peaks[name] / 2**20:8,.0f} |" if peaks else ""
        losses = " ".join(f"{v:.4f}" for v in contender.losses[:3])
        print(f"  | {name:<24} | {contender.trainable:>12,} | {medians[name]:13.4f} | "
              f"{min(contender.times):8.4f} | {medians[other] / medians[name]:12.2f}x |{cpu_cells}{memory} "
              f"{losses}")
    summary = {"task": task, "median_s": medians, "median_cpu_s": cpu if on_cpu else None,
               "peak_bytes": peaks,
               "trainable": {n: c.trainable for n, c in contenders.items()},
               "times": {n: c.times for n, c in contenders.items()},
               "cpu_times": {n: c.cpu_times for n, c in contenders.items()},
               "losses": {n: c.losses for n, c in contenders.items()}}
    print(f"  -> glassgpt is {medians[TUTORIAL] / medians[GLASSGPT]:.2f}x the tutorial's speed"
          + (f"; with LoRA {medians[TUTORIAL_LORA] / medians[GLASSGPT_LORA]:.2f}x the tutorial's LoRA, "
             f"{medians[GLASSGPT] / medians[GLASSGPT_LORA]:.2f}x glassgpt's full step"
             if GLASSGPT_LORA in medians else ""))
    if peaks and GLASSGPT_LORA in peaks:
        print(f"  -> peak memory: glassgpt full {peaks[GLASSGPT] / 2**20:,.0f} MiB, LoRA "
              f"{peaks[GLASSGPT_LORA] / 2**20:,.0f} MiB ({peaks[GLASSGPT] / peaks[GLASSGPT_LORA]:.2f}x less)")
    return summary


def run_task(task: str, base: GPT, tokenizer, args, device, autocast) -> dict:
    n_batches = 1 + min(args.rounds * args.steps, 64)  # batch 0 warms up; the rest cycle
    if task == "classify":
        batches = classify_batches(tokenizer, n_batches, args.seq, args.seed)
        batches = [tuple(t.to(device) for t in batch) for batch in batches]
        builders = classify_contenders(base, args, device, autocast)
        lines = [f"batch 8 x {args.seq} tokens (SMS texts repeated to length), the last block + final norm "
                 "+ a 2-class head train"]
        same_start = classify_same_start
    else:
        ours, theirs, line = instruct_batches(tokenizer, n_batches, args.max_length, args.seed)
        batches = [(tuple(t.to(device) for t in a), tuple(t.to(device) for t in b))
                   for a, b in zip(ours, theirs, strict=True)]
        builders = instruct_contenders(base, args, device, autocast)
        lines = [line + f"; max length {args.max_length}; every parameter trains"]
        same_start = instruct_same_start
    if args.lora:
        lines.append(f"LoRA rank {args.lora_rank}: glassgpt on qkv/out_proj/expand/contract"
                     f"{' + the head trained whole' if task == 'classify' else ''}; the tutorial's appendix "
                     "E on every nn.Linear (query, key, value apart, and the output head too): "
                     "not the same work")
    peaks = peak_memory(builders, batches, device) if device.type == "cuda" else None
    contenders, checked = race(builders, batches, args, device, same_start)
    lines.insert(0, checked)
    print(f"\n{task}:")
    result = report(task, contenders, peaks, lines, device.type == "cpu")
    del contenders
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--preset", default="gpt2", help="model preset (gpt2: GPT-2 small, gpt2-medium...)")
    parser.add_argument("--tasks", default="classify,instruct", help="comma-separated: classify, instruct")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians over them)")
    parser.add_argument("--steps", type=int, default=1, help="steps per contender per round")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="fp32, or bf16 autocast for both (meant for CUDA)")
    parser.add_argument("--seq", type=int, default=120, help="classification tokens per text")
    parser.add_argument("--max-length", type=int, help="instruction tokens kept per example "
                        "(default: the model's context, as the tutorial's allowed_max_length=1024)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--no-lora", dest="lora", action="store_false", help="skip the LoRA contenders")
    parser.add_argument("--tied", action="store_true",
                        help="glassgpt's instruct model with its head tied to the embedding (as `gpt2` "
                             "loads); the tutorial's stays untied: then not the same work")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-block 64-wide model, 2 rounds, short sequences: checks the script runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(SMOKE) if args.smoke else {}
    if args.smoke:
        args.rounds, args.steps, args.seq = min(args.rounds, 2), 1, min(args.seq, 32)
        args.max_length = min(args.max_length or 32, 32)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - {"classify", "instruct"})
    if unknown or not tasks:
        parser.error(f"--tasks takes classify and/or instruct, got {args.tasks!r}")
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    if args.dtype == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = nullcontext

    torch.manual_seed(args.seed)
    base = GPT.from_preset(args.preset, drop_rate=0.0, tie_weights=args.tied, **overrides).eval()
    args.max_length = args.max_length or base.config.context_length
    try:
        check_representable(base.config)
    except ValueError as error:
        parser.error(f"--preset {args.preset}: {error}")
    if args.seq > base.config.context_length or args.max_length > base.config.context_length:
        parser.error(f"--seq and --max-length must fit the model's context of {base.config.context_length}")
    tokenizer = get_tokenizer("gpt2")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{base.config.name}{' (smoke: 2 blocks, 64 wide)' if args.smoke else ''}, "
          f"{base.num_parameters():,} parameters, random weights, {'tied' if args.tied else 'untied'} head, "
          f"dropout off; {args.dtype}; AdamW lr {LR:g} wd {WEIGHT_DECAY:g}; {where}; "
          f"torch {torch.__version__}; "
          f"median of {args.rounds} rounds x {args.steps} steps; 'tutorial / it' = the tutorial's time "
          f"(its LoRA's, for the LoRA rows) over the row's: above 1, the row is faster")
    results = [run_task(task, base, tokenizer, args, device, autocast) for task in tasks]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"args": vars(args), "device": where, "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
