"""The options of ``iclgym train`` and ``iclgym sweep``: dataclasses that ``tyro`` turns into
flags (``iclgym.cli`` parses them). They live here, beside the trainer, because they nest
:class:`~iclgym.harness.train.TrainConfig` (which imports torch): ``iclgym list`` never
imports this module. Field docstrings are the ``--help`` texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

from iclgym.harness.train import RunOptions, TrainConfig, format_seeds, parse_seeds

EnvId = tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="ENV_ID")]]
Repeated = tyro.conf.UseAppendAction[tuple[str, ...]]


@dataclass(frozen=True)
class TrainArgs:
    """Train a model on an env id with the one trainer and plot its phases."""

    env_id: EnvId = ""
    """Registered env id (default: the recipe's)."""
    recipe: str = ""
    """Named protocol that fills the defaults (edelman2024, boix2023, ...); flags override."""
    model: str = "transformer"
    """transformer | transformer+kq | transformer+vo | transformer+kq+vo | mlp | lstm, or an
    import path package.module:factory called as factory(vocab_size, seq_len, **args)."""
    model_arg: Repeated = ()
    """Model factory argument KEY=VALUE (a Python literal), repeatable."""
    set: Repeated = ()
    """Spec override KEY=VALUE, repeatable."""
    train: tyro.conf.OmitArgPrefixes[TrainConfig] = field(default_factory=TrainConfig)
    run: tyro.conf.OmitArgPrefixes[RunOptions] = field(default_factory=RunOptions)


@dataclass(frozen=True)
class SweepArgs:
    """Train every model x width x n x seed with the one trainer; write sweep.json, sweep.txt
    (median error per cell) and sweep.png into --out."""

    env_id: EnvId = ""
    """Registered env id (default: the recipe's)."""
    recipe: str = ""
    """Named protocol that fills the defaults; flags override."""
    models: tuple[str, ...] = ()
    """Model names or import paths (default: the recipe's model, else transformer)."""
    model_arg: Repeated = ()
    """Model argument KEY=VALUE for every model of the grid, repeatable."""
    widths: tuple[int, ...] = ()
    """Values of each model's width argument (d_model, width, hidden_size); empty: none."""
    width_arg: str = ""
    """Model argument the width sets, for import-path models."""
    ns: tuple[int, ...] = ()
    """Values of --n-key (empty: no n axis)."""
    n_key: str = "train_alphabet_size"
    """Spec key (or TrainConfig field, e.g. train_sequences) that n sets."""
    seeds: tuple[int | str, ...] = (0,)
    """Training seeds (e.g. 0-15, 0,3,5 or 0 3 5); where the spec has train_set_seed, it
    follows the seed."""
    set: Repeated = ()
    """Spec override KEY=VALUE, repeatable."""
    out: str = "runs/sweep"
    """Sweep folder: sweep.json, sweep.txt, sweep.png and one run folder per cell."""
    resume: bool = False
    """Keep the cells already in OUT/sweep.json (matched on model, width, n and seed: keep the
    other flags unchanged) and train the missing ones."""
    keep_checkpoints: bool = False
    """Keep each run's checkpoint.pt (default: deleted once its cell is recorded)."""
    backend: Literal["local", "ray"] = "local"
    """Where cells run: one after another in this process, or as Ray tasks (iclgym[ray])."""
    address: str = ""
    """Ray cluster address (e.g. auto, ray://HOST:10001); empty: a local Ray for the run."""
    workers: int | None = None
    """CPUs of the local Ray started for the run (default: every core)."""
    train: tyro.conf.OmitArgPrefixes[TrainConfig] = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", parse_seeds(self.seeds))


MODEL_METRICS_SHOWN = 8
"""Model metrics (``task.model_metrics``) printed by ``iclgym train``; the rest are logged."""


def format_train_summary(summary: dict[str, Any], env_id: str, model: str) -> str:
    """The lines ``iclgym train`` prints for a run summary, one seed's or a multi-seed run's
    (:func:`iclgym.harness.multiseed.train_seeds`: one line per seed, then the mean)."""
    lines = [
        f"{env_id}: {summary['step']} steps in {summary['wall_s']:.1f} s, "
        f"{summary['num_parameters']} parameters ({model})"
    ]
    runs = summary.get("runs")
    if runs:
        lines[0] += f", seeds {format_seeds(tuple(summary['seeds']))} in one process"
        for seed, run in zip(summary["seeds"], runs, strict=True):
            lines.append(f"  seed {seed}: " + _final(run))
        lines.append("  mean over seeds: " + _scores(summary["final"]))
        if any(s is not None for s in summary["switch_steps"]):
            lines.append(f"  switch steps {summary['switch_steps']}")
    else:
        lines.append("  " + _final(summary))
    refs = summary.get("references") or {}
    if refs and summary["final"].get("kl_last") is not None:
        lines.append("  references " + ", ".join(f"{k} {v:.4f}" for k, v in refs.items()))
    names = [k for k in summary.get("model_metrics") or () if k in summary["final"]]
    if names:  # the task's model metrics at the end (mean over seeds for --seeds)
        shown = ", ".join(f"{k} {summary['final'][k]:.4g}" for k in names[:MODEL_METRICS_SHOWN])
        more = len(names) - MODEL_METRICS_SHOWN
        tail = f" (+{more} in metrics.jsonl)" if more > 0 else ""
        lines.append(f"  model metrics: {shown}{tail}")
    rows = summary.get("untrained_rows")
    if rows is not None and rows["rows"]:
        lines.append(f"  {rows['rows']} unseen-token embedding rows unchanged: {rows['unchanged']}")
    lines.append(f"  run folder {summary['out']}")
    return "\n".join(lines)


def _final(summary: dict[str, Any]) -> str:
    text = _scores(summary["final"])
    if summary.get("switch_step") is not None or summary.get("phases"):
        text += f"; switch step {summary['switch_step']}; phases " + ", ".join(
            f"{p['label']} {p['start_step']}-{p['end_step']}" for p in summary["phases"]
        )
    return text


def _scores(final: dict[str, Any]) -> str:
    keys = [k for k in ("kl_last", "loss", "mse", "accuracy") if final.get(k) is not None]
    for prefix in ("train", "val", "test"):
        keys += [
            f"{prefix}_{k}" for k in ("mse", "accuracy") if final.get(f"{prefix}_{k}") is not None
        ]
    text = ", ".join(f"{k} {final[k]:.4f}" for k in keys)
    if final.get("nearest") is not None:
        text += f", nearest strategy {final['nearest']}"
    return text
