"""glassgpt.distributed on CPUs (gloo): FSDP2 on 2 processes against 1, sharded checkpoints saved,
resumed and read back in one process; two "nodes" of one process each through torchrun's c10d
rendezvous, one of them killed mid-run, then resumed. (DDP on one node: tests/test_train.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glassgpt.checkpoint import load_state
from glassgpt.cli import main
from glassgpt.distributed import (
    gradient_sync,
    load_shards_into_one,
    lost_peer_error,
    mixed_precision,
    prune_shards,
)
from glassgpt.train import TrainConfig, Trainer
from glassgpt.weights import load_model

TEXT = "hello world, this is a tiny text for training. " * 8

# A 2-block character model, 2 micro-batches of 2 windows per process and step (no dropout: a
# resumed rank 1 draws other dropout masks than an uninterrupted one would).
COMMON = ["--text", TEXT, "--tokenizer", "char", "--model", "nano", "--context-length", "16",
          "--n-layers", "2", "--n-heads", "2", "--emb-dim", "32", "--drop-rate", "0", "--stride", "4",
          "--val-fraction", "0.2", "--epochs", "1", "--lr", "3e-3", "--eval-every", "3", "--no-progress",
          "--threads", "1", "--sample-prompt", "hello", "--sample-tokens", "8", "--grad-accum", "2",
          "--batch-size", "2", "--device", "cpu"]  # gloo, also on a machine with GPUs
# PYTHONFAULTHANDLER: a worker that crashes in native code prints its Python stack before torchrun's report.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
TIMEOUT = 180

# Run by node 1 in place of `-m glassgpt`: the process that gets rank 1 kills itself (SIGKILL: no
# clean-up, as a crashed machine) when it is about to take step DIE_AT_STEP.
DYING = """
import os, signal, sys
from glassgpt import train
from glassgpt.cli import main

take_step = train.Trainer.train_step

def train_step(self, micro_batches):
    if os.environ["RANK"] == "1" and self.step + 1 == int(os.environ["DIE_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return take_step(self, micro_batches)

train.Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def step_losses(records) -> list[float]:
    return [r["train_loss"] for r in records if r["event"] == "step"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_process(out: Path, steps: int) -> list[dict]:
    """The run saved in `out`, in this process alone, at the same global batch (4 windows per micro-batch)."""
    saved = json.loads((out / "train_config.json").read_text())
    config = TrainConfig.from_dict({**saved, "batch_size": 4, "max_steps": steps, "out": None, "fsdp": False})
    return Trainer(config).fit()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_output(result: subprocess.CompletedProcess) -> str:
    """The end of what the workers printed, before torchrun's own report of the failure (which names
    no cause: "exitcode -11")."""
    report = re.search(r"^\S*E\d{4} .* failed \(exitcode", result.stderr, re.MULTILINE)
    return result.stderr[:report.start() if report else None][-6000:]


def standalone(n: int, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "glassgpt", "train", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def two_nodes(args: list[str], entry: list[str], env: dict) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents of one process each, meeting at a c10d rendezvous on 127.0.0.1, as two
    machines would (docs/TRAINING.md)."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                               "--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", endpoint, "--rdzv-id", "glassgpt-test",
                               "--local-addr", "127.0.0.1", *entry, "train", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)  # its own process group: a hung node is killed whole
             for rank in (0, 1)]
    results = []
    for node in nodes:
        try:
            output, _ = node.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)  # the agent and its worker
            output, _ = node.communicate()
        results.append(subprocess.CompletedProcess(node.args, node.returncode, output, ""))
    return results


def test_fsdp_on_two_processes_matches_one_resumes_exactly_and_loads_into_one(tmp_path, capsys):
    out = tmp_path / "fsdp"
    first = standalone(2, COMMON + ["--fsdp", "--max-steps", "3", "--out", str(out)])
    assert first.returncode == 0, worker_output(first)
    state = load_state(out)
    assert "optimizer" not in state  # the optimizer state is in the shards, each process's part
    assert [p.name for p in out.iterdir() if p.name.startswith(("shards-", ".shards-"))] == [state["shards"]]

    # Resumed on 2 processes, the run goes on exactly as one process at the same global batch.
    second = standalone(2, ["--resume", str(out), "--max-steps", "6"])
    assert second.returncode == 0, worker_output(second)
    assert "resumed" in second.stdout + second.stderr
    records = metrics(out)
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert step_losses(records) == pytest.approx(step_losses(one_process(out, 6)), rel=1e-5)
    state = load_state(out)
    assert state["step"] == 6
    assert [p.name for p in out.iterdir() if p.name.startswith(("shards-", ".shards-"))] == [state["shards"]]

    # One process reads the run as any other: the model files rank 0 gathered, and the shards.
    model, tokenizer = load_model(out)
    shards = load_shards_into_one(out / state["shards"], load_model(out)[0])
    for (name, saved), (_, resharded) in zip(model.state_dict().items(), shards.state_dict().items(),
                                             strict=True):
        assert torch.equal(saved, resharded), name
    prompt = torch.tensor([tokenizer.encode("hello")])
    text = tokenizer.decode(model.generate(prompt, 8)[0].tolist())
    assert text == [r for r in records if r["event"] == "eval"][-1]["sample"]  # what the 2 processes sampled

    # Training on from the shards needs processes to hold them: one alone is refused, nothing written.
    assert main(["train", "--resume", str(out), "--max-steps", "7"]) == 2
    assert "was trained sharded (--fsdp): resume it under torchrun" in capsys.readouterr().err
    assert load_state(out)["step"] == 6 and len(metrics(out)) == len(records)


def test_two_nodes_match_one_process_a_killed_rank_keeps_the_checkpoint_and_resume_goes_on(tmp_path):
    out = tmp_path / "nodes"
    args = COMMON + ["--max-steps", "8", "--eval-every", "2", "--out", str(out)]
    dying = tmp_path / "dying.py"
    dying.write_text(DYING)
    killed = two_nodes(args, [str(dying)], {**ENV, "DIE_AT_STEP": "5"})
    assert all(node.returncode != 0 for node in killed)
    said = "".join(node.stdout for node in killed)
    assert "stopped answering at step 4" in said, said[-3000:]
    assert f"the checkpoint of step 4 is in {out / 'last'}; --resume {out} continues from it" in said
    assert load_state(out)["step"] == 4
    load_model(out / "last")  # intact

    resumed = two_nodes(["--resume", str(out)], ["-m", "glassgpt"], ENV)
    assert all(node.returncode == 0 for node in resumed), "".join(node.stdout[-3000:] for node in resumed)
    records = metrics(out)  # written by rank 0 alone: each step once
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, 9))
    assert step_losses(records) == pytest.approx(step_losses(one_process(out, 8)), rel=1e-5)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["best", "last"]


# ---------------------------------------------------------------- in this process


@pytest.mark.parametrize(("settings", "message"), [
    (dict(fsdp=True, lora_rank=4), "LoRA"),
    (dict(fsdp=True, precision="fp16"), "bf16"),
    (dict(ddp_bucket_mb=0), "ddp_bucket_mb must be positive"),
])
def test_settings_the_parallel_modes_cannot_run_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(text=TEXT, tokenizer="char", model="nano", **settings)


def test_gradient_sync_is_a_no_op_for_a_model_alone():
    layer = torch.nn.Linear(2, 1)
    for enabled in (True, False):
        with gradient_sync(layer, enabled):
            layer(torch.ones(1, 2)).sum().backward()
    assert torch.equal(layer.bias.grad, torch.tensor([2.0]))


def test_pruning_keeps_the_shards_last_names_and_everything_else(tmp_path):
    for name in ("shards-000000004-a", "shards-000000006-b", ".shards-000000008-c.tmp", "last", "best"):
        (tmp_path / name).mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    prune_shards(tmp_path, keep="shards-000000006-b")
    kept = ["best", "last", "metrics.jsonl", "shards-000000006-b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


def test_a_directory_without_shards_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sharded checkpoint"):
        load_shards_into_one(tmp_path, torch.nn.Linear(1, 1))


def test_lost_peers_are_told_from_other_errors():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29921")
    assert lost_peer_error(gloo)
    assert not lost_peer_error(RuntimeError("expect_autograd_hooks_ INTERNAL ASSERT FAILED at reducer.cpp"))


def test_fsdp_computes_in_bf16_over_fp32_weights_and_reductions():
    policy = mixed_precision("bf16")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision("fp32").param_dtype is None  # the weights' own dtype
