"""What recording probe snapshots (glassgpt.watch) costs a training run: the demo recipe, timed.

    python bench/bench_watch.py                  # the demo recipe, 54 steps (2 evaluations of 27)
    python bench/bench_watch.py --max-steps 108  # longer
    python bench/bench_watch.py --recipe tinygpt # quick check that the script runs

One run of the recipe (its own settings: precision, evaluation cadence, probe = its sample prompt)
into a temporary directory; the time spent in snapshots (step 0 and each evaluation, summed by
`ProbeLog.seconds`) against the whole run's training time (`fit`). Then, at the same state, each
snapshot's time again over a few repeats (median), and a training step's (median of the run's
per-step times), for the fraction at the default cadence: snapshot / (eval_every x step). The
goal (issue 13): under 5%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from glassgpt.train import Trainer, recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--max-steps", type=int, default=54)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(recipe(args.recipe, out=out, max_steps=args.max_steps, progress=False))
        started = time.perf_counter()
        trainer.fit()
        fit_s = time.perf_counter() - started
        probes = trainer.watch.probes
        n_snapshots = len(probes.records)
        in_run = probes.seconds
        window = [r for r in trainer.records if r["event"] == "step"]
        # tokens/s of each logged step (one step per record at log_every 1): seconds per step
        step_times = [trainer.tokens_per_step / r["tokens_per_s"] for r in window if r.get("tokens_per_s")]
        again = []
        for _ in range(args.repeats):
            begun = time.perf_counter()
            probes.record(trainer.model, trainer.step)
            again.append(time.perf_counter() - begun)
    step_s, snapshot_s = statistics.median(step_times), statistics.median(again)
    print(f"recipe {args.recipe}: {args.max_steps} steps, evaluation every {trainer.eval_every}, "
          f"probe {len(probes.ids)} tokens, {torch.get_num_threads()} threads")
    # The step-0 snapshot is taken when the trainer is made, before `fit` starts its clock.
    print(f"in the run: {n_snapshots} snapshots took {in_run:.2f} s beside {fit_s:.1f} s of fit "
          f"({100 * in_run / (fit_s + probes.records[0]['seconds']):.2f}% of the two together)")
    share = snapshot_s / (trainer.eval_every * step_s)
    print(f"median snapshot {snapshot_s * 1000:.0f} ms, median step {step_s:.2f} s: "
          f"{100 * share:.2f}% at one snapshot per {trainer.eval_every} steps")


if __name__ == "__main__":
    main()
