"""Decoding beside a CPU-bound competitor: the default thread choice against --threads 1 and N.

    python bench/bench_busy_cpu.py                   # GPT-2 small (random weights), 3 rounds
    python bench/bench_busy_cpu.py --preset nano     # a small model, to check the script runs
    python bench/bench_busy_cpu.py --rounds 5 --tokens 128

Each figure is one `python -m glassgpt generate ... --verbose` in its own process (batch 1,
greedy, a fixed prompt and token count), so the default goes through the same entry point a
user's command does: the thread count and OpenMP wait policy are chosen there, before torch
starts its thread pool, and a process can choose only once. Configurations: the default (no
--threads), --threads 1 and --threads N (N = the cores this process may use). "busy" runs
them beside competitor processes, each a Python busy loop pinned to one of those cores (the
last ones); "quiet" runs them alone. Quiet and busy rounds alternate and the order of the
configurations rotates, so load from other processes falls on all of them alike; each figure
is the median over rounds. The goal (issue 16): the default >= 80% of the best, busy or quiet.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DECODE = re.compile(r"decode ([\d,.]+) tokens/s; (\d+) threads")
PROMPT = "The quick brown fox jumps over the lazy dog while the band plays on"


def make_model(preset: str, directory: Path) -> Path:
    """A random-weight model of `preset`, saved where `glassgpt generate --model DIR` loads it."""
    import torch

    from glassgpt.model import GPT
    from glassgpt.tokenizer import get_tokenizer
    from glassgpt.weights import save_model

    torch.manual_seed(0)
    return save_model(GPT.from_preset(preset, vocab_size=50257).eval(), directory,
                      get_tokenizer("gpt2"))


def start_competitors(cores: list[int]) -> list[subprocess.Popen]:
    """One pure-Python busy loop per core in `cores`, each pinned there."""
    loop = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"
    competitors = [subprocess.Popen([sys.executable, "-c", loop, str(core)]) for core in cores]
    time.sleep(0.5)  # let them reach their loops (and the load average notice them, a little)
    return competitors


def stop(competitors: list[subprocess.Popen]) -> None:
    for process in competitors:
        process.kill()
        process.wait()


def decode_speed(model: Path, tokens: int, threads: int | None, env: dict) -> tuple[float, int]:
    """(decode tokens/s, threads used) of one `glassgpt generate` process."""
    command = [sys.executable, "-m", "glassgpt", "generate", PROMPT, "--model", str(model),
               "--max-tokens", str(tokens), "--verbose"]
    if threads is not None:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    match = DECODE.search(done.stderr)
    if done.returncode or not match:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return float(match.group(1).replace(",", "")), int(match.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="model shape, random weights (default GPT-2 small)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--competitors", type=int, default=1, help="busy-loop processes in the busy runs")
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= args.competitors <= len(cores):
        parser.error(f"--competitors must be 1..{len(cores)} (the cores this process may use)")
    configs = {"default": None, "--threads 1": 1, f"--threads {len(cores)}": len(cores)}
    # The child finds glassgpt where this script did; the caller's OMP_* settings would override the
    # policy under test, so they are left out.
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("OMP_", "KMP_", "GOMP_", "MKL_NUM"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                                      env.get("PYTHONPATH")]))
    speeds = {(condition, name): [] for condition in ("quiet", "busy") for name in configs}
    threads_used: dict[tuple[str, str], set[int]] = {key: set() for key in speeds}
    with tempfile.TemporaryDirectory() as directory:
        model = make_model(args.preset, Path(directory))
        print(f"{args.preset} (random weights), batch 1, greedy, {args.tokens} new tokens; cores {cores}; "
              f"busy = {args.competitors} pinned busy loop(s) on {cores[-args.competitors:]}; "
              f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        names = list(configs)
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for condition in ("quiet", "busy"):
                competitors = start_competitors(cores[-args.competitors:]) if condition == "busy" else []
                try:
                    for name in order:
                        speed, used = decode_speed(model, args.tokens, configs[name], env)
                        speeds[condition, name].append(speed)
                        threads_used[condition, name].add(used)
                        print(f"  round {round_ + 1} {condition:<5} {name:<12} {speed:7.1f} tok/s "
                              f"({used} threads; load average {os.getloadavg()[0]:.1f})", flush=True)
                finally:
                    stop(competitors)
    print(f"\nmedian decode tokens/s over {args.rounds} rounds")
    print(f"{'':<7}" + "".join(f"{name:>14}" for name in names) + "   default / best")
    for condition in ("quiet", "busy"):
        medians = {name: statistics.median(speeds[condition, name]) for name in names}
        used = "/".join(str(n) for n in sorted(threads_used[condition, "default"]))
        cells = "".join(f"{medians[name]:>14.1f}" for name in names)
        print(f"{condition:<7}{cells}   {medians['default'] / max(medians.values()):6.0%}"
              f"   (default used {used} threads)")


if __name__ == "__main__":
    main()
