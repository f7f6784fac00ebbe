"""In-context n-gram baseline: add-alpha counts over the sequence seen so far.

Causal by construction: position t counts only transitions inside ``tokens[:, : t + 1]`` and
never the token it predicts. With the task's order and alpha it equals the Markov-chain oracle.
``order = 0`` is the uniform predictor (-log V at every position), ``1`` the in-context unigram.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from iclgym.tasks.base import Batch, Task
from iclgym.tasks.estimators import check_alpha, ngram_log_probs
from iclgym.validation import as_int, invalid

INDEX_BITS = 63
"""The count estimator packs (context index, time, value) into one int64 sort key."""


def max_order(vocab_size: int, seq_len: int) -> int:
    """The largest order whose packed sort key fits in :data:`INDEX_BITS` bits: the context
    index V**(order - 1) plus the time and value bits of ``iclgym.tasks.estimators``."""
    low_bits = max(1, (vocab_size - 1).bit_length()) + max(1, seq_len.bit_length())
    order = 1
    while (vocab_size**order).bit_length() + low_bits <= INDEX_BITS:
        order += 1
    return order


@dataclass(frozen=True)
class NGramPredictor:
    """Add-``alpha`` in-context ``order``-gram (order 0 = uniform, 1 = unigram, 2 = bigram).

    ``alpha`` is a Dirichlet concentration in :data:`iclgym.tasks.estimators.ALPHA_RANGE`;
    ``order`` an int from 0 to :func:`max_order` (checked here when ``seq_len`` is given, and at
    every :meth:`predict`). ``ValueError`` names the argument and the valid range.
    """

    vocab_size: int
    order: int = 2
    alpha: float = 1.0
    seq_len: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "vocab_size", as_int("vocab_size", self.vocab_size, 1))
        object.__setattr__(self, "order", as_int("order", self.order, 0))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        if self.seq_len is not None:
            object.__setattr__(self, "seq_len", as_int("seq_len", self.seq_len, 1))
            self._check_order(self.seq_len)

    def _check_order(self, seq_len: int) -> None:
        top = max_order(self.vocab_size, seq_len)
        if self.order > top:
            raise invalid(
                "order",
                self.order,
                f"an int in [0, {top}] (vocab_size={self.vocab_size}, seq_len={seq_len}: the "
                f"context index vocab_size**(order - 1) must fit in an int64 sort key)",
            )

    @property
    def name(self) -> str:
        return f"ngram:{self.order}:{self.alpha:g}"

    def predict(self, batch: Batch) -> Tensor:
        if batch.vocab_size != self.vocab_size:
            raise ValueError(
                f"batch vocabulary {batch.vocab_size} != predictor vocabulary {self.vocab_size}"
            )
        self._check_order(batch.seq_len)
        return ngram_log_probs(batch.tokens, self.vocab_size, self.order, self.alpha)


def from_text(text: str, task: Task) -> NGramPredictor:
    """``ORDER[:ALPHA]`` (the part after ``ngram:`` on the command line) for ``task``.
    ``ValueError`` naming the bad part and its valid range."""
    order, _, alpha = text.partition(":")
    if not order.isdigit():
        raise ValueError(
            f"ngram:{text} is invalid: expected ngram:ORDER[:ALPHA] with ORDER an int >= 0"
        )
    try:
        value = float(alpha) if alpha else 1.0
    except ValueError:
        raise invalid("alpha", alpha, "a float (ngram:ORDER:ALPHA)") from None
    return NGramPredictor(task.vocab_size, int(order), value, seq_len=task.seq_len)
