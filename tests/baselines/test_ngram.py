"""The n-gram baseline equals the oracle at the task's order and alpha."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.ngram import NGramPredictor, from_text, max_order
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
    for alpha in (0.0, 1e-301, 1e301, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"alpha=.* is invalid: expected a float in \[1e-300"):
            NGramPredictor(3, alpha=alpha)
    with pytest.raises(ValueError, match=r"order=200 is invalid: expected an int in \[0, 35\]"):
        NGramPredictor(3, order=200, seq_len=100)
    task = MarkovChainTask(num_states=3, seq_len=10)
    with pytest.raises(ValueError, match=r"order=37 is invalid"):
        NGramPredictor(3, order=37).predict(task.sample(2, generator=task.generator(0)))
    task = MarkovChainTask(num_states=3, seq_len=10)
    with pytest.raises(ValueError, match="vocabulary"):
        NGramPredictor(4).predict(task.sample(2, generator=task.generator(0)))


def reference_ngram(tokens: list[int], k: int, order: int, alpha: float) -> torch.Tensor:
    """Add-alpha in-context n-gram written plainly: (T, k) probabilities."""
    T, out = len(tokens), []
    for t in range(T):
        counts = [0.0] * k
        if t >= order - 2:
            context = tokens[t - order + 2 : t + 1] if order > 1 else []
            for u in range(order - 1, t + 1):
                if tokens[u - order + 1 : u] == context:
                    counts[tokens[u]] += 1
        total = sum(counts)
        out.append([(c + alpha) / (total + k * alpha) for c in counts])
    return torch.tensor(out)


@pytest.mark.parametrize(("k", "T"), [(2, 100), (3, 100)])
def test_max_order_counts_are_exact_and_one_more_is_refused(k, T):
    top = max_order(k, T)
    assert top == {2: 55, 3: 35}[k]  # 63 bits minus the value and time bits of T = 100
    periodic = [t % k for t in range(T)]  # long contexts repeat, so the counts are not empty
    batch_tokens = torch.tensor([periodic])
    log_q = NGramPredictor(k, order=top).predict(
        type("B", (), {"vocab_size": k, "tokens": batch_tokens, "seq_len": T})()
    )
    expected = reference_ngram(periodic, k, top, 1.0)
    torch.testing.assert_close(log_q[0].exp(), expected)
    assert expected[-1].max() > 0.9  # the counts did accumulate
    with pytest.raises(ValueError, match=rf"order={top + 1} is invalid: expected an int in"):
        NGramPredictor(k, order=top + 1, seq_len=T)


def test_from_text_and_the_uniform_order_zero():
    task = MarkovChainTask(num_states=3, seq_len=12)
    batch = task.sample(4, generator=task.generator(0))
    uniform = from_text("0", task).predict(batch)
    torch.testing.assert_close(uniform, torch.full((4, 12, 3), -math.log(3)))
    assert from_text("2:0.5", task) == NGramPredictor(3, 2, 0.5, seq_len=12)
    for bad, match in (("x", "ngram:ORDER"), ("2:abc", "alpha='abc'"), ("2:inf", "alpha=inf")):
        with pytest.raises(ValueError, match=match):
            from_text(bad, task)
