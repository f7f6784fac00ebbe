"""Compiled CPU kernels (numba) of the Markov-chain sampler (inverse-CDF thresholds, the walk,
the GTH stationary solve), the add-alpha n-gram oracle and the Markov env's online step.

The vectorised torch and numpy code in :mod:`iclgym.tasks.markov`,
:mod:`iclgym.tasks.stationary` and :mod:`iclgym.tasks.estimators` is the reference (and the
CUDA path); these kernels do the same arithmetic one sequence at a time on CPU tensors, where a
time loop of torch operations pays its per-operation overhead ``seq_len`` times, a batch-last
elimination streams ``S**2 * B`` floats through memory per eliminated state and a sort-based
count holds about 94 bytes per position. They consume the same random numbers as the torch
code, so a seed gives the same tokens either way, and the thresholds, n-gram log-probabilities
and online laws are equal bit for bit (``tests/tasks/test_kernels.py``; speeds in
``docs/speed.md``). iclgym compiles its own kernels here
(rather than calling a library) because they are the ICL core: no library walks a batch of
Markov chains by inverse CDF or solves batched stationary laws without subtraction.

Compiled on first use and cached on disk (``cache=True``); :data:`ENABLED` switches them off
(the torch path then runs everywhere, as on CUDA).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

ENABLED = True
"""Use the compiled kernels for CPU tensors: these and the other families' compiled samplers
(sparse contextual bigrams, planted priority graphs, symbol templates); tests turn it off to
run the torch reference."""

COUNT_MAX = 64
"""Thresholds per row up to which the walk counts every comparison (branch-free, 2.7x faster
than an early-exit scan at k = 3: a random token is a mispredicted branch); above, binary
search."""

NGRAM_MAX_CELLS = 2**22
"""Largest count table (V**order cells, int32) the n-gram kernel keeps; above, the sort-based
estimator (its memory does not grow with the table)."""


def available(device: torch.device) -> bool:
    """Whether the kernels serve tensors on ``device`` (CPU, when :data:`ENABLED`)."""
    return ENABLED and device.type == "cpu"


@njit(cache=True, nogil=True, inline="always")
def uniform_index(w, shift, n):  # pragma: no cover - compiled
    """floor(u n), u = (w >> 10) / 2**53, of one 63-bit random word ``w``, as the torch
    samplers compute it: its top bits where n is a power of two (``shift`` = 64 -
    n.bit_length() > 0), else the multiply-shift (``shift`` = 0; n < 1024, so the 53-bit
    product fits in int64)."""
    return w >> shift if shift > 0 else ((w >> 10) * n) >> 53


@njit(cache=True, nogil=True)
def _walk(cdf, first, u, keep, out):  # pragma: no cover - compiled
    batch, _, km1 = cdf.shape
    k = km1 + 1
    offset = out.shape[1] - u.shape[0]
    state = first.copy()
    one = np.float32(1.0)
    for i in range(u.shape[0]):  # time outer: the B chains of a step are independent work
        for b in range(batch):
            x = one - u[i, b]  # the open uniform in (0, 1] of markov.open_uniform
            s = state[b]
            j = 0
            if km1 <= COUNT_MAX:  # branchless count of the thresholds below x
                for m in range(km1):
                    j += x > cdf[b, s, m]
            else:  # binary search (the thresholds are nondecreasing): the same count
                hi = km1
                while j < hi:
                    mid = (j + hi) >> 1
                    if x > cdf[b, s, mid]:
                        j = mid + 1
                    else:
                        hi = mid
            state[b] = j if keep == 1 else (s % keep) * k + j
            out[b, offset + i] = j


def walk(cdf: Tensor, first: Tensor, u: Tensor, out: Tensor) -> None:
    """Draw the tokens after the first context into ``out`` (B, T + 1) int64, in place.

    ``cdf`` (B, S, k - 1) float32: :func:`~iclgym.tasks.markov.inverse_cdf_thresholds` of the
    table rows (nondecreasing, exactly 1 from the last positive entry on); ``first`` (B,)
    int64: the first lifted state (its digits are already in ``out[:, :n - 1]``); ``u``
    (steps, B) float32: ``torch.rand`` draws, used as the open uniforms ``1 - u`` in (0, 1].
    The token from state ``s`` is the number of thresholds of ``cdf[b, s]`` below ``1 - u``
    and the next state is ``(s % (S / k)) * k + token`` (newest token last), exactly as
    :meth:`~iclgym.tasks.markov.MarkovChainTask._walk`; the last ``steps`` columns of ``out``
    are written.
    """
    k = cdf.shape[-1] + 1
    _walk(cdf.numpy(), first.numpy(), u.numpy(), cdf.shape[1] // k, out.numpy())


@njit(cache=True, nogil=True)
def _gth(tables, lifted, out):  # pragma: no cover - compiled
    batch, states, k = tables.shape
    a = np.empty((states, states))
    x = np.empty(states)
    for b in range(batch):
        if lifted:  # context s moves to (s * k) % S + j with probability tables[b, s, j]
            a[:] = 0.0
            for s in range(states):
                base = (s * k) % states
                for j in range(k):
                    a[s, base + j] = tables[b, s, j]
        else:
            a[:] = tables[b]
        for n in range(states - 1, 0, -1):  # censor state n: A[:n, :n] += A[:n, n] A[n, :n] / s_n
            row_n = a[n]
            exit_mass = 0.0
            for j in range(n):
                exit_mass += row_n[j]
            if not exit_mass > 0.0:
                return b
            for i in range(n):
                row_i = a[i]
                c = row_i[n] / exit_mass
                row_i[n] = c
                if c != 0.0:  # lifted tables are sparse: most of the early updates are empty
                    for j in range(n):
                        row_i[j] += c * row_n[j]
        x[0] = 1.0
        total = 1.0
        for n in range(1, states):  # back-substitution x_n = sum_{i<n} x_i A[i, n]
            acc = 0.0
            for i in range(n):
                acc += x[i] * a[i, n]
            x[n] = acc
            total += acc
        for s in range(states):
            out[b, s] = x[s] / total
    return -1


def gth_stationary(tables: Tensor) -> Tensor:
    """Stationary law (B, S) float64 of the lifted chain of probability ``tables`` (B, S, k)
    (one row per context of ``order - 1`` tokens; ``S == k`` for first-order chains): the GTH
    elimination of :func:`iclgym.tasks.stationary.gth_stationary`, one chain at a time in
    cache, on the lifted matrix it builds itself. Equal to the torch elimination up to
    rounding (tested). Raises ``ValueError`` for a reducible chain."""
    from iclgym.tasks.stationary import _reducible

    batch, states, k = tables.shape
    out = torch.empty(batch, states, dtype=torch.float64)
    source = tables.to(torch.float64).contiguous().numpy()
    if _gth(source, states != k, out.numpy()) >= 0:
        raise _reducible("transition")
    return out


@njit(cache=True, nogil=True)
def _thresholds(probs, out):  # pragma: no cover - compiled
    rows, m = probs.shape
    one = np.float32(1.0)
    for r in range(rows):
        last = 0
        for j in range(m):
            if probs[r, j] > 0:
                last = j
        acc = 0.0  # float64 accumulation rounded to float32 at every step, as torch.cumsum
        for j in range(m - 1):
            acc += probs[r, j]
            value = np.float32(acc)
            out[r, j] = one if j >= last or value > one else value


def inverse_cdf_thresholds(probs: Tensor) -> Tensor:
    """:func:`iclgym.tasks.markov.inverse_cdf_thresholds` of float32 ``probs`` (..., m) on the
    CPU in one pass (the torch version makes seven passes over the table, 0.7 s at k = 100,
    B = 4,096): the same float32 values bit for bit (tested)."""
    m = probs.shape[-1]
    out = torch.empty(*probs.shape[:-1], m - 1, dtype=torch.float32)
    _thresholds(probs.reshape(-1, m).contiguous().numpy(), out.view(-1, m - 1).numpy())
    return out


@njit(cache=True, nogil=True)
def _ngram(tokens, k, order, log_num, log_den, out):  # pragma: no cover - compiled
    batch, seq = tokens.shape
    states = k ** (order - 1)
    counts = np.zeros((states, k), dtype=np.int32)
    totals = np.zeros(states, dtype=np.int32)
    modulus = states // k if order > 1 else 1
    for b in range(batch):
        ctx = 0  # the context ending at t (the last order - 1 tokens, newest-last)
        previous = 0  # the context ending at t - 1
        for t in range(seq):
            x = tokens[b, t]
            if order > 1:
                previous = ctx
                ctx = (ctx % modulus) * k + x
            if t >= order - 1:  # observation x_t after its context: revealed
                counts[previous, x] += 1
                totals[previous] += 1
            if t < order - 2:  # incomplete context: the prior alone
                for j in range(k):
                    out[b, t, j] = log_num[0, j] - log_den[0]
            else:
                n = totals[ctx]
                for j in range(k):
                    out[b, t, j] = log_num[counts[ctx, j], j] - log_den[n]
        ctx = 0  # reset the cells this sequence touched
        for t in range(seq):
            x = tokens[b, t]
            if order > 1:
                previous = ctx
                ctx = (ctx % modulus) * k + x
            if t >= order - 1:
                counts[previous, x] = 0
                totals[previous] = 0


def ngram_log_probs(tokens: Tensor, vocab_size: int, order: int, alpha: float | Tensor) -> Tensor:
    """:func:`iclgym.tasks.estimators.ngram_log_probs` (order >= 1, concentrations in its
    float32 range) on CPU in one pass: running counts per sequence, ``log(N_j + a_j)`` and
    ``log(N + sum a)`` read from tables of every count 0..T computed by torch in float32, so
    the values equal the vectorised estimator's bit for bit (tested). Memory: the (B, T, V)
    float32 output and a k**order count table, against about 94 bytes per position for the
    sort-based estimator. (B, T, V) float32."""
    batch, seq = tokens.shape
    counts = torch.arange(seq + 1, dtype=torch.float32).unsqueeze(1)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(torch.float32)
        log_num = (counts + alpha).log_()
        log_den = (counts[:, 0] + alpha.sum()).log_()
    else:
        log_num = (counts + alpha).log_().expand(seq + 1, vocab_size).contiguous()
        log_den = (counts[:, 0] + alpha * vocab_size).log_()
    out = torch.empty(batch, seq, vocab_size, dtype=torch.float32)
    index = tokens.numpy()  # strided views (a batch's tokens) are read in place: no copy
    _ngram(index, vocab_size, order, log_num.numpy(), log_den.numpy(), out.numpy())
    return out


@njit(cache=True, nogil=True)
def _online_step(
    t, order, tokens, rows, counts, tables, alpha, true_out, oracle_out
):  # pragma: no cover - compiled
    batch, k = true_out.shape
    for b in range(batch):
        if t >= order - 1:  # reveal observation x_t after the context of t - 1
            counts[rows[t - 1, b] if t > 0 else rows[0, b], tokens[t, b]] += 1.0
        col = rows[t, b]
        total = np.float32(0.0)
        for j in range(k):  # float32, summed in token order: numpy's reduction over axis 0
            c = counts[col, j] + alpha[j]
            oracle_out[b, j] = c
            total += c
        for j in range(k):
            oracle_out[b, j] /= total
            true_out[b, j] = tables[col, j]


def online_step(
    t: int,
    order: int,
    tokens: np.ndarray,
    rows: np.ndarray,
    counts: np.ndarray,
    tables: np.ndarray,
    alpha: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One step of :meth:`iclgym.tasks.markov.MarkovChainTask.online` for Dirichlet rows
    (t >= order - 2): reveal ``x_t`` into the running ``counts`` (B * S, k) float32, then the
    true row and the add-alpha predictive of the context column ``rows[t]`` (T, B), each
    (B, k) float32, C-contiguous. ``tables`` (B * S, k) float32, ``alpha`` (k,) float32. The
    same values as the numpy step (tested)."""
    batch, k = rows.shape[1], tables.shape[1]
    true_out = np.empty((batch, k), dtype=np.float32)
    oracle_out = np.empty((batch, k), dtype=np.float32)
    _online_step(t, order, tokens, rows, counts, tables, alpha, true_out, oracle_out)
    return true_out, oracle_out
