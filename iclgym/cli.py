"""The ``iclgym`` command: list, describe, eval, regret, train, sweep, speed, bench, verify,
leaderboard, export.

Each subcommand's options are a dataclass parsed by ``tyro`` (the config is the command line,
as in CleanRL); ``iclgym train`` and ``iclgym sweep`` take every field of
:class:`iclgym.harness.train.TrainConfig` as a flag. One flag name per concept: ``--set
KEY=VALUE`` (spec overrides), ``--out`` (output folder), ``--device``, ``--seed`` /
``--seeds``, ``--model`` / ``--models`` and ``--model-arg KEY=VALUE``.

This module resolves model and predictor names to ``baselines`` (the harness imports none):
``--model transformer|mlp|lstm|transformer+kq|...`` or ``--model package.module:factory``;
``--predictor ngram:ORDER[:ALPHA]``. ``iclgym list`` and ``describe`` import no torch.

Every mistake on the command line ends in one line ``error: ...`` on stderr, naming the bad
value and what is valid, and exit status 2; never a traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import tyro

from iclgym.registry import describe, get_entry, list_envs, make_task, parse_overrides

COMMANDS = {
    "list": "list the registered env ids",
    "describe": "describe one env id",
    "eval": "score predictors against the Bayes oracle",
    "regret": "score agents online under bandit feedback by cumulative regret",
    "train": "train any model on any env id with the one trainer (--recipe NAME for a paper's)",
    "sweep": "train a model x width x n x seed grid; table and plot of the test error",
    "speed": "throughput benchmark with the project's targets",
    "bench": "train and score one model on the versioned suite; results in a SQLite store",
    "verify": "re-evaluate a stored result or a submitted bundle from its checkpoints",
    "leaderboard": "render the results store as a static HTML page and a Markdown table",
    "export": "write a frozen evaluation set (tokens, targets, mask, exact law) to Parquet",
}
Repeated = tyro.conf.UseAppendAction[tuple[str, ...]]
EnvId = tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="ENV_ID")]]


class UsageError(ValueError):
    """A command-line mistake, already phrased for the user."""


# ----------------------------------------------------------------------- arguments
@dataclass(frozen=True)
class ListArgs:
    """List the registered env ids."""


@dataclass(frozen=True)
class DescribeArgs:
    """Describe one env id: spec, vocabulary, strategies."""

    env_id: EnvId
    """Registered env id, e.g. ICL-NGram-v0."""
    set: Repeated = ()
    """Spec override KEY=VALUE, repeatable (e.g. --set heldout_concepts=2: some named splits
    exist only for some specs)."""


@dataclass(frozen=True)
class EvalArgs:
    """Score predictors against the Bayes oracle on held-out sequences."""

    env_id: EnvId
    """Registered env id, e.g. ICL-MarkovChain-v0."""
    predictor: Repeated = ()
    """oracle | a strategy name | ngram:ORDER[:ALPHA] (order 0 = uniform) | checkpoint:PATH;
    repeatable (default: every strategy and the oracle)."""
    set: Repeated = ()
    """Spec override KEY=VALUE, repeatable (e.g. --set num_states=5)."""
    split: str = "test"
    """Data split scored: train, validation, test, or one of the task's named held-out splits
    (``iclgym describe ID [--set ...]`` lists them, e.g. ood_length_32, ood_switched)."""
    seed: int = 0
    """Seed of the evaluated sequences."""
    num_sequences: int = 4096
    """Sequences scored."""
    batch_size: int = 1024
    """Sequences per batch."""
    device: str = "cpu"
    """Torch device (cpu, cuda, ...)."""
    threads: int = 1
    """Torch CPU threads (0: torch's default). One, as for training: on a busy 2-core machine
    two OpenMP threads made the Monte-Carlo oracle up to 5x slower (docs/harness.md)."""
    json: tyro.conf.FlagCreatePairsOff[bool] = False
    """Print the reports as a JSON list (one entry per predictor)."""
    curves: tyro.conf.FlagCreatePairsOff[bool] = False
    """Include the per-position curves in the JSON."""


@dataclass(frozen=True)
class RegretArgs:
    """Score agents online under bandit feedback (iclgym.wrappers.BanditFeedback: the next
    token shown only after a correct prediction) by their cumulative pseudo-regret per
    episode, on the same episodes, next to the env's oracle with every token shown (a lower
    bound where that oracle is exact Bayes; the output names it)."""

    env_id: EnvId
    """Registered env id (action='token'), e.g. ICL-MarkovChain-v0."""
    agent: Repeated = ()
    """uniform | revealed_bigram | dpt:RUN[:greedy|:sample] (a DPT run folder of --recipe
    lee2023-bandit) | sb3:RUN[:greedy|:sample] (an SB3 agent folder trained with --feedback
    bandit); repeatable (default: uniform and revealed_bigram)."""
    set: Repeated = ()
    """Spec override KEY=VALUE, repeatable."""
    split: str = "test"
    """Data split of the episodes (as iclgym eval: train, validation, test, or a named split)."""
    episodes: int = 256
    """Episodes scored, the same for every agent (episode i's env seed a function of
    (seed, i): two seeds give independent episodes)."""
    num_envs: int = 64
    """Episodes stepped together (one batched agent call per step); it also decides which of a
    sampling agent's (uniform, :sample) random draws go to which episode."""
    seed: int = 0
    """Seed (>= 0) of the episodes and of sampling agents."""
    json: tyro.conf.FlagCreatePairsOff[bool] = False
    """Print the reports as a JSON list (one entry per agent, with env_id, split, seed, spec)."""


@dataclass(frozen=True)
class SpeedArgs:
    """Throughput benchmark with the project's targets."""

    seconds: float = 2.0
    """Seconds per env benchmark run (> 0)."""
    repeats: int = 3
    """Runs per benchmark (the best counts)."""
    num_envs: int = 4096
    """Envs of the native vector env benchmark."""
    official: str = ""
    """A checkout of EzraEdelman/Evolution-of-Statistical-Induction-Heads: its generator is
    measured side by side with the sampler grid (never bundled with iclgym)."""


@dataclass(frozen=True)
class BenchArgs:
    """Train one model on every entry of the versioned suite (iclgym.bench.suite) with the
    bench's fixed protocol, 3 seeds each, score it against the Bayes oracle and the
    context-free floor, and store one row per entry and seed (resumable)."""

    model: str = "transformer"
    """A model name (transformer, mlp, lstm, dpt, ...) or an import path package.module:factory."""
    predictor: str = ""
    """Score an untrained predictor instead of training --model (oracle, a strategy name,
    ngram:ORDER[:ALPHA]): one row per entry, nothing trained."""
    model_arg: Repeated = ()
    """KEY=VALUE model arguments (repeatable)."""
    quick: tyro.conf.FlagCreatePairsOff[bool] = False
    """The quick budget (each entry's quick_steps): minutes on a CPU, for CI and newcomers."""
    store: str = "results/iclgym.db"
    """The SQLite results store (created if absent)."""
    entries: tuple[str, ...] = ()
    """Suite entries to run (empty: all)."""
    device: str = "cpu"
    """Torch device of the training runs."""
    backend: Literal["local", "ray"] = "local"
    """Where runs go: one after another in this process, or as Ray tasks (iclgym[ray])."""
    address: str = ""
    """Ray cluster address (e.g. auto, ray://HOST:10001); empty: a local Ray for the run."""
    workers: int | None = None
    """CPUs of the local Ray started for the run (default: every core)."""


@dataclass(frozen=True)
class VerifyArgs:
    """Re-evaluate results from their checkpoints on the fingerprinted data: a stored row
    (RESULT_ID, marked verified when it holds) or a submission bundle (PATH to bundle.json or
    its folder, added to the store as verified when every claim holds). Exit status 1 when a
    claim is rejected."""

    target: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="RESULT_ID|BUNDLE")]]
    """A result id of the store, or a bundle's path."""
    store: str = "results/iclgym.db"
    """The SQLite results store."""
    device: str = "cpu"
    """Torch device of the re-evaluation."""


@dataclass(frozen=True)
class LeaderboardArgs:
    """Render the results store as OUT/leaderboard.html (sortable table, size classes,
    verified vs self-reported, score-vs-parameters plot; one self-contained file) and
    OUT/leaderboard.md (the README's table)."""

    store: str = "results/iclgym.db"
    """The SQLite results store."""
    out: str = "results/leaderboard"
    """Folder of leaderboard.html and leaderboard.md."""
    screenshot: str = ""
    """Also save a PNG screenshot of the page here (needs chromium, chromedriver, selenium)."""


@dataclass(frozen=True)
class ExportArgs:
    """Write a frozen evaluation set to Parquet (pip install 'iclgym[export]'): one row per
    sequence with tokens, targets, loss mask, the exact next-token law, the oracle's and the
    strategies' log-probs and per-row provenance; scoring it back (iclgym.bench.export.
    score_parquet) gives evaluate's report."""

    env_id: EnvId
    """Registered env id."""
    out: str = "eval.parquet"
    """Output Parquet file."""
    split: str = "test"
    """A seed-stream split or one of the task's named splits."""
    num_sequences: int = 1024
    """Sequences in the set."""
    seed: int = 0
    """Evaluation seed."""
    batch_size: int = 512
    """Sampling batch size (part of the data: keep it to match an evaluate run)."""
    set: Repeated = ()
    """Spec override KEY=VALUE, repeatable."""


# ------------------------------------------------------------------ resolving names
def resolve_model(name: str) -> tuple[str, dict[str, Any], str | None]:
    """``(factory import path, default args, width argument)`` of a model name or path."""
    from baselines import MODELS

    if name in MODELS:
        entry = MODELS[name]
        return entry.factory, dict(entry.args), entry.width_arg
    if ":" in name:
        return name, {}, None
    raise UsageError(
        f"model={name!r} is invalid: expected one of {', '.join(MODELS)} or an import path "
        "'package.module:factory'"
    )


def accepted_args(factory: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``args`` that ``factory`` (an import path) takes as named parameters."""
    from iclgym.harness.model import import_object

    params = inspect.signature(import_object(factory, "model")).parameters
    named = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return {k: v for k, v in args.items() if k in named}


def predictor_kinds() -> dict[str, Callable]:
    """``KIND:`` prefixes of ``--predictor`` that resolve to baselines."""
    from baselines import PREDICTOR_KINDS
    from iclgym.harness.model import import_object

    return {kind: import_object(path) for kind, path in PREDICTOR_KINDS.items()}


def _model_setup(recipe, model: str, model_arg: Sequence[str], env_id: str) -> tuple:
    """Factory path, merged arguments and width argument of ``--model`` under ``recipe``: the
    recipe's model arguments apply to its own model; its common arguments (e.g. ``n_outputs=1``,
    the value head) to any model whose factory names them; ``--model-arg`` flags come last."""
    from iclgym.harness.train import parse_assignments

    factory, args, width_arg = resolve_model(model)
    if recipe is not None and env_id == recipe.env_id:
        recipe_factory, _, _ = resolve_model(recipe.model)
        if recipe_factory == factory:
            inherited = {**recipe.model_args, **recipe.common_args}
        else:
            inherited = accepted_args(factory, recipe.common_args)
        args = {**inherited, **args}
    return factory, {**args, **parse_assignments(model_arg, "--model-arg")}, width_arg


def _task_setup(recipe, env_id: str, sets: Sequence[str]) -> tuple[str, dict[str, Any]]:
    if not env_id:
        if recipe is None:
            raise UsageError("an env id is needed (e.g. ICL-MarkovChain-v0), or --recipe NAME")
        env_id = recipe.env_id
    get_entry(env_id)
    spec = dict(recipe.spec) if recipe is not None and env_id == recipe.env_id else {}
    return env_id, {**spec, **parse_overrides(sets)}


# ---------------------------------------------------------------------- commands
def _cmd_list(args: ListArgs) -> int:
    ids = list_envs()
    width = max(map(len, ids))
    for env_id in ids:
        print(f"{env_id:{width}s}  {get_entry(env_id).summary}")
    return 0


def _cmd_describe(args: DescribeArgs) -> int:
    print(describe(args.env_id, **parse_overrides(args.set)))
    return 0


def _cmd_eval(args: EvalArgs) -> int:
    from iclgym.harness import HeldOut, evaluate, resolve_predictor
    from iclgym.harness.evaluate import beats_oracle, strict_json
    from iclgym.harness.model import check_device

    check_device(args.device)
    if args.threads < 0:
        raise ValueError(f"threads={args.threads} is invalid: expected an int >= 0 (0: default)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    progress = not args.json and sys.stderr.isatty()
    held_out = HeldOut(  # the data, the oracle and the strategies once for every predictor
        make_task(args.env_id, **parse_overrides(args.set)),
        split=args.split,
        seed=args.seed,
        num_sequences=args.num_sequences,
        batch_size=args.batch_size,
        device=args.device,
        progress=progress,
        env_id=args.env_id,
    )
    task = held_out.task  # a named split's variant: its oracle and strategies are scored
    kinds = predictor_kinds()
    names = list(args.predictor) or [*task.strategies, "oracle"]
    predictors = [resolve_predictor(n, task, kinds, device=args.device) for n in names]
    reports, impossible = [], []
    for name, predictor in zip(names, predictors, strict=True):
        report = evaluate(predictor, held_out, progress=progress)
        if beats_oracle(report) and name not in task.privileged_strategies:
            impossible.append(name)
        reports.append({**report.to_dict(), "predictor": name})
    for name in impossible:  # on stderr, so that --json stays parseable
        print(
            f"warning: {name} beats the exact Bayes oracle beyond chance (excess < -(3 SE + "
            "MC error + 1e-3)): no predictor of the context alone can, so it reads future "
            "tokens (at this batch size?) or other hidden information",
            file=sys.stderr,
        )
    if args.json:
        if not args.curves:
            for r in reports:
                r.pop("curves")
        print(strict_json(reports, indent=2))
        return 0
    values = getattr(task, "label_values", None) is not None
    first = reports[0]
    print(f"{args.env_id}  split={args.split} seed={args.seed} sequences={args.num_sequences}")
    print(f"  {task.spec}")
    for note in task.notes:
        print(f"  {note}")
    print(f"  oracle: {first['oracle']}, Monte-Carlo error {first['oracle_mc_error']:.2g} nats")
    head = (
        f"{'predictor':16s} {'CE':>8s} {'excess':>8s} {'+-se':>7s} {'KL':>8s} "
        f"{'KL_last':>8s} {'acc':>6s} {'oracle':>6s}" + f" {'MSE':>7s}" * values + "  nearest"
    )
    print(head)
    print("-" * len(head))

    def num(value: float | None, width: int, digits: int = 4) -> str:
        return f"{'-':>{width}s}" if value is None else f"{value:{width}.{digits}f}"

    privileged = [r["predictor"] for r in reports if r["predictor"] in task.privileged_strategies]
    for r in reports:
        shown = r["predictor"] + "*" * (r["predictor"] in privileged)
        print(
            f"{shown:16s} {num(r['cross_entropy'], 8)} {num(r['excess_loss'], 8)} "
            f"{num(r['excess_loss_se'], 7)} {num(r['kl'], 8)} {num(r['kl_last'], 8)} "
            f"{r['accuracy']:6.3f} {r['oracle_accuracy']:6.3f}"
            + (f" {num(r['mse'], 7)}" if values else "")
            + f"  {r['nearest_strategy'] or '-'}"
        )
    print(
        f"oracle CE {first['oracle_cross_entropy']:.4f}, "
        f"entropy of the true rows H {first['entropy']:.4f} (nats/token)"
    )
    if privileged:
        print(
            f"* {', '.join(privileged)}: reads each sequence's hidden parameters, not just its "
            "context, so it beats the Bayes oracle (negative excess loss): a reference, not a "
            "competitor"
        )
    return 0


def _cmd_train(args: Any) -> int:
    from iclgym.harness import build_model, get_recipe, train

    recipe = get_recipe(args.recipe) if args.recipe else None
    env_id, spec = _task_setup(recipe, args.env_id, args.set)
    factory, model_args, _ = _model_setup(recipe, args.model, args.model_arg, env_id)
    task = make_task(env_id, **spec)
    model = build_model(factory, task, seed=args.train.seed, **model_args)
    summary = train(model, task, args.train, args.run, env_id=env_id)
    from iclgym.harness.commands import format_train_summary

    print(format_train_summary(summary, env_id, args.model))
    return 0


def _cmd_sweep(args: Any) -> int:
    from iclgym.harness import get_recipe
    from iclgym.harness.sweep import ModelChoice, run_sweep

    recipe = get_recipe(args.recipe) if args.recipe else None
    if args.train.seed != (recipe.train.seed if recipe else 0):
        raise UsageError("--seed is not a sweep option: give the training seeds with --seeds")
    env_id, spec = _task_setup(recipe, args.env_id, args.set)
    names = args.models or ((recipe.model,) if recipe else ("transformer",))
    choices = []
    for name in names:
        factory, model_args, width_arg = _model_setup(recipe, name, args.model_arg, env_id)
        choices.append(ModelChoice(name, factory, model_args, width_arg or args.width_arg or None))
    from iclgym.harness.backends import TrialsFailed

    try:
        run_sweep(
            env_id,
            models=choices,
            widths=args.widths,
            ns=args.ns,
            n_key=args.n_key,
            seeds=args.seeds,
            spec=spec,
            config=args.train,
            out=args.out,
            resume=args.resume,
            keep_checkpoints=args.keep_checkpoints,
            backend=_backend(args, args.train.device),
        )
    except TrialsFailed as err:  # the other cells are recorded: --resume reruns these
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _cmd_regret(args: RegretArgs) -> int:
    from baselines import AGENT_KINDS
    from iclgym.harness import regret
    from iclgym.harness.evaluate import strict_json
    from iclgym.harness.model import import_object

    spec = parse_overrides(args.set)
    task = make_task(args.env_id, **spec)
    names = list(args.agent) or ["uniform", "revealed_bigram"]
    policies = []
    for name in names:
        kind, _, rest = name.partition(":")
        if name == "uniform":
            policies.append((regret.uniform_policy(task.vocab_size, args.seed), {}))
        elif name == "revealed_bigram":
            policies.append((regret.revealed_bigram_policy(task.vocab_size), {}))
        elif kind in AGENT_KINDS and rest:
            agent = import_object(AGENT_KINDS[kind])(rest, task, seed=args.seed)
            policies.append((agent.act, getattr(agent, "env_options", {})))
            continue
        else:
            kinds = ", ".join(f"{k}:ARGS" for k in AGENT_KINDS)
            raise UsageError(
                f"agent={name!r} is invalid: expected uniform, revealed_bigram or {kinds}"
            )
    common = {
        "spec": spec,
        "split": args.split,
        "num_episodes": args.episodes,
        "num_envs": args.num_envs,
    }
    reports = [regret.full_information_regret(args.env_id, seed=args.seed, **common)]
    import gymnasium as gym
    import torch

    oracle_name = gym.make(args.env_id, **spec).unwrapped.online_oracle
    for name, (policy, options) in zip(names, policies, strict=True):
        common["spec"] = {**spec, **options}  # the agent's env options (observation, ...)
        torch.manual_seed(args.seed)  # SB3 agents sample from torch's global state
        report = regret.bandit_regret(args.env_id, policy, name=name, seed=args.seed, **common)
        reports.append(report)
    if args.json:
        where = {"env_id": args.env_id, "split": args.split, "seed": args.seed}
        rows = [{**r.to_dict(), **where, "spec": str(task.spec)} for r in reports]
        print(strict_json(rows, indent=2))
        return 0
    print(
        f"{args.env_id}  bandit feedback, split={args.split} episodes={args.episodes} "
        f"seed={args.seed}"
    )
    print(f"  {task.spec}")
    head = f"{'agent':34s} {'regret':>8s} {'+-se':>6s} {'acc':>6s} {'+-se':>6s}"
    print(head)
    print("-" * len(head))

    def se(value: float) -> str:
        return f"{'-':>6s}" if value != value else f"{value:6.3f}"  # NaN: one episode

    for r in reports:
        print(
            f"{r.agent:34s} {r.regret:8.3f} {se(r.regret_se)} {r.accuracy:6.3f} {se(r.accuracy_se)}"
        )
    print(
        "regret: cumulative pseudo-regret per episode, sum_t max p - p(a_t) under the true "
        "law; acc: mean reward per step (the oracle's: expected, p(a)). The full-information "
        "oracle sees every token: where it is exact Bayes no bandit agent's expected regret is "
        f"below it (this env's oracle: {oracle_name})"
    )
    return 0


def _backend(args: Any, device: str) -> Any:
    """The trials' :class:`~iclgym.harness.backends.Backend`: one GPU per trial off the CPU."""
    from iclgym.harness.backends import Backend

    gpus = 0.0 if device == "cpu" else 1.0
    return Backend(args.backend, args.address, args.workers, num_gpus=gpus)


def _cmd_speed(args: SpeedArgs) -> int:
    from iclgym.validation import as_float, as_int

    as_float("seconds", args.seconds, 0.0, low_open=True)
    as_int("repeats", args.repeats, 1)
    as_int("num_envs", args.num_envs, 1)
    from iclgym.speed import format_table, load_average, run

    load = load_average()
    rows = run(
        seconds=args.seconds,
        repeats=args.repeats,
        num_envs=args.num_envs,
        official=args.official or None,
    )
    print(format_table(rows, load_before=load))
    return 0


def _cmd_bench(args: BenchArgs) -> int:
    from iclgym.bench.run import BenchModel, format_summary, run_bench
    from iclgym.bench.suite import SUITE
    from iclgym.harness.train import parse_assignments

    names = {e.name: e for e in SUITE}
    unknown = [n for n in args.entries if n not in names]
    if unknown:
        raise UsageError(f"entries {unknown} are invalid: expected some of {', '.join(names)}")
    entries = [names[n] for n in args.entries] if args.entries else list(SUITE)
    if args.predictor:
        from iclgym.bench.run import run_predictor_bench

        summary = run_predictor_bench(args.predictor, args.store, predictor_kinds(),
                                      entries=entries, device=args.device,
                                      progress=sys.stderr.isatty())  # fmt: skip
        print(format_summary(summary, args.predictor))
        print(f"rows in {args.store}")
        return 0
    factory, model_args, _ = resolve_model(args.model)
    model_args.update(parse_assignments(args.model_arg, "--model-arg"))
    name = (
        args.model + "".join(f" {a}" for a in args.model_arg) + (" --quick" if args.quick else "")
    )
    try:
        summary = run_bench(
            BenchModel(name, factory, model_args),
            args.store,
            quick=args.quick,
            entries=entries,
            device=args.device,
            progress=sys.stderr.isatty(),
            backend=_backend(args, args.device),
        )
    except KeyboardInterrupt:  # the trainer saved the run's checkpoint; the bench restarts it
        raise KeyboardInterrupt(
            "stored rows are kept: rerun the same iclgym bench command to continue"
        ) from None
    print(format_summary(summary, name))
    print(f"rows in {args.store}")
    return 1 if summary["failed"] else 0


def _cmd_verify(args: VerifyArgs) -> int:
    from iclgym.bench.verify import format_verdicts, verify_bundle, verify_result

    kinds = predictor_kinds()
    if args.target.isdigit():
        verdicts = [verify_result(args.store, int(args.target), args.device, kinds=kinds)]
    else:
        verdicts = verify_bundle(args.target, args.store, args.device, kinds=kinds)
    print(format_verdicts(verdicts))
    return 0 if all(v.ok for v in verdicts) else 1


def _cmd_leaderboard(args: LeaderboardArgs) -> int:
    from pathlib import Path

    from iclgym.bench.leaderboard import (
        leaderboard_table,
        render_html,
        render_markdown,
        screenshot,
    )

    try:
        rows = leaderboard_table(args.store)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    page = render_html(rows, out / "leaderboard.html")
    (out / "leaderboard.md").write_text(render_markdown(rows) + "\n")
    print(render_markdown(rows))
    print(f"wrote {page} and {out / 'leaderboard.md'} ({len(rows)} model configurations)")
    if args.screenshot:
        print(f"wrote {screenshot(page, args.screenshot)}")
    return 0


def _cmd_export(args: ExportArgs) -> int:
    from iclgym.bench.export import export_parquet

    path = export_parquet(
        args.env_id,
        args.out,
        split=args.split,
        num_sequences=args.num_sequences,
        seed=args.seed,
        spec=parse_overrides(args.set),
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
    )
    print(f"wrote {path} ({args.num_sequences} sequences of {args.env_id}, split {args.split})")
    return 0


# ------------------------------------------------------------------ parsing, errors
_BOX = re.compile(r"[╭╮╰╯│─━┃┏┓┗┛]")


def _one_line(text: str) -> str:
    """The message of tyro's error box as one line: the box's first section, unwrapped."""
    lines = []
    for raw in text.splitlines():
        if "╭" in raw:
            continue  # the top border carries the box title
        if "─" in raw and not _BOX.sub("", raw).strip():
            if lines:
                break  # the separator under the message
            continue
        line = _BOX.sub("", raw).strip()
        if line:
            lines.append(line)
    message = " ".join(lines)
    message = re.sub(r"^Error parsing (--[\w.-]+): ", r"\1: ", message)
    message = re.sub(r"^Error parsing [\w.-]+: ", "", message)
    return message or "invalid command line (see --help)"


def _parse(cls: type, prog: str, argv: Sequence[str], default: Any = None) -> Any:
    """``tyro.cli`` whose errors become one :class:`UsageError` line (help prints as usual)."""
    kwargs = {"prog": prog, "args": list(argv)}
    if default is not None:
        kwargs["default"] = default
    if any(a in ("-h", "--help") for a in argv):
        return tyro.cli(cls, **kwargs)
    captured = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "1000"  # no wrapping inside the box
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(cls, **kwargs)
    except SystemExit as stop:
        if stop.code in (0, None):
            raise
        raise UsageError(_one_line(captured.getvalue())) from None
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


def _recipe_default(argv: Sequence[str], cls: type) -> Any:
    """Defaults filled from ``--recipe NAME`` in ``argv`` (None without one)."""
    name = None
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--recipe="):
            name = arg.split("=", 1)[1]
    if not name:
        return None
    from iclgym.harness import get_recipe

    recipe = get_recipe(name)
    fields = {"recipe": name, "train": recipe.train}
    if "model" in cls.__dataclass_fields__:
        fields["model"] = recipe.model
    return cls(**fields)


def _usage() -> str:
    lines = ["usage: iclgym COMMAND [options] (iclgym COMMAND --help for its options)", ""]
    lines += [f"  {name:9s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``iclgym`` command; returns the exit status (2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    prog = f"iclgym {command}"
    try:
        if command == "list":
            return _cmd_list(_parse(ListArgs, prog, rest))
        if command == "describe":
            return _cmd_describe(_parse(DescribeArgs, prog, rest))
        if command == "eval":
            return _cmd_eval(_parse(EvalArgs, prog, rest))
        if command == "regret":
            return _cmd_regret(_parse(RegretArgs, prog, rest))
        if command == "speed":
            return _cmd_speed(_parse(SpeedArgs, prog, rest))
        if command == "bench":
            return _cmd_bench(_parse(BenchArgs, prog, rest))
        if command == "verify":
            return _cmd_verify(_parse(VerifyArgs, prog, rest))
        if command == "leaderboard":
            return _cmd_leaderboard(_parse(LeaderboardArgs, prog, rest))
        if command == "export":
            return _cmd_export(_parse(ExportArgs, prog, rest))
        if command == "train":
            from iclgym.harness.commands import TrainArgs as cls

            return _cmd_train(_parse(cls, prog, rest, _recipe_default(rest, cls)))
        if command == "sweep":
            from iclgym.harness.commands import SweepArgs as cls

            return _cmd_sweep(_parse(cls, prog, rest, _recipe_default(rest, cls)))
        raise UsageError(f"command {command!r} is invalid: expected one of {', '.join(COMMANDS)}")
    except ValueError as err:  # UsageError included: every bad input is a ValueError
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # training saved its checkpoint first
        print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
