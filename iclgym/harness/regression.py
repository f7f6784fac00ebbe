"""Label-value scores in one call, for tasks with real-valued labels (``task.label_values``,
e.g. template regression): a thin view of :func:`iclgym.harness.evaluate`, which computes them
for every such task (``Report.mse``, ``mse_se``, ``value_accuracy``, ``chance_mse``)."""

from __future__ import annotations

from iclgym.harness.evaluate import evaluate, expected_value, nearest_label
from iclgym.harness.predictors import Predictor
from iclgym.tasks.base import Task

__all__ = ["evaluate_regression", "expected_value", "nearest_label"]


def evaluate_regression(
    predictor: Predictor,
    task: Task,
    *,
    split: str = "test",
    seed: int = 0,
    num_sequences: int = 1000,
    batch_size: int = 1000,
) -> dict[str, float]:
    """``mse`` (with ``mse_se``), ``accuracy`` (nearest label value equals the true one) and
    ``chance_mse`` (predicting the mean label) of ``predictor`` on ``num_sequences`` strings of
    ``split``. A log-prob predictor's real prediction is its expected label value over the
    label tokens; a value predictor's is its (B, T, 1) output. ``ValueError`` if the task has no
    real-valued labels."""
    if getattr(task, "label_values", None) is None:
        raise ValueError(f"{type(task).__name__} has no real-valued labels (label_values)")
    report = evaluate(
        predictor, task, split=split, seed=seed, num_sequences=num_sequences, batch_size=batch_size
    )
    return {
        "mse": report.mse,
        "mse_se": report.mse_se,
        "accuracy": report.value_accuracy,
        "chance_mse": report.chance_mse,
    }
