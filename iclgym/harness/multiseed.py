"""Many seeds in one process: independent copies of one model, trained together.

``iclgym train ENV_ID --seeds 0-15`` (or ``0,3,5``), in Python ``train(model, task, config,
RunOptions(seeds=range(16)))``, trains one copy of the model per seed. Copy S is the run of
``--seed S``: its init (stream 5 of S, :func:`~iclgym.harness.model.build_model`), its train
data stream, its batch order, its optimiser state, its own evaluations on the same held-out sets.

**How.** The copies' parameters are stacked (``torch.func.stack_module_state``: a leading copy
axis N on every tensor) and the model runs once per step for all of them through
``torch.func.vmap(torch.func.functional_call(...), randomness="different")`` on (N, B, T)
tokens. The per-copy losses (each copy's mean over its own scored positions) are summed and
back-propagated: the copies share no parameter, so each receives the gradient of its own loss
(the single run's loss function, :func:`~iclgym.harness.train.scored_loss`: cross-entropy,
squared loss of a probability output, or squared error of values).
The built-in optimisers (AdamW, Adam, SGD) act elementwise on the stacked tensors, AdamW's
decoupled weight decay included, with one step count for all copies, so each copy's update is
the one it would get alone; gradient clipping uses each copy's own global norm. Custom optimiser
factories are refused (their step may mix copies, e.g. through a global norm).

**Equality with separate runs.** With dropout 0 every copy equals its single-seed run to float
tolerance (the vectorised kernels sum in another order; ``tests/harness/test_multiseed.py``).
With dropout, every copy draws its own independent masks with the same law under vmap's
``randomness="different"``, from one joint stream (the global torch generator, seeded from all
the seeds, stream 3); they are not the masks its single run draws, so with dropout a copy equals
its separate run in distribution, not sample path by sample path.

**Run folder.** ``OUT`` (default ``runs/ENV_ID-seeds0-15``) holds ``checkpoint.pt`` (the stacked
state: ``--resume`` continues bit for bit), ``train.lock`` and ``seeds.json`` (every seed's
summary, the mean and standard deviation of the final metrics over seeds, the switch steps).
``OUT/seedS`` is seed S's run folder as a single run writes it (``metrics.jsonl`` with the
task's model metrics of that copy, computed from its own parameters loaded into its module,
``summary.json``, ``checkpoint.pt``, ``phases.png``, ``model_metrics.png``): ``iclgym eval
--predictor checkpoint:OUT/seedS`` scores it, and ``--seed S --out OUT/seedS --resume``
continues it alone (with its own dropout stream from then on).

**Limits.** A model must run under ``vmap``: no in-place update of buffers (batch-norm
statistics), no ``.item()`` or data-dependent Python control flow in ``forward``. A dry run
before training checks it (a training-mode forward must leave every buffer as it was; the dry
run restores them) and that the vectorised outputs equal each copy's own; a model that fails
is refused with ``ValueError`` naming the cause before the run folder is touched.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from iclgym.harness.evaluate import HeldOut, evaluate, strict_json
from iclgym.harness.model import (
    CHECKPOINT_FORMAT,
    SEEDS_CHECKPOINT_FORMAT,
    build_model,
    check_model,
    check_training,
    factory_info,
    input_embedding,
    num_parameters,
    output_scores,
)
from iclgym.harness.train import (
    CHECKPOINT,
    DROPOUT_STREAM,
    LOG,
    FiniteData,
    RunOptions,
    StreamData,
    Targets,
    TrainConfig,
    _DeferredInterrupt,
    _save,
    _shown,
    _write_log,
    attention_probes,
    build_optimizer,
    check_finite_loss,
    check_loss,
    check_model_metrics,
    describe_run,
    eval_record,
    eval_sets,
    finish_run,
    format_seeds,
    load_run_state,
    lr_factor,
    model_metrics,
    resume_log,
    run_lock,
    scored_loss,
    torch_threads,
    unseen_rows,
    untrained_report,
)
from iclgym.tasks.base import Task

SEEDS_SUMMARY = "seeds.json"
PROBE_FLOATS = 1 << 25
"""Largest attention-map output (floats) of one vectorised probe forward: the copies are
probed in groups below it (128 MiB)."""


class Copies:
    """N copies of one module as stacked tensors (``params``, ``buffers``: name -> (N, ...)),
    run together through ``torch.func.vmap``. ``models`` keeps one module per copy, filled
    from the stacked tensors on demand (:meth:`module`) for state dicts and hooks."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.models = list(models)
        self.n = len(self.models)
        self.template = self.models[0]
        params, self.buffers = torch.func.stack_module_state(self.models)
        self.params = {name: p.detach().requires_grad_() for name, p in params.items()}

    def __call__(
        self, inputs: Tensor | tuple[Tensor, ...], copies: slice = slice(None), **kwargs: Any
    ) -> Any:
        """The model on every copy of ``copies``: ``inputs`` the tokens, or the tuple
        ``batch.inputs`` (tokens and, for tasks that have them, features), either with a
        leading copy axis (tokens (N, B, T)), one batch per copy, or without ((B, T)), shared
        by all; outputs with a leading copy axis."""
        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        params = {k: v[copies] for k, v in self.params.items()}
        buffers = {k: v[copies] for k, v in self.buffers.items()}
        shared = inputs[0].dim() == 2

        def call(p: dict, b: dict, x: tuple[Tensor, ...]) -> Any:
            return torch.func.functional_call(self.template, (p, b), x, kwargs)

        in_dims = (0, 0, tuple(None if shared else 0 for _ in inputs))
        return torch.func.vmap(call, in_dims=in_dims, randomness="different")(
            params, buffers, inputs
        )

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)

    @torch.no_grad()
    def module(self, n: int) -> nn.Module:
        """Copy ``n`` as a module (its weights copied from the stacked tensors)."""
        model = self.models[n]
        for name, p in model.named_parameters():
            p.copy_(self.params[name][n])
        for name, b in model.named_buffers():
            if name in self.buffers:
                b.copy_(self.buffers[name][n])
        return model

    @torch.no_grad()
    def load(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> None:
        for name, p in self.params.items():
            p.copy_(params[name])
        for name, b in self.buffers.items():
            b.copy_(buffers[name])


def copy_losses(out: Tensor, targets: Sequence[Targets]) -> Tensor:
    """(N,) each copy's mean loss over its own scored positions of (N, B, T, V) or (N, B, T, 1)
    outputs: the per-position losses of :func:`~iclgym.harness.train.scored_loss` (the one
    pure loss of the single run: cross-entropy of logits, the squared loss of probabilities,
    the squared error of values) averaged per copy (copies may score different counts)."""
    copy = torch.cat([torch.full_like(t.rows, n) for n, t in enumerate(targets)])
    rows = torch.cat([t.rows for t in targets])
    cols = torch.cat([t.cols for t in targets])
    selected = out[copy, rows, cols]  # (M, V) or (M, 1): selection, never a product
    joint = Targets(
        rows,
        cols,
        torch.cat([t.tokens for t in targets]),
        None if targets[0].values is None else torch.cat([t.values for t in targets]),
        output=targets[0].output,
        loss=targets[0].loss,
        probs=None if targets[0].probs is None else torch.cat([t.probs for t in targets]),
    )
    per_position = scored_loss(selected, joint, reduction="none")
    counts = torch.tensor([t.rows.numel() for t in targets], device=out.device)
    sums = per_position.new_zeros(len(targets)).index_add_(0, copy, per_position)
    return sums / counts


@torch.no_grad()
def clip_copies(params: Sequence[Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` for each copy on its own: the global norm over a
    copy's slices of the stacked gradients, scale ``max_norm / (norm + 1e-6)`` capped at 1."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()  # (N,)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))


def optimizer_slice(state: dict, n: int, shapes: Sequence[torch.Size]) -> dict:
    """Copy ``n``'s optimiser state from the stacked one (entries with the shape of their
    stacked parameter are sliced, scalars such as Adam's step count are shared): the state
    dict a single run of that seed would have."""
    sliced = {}
    for index, entry in state["state"].items():
        sliced[index] = {
            key: value[n].clone()
            if isinstance(value, Tensor) and value.shape == shapes[index]
            else value
            for key, value in entry.items()
        }
    return {"state": sliced, "param_groups": [dict(g) for g in state["param_groups"]]}


@torch.no_grad()
def _check_vectorised(copies: Copies, task: Task, device: torch.device) -> None:
    """A dry run before training: the vectorised forward (eval mode) equals every copy's own
    output, and a training-mode forward and backward run without changing any buffer (batch-norm
    statistics). ``ValueError`` otherwise; the buffers are restored either way."""
    batch = task.sample(2, generator=task.generator(0, "validation", device), device=device)
    devices = [device] if device.type == "cuda" else []
    saved = {name: b.clone() for name, b in copies.buffers.items()}
    kept = {name: b.clone() for name, b in copies.template.named_buffers()}
    changed: list[str] = []
    with torch.random.fork_rng(devices=devices):
        try:
            copies.train(False)
            out = copies(batch.inputs)
            for n in (0, copies.n - 1):
                own = copies.module(n).eval()(*batch.inputs)
                tolerance = 1e-4 * max(1.0, own.abs().max().item())
                if (out[n] - own).abs().max() > tolerance:
                    raise ValueError(
                        "its vectorised output differs from copy "
                        f"{n}'s own output by {(out[n] - own).abs().max().item():.3g}"
                    )
            copies.train(True)
            with torch.enable_grad():
                params = list(copies.params.values())
                loss = copies(batch.inputs).float().square().mean()
                torch.autograd.grad(loss, params, allow_unused=True)
            changed = [n for n, b in copies.buffers.items() if not _same(b, saved[n])]
            changed += [n for n, b in copies.template.named_buffers() if not _same(b, kept[n])]
        except Exception as err:  # a user's module: report whatever it raised, in one line
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(
                f"model cannot be vectorised over seeds with torch.func.vmap "
                f"({type(err).__name__}: {message[:200]}); train the seeds in separate runs "
                "(--seed)"
            ) from None
        finally:
            copies.train(True)
            for name, b in copies.buffers.items():  # the dry run leaves no trace
                b.copy_(saved[name])
            for name, b in copies.template.named_buffers():
                b.copy_(kept[name])
    if changed:
        raise ValueError(
            f"model cannot train with seeds: its forward updates buffer {changed[0]!r} in "
            "training mode (batch-norm running statistics or another in-place buffer update are "
            "not vectorised over copies); train the seeds in separate runs (--seed)"
        )


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal shapes and values, NaN equal to NaN."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------- training
def train_seeds(
    template: nn.Module,
    task: Task,
    config: TrainConfig,
    run: RunOptions,
    *,
    env_id: str | None = None,
) -> dict[str, Any]:
    """Train one copy of ``template``'s model per seed of ``run.seeds`` (see the module
    docstring) and return the summary of all seeds (also in ``OUT/seeds.json``).

    ``template`` must come from :func:`~iclgym.harness.model.build_model`: its factory and
    arguments build every copy with that seed's init (its own weights are not trained). The
    summary has the keys of a single run's, over seeds: ``final`` and ``final_sd`` are the
    mean and standard deviation of each numeric final metric (``nearest``: the most common
    label), ``switch_step`` the median of the seeds that switched (``switch_steps``: every
    seed's), ``runs`` every seed's own summary. Raises ``ValueError`` before any training for a
    template without a factory, ``config.seed`` set with seeds, a custom optimiser factory, a
    model that cannot be vectorised or that has its own ``training_loss``, and everything
    :func:`~iclgym.harness.train.train` refuses.
    """
    seeds = tuple(run.seeds)
    start = time.perf_counter()
    if config.seed != 0:
        raise ValueError(
            f"seed={config.seed} and seeds={format_seeds(seeds)} are exclusive: give the "
            "training seeds with seeds (--seeds) only"
        )
    if getattr(template, "training_loss", None) is not None:
        raise ValueError(
            f"seeds cannot train a {type(template).__name__}: its training_loss hook is not "
            "vectorised over copies; train one seed per run"
        )
    info = factory_info(template)
    if not info or not info.get("factory"):
        raise ValueError(
            "seeds need a model built by build_model (a factory import path and its "
            "arguments), which builds every copy with its seed's init; got a module without one"
        )
    device, dtype = torch.device(config.device), config.torch_dtype
    configs = [replace(config, seed=s) for s in seeds]
    with torch_threads(config.threads), warnings.catch_warnings():
        # functorch loops over the copies where an op has no batching rule (SDPA on CPU): slower
        # for those ops, the same numbers; the warning would repeat every step
        warnings.filterwarnings("ignore", message="There is a performance drop because we have")
        # 1. Everything that can be wrong is checked before the run folder is touched.
        models = [
            build_model(info["factory"], task, seed=s, **info["args"]).to(
                device=device, dtype=dtype
            )
            for s in seeds
        ]
        check_training(models[0], task)
        checked = check_model(models[0], task, device)
        check_loss(config.loss, checked.output)
        metric_keys = check_model_metrics(task, models[0])
        label_values = None
        if checked.output == "values":
            label_values = task.label_values.to(device=device, dtype=dtype)
        finite = config.data == "finite"
        data = [FiniteData(task, c) if finite else StreamData(task, c) for c in configs]
        copies = Copies(models)
        optimizer = build_optimizer(models[0], config, copies.params)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        metas = [describe_run(task, m, c, env_id) for m, c in zip(models, configs, strict=True)]
        meta = describe_run(task, models[0], config, env_id)
        meta["train_config"]["seeds"] = list(seeds)
        out = Path(run.out or f"runs/{env_id or task.name}-seeds{format_seeds(seeds)}")
        state = load_run_state(out, run, meta, SEEDS_CHECKPOINT_FORMAT)
        _check_vectorised(copies, task, device)
        with contextlib.ExitStack() as locks:  # the seeds' folders too: no single run there
            for folder in (out, *(out / f"seed{s}" for s in seeds)):
                locks.enter_context(run_lock(folder))
            return _run_seeds(
                copies=copies,
                task=task,
                config=config,
                run=run,
                seeds=seeds,
                env_id=env_id,
                data=data,
                optimizer=optimizer,
                label_values=label_values,
                checked=checked,
                metric_keys=metric_keys,
                meta=meta,
                metas=metas,
                info=info,
                out=out,
                start=start,
                state=state,
            )


def _run_seeds(
    *,
    copies: Copies,
    task: Task,
    config: TrainConfig,
    run: RunOptions,
    seeds: tuple[int, ...],
    env_id: str | None,
    data: list[StreamData | FiniteData],
    optimizer: torch.optim.Optimizer,
    label_values: Tensor | None,
    checked: Any,
    metric_keys: list[str],
    meta: dict,
    metas: list[dict],
    info: Mapping[str, Any],
    out: Path,
    start: float,
    state: dict | None,
) -> dict[str, Any]:
    device = torch.device(config.device)
    on_cuda = device.type == "cuda"
    N = len(seeds)
    total_steps = data[0].steps(config)
    output = "probabilities" if checked.output == "probabilities" else "logits"
    folders = [out / f"seed{s}" for s in seeds]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    # 2. The held-out sets, shared by every copy (each copy's own training set when they differ).
    sets = eval_sets(task, config, env_id)
    held: list[dict[str, HeldOut]] = [dict(sets.held) for _ in seeds]
    if isinstance(data[0], FiniteData):
        # drawn from each seed's train stream (train_sequences > 0): one set per copy;
        # else the task's own training set, the same for every copy
        own = config.train_sequences > 0
        for n, d in enumerate(data):
            if own or n == 0:
                batches = d.batches(config.eval_batch_size)
                train_set = HeldOut(task, split="train", batches=batches, env_id=env_id)
            held[n]["train"] = train_set
    frozen = [
        unseen_rows(input_embedding(copies.module(n)), d.seen_tokens) for n, d in enumerate(data)
    ]
    references = sets.references
    oracles = [
        {"name": sets.oracle["name"], "mc_error": {k: h.oracle_mc_error for k, h in h_n.items()}}
        for h_n in held
    ]

    # 3. A fresh start, or the state of the checkpoint.
    step = 0
    sequences, loss_sum, loss_count = [0] * N, [0.0] * N, 0
    if state is not None:
        copies.load(state["params"], state["buffers"])
        optimizer.load_state_dict(state["optimizer"])
        for d, s in zip(data, state["data"], strict=True):
            d.load_state_dict(s)
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, sequences = state["step"], list(state["sequences"])
        loss_sum, loss_count = list(state["loss_sum"]), state["loss_count"]
        records = [resume_log(folder / LOG, step) for folder in folders]
    else:
        torch.manual_seed(_joint_seed(seeds))  # the dropout stream of the copies (CPU and CUDA)
        for n, folder in enumerate(folders):
            header = {
                "type": "start",
                "step": 0,
                "num_parameters": num_parameters(copies.models[n]),
                "model_output": checked.output,
                "model_metrics": metric_keys,
                "total_steps": total_steps,
                "references": references,
                "oracle": oracles[n],
                "seeds": {"seeds": list(seeds), "out": str(out)},
                **metas[n],
            }
            _write_log(folder / LOG, [header], mode="w")
        records = [[] for _ in seeds]
    params = list(copies.params.values())
    shapes = [p.shape for group in optimizer.param_groups for p in group["params"]]

    def checkpoint() -> None:
        optimizer_state = optimizer.state_dict()
        torch_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if on_cuda else None
        for n, folder in enumerate(folders):  # each seed's folder: a single run's checkpoint
            _save(
                folder / CHECKPOINT,
                {
                    "format": CHECKPOINT_FORMAT,
                    "meta": metas[n],
                    "model_factory": dict(info),
                    "model": copies.module(n).state_dict(),
                    "optimizer": optimizer_slice(optimizer_state, n, shapes),
                    "step": step,
                    "sequences": sequences[n],
                    "loss_sum": loss_sum[n],
                    "loss_count": loss_count,
                    "data": data[n].state_dict(),
                    "torch_rng": torch_rng,
                    "cuda_rng": cuda_rng,
                },
            )
        _save(
            out / CHECKPOINT,
            {
                "format": SEEDS_CHECKPOINT_FORMAT,
                "seeds": list(seeds),
                "meta": meta,
                "model_factory": dict(info),
                "params": {k: v.detach() for k, v in copies.params.items()},
                "buffers": dict(copies.buffers),
                "optimizer": optimizer_state,
                "step": step,
                "sequences": sequences,
                "loss_sum": loss_sum,
                "loss_count": loss_count,
                "data": [d.state_dict() for d in data],
                "torch_rng": torch_rng,
                "cuda_rng": cuda_rng,
            },
        )

    def evaluation() -> None:
        nonlocal loss_sum, loss_count
        scores, probes = _vectorised_scores(copies, held, sets.primary, checked.attention, output)
        for n in range(N):
            reports = {
                split: evaluate(_Cached(scores[split][n], h), h) for split, h in held[n].items()
            }
            rec = eval_record(
                step,
                sequences[n],
                loss_sum[n] / loss_count if loss_count else None,
                reports,
                sets.primary,
                probes[n],
                time.perf_counter() - start,
                # each copy's parameters loaded into its own module first
                model_metrics(task, copies.module(n)) if metric_keys else None,
            )
            records[n].append(rec)
            _write_log(folders[n] / LOG, [rec])
        loss_sum, loss_count = [0.0] * N, 0
        bar.set_postfix(_shown(records[0][-1]))

    # 4. The loop.
    first_step = step
    scheduled = config.schedule != "constant" or config.warmup_steps > 0
    copies.train(True)
    with (
        tqdm(total=total_steps, initial=step, disable=not run.progress, unit="step") as bar,
        _DeferredInterrupt() as interrupt,
    ):
        if not records[0]:
            evaluation()
        while step < total_steps and not interrupt.requested:
            if scheduled:
                factor = lr_factor(config, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
            batches = [d.next() for d in data]
            inputs = tuple(
                torch.stack(x) for x in zip(*(b[0] for b in batches), strict=True)
            )  # (N, B, T..)
            targets = [
                Targets.select(t, m, label_values, output, config.loss, laws)
                for _, t, m, laws in batches
            ]
            losses = copy_losses(copies(inputs), targets)
            values = losses.tolist()
            check_finite_loss(values, step + 1, out / CHECKPOINT, seeds)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            if config.grad_clip:
                clip_copies(params, config.grad_clip)
            optimizer.step()
            step += 1
            for n in range(N):
                sequences[n] += inputs[0].shape[1]
                loss_sum[n] += values[n]
            loss_count += 1
            bar.update()
            at_end = step == total_steps
            if (config.eval_every and step % config.eval_every == 0) or at_end:
                evaluation()
            if step % run.checkpoint_every == 0 or at_end:
                checkpoint()
        if interrupt.requested:  # no off-schedule evaluation: resuming must equal one run
            checkpoint()
    if on_cuda:
        torch.cuda.synchronize(device)

    # 5. The summaries: one per seed, in its folder, and the seeds' in OUT/seeds.json.
    wall = time.perf_counter() - start
    peak = _peak_rss_mib()
    runs = []
    for n, s in enumerate(seeds):
        model = copies.module(n)
        summary: dict[str, Any] = {
            "type": "summary",
            "step": step,
            "sequences": sequences[n],
            "interrupted": interrupt.requested,
            "out": str(folders[n]),
            "checkpoint": str(folders[n] / CHECKPOINT),
            "num_parameters": num_parameters(model),
            "model_output": checked.output,
            "model_metrics": metric_keys,
            "final": records[n][-1],
            "references": references,
            "oracle": oracles[n],
            "untrained_rows": untrained_report(frozen[n], input_embedding(model)),
            "wall_s": wall,
            "steps_per_s": (step - first_step) / wall,
            "peak_rss_mib": peak,
            "seeds": {"seeds": list(seeds), "out": str(out)},
        }
        title = (
            f"{env_id or task.name}: vocabulary {task.vocab_size}, T={task.seq_len}, seed {s} "
            f"(of {format_seeds(seeds)})"
        )
        runs.append(
            finish_run(
                summary,
                records[n],
                out=folders[n],
                plot=run.plot,
                title=title,
                metric_keys=metric_keys,
            )
        )
    summary = seeds_summary(runs, seeds, out=out, wall=wall, steps=step - first_step)
    (out / SEEDS_SUMMARY).write_text(_json(summary))
    if interrupt.requested:
        raise KeyboardInterrupt(
            f"interrupted at step {step}; checkpoint saved to {out / CHECKPOINT}, continue "
            "with --resume"
        )
    return summary


def seeds_summary(
    runs: list[dict], seeds: tuple[int, ...], *, out: Path, wall: float, steps: int
) -> dict[str, Any]:
    """The summary of a multi-seed run from every seed's summary (see :func:`train_seeds`)."""
    finals = [r["final"] for r in runs]
    mean, sd = {}, {}
    for key, value in finals[0].items():
        if key in ("type", "step", "sequences", "elapsed_s"):
            mean[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            column = [f[key] for f in finals]
            if all(isinstance(v, (int, float)) for v in column):
                mean[key] = statistics.fmean(column)
                sd[key] = statistics.stdev(column) if len(column) > 1 else 0.0
        elif isinstance(value, dict):
            mean[key] = {k: statistics.fmean(f[key][k] for f in finals) for k in value}
        elif key == "nearest":
            mean[key] = Counter(f[key] for f in finals).most_common(1)[0][0]
    switches = [r.get("switch_step") for r in runs]
    switched = [s for s in switches if s is not None]
    untrained = [r["untrained_rows"] for r in runs]
    first = runs[0]
    return {
        "type": "seeds",
        "seeds": list(seeds),
        "step": first["step"],
        "interrupted": first["interrupted"],
        "out": str(out),
        "checkpoint": str(out / CHECKPOINT),
        "num_parameters": first["num_parameters"],
        "model_output": first["model_output"],
        "model_metrics": first["model_metrics"],
        "final": mean,
        "final_sd": sd,
        "references": first["references"],
        "oracle": first["oracle"],
        "switch_step": statistics.median_low(switched) if switched else None,
        "switch_steps": switches,
        "phases": [],
        "untrained_rows": None
        if untrained[0] is None
        else {"rows": untrained[0]["rows"], "unchanged": all(u["unchanged"] for u in untrained)},
        "wall_s": wall,
        "steps_per_s": steps / wall,
        "seed_steps_per_s": steps * len(seeds) / wall,
        "peak_rss_mib": first["peak_rss_mib"],
        "runs": runs,
    }


class _Cached:
    """A predictor returning precomputed scores of one copy, part by part of a held-out set:
    kept at the scored positions only, put back into a (B, T, V) tensor on demand."""

    def __init__(self, parts: list[Tensor], held: HeldOut) -> None:
        self.parts = {id(p.batch): (p, s) for p, s in zip(held.parts, parts, strict=True)}

    def predict(self, batch) -> Tensor:
        part, selected = self.parts[id(batch)]
        B, T = batch.tokens.shape
        full = selected.new_zeros(B, T, selected.shape[-1])
        full[part.rows, part.cols] = selected
        return full


@torch.no_grad()
def _vectorised_scores(
    copies: Copies,
    held: list[dict[str, HeldOut]],
    primary: str,
    attention: bool,
    output: str = "logits",
) -> tuple[dict[str, list[list[Tensor]]], list[dict[str, float]]]:
    """Every copy's scores on every held-out batch (one vectorised forward per batch, kept at
    the scored positions, read as ``output``: :func:`~iclgym.harness.model.output_scores`) and
    every copy's attention probes on the probe batch."""
    N = copies.n
    scores: dict[str, list[list[Tensor]]] = {split: [[] for _ in range(N)] for split in held[0]}
    probes: list[dict[str, float]] = [{} for _ in range(N)]
    copies.train(False)
    try:
        for split in held[0]:
            sets = [h[split] for h in held]
            shared = all(s is sets[0] for s in sets)
            for j, part in enumerate(sets[0].parts):
                parts = [s.parts[j] for s in sets]
                inputs = (
                    part.batch.inputs
                    if shared
                    else tuple(
                        torch.stack(x) for x in zip(*(p.batch.inputs for p in parts), strict=True)
                    )
                )
                if attention and split == primary and j == 0:
                    out = _probing_forward(copies, part.batch.inputs, probes)
                else:
                    out = copies(inputs)
                for n, p in enumerate(parts):
                    selected = out[n][p.rows, p.cols]  # (scored positions, V or 1)
                    scores[split][n].append(output_scores(selected, p.batch.vocab_size, output))
    finally:
        copies.train(True)
    return scores, probes


def _probing_forward(
    copies: Copies, inputs: tuple[Tensor, ...], probes: list[dict[str, float]]
) -> Tensor:
    """Every copy's output on the shared ``inputs`` (``batch.inputs``; (N, B, T, V) out) and,
    from the same forward passes, its :func:`~iclgym.harness.train.attention_probes` into
    ``probes``; the copies run in groups whose attention maps stay under :data:`PROBE_FLOATS`."""
    tokens = inputs[0]
    _, maps = copies.template(*(x[:1] for x in inputs), return_attention=True)
    per_copy = tokens.shape[0] * sum(a.numel() for a in maps if a is not None)
    group = max(1, PROBE_FLOATS // max(1, per_copy))
    outputs = []
    for first in range(0, copies.n, group):
        out, attention = copies(inputs, slice(first, first + group), return_attention=True)
        outputs.append(out)
        for i in range(out.shape[0]):
            layers = [a[i] if a is not None else None for a in attention]
            probes[first + i] = attention_probes(layers, tokens)
    return torch.cat(outputs)


def _joint_seed(seeds: tuple[int, ...]) -> int:
    """The seed of the copies' joint dropout stream: stream 3 with the seed list as entropy."""
    state = np.random.SeedSequence(list(seeds), spawn_key=(DROPOUT_STREAM,)).generate_state(1)
    return int(state[0])


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _json(obj: Any) -> str:
    return strict_json(obj, indent=2, default=str)


__all__ = [
    "Copies",
    "clip_copies",
    "copy_losses",
    "optimizer_slice",
    "seeds_summary",
    "train_seeds",
]
