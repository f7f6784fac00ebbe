"""A thin grid over the one trainer: model x width x n x seed, for any task.

Every cell builds its model (:func:`~iclgym.harness.model.build_model`, init from the cell's
seed) and trains it with :func:`~iclgym.harness.train.train` into ``OUT/runs/CELL``. ``width``
sets each model's width argument (``d_model`` of the transformer, ``width`` of the MLP,
``hidden_size`` of the LSTM); ``n`` sets a spec key (``n_key``, by default the templates'
``train_alphabet_size``: n symbols, and n training strings by the task's own ``n_train``
default) or a ``TrainConfig`` field (e.g. ``train_sequences``); where the spec has a
``train_set_seed`` (a fixed training set), it follows the cell's seed, so seed s changes the
init, the batch order and the training set. Into ``out`` it writes:

- ``sweep.json``: one record per cell (the cell, its error, the final evaluation record, steps,
  seconds), rewritten after every cell, so ``resume`` can pick up an interrupted sweep or add
  seeds to a finished one (an interrupted cell continues from its checkpoint);
- ``sweep.txt``: the median error over seeds per (model, width) and n, with the median accuracy;
- ``sweep.png``: median error against n (log2 axis), one line per (model, width), the seed
  range shaded; against the width when the sweep has one n and several widths (the inverse
  scaling view of Boix-Adserà et al. 2024's copy task: T5 of ``docs/results/symbol-templates.md``).

The error of a cell is the test MSE for a value model, else 1 - test accuracy when the test
split is scored (``eval_splits`` includes ``test``), else the excess loss on the primary split.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from iclgym.harness.backends import Backend, run_trials
from iclgym.harness.model import build_model
from iclgym.harness.train import CHECKPOINT, RunOptions, TrainConfig, train


@dataclass(frozen=True)
class ModelChoice:
    """One model axis entry: its name, factory import path, arguments and width argument."""

    name: str
    factory: str
    args: Mapping[str, Any]
    width_arg: str | None


def cell_error(summary: Mapping[str, Any]) -> tuple[float, str]:
    """``(error, metric name)`` of a finished run (see the module docstring)."""
    final = summary["final"]
    if summary["model_output"] == "values":
        key = "test_mse" if "test_mse" in final else "mse"
        return final[key], "test MSE" if key == "test_mse" else "validation MSE"
    if final.get("test_accuracy") is not None:
        return 1.0 - final["test_accuracy"], "test error"
    return final["excess_loss"], "excess loss"


def summarise(records: list[dict[str, Any]]) -> dict[tuple[str, Any], dict[Any, dict]]:
    """(model, width) -> n -> median/min/max error and median accuracy over seeds."""
    cells: dict[tuple[str, Any], dict[Any, list[dict]]] = {}
    for r in records:
        cells.setdefault((r["model"], r["width"]), {}).setdefault(r["n"], []).append(r)
    out: dict[tuple[str, Any], dict[Any, dict]] = {}
    for key, by_n in cells.items():
        out[key] = {}
        for n, runs in sorted(by_n.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            errors = [r["error"] for r in runs]
            out[key][n] = {
                "median": statistics.median(errors),
                "min": min(errors),
                "max": max(errors),
                "accuracy": statistics.median(r["accuracy"] for r in runs),
                "seeds": len(runs),
            }
    return out


def _sort_key(value: Any) -> tuple:
    return (value is None, value if value is not None else 0)


def _by_cell(summary: dict) -> list:
    return sorted(summary.items(), key=lambda kv: (kv[0][0], _sort_key(kv[0][1])))


def format_table(records: list[dict[str, Any]], metric: str) -> str:
    """Median error (median accuracy) over seeds: one row per (model, width), one column per n."""
    summary = summarise(records)
    ns = sorted({r["n"] for r in records}, key=_sort_key)
    head = f"{'model':20s} {'width':>6s} " + " ".join(f"{'n=' + str(n):>14s}" for n in ns)
    lines = [f"median {metric} (median accuracy) over seeds", head, "-" * len(head)]
    for (model, width), by_n in _by_cell(summary):
        cells = [
            f"{by_n[n]['median']:6.3f} ({by_n[n]['accuracy']:.2f})" if n in by_n else f"{'-':>14s}"
            for n in ns
        ]
        shown = "-" if width is None else str(width)
        lines.append(f"{model:20s} {shown:>6s} " + " ".join(f"{c:>14s}" for c in cells))
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, metric: str, title: str) -> Path:
    """Median error against n (log2 axis), one line per (model, width), the seed range shaded;
    against the width when the sweep has a single n and several widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(records)
    ns = sorted({r["n"] for r in records}, key=_sort_key)
    widths = {w for _, w in summary if w is not None}
    by_width = len(ns) == 1 and len(widths) > 1
    curves: dict[str, dict[Any, dict]] = {}
    for (model, width), by_n in _by_cell(summary):
        if by_width and width is not None:
            curves.setdefault(model, {})[width] = by_n[ns[0]]
        else:
            label = model if width is None else f"{model}, width {width}"
            curves[label] = {(n if n is not None else 1): cell for n, cell in by_n.items()}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, cells in curves.items():
        xs = sorted(cells)
        (line,) = ax.plot(xs, [cells[x]["median"] for x in xs], marker="o", label=label)
        lows, highs = [cells[x]["min"] for x in xs], [cells[x]["max"] for x in xs]
        ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"width (n = {ns[0]})" if by_width else "n")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell_name(model: str, width: Any, n: Any, seed: int) -> str:
    name = f"{model}-w{width}-n{n}-seed{seed}"
    return re.sub(r"[^\w+.=-]", "_", name)


def train_cell(
    env_id: str,
    choice: ModelChoice,
    width: Any,
    n: Any,
    seed: int,
    spec: Mapping[str, Any],
    config: TrainConfig,
    n_key: str,
    out: Path,
    resume: bool,
    keep_checkpoints: bool,
    progress: bool,
) -> dict[str, Any]:
    """Train one cell into ``out/runs/CELL`` and return its record (one trial of a sweep,
    run in this process or as a Ray task: :mod:`iclgym.harness.backends`)."""
    from iclgym.registry import make_task

    config_fields = {f.name for f in fields(TrainConfig)}
    cell_spec, cell_config = dict(spec), replace(config, seed=seed)
    if n is not None:
        if n_key in config_fields:
            cell_config = replace(cell_config, **{n_key: n})
        else:
            cell_spec[n_key] = n
    task = make_task(env_id, **cell_spec)
    if "train_set_seed" in task.spec.to_dict():
        task = make_task(env_id, **{**cell_spec, "train_set_seed": seed})
    args = dict(choice.args)
    if width is not None:
        args[choice.width_arg] = width
    model = build_model(choice.factory, task, seed=seed, **args)
    folder = out / "runs" / _cell_name(choice.name, width, n, seed)
    again = resume and (folder / CHECKPOINT).exists()
    if not again and folder.exists():
        shutil.rmtree(folder)
    run = RunOptions(out=str(folder), resume=again, progress=progress, plot=False)
    summary = train(model, task, cell_config, run, env_id=env_id)
    if not keep_checkpoints:
        (folder / CHECKPOINT).unlink(missing_ok=True)
    error, metric = cell_error(summary)
    final = summary["final"]
    record = {
        "model": choice.name,
        "width": width,
        "n": n,
        "seed": seed,
        "error": error,
        "metric": metric,
        "accuracy": final.get("test_accuracy", final.get("accuracy")),
        "factory": choice.factory,
        "model_args": args,
        "task": task.spec.to_dict(),
        "config": asdict(cell_config),
        "steps": summary["step"],
        "num_parameters": summary["num_parameters"],
        "untrained_rows": summary["untrained_rows"],
        "final": final,
        "wall_s": summary["wall_s"],
        "out": str(folder),
    }
    return json.loads(json.dumps(record, default=str))


def run_sweep(
    env_id: str,
    *,
    models: Sequence[ModelChoice],
    widths: Sequence[int] = (),
    ns: Sequence[int] = (),
    n_key: str = "train_alphabet_size",
    seeds: Sequence[int] = (0,),
    spec: Mapping[str, Any] | None = None,
    config: TrainConfig | None = None,
    out: str | Path = "runs/sweep",
    resume: bool = False,
    keep_checkpoints: bool = False,
    progress: bool = False,
    backend: Backend | None = None,
) -> list[dict[str, Any]]:
    """Train every cell of the grid (see the module docstring) on ``backend`` (default: in
    this process, one after another; :mod:`iclgym.harness.backends`) and return the records
    in grid order, whatever order the cells finished in.

    Raises ``ValueError`` before training for an empty axis or an unknown env id or spec
    key (from the first cell's task); :class:`~iclgym.harness.backends.TrialsFailed` after the
    other cells are recorded when some cells raised."""
    from iclgym.registry import make_task

    start = time.perf_counter()
    config, spec = config or TrainConfig(), dict(spec or {})
    if not models or not seeds:
        raise ValueError("a sweep needs at least one model and one seed")
    make_task(env_id, **spec)  # a bad id or spec fails here, before any trial starts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    if resume and (out / "sweep.json").exists():
        records = json.loads((out / "sweep.json").read_text())
    grid = [
        (choice, width, n, seed)
        for choice in models
        for width in ((widths or [None]) if choice.width_arg else [None])
        for n in (ns or [None])
        for seed in seeds
    ]
    order = {(c.name, w, n, s): i for i, (c, w, n, s) in enumerate(grid)}
    done = {(r["model"], r["width"], r["n"], r["seed"]) for r in records}
    todo = [cell for cell in grid if (cell[0].name, *cell[1:]) not in done]
    if len(todo) < len(grid):
        print(f"{len(grid) - len(todo)} of {len(grid)} cells already in sweep.json")

    def key(r: dict[str, Any]) -> int:
        return order.get((r["model"], r["width"], r["n"], r["seed"]), len(order))

    def record(i: int, result: dict[str, Any]) -> None:
        choice, width, n, seed = todo[i]
        records.append(result)
        records.sort(key=key)
        print(
            f"[{key(result) + 1}/{len(grid)}] {choice.name} width={width} n={n} seed={seed}: "
            f"{result['metric']} {result['error']:.3f}, accuracy {result['accuracy']:.3f}, "
            f"{result['steps']} steps in {result['wall_s']:.0f} s",
            flush=True,
        )
        (out / "sweep.json").write_text(json.dumps(records, indent=1))

    trials = [
        (env_id, c, w, n, s, spec, config, n_key, out, resume, keep_checkpoints, progress)
        for c, w, n, s in todo
    ]
    bar = sys.stderr.isatty() and not progress  # one bar for the sweep, or one per run
    run_trials(train_cell, trials, record, backend, desc="sweep", progress=bar)
    metric = records[0]["metric"] if records else "error"
    table = format_table(records, metric)
    (out / "sweep.txt").write_text(table + "\n")
    sets = " ".join(f"{k}={v}" for k, v in spec.items())
    length = f"{config.epochs} epochs" if config.data == "finite" else f"{config.steps} steps"
    plot(records, out / "sweep.png", metric, f"{env_id} {sets}, {length}")
    print(table)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.txt'}, {out / 'sweep.png'}")
    print(f"sweep took {time.perf_counter() - start:.0f} s")
    return records
