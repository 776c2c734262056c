"""What a checkpoint costs: save_checkpoint(best=True) and the resume-side load, a model + AdamW state.

    python bench/bench_checkpoint.py                           # verdict-demo-70m, 3 timed saves
    python bench/bench_checkpoint.py --preset nano --saves 2   # a small model, to check the script runs

To compare with the code before checksums (issue 15), run it once more with that code first on the
path, e.g. `git archive 5902a73 src | tar -x -C /tmp/old && PYTHONPATH=/tmp/old/src python bench/...`.
Each save writes OUT/last (model + trainer state + checksums), its copy OUT/best and the top-level
model; the load is `load_checkpoint` as a fresh process does it (checksums hashed, not remembered).
The first save is not timed (page cache, allocator). Prints medians: the machine may be shared.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glassgpt.checkpoint import load_checkpoint, save_checkpoint
from glassgpt.model import GPT
from glassgpt.tokenizer import get_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="verdict-demo-70m")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT.from_preset(args.preset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model(ids, targets=ids).backward()
    optimizer.step()  # AdamW's two moments exist: the trainer state is ~2x the model
    state = {"step": 1, "optimizer": optimizer.state_dict()}
    tokenizer = get_tokenizer("gpt2")
    out = Path(tempfile.mkdtemp(dir=args.dir)) / "run"
    try:
        saves, loads = [], []
        for _ in range(args.saves + 1):
            start = time.perf_counter()
            save_checkpoint(out, model, tokenizer, state=state, best=True)
            saves.append(time.perf_counter() - start)
        for _ in range(3):
            try:  # a fresh process has no hashes remembered (absent before checksums existed)
                from glassgpt import integrity
                integrity._digests.clear()
            except ImportError:
                pass
            start = time.perf_counter()
            load_checkpoint(out, model)
            loads.append(time.perf_counter() - start)
        files = {f.stat().st_ino: f.stat().st_size for f in out.rglob("*") if f.is_file()}
        megabytes = sum(files.values()) / 1e6
        print(f"{args.preset}: {model.num_parameters() / 1e6:.0f}M parameters, {megabytes:,.0f} MB on disk; "
              f"save median {statistics.median(saves[1:]):.2f} s "
              f"({', '.join(f'{s:.2f}' for s in saves[1:])}); load median {statistics.median(loads):.2f} s "
              f"({', '.join(f'{s:.2f}' for s in loads)})")
    finally:
        shutil.rmtree(out.parent)


if __name__ == "__main__":
    main()
