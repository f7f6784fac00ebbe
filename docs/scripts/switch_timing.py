"""T4 of ``shared/specs/markov-chain.md`` section 6: when does the induction head appear?

Trains the reference model (2 layers, attention-only, relative positions, width 16, 1 head,
dropout 0.1; AdamW lr 5e-4, batch 64, 2000 steps) on ICL-MarkovChain-v0 (k=3, T=100,
Dirichlet(1), stationary init) for several random seeds and reports each run's persistent switch
step: the first evaluation after which KL(bigram || model) < KL(unigram || model) at every
later evaluation (section 4). The target is a switch in [800, 1800] for at least 2 of 3 seeds
(the official code switched at about 1150-1500).

Usage (about a minute per seed on a 2-core CPU):

    PYTHONPATH=. python docs/scripts/switch_timing.py [--seeds 0 1 2] [--out-dir runs/t4]

Output of the default run: ``docs/results/switch_timing.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from iclgym.harness.train import TrainConfig, build_model, train
from iclgym.registry import make_task

LOW, HIGH, NEEDED = 800, 1800, 2  # section 6, T4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out-dir", default="runs/switch_timing")
    args = parser.parse_args()
    task = make_task("ICL-MarkovChain-v0", num_states=3, seq_len=100, alpha=1.0, init="stationary")
    print(f"T4 switch timing: {task}, {args.steps} steps, batch 64, eval every 25 steps on 1024")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(
        f"{'seed':>4} {'switch step':>11} {'in range':>8} {'KL_last@300':>11} "
        f"{'KL_last@end':>11} {'wall s':>6}  plateaus"
    )
    hits = 0
    for seed in args.seeds:
        run_dir = Path(args.out_dir) / f"seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = TrainConfig(steps=args.steps, seed=seed, run_dir=str(run_dir), progress=False)
        summary = train(build_model(task, seed), task, config, env_id="ICL-MarkovChain-v0")
        switch = summary["switch_step"]
        ok = switch is not None and LOW <= switch <= HIGH
        hits += ok
        evals = {r["step"]: r for r in _evals(run_dir)}
        phases = ", ".join(
            f"{p['label']} {p['start_step']}-{p['end_step']}" for p in summary["plateaus"]
        )
        print(
            f"{seed:>4} {switch!s:>11} {'yes' if ok else 'no':>8} "
            f"{evals[300]['kl_last']:>11.4f} {summary['final']['kl_last']:>11.4f} "
            f"{summary['wall_s']:>6.1f}  {phases}",
            flush=True,
        )
    verdict = "PASS" if hits >= NEEDED else "FAIL"
    print(f"{verdict}: {hits} of {len(args.seeds)} seeds switch in [{LOW}, {HIGH}] (need {NEEDED})")


def _evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "eval"]


if __name__ == "__main__":
    main()
