"""The Predictor protocol and the predictors every task gives for free (oracle, strategies)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from iclgym.tasks.base import Batch, Task


@runtime_checkable
class Predictor(Protocol):
    """Anything that maps a batch to next-token log-probabilities (B, T, V).

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


def resolve_predictor(text: str, task: Task) -> Predictor:
    """Build a predictor from a command-line string.

    ``oracle``; a strategy name (``uniform``, ``unigram``, ``bigram``, ...);
    ``ngram:ORDER[:ALPHA]`` (the in-context n-gram baseline);
    ``checkpoint:PATH`` (a trained model saved by ``iclgym train``).
    """
    kind, _, rest = text.partition(":")
    if kind == "oracle" and not rest:
        return OraclePredictor(task)
    if kind == "ngram":
        from baselines.ngram import NGramPredictor

        order, _, alpha = rest.partition(":")
        if not order.isdigit():
            raise ValueError(f"expected ngram:ORDER[:ALPHA], got {text!r}")
        return NGramPredictor(
            vocab_size=task.vocab_size, order=int(order), alpha=float(alpha) if alpha else 1.0
        )
    if kind == "checkpoint":
        from baselines.transformer import load_predictor

        return load_predictor(rest, task)
    if not rest and text in task.strategies:
        return StrategyPredictor(task, text)
    raise ValueError(
        f"unknown predictor {text!r}: use 'oracle', a strategy ({', '.join(task.strategies)}), "
        "'ngram:ORDER[:ALPHA]' or 'checkpoint:PATH'"
    )
