"""Watching a model learn: the inside view of a probe text at each evaluation, and TensorBoard.

Training (`glassgpt train`) and fine-tuning record, at step 0 and at every evaluation, what the model
makes of one fixed probe text (by default the run's sample prompt): its top-10 next tokens, the
logit lens's top tokens at every depth, every head's attention and what each layer writes into the
residual stream. Each record is one JSON line of `OUT/probes.jsonl` (`ProbeLog`), computed with the
views of `glassgpt.inspect` on the model being trained (no copy), kept small: the probe is cut to
its last tokens so that the attention maps hold at most `ATTENTION_BUDGET` numbers, rounded. The
`/runs` page (`glassgpt.serve.runs`) replays them with a step slider beside the loss curves.

A resumed run keeps the records up to its checkpoint's step and drops the later ones, which belong
to the run that was cut short: each step is recorded once whatever the interruptions.

With `--tensorboard DIR` every metric record also goes to TensorBoard (`Board`, through
`torch.utils.tensorboard`; the `tensorboard` package is the optional extra of that name), and each
logged step's record gains the gradient norm (before clipping) and, per layer, the size of the
optimizer's update relative to the weights (`update_to_weight`), measured by hooks on the optimizer.
The trainer calls three things: `attach(trainer, resume)` once, then `watch.on_record(record)` for
each metric record and `watch.on_eval(step)` after each evaluation.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import torch

from glassgpt import inspect as views
from glassgpt.model import GPT

PROBES_FILE = "probes.jsonl"
ATTENTION_BUDGET = 20_000  # attention weights kept per snapshot: layers x heads x T x T
MAX_PROBE_TOKENS = 16
NEXT_TOP = 10  # next tokens listed per snapshot
LENS_TOP = 3  # logit-lens tokens kept per (depth, position)
DIGITS = 4  # decimals kept of each probability, weight and norm


# ---------------------------------------------------------------- the probe and its snapshot

def probe_length(model: GPT) -> int:
    """The most probe tokens a snapshot keeps: `MAX_PROBE_TOKENS`, fewer for a model with many heads."""
    heads = model.config.n_layers * model.config.n_heads
    return max(1, min(MAX_PROBE_TOKENS, int((ATTENTION_BUDGET / heads) ** 0.5), model.config.context_length))


def probe_ids(model: GPT, tokenizer, text: str) -> list[int]:
    """The probe text's token ids, its last `probe_length` tokens (the end is where it predicts)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"the probe text {text!r} has no tokens: give a text, or '' to record none")
    return ids[-probe_length(model):]


def _round(values: torch.Tensor) -> list:
    return torch.round(values.double(), decimals=DIGITS).tolist()  # doubles: print as 0.3333


def names_of(model: GPT, tokenizer, ids: list[int]) -> list[str]:
    """What the head's outputs `ids` are called: tokens' texts, or a classifier's labels."""
    if model.config.n_classes:
        labels = model.config.labels or tuple(f"class {i}" for i in range(model.config.n_classes))
        return [labels[i] for i in ids]
    return tokenizer.token_strings(ids)


def snapshot(model: GPT, tokenizer, ids: list[int]) -> dict:
    """What `model` makes of `ids` now, as JSON-able data:

    - `tokens`: the probe's tokens;
    - `next`: the top `NEXT_TOP` next outputs at the last position, `{"text", "id", "prob"}`;
    - `lens`: the logit lens's top `LENS_TOP` per depth (embeddings, then each block) and position:
      `text` and `prob`, each [depth][position][rank];
    - `attention`: [layer][head][query][key] weights;
    - `residual`: `names` of the parts that write into the residual stream and their `norms`
      [part][position] (`glassgpt.inspect.residual_contributions`).
    Every view leaves the model's training flags as they were (and computes no gradients).
    """
    with views.looking(model):
        logits, attention = views.record_attention(model, views.as_ids(model, ids))
    probs = torch.softmax(logits[0, -1].float(), dim=-1)
    top = probs.topk(min(NEXT_TOP, probs.shape[-1]))
    top_ids = top.indices.tolist()
    lens_logprobs, lens_ids = views.logit_lens_top(model, ids, k=LENS_TOP)
    flat = lens_ids.flatten().tolist()
    lens_text = dict(zip(flat, names_of(model, tokenizer, flat), strict=True))
    residual = views.residual_contributions(model, ids)
    return {
        "tokens": tokenizer.token_strings(ids),
        "next": [{"text": text, "id": i, "prob": round(p, DIGITS)}
                 for text, i, p in zip(names_of(model, tokenizer, top_ids), top_ids, top.values.tolist(),
                                       strict=True)],
        "lens": {"text": [[[lens_text[i] for i in ranks] for ranks in row] for row in lens_ids.tolist()],
                 "prob": _round(lens_logprobs.exp())},
        "attention": [_round(layer[0].cpu()) for layer in attention],
        "residual": {"names": residual["names"], "norms": _round(residual["norms"])},
    }


class ProbeLog:
    """`directory/probes.jsonl`: one snapshot of the probe per recorded step.

    `keep_until=None` starts the file empty (a new run); a step number keeps the records up to that
    step and drops the rest (a resumed run: they belong to the run that was cut short). Without a
    directory, snapshots are still taken and returned (and kept in `records`), nothing is written.
    """

    def __init__(self, directory: Path | None, model: GPT, tokenizer, text: str,
                 keep_until: int | None = None):
        self.tokenizer, self.text = tokenizer, text
        self.ids = probe_ids(model, tokenizer, text)
        self.path = Path(directory) / PROBES_FILE if directory is not None else None
        self.seconds = 0.0  # time spent taking snapshots (docs/PERFORMANCE.md compares it with training)
        self.records: list[dict] = []
        if self.path is None:
            return
        kept = [r for r in read_records(self.path) if keep_until is not None and r["step"] <= keep_until]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.steps = {r["step"] for r in kept}

    def record(self, model: GPT, step: int, **extra) -> dict:
        """Snapshot `model` at `step` and append it (a step already recorded is not recorded twice)."""
        started = time.perf_counter()
        record = {"step": step, **extra, "probe": self.text, **snapshot(model, self.tokenizer, self.ids)}
        seconds = time.perf_counter() - started
        self.seconds += seconds
        record["seconds"] = round(seconds, 4)
        self.records.append(record)
        if self.path is not None and step not in self.steps:
            self.steps.add(step)
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
        return record


def finetune_probes(directory: Path | None, model: GPT, tokenizer, text: str) -> ProbeLog | None:
    """A fine-tuning run's probe log (its probe: the first validation example, as the model reads it),
    with the step-0 snapshot taken; None when nothing is kept on disk."""
    if directory is None or not text:
        return None
    probes = ProbeLog(directory, model, tokenizer, text)
    probes.record(model, 0)
    return probes


def read_records(path: Path) -> list[dict]:
    """The records of a JSONL file a run writes (probes.jsonl, metrics.jsonl): none if it does not
    exist, and a half-written line (a run writing it now, or killed mid-write) skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves at most its last line cut
            continue
    return records


# ---------------------------------------------------------------- TensorBoard

def check_tensorboard() -> None:
    """A clear error, before any work, when `--tensorboard` is asked for without the package."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'glassgpt[tensorboard]' "
                         "(or pip install tensorboard)")


def summary_writer(directory: str | Path, purge_step: int | None = None):
    """torch's `SummaryWriter` for `directory`; `purge_step`: TensorBoard drops what earlier event files
    logged from that step on (a resumed run's steps after its checkpoint, logged again)."""
    check_tensorboard()
    if "tensorflow" not in sys.modules:
        # tensorboard imports all of TensorFlow when it is installed (tens of seconds) unless the module
        # `tensorboard.compat.notf` exists; its own stand-in writes the same event files.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(directory), purge_step=purge_step)


def layer_of(name: str) -> str:
    """The layer a parameter belongs to for the update ratios: `blocks.3`, `tok_emb`, `final_norm`..."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


class StepStatistics:
    """The gradient norm and per-layer update-to-weight ratios of optimizer steps, by hooks on the
    optimizer (the training loop is not changed): before the step, the gradient's norm and a copy of
    the weights; after it, ||new - old|| / ||old|| over each layer's parameters.

    `due(step_number)` says which steps to measure (copying the weights costs a pass over them).
    `grad_norm_before_clip()`, when given, returns the norm that clipping saw (the hook sees the
    clipped gradient); `grad_scale()` the fp16 loss scale still in the gradients (1 when unscaled).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, due=lambda: True,
                 grad_norm_before_clip=None, grad_scale=lambda: 1.0):
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.layers: dict[str, list[torch.nn.Parameter]] = defaultdict(list)
        for name, parameter in model.named_parameters():
            if id(parameter) in trained:
                self.layers[layer_of(name)].append(parameter)
        self.due, self.before_clip, self.grad_scale = due, grad_norm_before_clip, grad_scale
        self.latest: dict | None = None
        self._old: dict[str, list[torch.Tensor]] | None = None
        self._grad_norm: torch.Tensor | None = None
        self.handles = [optimizer.register_step_pre_hook(self._before),
                        optimizer.register_step_post_hook(self._after)]

    @torch.no_grad()
    def _before(self, optimizer, args, kwargs) -> None:
        self._old = None
        if not self.due():
            return
        clipped = self.before_clip() if self.before_clip is not None else None
        if clipped is not None:
            self._grad_norm = torch.as_tensor(clipped).float()
        else:
            grads = [p.grad for ps in self.layers.values() for p in ps if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            self._grad_norm = norm.float() / self.grad_scale()
        self._old = {layer: [p.detach().clone() for p in ps] for layer, ps in self.layers.items()}

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs) -> None:
        if self._old is None:
            return
        ratios = {}
        for layer, params in self.layers.items():
            old = self._old[layer]
            change = torch.stack([torch.linalg.vector_norm((p - o).float())
                                  for p, o in zip(params, old, strict=True)])
            weight = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(o.float()) for o in old]))
            ratios[layer] = torch.linalg.vector_norm(change) / weight.clamp_min(1e-12)
        self.latest = {"grad_norm": self._grad_norm, "update_to_weight": ratios}
        self._old = None

    def take(self) -> dict:
        """The last measured step's figures as floats (one device sync), then forgotten; {} if none."""
        latest, self.latest = self.latest, None
        if latest is None:
            return {}
        return {"grad_norm": latest["grad_norm"].item(),
                "update_to_weight": {k: v.item() for k, v in latest["update_to_weight"].items()}}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def scalars(record: dict) -> dict[str, float]:
    """A metric record's numbers as TensorBoard tags: `train/...` for a step's, `eval/...` for an
    evaluation's; a dict of numbers (`update_to_weight`) gives one tag per entry."""
    prefix = {"step": "train", "eval": "eval"}.get(record.get("event"), record.get("event", "run"))
    tags = {}
    for key, value in record.items():
        if key in ("event", "step"):
            continue
        if isinstance(value, dict):
            tags.update({f"{key}/{name}": v for name, v in value.items() if _number(v)})
        elif _number(value):
            tags[f"{prefix}/{key}"] = value
    return tags


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Board:
    """A TensorBoard event file: each metric record's numbers at its step (`scalars`)."""

    def __init__(self, directory: str | Path, purge_step: int | None = None):
        self.writer = summary_writer(directory, purge_step)

    def add(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------- the trainer's hook

class TrainerWatch:
    """What `glassgpt.train.Trainer` calls (`attach` builds it): probe snapshots and TensorBoard."""

    def __init__(self, probes: ProbeLog | None, board: Board | None, statistics: StepStatistics | None):
        self.probes, self.board, self.statistics = probes, board, statistics

    def on_record(self, record: dict) -> None:
        """Before a metric record is written: a step's gains the measured gradient figures; then the
        record goes to TensorBoard."""
        if self.statistics is not None and record.get("event") == "step":
            record.update(self.statistics.take())
        if self.board is not None:
            self.board.add(record)

    def on_eval(self, model: GPT, step: int) -> None:
        if self.probes is not None:
            self.probes.record(model, step)


def attach(trainer, resume: bool = False) -> TrainerWatch:
    """The watch of a `Trainer` (its out directory, model, tokenizer, optimizer and settings
    `probe_text` and `tensorboard`); a new run's step-0 snapshot is taken here. Only the main process
    of a data-parallel run watches."""
    c = trainer.config
    if not trainer.dist.is_main:
        return TrainerWatch(None, None, None)
    # Sharded weights (--fsdp) take every process to gather: a forward pass or a weight norm on the
    # main process alone would wait for the others forever. Such runs log scalars only.
    sharded = c.fsdp and trainer.dist.world_size > 1
    text = c.sample_prompt if c.probe_text is None else c.probe_text
    if sharded and text and c.probe_text:
        trainer.say("note: --probe-text is not recorded in a sharded (--fsdp) run")
    probes = None
    if text and trainer.out and not sharded:
        probes = ProbeLog(trainer.out, trainer.model, trainer.tokenizer, text,
                          keep_until=trainer.step if resume else None)
        if not resume:
            probes.record(trainer.model, 0)
    board = statistics = None
    if c.tensorboard:
        board = Board(c.tensorboard, purge_step=trainer.step + 1 if resume else None)

        def due() -> bool:  # the step about to be taken is logged (train.Trainer.fit's rule)
            n = trainer.step + 1
            return n % c.log_every == 0 or n % trainer.eval_every == 0 or n == trainer.total_steps

        scaler = trainer.scaler
        statistics = None if sharded else StepStatistics(
            trainer.model, trainer.optimizer, due,
            grad_norm_before_clip=(lambda: getattr(trainer, "grad_norm", None)) if c.grad_clip else None,
            grad_scale=lambda: scaler.get_scale() if scaler.is_enabled() else 1.0)
    return TrainerWatch(probes, board, statistics)
