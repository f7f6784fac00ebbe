"""Wall time of the ``edelman2024`` recipe at 1 and 2 torch threads (why ``threads=1`` is the
trainer's default on CPU).

Trains the recipe (2000 steps of 64 sequences, evaluation every 25 steps on 1024 held-out
sequences) through the one trainer at each thread count, alternating, and prints the wall time
and steps per second of every run. The models are tiny (5,472 parameters), so a step is a
chain of small kernels whose cost is dominated by dispatch: a second thread adds
synchronisation and, on a machine whose cores are shared, waits for a busy core.

Usage (about a minute per run on a 2-core CPU):

    PYTHONPATH=. python docs/scripts/thread_timing.py [--threads 1 2] [--repeats 1] [--steps 2000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace

import torch

from baselines import MODELS
from iclgym.harness import RECIPES, RunOptions, build_model, train
from iclgym.registry import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    recipe = RECIPES["edelman2024"]
    task = make_task(recipe.env_id, **recipe.spec)
    entry = MODELS[recipe.model]
    print(
        f"edelman2024, {args.steps} steps; torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"{'threads':>7} {'repeat':>6} {'wall s':>7} {'steps/s':>8} {'final KL_last':>13}")
    for repeat in range(args.repeats):
        for threads in args.threads:
            model = build_model(entry.factory, task, seed=0, **recipe.model_args)
            config = replace(recipe.train, steps=args.steps, threads=threads)
            with tempfile.TemporaryDirectory() as out:
                run = RunOptions(out=out, progress=False, plot=False)
                summary = train(model, task, config, run, env_id=recipe.env_id)
            print(
                f"{threads:>7} {repeat:>6} {summary['wall_s']:>7.1f} "
                f"{summary['steps_per_s']:>8.1f} {summary['final']['kl_last']:>13.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
