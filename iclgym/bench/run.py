"""``iclgym bench``: train one model on every entry of the suite with a fixed protocol, score
it, store one row per (entry, seed), and summarise with interval estimates.

**Protocol** (:data:`BENCH_TRAIN`): the one trainer, a fresh batch of 64 from the train stream
every step, AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.01, constant lr, for the entry's
``steps`` (``quick_steps`` with ``--quick``), from each of the entry's seeds; the model is built
by its factory with the task's shape. Scored on the entry's split (``eval_sequences``
sequences, evaluation seed 0).

**Normalised score** per entry: ``1 - E_model / E_floor``, with E the excess loss over the Bayes
oracle (nats/token) and the floor the best context-free predictor
(:class:`iclgym.harness.MarginalPredictor`: the next token's marginal law at each position, read
without the context, estimated on the scored split's own stream from seed 1, the held-out set
being seed 0): 0 = no better than a context-free predictor that knows the scored split's
marginal law (on a held-out split, e.g. unseen symbols, that is more than the training data
tell: the uniform law can score far below 0 there), 1 = the oracle; it is unbounded below.
The suite's entries all have a floor excess far from 0 (the smallest is 0.16 nats); a floor
below 1e-9 nats makes the score NaN rather than a division blow-up. It is a ratio of means, so
it is resampled, not averaged: the interval is a percentile bootstrap (2000 resamples) over
seeds and sequences, crossed as they are (every seed is scored on the same sequences: one
resample draws seeds and one set of sequence indices for all of them; the model's and the
floor's excess on the same sequences). The aggregate over entries is the
interquartile mean of the entry scores (rliable's IQM, Agarwal et al. 2021), with the same
bootstrap run jointly over every entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import iclgym
from iclgym.bench.store import COLUMNS, ResultRow, ResultsStore, check_oracle_bound
from iclgym.bench.suite import SUITE, SUITE_VERSION, SuiteEntry, fingerprint
from iclgym.harness import (
    HeldOut,
    MarginalPredictor,
    RunOptions,
    build_model,
    evaluate,
    resolve_predictor,
    train,
)
from iclgym.harness.backends import Backend, TrialsFailed, run_trials
from iclgym.harness.model import ModelPredictor, load_model, num_parameters
from iclgym.harness.predictors import Predictor, PredictorKind
from iclgym.harness.train import TrainConfig, torch_threads
from iclgym.tasks.base import resolve_split

BENCH_TRAIN = TrainConfig(
    steps=2000,
    batch_size=64,
    lr=1e-3,
    betas=(0.9, 0.99),
    weight_decay=0.01,
    eval_every=0,
    eval_sequences=128,
    eval_batch_size=128,
)
"""The bench's training protocol; ``steps`` and ``seed`` are set per entry and seed."""


def bench_threads(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with :data:`BENCH_TRAIN`'s torch thread count (1): the floors, scoring and
    verification too, not only training, since torch's default of one thread per core stalls
    on a busy 2-core machine (OpenMP barriers; see ``iclgym speed``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch_threads(BENCH_TRAIN.threads):
            return fn(*args, **kwargs)

    return wrapper


BUNDLE_FORMAT = "iclgym-bundle-1"
"""The format tag of a submission bundle's ``bundle.json``."""
BOOTSTRAP = 2000
"""Bootstrap resamples of every interval."""


@dataclass(frozen=True)
class BenchModel:
    """The benchmarked model: its display ``name``, factory import path and arguments."""

    name: str
    factory: str
    args: Mapping[str, Any]

    def config_hash(self, quick: bool) -> str:
        """sha256 (16 hex) of everything that determines the trained models: the factory, its
        arguments, the protocol and the budget kind."""
        payload = {
            "factory": self.factory,
            "args": dict(self.args),
            "train": asdict(BENCH_TRAIN),
            "quick": quick,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_commit() -> str:
    """The iclgym checkout's HEAD commit, or ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(iclgym.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_folder(store: str | Path, model: BenchModel, quick: bool) -> Path:
    """The folder of ``model``'s runs beside ``store``: ``runs/<suite>/<model>-<config hash>/``,
    one ``<entry>/seed<S>/checkpoint.pt`` per row and the submission :func:`write_bundle`."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", model.name).strip("_") or "model"
    return Path(store).parent / "runs" / SUITE_VERSION / f"{slug}-{model.config_hash(quick)}"


def run_bench(
    model: BenchModel,
    store: str | Path,
    *,
    quick: bool = False,
    entries: Sequence[SuiteEntry] = SUITE,
    device: str = "cpu",
    progress: bool = True,
    backend: Backend | None = None,
) -> dict[str, Any]:
    """Train and score ``model`` on every entry and seed not yet in ``store`` (resumable: an
        interrupted bench rerun with the same arguments skips the stored rows and retrains the one
        it was in), keep each run's checkpoint under :func:`run_folder`, write one row per
        (entry, seed) and the folder's ``bundle.json``, and return :func:`summarize` of the
        model's rows, with ``"failed"``: the runs that raised (entry and seed -> error; the others
    are stored). The runs go to ``backend`` (default: this process, in order; Ray tasks with
        ``Backend("ray")``), the rows are written here as each finishes."""
    if entries:  # a bad factory or argument fails here, once, before any run
        build_model(model.factory, entries[0].task(), seed=0, **model.args)
    config_hash = model.config_hash(quick)
    commit = git_commit()
    folder = run_folder(store, model, quick)
    jobs = [(e, s) for e in entries for s in e.seeds]
    with ResultsStore(store) as results:
        done = {
            (r["entry"], r["seed"])
            for r in results.rows(
                suite_version=SUITE_VERSION, model=model.name, config_hash=config_hash
            )
        }
        todo = [(e, s) for e, s in jobs if (e.name, s) not in done]
        floors: dict[str, np.ndarray] = {}  # shared by the local runs; each Ray task its own
        outs = [folder / e.name.replace("/", "-") / f"seed{s}" for e, s in todo]
        trials = [(model, e, s, quick, device, floors, out)
                  for (e, s), out in zip(todo, outs, strict=True)]  # fmt: skip
        if len(todo) < len(jobs):
            print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already in {store}")

        def record(i: int, row: ResultRow) -> None:
            checkpoint = relative_path(outs[i] / "checkpoint.pt", results.path.parent)
            results.add(replace(row, config_hash=config_hash, git_commit=commit,
                                checkpoint=checkpoint))  # fmt: skip

        failed: dict[str, str] = {}
        try:
            run_trials(_run_one, trials, record, backend, desc=f"bench {model.name}",
                       progress=progress)  # fmt: skip
        except TrialsFailed as err:  # e.g. a model that cannot score an entry's task
            failed = {f"{todo[i][0].name} seed {todo[i][1]}": e for i, e in err.failures.items()}
        rows = results.rows(suite_version=SUITE_VERSION, model=model.name, config_hash=config_hash)
    if rows:
        write_bundle(rows, model, store, folder)
    return {**summarize(rows, [e.name for e in entries]), "failed": failed}


PREDICTOR_PREFIX = "predictor:"
"""The ``checkpoint`` of a row scored from a predictor named on the command line (``oracle``,
``ngram:2``, ...) rather than a trained module: verification rebuilds it from the name."""


@bench_threads
def run_predictor_bench(
    text: str,
    store: str | Path,
    kinds: Mapping[str, PredictorKind] | None = None,
    *,
    entries: Sequence[SuiteEntry] = SUITE,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Score the untrained predictor ``text`` (:func:`iclgym.harness.resolve_predictor`, with
    the predictor ``kinds`` the caller adds, e.g. the baselines' ``ngram``) on every entry not
    yet in ``store``: one row per entry, seed 0 (nothing is trained, so seeds do not apply),
    no parameters and no training FLOPs. Returns :func:`summarize` of its rows."""
    config_hash = predictor_config_hash(text)
    commit = git_commit()
    if entries:  # a bad name fails here, before the store is created
        resolve_predictor(text, entries[0].task(), kinds, device=device)
    with ResultsStore(store) as results:
        done = {r["entry"] for r in results.rows(model=text, config_hash=config_hash,
                                                 suite_version=SUITE_VERSION)}  # fmt: skip
        for entry in tqdm(entries, disable=not progress, unit="entry", desc=f"bench {text}"):
            if entry.name in done:
                continue
            start = time.perf_counter()
            held = held_out(entry, device)
            predictor = resolve_predictor(text, held.task, kinds, device=device)
            scores = score_model(predictor, held, floor_excess(entry, held))
            results.add(
                ResultRow(
                    suite_version=SUITE_VERSION, entry=entry.name, model=text,
                    config_hash=config_hash, seed=0, fingerprint=fingerprint(entry),
                    iclgym_version=iclgym.__version__, git_commit=commit, parameters=0,
                    train_flops=0.0, wall_s=time.perf_counter() - start,
                    device=str(torch.device(device)), scores=scores,
                    checkpoint=PREDICTOR_PREFIX + text,
                )
            )  # fmt: skip
        rows = results.rows(suite_version=SUITE_VERSION, model=text, config_hash=config_hash)
    return summarize(rows, [e.name for e in entries])


def predictor_config_hash(text: str) -> str:
    """The config hash of the rows of the predictor ``text``: sha256 (16 hex) of its name."""
    return hashlib.sha256(json.dumps({"predictor": text}).encode()).hexdigest()[:16]


def train_flops(parameters: int, steps: int, seq_len: int) -> float:
    """Training FLOPs of a bench run: 6 per parameter and token (forward + backward, Kaplan et
    al.), ``steps`` batches of :data:`BENCH_TRAIN`'s size of ``seq_len`` tokens."""
    return 6.0 * parameters * steps * BENCH_TRAIN.batch_size * seq_len


def relative_path(path: Path, base: Path) -> str:
    """``path`` relative to the folder ``base`` (both resolved), with ``/`` separators: how
    the store and a bundle record checkpoints."""
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def write_bundle(
    rows: Sequence[Mapping[str, Any]], model: BenchModel, store: str | Path, folder: Path
) -> Path:
    """Write ``folder/bundle.json``: the submission of ``rows`` (their store columns, with
    checkpoint paths relative to ``folder``) and the model's factory and arguments; with the
    checkpoints beside it, it is what :func:`iclgym.bench.verify.verify_bundle` checks."""
    base = Path(store).parent
    results = []
    for row in rows:
        claim = {k: row[k] for k in COLUMNS}
        if claim["checkpoint"] and not claim["checkpoint"].startswith(PREDICTOR_PREFIX):
            path = (base / claim["checkpoint"]).resolve()
            claim["checkpoint"] = relative_path(path, folder)
        results.append(claim)
    bundle = {
        "format": BUNDLE_FORMAT,
        "suite_version": SUITE_VERSION,
        "model": {"name": model.name, "factory": model.factory, "args": dict(model.args)},
        "results": results,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bundle.json"
    path.write_text(json.dumps(bundle, indent=1, default=str))
    return path


def floor_excess(entry: SuiteEntry, held: HeldOut) -> np.ndarray:
    """Per-sequence excess loss (nats/token, shape ``(eval_sequences,)``) of the context-free
    floor on ``held``: :class:`iclgym.harness.MarginalPredictor` estimated on the scored
    split's own stream from seed 1 (the held-out set is seed 0)."""
    _, stream = resolve_split(held.task, entry.split)
    marginal = MarginalPredictor(held.task, seed=1, split=stream)
    return np.asarray(evaluate(marginal, held, per_sequence=True).sequence_excess)


def held_out(entry: SuiteEntry, device: str = "cpu") -> HeldOut:
    """The scored set of ``entry``: its split, evaluation seed 0, ``eval_sequences``."""
    return HeldOut(entry.task(), split=entry.split, seed=0, num_sequences=entry.eval_sequences,
                   batch_size=256, device=device)  # fmt: skip


def score_model(
    net: torch.nn.Module | Predictor, held: HeldOut, floor: np.ndarray
) -> dict[str, Any]:
    """The scores stored in a row, of a trained module or a predictor: excess loss
    (nats/token) and accuracy with standard errors, the oracle's accuracy, the normalised score
    ``1 - E_model / E_floor`` and both per-sequence excess arrays (what the bootstrap
    resamples), and the oracle's Monte-Carlo error (:func:`check_oracle_bound` reads it)."""
    predictor = ModelPredictor(net) if isinstance(net, torch.nn.Module) else net
    report = evaluate(predictor, held, per_sequence=True)
    return {
        "excess_loss": report.excess_loss,
        "excess_loss_se": report.excess_loss_se,
        "accuracy": report.accuracy,
        "accuracy_se": report.accuracy_se,
        "oracle_accuracy": report.oracle_accuracy,
        "oracle_mc_error": float(held.oracle_mc_error),
        "score": _normalised(report.excess_loss, float(np.mean(floor))),
        "sequence_excess": list(report.sequence_excess),
        "floor_sequence_excess": [float(v) for v in floor],
    }


@bench_threads
def _run_one(
    model: BenchModel,
    entry: SuiteEntry,
    seed: int,
    quick: bool,
    device: str,
    floors: dict[str, np.ndarray],
    out: Path,
) -> ResultRow:
    task = entry.task()
    held = held_out(entry, device)
    if entry.name not in floors:
        floors[entry.name] = floor_excess(entry, held)
    steps = entry.quick_steps if quick else entry.steps
    config = replace(BENCH_TRAIN, steps=steps, seed=seed, device=device)
    start = time.perf_counter()
    net = build_model(model.factory, task, seed=seed, **model.args)
    if out.exists():  # a run interrupted before its row was stored: start it again
        shutil.rmtree(out)
    train(net, task, config, RunOptions(out=str(out), progress=False, plot=False))
    # Scored from the saved checkpoint, exactly what verification reloads.
    net = load_model(out / "checkpoint.pt", task, device)
    scores = {**score_model(net, held, floors[entry.name]), "steps": steps}
    check_oracle_bound(entry.name, scores)
    wall = time.perf_counter() - start
    params = num_parameters(net)
    return ResultRow(
        suite_version=SUITE_VERSION,
        entry=entry.name,
        model=model.name,
        config_hash="",
        seed=seed,
        fingerprint=fingerprint(entry),
        iclgym_version=iclgym.__version__,
        git_commit="",
        parameters=params,
        train_flops=train_flops(params, steps, task.seq_len),
        wall_s=wall,
        device=str(torch.device(device)),
        scores=scores,
    )


def _normalised(excess: float, floor: float) -> float:
    """``1 - excess / floor``, NaN for a floor below 1e-9 nats (no context to use)."""
    return 1.0 - excess / floor if floor > 1e-9 else float("nan")


def _entry_scores(rows: Sequence[Mapping[str, Any]], rng: np.random.Generator | None) -> float:
    """1 - mean model excess / mean floor excess over the rows' seeds and sequences; with
    ``rng``, on one bootstrap resample. Seeds and sequences are crossed (every seed is scored
    on the same held-out sequences), so one resample draws seeds and one set of sequence
    indices shared by every drawn seed, which keeps the test set's own variance in the
    interval."""
    if rng is None:
        picked, idx = rows, slice(None)
    else:
        picked = [rows[i] for i in rng.integers(len(rows), size=len(rows))]
        n = len(rows[0]["scores"]["sequence_excess"])
        idx = rng.integers(n, size=n)
    model_sum = floor_sum = 0.0
    for row in picked:
        model_sum += np.asarray(row["scores"]["sequence_excess"])[idx].mean()
        floor_sum += np.asarray(row["scores"]["floor_sequence_excess"])[idx].mean()
    return _normalised(model_sum, floor_sum)


def _iqm(values: Sequence[float]) -> float:
    """Interquartile mean (rliable's IQM, scipy's ``trim_mean(values, 0.25)``): sort, drop
    floor(n / 4) values from each end, average the rest (the middle 6 of 10 entries)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    cut = len(v) // 4
    return float(v[cut : len(v) - cut].mean())


def summarize(
    rows: Sequence[Mapping[str, Any]], entries: Sequence[str], seed: int = 0
) -> dict[str, Any]:
    """Per entry: the normalised score, its 95% percentile-bootstrap interval, the mean excess
    loss and accuracy over seeds, the seeds stored; the aggregate IQM with its interval.
    Entries without rows are skipped."""
    by_entry = {name: [r for r in rows if r["entry"] == name] for name in entries}
    by_entry = {k: v for k, v in by_entry.items() if v}
    rng = np.random.default_rng(seed)
    boot = {name: np.empty(BOOTSTRAP) for name in by_entry}
    iqm_boot = np.empty(BOOTSTRAP)
    for b in range(BOOTSTRAP if by_entry else 0):
        for name, entry_rows in by_entry.items():
            boot[name][b] = _entry_scores(entry_rows, rng)
        iqm_boot[b] = _iqm([boot[name][b] for name in by_entry])
    out: dict[str, Any] = {"entries": {}}
    for name, entry_rows in by_entry.items():
        lo, hi = np.percentile(boot[name], [2.5, 97.5])
        out["entries"][name] = {
            "score": _entry_scores(entry_rows, None),
            "ci": (float(lo), float(hi)),
            "excess_loss": float(np.mean([r["scores"]["excess_loss"] for r in entry_rows])),
            "accuracy": float(np.mean([r["scores"]["accuracy"] for r in entry_rows])),
            "seeds": sorted(r["seed"] for r in entry_rows),
            "parameters": entry_rows[0]["parameters"],
            "wall_s": float(sum(r["wall_s"] for r in entry_rows)),
        }
    if by_entry:
        lo, hi = np.percentile(iqm_boot, [2.5, 97.5])
        scores = [v["score"] for v in out["entries"].values()]
        out["iqm"], out["iqm_ci"] = _iqm(scores), (float(lo), float(hi))
    return out


def format_summary(summary: Mapping[str, Any], model: str) -> str:
    """The summary as a fixed-width table (one line per entry, then the IQM)."""
    head = f"{'entry':32s} {'score':>7s} {'95% CI':>17s} {'excess':>8s} {'acc':>6s} seeds"
    lines = [
        f"{model} on {SUITE_VERSION}: normalised score (0 = context-free floor, 1 = Bayes "
        "oracle), 95% bootstrap CI over seeds and sequences",
        "",
        head,
    ]
    for name, e in summary["entries"].items():
        lo, hi = e["ci"]
        lines.append(
            f"{name:32s} {e['score']:7.3f} [{lo:6.3f}, {hi:6.3f}] {e['excess_loss']:8.4f} "
            f"{e['accuracy']:6.3f} {','.join(map(str, e['seeds']))}"
        )
    if "iqm" in summary:
        lo, hi = summary["iqm_ci"]
        lines += ["", f"{'IQM over entries':32s} {summary['iqm']:7.3f} [{lo:6.3f}, {hi:6.3f}]"]
    for run, error in summary.get("failed", {}).items():
        lines.append(f"FAILED {run}: {' '.join(error.split())[:300]}")
    return "\n".join(lines)
