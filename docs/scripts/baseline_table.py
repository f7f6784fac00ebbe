"""Every baseline on every registered env id, scored by the one harness (issue 13's table):
the Bayes oracle, the uniform law, the in-context bigram (``ngram:2``), a generic transformer,
the streaming DPT with soft and with hard labels, PPO and RecurrentPPO; excess loss over the
oracle (nats/token) and accuracy, each with its standard error over sequences, on the test
split of each id's default spec.

Budgets (small and equal across ids, so the table compares methods, not tuning; one torch
thread): the transformer (pre-LN, width 32, 2 layers, 2 heads, MLP, no dropout) and the DPT
(the ``lee2023`` recipe's model; states of n - 1 tokens on order-n chains) train through the
one trainer for ``--steps`` AdamW steps (lr 1e-3, batch 64); PPO (8-token window observation,
token action) and RecurrentPPO (one token per step) train for ``--agent-steps`` env steps
through SB3's ``make_vec_env``. SB3 agents are floors, not in-context learners: their env steps
are printed with the table.

Run::

    python docs/scripts/baseline_table.py --out docs/results/baselines

writes ``table.md``, ``table.json`` and ``excess.png`` there (about 20 minutes on the project's
2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import iclgym
from baselines.ngram import NGramPredictor
from baselines.sb3_agents import AgentConfig, SB3Predictor, train_agent
from iclgym.harness import RECIPES, RunOptions, build_model, evaluate, train
from iclgym.harness.evaluate import HeldOut
from iclgym.harness.model import ModelPredictor
from iclgym.harness.predictors import OraclePredictor, StrategyPredictor
from iclgym.harness.train import TrainConfig
from iclgym.registry import make_task

COLUMNS = ("oracle", "uniform", "ngram:2", "transformer", "dpt soft", "dpt hard", "ppo",
           "recurrent_ppo")  # fmt: skip
TRANSFORMER = {"d_model": 32, "n_layers": 2, "n_heads": 2, "mlp": True, "dropout": 0.0}
EVAL_SEQUENCES = 1024


def _trained(task, factory: str, args: dict, steps: int, labels: str = "sampled"):
    model = build_model(factory, task, seed=0, **args)
    config = TrainConfig(
        steps=steps, batch_size=64, lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.999),
        labels=labels, eval_every=0, eval_sequences=128, eval_batch_size=128,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        train(model, task, config, RunOptions(out=tmp, progress=False, plot=False))
    return ModelPredictor(model, name=factory)


def _agent(env_id: str, algo: str, steps: int) -> tuple[SB3Predictor, int]:
    kwargs = {"observation": "window"} if algo == "ppo" else {}  # window min(8, T + 1)
    tmp = tempfile.mkdtemp()
    record = train_agent(AgentConfig(env_id, algo=algo, steps=steps, env_kwargs=kwargs), tmp)
    return SB3Predictor(tmp, make_task(env_id)), record["num_timesteps"]


def score_id(env_id: str, steps: int, agent_steps: int) -> dict[str, Any]:
    """{column: {excess, excess_se, accuracy, accuracy_se, seconds}} for one id."""
    task = make_task(env_id)
    held = HeldOut(task, split="test", seed=0, num_sequences=EVAL_SEQUENCES, batch_size=256)
    # the DPT state is the last n - 1 tokens of an order-n chain (lee2023, docs/recipes.md)
    order = getattr(task.spec, "order", 2)
    dpt = {**RECIPES["lee2023"].model_args, "state_len": max(1, order - 1)}
    makers = {
        "oracle": lambda: OraclePredictor(task),
        "uniform": lambda: StrategyPredictor(task, "uniform"),
        "ngram:2": lambda: NGramPredictor(task.vocab_size, 2, 1.0, seq_len=task.seq_len),
        "transformer": lambda: _trained(task, "baselines.transformer:make_model", TRANSFORMER,
                                        steps),
        "dpt soft": lambda: _trained(task, "baselines.dpt:make_model", dpt, steps, "soft"),
        "dpt hard": lambda: _trained(task, "baselines.dpt:make_model", dpt, steps, "hard"),
        "ppo": lambda: _agent(env_id, "ppo", agent_steps),
        "recurrent_ppo": lambda: _agent(env_id, "recurrent_ppo", agent_steps),
    }  # fmt: skip
    row: dict[str, Any] = {}
    for column, make in makers.items():
        start = time.perf_counter()
        made = make()
        predictor, seen = made if isinstance(made, tuple) else (made, None)
        report = evaluate(predictor, held)
        row[column] = {
            "excess": report.excess_loss,
            "excess_se": report.excess_loss_se,
            "accuracy": report.accuracy,
            "accuracy_se": report.accuracy_se,
            "seconds": time.perf_counter() - start,
            "env_steps": seen,
        }
        print(f"  {env_id} {column}: excess {report.excess_loss:.4f}, accuracy "
              f"{report.accuracy:.4f} ({row[column]['seconds']:.0f} s)", flush=True)  # fmt: skip
    return row


def table(rows: dict[str, dict[str, Any]], steps: int, agent_steps: int) -> str:
    def cell(r: dict[str, Any], key: str) -> str:
        se = r[f"{key}_se"]
        return (
            f"{r[key]:.3f} ± {se:.3f}" if se is not None and math.isfinite(se) else f"{r[key]:.3f}"
        )

    head = "| env id | " + " | ".join(COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    lines = [f"Excess loss over the Bayes oracle (nats/token, test split, {EVAL_SEQUENCES} "
             f"sequences; trained models {steps} steps, SB3 agents {agent_steps} env steps):",
             "", head, rule]  # fmt: skip
    for env_id, row in rows.items():
        lines.append(f"| {env_id} | " + " | ".join(cell(row[c], "excess") for c in COLUMNS) + " |")
    lines += ["", "Accuracy (argmax, first token on ties):", "", head, rule]
    for env_id, row in rows.items():
        lines.append(
            f"| {env_id} | " + " | ".join(cell(row[c], "accuracy") for c in COLUMNS) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[row[c]["excess"] for c in COLUMNS] for row in rows.values()])
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    image = ax.imshow(np.log10(np.maximum(values, 1e-4)), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(COLUMNS)), COLUMNS, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), list(rows))
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, label="log10 excess loss (nats/token, floor 1e-4)")
    ax.set_title("Every baseline on every env id (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--agent-steps", type=int, default=20_000)
    parser.add_argument("--ids", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/results/baselines"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for env_id in args.ids or iclgym.list_envs():
        print(env_id, flush=True)
        rows[env_id] = score_id(env_id, args.steps, args.agent_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows, args.steps, args.agent_steps)
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "excess.png")
    print(text)


if __name__ == "__main__":
    main()
