"""Token-priority-graph reproductions (Li, Huang, Ildiz, Rawat, Oymak 2024, *Mechanics of Next
Token Prediction with Self-Attention*; ``docs/results/priority-graph.md``) through the
one trainer, :func:`iclgym.harness.train`.

Parts (each trial redraws the dataset and its embeddings: ``instance_seed`` = trial, and the
model's init seed and ``embedding_seed`` = trial, so the model's fixed E is the dataset's):

- ``cyclic``: n 6, T 4, K 6, d 8, random unit embeddings, cyclic TPG, 10 trials: the ``li2024``
  recipe (the ``iden`` head, log-loss, normalised GD lr 0.01, full batch, 4000 iterations,
  float64). Targets: each corr(W, W^svm) >= 0.97 and mean >= 0.98, top-SCC mass >= 0.995, norm
  diff <= 0.02, training loss within 1e-3 of the reduced optimum.
- ``acyclic``: n 4, T 6, K 8, acyclic TPG (the reference shows 2 runs): corr >= 0.985 and
  1 - label attention <= 1e-3.
- ``larger``: n 10, T 6, K 8, cyclic, 5 trials: mean corr >= 0.95.
- ``local``, ``local-n6`` (optional rows, not in the default parts): the ``gen`` head with the
  paper's ``lsq2`` loss (the trainer's ``--loss lsq2``, the reference's local runs;
  ``--local-loss cross_entropy`` for its ``ce``), lr 0.1, 2000 iterations, n 4 T 6 K 8 and n 6
  T 4 K 6, 5 trials: corr(W, local Graph-SVM) and corr(W, W^svm).
- ``planted``: ``ICL-PriorityGraph-v0`` planted mode (K 8, T 6, s_max 3, sigma_beta 1), the
  paper's model over orthonormal E (d 8), 2000 fixed training samples, full batch, normalised
  GD lr 0.05, 4000 iterations, float64; scored on 8192 test contexts against Oracle C:
  retrieval_mass >= 0.99, acc_oracle >= 0.95, excess_nll <= 0.05.

Per paper trial the script records the trainer's evaluations (the task's paper-mode model
metrics every ``--eval-every`` steps: corr_svm, corr_decomp, proj_corr, top_scc_mass,
fin_diff, nll) and, at the end, the theory's numbers from
:class:`iclgym.tasks.priority_graph_theory.PaperTheory`: the norm difference against the
separate reduced-data run W^fin(tau) (normalised GD from 0, same lr and steps), the reduced
optimum and ||W^fin||.

Run (one torch thread; about 5 s per paper trial and 15 s for the planted run on the
project's 2-core CPU)::

    python docs/scripts/priority_graph_trials.py                      # every part, the table
    python docs/scripts/priority_graph_trials.py --parts cyclic --plot docs/results/priority-graph

``tests/harness/test_priority_graph_repro.py`` runs the same functions (the CI share).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iclgym.harness import RECIPES, RunOptions, TrainConfig, build_model, train
from iclgym.registry import make_task
from iclgym.tasks.priority_graph_theory import PaperTheory

ENV_ID = "ICL-PriorityGraph-v0"
MODEL = "baselines.priority_attention:make_model"
RECIPE = RECIPES["li2024"]

PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "cyclic": {"n": 6, "context_len": 4, "num_tokens": 6, "cyclic": True, "trials": 10},
    "acyclic": {"n": 4, "context_len": 6, "num_tokens": 8, "cyclic": False, "trials": 2},
    "larger": {"n": 10, "context_len": 6, "num_tokens": 8, "cyclic": True, "trials": 5},
}
"""The paper-mode rows of the reproduction table (d 8, random unit embeddings; 4000 iterations,
lr 0.01)."""

LOCAL_SETTINGS: dict[str, dict[str, Any]] = {
    "local": {"n": 4, "context_len": 6, "num_tokens": 8, "cyclic": True, "trials": 5},
    "local-n6": {"n": 6, "context_len": 4, "num_tokens": 6, "cyclic": True, "trials": 5},
}
"""The optional local-convergence rows: the ``gen`` head trained with lsq2 (or the
paper's ``ce``), normalised GD lr 0.1, 2000 iterations."""

PLANTED = {"num_tokens": 8, "context_len": 6, "d": 8, "n_train": 2000, "lr": 0.05, "steps": 4000}
"""The planted row of the reproduction table."""


# ------------------------------------------------------------------ paper mode
def paper_task(setting: str, trial: int) -> tuple[Any, PaperTheory]:
    """The paper-mode task of ``setting`` with ``instance_seed = trial`` and its theory (the
    task's ``train_set()`` is the dataset in order; its ``model_metrics`` hook logs the theory's
    metrics at every evaluation)."""
    s = {**PAPER_SETTINGS, **LOCAL_SETTINGS}[setting]
    spec = {k: v for k, v in s.items() if k != "trials"}
    task = make_task(ENV_ID, mode="paper", d=8, embedding="random", instance_seed=trial, **spec)
    return task, task.paper_theory


def _model_args(task: Any, trial: int) -> dict[str, Any]:
    return {**RECIPE.model_args, "d": task.spec.d, "embedding_seed": trial}


def paper_config(n: int, eval_every: int = 0) -> TrainConfig:
    """The ``li2024`` recipe's training configuration with full batches of ``n``."""
    return replace(RECIPE.train, batch_size=n, eval_every=eval_every)


def paper_trial(setting: str, trial: int, eval_every: int = 0) -> dict[str, Any]:
    """Train the paper's model on trial ``trial`` of ``setting`` through :func:`train` and
    score it. Returns ``final`` (the theory's metrics of the last W, the norm difference against
    the reduced run included), ``reduced_optimum``, ``w_fin_norm``, ``s_fin_rank``,
    ``train_fit`` (the trainer's final training-set loss and accuracy), ``curve`` (the eval
    records: step and the model metrics) and ``seconds``."""
    start = time.perf_counter()
    task, theory = paper_task(setting, trial)
    config = paper_config(task.spec.n, eval_every)
    model = build_model(MODEL, task, seed=trial, **_model_args(task, trial))
    np.testing.assert_array_equal(model.embeddings.numpy(), theory.embeddings)
    with tempfile.TemporaryDirectory() as out:
        summary = train(model, task, config, RunOptions(out=out, progress=False, plot=False))
        records = [
            json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
        ]
    steps = config.epochs  # one full batch per epoch
    w = model.weight.detach().double().numpy()
    w_fin_tau, _ = theory.reduced_run(config.lr, steps)
    keys = ("corr_svm", "corr_decomp", "proj_corr", "top_scc_mass", "fin_diff", "nll")
    curve = [
        {"step": r["step"], **{k: r[k] for k in keys if k in r}}
        for r in records
        if r.get("type") == "eval"
    ]
    final = summary["final"]
    return {
        "setting": setting,
        "trial": trial,
        "final": theory.metrics(w, w_fin_tau),
        "reduced_optimum": theory.reduced_optimum,
        "w_fin_norm": float(np.linalg.norm(theory.w_fin)),
        "s_fin_rank": int(theory.basis.shape[0]),
        "train_fit": _fit(final),
        "curve": curve,
        "seconds": time.perf_counter() - start,
    }


def paper_part(setting: str, trials: int | None = None, eval_every: int = 0) -> list[dict]:
    """:func:`paper_trial` for trials 0 .. trials - 1 (default: the setting's count)."""
    count = PAPER_SETTINGS[setting]["trials"] if trials is None else trials
    return [paper_trial(setting, t, eval_every) for t in range(count)]


def local_trial(
    setting: str, trial: int, lr: float = 0.1, steps: int = 2000, loss: str = "lsq2"
) -> dict[str, Any]:
    """The local-convergence run (optional row of the reproduction table): the ``gen`` head with the
    trainer's ``loss`` (``lsq2`` = (1 - p_y)^2, or ``cross_entropy``, the paper's ``ce``),
    normalised GD ``lr``, ``steps`` full-batch iterations, float64; then corr(W, local W^svm)
    (:func:`~iclgym.tasks.priority_graph_theory.local_graph_svm` of the trained attention) and
    corr(W, W^svm)."""
    from iclgym.tasks.priority_graph_theory import corr, local_graph_svm, token_attention

    start = time.perf_counter()
    task, theory = paper_task(setting, trial)
    config = replace(paper_config(task.spec.n), lr=lr, epochs=steps, loss=loss)
    args = {**_model_args(task, trial), "head": "gen"}
    model = build_model(MODEL, task, seed=trial, **args)
    with tempfile.TemporaryDirectory() as out:
        train(model, task, config, RunOptions(out=out, progress=False, plot=False))
    w = model.weight.detach().double().numpy()
    att = token_attention(w, theory.contexts, theory.embeddings)
    local, _ = local_graph_svm(theory.contexts, att, theory.embeddings)
    return {
        "setting": setting,
        "trial": trial,
        "loss": loss,
        "local_corr": corr(w, local.w),
        "global_corr": corr(w, theory.w_svm),
        "selected": [int(v) for v in (att > 1e-2).sum(1)],
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------ planted mode
def planted_run(seed: int = 0, test_contexts: int = 8192) -> dict[str, Any]:
    """The planted row: the paper's model (orthonormal E, d 8) on 2000 fixed training samples of
    ``ICL-PriorityGraph-v0`` (planted defaults, instance seed 0), full batch, normalised GD lr
    0.05, 4000 steps, float64; scored on ``test_contexts`` test-split contexts (seed 0) with the
    task's :func:`planted_metrics` against Oracle C, and on the training set."""
    from iclgym.tasks.priority_graph import planted_metrics

    start = time.perf_counter()
    p = PLANTED
    task = make_task(ENV_ID, num_tokens=p["num_tokens"], context_len=p["context_len"])
    config = replace(
        RECIPE.train,
        epochs=p["steps"],
        train_sequences=p["n_train"],
        batch_size=p["n_train"],
        lr=p["lr"],
        seed=seed,
        eval_every=0,
        eval_sequences=1024,
        eval_batch_size=1024,
    )
    model = build_model(MODEL, task, seed=seed, d=p["d"], embedding="ortho", embedding_seed=seed)
    with tempfile.TemporaryDirectory() as out:
        summary = train(model, task, config, RunOptions(out=out, progress=False, plot=False))
    test = task.sample(test_contexts, generator=task.generator(0, "test"), device="cpu")
    with torch.no_grad():
        metrics = planted_metrics(model(test.tokens)[:, -1], test)
    final = summary["final"]
    return {
        "test": metrics,
        "train_fit": _fit(final),
        "seconds": time.perf_counter() - start,
    }


def _fit(final: dict[str, Any]) -> dict[str, float]:
    """The trainer's last evaluation on the training set: loss (the model's cross-entropy, the
    paper's log-loss up to log(1 + K eps)), excess over the task's oracle, accuracy."""
    return {
        "loss": final["train_loss"],
        "excess": final["train_excess_loss"],
        "accuracy": final["train_accuracy"],
    }


# ------------------------------------------------------------------ report
def summarize(runs: list[dict]) -> dict[str, float]:
    """Means, minima and maxima over the trials of a paper part."""
    f = [r["final"] for r in runs]
    corr = np.array([m["corr_svm"] for m in f])
    gap = np.array([m["nll"] - r["reduced_optimum"] for m, r in zip(f, runs, strict=True)])
    return {
        "trials": len(runs),
        "corr_min": float(corr.min()),
        "corr_mean": float(corr.mean()),
        "corr_max": float(corr.max()),
        "corr_decomp_mean": float(np.mean([m["corr_decomp"] for m in f])),
        "proj_corr_mean": float(np.mean([m["proj_corr"] for m in f])),
        "top_scc_mass_mean": float(np.mean([m["top_scc_mass"] for m in f])),
        "top_scc_mass_min": float(min(m["top_scc_mass"] for m in f)),
        "label_attention_min": float(min(m["min_label_attention"] for m in f)),
        "oracle_b_tv_mean": float(np.mean([m["oracle_b_tv"] for m in f])),
        "oracle_b_tv_max": float(max(m["max_oracle_b_tv"] for m in f)),
        "norm_diff_min": float(min(m["norm_diff"] for m in f)),
        "norm_diff_max": float(max(m["norm_diff"] for m in f)),
        "loss_gap_max": float(gap.max()),
        "loss_gap_mean": float(gap.mean()),
        "norm_W_mean": float(np.mean([m["norm_W"] for m in f])),
        "R_mean": float(np.mean([m["R"] for m in f])),
        "R_raw_min": float(min(m["R_raw"] for m in f)),
        "R_raw_max": float(max(m["R_raw"] for m in f)),
        "w_fin_zero": int(sum(r["w_fin_norm"] < 1e-8 for r in runs)),
        "seconds_mean": float(np.mean([r["seconds"] for r in runs])),
    }


def plot_curves(runs: list[dict], path: Path, title: str) -> None:
    """1 - corr(W, W^svm), 1 - top-SCC attention mass, ||Pi_Sfin W - W^fin|| and the training
    loss above the reduced optimum against iterations, one line per trial (needs the runs'
    eval curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    any_fin = False
    for r in runs:
        steps = [c["step"] for c in r["curve"]]
        axes[0].plot(steps, [1 - c["corr_svm"] for c in r["curve"]], lw=1)
        axes[1].plot(steps, [max(1 - c["top_scc_mass"], 1e-12) for c in r["curve"]], lw=1)
        if r["s_fin_rank"]:
            any_fin = True
            axes[2].plot(steps, [c["fin_diff"] for c in r["curve"]], lw=1)
        gap = [max(c["nll"] - r["reduced_optimum"], 1e-12) for c in r["curve"]]
        axes[3].plot(steps, gap, lw=1)
    if not any_fin:
        axes[2].text(0.5, 0.5, "S_fin = {0}: W^fin = 0", ha="center", transform=axes[2].transAxes)
    labels = (
        "1 - corr(W, W^svm)",
        "1 - top-SCC attention mass",
        "||Pi_Sfin W - W^fin||_F",
        "training loss - reduced optimum",
    )
    for ax, label in zip(axes, labels, strict=True):
        if ax.lines:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["cyclic", "acyclic", "larger", "planted"])
    parser.add_argument("--trials", type=int, default=None, help="override the trial counts")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument(
        "--local-loss", default="lsq2", choices=("lsq2", "cross_entropy"), help="local rows"
    )
    parser.add_argument("--plot", type=Path, default=None, help="folder for the curve PNGs")
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    everything: dict[str, Any] = {}
    for part in args.parts:
        if part in LOCAL_SETTINGS:
            count = LOCAL_SETTINGS[part]["trials"] if args.trials is None else args.trials
            local = [local_trial(part, t, loss=args.local_loss) for t in range(count)]
            everything[part] = local
            for r in local:
                print(
                    f"{part} trial {r['trial']}: local corr {r['local_corr']:.4f} global corr "
                    f"{r['global_corr']:.4f} selected {r['selected']} ({r['seconds']:.1f} s)",
                    flush=True,
                )
            continue
        if part == "planted":
            res = planted_run()
            everything[part] = res
            print(f"planted: {json.dumps(res['test'])} fit {res['train_fit']}", flush=True)
            print(f"  {res['seconds']:.1f} s", flush=True)
            continue
        runs = paper_part(part, args.trials, args.eval_every)
        everything[part] = runs
        for r in runs:
            m = r["final"]
            print(
                f"{part} trial {r['trial']}: corr {m['corr_svm']:.4f} decomp "
                f"{m['corr_decomp']:.4f} proj {m['proj_corr']:.4f} top {m['top_scc_mass']:.5f} "
                f"label {m['min_label_attention']:.6f} norm_diff {m['norm_diff']:.4f} nll "
                f"{m['nll']:.4f} opt {r['reduced_optimum']:.4f} |W| {m['norm_W']:.2f} R "
                f"{m['R']:.2f} (raw {m['R_raw']:.2f}) |W_fin| {r['w_fin_norm']:.3f} rank "
                f"{r['s_fin_rank']} ({r['seconds']:.1f} s)",
                flush=True,
            )
        print(f"{part} summary: {json.dumps(summarize(runs))}", flush=True)
        if args.plot is not None and args.eval_every:
            plot_curves(runs, args.plot / f"{part}.png", _title(part))
    if args.json is not None:
        args.json.write_text(json.dumps(everything, indent=1, default=_json_default))


def _title(part: str) -> str:
    s = PAPER_SETTINGS[part]
    kind = "cyclic" if s["cyclic"] else "acyclic"
    return (
        f"{kind} TPG, n={s['n']} T={s['context_len']} K={s['num_tokens']} d=8: normalised GD lr "
        f"0.01, float64, {s['trials']} trials (iclgym.harness.train, recipe li2024)"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    main()
