"""The oracle ladder of sparse contextual bigrams (an iclgym design, derived from the task):
what a learner can know from n training samples, separating statistical from optimisation
difficulty.

Rungs, from most to least informed:

- **bayes** knows P and attn: the Bayes predictor ``P X q^(k)``, excess 0.
- **knows attn, not P**: :func:`moment_transition` (``C_t = E[e_{x_o} e_{x_t}^T | k] = q_t P D
  + (1 - q_t) mu mu^T``, so ``sum_t q_t C_t = ||q||^2 P D + (1 - ||q||^2) mu mu^T``: solve for P
  from the empirical averages, project the columns onto the simplex) or :func:`em` with attn
  fixed.
- **knows P, not attn**: :func:`kernel_attention` (``E[K(x_o, x_t) | k] = q_t (sum_ij P_ij^2
  mu_j / mu_i - 1)`` with ``K(i, j) = P_ij / mu_i - 1``: divide by the bracket, keep the top Q
  entries, project onto the simplex) or :func:`em` with P fixed.
- **neither** (joint EM, the MLE): :func:`em` alternating both M-steps from uniform P and
  uniform attn.

Each estimate (P_hat, attn_hat) is a linear model ``V = P_hat, A = attn_hat``, so its excess is
the exact closed form :meth:`~iclgym.tasks.sparse_bigram.SparseContextualBigramTask.
population_excess_mse` (no evaluation noise): :func:`oracle_ladder` reports
:meth:`~iclgym.tasks.sparse_bigram.SparseContextualBigramTask.parameter_metrics` per rung.
Measured (N=8, T=128, Q=2, 60 joint-EM iterations, a numpy reference): 20k samples excess/initial
0.0013, dist_P 0.026, dist_Q 0.023; 100k samples 0.0003, 0.013, 0.010; EM plateaus (excess/initial >
0.99) for its first 10 iterations.

All estimators take ``tokens`` (n, T + 1) int64 (context and query) and ``outputs`` (n,) int64
(x_o), e.g. ``batch.tokens`` and ``batch.targets[:, -1]`` of a training batch, and compute in
float64 on the tokens' device, in chunks of :data:`CHUNK` samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from iclgym.tasks.sparse_bigram import (
    SparseContextualBigramTask,
    project_simplex,
    stationary_law,
)
from iclgym.validation import as_int, invalid

CHUNK = 16384
"""Samples per chunk of the E-step ((CHUNK, T) float64 responsibilities)."""


def _check_data(task: SparseContextualBigramTask, tokens: Tensor, outputs: Tensor) -> None:
    t1 = task.seq_len
    if tokens.ndim != 2 or tokens.shape[1] != t1:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} are invalid: expected (n, {t1}) "
            "(T context tokens and the query)"
        )
    if outputs.shape != (tokens.shape[0],):
        raise ValueError(
            f"outputs of shape {tuple(outputs.shape)} are invalid: expected ({tokens.shape[0]},)"
        )
    if tokens.shape[0] < 1:
        raise ValueError("an estimator needs at least one sample (tokens has 0 rows)")


def empirical_stationary(tokens: Tensor, vocab_size: int) -> Tensor:
    """(N,) float64 frequencies of the context tokens ``tokens[:, :-1]`` (i.i.d. ``mu``)."""
    counts = torch.bincount(tokens[:, :-1].reshape(-1), minlength=vocab_size)
    return counts.double() / counts.sum()


def moment_transition(
    task: SparseContextualBigramTask,
    tokens: Tensor,
    outputs: Tensor,
    attn: np.ndarray | None = None,
) -> np.ndarray:
    """(N, N) float64 column-stochastic moment estimate of P given ``attn`` (default the
    task's): ``C = mean_i e_{o_i} (X_i q^(k_i))^T`` estimates ``s P D + (1 - s) mu mu^T`` with
    ``s = mean_i ||q^(k_i)||^2``, so ``P = (C - (1 - s) mu mu^T) D^-1 / s`` with the empirical
    ``mu`` of the context tokens; columns projected onto the simplex (module docstring)."""
    _check_data(task, tokens, outputs)
    n_vocab, dev = task.vocab_size, tokens.device
    q = torch.tensor(task.attn if attn is None else attn, dtype=torch.float64, device=dev)
    mu = empirical_stationary(tokens, n_vocab)
    c = torch.zeros(n_vocab, n_vocab, dtype=torch.float64, device=dev)
    s = 0.0
    for lo in range(0, tokens.shape[0], CHUNK):
        x, o = tokens[lo : lo + CHUNK], outputs[lo : lo + CHUNK]
        qk = q.T[x[:, -1]]  # (b, T)
        h = torch.zeros(x.shape[0], n_vocab, dtype=torch.float64, device=dev)
        h.scatter_add_(1, x[:, :-1], qk)  # X q^(k)
        c.index_add_(0, o, h)
        s += float((qk * qk).sum())
    n = tokens.shape[0]
    c, s = c / n, s / n
    pd = (c - (1.0 - s) * torch.outer(mu, mu)) / s
    p = pd / mu.clamp_min(1e-300)[None, :]
    return project_simplex(p, dim=0).cpu().numpy()


def kernel_attention(
    task: SparseContextualBigramTask,
    tokens: Tensor,
    outputs: Tensor,
    transition: np.ndarray | None = None,
) -> np.ndarray:
    """(T, N) float64 kernel-moment estimate of attn given P (default the task's): per query
    token k, ``m_t = mean_{i: k_i = k} K(o_i, x_{i,t})`` with ``K(i, j) = P_ij / mu_i - 1``,
    divided by ``beta = sum_ij P_ij^2 mu_j / mu_i - 1``; the top ``n_support`` entries are
    projected onto the simplex and the rest set to 0. A query token absent from the data gets
    the uniform column. Raises ``ValueError`` when ``beta <= 0`` (P = mu 1^T: no signal)."""
    _check_data(task, tokens, outputs)
    n_vocab, t, dev = task.vocab_size, task.context_len, tokens.device
    p_np = task.transition if transition is None else np.asarray(transition, dtype=np.float64)
    mu_np = task.stationary if transition is None else stationary_law(p_np)
    p = torch.tensor(p_np, dtype=torch.float64, device=dev)
    mu = torch.tensor(mu_np, dtype=torch.float64, device=dev)
    beta = float((p * p * mu[None, :] / mu[:, None]).sum()) - 1.0
    if beta <= 1e-12:
        raise invalid("transition", "P = mu 1^T", "a P whose columns differ from mu (beta > 0)")
    kernel = p / mu[:, None] - 1.0  # K[i, j]
    sums = torch.zeros(n_vocab, t, dtype=torch.float64, device=dev)
    counts = torch.bincount(tokens[:, -1], minlength=n_vocab).double()
    for lo in range(0, tokens.shape[0], CHUNK):
        x, o = tokens[lo : lo + CHUNK], outputs[lo : lo + CHUNK]
        sums.index_add_(0, x[:, -1], kernel[o].gather(1, x[:, :-1]))
    m = sums / counts.clamp_min(1.0)[:, None] / beta  # (N, T) estimates of q_t
    q = task.spec.n_support
    top = m.topk(q, dim=1).indices
    out = torch.zeros_like(m)
    out.scatter_(1, top, project_simplex(m.gather(1, top), dim=1))
    out[counts == 0] = 1.0 / t
    return out.T.cpu().numpy()


@dataclass(frozen=True)
class EMResult:
    """Output of :func:`em`."""

    transition: np.ndarray
    """(N, N) float64 column-stochastic P estimate (the given P if it was fixed)."""
    attn: np.ndarray
    """(T, N) float64 attention estimate (the given attn if it was fixed)."""
    history: list[dict[str, float]] = field(repr=False)
    """``task.parameter_metrics`` after each iteration (when ``track=True``), else []."""


def em(
    task: SparseContextualBigramTask,
    tokens: Tensor,
    outputs: Tensor,
    *,
    transition: np.ndarray | None = None,
    attn: np.ndarray | None = None,
    iterations: int = 60,
    track: bool = False,
    callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> EMResult:
    """Full-batch EM for the latent source position.

    E-step ``r_{i,t} ∝ q^(k_i)_t P[o_i, x_{i,t}]``; M-steps ``P[:, j] ∝ sum_i sum_t r_{i,t}
    1[x_{i,t} = j] e_{o_i}`` and ``q^(k)_t ∝ sum_{i: k_i = k} r_{i,t}``. A given ``transition``
    (N, N) or ``attn`` (T, N) is held fixed (the "knows P" / "knows attn" rungs); what is not
    given starts uniform (P = 11^T / N, attn = 1/T) and is fitted; with neither given this is
    the joint EM (the MLE). Columns without data keep their previous value. ``track`` records
    ``task.parameter_metrics`` after every iteration; ``callback(iteration, P, attn)`` is
    called after each. Raises ``ValueError`` for ``iterations`` < 1."""
    _check_data(task, tokens, outputs)
    iterations = as_int("iterations", iterations, 1)
    n_vocab, t, dev = task.vocab_size, task.context_len, tokens.device
    fit_p, fit_q = transition is None, attn is None
    p = torch.full((n_vocab, n_vocab), 1.0 / n_vocab, dtype=torch.float64, device=dev)
    if not fit_p:
        p = torch.tensor(np.asarray(transition, dtype=np.float64), device=dev)
    q = torch.full((t, n_vocab), 1.0 / t, dtype=torch.float64, device=dev)
    if not fit_q:
        q = torch.tensor(np.asarray(attn, dtype=np.float64), device=dev)
    history: list[dict[str, float]] = []
    for it in range(iterations):
        num_p = torch.zeros(n_vocab, n_vocab, dtype=torch.float64, device=dev)
        num_q = torch.zeros(n_vocab, t, dtype=torch.float64, device=dev)
        for lo in range(0, tokens.shape[0], CHUNK):
            x, o = tokens[lo : lo + CHUNK], outputs[lo : lo + CHUNK]
            ctx, k = x[:, :-1], x[:, -1]
            r = q.T[k] * p[o].gather(1, ctx)  # (b, T)
            r = r / r.sum(1, keepdim=True).clamp_min(1e-300)
            if fit_p:
                per_token = torch.zeros(x.shape[0], n_vocab, dtype=torch.float64, device=dev)
                per_token.scatter_add_(1, ctx, r)
                num_p.index_add_(0, o, per_token)
            if fit_q:
                num_q.index_add_(0, k, r)
        if fit_p:
            col = num_p.sum(0, keepdim=True)
            p = torch.where(col > 0, num_p / col.clamp_min(1e-300), p)
        if fit_q:
            row = num_q.sum(1, keepdim=True)
            q = torch.where(row > 0, num_q / row.clamp_min(1e-300), q.T).T
        p_np, q_np = p.cpu().numpy(), q.cpu().numpy()
        if track:
            history.append(task.parameter_metrics(p_np, q_np))
        if callback is not None:
            callback(it, p_np, q_np)
    return EMResult(p.cpu().numpy(), q.cpu().numpy(), history)


@dataclass(frozen=True)
class LadderEstimate:
    """One rung of :func:`oracle_ladder`."""

    rung: str
    """``"bayes"``, ``"knows_attn"``, ``"knows_P"`` or ``"neither"``."""
    method: str
    """``"closed form"``, ``"moments"``, ``"kernel"``, ``"em"`` or ``"joint em"``."""
    samples: int
    transition: np.ndarray = field(repr=False)
    attn: np.ndarray = field(repr=False)
    metrics: dict[str, float]
    """``task.parameter_metrics(transition, attn)``: excess_mse(_rel), dist_P, dist_Q, ..."""


def oracle_ladder(
    task: SparseContextualBigramTask,
    samples: int,
    *,
    seed: int = 0,
    iterations: int = 60,
    device: torch.device | str = "cpu",
) -> list[LadderEstimate]:
    """Every rung on ``samples`` training examples of ``task.generator(seed, "train")``: bayes,
    knows attn (moments, EM), knows P (kernel, EM), neither (joint EM), each with its exact
    metrics. Raises ``ValueError`` for ``samples`` or ``iterations`` < 1."""
    samples = as_int("samples", samples, 1)
    batch = task.sample(samples, generator=task.generator(seed, "train", device), device=device)
    x, o = batch.tokens, batch.targets[:, -1]
    p, q = task.transition, task.attn
    found = [
        ("bayes", "closed form", p, q),
        ("knows_attn", "moments", moment_transition(task, x, o), q),
        ("knows_attn", "em", em(task, x, o, attn=q, iterations=iterations).transition, q),
        ("knows_P", "kernel", p, kernel_attention(task, x, o)),
        ("knows_P", "em", p, em(task, x, o, transition=p, iterations=iterations).attn),
    ]
    joint = em(task, x, o, iterations=iterations)
    found.append(("neither", "joint em", joint.transition, joint.attn))
    return [
        LadderEstimate(rung, method, samples, tp, ta, task.parameter_metrics(tp, ta))
        for rung, method, tp, ta in found
    ]


__all__ = [
    "EMResult",
    "LadderEstimate",
    "em",
    "empirical_stationary",
    "kernel_attention",
    "moment_transition",
    "oracle_ladder",
]
