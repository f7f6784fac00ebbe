"""The one-layer linear transformer of sparse contextual bigrams and its softmax variant
(Ren, Wang, Lee 2024, arXiv 2410.23438; ``docs/envs/ICL-SparseContextualBigram-v0.md``).

With one-hot tokens and positions, the output at the query (the last position) is

    f(X) = V X a_k = sum_t A[t, k] V[:, x_t],    k = x_{T+1} the query token,

with the value matrix ``V`` (N, N) and the attention table ``A`` (T, N) the only parameters:
the truth is V* = P (column-stochastic) and A* = attn. The softmax variant parameterises the
attention columns as ``a_k = softmax(W[:, k])`` over the T positions, with logits ``W`` (T, N).
The paper's loss is the squared error ``1/2 ||e_{x_o} - f(X)||^2`` (:func:`squared_loss`), plus
``lam ||A||_1`` handled by the proximal step of :mod:`iclgym.harness.optimizers`; the softmax
variant has the same loss.

**Init**: every column of V is ``mu`` (uniform unless ``mu`` is given), A =
1/T (W = 0). There the attention gradient is the same at every position (zero in expectation;
a uniform column stays uniform after renormalisation) and V's carries a 1/T signal: stage 1.

**Output under the model contract** (:mod:`iclgym.harness.model`): the models declare
``iclgym_output = "probabilities"``, and ``forward`` returns (B, T + 1, N) with the raw ``f``
at the query and 0 at the context positions, which this single-label task never scores. The
trainer then trains the squared loss ``1/2 ||f - e_y||^2`` on it (the paper's loss), and the
evaluation reads ``f`` clipped at 1e-6 and renormalised as the predicted distribution (the
linear output is not a distribution). :meth:`LinearTransformer.
query_output` gives ``f`` (B, N) alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUTPUT_FLOOR = 1e-6
"""Clip of ``f`` before it is read as a distribution (the harness's
``iclgym.harness.model.PROBABILITY_FLOOR``)."""


@dataclass(frozen=True)
class LinearTransformerConfig:
    """Architecture of :class:`LinearTransformer`.

    Attributes:
        vocab_size: N token ids.
        seq_len: positions of the input, T + 1 (T context tokens and the query), >= 2.
        softmax: attention columns ``softmax(W[:, k])`` (True) or the linear table A (False).
        mu: the init law of V's columns (N non-negative floats summing to 1); None: uniform.
    """

    vocab_size: int
    seq_len: int
    softmax: bool = False
    mu: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name, low in (("vocab_size", 2), ("seq_len", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= {low}")
        if not isinstance(self.softmax, bool):
            raise ValueError(f"softmax={self.softmax!r} is invalid: expected a bool")
        if self.mu is not None:
            mu = torch.tensor(self.mu, dtype=torch.float64)
            ok = mu.shape == (self.vocab_size,) and bool((mu >= 0).all())
            if not ok or abs(float(mu.sum()) - 1.0) > 1e-6:
                raise ValueError(
                    f"mu={self.mu!r} is invalid: expected {self.vocab_size} non-negative floats "
                    "summing to 1"
                )


class LinearTransformer(nn.Module):
    """``f(X) = V X a_k`` at the query; ``a_k`` a column of the table A or ``softmax(W[:, k])``.

    Parameters: ``value`` V (N, N); ``attention`` A (T, N) (linear) or ``attention_logits`` W
    (T, N) (softmax)."""

    iclgym_output = "probabilities"
    """The model contract's declaration: ``forward`` returns the prediction ``f`` of the
    next-token distribution, trained with the squared loss (:mod:`iclgym.harness.model`)."""

    def __init__(self, config: LinearTransformerConfig) -> None:
        super().__init__()
        self.config = config
        n, t = config.vocab_size, config.seq_len - 1
        mu = torch.full((n,), 1.0 / n) if config.mu is None else torch.tensor(config.mu)
        self.value = nn.Parameter(mu[:, None].repeat(1, n).float())
        if config.softmax:
            self.attention_logits = nn.Parameter(torch.zeros(t, n))
        else:
            self.attention = nn.Parameter(torch.full((t, n), 1.0 / t))

    def attention_matrix(self) -> Tensor:
        """(T, N) the attention columns a_k (A itself, or ``softmax(W, dim=0)``)."""
        if self.config.softmax:
            return torch.softmax(self.attention_logits, dim=0)
        return self.attention

    def value_and_attention(self) -> tuple[Tensor, Tensor]:
        """(V (N, N), A (T, N)): the hook read by ``task.model_metrics`` (sparse contextual
        bigrams: the exact excess, dist_P, dist_Q, support recall)."""
        return self.value, self.attention_matrix()

    def query_output(self, tokens: Tensor) -> Tensor:
        """(B, T + 1) int64 tokens -> (B, N) ``f(X) = V X a_k``, not a distribution in general."""
        if tokens.ndim != 2 or tokens.shape[1] != self.config.seq_len:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} are invalid: expected (B, "
                f"{self.config.seq_len})"
            )
        a = self.attention_matrix()
        weights = a.T[tokens[:, -1]]  # (B, T): a_k of each sequence
        onehot = F.one_hot(tokens[:, :-1], self.config.vocab_size).to(weights.dtype)
        h = torch.einsum("bt,btn->bn", weights, onehot)  # X a_k
        return h @ self.value.T

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, T + 1) int64 -> (B, T + 1, N) probability output: ``f = V X a_k`` (raw, not
        clipped) at the query, 0 at the context positions (never scored). Built without
        in-place writes, so ``torch.func.vmap`` maps it over stacked copies."""
        f = self.query_output(tokens)
        context = f.new_zeros(tokens.shape[0], tokens.shape[1] - 1, f.shape[-1])
        return torch.cat((context, f[:, None, :]), dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def squared_loss(output: Tensor, targets: Tensor) -> Tensor:
    """The paper's loss, ``1/2 mean_i ||e_{y_i} - f_i||^2`` (Ren, Wang, Lee 2024; the l1 term is
    the optimiser's prox): ``output`` (B, N) raw ``f``, ``targets`` (B,) int64."""
    onehot = F.one_hot(targets, output.shape[-1]).to(output.dtype)
    return 0.5 * (output - onehot).pow(2).sum(-1).mean()


def make_model(
    vocab_size: int, seq_len: int, softmax: bool = False, mu: tuple[float, ...] | None = None
) -> LinearTransformer:
    """The factory of the model contract (``iclgym train --model linear_transformer`` or
    ``softmax_transformer``); ``mu`` (the task's stationary law) sets V's init columns when it
    is not uniform."""
    if mu is not None:
        mu = tuple(float(x) for x in mu)
    return LinearTransformer(LinearTransformerConfig(vocab_size, seq_len, softmax, mu))
