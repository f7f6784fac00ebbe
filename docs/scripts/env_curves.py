"""Plot each env's per-position KL(true || strategy) curves into docs/envs/<id>.png.

Run: python docs/scripts/env_curves.py  (about 10 s on a 2-core CPU)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import iclgym
from iclgym.harness import StrategyPredictor, evaluate

OUT = Path(__file__).resolve().parents[1] / "envs"


def main() -> None:
    for env_id in iclgym.list_envs():
        task = iclgym.make_task(env_id)
        if task.name != "markov_chain":  # single-label tasks have no per-position curve
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for name in task.strategies:
            if name == "true":
                continue
            report = evaluate(StrategyPredictor(task, name), task, num_sequences=4096, seed=0)
            ax.plot(range(1, task.seq_len + 1), report.curves["kl"], label=name)
        ax.set(
            xlabel="tokens seen (t + 1)",
            ylabel="KL(true || strategy), nats",
            yscale="log",
            title=f"{env_id}: {task.spec.num_states} states, order {task.spec.order}",
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / f"{env_id}.png", dpi=110)
        print(f"wrote {OUT / f'{env_id}.png'}")


if __name__ == "__main__":
    main()
