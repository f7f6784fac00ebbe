"""Sparse contextual bigrams (Ren, Wang, Lee 2024, *Learning and Transferring Sparse Contextual
Bigrams with Linear Transformers*, NeurIPS 2024, arXiv 2410.23438).

Conventions (the env page is ``docs/envs/ICL-SparseContextualBigram-v0.md``; the paper publishes
no code, so the sampling order and the P and q families are iclgym's reconstruction):

- ``P`` (:attr:`SparseContextualBigramTask.transition`, (N, N)) is **column-stochastic**:
  ``P[:, j]`` is the next-token law given the source token j; ``mu`` (:attr:`~SparseContextual
  BigramTask.stationary`) is its stationary law, ``P mu = mu``.
- ``attn`` ((T, N)) stacks the query vectors: column k is q^(k), a probability vector over the T
  context positions with at most ``n_support`` (the sparsity Q) non-zeros. The query never
  attends to itself.
- One example: draw ``x_1 .. x_T`` and the query ``x_{T+1}`` i.i.d. from ``mu``, let
  ``k = x_{T+1}``, draw a latent source position ``s ~ q^(k)`` and the output ``x_o ~ P[:, x_s]``.
  So ``Pr(x_o = i | X, k) = (P X q^(k))_i``, and the marginal of ``x_o`` is ``mu``.
- ``P`` and ``attn`` are fixed by ``task_seed``: a task instance is one (P, attn). The context
  carries no information about P (its tokens are i.i.d. ``mu``), so a learner must memorise P in
  its weights; learning is measured against training samples, not context length.

**Batch mapping** (single-label, as template tasks): a sequence is the T context tokens and the
query, ``tokens`` (B, T + 1) (positions 0 .. T - 1 are x_1 .. x_T, position T the query);
``targets[:, t] = tokens[:, t + 1]`` for t < T and ``targets[:, T]`` is x_o, the only scored
position (:attr:`~SparseContextualBigramTask.first_scored_position` = T). Source positions are
0-based (``params["src_pos"]`` in 0 .. T - 1). ``true_probs`` is ``mu`` at the context positions
(the next context token is a fresh ``mu`` draw) and ``P[:, x_s]`` at the query (the law given
the latent source); the oracle knows (P, attn) and predicts ``P X q^(k)`` (Bayes over the
latent source position; ``mu`` at the context positions). A sampler's ``(tokens, target,
src_pos, bayes_probs)`` are ``batch.tokens``, ``batch.targets[:, -1]``,
``batch.params["src_pos"]`` and :meth:`~SparseContextualBigramTask.bayes_probs`.

**Sampling.** Every row takes T + 3 64-bit words from the generator (one per context token and
query, one for the source position, one for the output); on the CPU one compiled pass turns
them into the batch, the numbers of the torch code bit for bit. Each word w in [0, 2**63) gives a
53-bit uniform: the source position and the output are inverse-CDF draws with u = ((w >> 10) +
1) / 2**53 in (0, 1] (:func:`~iclgym.tasks.markov.inverse_cdf_thresholds`: a token of
probability 0 is never drawn), and so are the input tokens of a non-uniform ``mu``; a uniform
``mu`` (``perm_mixture``) gives token ``floor(u N)`` with u = (w >> 10) / 2**53 in [0, 1), an
integer multiply-shift (the top log2 N bits of w for a power-of-two N; uniform up to 2**-53
otherwise). The law is that of ``torch.multinomial`` draws; the rows are independent shares
of the stream, so draws compose across batch sizes
(:attr:`~SparseContextualBigramTask.sample_composes`).

**Closed forms** (exact under i.i.d. ``mu`` tokens): with ``D = diag(mu)`` and
``M(u, v) = (u.v)(D - mu mu^T) + (1^T u)(1^T v) mu mu^T = E[X u v^T X^T]``, the Bayes MSE against
the one-hot output is ``1 - sum_k mu_k tr(P M(q_k, q_k) P^T)`` and the excess MSE of a linear
model ``f(X) = V X a_k`` over the Bayes predictor is
``sum_k mu_k [tr(P M(q,q) P^T) - 2 tr(P M(q,a) V^T) + tr(V M(a,a) V^T)]``
(:meth:`~SparseContextualBigramTask.population_excess_mse`, no Monte-Carlo noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch
from numba import njit
from torch import Tensor

from iclgym.tasks import kernels
from iclgym.tasks.base import Batch, Strategy, Task, TaskSpec, check_batch_size
from iclgym.tasks.markov import inverse_cdf_thresholds
from iclgym.tasks.stationary import gth_stationary
from iclgym.validation import (
    as_bool,
    as_float,
    as_int,
    check_memory,
    check_sequence_memory,
    invalid,
)

P_FAMILIES = ("perm_mixture", "dirichlet", "custom")
Q_WEIGHTS = ("uniform", "dirichlet")
STOCHASTIC_TOL = 1e-6
"""Tolerance of the column sums of a custom ``transition`` or ``attn``."""
CENTRED_TOL = 1e-8
"""A centred matrix ``X - mu 1^T`` is numerically zero (every column is ``mu``, so a
correlation with it is undefined) when ``||X - mu 1^T||_mu <= CENTRED_TOL ||X||_mu``
(:func:`transition_correlation`)."""
RHO_TOL = 1e-6
""":func:`make_transfer_pair` refuses a ``rho`` whose realised correlation differs by more."""
TASK_STREAM, TRANSFER_STREAM = 7, 8
"""Seed streams of ``task_seed`` (``numpy.random.SeedSequence(task_seed, spawn_key=(stream,
part))``): :data:`TASK_STREAM` draws the task's P (part 0) and attn (part 1),
:data:`TRANSFER_STREAM` the independent P_ind (part 0) and fresh attn (part 1) of
:func:`make_transfer_pair`. Streams 0-6 are the data splits, dropout, the templates' fixed
training set, model init and batch order (:mod:`iclgym.harness.model`)."""
UNIFORM_MULTIPLY_MAX = 1024
"""Uniform tokens are drawn by an integer multiply-shift below this vocabulary size (the 53-bit
product fits in int64), by inverse CDF above."""
LOG_FLOOR = 1e-30
"""Log-probabilities are floored at log(1e-30) where a law is exactly 0."""
OUTPUT_FLOOR = 1e-6
"""Clip of a linear model's output before it is read as a distribution (its CE is reported
raw and clipped)."""


def _matrix(name: str, value: object, shape: tuple[int, int]) -> np.ndarray:
    """A finite float64 (rows, cols) array from nested sequences or an array."""
    try:
        a = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid(name, value, f"a {shape[0]}x{shape[1]} array of floats") from None
    if a.shape != shape or not np.isfinite(a).all():
        raise invalid(
            name, _short(value), f"a finite {shape[0]}x{shape[1]} array (got shape {a.shape})"
        )
    return a


def _short(value: object) -> object:
    text = repr(value)
    return value if len(text) <= 80 else f"{text[:77]}..."


def _as_tuple(a: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(x) for x in row) for row in a)


def is_irreducible(transition: np.ndarray) -> bool:
    """True when the chain of column-stochastic ``transition`` (N, N) is irreducible (every
    token reaches every other), i.e. its stationary law is unique and strictly positive."""
    n = transition.shape[0]
    reach = (transition > 0) | np.eye(n, dtype=bool)
    for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
        reach = (reach.astype(np.float64) @ reach.astype(np.float64)) > 0
    return bool(reach.all())


def stationary_law(transition: np.ndarray) -> np.ndarray:
    """(N,) float64 stationary law ``mu`` of column-stochastic ``transition`` (``P mu = mu``),
    by GTH elimination (:func:`iclgym.tasks.stationary.gth_stationary` on ``P^T``, no
    subtraction). Raises ``ValueError`` when it is not unique and strictly positive."""
    if not is_irreducible(transition):
        raise ValueError("the transition matrix is reducible: its stationary law is not unique")
    mu = gth_stationary(torch.from_numpy(np.ascontiguousarray(transition.T))[None])[0].numpy()
    return mu / mu.sum()


def project_simplex(x: Tensor, dim: int = 0) -> Tensor:
    """Euclidean projection of every slice of ``x`` along ``dim`` onto the probability simplex
    (Duchi et al. 2008, sort-based, O(n log n)); same shape and dtype."""
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    s, _ = moved.sort(-1, descending=True)
    cum = s.cumsum(-1) - 1.0
    k = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
    count = (s - cum / k > 0).sum(-1, keepdim=True)  # the support size rho >= 1
    theta = cum.gather(-1, count - 1) / count.to(x.dtype)
    return (moved - theta).clamp_min(0.0).movedim(-1, dim)


@dataclass(frozen=True)
class SparseContextualBigramSpec(TaskSpec):
    """Parameters of a sparse-contextual-bigram task (the Arguments of
    ``docs/envs/ICL-SparseContextualBigram-v0.md``).

    Attributes:
        vocab_size: N >= 2 tokens.
        seq_len: T >= 1 context positions (a sequence holds T + 1 tokens with the query).
        n_support: Q, the most non-zeros of each q^(k), 1 <= Q <= T.
        p_family: how P is built: ``"perm_mixture"`` (``P = sum_m w_m Pi_m`` over ``n_perms``
            random permutation matrices, ``w ~ Dir(1_M)``; doubly stochastic, so ``mu`` is
            uniform), ``"dirichlet"`` (each column ``~ Dir(p_alpha 1_N)``; ``mu`` by GTH) or
            ``"custom"`` (``transition``).
        n_perms: M >= 1 permutations of ``perm_mixture``.
        p_floor: f in [0, 1): ``P <- (1 - f) P + f / N`` (both drawn families); 0 with
            ``"custom"`` (a custom P is used as given: floor it before passing it).
        p_alpha: Dirichlet concentration of the columns of ``"dirichlet"``, > 0.
        q_weights: weights on each support, ``"uniform"`` (1/Q each) or ``"dirichlet"``
            (``(1 - q_floor) Dir(q_alpha 1_Q) + q_floor / Q``).
        q_alpha: concentration of the Dirichlet weights, > 0.
        q_floor: rho in (0, 1] for Dirichlet weights (0 is refused: the l1 prox would prune
            the tiny weights); any value in [0, 1] is accepted (and unused)
            with uniform weights.
        task_seed: int >= 0; P and attn depend on it only (stream :data:`TASK_STREAM`).
        transition: the custom P, N x N nested sequences (or an array), non-negative,
            column sums 1 within 1e-6 (renormalised exactly), irreducible (``mu`` unique and
            strictly positive); only with ``p_family="custom"``.
        attn: a custom attention matrix, T x N, non-negative, columns summing to 1 within
            1e-6 (renormalised), at most ``n_support`` non-zeros per column; ``None`` draws
            the supports (uniform Q-subsets of the T positions, independently per query token)
            and the ``q_weights``.

    The data (context tokens, source positions, outputs) come from the split's seed stream
    (``task.generator(seed, split)``), not from the spec. Integers and floats may be numpy
    numbers. Raises ``ValueError`` naming the parameter, its value and the valid range for
    anything outside them, including sizes whose tables or 64 sequences would not fit in
    memory (:func:`iclgym.validation.check_sequence_memory`).
    """

    vocab_size: int = 8
    seq_len: int = 128
    n_support: int = 2
    p_family: str = "perm_mixture"
    n_perms: int = 3
    p_floor: float = 0.0
    p_alpha: float = 1.0
    q_weights: str = "uniform"
    q_alpha: float = 1.0
    q_floor: float = 0.5
    task_seed: int = 0
    transition: tuple[tuple[float, ...], ...] | None = None
    attn: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        n = as_int("vocab_size", self.vocab_size, 2)
        t = as_int("seq_len", self.seq_len, 1)
        put("vocab_size", n)
        put("seq_len", t)
        put("n_support", as_int("n_support", self.n_support, 1, t))
        if self.p_family not in P_FAMILIES:
            raise invalid("p_family", self.p_family, f"one of {P_FAMILIES}")
        put("n_perms", as_int("n_perms", self.n_perms, 1))
        put("p_floor", as_float("p_floor", self.p_floor, 0.0, 1.0, high_open=True))
        put("p_alpha", as_float("p_alpha", self.p_alpha, 0.0, low_open=True))
        if self.q_weights not in Q_WEIGHTS:
            raise invalid("q_weights", self.q_weights, f"one of {Q_WEIGHTS}")
        put("q_alpha", as_float("q_alpha", self.q_alpha, 0.0, low_open=True))
        put("q_floor", as_float("q_floor", self.q_floor, 0.0, 1.0))
        if self.q_weights == "dirichlet" and self.q_floor == 0.0:
            raise invalid(
                "q_floor",
                self.q_floor,
                "a float in (0, 1] with q_weights='dirichlet' (tiny Dirichlet weights are "
                "pruned by the l1 prox)",
            )
        put("task_seed", as_int("task_seed", self.task_seed, 0))
        check_memory("vocab_size", n, 48.0 * n * n, f"the {n}x{n} transition tables")
        check_memory("seq_len", t, 16.0 * t * n, f"the {t}x{n} attention tables")
        check_sequence_memory("seq_len", t, t + 1, n)
        if self.p_family == "custom":
            if self.p_floor != 0.0:
                raise invalid(
                    "p_floor",
                    self.p_floor,
                    "0.0 with p_family='custom' (the custom transition is used as given: mix "
                    "the floor into it before passing it)",
                )
            if self.transition is None:
                raise invalid("transition", None, "an NxN matrix with p_family='custom'")
            put("transition", _as_tuple(_check_transition(self.transition, n)))
        elif self.transition is not None:
            raise invalid(
                "transition",
                _short(self.transition),
                f"None with p_family={self.p_family!r} (pass p_family='custom')",
            )
        if self.attn is not None:
            put("attn", _as_tuple(_check_attn(self.attn, t, n, self.n_support)))


def _check_transition(value: object, n: int) -> np.ndarray:
    p = _matrix("transition", value, (n, n))
    if (p < 0).any():
        raise invalid("transition", _short(value), "non-negative entries")
    sums = p.sum(0)
    if np.abs(sums - 1.0).max() > STOCHASTIC_TOL:
        raise invalid(
            "transition",
            _short(value),
            f"columns summing to 1 within {STOCHASTIC_TOL:g} (column-stochastic: P[:, j] is the "
            f"law after token j); column sums {np.round(sums, 6).tolist()}",
        )
    p = p / sums
    if not is_irreducible(p):
        raise invalid(
            "transition",
            _short(value),
            "an irreducible chain (a unique, strictly positive stationary law)",
        )
    return p


def _check_attn(value: object, t: int, n: int, q: int) -> np.ndarray:
    a = _matrix("attn", value, (t, n))
    if (a < 0).any():
        raise invalid("attn", _short(value), "non-negative entries")
    sums = a.sum(0)
    if np.abs(sums - 1.0).max() > STOCHASTIC_TOL:
        raise invalid(
            "attn",
            _short(value),
            f"columns summing to 1 within {STOCHASTIC_TOL:g} (column k is q^(k)); column sums "
            f"{np.round(sums, 6).tolist()}",
        )
    nnz = (a > 0).sum(0)
    if nnz.max() > q:
        raise invalid(
            "attn",
            _short(value),
            f"at most n_support={q} non-zeros per column (column {int(nnz.argmax())} has "
            f"{int(nnz.max())})",
        )
    return a / sums


def _rng(seed: int, stream: int, part: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, part)))


def draw_transition(spec: SparseContextualBigramSpec, rng: np.random.Generator) -> np.ndarray:
    """(N, N) float64 column-stochastic P of ``spec.p_family`` (``perm_mixture`` or
    ``dirichlet``) from ``rng``, with the ``p_floor`` mixed in."""
    n = spec.vocab_size
    if spec.p_family == "perm_mixture":
        weights = rng.dirichlet(np.ones(spec.n_perms))
        p = np.zeros((n, n))
        for w in weights:
            p[rng.permutation(n), np.arange(n)] += w  # Pi[:, j] = e_{pi(j)}
    elif spec.p_family == "dirichlet":
        p = rng.dirichlet(np.full(n, spec.p_alpha), size=n).T
    else:
        raise invalid("p_family", spec.p_family, "'perm_mixture' or 'dirichlet' to draw P")
    p = (1.0 - spec.p_floor) * p + spec.p_floor / n
    return p / p.sum(0)


def draw_attn(spec: SparseContextualBigramSpec, rng: np.random.Generator) -> np.ndarray:
    """(T, N) float64 attention: for each query token k a uniformly random ``n_support``-subset
    of the T positions with ``spec.q_weights`` weights, drawn from ``rng`` in order k = 0 ..
    N - 1."""
    t, n, q = spec.seq_len, spec.vocab_size, spec.n_support
    attn = np.zeros((t, n))
    for k in range(n):
        support = np.sort(rng.choice(t, size=q, replace=False))
        if spec.q_weights == "uniform":
            w = np.full(q, 1.0 / q)
        else:
            w = (1.0 - spec.q_floor) * rng.dirichlet(np.full(q, spec.q_alpha)) + spec.q_floor / q
        attn[support, k] = w
    return attn / attn.sum(0)


def transition_correlation(
    first: np.ndarray, second: np.ndarray, mu: np.ndarray | None = None
) -> float:
    """corr(P, P~) = <P_bar, P~_bar>_mu / (||P_bar||_mu ||P~_bar||_mu) of two
    column-stochastic (N, N) matrices, where ``X_bar = X - mu 1^T`` and ``<X, Y>_mu = sum_j mu_j
    <X[:, j], Y[:, j]>`` weights the source columns by ``mu`` (default: the stationary law of
    ``first``; with uniform ``mu`` this is the plain Frobenius cosine).

    Raises ``ValueError`` naming ``first`` or ``second`` when its centred part is numerically
    zero (``||X_bar||_mu <= CENTRED_TOL ||X||_mu``, :data:`CENTRED_TOL`: every column is
    ``mu``), where the correlation is undefined."""
    mu = stationary_law(first) if mu is None else np.asarray(mu, dtype=np.float64)
    value = _centred_cosine(first, second, mu)
    if math.isnan(value):
        for name, x in (("first", first), ("second", second)):
            if _centred_is_zero(x, mu):
                raise invalid(
                    name,
                    _short(np.asarray(x).tolist()),
                    f"a matrix with a column different from mu (||X - mu 1^T||_mu > "
                    f"{CENTRED_TOL:g} ||X||_mu): its centred part is numerically zero, so the "
                    "correlation is undefined",
                )
    return value


def _inner(x: np.ndarray, y: np.ndarray, mu: np.ndarray) -> float:
    """``<X, Y>_mu = sum_j mu_j <X[:, j], Y[:, j]>``."""
    return float(((x * y).sum(0) * mu).sum())


def _centred_is_zero(x: np.ndarray, mu: np.ndarray) -> bool:
    """True when ``||x - mu 1^T||_mu <= CENTRED_TOL ||x||_mu`` (numerically zero)."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - mu[:, None]
    return math.sqrt(_inner(centred, centred, mu)) <= CENTRED_TOL * math.sqrt(_inner(x, x, mu))


def _centred_cosine(first: np.ndarray, second: np.ndarray, mu: np.ndarray) -> float:
    """:func:`transition_correlation` with ``mu`` given, NaN where it is undefined."""
    if _centred_is_zero(first, mu) or _centred_is_zero(second, mu):
        return math.nan
    a = np.asarray(first, dtype=np.float64) - mu[:, None]
    b = np.asarray(second, dtype=np.float64) - mu[:, None]
    return _inner(a, b, mu) / math.sqrt(_inner(a, a, mu) * _inner(b, b, mu))


@njit(cache=True, nogil=True)
def _lower_bound(thresholds, u):  # pragma: no cover - compiled
    """``torch.searchsorted`` (left) of ``u`` in a row of thresholds: its binary search."""
    lo, hi = 0, thresholds.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if thresholds[mid] < u:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _draw(  # pragma: no cover - compiled
    words, shift, mu_cdf, support, w_cdf, p_cdf, tokens, targets, src
):
    b, width = tokens.shape
    n = p_cdf.shape[0]
    last = width - 1
    for r in range(b):
        for p in range(width):
            w = words[r, p]
            if shift >= 0:
                token = kernels.uniform_index(w, shift, n)
            else:
                token = _lower_bound(mu_cdf, np.float64((w >> 10) + 1) * 2.0**-53)
            tokens[r, p] = token
            if p > 0:
                targets[r, p - 1] = token
        k = tokens[r, last]
        u = np.float64((words[r, width] >> 10) + 1) * 2.0**-53
        position = support[k, _lower_bound(w_cdf[k], u)]
        src[r] = position
        u = np.float64((words[r, width + 1] >> 10) + 1) * 2.0**-53
        targets[r, last] = _lower_bound(p_cdf[tokens[r, position]], u)


@njit(cache=True, nogil=True)
def _laws(tokens, src, support, weights, columns, true, oracle):  # pragma: no cover - compiled
    b, last = tokens.shape[0], tokens.shape[1] - 1
    n, q = columns.shape[0], support.shape[1]
    for r in range(b):
        k = tokens[r, last]
        source = tokens[r, src[r]]
        first = tokens[r, support[k, 0]]
        for j in range(n):
            true[r, j] = columns[source, j]
            oracle[r, j] = weights[k, 0] * columns[first, j]
        for i in range(1, q):  # float32 products and sums in the numpy reference's order
            token = tokens[r, support[k, i]]
            for j in range(n):
                oracle[r, j] += weights[k, i] * columns[token, j]


class SparseContextualBigramTask(Task):
    """Sampler, Bayes oracle, closed-form population quantities and metrics of
    :class:`SparseContextualBigramSpec`."""

    name = "sparse_contextual_bigram"
    spec: SparseContextualBigramSpec
    probability_reward = "squared"
    privileged_strategies = frozenset({"true"})
    """The paper's loss ``1/2 ||e_{x_o} - f||^2`` as the env reward (Ren, Wang, Lee 2024)."""

    def __init__(self, spec: SparseContextualBigramSpec | None = None, **kwargs: object) -> None:
        if spec is not None and kwargs:
            raise ValueError("pass either a spec or keyword arguments, not both")
        super().__init__(spec if spec is not None else SparseContextualBigramSpec(**kwargs))  # type: ignore[arg-type]
        s = self.spec
        if s.p_family == "custom":
            p = np.array(s.transition, dtype=np.float64)
        else:
            p = draw_transition(s, _rng(s.task_seed, TASK_STREAM, 0))
        if s.p_family == "perm_mixture":
            mu = np.full(s.vocab_size, 1.0 / s.vocab_size)  # doubly stochastic: exact
        else:
            try:
                mu = stationary_law(p)
            except ValueError:
                raise invalid(
                    "task_seed",
                    s.task_seed,
                    f"a seed whose {s.p_family} P is irreducible (this one is not: raise "
                    "p_alpha or set p_floor > 0)",
                ) from None
        attn = (
            np.array(s.attn, dtype=np.float64)
            if s.attn is not None
            else draw_attn(s, _rng(s.task_seed, TASK_STREAM, 1))
        )
        for a in (p, mu, attn):
            a.setflags(write=False)
        self._p, self._mu, self._attn = p, mu, attn
        # per query token: the support positions (non-zeros first, padded to Q with unused
        # positions of weight 0, never drawn) and their weights
        q = s.n_support
        support = np.zeros((s.vocab_size, q), dtype=np.int64)
        weights = np.zeros((s.vocab_size, q))
        for k in range(s.vocab_size):
            nz = np.flatnonzero(attn[:, k] > 0)
            pad = np.setdiff1d(np.arange(s.seq_len), nz)[: q - nz.size]
            support[k] = np.concatenate([nz, pad])
            weights[k, : nz.size] = attn[nz, k]
        support.setflags(write=False)
        self._support, self._weights = support, weights
        self._columns32 = np.ascontiguousarray(p.T, dtype=np.float32)  # row j = P[:, j]
        self._weights32 = weights.astype(np.float32)
        self._uniform_mu = bool((mu == mu[0]).all())
        self._device_tables: dict[str, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ the task instance
    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def seq_len(self) -> int:
        """T + 1 positions: the T context tokens and the query."""
        return self.spec.seq_len + 1

    @property
    def context_len(self) -> int:
        """T, the context positions (the rows of ``attn``)."""
        return self.spec.seq_len

    @property
    def first_scored_position(self) -> int:
        """T: only the query position is scored."""
        return self.spec.seq_len

    @property
    def transition(self) -> np.ndarray:
        """(N, N) float64 read-only P, column-stochastic (``P[:, j]``: the law after token j)."""
        return self._p

    @property
    def stationary(self) -> np.ndarray:
        """(N,) float64 read-only ``mu``, the law of every input token (``P mu = mu``)."""
        return self._mu

    @property
    def attn(self) -> np.ndarray:
        """(T, N) float64 read-only attention: column k is q^(k)."""
        return self._attn

    @property
    def support(self) -> np.ndarray:
        """(N, Q) int64 read-only: the support positions of each q^(k) (0-based; where q^(k)
        has fewer than Q non-zeros, padded with positions of weight 0)."""
        return self._support

    @property
    def sample_composes(self) -> bool:
        """True: each row reads its own T + 3 words of the stream."""
        return True

    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        key = str(device)
        if key not in self._device_tables:
            p = torch.tensor(self._p).to(device)
            mu = torch.tensor(self._mu).to(device)
            weights = torch.tensor(self._weights).to(device)
            self._device_tables[key] = {
                "columns": p.T.contiguous(),  # (N, N) row j = P[:, j]
                "mu": mu,
                "log_mu": mu.float().clamp_min(LOG_FLOOR).log(),
                "mu_cdf": inverse_cdf_thresholds(mu),  # (N - 1,)
                "p_cdf": inverse_cdf_thresholds(p.T.contiguous()),  # (N, N - 1)
                "support": torch.tensor(self._support).to(device),
                "weights": weights,
                "w_cdf": inverse_cdf_thresholds(weights),  # (N, Q - 1)
            }
        return self._device_tables[key]

    # ------------------------------------------------------------------------- sampling
    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> Batch:
        """``batch_size`` examples (see the module docstring): tokens (B, T + 1) int64, targets
        (B, T + 1) int64 with x_o last, ``params["src_pos"]`` (B,) int64 in 0 .. T - 1."""
        check_batch_size(batch_size)
        device = torch.device(device) if device is not None else generator.device
        t = self.spec.seq_len
        tab = self._tables(generator.device)
        words = torch.empty((batch_size, t + 3), dtype=torch.int64, device=generator.device)
        words.random_(generator=generator)  # uniform on [0, 2**63)
        if kernels.available(generator.device):
            tokens, targets, src = self._draw(words, tab)
        else:
            tokens, targets, src = self._draw_torch(words, tab)
        mask = torch.zeros(batch_size, t + 1, dtype=torch.bool, device=device)
        mask[:, t] = True
        return Batch(
            tokens=tokens.to(device),
            targets=targets.to(device),
            loss_mask=mask,
            params={"src_pos": src.to(device)},
            vocab_size=self.vocab_size,
            true_probs_fn=self.true_probs,
        )

    def _draw(self, words: Tensor, tab: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(tokens, targets, src_pos)`` from the CPU words (B, T + 3) in one compiled pass,
        the numbers of :meth:`_draw_torch` bit for bit (``tests/tasks/test_sparse_bigram.py``)
        at a fraction of its passes over the (B, T + 1) tokens."""
        n, (b, width) = self.vocab_size, words.shape
        tokens = torch.empty(b, width - 2, dtype=torch.int64)
        targets = torch.empty(b, width - 2, dtype=torch.int64)
        src = torch.empty(b, dtype=torch.int64)
        if not (self._uniform_mu and n < UNIFORM_MULTIPLY_MAX):
            shift = -1  # inverse CDF of mu
        else:  # the top log2(N) bits for a power of two, else the multiply-shift
            shift = 64 - n.bit_length() if n & (n - 1) == 0 else 0
        _draw(
            words.numpy(),
            shift,
            tab["mu_cdf"].numpy(),
            tab["support"].numpy(),
            tab["w_cdf"].numpy(),
            tab["p_cdf"].numpy(),
            tokens.numpy(),
            targets.numpy(),
            src.numpy(),
        )
        return tokens, targets, src

    def _draw_torch(
        self, words: Tensor, tab: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(tokens, targets, src_pos)`` from the words (B, T + 3) in torch (any device; the
        reference of :meth:`_draw`)."""
        n, t = self.vocab_size, self.spec.seq_len
        if self._uniform_mu and n < UNIFORM_MULTIPLY_MAX:
            # floor(u N) with the 53-bit u = (w >> 10) / 2**53 in [0, 1), in integers; for a
            # power of two N the same number is the top log2(N) bits of w
            if n & (n - 1) == 0:
                tokens = words[:, : t + 1] >> (63 - (n.bit_length() - 1))
            else:
                tokens = ((words[:, : t + 1] >> 10) * n) >> 53
        else:
            u_tokens = ((words[:, : t + 1] >> 10) + 1).double().mul_(2.0**-53)  # (0, 1]
            tokens = torch.searchsorted(tab["mu_cdf"], u_tokens)
        u = ((words[:, t + 1 :] >> 10) + 1).double().mul_(2.0**-53)  # (B, 2) in (0, 1]
        k = tokens[:, t]
        slot = torch.searchsorted(tab["w_cdf"][k], u[:, :1].contiguous())
        src = tab["support"][k].gather(1, slot)  # (B, 1)
        source = tokens.gather(1, src)[:, 0]
        target = torch.searchsorted(tab["p_cdf"][source], u[:, 1:].contiguous())
        return tokens, torch.cat([tokens[:, 1:], target], 1), src[:, 0]

    def true_probs(self, batch: Batch) -> Tensor:
        """(B, T + 1, N) float32: ``mu`` at the context positions, ``P[:, x_s]`` at the query."""
        tokens = batch.tokens
        tab = self._tables(tokens.device)
        b, t = tokens.shape[0], self.spec.seq_len
        out = torch.empty(b, t + 1, self.vocab_size, device=tokens.device)
        out[:, :t] = tab["mu"].float()
        source = tokens.gather(1, batch.params["src_pos"][:, None])[:, 0]
        out[:, t] = tab["columns"][source].float()
        return out

    def bayes_probs(self, tokens: Tensor) -> Tensor:
        """(B, N) float64 Bayes next-token law at the query, ``P X q^(k)`` with k the query
        token, for ``tokens`` (B, T + 1) int64 (optimal for MSE against the
        one-hot output, for cross-entropy and for accuracy)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} are invalid: expected (B, "
                f"{self.seq_len}) (T context tokens and the query)"
            )
        tab = self._tables(tokens.device)
        k = tokens[:, -1]
        src = tokens.gather(1, tab["support"][k])  # (B, Q) source tokens
        return (tab["weights"][k].unsqueeze(-1) * tab["columns"][src]).sum(1)

    # ------------------------------------------------------------ oracle and strategies
    def _with_context(self, tokens: Tensor, last: Tensor) -> Tensor:
        """(B, T + 1, N) float32 log-probs: ``log mu`` at the context, ``last`` (B, N) laws at
        the query (floored at :data:`LOG_FLOOR`)."""
        tab = self._tables(tokens.device)
        b, t = tokens.shape[0], self.spec.seq_len
        out = torch.empty(b, t + 1, self.vocab_size, device=tokens.device)
        out[:, :t] = tab["log_mu"]
        out[:, t] = last.float().clamp_min(LOG_FLOOR).log()
        return out

    def oracle(self, batch: Batch) -> Tensor:
        """Bayes log-probabilities (B, T + 1, N) float32 given the tokens and (P, attn): ``log
        mu`` at the context positions, ``log P X q^(k)`` at the query (closed form)."""
        return self._with_context(batch.tokens, self.bayes_probs(batch.tokens))

    @property
    def oracle_name(self) -> str:
        return "bayes (closed form, knows P and attn)"

    def online(self, batch: Batch) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        """The laws at the query position T only: ``(true, oracle)``, (B, N) float32 numpy,
        ``P[:, x_s]`` and ``P X q^(k)`` (float32 sums over the support in order); O(B (Q + 1)
        N) work in one compiled pass. Raises ``ValueError`` at any other position."""
        tokens = batch.tokens.cpu().numpy()
        src = batch.params["src_pos"].cpu().numpy()
        true = np.empty((tokens.shape[0], self.vocab_size), dtype=np.float32)
        oracle = np.empty_like(true)
        _laws(tokens, src, self._support, self._weights32, self._columns32, true, oracle)
        last = self.spec.seq_len

        def step(t: int) -> tuple[np.ndarray, np.ndarray]:
            if t != last:
                raise ValueError(f"online: this task scores position {last} only, got t={t}")
            return true, oracle

        return step

    def episode_info(self, batch: Batch) -> dict[str, object]:
        """Per-episode env info (diagnostics only, given after the step):
        ``query_token`` (B,) and the latent ``src_pos`` (B,) (0-based), numpy int64."""
        return {
            "query_token": batch.tokens[:, -1].cpu().numpy().copy(),
            "src_pos": batch.params["src_pos"].cpu().numpy().copy(),
        }

    @property
    def strategies(self) -> Mapping[str, Strategy]:
        """Reference predictors at the query (``log mu`` at the context), least to most
        informed: ``uniform`` (1/N), ``unigram`` (``mu``: the marginal of x_o, and the linear
        transformer at its init), ``uniform_attention`` (``P X 1/T``: knows P but attends
        uniformly, the end of stage 1) and ``true`` (``P[:, x_s]``: reads the latent source,
        privileged). Each is a linear model ``V X a_k`` (:meth:`strategy_parameters`), so its
        population MSE is a closed form."""

        def linear(name: str) -> Strategy:
            def predict(batch: Batch) -> Tensor:
                v, a = self.strategy_parameters(name)
                return self._with_context(batch.tokens, _linear_output(v, a, batch.tokens))

            return predict

        def true(batch: Batch) -> Tensor:
            return self._with_context(batch.tokens, batch.true_probs[:, -1])

        return {
            "uniform": linear("uniform"),
            "unigram": linear("unigram"),
            "uniform_attention": linear("uniform_attention"),
            "true": true,
        }

    def strategy_parameters(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(V (N, N), A (T, N)) float64 of a linear predictor ``f(X) = V X a_k``: ``uniform``
        (V = 11^T / N), ``unigram`` (V = mu 1^T, A = 1/T: the ``scb_ppg`` init),
        ``uniform_attention`` (V = P, A = 1/T) or ``bayes`` (V = P, A = attn)."""
        n, t = self.vocab_size, self.spec.seq_len
        flat = np.full((t, n), 1.0 / t)
        table = {
            "uniform": (np.full((n, n), 1.0 / n), flat),
            "unigram": (np.repeat(self._mu[:, None], n, 1), flat),
            "uniform_attention": (self._p.copy(), flat),
            "bayes": (self._p.copy(), self._attn.copy()),
        }
        if name not in table:
            raise invalid("name", name, f"one of {tuple(table)}")
        return table[name]

    # ------------------------------------------------------ closed-form population values
    def _moments(self, v: np.ndarray, a: np.ndarray) -> float:
        """sum_k mu_k [tr(P M(q,q) P^T) - 2 tr(P M(q,a) V^T) + tr(V M(a,a) V^T)]."""
        p, mu, q = self._p, self._mu, self._attn

        def c(x: np.ndarray, y: np.ndarray) -> float:  # tr(X (D - mu mu^T) Y^T)
            return float(((x * y).sum(0) * mu).sum() - (x @ mu) @ (y @ mu))

        pm, vm = p @ mu, v @ mu
        qq, qa, aa = (q * q).sum(0), (q * a).sum(0), (a * a).sum(0)
        sa = a.sum(0)
        per_k = (
            qq * c(p, p)
            + pm @ pm
            - 2.0 * (qa * c(p, v) + sa * (pm @ vm))
            + aa * c(v, v)
            + sa**2 * (vm @ vm)
        )
        return float((mu * per_k).sum())

    def _check_linear(self, value: Any, attention: Any) -> tuple[np.ndarray, np.ndarray]:
        n, t = self.vocab_size, self.spec.seq_len
        v = _to_numpy("value", value, (n, n))
        a = _to_numpy("attention", attention, (t, n))
        return v, a

    def population_excess_mse(self, value: Any, attention: Any) -> float:
        """Exact population excess MSE of the linear model ``f(X) = V X a_k`` over the Bayes
        predictor, ``E ||P X q_k - V X a_k||^2`` averaged over the query k ~ mu (closed
        form, no Monte-Carlo noise); ``value`` V (N, N) and ``attention`` A (T, N), numpy arrays
        or tensors (read in float64). The MSE is ``||e_{x_o} - f||^2`` summed over the
        vocabulary (not halved). Raises ``ValueError`` for wrong shapes or non-finite
        entries."""
        v, a = self._check_linear(value, attention)
        return max(0.0, self._moments(v, a))

    def population_mse(self, value: Any, attention: Any) -> float:
        """Population MSE ``E ||e_{x_o} - V X a_k||^2`` of a linear model:
        :meth:`bayes_mse` + :meth:`population_excess_mse`."""
        return self.bayes_mse + self.population_excess_mse(value, attention)

    @cached_property
    def bayes_mse(self) -> float:
        """Population MSE of the Bayes predictor, ``1 - sum_k mu_k tr(P M(q_k, q_k) P^T)``."""
        zero = np.zeros((self.vocab_size, self.vocab_size))
        return 1.0 - self._moments(zero, np.zeros_like(self._attn))

    @cached_property
    def initial_excess(self) -> float:
        """Excess MSE at the uniform init (V = mu 1^T, A = 1/T: always predicting ``mu``),
        ``sum_k mu_k tr(P M(q_k,q_k) P^T) - ||mu||^2``; the unit of ``excess_mse_rel``."""
        return self.population_excess_mse(*self.strategy_parameters("unigram"))

    def parameter_metrics(self, value: Any, attention: Any) -> dict[str, float]:
        """Scale-free metrics of a linear model (V, A) against (P, attn)
        (``docs/envs/ICL-SparseContextualBigram-v0.md``); all are 1.0 at the uniform init except the
        alphas and correlation (0) and the recall:

        - ``excess_mse`` (:meth:`population_excess_mse`), ``excess_mse_rel`` = excess /
          :attr:`initial_excess`;
        - ``dist_P`` = ||V - P||_F / ||P - mu 1^T||_F, ``dist_Q`` = ||A - attn||_F /
          ||attn - 1/T||_F;
        - ``alpha_V`` = <V_bar, P_bar> / ||P_bar||^2 with ``X_bar = X - mu 1^T``, ``alpha_A`` =
          mean_k <a_k - 1/T, q_k - 1/T> / ||q_k - 1/T||^2 (0 at init, 1 at the truth: the
          stage-1 and stage-2 progress variables), ``corr_V`` = cos(V_bar, P_bar) (saturates
          early: a poor stage detector);
        - ``support_recall`` (recall@Q): the fraction of query tokens whose top-|supp q_k|
          attention positions are exactly supp(q_k).

        ``dist_Q`` and ``alpha_A`` are NaN when attn is uniform (T = Q with uniform weights).
        """
        v, a = self._check_linear(value, attention)
        p, mu, q = self._p, self._mu, self._attn
        t = self.spec.seq_len
        excess = max(0.0, self._moments(v, a))
        p_bar, v_bar = p - mu[:, None], v - mu[:, None]
        q_bar, a_bar = q - 1.0 / t, a - 1.0 / t
        norm_p, norm_q = np.linalg.norm(p_bar), np.linalg.norm(q_bar)
        with np.errstate(invalid="ignore", divide="ignore"):
            alpha_a = float(np.mean((a_bar * q_bar).sum(0) / (q_bar * q_bar).sum(0)))
            dist_q = float(np.linalg.norm(a - q) / norm_q)
        hits = 0
        for k in range(self.vocab_size):
            nz = set(np.flatnonzero(q[:, k] > 0).tolist())
            top = np.argsort(-a[:, k], kind="stable")[: len(nz)]
            hits += set(top.tolist()) == nz
        norm_v = np.linalg.norm(v_bar)
        return {
            "excess_mse": excess,
            "excess_mse_rel": excess / self.initial_excess,
            "dist_P": float(np.linalg.norm(v - p) / norm_p),
            "dist_Q": dist_q,
            "alpha_V": float((v_bar * p_bar).sum() / norm_p**2),
            "alpha_A": alpha_a,
            "corr_V": float((v_bar * p_bar).sum() / (norm_p * norm_v)) if norm_v > 0 else 0.0,
            "support_recall": hits / self.vocab_size,
        }

    def model_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """:meth:`parameter_metrics` of a model exposing ``value_and_attention() -> (V (N, N),
        A (T, N))`` (the linear and softmax transformers of :mod:`baselines.linear_transformer`;
        the Task hook of :meth:`iclgym.tasks.base.Task.model_metrics`); ``{}`` for any other
        model."""
        hook = getattr(model, "value_and_attention", None)
        if not callable(hook):
            return {}
        with torch.no_grad():
            v, a = hook()
        if tuple(v.shape) != (self.vocab_size,) * 2 or tuple(a.shape) != self._attn.shape:
            return {}
        return self.parameter_metrics(v, a)


def _to_numpy(name: str, value: Any, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    return _matrix(name, value, shape)


def _linear_output(value: np.ndarray, attention: np.ndarray, tokens: Tensor) -> Tensor:
    """(B, N) float64 ``V X a_k`` for tokens (B, T + 1): ``sum_t A[t, k] V[:, x_t]``."""
    dev = tokens.device
    v = torch.tensor(value, device=dev)
    a = torch.tensor(attention, device=dev)
    weights = a.T[tokens[:, -1]]  # (B, T): a_k of each row
    h = torch.zeros(tokens.shape[0], value.shape[0], dtype=torch.float64, device=dev)
    h.scatter_add_(1, tokens[:, :-1], weights)  # X a_k
    return h @ v.T


@dataclass(frozen=True)
class TransferPair:
    """An upstream task and a correlated downstream task (:func:`make_transfer_pair`)."""

    upstream: SparseContextualBigramTask
    downstream: SparseContextualBigramTask
    rho: float
    """The realised corr(P, P~) (:func:`transition_correlation`)."""
    target_rho: float
    mix: float
    """c in ``P~ = c P_ref + (1 - c) P_ind``."""
    reference: str
    """``"P"`` (rho >= corr(P, P_ind), or a rho below it reached at an interior minimum of the
    P path) or ``"anti"`` (``P_ref = (11^T - P) / (N - 1)``)."""


def make_transfer_pair(
    spec: SparseContextualBigramSpec | Mapping[str, Any],
    rho: float,
    share_attn: bool = False,
) -> TransferPair:
    """An upstream task (``spec``) and a downstream task whose P~ has correlation ``rho`` with
    P (an iclgym design; the paper's transfer pairs were not recovered).

    ``P~ = c P_ref + (1 - c) P_ind`` with ``P_ind`` an independent draw from the same family
    (stream :data:`TRANSFER_STREAM` of ``task_seed``; for a custom P, a ``dirichlet`` draw)
    and ``c`` in [0, 1] found by bisection so that the realised correlation equals ``rho``
    (to 1e-9) whenever it can: ``P_ref = P`` when ``rho`` is at least corr(P, P_ind), else the
    anti-correlated ``(11^T - P) / (N - 1)``, whose centred part is ``-P_bar / (N - 1)`` for
    uniform ``mu`` (with a non-uniform ``mu`` the anti path's end may not reach ``rho``; then
    the bisection runs from c = 0 to the interior minimum of the anti path, or of the P path,
    where that reaches it: the correlation along a path has at most one interior extremum, in
    closed form). Every mixture of stochastic matrices is stochastic, and for doubly
    stochastic P (``perm_mixture``) all three share the uniform ``mu``. The realised ``rho`` is
    reported (:attr:`TransferPair.rho`); the approximate rule ``c = rho / (rho +
    sqrt(1 - rho^2))`` (c = 0.5 for rho = 0.707) gave 0.65 - 0.76 across task seeds.

    ``share_attn=False`` (default) draws a fresh attention matrix for the downstream task;
    ``True`` keeps the upstream one (a control where transfer is trivial). Both tasks keep
    ``vocab_size``, ``seq_len`` and ``n_support``; the downstream spec is a custom one
    (``p_family="custom"``, explicit ``transition`` and ``attn``, ``p_floor=0``: the upstream
    floor is already in P and P_ind).

    Raises ``ValueError`` for ``rho`` outside (-1, 1), a ``share_attn`` that is not a bool, an
    upstream P whose centred part is numerically zero (every column is ``mu``: the correlation
    is undefined, :data:`CENTRED_TOL`), or a ``rho`` this construction cannot reach: the realised
    correlation differs from it by more than :data:`RHO_TOL` (below the anti-correlated limit,
    or inside a gap where the mixture's centred part vanishes and the correlation jumps, e.g.
    with ``vocab_size=2`` and a doubly stochastic P only -1 and +1 are reachable); the message
    gives the reachable range.
    """
    if not isinstance(spec, SparseContextualBigramSpec):
        spec = SparseContextualBigramSpec(**spec)
    target = as_float("rho", rho, -1.0, 1.0, low_open=True, high_open=True)
    share_attn = as_bool("share_attn", share_attn)
    upstream = SparseContextualBigramTask(spec)
    p, mu = upstream.transition, upstream.stationary
    if _centred_is_zero(p, mu):
        raise ValueError(
            f"spec is invalid for a transfer pair: expected a transition P with a column "
            f"different from its stationary law mu; this P's centred part P - mu 1^T is "
            f"numerically zero (||P - mu 1^T||_mu <= {CENTRED_TOL:g} ||P||_mu), so corr(P, P~) "
            "is undefined"
        )
    family = spec
    if spec.p_family == "custom":
        family = replace(spec, p_family="dirichlet", transition=None)
    independent = draw_transition(family, _rng(spec.task_seed, TRANSFER_STREAM, 0))
    anti = (1.0 - p) / (spec.vocab_size - 1)

    def corr(c: float, ref: np.ndarray) -> float:  # NaN where the mixture is centred-zero
        return _centred_cosine(p, c * ref + (1.0 - c) * independent, mu)

    def turn(ref: np.ndarray) -> float | None:
        """The c in (0, 1) where corr(c, ref) has its interior extremum, if any: with n(c) =
        <P_bar, M_bar(c)>_mu linear and q(c) = ||M_bar(c)||_mu^2 quadratic in c, the derivative
        of n / sqrt(q) vanishes where n' q - n q' / 2 = 0, a linear equation in c."""
        pb, v, w = p - mu[:, None], independent - mu[:, None], ref - independent
        n0, n1 = _inner(pb, v, mu), _inner(pb, w, mu)
        q0, q1, q2 = _inner(v, v, mu), 2.0 * _inner(v, w, mu), _inner(w, w, mu)
        slope = 0.5 * n1 * q1 - n0 * q2
        if slope == 0.0:
            return None
        c = (0.5 * n0 * q1 - n1 * q0) / slope
        return c if 0.0 < c < 1.0 else None

    base = corr(0.0, p)
    reference, ref, end = "P", p, 1.0  # corr(0) = base and corr(end) bracket the target
    if target < base:
        reference, ref = "anti", anti
        if not corr(1.0, anti) <= target:  # an interior minimum of a path may still reach it
            for name, path in (("anti", anti), ("P", p)):
                c = turn(path)
                if c is not None and corr(c, path) <= target:
                    reference, ref, end = name, path, c
                    break
    lo, hi = 0.0, end  # corr(lo) <= target <= corr(hi) after orienting
    sign = 1.0 if target >= base else -1.0
    if sign * (corr(end, ref) - target) < 0:  # unreachable (e.g. rho below the anti limit)
        lo = hi
    for _ in range(80):
        if hi - lo < 1e-12:
            break
        mid = 0.5 * (lo + hi)
        if sign * (corr(mid, ref) - target) < 0:
            lo = mid
        else:
            hi = mid
    mix = 0.5 * (lo + hi)
    tilde = mix * ref + (1.0 - mix) * independent
    tilde = tilde / tilde.sum(0)
    realised = _centred_cosine(p, tilde, mu)
    if not abs(realised - target) <= RHO_TOL:  # also NaN
        ends = [base, corr(1.0, anti)]
        ends += [corr(c, path) for path in (anti, p) if (c := turn(path)) is not None]
        low = min(v for v in ends if not math.isnan(v))
        if low - RHO_TOL <= target:  # inside the range: the correlation jumps over it
            # the mixture's centred part is (c - c0) times a fixed matrix around its zero c0,
            # so the correlation is constant on either side: corr(0) and corr(end)
            gap = sorted((base, corr(end, ref)))
            where = (
                f", except ({gap[0]:.6g}, {gap[1]:.6g}): it jumps over that gap at c = {mix:.6g}, "
                "where the mixture's centred part vanishes (e.g. vocab_size=2 with a doubly "
                "stochastic P reaches only -1 and +1)"
            )
        else:
            where = ""
        raise invalid(
            "rho",
            rho,
            f"a correlation reachable from this task's P within {RHO_TOL:g}: corr(P, P~) over "
            f"the mixtures c P_ref + (1 - c) P_ind lies in [{low:.6g}, 1]{where}",
        )
    if share_attn:
        attn = upstream.attn
    else:
        attn = draw_attn(replace(spec, attn=None), _rng(spec.task_seed, TRANSFER_STREAM, 1))
    downstream = SparseContextualBigramTask(
        replace(
            spec,
            p_family="custom",
            p_floor=0.0,
            transition=_as_tuple(tilde),
            attn=_as_tuple(attn),
        )
    )
    return TransferPair(
        upstream=upstream,
        downstream=downstream,
        rho=transition_correlation(p, downstream.transition, mu),
        target_rho=target,
        mix=mix,
        reference=reference,
    )


__all__ = [
    "P_FAMILIES",
    "Q_WEIGHTS",
    "SparseContextualBigramSpec",
    "SparseContextualBigramTask",
    "TransferPair",
    "draw_attn",
    "draw_transition",
    "make_transfer_pair",
    "project_simplex",
    "stationary_law",
    "transition_correlation",
]
