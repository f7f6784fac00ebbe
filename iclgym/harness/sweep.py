"""Sweep template-task training over a grid: model kind x embedding width x n x seed.

``iclgym sweep --set preset=aba_abb --models transformer transformer+kq mlp --widths 128
--ns 64 128 256 512 --seeds 0 1 2 --out runs/sweep`` trains every combination with the
protocol of :mod:`iclgym.harness.template_train` (n = train alphabet size = number of
training strings unless ``--n-train`` decouples them) and writes, into ``--out``:

- ``sweep.json``: one record per run (scores, steps, seconds), rewritten after every run, so
  ``--resume`` can pick up an interrupted sweep or add seeds to a finished one;
- ``sweep.txt``: the median test error over seeds per (model, width) and n (error = test
  MSE for regression, 1 - accuracy otherwise), with the accuracy next to it;
- ``sweep.png``: median test error against n (log2 axis), one line per (model, width), the
  seed range shaded: the paper's sample-complexity plot, and across widths its inverse
  scaling plot (against the width D when the sweep has one n and several widths).

Transformers have ``width // head_dim`` heads and an MLP of ``mlp_ratio * width``; the
``mlp`` baseline ignores the width axis (hidden width ``--mlp-width``) and runs once per n.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from iclgym.harness.template_train import TemplateTrainConfig, train_template_model

MODEL_KINDS = ("mlp", "transformer", "transformer+kq", "transformer+vo", "transformer+kq+vo")


def model_config(kind: str, width: int, args: argparse.Namespace, seed: int) -> TemplateTrainConfig:
    """The training config of one grid cell."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r} is invalid: expected one of {MODEL_KINDS}")
    base = TemplateTrainConfig(
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=seed,
        eval_sequences=args.eval_sequences,
        device=args.device,
    )
    if kind == "mlp":
        return replace(base, model="mlp", mlp_width=args.mlp_width, mlp_depth=args.mlp_depth)
    if width % args.head_dim:
        raise ValueError(f"width {width} is not a multiple of --head-dim {args.head_dim}")
    return replace(
        base,
        d_model=width,
        n_heads=width // args.head_dim,
        n_layers=args.n_layers,
        mlp_width=args.mlp_ratio * width,
        kq_identity="+kq" in kind,
        vo_identity="+vo" in kind,
        kq_identity_mult=args.kq_mult,
        vo_identity_mult=args.vo_mult,
    )


def summarise(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[int, dict]]:
    """(model, width) -> n -> median/min/max test error and median accuracy over seeds."""
    cells: dict[tuple[str, int], dict[int, list[dict]]] = {}
    for r in records:
        cells.setdefault((r["model"], r["width"]), {}).setdefault(r["n"], []).append(r)
    out: dict[tuple[str, int], dict[int, dict]] = {}
    for key, by_n in cells.items():
        out[key] = {}
        for n, runs in sorted(by_n.items()):
            errors = [r["error"] for r in runs]
            out[key][n] = {
                "median": statistics.median(errors),
                "min": min(errors),
                "max": max(errors),
                "accuracy": statistics.median(r["test_accuracy"] for r in runs),
                "seeds": len(runs),
            }
    return out


def format_table(records: list[dict[str, Any]], metric: str) -> str:
    """Median test error (median accuracy) over seeds: one row per (model, width)."""
    summary = summarise(records)
    ns = sorted({r["n"] for r in records})
    head = f"{'model':20s} {'width':>6s} " + " ".join(f"{'n=' + str(n):>14s}" for n in ns)
    lines = [f"median test {metric} (median test accuracy) over seeds", head, "-" * len(head)]
    for (model, width), by_n in sorted(summary.items()):
        cells = [
            f"{by_n[n]['median']:6.3f} ({by_n[n]['accuracy']:.2f})" if n in by_n else f"{'-':>14s}"
            for n in ns
        ]
        lines.append(f"{model:20s} {width:6d} " + " ".join(f"{c:>14s}" for c in cells))
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, metric: str, title: str) -> Path:
    """Median test error against n, one line per (model, width), the seed range shaded; when
    the sweep has a single n and several widths, against the width D instead, one line per
    model (the inverse-scaling view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(records)
    ns = sorted({r["n"] for r in records})
    widths = {width for model, width in summary if model != "mlp"}
    by_width = len(ns) == 1 and len(widths) > 1
    curves: dict[str, dict[int, dict]] = {}
    for (model, width), by_n in sorted(summary.items()):
        if by_width:
            curves.setdefault(model, {})[width] = by_n[ns[0]]
        else:
            curves[model if model == "mlp" else f"{model}, D={width}"] = by_n
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, cells in curves.items():
        xs = sorted(cells)
        (line,) = ax.plot(xs, [cells[x]["median"] for x in xs], marker="o", label=label)
        lows, highs = [cells[x]["min"] for x in xs], [cells[x]["max"] for x in xs]
        ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    if by_width:
        ax.set_xlabel(f"embedding width D (n = {ns[0]} training symbols = training strings)")
    else:
        ax.set_xlabel("n (training symbols = training strings)")
    ax.set_ylabel(f"test {metric} on unseen symbols")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from iclgym.registry import make_task, parse_overrides

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.overrides)
    records: list[dict[str, Any]] = []
    if args.resume and (out / "sweep.json").exists():
        records = json.loads((out / "sweep.json").read_text())
    done = {(r["model"], r["width"], r["n"], r["config"]["seed"]) for r in records}
    metric = None
    grid = [
        (kind, width, n, seed)
        for kind in args.models
        for width in (args.widths[:1] if kind == "mlp" else args.widths)
        for n in args.ns
        for seed in args.seeds
    ]
    for i, (kind, width, n, seed) in enumerate(grid):
        cell_width = args.mlp_width if kind == "mlp" else width
        if (kind, cell_width, n, seed) in done:
            print(f"[{i + 1}/{len(grid)}] {kind} D={width} n={n} seed={seed}: in sweep.json")
            continue
        task = make_task(
            args.env,
            **{
                **overrides,
                "train_alphabet_size": n,
                "n_train": args.n_train,
                "train_set_seed": seed,
            },
        )
        metric = "MSE" if task.spec.label_type == "regression" else "error"
        config = model_config(kind, width, args, seed)
        result = train_template_model(task, config)
        result.pop("model_object")
        result["width"] = cell_width
        records.append(result)
        acc = result["test_accuracy"]
        print(
            f"[{i + 1}/{len(grid)}] {kind:18s} D={width:<5d} n={n:<6d} seed={seed}: "
            f"test {metric} {result['error']:.3f} acc {acc:.3f} "
            f"(train {result.get('train_mse', result.get('train_loss')):.3f}) "
            f"{result['wall_s']:.0f} s",
            flush=True,
        )
        (out / "sweep.json").write_text(json.dumps(records, indent=1))
    metric = metric or ("MSE" if records and "test_mse" in records[0] else "error")
    table = format_table(records, metric)
    (out / "sweep.txt").write_text(table + "\n")
    mults = "".join(
        f", {name}={value:g}"
        for name, value in (("c_KQ", args.kq_mult), ("c_VO", args.vo_mult))
        if value != 1.0
    )
    title = f"{args.env} {' '.join(args.overrides)}, {args.epochs} epochs{mults}"
    plot(records, out / "sweep.png", metric, title)
    print(table)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.txt'}, {out / 'sweep.png'}")
    return records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iclgym sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="ICL-SymbolTemplate-v0", help="a template env id")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--models", nargs="+", default=["mlp", "transformer", "transformer+kq"], choices=MODEL_KINDS
    )
    p.add_argument("--widths", nargs="+", type=int, default=[128], help="embedding widths D")
    p.add_argument(
        "--ns", nargs="+", type=int, default=[64, 128, 256, 512], help="train alphabet sizes n"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=None, help="training strings (default n)")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--mlp-ratio", type=int, default=2, help="transformer MLP width / D")
    p.add_argument("--kq-mult", type=float, default=1.0, help="c_KQ, factor of the a_h term")
    p.add_argument("--vo-mult", type=float, default=1.0, help="c_VO, factor of the b_h term")
    p.add_argument("--mlp-width", type=int, default=256, help="hidden width of the mlp model")
    p.add_argument("--mlp-depth", type=int, default=2)
    p.add_argument("--eval-sequences", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="torch device of the runs (cpu, cuda)")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in OUT/sweep.json and train only the missing grid cells "
        "(cells are matched on model, width, n and seed: keep the other flags unchanged)",
    )
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    start = time.perf_counter()
    records = run(build_parser().parse_args(argv))
    print(f"sweep took {time.perf_counter() - start:.0f} s")
    return records


if __name__ == "__main__":
    main()
