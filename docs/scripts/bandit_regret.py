"""DPT under bandit feedback (Lee et al. 2023's bandit setting on iclgym's chains;
``docs/results/baselines.md``, Bandit feedback): the ``lee2023-bandit`` recipe (the streaming
DPT pretrained on the feedback of random behaviour policies, ``baselines.dpt.BanditDPT``),
deployed online under ``iclgym.wrappers.BanditFeedback`` and scored by cumulative
pseudo-regret (``iclgym.harness.regret``) on the same episodes as SB3's PPO and RecurrentPPO
trained in the bandit env itself (on-policy RL on the 0-1 reward, ``--feedback bandit``,
20,480 env steps each) and three references: the full-information Bayes oracle (a lower
bound), the hand-made revealed-bigram agent and the uniform agent.

Parts:

- ``fit``: the model's soft-label loss (nats/token) on fresh behaviour-policy feedback next to
  the uniform law (ln V), the add-one counting law of the revealed bigrams
  (:func:`revealed_bigram_law`) and the clairvoyant floor E[H(p)];
- ``regret``: each agent's mean cumulative regret per episode, accuracy and regret curve.

Run (one torch thread; about 3 minutes on the project's 2-core CPU)::

    python docs/scripts/bandit_regret.py --out docs/results/bandit

writes ``table.md``, ``reports.json`` and ``regret.png`` there.
``tests/harness/test_dpt_repro.py`` runs the same functions (the CI share).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from baselines.dpt import DPTAgent
from baselines.sb3_agents import AgentConfig, SB3BanditAgent, train_agent
from iclgym.harness import RECIPES, RunOptions, build_model, train
from iclgym.harness.metrics import entropy
from iclgym.harness.regret import (
    RegretReport,
    bandit_regret,
    full_information_regret,
    revealed_bigram_policy,
    uniform_policy,
)
from iclgym.harness.train import training_labels
from iclgym.registry import make_task
from iclgym.tasks.base import Task

RECIPE = RECIPES["lee2023-bandit"]
EPISODES = 256
FIT_SEQUENCES = 512
SB3_STEPS = 20_480
"""Env steps of each SB3 agent (the baseline table's budget, rounded up to whole rollouts)."""


def train_model(out: str, seed: int = 0, steps: int | None = None) -> tuple[Task, nn.Module]:
    """The ``lee2023-bandit`` model trained into the run folder ``out`` (recipe steps unless
    ``steps``)."""
    task = make_task(RECIPE.env_id, **RECIPE.spec)
    model = build_model("baselines.dpt:make_bandit_model", task, seed=seed, **RECIPE.model_args)
    config = replace(RECIPE.train, eval_every=0, eval_sequences=64)
    if steps is not None:
        config = replace(config, steps=steps)
    train(model, task, config, RunOptions(out=out, progress=False, plot=False))
    return task, model


def train_sb3(out: str, task: Task, seed: int = 0) -> dict[str, SB3BanditAgent]:
    """PPO (window observation) and RecurrentPPO (token observation) trained under bandit
    feedback on the recipe's env, ``SB3_STEPS`` env steps each, saved under ``out``; their
    greedy agents (PPO also sampled)."""
    agents = {}
    for algo in ("ppo", "recurrent_ppo"):
        config = AgentConfig(
            RECIPE.env_id,
            algo=algo,
            steps=SB3_STEPS,
            seed=seed,
            env_kwargs=dict(RECIPE.spec),
            feedback="bandit",
        )
        train_agent(config, f"{out}/{algo}")
        agents[algo] = SB3BanditAgent(f"{out}/{algo}", task)
    agents["ppo sample"] = SB3BanditAgent(f"{out}/ppo", task, mode="sample")
    return agents


def revealed_bigram_law(shown: torch.Tensor, v: int) -> torch.Tensor:
    """(B, T, V) float64 add-one law of what bandit feedback revealed up to each t
    (``shown`` (B, T) int64, HIDDEN = V + 1): the successors of x_t among the revealed pairs
    where x_t is shown and has one, else the revealed tokens. The predictor behind
    :func:`iclgym.harness.regret.revealed_bigram_policy` (its argmax at each t)."""
    onehot = nn.functional.one_hot(shown.clamp_max(v), v + 1)[..., :v].double()
    unigram = onehot.cumsum(1) + 1
    pairs = onehot[:, :-1, :, None] * onehot[:, 1:, None, :]  # x_{j-1} -> x_j
    bigram = torch.cat([torch.zeros_like(pairs[:, :1]), pairs], 1).cumsum(1)
    row = (bigram * onehot[..., None]).sum(2)  # successors of x_t (zero where x_t is hidden)
    law = torch.where(row.sum(-1, keepdim=True) > 0, row + 1, unigram)
    return law / law.sum(-1, keepdim=True)


@torch.no_grad()
def fit(task: Task, model: nn.Module, seed: int = 1) -> dict[str, float]:
    """Soft-label cross-entropy (nats/token, the training objective) on ``FIT_SEQUENCES``
    fresh sequences under the model's behaviour-policy feedback, next to the references."""
    batch = task.sample(FIT_SEQUENCES, generator=torch.Generator().manual_seed(seed))
    _, mask, laws = training_labels(batch, "soft")
    torch.manual_seed(seed)
    shown = model.feedback(batch.tokens)
    p = laws[mask]

    def loss(log_q: torch.Tensor) -> float:
        return -(p * log_q[mask]).sum(-1).mean().item()

    return {
        "model": loss(model(shown).log_softmax(-1)),
        "uniform": float(np.log(task.vocab_size)),
        "counting": loss(revealed_bigram_law(shown, task.vocab_size).log()),
        "floor": entropy(p).mean().item(),
    }


def regret(
    task: Task,
    model: nn.Module,
    sb3: dict[str, SB3BanditAgent],
    episodes: int = EPISODES,
) -> dict[str, RegretReport]:
    """Every agent's :class:`RegretReport` on the same ``episodes`` test-split episodes."""
    v = task.vocab_size
    agents = {
        "dpt_bandit greedy": (DPTAgent(model, mode="greedy").act, {}),
        "dpt_bandit sample": (DPTAgent(model, mode="sample").act, {}),
        **{name: (agent.act, agent.env_options) for name, agent in sb3.items()},
        "revealed_bigram": (revealed_bigram_policy(v), {}),
        "uniform": (uniform_policy(v), {}),
    }
    reports = {
        "oracle (full information)": full_information_regret(
            RECIPE.env_id, spec=RECIPE.spec, num_episodes=episodes
        )
    }
    for name, (act, options) in agents.items():
        spec = {**RECIPE.spec, **options}
        torch.manual_seed(0)  # SB3's sampled actions use torch's global random state
        reports[name] = bandit_regret(
            RECIPE.env_id, act, name=name, spec=spec, num_episodes=episodes
        )
    return reports


def paired_below(a: RegretReport, b: RegretReport, se: float = 3.0) -> bool:
    """``a``'s regret is below ``b``'s by more than ``se`` standard errors of the paired
    per-episode difference (both scored on the same episodes)."""
    d = np.subtract(b.episode_regrets, a.episode_regrets)
    return bool(d.mean() > se * d.std(ddof=1) / np.sqrt(len(d)))


def table(losses: dict[str, float], reports: dict[str, RegretReport]) -> str:
    lines = [
        f"Cumulative pseudo-regret per episode ({RECIPE.env_id}, k=3, T=100; {EPISODES} "
        "test-split episodes, the same for every agent; ± one standard error over episodes):",
        "",
        "| agent | regret | accuracy |",
        "|---|---|---|",
    ]
    for name, r in reports.items():
        lines.append(
            f"| {name} | {r.regret:.2f} ± {r.regret_se:.2f} | "
            f"{r.accuracy:.3f} ± {r.accuracy_se:.3f} |"
        )
    lines += [
        "",
        f"Fit (soft-label loss on fresh feedback, nats/token): model {losses['model']:.3f}, "
        f"uniform {losses['uniform']:.3f}, revealed-bigram counting {losses['counting']:.3f}, "
        f"clairvoyant floor {losses['floor']:.3f}.",
    ]
    return "\n".join(lines)


def plot(reports: dict[str, RegretReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in reports.items():
        ax.plot(np.arange(1, len(r.curve) + 1), r.curve, label=name)
    ax.set_xlabel("step t")
    ax.set_ylabel("mean cumulative pseudo-regret")
    ax.set_title("Bandit feedback on ICL-MarkovChain-v0 (k=3)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/results/bandit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        task, model = train_model(f"{run}/dpt", seed=args.seed)
        sb3 = train_sb3(f"{run}/sb3", task, seed=args.seed)
        losses, reports = fit(task, model), regret(task, model, sb3)
    text = table(losses, reports)
    print(text)
    (out / "table.md").write_text(text + "\n")
    rows: dict[str, Any] = {"fit": losses, "reports": [r.to_dict() for r in reports.values()]}
    (out / "reports.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(reports, out / "regret.png")
    print(f"{time.perf_counter() - start:.0f} s; wrote {out}/table.md, reports.json, regret.png")


if __name__ == "__main__":
    main()
