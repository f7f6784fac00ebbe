"""The n-gram baseline equals the oracle at the task's order and alpha."""

from __future__ import annotations

import pytest
import torch

from baselines.ngram import NGramPredictor
from iclgym.tasks import MarkovChainTask


@pytest.mark.parametrize(
    ("k", "order", "alpha"), [(2, 1, 1.0), (3, 2, 1.0), (3, 2, 0.3), (2, 3, 2.0), (3, 4, 0.7)]
)
def test_ngram_equals_oracle_at_matching_order_and_alpha(k, order, alpha):
    task = MarkovChainTask(num_states=k, order=order, alpha=alpha, seq_len=50, init="uniform")
    batch = task.sample(64, generator=task.generator(0))
    ngram = NGramPredictor(vocab_size=k, order=order, alpha=alpha).predict(batch)
    oracle = task.oracle(batch)
    start = max(order - 2, 0)  # the oracle is uniform inside the first context
    torch.testing.assert_close(ngram[:, start:], oracle[:, start:])


def test_ngram_rejects_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        NGramPredictor(3, order=-1)
    with pytest.raises(ValueError, match="alpha"):
        NGramPredictor(3, alpha=0.0)
    task = MarkovChainTask(num_states=3, seq_len=10)
    with pytest.raises(ValueError, match="vocabulary"):
        NGramPredictor(4).predict(task.sample(2, generator=task.generator(0)))
