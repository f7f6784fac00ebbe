"""Stationary laws of batches of finite Markov chains, by GTH elimination.

The Grassmann-Taksar-Heyman algorithm (Grassmann, Taksar & Heyman 1985; Stewart 1994,
"Introduction to the Numerical Solution of Markov Chains", section 2.7) censors the states one
at a time: eliminating state n folds every path through n into the transitions among states
``0 .. n-1``, with row n's exit mass ``s_n = sum_{j < n} A[n, j]`` computed as a *sum* of
off-diagonal entries instead of ``1 - A[n, n]``. It never subtracts, so it keeps full relative
accuracy on nearly reducible chains, where solving ``(P^T - I) pi = 0`` loses every digit of
the small entries (e.g. ``[[1 - 1e-20, 1e-20], [1e-30, 1 - 1e-30]]`` has
``pi = [1e-10, 1 - 1e-10]``; a linear solve in float64 returns ``[1, 0]``).

iclgym writes its own elimination (the ICL core: the sampler's first tokens and the exact
oracle's importance weights depend on it) because no well-kept library offers a batched,
subtraction-free stationary solver on torch tensors. :func:`log_gth_stationary` is the same
elimination in log space, for tables whose probabilities underflow float64 (Dirichlet rows with
tiny concentrations): only sums and products occur, so log-space arithmetic is exact to
rounding.

Both raise ``ValueError`` for chains whose stationary law is not unique (reducible chains,
detected as a state with no exit mass during elimination).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def lifted_transition(tables: Tensor) -> Tensor:
    """(..., S, S) transition matrix of the chain on contexts of ``order - 1`` tokens.

    ``tables`` (..., S, k) holds one row per context (newest token last, least significant
    digit: ``iclgym.tasks.estimators``); context ``s`` moves to ``(s * k) % S + j`` with
    probability ``tables[..., s, j]``. Entries that are not successors are 0 (for
    log-probability tables pass ``fill=-inf`` through :func:`lifted_log_transition`).
    """
    return _lift(tables, 0.0)


def lifted_log_transition(log_tables: Tensor) -> Tensor:
    """:func:`lifted_transition` of log-probabilities: non-successors are ``-inf``."""
    return _lift(log_tables, -torch.inf)


def _lift(tables: Tensor, fill: float) -> Tensor:
    *lead, states, k = tables.shape
    if states == k:  # first order: the contexts are the tokens themselves
        return tables
    successors = (torch.arange(states, device=tables.device) * k % states).unsqueeze(1)
    columns = (successors + torch.arange(k, device=tables.device)).expand(*lead, states, k)
    out = tables.new_full((*lead, states, states), fill)
    return out.scatter_(-1, columns, tables)


def _reducible(name: str) -> ValueError:
    return ValueError(
        f"{name} is reducible (a state has no exit mass during GTH elimination): its "
        "stationary law is not unique"
    )


def gth_stationary(transition: Tensor) -> Tensor:
    """Stationary law (..., S) float64 of row-stochastic ``transition`` (..., S, S).

    Only off-diagonal entries are read (the diagonal is implied), in float64, with no
    subtraction. Cost O(S^3) per chain, batched over the leading dimensions, which are moved
    last so that every operation is elementwise over contiguous batch vectors (5x faster than
    batched rank-1 matrix products for S <= 27 at 4,096 chains): each elimination is one
    in-place update ``A[:n, :n] += A[:n, n] A[n, :n] / s_n``, and the back-substitution
    ``x_n = sum_{i<n} x_i A[i, n]`` sums positive terms. Rows that do not sum to 1 are read
    as the off-diagonal rates of a continuous-time chain, whose stationary law is returned
    (for a stochastic matrix the two coincide).
    """
    *lead, states, _ = transition.shape
    a = transition.to(torch.float64).reshape(-1, states, states).permute(1, 2, 0)
    a = a.clone(memory_format=torch.contiguous_format)  # always a copy: eliminated in place
    for n in range(states - 1, 0, -1):
        exit_mass = a[n, :n].sum(0)
        if not bool((exit_mass > 0).all()):
            raise _reducible("transition")
        column = a[:n, n].div_(exit_mass)
        a[:n, :n].addcmul_(column.unsqueeze(1), a[n, :n].unsqueeze(0))
    x = torch.empty(states, a.shape[-1], dtype=torch.float64, device=a.device)
    x[0] = 1.0
    for n in range(1, states):
        x[n] = (x[:n] * a[:n, n]).sum(0)
    return (x / x.sum(0)).T.reshape(*lead, states)


def log_gth_stationary(log_transition: Tensor) -> Tensor:
    """Log stationary law (..., S) float64 of ``log_transition`` (..., S, S), log-probabilities
    (``-inf`` for impossible transitions): :func:`gth_stationary` in log space (same batch-last
    layout)."""
    *lead, states, _ = log_transition.shape
    a = log_transition.to(torch.float64).reshape(-1, states, states).permute(1, 2, 0)
    a = a.clone(memory_format=torch.contiguous_format)
    for n in range(states - 1, 0, -1):
        log_exit = torch.logsumexp(a[n, :n], 0)
        if not bool(torch.isfinite(log_exit).all()):
            raise _reducible("log_transition")
        column = a[:n, n].sub_(log_exit)
        a[:n, :n] = torch.logaddexp(a[:n, :n], column.unsqueeze(1) + a[n, :n].unsqueeze(0))
    x = torch.empty(states, a.shape[-1], dtype=torch.float64, device=a.device)
    x[0] = 0.0
    for n in range(1, states):
        x[n] = torch.logsumexp(x[:n] + a[:n, n], 0)
    return (x - torch.logsumexp(x, 0)).T.reshape(*lead, states)


UNDERFLOW_LOG = -700.0
"""Below this log-probability float64 probabilities lose precision (exp(-708) is the smallest
normal double); :func:`stationary_from_log` switches to log space there."""


def stationary_from_log(log_tables: Tensor, probs: Tensor | None = None) -> Tensor:
    """Stationary law (..., S) float64 of the lifted chain of log-probability tables
    (..., S, k) (one row per context): linear-space GTH when every entry is representable in
    float64 (:func:`_linear_stationary`), log-space GTH otherwise. ``probs``:
    ``log_tables.exp()`` when the caller has it."""
    smallest = log_tables.amin()
    if not bool(torch.isfinite(smallest)):  # -inf: impossible transitions; the finite minimum
        smallest = torch.where(torch.isfinite(log_tables), log_tables, 0.0).amin()
    if smallest.item() > UNDERFLOW_LOG:
        return _linear_stationary(log_tables.exp() if probs is None else probs)
    return log_gth_stationary(lifted_log_transition(log_tables)).exp()


def stationary_from_probs(probs: Tensor) -> Tensor:
    """:func:`stationary_from_log` of probability tables ``probs`` (..., S, k): linear-space
    GTH when every positive entry exceeds ``exp(UNDERFLOW_LOG)`` (no logarithm taken), else
    the log-space elimination of ``probs.log()``."""
    probs = probs.double()
    smallest = probs.amin()
    if smallest.item() == 0.0:  # impossible transitions: the positive minimum
        smallest = torch.where(probs > 0, probs, 1.0).amin()
    if smallest.item() > math.exp(UNDERFLOW_LOG):
        return _linear_stationary(probs)
    return stationary_from_log(probs.log())


def _linear_stationary(probs: Tensor) -> Tensor:
    """Linear-space GTH of float64 tables (..., S, k); on CPU batches (B, S, k) the compiled
    :func:`iclgym.tasks.kernels.gth_stationary`."""
    from iclgym.tasks import kernels

    if kernels.available(probs.device) and probs.dim() == 3:
        return kernels.gth_stationary(probs)
    return gth_stationary(lifted_transition(probs))
