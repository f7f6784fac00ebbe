"""In-context n-gram baseline: add-alpha counts over the sequence seen so far.

Causal by construction: position t counts only transitions inside ``tokens[:, : t + 1]`` and
never the token it predicts. With the task's order and alpha it equals the Markov-chain oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from iclgym.tasks.base import Batch
from iclgym.tasks.estimators import ngram_log_probs


@dataclass(frozen=True)
class NGramPredictor:
    """Add-``alpha`` in-context ``order``-gram (order 0 = uniform, 1 = unigram, 2 = bigram)."""

    vocab_size: int
    order: int = 2
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.order, int) or self.order < 0:
            raise ValueError(f"order={self.order!r} is invalid: expected an int >= 0")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} is invalid: expected a float > 0")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"vocab_size={self.vocab_size!r} is invalid: expected an int >= 1")

    @property
    def name(self) -> str:
        return f"ngram:{self.order}:{self.alpha:g}"

    def predict(self, batch: Batch) -> Tensor:
        if batch.vocab_size != self.vocab_size:
            raise ValueError(
                f"batch vocabulary {batch.vocab_size} != predictor vocabulary {self.vocab_size}"
            )
        return ngram_log_probs(batch.tokens, self.vocab_size, self.order, self.alpha)
