"""Multi-concept prompts (after Bu et al. 2024; ``docs/results/multi-concept.md``)
through the one trainer: the ``bu2024`` recipe (the reference transformer of
``baselines.concept_attention``, plain SGD lr 0.5, batch 64, fresh prompts every step) on
config C0, fixed and random label mapping, seeds 0/1/2; then the OOD table on every named split.

Parts:

- ``curves``: the in-distribution test 0-1 error and logistic loss at steps 0, 200, 400, 1000,
  2000 (4000 test prompts of the training world), per mapping and seed;
- ``ood``: the accuracy of each trained model on the named splits (``ood_length_N``,
  ``ood_skew``, ``ood_switched``, ``ood_noise``, ``ood_cross_pairing``) next to the Bayes oracle,
  the softmax vote (tau 0.1) and ridge (lambda 0.1);
- ``heldout``: a model per mapping trained with ``heldout_concepts=2`` (the task concept never
  one of the last 2 concepts), scored on ``ood_heldout_concepts`` (only those 2);
- ``train_skew``: a fixed-mapping model trained on the skewed concept law (p(k=0) = 0.9),
  its uniform-law (``iid``) test 0-1 error at steps 200, 1000, 2000.

Run (one torch thread; about 25 s per 2000-step run on the project's 2-core CPU)::

    python docs/scripts/multi_concept_ood.py --out docs/results/multi-concept

writes ``table.md``, ``runs.json`` and ``curves.png`` there.
``tests/harness/test_multi_concept_repro.py`` runs the same functions (the CI share).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from iclgym.harness import RECIPES, RunOptions, build_model, evaluate, train
from iclgym.harness.evaluate import HeldOut
from iclgym.harness.model import ModelPredictor
from iclgym.harness.predictors import OraclePredictor, StrategyPredictor
from iclgym.registry import make_task

ENV_ID = "ICL-MultiConcept-v0"
RECIPE = RECIPES["bu2024"]
MODEL = "baselines.concept_attention:make_model"
EVAL_PROMPTS = 4000
"""N >= 4000 prompts per split from fixed evaluation seeds (a 95% CI of 0.3-1.5 points)."""
CURVE_STEPS = (0, 200, 400, 1000, 2000)
OOD_SPLITS = (
    "test",
    "ood_length_4",
    "ood_length_8",
    "ood_length_32",
    "ood_length_64",
    "ood_skew",
    "ood_switched",
    "ood_noise",
    "ood_cross_pairing",
)
REFERENCES = ("softmax_vote", "ridge")
"""Dictionary-free in-context rules scored beside the transformer."""


def train_run(
    mapping: str, seed: int, steps: int = 2000, out: Path | None = None, **spec: Any
) -> dict[str, Any]:
    """Train the ``bu2024`` recipe's model on C0 with ``mapping`` (and ``spec`` overrides) for
    ``steps`` steps from ``seed``; evaluations at :data:`CURVE_STEPS` on the test split.
    Returns the model, its task and the curve {step: (0-1 error, logistic loss)}."""
    task = make_task(ENV_ID, mapping=mapping, **spec)
    return _train(task, seed, steps, out, eval_split="test")


def _train(task, seed: int, steps: int, out: Path | None, eval_split: str) -> dict[str, Any]:
    model = build_model(MODEL, task, seed=seed, **RECIPE.model_args)
    config = replace(
        RECIPE.train,
        steps=steps,
        seed=seed,
        eval_every=200,
        eval_splits=(eval_split,),
        eval_sequences=EVAL_PROMPTS,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out or tmp) / f"{task.spec.mapping}-seed{seed}"
        run = RunOptions(out=str(folder), progress=False, plot=False)
        summary = train(model, task, config, run)
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["type"] == "eval"]
    curve = {r["step"]: (1 - r["accuracy"], r["loss"]) for r in records}
    return {
        "model": model,
        "task": task,
        "seed": seed,
        "curve": {s: curve[s] for s in sorted(curve) if s in CURVE_STEPS or s == steps},
        "train_loss": summary["final"]["batch_loss"],
        "wall_s": time.perf_counter() - start,
    }


def accuracies(model, task, splits=OOD_SPLITS, references=REFERENCES, n=EVAL_PROMPTS) -> dict:
    """split -> {predictor: accuracy} for the model, the oracle and ``references`` on the same
    ``n`` prompts of each split (evaluation seed 0)."""
    table = {}
    for split in splits:
        held = HeldOut(task, split=split, seed=0, num_sequences=n, batch_size=1000)
        row = {"model": evaluate(ModelPredictor(model), held).accuracy}
        row["oracle"] = evaluate(OraclePredictor(held.task), held).accuracy
        for name in references:
            row[name] = evaluate(StrategyPredictor(held.task, name), held).accuracy
        table[split] = row
    return table


def run_all(seeds=(0, 1, 2), steps: int = 2000, out: Path | None = None) -> dict[str, Any]:
    runs: dict[str, Any] = {"curves": {}, "ood": {}, "heldout": {}, "train_skew": None}
    for mapping in ("fixed", "random"):
        for seed in seeds:
            r = train_run(mapping, seed, steps, out)
            key = f"{mapping}/{seed}"
            runs["curves"][key] = {"curve": r["curve"], "wall_s": r["wall_s"]}
            runs["ood"][key] = accuracies(r["model"], r["task"])
            err = r["curve"][max(r["curve"])][0]
            print(f"{key}: {r['wall_s']:.1f} s, final test 0-1 {err:.4f}", flush=True)
        r = train_run(mapping, 0, steps, out, heldout_concepts=2)
        runs["heldout"][mapping] = accuracies(r["model"], r["task"], ("ood_heldout_concepts",))
    skewed = make_task(ENV_ID).split_task("train_skew")  # p(k* = 0) = 0.9 in training
    r = _train(skewed, 0, steps, out, eval_split="iid")
    runs["train_skew"] = r["curve"]
    return runs


def table(runs: dict[str, Any]) -> str:
    """The markdown tables of ``runs`` (curves, OOD accuracies, held-out, train_skew)."""
    lines = ["| mapping/seed | " + " | ".join(f"step {s}" for s in CURVE_STEPS) + " | s |"]
    lines.append("|---" * (len(CURVE_STEPS) + 2) + "|")
    for key, r in runs["curves"].items():
        cells = [
            f"{r['curve'][s][0]:.4f} ({r['curve'][s][1]:.4f})" if s in r["curve"] else "-"
            for s in CURVE_STEPS
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
    lines += [
        "",
        "| split | TF fixed (seeds) | TF random (seeds) | oracle | softmax vote | ridge |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for split in OOD_SPLITS:
        fixed = [v[split]["model"] for k, v in runs["ood"].items() if k.startswith("fixed")]
        rand = [v[split]["model"] for k, v in runs["ood"].items() if k.startswith("random")]
        any_run = next(iter(runs["ood"].values()))[split]
        lines.append(
            f"| {split} | {' / '.join(f'{a:.4f}' for a in fixed)} | "
            f"{' / '.join(f'{a:.4f}' for a in rand)} | {any_run['oracle']:.4f} | "
            f"{any_run['softmax_vote']:.4f} | {any_run['ridge']:.4f} |"
        )
    for mapping, acc in runs["heldout"].items():
        row = acc["ood_heldout_concepts"]
        lines.append(
            f"| ood_heldout_concepts ({mapping}, seed 0) | "
            + (f"{row['model']:.4f} | - " if mapping == "fixed" else f"- | {row['model']:.4f} ")
            + f"| {row['oracle']:.4f} | {row['softmax_vote']:.4f} | {row['ridge']:.4f} |"
        )
    if runs["train_skew"]:
        skew = runs["train_skew"]
        lines += ["", "train_skew (fixed, seed 0), uniform-law test 0-1: " + ", ".join(
            f"step {s}: {skew[s][0]:.4f}" for s in sorted(skew)
        )]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, r in runs["curves"].items():
        steps = sorted(r["curve"])
        style = "-" if key.startswith("fixed") else "--"
        axes[0].plot(steps, [max(r["curve"][s][0], 1e-4) for s in steps], style, label=key)
        axes[1].plot(steps, [r["curve"][s][1] for s in steps], style, label=key)
    axes[0].set(yscale="log", xlabel="SGD step", ylabel="test 0-1 error (floor 1e-4)")
    axes[1].set(yscale="log", xlabel="SGD step", ylabel="test logistic loss (nats)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Multi-concept prompts (after Bu et al. 2024), C0, bu2024 recipe")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("docs/results/multi-concept"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = run_all(tuple(args.seeds), args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (args.out / "table.md").write_text(text)
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
    plot(runs, args.out / "curves.png")
    print(text)


if __name__ == "__main__":
    main()
