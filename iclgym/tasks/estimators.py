"""In-context count estimators shared by oracles, reference strategies and baselines.

Conventions (one for the whole library):

* A context of ``L`` tokens ``c_0 .. c_{L-1}`` (oldest first) has index
  ``sum_i c_i * V**(L - 1 - i)``: the *newest* token is the least significant digit.
* The in-context ``m``-gram at position ``t`` has seen ``x_0 .. x_t``. It counts the
  observations ``x_u`` (``m - 1 <= u <= t``) whose preceding ``m - 1`` tokens equal the current
  context ``x_{t-m+2} .. x_t``. For ``m = 1`` the context is empty and every token ``x_0 .. x_t``
  counts. The token being predicted, ``x_{t+1}``, is never counted (causality).

Everything is vectorised over batch and time in O(B * T * V) memory: the observations are
sorted by context (stably, so time order is kept inside a context) and a cumulative sum per
context group gives all counts at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from iclgym.validation import invalid, is_real

ALPHA_RANGE = (1e-300, 1e300)
"""Valid Dirichlet concentrations (each entry). Inside it every sampler, oracle and add-alpha
predictor computes in float64 where float32 would under- or overflow, so no result is NaN;
outside it (denormal or non-finite values) the arithmetic cannot represent the prior."""


def check_alpha(
    alpha: object, size: int | None = None, name: str = "alpha"
) -> float | tuple[float, ...]:
    """A Dirichlet concentration: a real in :data:`ALPHA_RANGE`, or (when ``size`` is given)
    a sequence of ``size`` such reals; returned as a float or a tuple of floats.

    Raises ``ValueError`` naming ``name``, the value and the valid range.
    """
    lo, hi = ALPHA_RANGE
    valid = f"a float in [{lo:g}, {hi:g}]" + (
        f" or {size} such floats (one per token)" if size is not None else ""
    )
    if isinstance(alpha, Sequence) and not isinstance(alpha, str):
        values = tuple(alpha)
        if size is None or len(values) != size:
            raise invalid(name, alpha, valid)
    else:
        values = (alpha,)
    for a in values:
        if not is_real(a) or not lo <= float(a) <= hi:  # type: ignore[arg-type]
            raise invalid(name, alpha, valid)
    floats = tuple(float(a) for a in values)  # type: ignore[arg-type]
    return floats if len(values) != 1 or isinstance(alpha, Sequence) else floats[0]


def context_index(tokens: Tensor, vocab_size: int, length: int) -> Tensor:
    """Index of the last ``length`` tokens ending at every position, newest-last.

    Returns (B, T) int64; positions ``t < length - 1`` (incomplete context) get ``-1``.
    """
    if length < 1:
        raise ValueError(f"length={length} must be >= 1")
    _batch, _seq = tokens.shape
    idx = tokens.clone()
    for lag in range(1, length):
        shifted = torch.zeros_like(tokens)
        shifted[:, lag:] = tokens[:, :-lag]
        idx += shifted * vocab_size**lag
    idx[:, : length - 1] = -1
    return idx


def one_hot(tokens: Tensor, vocab_size: int) -> Tensor:
    """float32 one-hot (..., V); a comparison, several times faster than F.one_hot on CPU."""
    ids = torch.arange(vocab_size, dtype=tokens.dtype, device=tokens.device)
    return (tokens.unsqueeze(-1) == ids).to(torch.float32)


def in_context_counts(tokens: Tensor, vocab_size: int, order: int) -> tuple[Tensor, Tensor]:
    """Counts ``N_t(context_t -> j)`` (B, T, V) and totals ``N_t(context_t)`` (B, T), float32.

    The totals come from each observation's rank inside its context group, so no reduction
    over the vocabulary is needed.
    """
    if order < 1:
        raise ValueError(f"order={order} must be >= 1")
    batch, seq = tokens.shape
    device = tokens.device
    if order == 1:
        totals = torch.arange(1, seq + 1, dtype=torch.float32, device=device).expand(batch, -1)
        return one_hot(tokens, vocab_size).cumsum(1), totals
    # Observation u = 0..T has value x_u and key = context ending at u - 1; the query at
    # position t is the key of observation t + 1. Observation T (not revealed, value 0 as a
    # placeholder) is last in its group, so it never enters an exclusive count. One sort of a
    # bit-packed key (context | time | value) orders by context then time and carries time and
    # value along: no stable sort, no gathers, and shifts instead of integer division.
    sentinel = vocab_size ** (order - 1)
    span = seq + 1
    value_bits, time_bits = max(1, (vocab_size - 1).bit_length()), max(1, seq.bit_length())
    low_bits = value_bits + time_bits
    dtype = torch.int32 if sentinel.bit_length() + low_bits <= 31 else torch.int64
    ctx = context_index(tokens, vocab_size, order - 1)
    keys = torch.full((batch, span), sentinel, dtype=dtype, device=device)
    keys[:, 1:] = torch.where(ctx < 0, sentinel, ctx)
    keys.bitwise_left_shift_(low_bits)
    keys.bitwise_or_(torch.arange(span, dtype=dtype, device=device) << value_bits)
    keys[:, :seq].bitwise_or_(tokens.to(dtype))
    ordered = torch.sort(keys, dim=1).values
    value = ordered & (2**value_bits - 1)
    time = (ordered >> value_bits) & (2**time_bits - 1)
    group = ordered >> low_bits
    sorted_onehot = one_hot(value, vocab_size)
    exclusive = sorted_onehot.cumsum(1).sub_(sorted_onehot)
    positions = torch.arange(span, dtype=dtype, device=device).expand(batch, -1)
    new_group = torch.ones_like(group, dtype=torch.bool)
    new_group[:, 1:] = group[:, 1:] != group[:, :-1]
    group_start = torch.where(new_group, positions, 0).cummax(1).values
    row_offset = torch.arange(0, batch * span, span, device=device).unsqueeze(1)
    flat = exclusive.view(-1, vocab_size)
    flat -= flat.index_select(0, (group_start + row_offset).view(-1))
    destination = (time + row_offset).view(-1)
    counts = torch.empty_like(exclusive)
    counts.view(-1, vocab_size).index_copy_(0, destination, flat)
    totals = torch.empty(batch, span, device=device)
    totals.view(-1).index_copy_(0, destination, (positions - group_start).view(-1).float())
    counts, totals = counts[:, 1:], totals[:, 1:]
    counts[:, : order - 2] = 0.0  # incomplete query context: the prior alone
    totals[:, : order - 2] = 0.0
    return counts, totals


def _float32_alpha(alpha: float | Tensor, vocab_size: int) -> bool:
    """Whether :func:`dirichlet_log_predictive` computes with ``alpha`` in float32."""
    if isinstance(alpha, Tensor):
        small, large = alpha.min().item(), alpha.max().item()
    else:
        small = large = float(alpha)
    return small >= 1e-30 and large * vocab_size <= 1e30


def dirichlet_log_predictive(counts: Tensor, totals: Tensor, alpha: float | Tensor) -> Tensor:
    """Log posterior predictive ``log (N_j + a_j) / (N + sum a)`` of a Dirichlet(a) row.

    ``counts`` (..., V) and ``totals`` (...) are float32 counts; returns float32 (..., V).
    Concentrations outside [1e-30, 1e30] (any entry) are computed in float64, where
    ``N_j + a_j`` neither underflows to 0 nor overflows, so every value is finite for every
    alpha in :data:`ALPHA_RANGE`.
    """
    if _float32_alpha(alpha, counts.shape[-1]):
        if isinstance(alpha, Tensor):
            alpha = alpha.to(counts)
            total_alpha = alpha.sum()
        else:
            total_alpha = alpha * counts.shape[-1]
        return (counts + alpha).log_().sub_((totals + total_alpha).log_().unsqueeze(-1))
    a = alpha.to(torch.float64) if isinstance(alpha, Tensor) else alpha
    total_alpha = a.sum() if isinstance(a, Tensor) else a * counts.shape[-1]
    log_q = (counts.double() + a).log_().sub_((totals.double() + total_alpha).log_().unsqueeze(-1))
    return log_q.float()


def ngram_log_probs(tokens: Tensor, vocab_size: int, order: int, alpha: float | Tensor) -> Tensor:
    """Add-``alpha`` in-context ``order``-gram log-probabilities (B, T, V).

    ``order = 0`` is the uniform predictor. With the true order and the prior's ``alpha`` this is
    the exact Bayes posterior predictive of a chain with i.i.d. Dirichlet rows. On CPU the
    compiled :func:`iclgym.tasks.kernels.ngram_log_probs` computes the same values.
    """
    from iclgym.tasks import kernels

    if order == 0:
        return torch.full((*tokens.shape, vocab_size), -math.log(vocab_size), device=tokens.device)
    if (
        kernels.available(tokens.device)
        and _float32_alpha(alpha, vocab_size)
        and vocab_size**order <= kernels.NGRAM_MAX_CELLS
    ):  # one pass, O(B T V) memory
        return kernels.ngram_log_probs(tokens, vocab_size, order, alpha)
    return dirichlet_log_predictive(*in_context_counts(tokens, vocab_size, order), alpha)
