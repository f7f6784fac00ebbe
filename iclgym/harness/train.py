"""One trainer for every task and any model: ``train(model, task, config, run)``.

Read it top to bottom (nanoGPT style): :class:`TrainConfig` (everything that determines the
trajectory), :class:`RunOptions` (where it is written and how it is shown), the loss
(:func:`loss_of_output`, a pure function of a model output and the scored targets), the two
data regimes, the optimisers, then :func:`train` itself. Paper protocols are recipes
(:mod:`iclgym.harness.recipes`): values of these two dataclasses, not code paths.

- **Model**: any module of the contract in :mod:`iclgym.harness.model`, checked before training
  (output shape, causality probe where the task scores several positions).
- **Data**: ``stream`` draws a fresh batch from the task's train seed stream every step (Edelman
  et al. 2024); ``finite`` draws one fixed training set (``train_sequences`` sequences of the
  train stream, or the task's own ``task.train_set()`` when 0) and reshuffles it every epoch,
  batches of ``min(N, batch_size)``, ``epochs * ceil(N / batch)`` steps (Boix-Adserà et al.
  2024).
- **Loss**: from the task and the model's output kind, on the positions of ``loss_mask``
  selected (never multiplied): cross-entropy of (B, T, V) logits, the squared loss
  ``1/2 ||f - e_y||^2`` of a declared (B, T, V) probability output (``iclgym_output =
  "probabilities"``), or the mean squared error of (B, T, 1) values against
  ``task.label_values[targets]`` (:func:`scored_loss`).
- **Optimiser**: ``adamw`` (fused), ``adam``, ``sgd`` or an import path to a factory
  ``factory(model, config, **optimizer_args) -> torch.optim.Optimizer``: the hook for custom
  steps (a preconditioned proximal step, normalised gradient descent, ...). Its ``step()`` is
  called once per batch after ``backward()`` (and gradient clipping); its ``state_dict`` is
  checkpointed, so resume stays exact. Constant or warm-up + cosine learning rate (the factor
  multiplies every group's initial lr), optional gradient clipping.
- **Evaluation** every ``eval_every`` steps through the same :func:`iclgym.harness.evaluate`
  as ``iclgym eval``, on fixed held-out sets (:class:`~iclgym.harness.evaluate.HeldOut`: data,
  oracle and strategies computed once), one per split of ``eval_splits`` and, in the finite
  regime, the training set itself; attention probes when the model exposes attention; the
  task's model metrics (``task.model_metrics(model)``, the optional hook: e.g. exact
  population excess and parameter distances) in every evaluation record; phases and the phase
  diagram at the end, and the learning curves of the model metrics when the task has any.
- **Run folder** (``run.out``): ``metrics.jsonl`` (one JSON record per line), ``summary.json``,
  ``checkpoint.pt`` (model, optimiser, data and dropout random streams, step; written every
  ``checkpoint_every`` steps, at the end and on Ctrl-C), ``phases.png`` and ``train.lock``: a
  second process training into the same folder is refused while the first runs. ``resume``
  continues bit for bit as if the run had never stopped. ``model_metrics.png`` holds the
  model metrics against training sequences when the task returns any. The first Ctrl-C
  finishes the current step, saves (no off-schedule evaluation, so a resumed run's log and
  summary equal an uninterrupted one's) and raises ``KeyboardInterrupt``; a second one
  interrupts at once.

Random streams of ``config.seed`` (:func:`iclgym.tasks.base.stream_seed`): 0 the train data,
3 dropout (the global torch state), 5 the model init (:func:`iclgym.harness.model.build_model`),
6 the batch order of the finite regime.

**Many seeds.** ``RunOptions.seeds`` (``--seeds 0-15``) trains one copy per seed in this
process, vectorised over the copies (:mod:`iclgym.harness.multiseed`): copy S is the run of
``seed=S``, written to ``OUT/seedS``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from iclgym.harness.evaluate import HeldOut, Report, evaluate, strict_json
from iclgym.harness.model import (
    CHECKPOINT_FORMAT,
    ModelPredictor,
    check_device,
    check_model,
    check_training,
    decay_parameters,
    factory_info,
    import_object,
    input_embedding,
    load_checkpoint,
    num_parameters,
    output_scores,
)
from iclgym.harness.phases import finite_records, phase_report
from iclgym.harness.plots import plot_metrics, plot_run
from iclgym.harness.probes import induction_score, previous_token_score
from iclgym.tasks.base import SPLITS, Batch, Task, canonical_split, stream_seed, torch_threads
from iclgym.validation import as_float, as_int, parse_value

CHECKPOINT, LOG, SUMMARY, PLOT, METRICS_PLOT, LOCK = (
    "checkpoint.pt",
    "metrics.jsonl",
    "summary.json",
    "phases.png",
    "model_metrics.png",
    "train.lock",
)
OPTIMIZERS = ("adamw", "adam", "sgd")
DROPOUT_STREAM, ORDER_STREAM = len(SPLITS), 6
SPLIT_PREFIX = {"train": "train", "validation": "val", "test": "test"}
SPLIT_METRICS = ("loss", "excess_loss", "kl", "kl_last", "accuracy", "mse", "value_accuracy")
RECORD_KEYS = frozenset(
    {
        "type",
        "step",
        "sequences",
        "batch_loss",
        "elapsed_s",
        "kl_last_se",
        "strategy_kl_last",
        "nearest",
        "prev_token_score",
        "induction_score",
        *SPLIT_METRICS,
    }
)
"""The trainer's own keys of an ``eval`` record (and the prefixes of SPLIT_PREFIX): a task's
model metric may not use them (:func:`check_model_metrics`)."""


# ------------------------------------------------------------------------------ config
LOSSES = ("auto", "cross_entropy", "squared", "lsq2")
"""Training losses (:attr:`TrainConfig.loss`, :func:`scored_loss`)."""
LABELS = ("sampled", "soft", "hard")
"""Training labels (:attr:`TrainConfig.labels`; the label switch in ``docs/harness.md``)."""


def check_loss(loss: str, output: str) -> None:
    """``ValueError`` for a training loss the model's output cannot take: a value model
    (``output="values"``) trains its squared error only (``loss="auto"``)."""
    if output == "values" and loss != "auto":
        raise ValueError(
            f"loss={loss!r} is invalid for a value model (a (B, T, 1) output): its loss is the "
            "squared error of the label value, loss='auto'"
        )


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training trajectory (a resumed run must keep it; steps and
    epochs may grow under a constant learning rate). Every field is a flag of iclgym train
    and iclgym sweep."""

    data: Literal["stream", "finite"] = "stream"
    """stream: a fresh batch every step; finite: a fixed training set, reshuffled every epoch."""
    steps: int = 2000
    """Optimisation steps (stream regime)."""
    epochs: int = 1000
    """Passes over the fixed training set (finite regime)."""
    train_sequences: int = 0
    """Size N of the fixed training set, drawn from the train stream (finite regime); 0 = the
    task's own training set (task.train_set(), e.g. n strings over n template symbols)."""
    batch_size: int = 64
    """Sequences per step (finite regime: min(N, batch_size))."""
    optimizer: str = "adamw"
    """adamw | adam | sgd | an import path package.module:factory, called as
    factory(model, config, **optimizer_args) and returning a torch.optim.Optimizer."""
    optimizer_args: tuple[str, ...] = ()
    """KEY=VALUE keyword arguments (Python literals) of a custom optimiser factory."""
    lr: float = 5e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam(W) betas."""
    momentum: float = 0.0
    """SGD momentum."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) or L2 (Adam, SGD) weight decay on the model's decayed parameters
    (default split: nn.Linear weights; embeddings and norms are never decayed)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after the warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps from lr / warmup_steps to lr."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    grad_clip: float = 0.0
    """Clip the gradient's global norm to this value (0 = no clipping)."""
    loss: Literal["auto", "cross_entropy", "squared", "lsq2"] = "auto"
    """Training loss at the scored positions (:func:`scored_loss`): auto = by the model's
    output (cross-entropy of logits, the squared loss of a probability output, the squared
    error of a value model); cross_entropy ``-log p_y``; squared ``1/2 ||p - e_y||^2``; lsq2
    ``(1 - p_y)^2`` (Li et al. 2024, arXiv 2403.08081). p = softmax of logits,
    or a probability output f as given (cross_entropy: clipped at 1e-6 and renormalised, as
    evaluate reads it). Value models take auto only."""
    labels: Literal["sampled", "soft", "hard"] = "sampled"
    """What each scored position is trained towards (the DPT label switch, after Lee et al.
    2023, arXiv 2306.14892): sampled, the realised next token (plain next-token training);
    soft, the true law it was drawn from (``batch.true_probs``, privileged: the loss is the
    expectation of the sampled one under that law, whose population minimiser is the same
    posterior predictive, with less label variance); hard, the argmax of the true law (the
    lowest token on a tie), faithful DPT's optimal-action label. Evaluation always scores
    the realised tokens."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating-point type of the model's parameters and outputs."""
    device: str = "cpu"
    """Torch device of the model and the batches (cpu, cuda, cuda:1, ...)."""
    threads: int = 1
    """Torch CPU threads during the run (0 = leave torch's setting). 1 by default: one core per
    run on a shared machine; 2 were 1.2-1.4x faster only with the second core idle
    (docs/harness.md)."""
    seed: int = 0
    """Seeds the train data, dropout, the finite batch order (and the init of models built by
    name)."""
    eval_every: int = 25
    """Steps between evaluations (0 = only at the start and the end)."""
    eval_sequences: int = 1024
    """Sequences of each held-out split."""
    eval_batch_size: int = 256
    """Sequences per evaluation batch; the probes read the first batch."""
    eval_seed: int = 0
    """Seed of the held-out sets (the same sets for every training seed)."""
    eval_splits: tuple[str, ...] = ("validation",)
    """Held-out splits scored at every evaluation: validation, test, or the task's named
    held-out splits (``task.named_splits``, e.g. ood_switched); the first is the primary one
    (its metrics are logged unprefixed, the others as val_*, test_*, or NAME_* for a named
    split)."""

    def __post_init__(self) -> None:
        for name in ("steps", "epochs", "batch_size", "eval_sequences", "eval_batch_size"):
            as_int(name, getattr(self, name), 1)
        for name in ("train_sequences", "warmup_steps", "threads", "seed", "eval_every"):
            as_int(name, getattr(self, name), 0)
        as_int("eval_seed", self.eval_seed, 0)
        as_float("lr", self.lr, 0.0, low_open=True)
        as_float("min_lr", self.min_lr, 0.0, self.lr)
        as_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        as_float("weight_decay", self.weight_decay, 0.0)
        as_float("grad_clip", self.grad_clip, 0.0)
        object.__setattr__(self, "betas", tuple(self.betas))
        if len(self.betas) != 2 or not all(
            isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas
        ):
            raise ValueError(f"betas={self.betas!r} is invalid: expected two floats in [0, 1)")
        choices = {
            "data": ("stream", "finite"),
            "loss": LOSSES,
            "labels": LABELS,
            "schedule": ("constant", "cosine"),
            "dtype": ("float32", "float64"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is invalid: expected one of {valid}"
                )
        if self.optimizer not in OPTIMIZERS and ":" not in self.optimizer:
            raise ValueError(
                f"optimizer={self.optimizer!r} is invalid: expected one of {', '.join(OPTIMIZERS)}"
                " or an import path 'package.module:factory'"
            )
        object.__setattr__(self, "eval_splits", tuple(map(canonical_split, self.eval_splits)))
        if not self.eval_splits or any(
            not isinstance(s, str) or s == "train" or not s for s in self.eval_splits
        ):
            raise ValueError(
                f"eval_splits={self.eval_splits!r} is invalid: expected one or more of "
                f"{SPLITS[1:]} or the task's named splits"
            )
        parse_assignments(self.optimizer_args, "optimizer_args")
        check_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


@dataclass(frozen=True)
class RunOptions:
    """Where a run is written and how it is shown (none of it changes the trajectory)."""

    out: str = ""
    """Run folder (default runs/ENV_ID-seedSEED)."""
    resume: bool = False
    """Continue the run in the folder from its checkpoint."""
    checkpoint_every: int = 250
    """Steps between checkpoints (also written at the end and on Ctrl-C)."""
    progress: bool = True
    """Show a progress bar."""
    plot: bool = True
    """Write the phase diagram (models with log-prob outputs) and the learning curves of the
    task's model metrics (tasks that have some) at the end."""
    seeds: tuple[int | str, ...] = ()
    """Train one independent copy per seed in this process, vectorised over the copies (e.g.
    0-15, 0,3,5 or 0 3 5): each copy is the run of --seed S (its own init, data, dropout and
    optimiser state), written to OUT/seedS. Empty: the one run of --seed."""

    def __post_init__(self) -> None:
        as_int("checkpoint_every", self.checkpoint_every, 1)
        seeds = self.seeds if isinstance(self.seeds, (int, str)) else list(self.seeds)
        object.__setattr__(self, "seeds", parse_seeds(seeds) if seeds != [] else ())


def parse_seeds(value: Any) -> tuple[int, ...]:
    """Seeds from an int, a string of comma-separated seeds and inclusive ranges (``"0-15"``,
    ``"0,3,5"``, ``"0-3,8"``) or an iterable of those, in the given order. ``ValueError``
    naming ``seeds`` for anything else, a negative seed, an empty list or a repeated seed."""
    items = [value] if isinstance(value, (int, str)) else list(value)
    seeds: list[int] = []
    for item in items:
        parts = str(item).split(",") if isinstance(item, str) else [item]
        for part in parts:
            if isinstance(part, str):
                low, sep, high = part.strip().partition("-")
                if not (low.isdigit() and (not sep or high.isdigit())):
                    raise ValueError(
                        f"seeds={value!r} is invalid: expected seeds >= 0 as integers, "
                        "comma-separated lists or inclusive ranges (0-15, 0,3,5)"
                    )
                first, last = int(low), int(high) if sep else int(low)
                if last < first:
                    raise ValueError(f"seeds={value!r} is invalid: range {part!r} is empty")
                seeds.extend(range(first, last + 1))
            else:
                seeds.append(as_int("seeds", part, 0))
    if not seeds:
        raise ValueError(f"seeds={value!r} is invalid: expected at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={value!r} is invalid: a seed is repeated")
    return tuple(seeds)


def format_seeds(seeds: tuple[int, ...]) -> str:
    """Seeds as a short string: runs of consecutive seeds as ranges (``0-15``, ``0,3,5``)."""
    parts, start = [], 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            a, b = seeds[start], seeds[i - 1]
            parts.append(f"{a}-{b}" if b > a + 1 else ",".join(map(str, range(a, b + 1))))
            start = i
    return ",".join(parts)


def parse_assignments(items: tuple[str, ...] | list[str], name: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict, each value read by :func:`iclgym.validation.parse_value`.
    ``ValueError`` naming ``name`` and the item for a string without ``=``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{name} expects KEY=VALUE items (e.g. depth=2), got {item!r}")
        out[key] = parse_value(raw)
    return out


# -------------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class Targets:
    """The scored positions of a batch, selected once outside the model call: the loss reads
    the model output at ``(rows, cols)`` only. The multi-seed engine concatenates them over
    copies (:func:`iclgym.harness.multiseed.copy_losses`)."""

    rows: Tensor
    """(N,) int64 sequence index of each scored position."""
    cols: Tensor
    """(N,) int64 position index."""
    tokens: Tensor
    """(N,) int64 target token ids."""
    values: Tensor | None = None
    """(N,) float real labels ``task.label_values[tokens]`` (value models only)."""
    dense: bool = False
    """Every position is scored (``rows, cols`` enumerate (B, T) row by row): the selection is a
    reshape of the output, the same values without a gather."""
    output: Literal["logits", "probabilities"] = "logits"
    """What a (B, T, V) model output is (the model's ``iclgym_output``): logits (cross-entropy)
    or probabilities (squared loss against the one-hot target)."""
    loss: str = "auto"
    """The training loss (:attr:`TrainConfig.loss`; auto: by ``output``)."""
    probs: Tensor | None = None
    """(N, V) the true law at each scored position (``labels="soft"``): the loss is then the
    expectation of the sampled loss under it (squared: ``1/2 ||p - probs||^2``, the same
    gradient); None trains towards ``tokens``."""

    @classmethod
    def select(
        cls,
        targets: Tensor,
        loss_mask: Tensor,
        label_values: Tensor | None = None,
        output: Literal["logits", "probabilities"] = "logits",
        loss: str = "auto",
        laws: Tensor | None = None,
    ) -> Targets:
        """From (B, T) ``targets`` and (B, T) bool ``loss_mask``; ``label_values`` (V,) for a
        value model; ``output`` the kind of a (B, T, V) output; ``loss`` the training loss;
        ``laws`` (B, T, V) the true laws for soft labels (a value model then trains towards
        the law's mean value)."""
        rows, cols = loss_mask.nonzero(as_tuple=True)
        tokens = targets[rows, cols]
        probs = None if laws is None else laws[rows, cols]
        if label_values is None:
            values = None
        elif probs is None:
            values = label_values[tokens]
        else:
            values, probs = probs.to(label_values.dtype) @ label_values, None
        dense = rows.numel() == loss_mask.numel()
        return cls(rows, cols, tokens, values, dense=dense, output=output, loss=loss, probs=probs)


def scored_loss(selected: Tensor, targets: Targets, reduction: str = "mean") -> Tensor:
    """The loss of a model output at the scored positions, ``selected`` (N, V) or (N, 1) in the
    order of ``targets``: (N,) per position (``reduction="none"``) or their mean.

    - logits: the cross-entropy ``-log softmax(selected)[y]``;
    - probabilities: ``1/2 sum_v (f_v - 1[v = y])^2``, the squared loss of Ren, Wang, Lee 2024
      (``1/2 E||e_{x_o} - f(X)||^2``, summed over the vocabulary, halved, its gradients batch means
      over the samples);
    - values (``targets.values`` given): ``(selected - value)^2``;

    or, by ``targets.loss`` (:attr:`TrainConfig.loss`), on the predicted law p (softmax of
    logits; a probability output as given): ``cross_entropy`` ``-log p_y`` (a probability
    output clipped at :data:`~iclgym.harness.model.PROBABILITY_FLOOR` and renormalised, as
    evaluation reads it), ``squared`` ``1/2 ||p - e_y||^2``, ``lsq2`` ``(1 - p_y)^2`` (the
    non-convex local-convergence loss of Li et al. 2024).

    Pure (no state, no randomness), so ``vmap`` can map it over stacked copies; the single run
    (:func:`loss_of_output`) and the vectorised copies
    (:func:`iclgym.harness.multiseed.copy_losses`) both compute their losses here."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r} is invalid: expected 'mean' or 'none'")
    if targets.values is not None:
        return F.mse_loss(selected[:, 0], targets.values.to(selected.dtype), reduction=reduction)
    probabilities = targets.output == "probabilities"
    loss = targets.loss
    if loss == "auto":
        loss = "squared" if probabilities else "cross_entropy"
    soft = None if targets.probs is None else targets.probs.to(selected.dtype)
    if loss == "cross_entropy":
        scores = output_scores(selected, selected.shape[-1], targets.output)
        if soft is None:
            per_position = F.nll_loss(scores, targets.tokens, reduction="none")
        else:  # E_{y ~ probs} -log p_y; 0 * log 0 counts as 0
            per_position = -(soft * scores.clamp_min(torch.finfo(scores.dtype).min)).sum(-1)
    else:
        p = selected if probabilities else selected.softmax(-1)
        if loss == "squared":
            if soft is None:  # one-hot by scatter: no data-dependent shape (vmap)
                soft = torch.zeros_like(p).scatter(1, targets.tokens[:, None], 1.0)
            per_position = 0.5 * (p - soft).pow(2).sum(-1)
        elif loss == "lsq2":
            if soft is None:
                per_position = (1.0 - p.gather(1, targets.tokens[:, None])[:, 0]).pow(2)
            else:
                per_position = (soft * (1.0 - p).pow(2)).sum(-1)
        else:
            raise ValueError(f"loss={loss!r} is invalid: expected one of {LOSSES}")
    return per_position.mean() if reduction == "mean" else per_position


def loss_of_output(output: Tensor, targets: Targets) -> Tensor:
    """Mean loss over the scored positions of a model output (B, T, V) or (B, T, 1)
    (:func:`scored_loss`: cross-entropy of logits, the squared loss of a probability output, or
    the squared error of values against ``targets.values``). A pure function (no state, no
    randomness): ``torch.func.functional_call`` + ``vmap`` can map it over stacked copies of a
    model."""
    if targets.dense:  # every position scored: the same rows in the same order
        selected = output.reshape(-1, output.shape[-1])
    else:  # (N, V) or (N, 1): selection, never a product
        selected = output[targets.rows, targets.cols]
    return scored_loss(selected, targets)


def model_loss(model: nn.Module, inputs: tuple[Tensor, ...], targets: Targets) -> Tensor:
    """:func:`loss_of_output` of ``model(*inputs)`` (``inputs`` = ``batch.inputs``: the
    tokens, and the features of a task that has them), or the model's own
    ``training_loss(inputs, targets)`` where it defines one (the optional hook of
    :mod:`iclgym.harness.model`)."""
    custom = getattr(model, "training_loss", None)
    if custom is not None:
        return custom(inputs, targets)
    return loss_of_output(model(*inputs), targets)


# -------------------------------------------------------------------------------- data
def training_labels(batch: Batch, labels: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(targets, loss_mask, laws)`` a batch trains towards under :attr:`TrainConfig.labels`:
    the realised tokens (``sampled``: laws None); the argmax of ``batch.true_probs`` (B, T),
    the lowest token on a tie (``hard``); or the realised tokens and ``batch.true_probs``
    (B, T, V) (``soft``)."""
    if labels == "sampled":
        return batch.targets, batch.loss_mask, None
    laws = batch.true_probs
    if labels == "hard":  # torch.argmax returns the first maximal index
        return laws.argmax(-1), batch.loss_mask, None
    return batch.targets, batch.loss_mask, laws


class StreamData:
    """A fresh batch of the task's train split every step (generator of ``config.seed``)."""

    def __init__(self, task: Task, config: TrainConfig) -> None:
        self.task, self.size, self.device = task, config.batch_size, torch.device(config.device)
        self.generator = task.generator(config.seed, "train", config.device)
        self.seen_tokens: Tensor | None = None  # every token may appear: nothing to check
        self.labels = config.labels

    def steps(self, config: TrainConfig) -> int:
        return config.steps

    def next(self) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor | None]:
        """``(inputs, targets, loss_mask, laws)`` of a fresh batch (inputs = ``batch.inputs``;
        :func:`training_labels`)."""
        batch = self.task.sample(self.size, generator=self.generator, device=self.device)
        return (batch.inputs, *training_labels(batch, self.labels))

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["rng"])


class FiniteData:
    """One fixed training set, drawn on the CPU (the same sequences on every device) and
    reshuffled every epoch with the order stream of ``config.seed``."""

    def __init__(self, task: Task, config: TrainConfig) -> None:
        if config.train_sequences:
            gen = task.generator(config.seed, "train")
            data = task.sample(config.train_sequences, generator=gen, device="cpu")
        elif callable(getattr(task, "train_set", None)):
            data = task.train_set()
        else:
            raise ValueError(
                f"data='finite' with train_sequences=0 needs a task with its own training set "
                f"(task.train_set()); {type(task).__name__} has none: set train_sequences >= 1"
            )
        self.device = torch.device(config.device)
        self.data = data.to(self.device)
        self.n = data.batch_size
        self.size = min(self.n, config.batch_size)
        self.generator = torch.Generator().manual_seed(stream_seed(config.seed, ORDER_STREAM))
        self.order = torch.arange(self.n, device=self.device)
        self.position = self.n  # the first call draws the first epoch's order
        self.seen_tokens = data.tokens.unique()
        self.targets, self.mask, self.laws = training_labels(self.data, config.labels)

    def steps(self, config: TrainConfig) -> int:
        return config.epochs * math.ceil(self.n / self.size)

    def next(self) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor | None]:
        """``(inputs, targets, loss_mask, laws)`` of the next shuffled rows."""
        if self.position >= self.n:
            self.order = torch.randperm(self.n, generator=self.generator).to(self.device)
            self.position = 0
        rows = self.order[self.position : self.position + self.size]
        self.position += self.size
        inputs = tuple(x[rows] for x in self.data.inputs)
        laws = None if self.laws is None else self.laws[rows]
        return inputs, self.targets[rows], self.mask[rows], laws

    def batches(self, size: int) -> list:
        """The training set in order, in batches of ``size`` (its held-out view)."""
        d = self.data
        return [
            replace(
                d,
                tokens=d.tokens[i : i + size],
                targets=d.targets[i : i + size],
                loss_mask=d.loss_mask[i : i + size],
                params={k: v[i : i + size] for k, v in d.params.items()},
                features=None if d.features is None else d.features[i : i + size],
            )
            for i in range(0, self.n, size)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["rng"])
        self.order = state["order"].to(self.device)
        self.position = state["position"]


# --------------------------------------------------------------------------- optimiser
def build_optimizer(
    model: nn.Module, config: TrainConfig, parameters: Mapping[str, Tensor] | None = None
) -> torch.optim.Optimizer:
    """The optimiser of ``config.optimizer`` over ``model``'s parameters (see the module
    docstring); ``ValueError`` for an import path that does not resolve or a factory that does
    not return a ``torch.optim.Optimizer``.

    ``parameters`` (name -> tensor, the names of ``model.named_parameters()``) replaces the
    module's parameters, in the same groups and order: stacked copies of a vectorised run
    (:mod:`iclgym.harness.multiseed`). The built-in optimisers act elementwise (AdamW's decay
    too) with one step count for all copies, so every copy gets the update it would get alone;
    a custom factory's step may mix copies (e.g. a global norm) and raises ``ValueError``."""
    if parameters is not None and ":" in config.optimizer:
        raise ValueError(
            f"optimizer={config.optimizer!r}: a custom optimiser factory cannot be vectorised "
            "over seeds (its step may mix the copies, e.g. through a global norm); train the "
            "seeds in separate runs (--seed) or use adamw, adam or sgd"
        )
    if ":" in config.optimizer:
        factory = import_object(config.optimizer, "optimizer")
        kwargs = parse_assignments(config.optimizer_args, "optimizer_args")
        optimizer = factory(model, config, **kwargs)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer factory {config.optimizer!r} returned {type(optimizer).__name__}, "
                "expected a torch.optim.Optimizer"
            )
        return optimizer
    if config.optimizer_args:
        raise ValueError(
            f"optimizer_args={config.optimizer_args!r} is invalid for optimizer="
            f"{config.optimizer!r}: they are for an import-path optimiser factory"
        )
    names = {id(p): name for name, p in model.named_parameters()}

    def tensors(group: list[nn.Parameter]) -> list[Tensor]:
        return list(group) if parameters is None else [parameters[names[id(p)]] for p in group]

    if config.weight_decay > 0:
        decay, rest = decay_parameters(model)
        groups = [
            {"params": tensors(decay), "weight_decay": config.weight_decay},
            {"params": tensors(rest), "weight_decay": 0.0},
        ]
        params: Any = [g for g in groups if g["params"]]
    else:
        params = tensors(list(model.parameters()))
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, fused=True)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def lr_factor(config: TrainConfig, step: int, total: int) -> float:
    """Multiplier of the initial learning rates at (0-based) ``step`` of ``total``: linear
    warm-up over ``warmup_steps``, then 1 (constant) or a half cosine down to ``min_lr / lr``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    floor = config.min_lr / config.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------ run plumbing
class _DeferredInterrupt:
    """While active, the first SIGINT only sets ``requested`` (the loop stops at the next step
    boundary); a second one raises ``KeyboardInterrupt`` at once. Only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder/train.lock`` (``fcntl.flock``, released by the OS
    even if the process dies); ``ValueError`` if another process holds it."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"run folder {str(folder)!r} is in use by another training process (lock "
            f"{str(path)!r}): wait for it to finish or choose another --out"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _normalise(obj: Any) -> Any:
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(obj, default=str))


def describe_run(task: Task, model: nn.Module, config: TrainConfig, env_id: str | None) -> dict:
    """What a checkpoint must match to be resumed: task, model and trajectory settings."""
    trajectory = asdict(config)
    if config.schedule == "constant" and not config.warmup_steps:
        trajectory.pop("steps")
        trajectory.pop("epochs")
    cls = type(model)
    return _normalise(
        {
            "task": {"env_id": env_id, "family": task.name, "spec": task.spec.to_dict()},
            "model": {
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "factory": factory_info(model),
                "num_parameters": num_parameters(model),
            },
            "train_config": trajectory,
        }
    )


def _differences(old: dict, new: dict) -> list[str]:
    """Settings that differ between a checkpoint's ``describe_run`` and now; a training setting
    the checkpoint predates (a field added to :class:`TrainConfig` since) counts as its
    default, which is what that run trained with."""
    out = []
    defaults = _normalise(asdict(TrainConfig()))
    for section in ("task", "model", "train_config"):
        a, b = old[section], new[section]
        if section == "train_config":
            a = {**{k: v for k, v in defaults.items() if k not in ("steps", "epochs")}, **a}
        for key in sorted(set(a) | set(b)):
            if key != "env_id" and a.get(key) != b.get(key):
                out.append(f"{section}.{key}: checkpoint {a.get(key)!r} != now {b.get(key)!r}")
    return out


def _save(path: Path, state: dict) -> None:
    """Write atomically, so an interrupted save never leaves a broken checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_log(path: Path, records: list[dict], mode: str = "a") -> None:
    with path.open(mode) as f:
        for rec in records:
            f.write(strict_json(rec) + "\n")


def report_metrics(report: Report) -> dict[str, Any]:
    """The training log's view of a :class:`Report`: ``loss`` (cross-entropy, or MSE for a value
    model), excess loss, KL, last-position KL, accuracy, strategy attribution and ``nearest``
    (the phase label), and the label-value MSE where the task has real labels."""
    loss = report.cross_entropy if report.cross_entropy is not None else report.mse
    out = {
        "loss": loss,
        "excess_loss": report.excess_loss,
        "kl": report.kl,
        "kl_last": report.kl_last,
        "kl_last_se": report.kl_last_se,
        "accuracy": report.accuracy,
        "strategy_kl_last": report.strategy_kl_last,
        "nearest": report.nearest_strategy,
    }
    if report.mse is not None:
        out.update(mse=report.mse, value_accuracy=report.value_accuracy)
    return out


# ------------------------------------------------------------------------- model metrics
@torch.no_grad()
def model_metrics(task: Task, model: nn.Module) -> dict[str, float]:
    """``task.model_metrics(model)``, the task's optional hook (:meth:`iclgym.tasks.base.Task.
    model_metrics`: metrics read from the model's parameters and the task's ground truth, e.g.
    the exact population excess and the distances to (P, attn) of sparse contextual bigrams),
    as name -> float (NaN allowed); ``{}`` for a task without the hook. ``ValueError`` naming
    the task and the entry when the hook returns something else than a mapping of string names
    to real numbers."""
    hook = getattr(task, "model_metrics", None)
    if not callable(hook):
        return {}
    metrics = hook(model)
    name = type(task).__name__
    if not isinstance(metrics, Mapping):
        raise ValueError(
            f"{name}.model_metrics returned {type(metrics).__name__}, expected a mapping of "
            "metric names to floats"
        )
    out = {}
    for key, value in metrics.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if (
            not isinstance(key, str)
            or isinstance(value, bool)
            or not isinstance(value, (int, float))
        ):
            raise ValueError(
                f"{name}.model_metrics entry {key!r}: {value!r} is invalid: expected a string "
                "name and a real number"
            )
        out[key] = float(value)
    return out


def check_model_metrics(task: Task, model: nn.Module) -> list[str]:
    """The names of :func:`model_metrics` on the untrained ``model`` (checked before training);
    ``ValueError`` for a hook that fails or a name the evaluation record already uses
    (:data:`RECORD_KEYS`, or a ``val_``/``test_``/``train_`` split prefix)."""
    try:
        names = list(model_metrics(task, model))
    except ValueError:
        raise
    except Exception as err:  # a task's hook: report whatever it raised, in one line
        line = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{type(task).__name__}.model_metrics failed on the model: {type(err).__name__}: {line}"
        ) from None
    prefixes = tuple(f"{p}_" for p in SPLIT_PREFIX.values())
    clash = [k for k in names if k in RECORD_KEYS or k.startswith(prefixes)]
    if clash:
        raise ValueError(
            f"{type(task).__name__}.model_metrics names {clash} are invalid: the evaluation "
            f"record uses them (its keys {sorted(RECORD_KEYS)} and the prefixes {prefixes})"
        )
    return names


# -------------------------------------------------------------------------- evaluation
@dataclass
class EvalSets:
    """The fixed held-out sets of a run and everything about them that does not depend on the
    model (data, oracle, strategies: :class:`~iclgym.harness.evaluate.HeldOut`)."""

    held: dict[str, HeldOut]
    """Split -> set: ``config.eval_splits`` (the primary one first), then ``train`` (the fixed
    training set of the finite regime)."""
    primary: str
    references: dict[str, float]
    """KL(true || strategy) at the last scored position per strategy (the phase diagram)."""
    oracle: dict[str, Any]
    """The oracle's name and its Monte-Carlo error per split."""

    @property
    def probe_batch(self) -> Batch:
        """The batch the attention probes read: the primary set's first batch."""
        return self.held[self.primary].parts[0].batch


def eval_sets(
    task: Task, config: TrainConfig, env_id: str | None, train_batches: list | None = None
) -> EvalSets:
    """The held-out sets of ``config`` (``eval_splits``, ``eval_sequences`` of ``eval_seed``)
    and, given ``train_batches``, the training set itself."""
    held = {
        split: HeldOut(
            task,
            split=split,
            seed=config.eval_seed,
            num_sequences=config.eval_sequences,
            batch_size=config.eval_batch_size,
            device=config.device,
            env_id=env_id,
        )
        for split in config.eval_splits
    }
    if train_batches is not None:
        held["train"] = HeldOut(task, split="train", batches=train_batches, env_id=env_id)
    primary = config.eval_splits[0]
    oracle = {
        "name": held[primary].oracle_name,
        "mc_error": {split: h.oracle_mc_error for split, h in held.items()},
    }
    return EvalSets(held, primary, held[primary].strategy_kl_last_references(), oracle)


def eval_record(
    step: int,
    sequences: int,
    batch_loss: float | None,
    reports: Mapping[str, Report],
    primary: str,
    probes: Mapping[str, float],
    elapsed: float,
    task_metrics: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One ``eval`` line of ``metrics.jsonl``: the primary split's metrics unprefixed, the other
    splits' as ``val_*``, ``test_*``, ``train_*``, then the attention probes and the task's
    model metrics ``task_metrics`` (:func:`model_metrics`)."""
    rec: dict[str, Any] = {
        "type": "eval",
        "step": step,
        "sequences": sequences,
        "batch_loss": batch_loss,
    }
    for split, report in reports.items():
        metrics = report_metrics(report)
        if split == primary:
            rec.update(metrics)
        else:
            prefix = SPLIT_PREFIX.get(split, split)  # a named split: its own name
            rec.update({f"{prefix}_{k}": metrics[k] for k in SPLIT_METRICS if k in metrics})
    rec.update(probes)
    rec.update(task_metrics or {})
    rec["elapsed_s"] = elapsed
    return rec


class ProbingPredictor(ModelPredictor):
    """A :class:`~iclgym.harness.model.ModelPredictor` that, on the probe batch, also reads the
    model's attention maps from the same forward pass and keeps the probe scores
    (:func:`attention_probes`) in ``probes``: the trainer's evaluation runs the model once per
    held-out batch."""

    def __init__(self, model: nn.Module, probe_batch: Batch | None) -> None:
        super().__init__(model)
        self.probe_batch = probe_batch
        self.probes: dict[str, float] = {}

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        if batch is not self.probe_batch:
            return super().predict(batch)
        was_training = self.model.training
        self.model.eval()
        try:
            out, attention = self.model(*batch.to(self.device).inputs, return_attention=True)
        finally:
            self.model.train(was_training)
        self.probes = attention_probes(attention, batch.tokens.to(self.device))
        return output_scores(out, batch.vocab_size)


def attention_probes(attention: list[Tensor | None], tokens: Tensor) -> dict[str, float]:
    """Previous-token score of layer 1 and induction score of layer 2 (when present) from
    per-layer (B, H, T, T) attention maps on ``tokens`` (:mod:`iclgym.harness.probes`)."""
    attention = [a for a in attention if a is not None]
    scores = {}
    if attention:
        scores["prev_token_score"] = previous_token_score(attention[0])
    if len(attention) > 1:
        scores["induction_score"] = induction_score(attention[1], tokens)
    return scores


@torch.no_grad()
def probe_scores(model: nn.Module, tokens: Tensor) -> dict[str, float]:
    """:func:`attention_probes` of ``model`` on ``tokens`` (eval mode, the mode restored)."""
    was_training = model.training
    model.eval()
    try:
        _, attention = model(tokens, return_attention=True)
    finally:
        model.train(was_training)
    return attention_probes(attention, tokens)


# ------------------------------------------------------------------------- run records
def resume_log(path: Path, step: int) -> list[dict]:
    """Drop the lines of ``path`` after ``step`` (written after the checkpoint by a killed
    run), append a ``resume`` marker and return the ``eval`` records kept."""
    kept = [r for r in _read_log(path) if r["step"] <= step]
    _write_log(path, [*kept, {"type": "resume", "step": step}], mode="w")
    return [r for r in kept if r["type"] == "eval"]


def unseen_rows(embedding: Tensor | None, seen_tokens: Tensor | None) -> tuple | None:
    """(indices, frozen copy) of the input-embedding rows of tokens absent from a fixed training
    set (None without the hook or in the stream regime)."""
    if embedding is None or seen_tokens is None:
        return None
    present = torch.zeros(embedding.shape[0], dtype=torch.bool, device=embedding.device)
    present[seen_tokens.to(embedding.device)] = True
    rows = (~present).nonzero()[:, 0]
    return rows, embedding.detach()[rows].clone()


def untrained_report(frozen: tuple | None, embedding: Tensor | None) -> dict | None:
    """Whether the rows of :func:`unseen_rows` came out of training bit-identical (the
    unseen-symbol test of Boix-Adserà et al. 2024 needs untrained rows); warns when they did not."""
    if frozen is None or embedding is None:
        return None
    rows, before = frozen
    report = {"rows": int(rows.numel()), "unchanged": bool(torch.equal(before, embedding[rows]))}
    if not report["unchanged"]:
        warnings.warn(
            f"{report['rows']} input-embedding rows of tokens absent from the training set "
            "changed in training (weight decay on embeddings, or a model that mixes rows)",
            stacklevel=3,
        )
    return report


def finish_run(
    summary: dict[str, Any],
    records: list[dict],
    *,
    out: Path,
    plot: bool,
    title: str,
    metric_keys: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Add the phases (when every evaluation has a phase label), the phase diagram and the
    learning curves of the task's model metrics ``metric_keys`` (``model_metrics.png``, when
    there are any) to ``summary``, append it to ``metrics.jsonl`` and write
    ``summary.json``."""
    references = summary["references"]
    if records and all(r.get("nearest") is not None for r in records):
        summary.update(phase_report(records, order=list(references)))
        finite = finite_records(records)  # a NaN evaluation has no phase
        if plot and finite:
            summary["plot"] = str(plot_run(finite, references, out / PLOT, title=title))
    if plot and records and metric_keys:
        path = plot_metrics(records, metric_keys, out / METRICS_PLOT, title=title)
        summary["metrics_plot"] = str(path)
    _write_log(out / LOG, [summary])
    (out / SUMMARY).write_text(strict_json(summary, indent=2))
    return summary


def check_finite_loss(values: list[float], step: int, checkpoint: Path, seeds=None) -> None:
    """``ValueError`` naming ``step`` (and the seed of the first bad copy) when a training
    loss is NaN or infinite; raised before the optimiser step, the last checkpoint kept."""
    for n, value in enumerate(values):
        if not math.isfinite(value):
            copy = f" of seed {seeds[n]}" if seeds is not None else ""
            kept = (
                f"checkpoint {str(checkpoint)!r} kept" if checkpoint.exists() else "no checkpoint"
            )
            raise ValueError(
                f"training loss{copy} is {value} at step {step}: training stopped before that "
                f"update, {kept} (check the model's output and the learning rate)"
            )


# ---------------------------------------------------------------------------- training
def train(
    model: nn.Module,
    task: Task,
    config: TrainConfig | None = None,
    run: RunOptions | None = None,
    *,
    env_id: str | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``task`` and return the run summary (also in ``summary.json``).

    A fresh run seeds the global torch random state (the dropout stream) from ``config.seed``;
    a resumed one restores it. Raises ``ValueError`` before any training for a model that breaks
    the contract on this task (:func:`iclgym.harness.model.check_model`), an optimiser that
    cannot be built, a run folder in use by another process, a fresh run whose folder already
    holds a checkpoint, or a resume whose checkpoint is missing or was made with a different
    task, model or training configuration.

    With ``run.seeds`` it trains one copy per seed in this process, vectorised
    (:func:`iclgym.harness.multiseed.train_seeds`): ``model`` is then the template whose
    factory (:func:`~iclgym.harness.model.build_model`) builds every copy, and the summary
    covers all seeds.
    """
    config, run = config or TrainConfig(), run or RunOptions()
    if run.seeds:
        from iclgym.harness.multiseed import train_seeds

        return train_seeds(model, task, config, run, env_id=env_id)
    start = time.perf_counter()
    device, dtype = torch.device(config.device), config.torch_dtype
    with torch_threads(config.threads):
        # 1. Everything that can be wrong is checked before the run folder is touched.
        model.to(device=device, dtype=dtype)
        check_training(model, task)
        checked = check_model(model, task, device)
        check_loss(config.loss, checked.output)
        metric_keys = check_model_metrics(task, model)
        label_values = None
        if checked.output == "values":
            label_values = task.label_values.to(device=device, dtype=dtype)
        data = FiniteData(task, config) if config.data == "finite" else StreamData(task, config)
        optimizer = build_optimizer(model, config)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        meta = describe_run(task, model, config, env_id)
        out = Path(run.out or f"runs/{env_id or task.name}-seed{config.seed}")
        state = load_run_state(out, run, meta, CHECKPOINT_FORMAT)
        with run_lock(out):
            return _run(
                model=model,
                task=task,
                config=config,
                run=run,
                env_id=env_id,
                data=data,
                optimizer=optimizer,
                label_values=label_values,
                checked=checked,
                metric_keys=metric_keys,
                meta=meta,
                out=out,
                start=start,
                state=state,
            )


def load_run_state(out: Path, run: RunOptions, meta: dict, fmt: str) -> dict | None:
    """The checkpoint to resume from (None for a fresh run). ``ValueError`` for a fresh run
    whose folder holds a checkpoint, a missing checkpoint, one of another kind (a multi-seed
    folder resumed as one run, or the reverse) or one made with another task, model or
    training configuration."""
    path = out / CHECKPOINT
    if not run.resume:
        if path.exists():
            raise ValueError(
                f"{str(path)!r} exists: pass resume=True (--resume) to continue that run, "
                "or choose another --out"
            )
        return None
    state = load_checkpoint(path, fmt)
    differences = _differences(state["meta"], meta)
    if differences:
        raise ValueError(
            f"cannot resume {str(out)!r} with a different configuration: " + "; ".join(differences)
        )
    return state


def _run(
    *,
    model: nn.Module,
    task: Task,
    config: TrainConfig,
    run: RunOptions,
    env_id: str | None,
    data: StreamData | FiniteData,
    optimizer: torch.optim.Optimizer,
    label_values: Tensor | None,
    checked: Any,
    metric_keys: list[str],
    meta: dict,
    out: Path,
    start: float,
    state: dict | None,
) -> dict[str, Any]:
    device = torch.device(config.device)
    on_cuda = device.type == "cuda"
    total_steps = data.steps(config)
    ckpt_path, log_path = out / CHECKPOINT, out / LOG
    output = "probabilities" if checked.output == "probabilities" else "logits"
    # 2. The held-out sets: data, oracle and strategies computed once for the whole run.
    train_batches = data.batches(config.eval_batch_size) if isinstance(data, FiniteData) else None
    sets = eval_sets(task, config, env_id, train_batches)
    frozen = unseen_rows(input_embedding(model), data.seen_tokens)

    # 3. A fresh start, or the state of the checkpoint.
    step, sequences, loss_sum, loss_count = 0, 0, 0.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        data.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, sequences = state["step"], state["sequences"]
        loss_sum, loss_count = state["loss_sum"], state["loss_count"]
        records = resume_log(log_path, step)
    else:
        torch.manual_seed(stream_seed(config.seed, DROPOUT_STREAM))  # CPU and CUDA
        header = {
            "type": "start",
            "step": 0,
            "num_parameters": num_parameters(model),
            "model_output": checked.output,
            "model_metrics": metric_keys,
            "total_steps": total_steps,
            "references": sets.references,
            "oracle": sets.oracle,
            **meta,
        }
        _write_log(log_path, [header], mode="w")
        records = []

    def checkpoint() -> None:
        _save(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "meta": meta,
                "model_factory": factory_info(model),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "sequences": sequences,
                "loss_sum": loss_sum,
                "loss_count": loss_count,
                "data": data.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if on_cuda else None,
            },
        )

    def evaluation() -> None:
        nonlocal loss_sum, loss_count
        predictor = ProbingPredictor(model, sets.probe_batch if checked.attention else None)
        reports = {split: evaluate(predictor, held) for split, held in sets.held.items()}
        rec = eval_record(
            step,
            sequences,
            loss_sum / loss_count if loss_count else None,
            reports,
            sets.primary,
            predictor.probes,
            time.perf_counter() - start,
            model_metrics(task, model),
        )
        loss_sum, loss_count = 0.0, 0
        records.append(rec)
        _write_log(log_path, [rec])
        bar.set_postfix(_shown(rec))

    # 4. The loop.
    first_step = step
    scheduled = config.schedule != "constant" or config.warmup_steps > 0
    model.train()
    with (
        tqdm(total=total_steps, initial=step, disable=not run.progress, unit="step") as bar,
        _DeferredInterrupt() as interrupt,
    ):
        if not records:
            evaluation()
        while step < total_steps and not interrupt.requested:
            if scheduled:
                factor = lr_factor(config, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
            inputs, targets, mask, laws = data.next()
            selected = Targets.select(targets, mask, label_values, output, config.loss, laws)
            loss = model_loss(model, inputs, selected)
            value = loss.item()
            check_finite_loss([value], step + 1, ckpt_path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            sequences += targets.shape[0]
            loss_sum += value
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

    # 5. The summary.
    wall = time.perf_counter() - start
    summary: dict[str, Any] = {
        "type": "summary",
        "step": step,
        "sequences": sequences,
        "interrupted": interrupt.requested,
        "out": str(out),
        "checkpoint": str(ckpt_path),
        "num_parameters": num_parameters(model),
        "model_output": checked.output,
        "model_metrics": metric_keys,
        "final": records[-1],
        "references": sets.references,
        "oracle": sets.oracle,
        "untrained_rows": untrained_report(frozen, input_embedding(model)),
        "wall_s": wall,
        "steps_per_s": (step - first_step) / wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    title = (
        f"{env_id or task.name}: vocabulary {task.vocab_size}, T={task.seq_len}, seed {config.seed}"
    )
    finish_run(summary, records, out=out, plot=run.plot, title=title, metric_keys=metric_keys)
    if interrupt.requested:
        raise KeyboardInterrupt(
            f"interrupted at step {step}; checkpoint saved to {ckpt_path}, continue with --resume"
        )
    return summary


def _shown(rec: dict[str, Any]) -> dict[str, str]:
    """The progress bar's view of an eval record."""
    if rec.get("nearest") is not None:
        return {"kl_last": f"{rec['kl_last']:.4f}", "phase": rec["nearest"]}
    return {"loss": f"{rec['loss']:.4f}"}


__all__ = [
    "LOSSES",
    "EvalSets",
    "FiniteData",
    "ProbingPredictor",
    "RunOptions",
    "StreamData",
    "Targets",
    "TrainConfig",
    "attention_probes",
    "build_optimizer",
    "check_finite_loss",
    "check_loss",
    "check_model_metrics",
    "describe_run",
    "eval_record",
    "eval_sets",
    "format_seeds",
    "loss_of_output",
    "lr_factor",
    "model_loss",
    "model_metrics",
    "parse_assignments",
    "parse_seeds",
    "probe_scores",
    "report_metrics",
    "scored_loss",
    "train",
]
