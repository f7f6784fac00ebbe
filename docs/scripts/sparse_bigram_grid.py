"""The reproduction grid of sparse contextual bigrams (``docs/results/sparse-contextual-bigram.md``;
Ren, Wang, Lee 2024): A (proximal method vs SGD), B (two stages and transfer), the
negative control, C (oracles: Bayes closed form vs Monte Carlo, the oracle ladder) and D
(softmax parity).

Common setting: perm_mixture P (M = 3), uniform weights, Q = 2, N = 8; the
training data of task seed s come from ``task.generator(100 + s, "train")`` (the data
seed 100 + task seed: the trainer's ``--seed``); metrics are the exact closed forms of
:meth:`~iclgym.tasks.sparse_bigram.SparseContextualBigramTask.parameter_metrics` (no evaluation
noise), logged against training samples.

Training. Every run goes through the one trainer, :func:`iclgym.harness.train` (:func:`run`):
the linear transformer declares a probability output, so the trainer trains the paper's squared
loss ``1/2 ||e_{x_o} - f(X)||^2`` on a fresh batch per step, with the optimiser of the config
(``iclgym.harness.optimizers:ppg``, the built-in ``sgd``, or ``iclgym.harness.optimizers:sgd``
for the softmax variant's two learning rates), and logs ``task.model_metrics(model)`` at every
evaluation. The scb_ppg run of A is the ``ren2024`` recipe's configuration itself
(``iclgym train --recipe ren2024``, data seed 100 + task seed).
``tests/harness/test_sparse_bigram_repro.py`` imports this module.

Usage (2-core CPU, one torch thread; about 6 minutes for the whole grid):

    PYTHONPATH=. python docs/scripts/sparse_bigram_grid.py [--parts A B control C D]
        [--out docs/results/sparse-contextual-bigram] [--json records.json] [--runs DIR]

Writes ``table.md`` (the measured tables of ``docs/results/sparse-contextual-bigram.md``) and
``curves-*.png`` (learning curves against samples) into ``--out``, with ``--json`` every
record (about 0.5 MB), and with ``--runs`` keeps every run folder of the trainer
(``metrics.jsonl``, ``checkpoint.pt``, ``model_metrics.png``) under ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from baselines.linear_transformer import LinearTransformer
from iclgym.harness import RECIPES, RunOptions, TrainConfig, build_model, train
from iclgym.tasks.sparse_bigram import (
    SparseContextualBigramSpec,
    SparseContextualBigramTask,
    make_transfer_pair,
)
from iclgym.tasks.sparse_bigram_ladder import oracle_ladder

DATA_SEED_OFFSET = 100
"""Data seed = 100 + task seed."""
ESCAPE, TRANSFER_LEVEL = 0.5, 0.1
"""Escape: excess/initial first below 0.5; the transfer test uses 0.1."""
ENV_ID = "ICL-SparseContextualBigram-v0"
RECIPE = RECIPES["ren2024"]
"""Target A's scb_ppg run is this recipe's configuration (task seed 0: the recipe itself)."""
FACTORY = "baselines.linear_transformer:make_model"
EVAL_SEQUENCES = 512
"""Held-out sequences of each evaluation of the runs other than A's (the metrics the grid
reads are the exact closed forms; the held-out set only feeds the trainer's own report)."""
RUNS: Path | None = None
"""Keep every run folder under this directory (``--runs``); None: temporary folders."""
_COUNTER = [0]


# ------------------------------------------------------------------------------ protocol
def linear_model(task: SparseContextualBigramTask, softmax: bool = False) -> LinearTransformer:
    """The one-layer linear (or softmax) transformer at its init (V columns = mu, A = 1/T or
    W = 0), built by
    :func:`~iclgym.harness.build_model` (a checkpoint records its factory)."""
    args: dict = {"softmax": softmax}
    if not np.allclose(task.stationary, task.stationary[0]):
        args["mu"] = tuple(float(x) for x in task.stationary)
    return build_model(FACTORY, task, **args)


def ppg_config(
    task: SparseContextualBigramTask,
    lr: float,
    lam: float,
    *,
    steps: int,
    batch_size: int,
    eval_every: int,
    tau: float = 0.0,
) -> TrainConfig:
    """``scb_ppg`` (precond mu, renormalise, eta / (1 + t / tau)) as the
    trainer's config: ``--optimizer iclgym.harness.optimizers:ppg``, data seed 100 + task
    seed."""
    args = [f"lam={lam!r}", f"tau={tau!r}"]
    if not np.allclose(task.stationary, task.stationary[0]):
        args.append(f"mu={tuple(float(x) for x in task.stationary)!r}")
    return grid_config(
        task, "iclgym.harness.optimizers:ppg", tuple(args), lr, steps, batch_size, eval_every
    )


def grid_config(
    task: SparseContextualBigramTask,
    optimizer: str,
    optimizer_args: tuple[str, ...],
    lr: float,
    steps: int,
    batch_size: int,
    eval_every: int,
) -> TrainConfig:
    """A grid run's config: stream data of seed 100 + task seed, no weight decay, constant lr,
    ``EVAL_SEQUENCES`` held-out sequences per evaluation."""
    return TrainConfig(
        steps=steps,
        batch_size=batch_size,
        optimizer=optimizer,
        optimizer_args=optimizer_args,
        lr=lr,
        weight_decay=0.0,
        seed=DATA_SEED_OFFSET + task.spec.task_seed,
        eval_every=eval_every,
        eval_sequences=EVAL_SEQUENCES,
        eval_batch_size=EVAL_SEQUENCES,
    )


def sgd_config(
    task: SparseContextualBigramTask,
    lr: float,
    *,
    steps: int,
    batch_size: int,
    eval_every: int,
    attention_lr: float | None = None,
) -> TrainConfig:
    """The SGD baseline (lambda = 0, no constraints, constant lr): the trainer's built-in
    ``sgd``, or ``iclgym.harness.optimizers:sgd`` with its own ``attention_lr``."""
    if attention_lr is None:
        return grid_config(task, "sgd", (), lr, steps, batch_size, eval_every)
    args = (f"attention_lr={attention_lr!r}",)
    optimizer = "iclgym.harness.optimizers:sgd"
    return grid_config(task, optimizer, args, lr, steps, batch_size, eval_every)


def run(
    task: SparseContextualBigramTask,
    model: LinearTransformer,
    config: TrainConfig,
    name: str = "run",
) -> list[dict]:
    """Train ``model`` on ``task`` with the one trainer (:func:`iclgym.harness.train`; the
    squared loss of the model's probability output) and return its evaluation records (step 0,
    every ``config.eval_every`` steps and the last): the trainer's ``eval`` records of
    ``metrics.jsonl`` with ``task.model_metrics(model)`` in them and ``samples`` = the
    training sequences seen. The run folder is ``RUNS/NNN-name`` with ``--runs``, else a
    temporary folder."""
    _COUNTER[0] += 1
    folder = f"{_COUNTER[0]:03d}-{re.sub(r'[^A-Za-z0-9.=-]+', '_', name)}"
    with tempfile.TemporaryDirectory() as tmp:
        out = (RUNS or Path(tmp)) / folder
        options = RunOptions(out=str(out), progress=False, plot=RUNS is not None)
        train(model, task, config, options, env_id=ENV_ID)
        lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [{**r, "samples": r["sequences"]} for r in records if r["type"] == "eval"]


def first_below(records: Sequence[dict], level: float, key: str = "excess_mse_rel") -> dict | None:
    """The first record whose ``key`` is below ``level`` (None: never)."""
    return next((r for r in records if r[key] < level), None)


def at_step(records: Sequence[dict], step: int) -> dict:
    """The record of ``step`` (it must have been logged)."""
    return next(r for r in records if r["step"] == step)


def spec_for(task_seed: int, seq_len: int = 128) -> SparseContextualBigramSpec:
    return SparseContextualBigramSpec(
        vocab_size=8, seq_len=seq_len, n_support=2, task_seed=task_seed
    )


# --------------------------------------------------------------------------------- parts
def recipe_config(task_seed: int) -> TrainConfig:
    """The ``ren2024`` recipe's config for ``task_seed`` (its data seed 100 + task seed)."""
    return replace(RECIPE.train, seed=DATA_SEED_OFFSET + task_seed)


def part_a(task_seed: int, sgd_lrs: Sequence[float] = (0.1, 0.3, 1.0)) -> dict:
    """A: scb_ppg (the ``ren2024`` recipe: eta 0.3, lambda 0.01, no decay) vs SGD over
    ``sgd_lrs`` on the same batches, T=128, B=256, 1500 steps; records every 100 steps."""
    task = SparseContextualBigramTask(**{**RECIPE.spec, "task_seed": task_seed})
    config = recipe_config(task_seed)
    out = {"ppg": run(task, linear_model(task), config, f"A{task_seed}-ppg")}
    for lr in sgd_lrs:
        sgd = replace(config, optimizer="sgd", optimizer_args=(), lr=lr)
        out[f"sgd lr {lr:g}"] = run(task, linear_model(task), sgd, f"A{task_seed}-sgd-lr{lr:g}")
    return out


_PRETRAINED: dict = {}


def pretrain(task: SparseContextualBigramTask, steps: int = 600) -> tuple[list[dict], torch.Tensor]:
    """scb_ppg on ``task`` at B=512 (eta 0.1, lambda 0.005) for ``steps`` steps (B: the
    upstream run of finetuning): its records and the trained V (cached per spec)."""
    key = (task.spec, steps)
    if key not in _PRETRAINED:
        model = linear_model(task)
        config = ppg_config(task, 0.1, 0.005, steps=steps, batch_size=512, eval_every=100)
        records = run(task, model, config, f"pretrain-seed{task.spec.task_seed}")
        _PRETRAINED[key] = (records, model.value.detach().clone())
    return _PRETRAINED[key]


def pretrained_value(task: SparseContextualBigramTask, steps: int = 600) -> torch.Tensor:
    """V after :func:`pretrain`."""
    return pretrain(task, steps)[1]


def finetune(
    task: SparseContextualBigramTask,
    value: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    eval_every: int = 25,
) -> list[dict]:
    """scb_ppg on ``task`` from V = ``value`` and A reset to uniform: B=64, eta 0.1, lambda
    0.005, tau 1000 (B)."""
    model = linear_model(task)
    with torch.no_grad():
        model.value.copy_(value)
    config = ppg_config(
        task, 0.1, 0.005, steps=steps, batch_size=batch_size, eval_every=eval_every, tau=1000.0
    )
    return run(task, model, config, f"finetune-seed{task.spec.task_seed}-B{batch_size}")


def part_b(task_seed: int, rho: float = 1 / math.sqrt(2), seq_len: int = 512) -> dict:
    """B: downstream P~ with corr rho to P, fresh attn, T=512: scratch at B=64 (3000 steps) and
    B=512 (600 steps: the reference escape is at 300-400), finetune from the pretrained V (3000
    steps), SGD at B=64 (3000 steps)."""
    pair = make_transfer_pair(spec_for(task_seed, seq_len), rho)
    down = pair.downstream
    out: dict = {"rho": pair.rho, "mix": pair.mix}
    small = ppg_config(down, 0.1, 0.005, steps=3000, batch_size=64, eval_every=25, tau=1000.0)
    out["scratch B=64"] = run(down, linear_model(down), small, f"B{task_seed}-scratch-B64")
    large = ppg_config(down, 0.1, 0.005, steps=600, batch_size=512, eval_every=25)
    out["scratch B=512"] = run(down, linear_model(down), large, f"B{task_seed}-scratch-B512")
    out["finetune B=64"] = finetune(down, pretrained_value(pair.upstream), steps=3000)
    sgd = sgd_config(down, 0.1, steps=3000, batch_size=64, eval_every=25)
    out["sgd B=64 lr 0.1"] = run(down, linear_model(down), sgd, f"B{task_seed}-sgd-B64")
    return out


def negative_control(
    task_seed: int, rho: float = -0.12, batch_size: int = 64, steps: int = 3000
) -> dict:
    """The control: finetuning at T=128 on a downstream P~ with corr ``rho`` (negative: never
    escapes; reference: rho about -0.11 to -0.13 stays at excess/initial about 1.0, +0.11 escapes in
    about 500 steps)."""
    pair = make_transfer_pair(spec_for(task_seed), rho)
    records = finetune(
        pair.downstream,
        pretrained_value(pair.upstream),
        steps=steps,
        batch_size=batch_size,
        eval_every=50,
    )
    return {"rho": pair.rho, "records": records}


def bayes_check(task_seed: int, samples: int = 200_000) -> dict:
    """C: the Bayes MSE and the excess of a random linear model, closed form vs Monte Carlo
    (mean and standard error over ``samples`` fresh examples of the validation stream)."""
    task = SparseContextualBigramTask(spec_for(task_seed))
    batch = task.sample(samples, generator=task.generator(task_seed, "validation"))
    p = task.bayes_probs(batch.tokens)
    onehot = torch.nn.functional.one_hot(batch.targets[:, -1], task.vocab_size).double()
    mse = ((onehot - p) ** 2).sum(-1)
    rng = np.random.default_rng(task_seed)
    v = rng.dirichlet(np.ones(task.vocab_size), size=task.vocab_size).T
    a = rng.dirichlet(np.ones(task.context_len), size=task.vocab_size).T
    model = linear_model(task)
    with torch.no_grad():
        model.value.copy_(torch.from_numpy(v))
        model.attention.copy_(torch.from_numpy(a))
        f = model.double().query_output(batch.tokens)
    gap = ((p - f) ** 2).sum(-1)
    return {
        "bayes_mse_closed": task.bayes_mse,
        "bayes_mse_mc": mse.mean().item(),
        "bayes_mse_se": mse.std().item() / math.sqrt(samples),
        "excess_closed": task.population_excess_mse(v, a),
        "excess_mc": gap.mean().item(),
        "excess_se": gap.std().item() / math.sqrt(samples),
        "initial_excess": task.initial_excess,
    }


def part_c(task_seed: int, sample_sizes: Sequence[int] = (20_000, 100_000)) -> dict:
    """C: :func:`bayes_check` and the oracle ladder (60 EM iterations) at ``sample_sizes``."""
    task = SparseContextualBigramTask(spec_for(task_seed))
    ladder = {
        n: [
            {"rung": r.rung, "method": r.method, **r.metrics}
            for r in oracle_ladder(task, n, seed=DATA_SEED_OFFSET + task_seed)
        ]
        for n in sample_sizes
    }
    return {"bayes": bayes_check(task_seed), "ladder": ladder}


def part_d(task_seed: int, steps: int = 3000) -> list[dict]:
    """D: the softmax variant, SGD with lr_V 0.3 and lr_W 30, B=256."""
    task = SparseContextualBigramTask(spec_for(task_seed))
    config = sgd_config(task, 0.3, steps=steps, batch_size=256, eval_every=100, attention_lr=30.0)
    return run(task, linear_model(task, softmax=True), config, f"D{task_seed}-softmax")


# ------------------------------------------------------------------------------- report
def plot_curves(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """excess/initial, dist_P and dist_Q against training samples, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, records in runs.items():
        x = [max(r["samples"], 1) for r in records]
        for ax, key in zip(axes, ("excess_mse_rel", "dist_P", "dist_Q"), strict=True):
            ax.plot(x, [r[key] for r in records], label=name)
    for ax, key in zip(axes, ("excess / initial", "dist_P", "dist_Q"), strict=True):
        ax.set(xlabel="training samples", ylabel=key, yscale="log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rounded(obj: object) -> object:
    """``obj`` with every float rounded to 4 significant digits (JSON keys as strings)."""
    if isinstance(obj, dict):
        return {str(k): rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    return obj


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 1e-2 else f"{x:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["A", "B", "control", "C", "D"])
    parser.add_argument("--out", default="docs/results/sparse-contextual-bigram")
    parser.add_argument("--json", default="", help="also write every record to this file")
    parser.add_argument("--runs", default="", help="keep every trainer run folder under DIR")
    args = parser.parse_args()
    global RUNS
    RUNS = Path(args.runs) if args.runs else None
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    lines: list[str] = []
    start = time.perf_counter()
    if "A" in args.parts:
        lines += [
            "## A: scb_ppg vs SGD (T=128, B=256, 1500 steps)",
            "",
            "| task seed | run | excess | excess/initial at 300 / 600 / 900 / 1200 | dist_P "
            "| dist_Q |",
            "|---|---|---|---|---|---|",
        ]
        for s in (0, 1, 2):
            res = results.setdefault("A", {})[s] = part_a(s)
            for name, recs in res.items():
                last = recs[-1]
                rel = " / ".join(
                    _fmt(at_step(recs, k)["excess_mse_rel"]) for k in (300, 600, 900, 1200)
                )
                lines.append(
                    f"| {s} | {name} | {_fmt(last['excess_mse'])} | {rel} | "
                    f"{_fmt(last['dist_P'])} | {_fmt(last['dist_Q'])} |"
                )
            plot_curves(res, out / f"curves-A-seed{s}.png", f"A: task seed {s}, T=128, B=256")
        lines.append("")
    if "B" in args.parts:
        lines += [
            "## B: two stages and transfer (T=512, rho target 0.707, fresh attn)",
            "",
            "| task seed | realised rho | run | steps (samples) to excess/initial < 0.1 | "
            "min excess/initial | final excess/initial | final dist_Q |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in (0, 1):
            res = results.setdefault("B", {})[s] = part_b(s)
            runs = {k: v for k, v in res.items() if isinstance(v, list)}
            for name, recs in runs.items():
                hit = first_below(recs, TRANSFER_LEVEL)
                when = "never" if hit is None else f"{hit['step']} ({hit['samples']})"
                lines.append(
                    f"| {s} | {res['rho']:.3f} | {name} | {when} | "
                    f"{_fmt(min(r['excess_mse_rel'] for r in recs))} | "
                    f"{_fmt(recs[-1]['excess_mse_rel'])} | {_fmt(recs[-1]['dist_Q'])} |"
                )
            plot_curves(runs, out / f"curves-B-seed{s}.png", f"B: task seed {s}, T=512")
        lines.append("")
    if "control" in args.parts:
        lines += [
            "## Negative control (T=128, finetune, 3000 steps)",
            "",
            "| task seed | B | target rho | realised rho | escape (< 0.5) | min excess/initial "
            "| final dist_Q |",
            "|---|---|---|---|---|---|---|",
        ]
        control_runs = {}
        for s in (0, 1, 2, 3):
            for b in (64, 128):
                for rho in (-0.12, 0.11, 0.3):
                    res = negative_control(s, rho=rho, batch_size=b)
                    results.setdefault("control", {})[f"{s} B={b} rho={rho}"] = res
                    recs = res["records"]
                    hit = first_below(recs, ESCAPE)
                    lines.append(
                        f"| {s} | {b} | {rho:+.2f} | {res['rho']:+.3f} | "
                        f"{'never' if hit is None else hit['step']} | "
                        f"{_fmt(min(r['excess_mse_rel'] for r in recs))} | "
                        f"{_fmt(recs[-1]['dist_Q'])} |"
                    )
                    if b == 64 and s == 0:
                        control_runs[f"rho {res['rho']:+.2f}"] = recs
        plot_curves(control_runs, out / "curves-control-seed0.png", "control: task seed 0, B=64")
        lines.append("")
    if "C" in args.parts:
        lines += ["## C: oracles", ""]
        for s in (0, 1, 2):
            res = results.setdefault("C", {})[s] = part_c(s)
            b = res["bayes"]
            lines.append(
                f"task seed {s}: Bayes MSE closed form {b['bayes_mse_closed']:.5f} vs Monte Carlo "
                f"{b['bayes_mse_mc']:.5f} +- {b['bayes_mse_se']:.5f}; random (V, A) excess closed "
                f"form {b['excess_closed']:.5f} vs {b['excess_mc']:.5f} +- {b['excess_se']:.5f}; "
                f"initial excess {b['initial_excess']:.4f}"
            )
        lines += [
            "",
            "| task seed | samples | rung | method | excess/initial | dist_P | dist_Q |",
            "|---|---|---|---|---|---|---|",
        ]
        for s, res in results["C"].items():
            for n, rungs in res["ladder"].items():
                for r in rungs:
                    lines.append(
                        f"| {s} | {n} | {r['rung']} | {r['method']} | "
                        f"{_fmt(r['excess_mse_rel'])} | {_fmt(r['dist_P'])} | "
                        f"{_fmt(r['dist_Q'])} |"
                    )
        lines.append("")
    if "D" in args.parts:
        lines += [
            "## D: softmax attention (SGD lr_V 0.3, lr_W 30, B=256)",
            "",
            "| task seed | first step with recall@Q = 1 "
            "| at 2000: excess/initial, dist_P, dist_Q | "
            "at 3000: recall, dist_P |",
            "|---|---|---|---|",
        ]
        runs = {}
        for s in (0, 1, 2):
            recs = results.setdefault("D", {})[s] = part_d(s)
            full = next((r["step"] for r in recs if r["support_recall"] == 1.0), None)
            r2, r3 = at_step(recs, 2000), recs[-1]
            lines.append(
                f"| {s} | {full} | {_fmt(r2['excess_mse_rel'])}, {_fmt(r2['dist_P'])}, "
                f"{_fmt(r2['dist_Q'])} | {r3['support_recall']:.2f}, {_fmt(r3['dist_P'])} |"
            )
            runs[f"softmax, task seed {s}"] = recs
        plot_curves(runs, out / "curves-D.png", "D: softmax attention, T=128, B=256")
        lines.append("")
    lines.append(
        f"Wall time {time.perf_counter() - start:.0f} s (torch {torch.__version__}, 1 thread)."
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rounded(results), separators=(",", ":")))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
