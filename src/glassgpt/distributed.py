"""Training on several processes and machines, through PyTorch's own distributed engine.

torchrun starts one `python -m glassgpt train` per process (on one machine, or on several: see
docs/TRAINING.md); `glassgpt.train.Trainer` asks this module for everything that differs from
training alone:

- `Distributed`: where this process sits (rank, local rank, world size) and `start`, which joins
  the process group (NCCL on GPUs, gloo on CPUs).
- `wrap_ddp`: data-parallel training, the weights replicated. The settings that make it scale:
  gradients written straight into the all-reduce buckets (`gradient_as_bucket_view`: no copy per
  step), the bucket size (`--ddp-bucket-mb`), `static_graph` when the model runs eagerly without
  accumulation (DDP then learns the order the buckets fill in on the first step and overlaps
  every later step's all-reduces with the backward pass without searching for unused parameters).
  A compiled model
  is compiled *around* DDP (`torch.compile(DDP(model))`), never inside it: then dynamo's
  DDPOptimizer cuts the compiled graph at the buckets' edges, so each bucket's all-reduce starts
  while the rest of the backward pass runs. Compiled inside DDP, the whole backward is one opaque
  kernel and every all-reduce waits for its end.
- `shard`: FSDP2 (`torch.distributed.fsdp.fully_shard`) for a model whose weights, gradients and
  optimizer state do not fit one device: each transformer block is its own unit (all-gathered just
  before it runs, freed after), then the root (embeddings, final norm, head). `MixedPrecisionPolicy`
  computes in bf16 with the weights, the gradient reduction and the optimizer in fp32.
- `gradient_sync(module, enabled)`: the accumulation switch for either (DDP's `no_sync`, FSDP's
  `set_requires_gradient_sync`).
- Sharded checkpoints (`save_shards`, `load_shards`, `load_shards_into_one`): under FSDP every
  process writes its own shards of the weights and the optimizer state with
  `torch.distributed.checkpoint` (DCP) into `OUT/shards-<step>-<id>/`, named by `OUT/last/trainer.pt`;
  a directory is written under a temporary name and renamed once complete, and `last` is swapped to
  name it only after that, so a crash at any moment leaves the previous pair intact. Rank 0 also
  writes the whole model as ordinary model files (`full_model_state`), so `generate`, `serve` and
  `export` read an FSDP run like any other; `load_shards_into_one` reads the shards in one process
  without a process group (DCP re-slices them to whatever it loads into).
- `PeerLost`: a process of the job died (a node went down, a kill): the run ends with a message
  naming the last checkpoint, which is intact, and how to continue it (`--resume`).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from glassgpt.checkpoint import fsync_directory

SHARDS_PREFIX = "shards-"
DEFAULT_BUCKET_MB = 25.0  # DDP's own default; the bench measures others (--ddp-bucket-mb)


@dataclass
class Distributed:
    """Where this process sits in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        """Join torchrun's process group (once; nothing when alone): NCCL for GPUs, else gloo."""
        if self.world_size == 1 or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)


def check_parallel_settings(fsdp: bool, lora_rank: int | None, precision: str, bucket_mb: float) -> None:
    """Refuse what the parallel modes cannot do, before any work starts."""
    if bucket_mb <= 0:
        raise ValueError(f"ddp_bucket_mb must be positive, got {bucket_mb}")
    if not fsdp:
        return
    if lora_rank is not None:
        raise ValueError("--fsdp shards a model whose full training state does not fit one device; LoRA "
                         "trains a few adapters and fits: drop --fsdp (data-parallel LoRA runs under "
                         "torchrun as it is)")
    if precision == "fp16":
        raise ValueError("--fsdp computes in bf16 or fp32 (fp16 needs a loss scaler over shards): "
                         "use --precision bf16")


# ---------------------------------------------------------------- data-parallel (DDP)


def wrap_ddp(model: torch.nn.Module, device: torch.device, bucket_mb: float = DEFAULT_BUCKET_MB,
             static_graph: bool = True) -> DistributedDataParallel:
    """`model` (eager, on `device`) replicated across the processes, gradients averaged in buckets.

    `static_graph` suits a model that runs the same graph every step (a GPT does), eagerly, with
    every backward pass synchronised: leave it off for a model that `torch.compile` will wrap (see the
    module's docstring) and under gradient accumulation (DDP's reducer refuses `no_sync` with it).
    """
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_mb,
        gradient_as_bucket_view=True,  # .grad is a view of its bucket: no copy in or out per step
        static_graph=static_graph,
    )


@contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Average gradients across processes in the coming backward pass (`enabled`), or only accumulate
    them locally: micro-batches before the last of an accumulation need no communication.

    Enter it around each micro-batch's forward pass. DDP reads its switch there; FSDP reads its own
    in the backward pass that follows the block, so that one is left set until the next call.
    """
    module = getattr(module, "_orig_mod", module)  # compiled: the switch is on the module inside
    if is_sharded(module):
        module.set_requires_gradient_sync(enabled)
        yield
    elif not enabled and isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        yield


# ---------------------------------------------------------------- sharded (FSDP2)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def mixed_precision(precision: str):
    """FSDP's policy for a run's precision: bf16 compute over fp32 weights and reductions, or fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: torch.nn.Module, precision: str = "fp32") -> torch.nn.Module:
    """Shard `model` (on its device) across the processes, in place: each block its own FSDP unit,
    then the root. Its parameters become DTensors, each process holding 1 / world_size of every one:
    build the optimizer after this."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(precision)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the embeddings, final norm and head (tied or not)
    return model


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on the CPU in rank 0 (an empty dict elsewhere). Every process must
    call it: the shards are gathered one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _broadcast_name(name: str) -> str:
    names = [name]
    dist.broadcast_object_list(names, src=0)
    return names[0]


def save_shards(out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Every process writes its shards of the weights and optimizer state into a new `out/shards-...`
    directory (complete once this returns, in every process); returns its name, which the trainer
    state must record: `prune_shards` deletes every other one once `last` names this one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # Unique: a run resumed from an older checkpoint may reach this step again while a directory of
    # this step from the run that died is still there (a crash between the shards and `last`).
    name = _broadcast_name(f"{SHARDS_PREFIX}{step:09d}-{time.time_ns():x}")
    tmp = out / f".{name}.tmp"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # DCP's writer fsyncs each file; rank 0 writes the metadata last, after every process reported
    # its files written, so the directory is complete when rank 0's save returns.
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if dist.get_rank() == 0:
        os.replace(tmp, out / name)
        fsync_directory(out)
    dist.barrier()  # no process goes on before the shards have their final name
    return name


def load_shards(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put the shards of `directory` back into this process's part of `model` and `optimizer`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} holds no sharded checkpoint (its .metadata is missing)")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_shards_into_one(directory: str | Path, model: torch.nn.Module) -> torch.nn.Module:
    """The weights of a sharded checkpoint, however many processes wrote it, in one ordinary model
    (`model`, of the run's architecture), in this one process: no process group needed."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} holds no sharded checkpoint (its .metadata is missing)")
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: what is asked here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=directory, no_dist=True)
    model.load_state_dict(state["model"])
    return model


def prune_shards(out: Path, keep: str) -> None:
    """Delete every shards directory of `out` but `keep` (the one `last` names), finished or not."""
    for path in out.iterdir():
        if path.name == keep or not path.is_dir():
            continue
        if path.name.startswith(SHARDS_PREFIX) or path.name.startswith(f".{SHARDS_PREFIX}"):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- a process that died


# What gloo's and NCCL's errors say when the other end of a connection has gone.
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                   "Connection refused", "NCCL communicator was aborted", "remote process exited")


class PeerLost(RuntimeError):
    """Another process of the job stopped answering (it died, or its machine did)."""


def lost_peer_error(error: Exception) -> bool:
    """Whether `error`, raised by a collective, means a process of the job is gone."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(sign in text for sign in LOST_PEER_SIGNS)
