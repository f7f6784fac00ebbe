"""The ``iclgym`` command: list, describe, eval, speed (and train, sweep: ``iclgym.harness``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from iclgym.registry import describe, get_entry, list_envs, make_task, parse_overrides


def _cmd_list(args: argparse.Namespace) -> int:
    for env_id in list_envs():
        print(f"{env_id:24s} {get_entry(env_id).summary}")
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    print(describe(args.env_id))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from iclgym.harness import evaluate, resolve_predictor
    from iclgym.harness.regression import evaluate_regression

    overrides = parse_overrides(args.set)
    task = make_task(args.env_id, **overrides)
    names = args.predictor or [*task.strategies, "oracle"]
    regression = getattr(task, "label_values", None) is not None
    data = {
        "split": args.split,
        "seed": args.seed,
        "num_sequences": args.num_sequences,
        "batch_size": args.batch_size,
    }
    reports = []
    for name in names:
        predictor = resolve_predictor(name, task)
        progress = not args.json and sys.stderr.isatty()
        report = evaluate(predictor, task, **data, device=args.device, progress=progress)
        row = {**report.to_dict(), "predictor": name, "env_id": args.env_id}
        if regression:  # the real prediction E_q[label value] at the label position
            scores = evaluate_regression(predictor, task, **data)
            row.update(mse=scores["mse"], mse_se=scores["mse_se"])
        reports.append(row)
    if args.json:
        if not args.curves:
            for r in reports:
                r.pop("curves")
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
        return 0
    print(f"{args.env_id}  split={args.split} seed={args.seed} sequences={args.num_sequences}")
    print(f"  {task.spec}")
    head = (
        f"{'predictor':16s} {'CE':>8s} {'excess':>8s} {'+-se':>7s} {'KL':>8s} "
        f"{'KL_last':>8s} {'acc':>6s} {'oracle':>6s}" + f" {'MSE':>7s}" * regression + "  nearest"
    )
    print(head)
    print("-" * len(head))
    for r in reports:
        print(
            f"{r['predictor']:16s} {r['cross_entropy']:8.4f} {r['excess_loss']:8.4f} "
            f"{r['excess_loss_se']:7.4f} {r['kl']:8.4f} {r['kl_last']:8.4f} "
            f"{r['accuracy']:6.3f} {r['oracle_accuracy']:6.3f}"
            + (f" {r['mse']:7.4f}" if regression else "")
            + f"  {r['nearest_strategy']}"
        )
    print(
        f"oracle CE {reports[0]['oracle_cross_entropy']:.4f}, "
        f"entropy of the true rows H {reports[0]['entropy']:.4f} (nats/token)"
    )
    return 0


def _cmd_speed(args: argparse.Namespace) -> int:
    from iclgym.speed import format_table, run

    print(format_table(run(seconds=args.seconds, repeats=args.repeats, num_envs=args.num_envs)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iclgym", description="In-context-learning tasks, oracles and baselines."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered env ids").set_defaults(run=_cmd_list)
    p = sub.add_parser("describe", help="describe one env id")
    p.add_argument("env_id")
    p.set_defaults(run=_cmd_describe)

    p = sub.add_parser("eval", help="score predictors against the Bayes oracle")
    p.add_argument("env_id")
    p.add_argument(
        "--predictor",
        action="append",
        help="oracle | a strategy name | ngram:ORDER[:ALPHA] | checkpoint:PATH (repeatable; "
        "default: every strategy and the oracle)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-sequences", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the report(s) as JSON")
    p.add_argument("--curves", action="store_true", help="include per-position curves in JSON")
    p.set_defaults(run=_cmd_eval)

    # Listed for --help only: main() hands `iclgym train ...` to iclgym.harness.train, whose
    # flags come from its config dataclasses (importing torch), so `iclgym list` stays light.
    sub.add_parser("train", help="train a model on an env id and plot its phases (--help)")
    sub.add_parser(
        "sweep", help="template tasks: train a model x width x n x seed grid, table + plot (--help)"
    )

    p = sub.add_parser("speed", help="throughput benchmark with the project's targets")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per env benchmark run")
    p.add_argument("--repeats", type=int, default=3, help="runs per benchmark (best counts)")
    p.add_argument("--num-envs", type=int, default=4096)
    p.set_defaults(run=_cmd_speed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train"]:
            from iclgym.harness.train import main as train_main

            train_main(argv[1:])
            return 0
        if argv[:1] == ["sweep"]:
            from iclgym.harness.sweep import main as sweep_main

            sweep_main(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        return args.run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
