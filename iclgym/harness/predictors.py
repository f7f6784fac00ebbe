"""The Predictor protocol and the predictors every task gives for free (oracle, strategies,
trained checkpoints), and :func:`resolve_predictor` for command-line names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from torch import Tensor

from iclgym.tasks.base import Batch, Task


@runtime_checkable
class Predictor(Protocol):
    """Anything that maps a batch to next-token log-probabilities (B, T, V) float, natural log;
    on tasks with real-valued labels (``task.label_values``) it may instead return (B, T, 1)
    real label predictions. Only the positions of ``batch.loss_mask`` are read.

    Position ``t`` may only use ``batch.tokens[:, : t + 1]``: reading targets, true_probs or
    params is cheating (the oracle and the ``true`` strategy are labelled as privileged).
    """

    def predict(self, batch: Batch) -> Tensor: ...


class OraclePredictor:
    """The task's Bayes-optimal predictor."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.name = "oracle"

    def predict(self, batch: Batch) -> Tensor:
        return self.task.oracle(batch)


class MarginalPredictor:
    """The best context-free predictor: at each position t the population marginal law of the
    next token, E[p(x_{t+1} | task, x_{<=t})] over tasks and contexts, estimated as the mean of
    ``batch.true_probs`` over ``num_sequences`` sequences of ``split``'s stream (seed ``seed``;
    estimate it on the distribution it is scored on, from another seed than the held-out
    set's: e.g. a test split of unseen symbols has its own label marginal).
    It reads no token, so it is the floor any in-context predictor must beat, for every task
    alike (the 0 of the bench's normalised score, :mod:`iclgym.bench`). Its Monte-Carlo error
    is O(1 / sqrt(num_sequences)) per entry; laws are floored at 1e-6 and renormalised."""

    def __init__(
        self, task: Task, num_sequences: int = 4096, seed: int = 0, split: str = "train"
    ) -> None:
        import torch

        gen = task.generator(seed, split)
        total, count, left = None, 0, num_sequences
        while left > 0:
            batch = task.sample(min(left, 1024), generator=gen)
            law = batch.true_probs.double().sum(0)  # (T, V)
            total = law if total is None else total + law
            count += batch.batch_size
            left -= batch.batch_size
        law = (total / count).clamp_min(1e-6)
        self.log_law = (law / law.sum(-1, keepdim=True)).log().float()  # (T, V)
        self.name = "marginal"
        self._torch = torch

    def predict(self, batch: Batch) -> Tensor:
        b, t = batch.tokens.shape
        law = self.log_law.to(batch.tokens.device)
        if law.shape[0] != t:
            raise ValueError(f"the marginal was estimated for T={law.shape[0]}, got T={t}")
        return law[None].expand(b, -1, -1)


class StrategyPredictor:
    """One of the task's named reference strategies."""

    def __init__(self, task: Task, name: str) -> None:
        if name not in task.strategies:
            raise ValueError(
                f"unknown strategy {name!r} for {type(task).__name__}; "
                f"choose one of {sorted(task.strategies)}"
            )
        self.task = task
        self.name = name
        self._predict = task.strategies[name]

    def predict(self, batch: Batch) -> Tensor:
        return self._predict(batch)


PredictorKind = Callable[[str, Task], Predictor]
"""Builds a predictor from the text after ``KIND:`` (e.g. ``"2:0.5"`` of ``ngram:2:0.5``)."""


def resolve_predictor(
    text: str,
    task: Task,
    kinds: Mapping[str, PredictorKind] | None = None,
    *,
    device: str = "cpu",
) -> Predictor:
    """Build a predictor from a command-line string.

    ``oracle``; a strategy name (``uniform``, ``unigram``, ``bigram``, ...);
    ``checkpoint:PATH`` (a model saved by :func:`iclgym.harness.train`, rebuilt from its recorded
    factory, on ``device``); ``KIND:ARGS`` for every entry of ``kinds`` (the command line adds the
    baselines', e.g. ``ngram:ORDER[:ALPHA]``: the harness imports no baseline itself).
    Raises ``ValueError`` naming the text and the valid forms.
    """
    kinds = dict(kinds or {})
    kind, _, rest = text.partition(":")
    if text == "oracle":
        return OraclePredictor(task)
    if kind == "checkpoint" and rest:
        from iclgym.harness.model import load_predictor

        return load_predictor(rest, task, device)
    if kind in kinds and rest:
        return kinds[kind](rest, task)
    if text in task.strategies:
        return StrategyPredictor(task, text)
    forms = ["'oracle'", f"a strategy ({', '.join(task.strategies)})", "'checkpoint:PATH'"]
    forms[2:2] = [f"'{k}:...'" for k in kinds]
    raise ValueError(f"unknown predictor {text!r}: use " + ", ".join(forms))
