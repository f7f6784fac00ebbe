"""Scores for tasks with real-valued labels (e.g. template regression, ``label_type="regression"``).

Such tasks put a label token at the scored position and expose ``task.label_values`` (the
real value of each label token, NaN elsewhere); ``batch.params["label_value"]`` holds the true
label. A real prediction is scored by squared error and by *accuracy*: the label value nearest
to the prediction equals the true one (for +-1 labels, sign accuracy). Any next-token
predictor also gives a real prediction: the expected label value under its distribution over
the label tokens (renormalised), so the oracle scores MSE 0 and accuracy 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from iclgym.tasks.base import Batch, Task

ValuePredictor = Callable[[Batch], Tensor]
"""Maps a batch to one real prediction per sequence, (B,)."""


def label_values(task: Task) -> Tensor:
    """The task's (V,) label-value table; ValueError if it has no real-valued labels."""
    values = getattr(task, "label_values", None)
    if values is None:
        raise ValueError(f"{type(task).__name__} has no real-valued labels (label_values)")
    return values


def expected_value(log_q: Tensor, values: Tensor) -> Tensor:
    """E_q[value] over the label tokens, log_q (B, V) -> (B,)."""
    values = values.to(log_q.device)
    is_label = torch.isfinite(values)
    q = log_q[:, is_label].softmax(-1)
    return q @ values[is_label].to(q.dtype)


def nearest_label(pred: Tensor, values: Tensor) -> Tensor:
    """The label value closest to each prediction (first one on ties)."""
    labels = values[torch.isfinite(values)].unique().to(pred)  # pred's device and dtype
    return labels[(pred[:, None] - labels).abs().argmin(1)]


def as_value_predictor(predictor: object, task: Task) -> ValuePredictor:
    """A callable as is; a next-token ``Predictor`` as its expected label value at the last
    position."""
    if hasattr(predictor, "predict"):
        values = label_values(task)
        return lambda batch: expected_value(predictor.predict(batch)[:, -1], values)
    if callable(predictor):
        return predictor  # type: ignore[return-value]
    raise ValueError(f"{predictor!r} is neither a callable nor a Predictor")


@torch.no_grad()
def evaluate_regression(
    predictor: object,
    task: Task,
    *,
    split: str = "test",
    seed: int = 0,
    num_sequences: int = 1000,
    batch_size: int = 1000,
) -> dict[str, float]:
    """MSE (with its standard error), accuracy, and the chance MSE of predicting the mean
    label, on ``num_sequences`` strings of ``split`` (default: the unseen-symbol test split)."""
    values = label_values(task)
    predict = as_value_predictor(predictor, task)
    gen = task.generator(seed, split)
    errors, hits, labels = [], [], []
    done = 0
    while done < num_sequences:
        size = min(batch_size, num_sequences - done)
        batch = task.sample(size, generator=gen)
        y = batch.params["label_value"].double()
        pred = predict(batch).double().reshape(-1)
        errors.append((pred - y) ** 2)
        hits.append((nearest_label(pred, values) == y).double())
        labels.append(y)
        done += size
    err, y = torch.cat(errors), torch.cat(labels)
    return {
        "mse": err.mean().item(),
        "mse_se": err.std().item() / math.sqrt(err.numel()) if err.numel() > 1 else math.nan,
        "accuracy": torch.cat(hits).mean().item(),
        "chance_mse": ((y - y.mean()) ** 2).mean().item(),
    }
