"""Multi-concept sparse-coding prompts for in-context classification, after Bu et al. 2024
(*Provably Transformers Harness Multi-Concept Word Semantics for Efficient In-Context
Learning*, NeurIPS 2024, arXiv 2411.02199). The generative model is iclgym's reconstruction
"MC-SC v0" (``docs/envs/ICL-MultiConcept-v0.md``), **not the paper's formulas or numbers**;
every reconstructed choice is a spec parameter.

**World** (fixed by ``world_seed``, shared by training and every split). For
each concept k = 0 .. K - 1: word features a_k (norm alpha, the shared part) and b_k (norm
beta, the contrast), label features c_k (norm gamma) and d_k (norm delta). The word semantics
are mu_k^+- = a_k +- b_k and the label semantics q_k^+- = c_k +- d_k. ``"orthogonal"``: the 2K
word directions (and the 2K label directions) are orthonormal columns of the QR factor of a
Gaussian matrix; ``"gaussian"``: i.i.d. N(0, I/d) directions rescaled to the norms (only
near-orthogonal). Drawn once per (sizes, norms, dictionary, world_seed) from
``numpy.random.SeedSequence(world_seed, spawn_key=(WORLD_STREAM,))`` (:func:`make_world`).

**One prompt** (L = ``num_demos``; words i = 0 .. L - 1 are demonstrations, i = L the query):
the task concept k* ~ the concept law (default uniform over the K - ``heldout_concepts``
training concepts); the mapping m = +1 (``"fixed"``), -1 (``"switched"``) or uniform on {+-1}
(``"random"``); per word the support S_i = {k*} + ``s_extra`` other concepts drawn without
replacement, signs eps_{i,k} ~ U{+-1}, coefficients z_{i,k} = 1 or U[1 - c, 1 + c]
(``coef_jitter`` c) and x_i = sum_{k in S_i} z_{i,k} (a_k + eps_{i,k} b_k) + N(0, sigma^2 I);
the label y_i = m eps_{i,k*}, flipped with probability ``label_noise`` (the query's too); the
label token of demonstration i, u_i = c_kappa + y_i d_kappa + sum_{j in R_i} (c_j + rho_{i,j}
d_j) + N(0, sigma_y^2 I) with kappa = k* (or (k* + 1) mod K with ``cross_pairing``), R_i
``label_extra_concepts`` other concepts than kappa drawn without replacement and rho ~ U{+-1}
(the label tokens' own task-irrelevant concepts, spec V2). The target is y_L.

**Batch layout** (T = L + Q positions, Q = ``num_queries``, 1 by default; vocabulary V = 2:
token 0 is the label -1, token 1 the label +1): ``tokens[:, l]`` is the label token of
demonstration l (l < L) and ``tokens[:, L + q] = 0`` is a placeholder that carries no
information (the same token in every sequence); ``targets[:, t] = tokens[:, t + 1]`` for t < L
and ``targets[:, L + q]`` is query q's label token, the scored positions (``loss_mask``,
:attr:`~MultiConceptTask.first_scored_position` = L). ``features`` (B, T, d + d_y) float32:
``[x_l; u_l]`` at demonstration l, ``[x_q; 0]`` at L + q (the reference transformer's tokens
e_l and e_q, :mod:`baselines.concept_attention`). Words i >= L are the queries, drawn like
the demonstrations (the same k* and m). ``params``:
``task_concept`` (B,) int64, ``mapping`` (B,) int64 in {-1, +1}, ``support`` (B, T, K) bool,
``semantic_sign`` (B, T, K) int8 (eps, drawn for every concept; only those in the support act),
``coefficient`` (B, T, K) float32 (z on the support, 0 elsewhere), ``clean_label`` (B, T) int64 (m
eps_{i,k*}, before label noise), ``label_concept`` (B,) int64 (kappa), ``label_support`` (B, L, K)
bool and ``label_sign`` (B, L, K) int8 (the concepts and signs of each label token's features: y_l
at kappa, rho elsewhere).

**Laws** (``true_probs``, the law of each target given the latents): mass 1 - p on the clean
label of the next word (positions t < L - 1) and of each query, a point mass on the placeholder
at t = L - 1. **Oracle** (:meth:`~MultiConceptTask.oracle`): the exact Bayes posterior given the
prompt and the world (:meth:`~MultiConceptTask.query_log_probs`), at query q given the
demonstrations and the words of queries 0 .. q (their labels unseen); at t < L - 1 the next label is
a fresh uniform sign independent of the prefix (eps is, and m eps and its noisy flip are
too), so the Bayes law there is exactly (1/2, 1/2); at t = L - 1 the placeholder's point mass.
Log-probabilities are floored at log(1e-30).

**The exact posterior** (float64, log space). Words are independent given (k*, m), so
P(y_q, prompt) = sum_{k*, m} p(k*) p(m) prod_{l < L} [sum_e A_l(k*, e) P(y_l | m e) U_l(k*)]
prod_{q' < q} [sum_e A_q'(k*, e)] sum_e A_q(k*, e) P(y_q | m e) (the earlier queries' words
without their labels), where A_i(k*, e) = P(x_i, eps_{i,k*} = e | k*) sums over the
supports containing k* and the other signs, U_l(k*) is the label token's likelihood and P(y |
m e) = 1 - p if y = m e else p. For the orthogonal dictionary the projections of x_i on the
2K unit word directions are sufficient (the rest is pure noise) and the likelihood factorises
over concepts given the support: with lambda_{i,k}^e the likelihood ratio of "k in S_i with
sign e" to "k not in S_i" and Lambda_{i,k} = (lambda^+ + lambda^-) / 2,
A_i(k*, e) = lambda_{i,k*}^e / 2 * e_s(Lambda_{i, j != k*}) / C(K - 1, s), e_s the elementary
symmetric polynomial of degree s = ``s_extra`` (a dynamic programme in log space). Without
jitter log lambda^e = (alpha P^a + e beta P^b - (alpha^2 + beta^2) / 2) / sigma^2 (P^a, P^b the
projections on the unit directions of a_k, b_k); with jitter z ~ U[1 - c, 1 + c] scales both
parts, and with n = sqrt(alpha^2 + beta^2), w = (alpha P^a + e beta P^b) / n the integral over
z is closed: lambda^e = exp(w^2 / (2 sigma^2)) sigma sqrt(2 pi) / (2 c n) [Phi((n (1 + c) - w) /
sigma) - Phi((n (1 - c) - w) / sigma)]. The label tokens are the same with (gamma, delta,
sigma_y), the sign at kappa fixed to the observed y_l and e_r over the concepts other than
kappa (r = ``label_extra_concepts``). For ``"gaussian"`` dictionaries the same sums run by
exact enumeration of the (support, signs) hypotheses of each word (C(K, s + 1) 2^(s + 1)) and
label token (K 2 C(K - 1, r) 2^r), each at most :data:`MAX_HYPOTHESES`; there is no closed
form with jitter there, so ``coef_jitter > 0`` with ``"gaussian"`` is refused.

**sigma = 0 or sigma_y = 0.** The likelihoods use the noise max(sigma, f s) with f =
:data:`SIGMA_FLOOR` and s the smallest contrast between two hypotheses, (1 - c) beta for words
and delta for label tokens (:attr:`MultiConceptSpec.oracle_sigma`, ``oracle_sigma_y``): the
posterior of the model with that noise. As sigma -> 0 the posterior converges to the noiseless
one, and a wrong hypothesis is off by at least s = 10 floor units in some projection, so it
loses >= 50 nats per word: the floored posterior is the sigma = 0 posterior up to exp(-50)
terms, at every scale of the norms. The features are float32, rounded at 2^-24 of their scale
(``(s_extra + 1)(1 + c)(alpha + beta)`` for words); the spec refuses norms whose rounding is
not below 1/100 of max(sigma, s) (:data:`RESOLUTION`), where the data could not tell the
hypotheses apart, and norms or noise above :data:`MAX_SCALE` (features beyond float32).

The reference predictors: :meth:`~MultiConceptTask.dictionary_oracle` (the 4-step rule),
:meth:`~MultiConceptTask.bayes_error`, :meth:`~MultiConceptTask.no_context_accuracy` and the
dictionary-free in-context rules (:func:`ridge_score`, :func:`centroid_score`,
:func:`softmax_vote_score`, :func:`majority_score`), which read demo_x, demo_y and query_x only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import combinations, product

import numpy as np
import torch
from torch import Tensor

from iclgym.tasks.base import Batch, Strategy, Task, TaskSpec, check_batch_size
from iclgym.tasks.markov import inverse_cdf_thresholds, open_uniform
from iclgym.validation import (
    BLOCK_SEQUENCES,
    as_bool,
    as_float,
    as_int,
    check_memory,
    invalid,
    is_int,
)

MAPPINGS = ("fixed", "random", "switched")
"""m = +1, m uniform on {+-1} per prompt (true ICL), m = -1 (the ``ood_switched`` law)."""
DICTIONARIES = ("orthogonal", "gaussian")
WORLD_STREAM = 9
"""Seed stream of ``world_seed`` that draws the dictionary (streams 0-8 are the data splits,
dropout, the templates' fixed set, model init, batch order and the sparse-bigram task)."""
SIGMA_FLOOR = 0.1
"""The oracle's noise floor as a fraction of the smallest contrast between two hypotheses:
sigma below ``SIGMA_FLOOR (1 - c) beta`` (sigma_y below ``SIGMA_FLOOR delta``) is read as it
(module docstring; it was an absolute 1e-4, wrong for norms near it)."""
MAX_SCALE = 1e15
"""Largest norm (alpha, gamma) and noise (sigma, sigma_y): a word sums at most K such terms
and its float32 features (max ~3.4e38) and their float64 squares stay finite."""
RESOLUTION = 0.01
"""The float32 rounding of the features, ``2^-24 (s_extra + 1)(1 + c)(alpha + beta)`` for
words (``2^-24 (r + 1)(gamma + delta)`` for label tokens), must be at most this fraction of
max(sigma, smallest contrast), so that the exact posterior of the spec is that of its data."""
LOG_FLOOR = 1e-30
"""Log-probabilities are floored at log(1e-30) where a law is exactly 0."""
HARD_EPS = 0.01
"""A sign rule's prediction r in {-1, +1} becomes the law (1 - HARD_EPS) on label r (a tie,
r = 0, the law (1/2, 1/2)) for the strategies' log-probabilities."""
MAX_HYPOTHESES = 2**14
"""Most (support, signs) hypotheses per word or label token the ``"gaussian"`` oracle
enumerates."""
PROB_TOL = 1e-6
"""Tolerance of the sum of ``concept_probs`` (then renormalised)."""
SKEW_MASS = 0.9
"""p(k = 0) of the ``ood_skew`` and ``train_skew`` concept laws."""
OOD_LENGTHS = (4, 8, 32, 64)
"""The listed ``ood_length_N`` splits (any N >= 1 is accepted)."""
NOISE_FACTOR = 4.0
"""sigma x 4 in ``ood_noise``."""
SOFTMAX_TAU = 0.1
RIDGE_LAMBDA = 0.1
"""The ``softmax_vote`` and ``ridge`` strategies' temperature and penalty
(``docs/results/multi-concept.md``)."""
_LABEL_NOISE_ZERO = -math.inf


def _at_least(name: str, value: object, low: int, why: str) -> int:
    if not is_int(value) or value < low:
        raise invalid(name, value, f"an int >= {low} ({why})")
    return int(value)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


@dataclass(frozen=True)
class MultiConceptSpec(TaskSpec):
    """Parameters of a multi-concept task (``docs/envs/ICL-MultiConcept-v0.md``; defaults: C0).

    Attributes:
        d: word dimension, an int >= 2 K for ``"orthogonal"`` (>= 1 for ``"gaussian"``).
        d_y: label-token dimension, same range as ``d``.
        num_concepts: K >= 2.
        s_extra: task-irrelevant concepts per word, 0 <= s_extra <= K - 1.
        num_demos: L >= 1 demonstrations per prompt.
        num_queries: Q >= 1 queries that share the prompt's demonstrations (the env's
            ``n_queries`` option), each scored at its own position (T = L + Q positions; the env
            steps Q times per episode). Query q is also seen by the later queries, without
            its label. The reference transformer (:mod:`baselines.concept_attention`) and its
            recipe read one query (Q = 1).
        alpha, beta: norms of a_k and b_k, :data:`MAX_SCALE` >= alpha > beta > 0 (so
            <mu_k^+, mu_k^-> = alpha^2 - beta^2 > 0 within a concept, V3).
        gamma, delta: norms of c_k and d_k, :data:`MAX_SCALE` >= gamma > delta > 0.
        sigma, sigma_y: word and label-token noise standard deviations in [0, MAX_SCALE].
            Below 100x the float32 rounding of the features (:data:`RESOLUTION`) the
            contrast (1 - c) beta (delta) must be above it, or the spec is refused.
        label_noise: p in [0, 0.5), the probability each label (query included) is flipped.
        coef_jitter: c in [0, 1); z ~ U[1 - c, 1 + c] per active concept (0: z = 1). Must be
            0 with ``"gaussian"`` (no exact oracle).
        mapping: ``"fixed"`` (m = +1), ``"random"`` (m uniform on {+-1} per prompt) or
            ``"switched"`` (m = -1, the ``ood_switched`` law).
        dictionary: ``"orthogonal"`` or ``"gaussian"``.
        concept_probs: the law of k*, K floats >= 0 summing to 1 (within 1e-6, renormalised),
            stored as a tuple; None: uniform over the training concepts 0 .. K - h - 1.
        heldout_concepts: h in [0, K - 1]: the last h concepts are never the task concept
            under the default law (they still appear as task-irrelevant concepts); the
            ``ood_heldout_concepts`` split draws k* uniformly among them. ``concept_probs``,
            when given, overrides the default law.
        cross_pairing: label tokens carry concept (k* + 1) mod K instead of k*.
        label_extra_concepts: r in [0, K - 1]: each label token also carries the label
            features c_j + rho d_j of r concepts other than its own, rho ~ U{+-1}.
        world_seed: int >= 0; the dictionary depends on it (and the sizes and norms) only.

    Integers and floats may be numpy numbers. Raises ``ValueError`` naming the parameter, its
    value and the valid range for anything outside them (including sizes whose 64 sequences
    would not fit in memory, and ``"gaussian"`` enumerations above :data:`MAX_HYPOTHESES`).
    """

    d: int = 64
    d_y: int = 32
    num_concepts: int = 8
    s_extra: int = 2
    num_demos: int = 16
    num_queries: int = 1
    alpha: float = 1.0
    beta: float = 0.7
    gamma: float = 1.0
    delta: float = 0.7
    sigma: float = 0.05
    sigma_y: float = 0.05
    label_noise: float = 0.0
    coef_jitter: float = 0.0
    mapping: str = "fixed"
    dictionary: str = "orthogonal"
    concept_probs: tuple[float, ...] | None = None
    heldout_concepts: int = 0
    cross_pairing: bool = False
    label_extra_concepts: int = 0
    world_seed: int = 0

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.dictionary, str) or self.dictionary not in DICTIONARIES:
            raise invalid("dictionary", self.dictionary, f"one of {DICTIONARIES}")
        if not isinstance(self.mapping, str) or self.mapping not in MAPPINGS:
            raise invalid("mapping", self.mapping, f"one of {MAPPINGS}")
        k = as_int("num_concepts", self.num_concepts, 2)
        put("num_concepts", k)
        if self.dictionary == "orthogonal":
            why = "2 * num_concepts orthonormal directions with dictionary='orthogonal'"
            put("d", _at_least("d", self.d, 2 * k, why))
            put("d_y", _at_least("d_y", self.d_y, 2 * k, why))
        else:
            put("d", as_int("d", self.d, 1))
            put("d_y", as_int("d_y", self.d_y, 1))
        put("s_extra", as_int("s_extra", self.s_extra, 0, k - 1))
        put("num_demos", as_int("num_demos", self.num_demos, 1))
        put("num_queries", as_int("num_queries", self.num_queries, 1))
        alpha = as_float("alpha", self.alpha, 0.0, MAX_SCALE, low_open=True)
        put("alpha", alpha)
        put("beta", as_float("beta", self.beta, 0.0, alpha, low_open=True, high_open=True))
        gamma = as_float("gamma", self.gamma, 0.0, MAX_SCALE, low_open=True)
        put("gamma", gamma)
        put("delta", as_float("delta", self.delta, 0.0, gamma, low_open=True, high_open=True))
        put("sigma", as_float("sigma", self.sigma, 0.0, MAX_SCALE))
        put("sigma_y", as_float("sigma_y", self.sigma_y, 0.0, MAX_SCALE))
        put("label_noise", as_float("label_noise", self.label_noise, 0.0, 0.5, high_open=True))
        put("coef_jitter", as_float("coef_jitter", self.coef_jitter, 0.0, 1.0, high_open=True))
        put("heldout_concepts", as_int("heldout_concepts", self.heldout_concepts, 0, k - 1))
        put("cross_pairing", as_bool("cross_pairing", self.cross_pairing))
        r = as_int("label_extra_concepts", self.label_extra_concepts, 0, k - 1)
        put("label_extra_concepts", r)
        put("world_seed", as_int("world_seed", self.world_seed, 0))
        if self.concept_probs is not None:
            put("concept_probs", _check_probs(self.concept_probs, k))
        c = self.coef_jitter
        word_scale = (self.s_extra + 1) * (1 + c) * (alpha + self.beta)
        for name, noise, scale, contrast in (
            ("sigma", self.sigma, word_scale, (1 - c) * self.beta),
            ("sigma_y", self.sigma_y, (r + 1) * (gamma + self.delta), self.delta),
        ):
            rounding = 2.0**-24 * scale
            if rounding > RESOLUTION * max(noise, contrast):
                raise invalid(
                    name,
                    noise,
                    f">= {rounding / RESOLUTION:.3g} with these norms: their float32 features "
                    f"are rounded at {rounding:.3g}, more than {RESOLUTION:g} of the smallest "
                    f"contrast between two hypotheses ({contrast:.3g}), so the data cannot "
                    "resolve them (raise the contrast or the noise)",
                )
        t, f = self.num_demos + self.num_queries, self.d + self.d_y
        longer = "num_queries" if self.num_queries > self.num_demos else "num_demos"
        check_memory(
            longer,
            getattr(self, longer),
            BLOCK_SEQUENCES * t * (4.0 * f + 8.0 * k * k + 16.0 * k + 32.0),
            f"{BLOCK_SEQUENCES} prompts of {t} positions (features, latents and the oracle's "
            f"{k}x{k} tables per word)",
        )
        check_memory("d", self.d, 32.0 * k * (self.d + self.d_y), "the dictionary")
        if self.dictionary == "gaussian":
            if self.coef_jitter != 0.0:
                raise invalid(
                    "coef_jitter",
                    self.coef_jitter,
                    "0 with dictionary='gaussian' (the exact oracle integrates z in closed "
                    "form for the orthogonal dictionary only)",
                )
            words = math.comb(k, self.s_extra + 1) * 2 ** (self.s_extra + 1)
            if words > MAX_HYPOTHESES:
                raise invalid(
                    "s_extra",
                    self.s_extra,
                    f"C(num_concepts, s_extra + 1) 2^(s_extra + 1) <= {MAX_HYPOTHESES} word "
                    f"hypotheses with dictionary='gaussian' (exact enumeration; got {words})",
                )
            labels = 2 * k * math.comb(k - 1, r) * 2**r
            if labels > MAX_HYPOTHESES:
                raise invalid(
                    "label_extra_concepts",
                    r,
                    f"2 K C(K - 1, r) 2^r <= {MAX_HYPOTHESES} label hypotheses with "
                    f"dictionary='gaussian' (exact enumeration; got {labels})",
                )

    @property
    def oracle_sigma(self) -> float:
        """The word noise of the oracle's likelihoods: max(sigma, SIGMA_FLOOR (1 - c) beta)
        (module docstring, sigma = 0)."""
        return max(self.sigma, SIGMA_FLOOR * (1.0 - self.coef_jitter) * self.beta)

    @property
    def oracle_sigma_y(self) -> float:
        """The label-token noise of the oracle's likelihoods: max(sigma_y, SIGMA_FLOOR delta)."""
        return max(self.sigma_y, SIGMA_FLOOR * self.delta)

    @property
    def concept_law(self) -> np.ndarray:
        """(K,) float64 the law of k*: ``concept_probs``, or uniform over the training
        concepts 0 .. K - heldout_concepts - 1."""
        if self.concept_probs is not None:
            return np.array(self.concept_probs, dtype=np.float64)
        law = np.zeros(self.num_concepts)
        law[: self.num_concepts - self.heldout_concepts] = 1.0
        return law / law.sum()


def _check_probs(value: object, k: int) -> tuple[float, ...]:
    try:
        p = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid("concept_probs", value, f"{k} floats >= 0 summing to 1") from None
    if p.shape != (k,) or not np.isfinite(p).all() or (p < 0).any():
        raise invalid("concept_probs", value, f"{k} finite floats >= 0 summing to 1")
    if abs(p.sum() - 1.0) > PROB_TOL:
        raise invalid("concept_probs", value, f"{k} floats >= 0 summing to 1 within {PROB_TOL:g}")
    return tuple(float(x) for x in p / p.sum())


# ------------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class World:
    """The dictionary of one world: rows k of ``a``, ``b`` (K, d) and ``c``,
    ``d`` (K, d_y), float64 read-only numpy, with norms alpha, beta, gamma, delta."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    d: np.ndarray


def _directions(rng: np.random.Generator, dim: int, n: int, dictionary: str) -> np.ndarray:
    """(n, dim) unit rows: orthonormal (QR of a Gaussian matrix, signs fixed by diag R) or
    i.i.d. N(0, I/dim) rows rescaled to norm 1."""
    if dictionary == "orthogonal":
        q, r = np.linalg.qr(rng.standard_normal((dim, n)))
        return (q * np.where(np.diag(r) < 0, -1.0, 1.0)).T.copy()
    g = rng.standard_normal((n, dim)) / math.sqrt(dim)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


@lru_cache(maxsize=32)
def make_world(spec: MultiConceptSpec) -> World:
    """The world of ``spec``, a pure function of (d, d_y, K, alpha, beta, gamma, delta,
    dictionary, world_seed): word directions then label directions, 2K each, from
    ``SeedSequence(world_seed, spawn_key=(WORLD_STREAM,))``; a_k, b_k are word directions 2k,
    2k + 1 scaled by alpha, beta (c_k, d_k likewise with gamma, delta)."""
    return _world(
        spec.d, spec.d_y, spec.num_concepts, spec.alpha, spec.beta, spec.gamma, spec.delta,
        spec.dictionary, spec.world_seed,
    )  # fmt: skip


@lru_cache(maxsize=32)
def _world(d, d_y, k, alpha, beta, gamma, delta, dictionary, seed) -> World:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(WORLD_STREAM,)))
    word = _directions(rng, d, 2 * k, dictionary)
    label = _directions(rng, d_y, 2 * k, dictionary)
    arrays = [alpha * word[0::2], beta * word[1::2], gamma * label[0::2], delta * label[1::2]]
    for x in arrays:
        x.setflags(write=False)
    return World(*arrays)


# ------------------------------------------------------------------ log-space numerics
def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurately on both sides of -log 2."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_ndtr_diff(hi: Tensor, lo: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for hi > lo, in the tail that keeps precision."""
    log_ndtr = torch.special.log_ndtr
    left = log_ndtr(hi) + _log1mexp(log_ndtr(lo) - log_ndtr(hi))
    right = log_ndtr(-lo) + _log1mexp(log_ndtr(-hi) - log_ndtr(-lo))
    return torch.where(hi + lo < 0, left, right)


def leave_one_out_esp(log_v: Tensor, degree: int) -> Tensor:
    """(..., K) log e_degree(v without entry k) for every k: the log elementary symmetric
    polynomial of the other K - 1 entries of ``v`` (given as ``log_v`` (..., K), entries may
    be -inf), by the dynamic programme e_j <- e_j + v_i e_{j-1} in log space."""
    k = log_v.shape[-1]
    table = log_v.unsqueeze(-2).expand(*log_v.shape[:-1], k, k).clone()  # [..., k*, j]
    table.diagonal(dim1=-2, dim2=-1).fill_(-math.inf)
    shape = table.shape[:-1]
    e = [torch.zeros(shape, dtype=log_v.dtype, device=log_v.device)]
    e += [torch.full(shape, -math.inf, dtype=log_v.dtype, device=log_v.device)] * degree
    for j in range(k):
        v = table[..., j]
        for deg in range(min(j + 1, degree), 0, -1):
            e[deg] = torch.logaddexp(e[deg], e[deg - 1] + v)
    return e[degree]


def _sign_log_probs(sign: Tensor, seq_len: int) -> Tensor:
    """(B, T, 2) float32 log-probs of a sign rule (B, Q) in {-1, 0, +1} at the queries:
    (1 - HARD_EPS) on its label, 1/2 each on a tie (:func:`_layout` elsewhere)."""
    p_plus = torch.where(sign > 0, 1.0 - HARD_EPS, HARD_EPS)
    p_plus = torch.where(sign == 0, 0.5, p_plus).to(torch.float64)
    return _layout(torch.stack([1.0 - p_plus, p_plus], -1).log(), seq_len)


def _layout(queries: Tensor, seq_len: int) -> Tensor:
    """(B, T, 2) float32 log-probs with ``queries`` (B, Q, 2) at the queries t = L .. T - 1
    (L = T - Q), the placeholder's point mass (log 1, log 1e-30) at t = L - 1 and the fresh
    sign's (1/2, 1/2) at t < L - 1 (the Bayes laws there, module docstring)."""
    L = seq_len - queries.shape[1]
    out = torch.full((queries.shape[0], seq_len, 2), -math.log(2.0), device=queries.device)
    out[:, L - 1, 0] = 0.0
    out[:, L - 1, 1] = math.log(LOG_FLOOR)
    out[:, L:] = queries.float()
    return out


def skewed_concept_law(spec: MultiConceptSpec) -> tuple[float, ...]:
    """The ``ood_skew`` concept law: p(k = 0) = :data:`SKEW_MASS` and the
    rest uniform over the other training concepts 1 .. K - h - 1 (h = ``heldout_concepts``);
    also the training law of the ``train_skew`` run (``concept_probs=`` this)."""
    k, train = spec.num_concepts, spec.num_concepts - spec.heldout_concepts
    law = np.zeros(k)
    if train == 1:
        law[0] = 1.0
    else:
        law[0] = SKEW_MASS
        law[1:train] = (1.0 - SKEW_MASS) / (train - 1)
    return tuple(float(x) for x in law)


# ------------------------------------------------ dictionary-free in-context rules
def majority_score(demo_y: Tensor) -> Tensor:
    """(B,) float64 sum of the demonstration labels (B, L) in {-1, +1}: the majority floor."""
    return demo_y.to(torch.float64).sum(-1)


def ridge_score(demo_x: Tensor, demo_y: Tensor, query_x: Tensor, lam: float) -> Tensor:
    """(B,) float64 <w, x_q> with w = (X^T X + lam I)^-1 X^T y, X = demo_x
    (B, L, d), y = demo_y (B, L) in {-1, +1}, x_q = query_x (B, d); computed as
    x_q^T X^T (X X^T + lam I)^-1 y (the same w, an L x L system). Raises ``ValueError`` for
    lam <= 0."""
    lam = as_float("lam", lam, 0.0, low_open=True)
    x = demo_x.to(torch.float64)
    gram = x @ x.transpose(-1, -2)
    gram.diagonal(dim1=-2, dim2=-1).add_(lam)
    alpha = torch.linalg.solve(gram, demo_y.to(torch.float64).unsqueeze(-1))  # (B, L, 1)
    return ((x @ query_x.to(torch.float64).unsqueeze(-1)) * alpha).sum((-1, -2))


def centroid_score(demo_x: Tensor, demo_y: Tensor, query_x: Tensor) -> Tensor:
    """(B,) float64 ||x_q - mu_-||^2 - ||x_q - mu_+||^2, mu_+- the mean demonstration word of
    each label (nearest class centroid; positive: predict +1). A label with no
    demonstration has no centroid: the score is then the sign of the label present."""
    x = demo_x.to(torch.float64)
    q = query_x.to(torch.float64)
    y = demo_y.to(torch.float64)
    pos, neg = (y > 0).to(torch.float64), (y < 0).to(torch.float64)
    n_pos, n_neg = pos.sum(-1), neg.sum(-1)
    mu_pos = (pos.unsqueeze(-1) * x).sum(1) / n_pos.clamp_min(1).unsqueeze(-1)
    mu_neg = (neg.unsqueeze(-1) * x).sum(1) / n_neg.clamp_min(1).unsqueeze(-1)
    score = ((q - mu_neg) ** 2).sum(-1) - ((q - mu_pos) ** 2).sum(-1)
    score = torch.where(n_neg == 0, 1.0, score)
    return torch.where(n_pos == 0, -1.0, score)


def softmax_vote_score(demo_x: Tensor, demo_y: Tensor, query_x: Tensor, tau: float) -> Tensor:
    """(B,) float64 sum_l y_l softmax_l(<x_q, x_l> / tau) (the vote is the sign of
    sum_l y_l exp(<x_q, x_l> / tau), normalised for stability). Raises ``ValueError`` for
    tau <= 0."""
    tau = as_float("tau", tau, 0.0, low_open=True)
    logits = (demo_x.to(torch.float64) @ query_x.to(torch.float64).unsqueeze(-1))[..., 0]
    return (torch.softmax(logits / tau, -1) * demo_y.to(torch.float64)).sum(-1)


# -------------------------------------------------------------------------------- the task
class MultiConceptTask(Task):
    """Sampler, exact Bayes oracle, reference predictors and named OOD splits of
    :class:`MultiConceptSpec` (module docstring)."""

    name = "multi_concept"
    spec: MultiConceptSpec

    def __init__(self, spec: MultiConceptSpec | None = None, **kwargs: object) -> None:
        if spec is not None and kwargs:
            raise ValueError("pass either a spec or keyword arguments, not both")
        super().__init__(spec if spec is not None else MultiConceptSpec(**kwargs))  # type: ignore[arg-type]
        self.world = make_world(self.spec)
        law = self.spec.concept_law
        law.setflags(write=False)
        self.concept_law = law
        """(K,) float64 read-only law of the task concept k*."""
        self._device_tables: dict[str, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ the contract
    @property
    def vocab_size(self) -> int:
        """2: token 0 is the label -1, token 1 the label +1."""
        return 2

    @property
    def seq_len(self) -> int:
        """T = L + Q: the L demonstrations and the Q queries."""
        return self.spec.num_demos + self.spec.num_queries

    @property
    def feature_dim(self) -> int:
        """F = d + d_y: ``[x; u]`` per position."""
        return self.spec.d + self.spec.d_y

    @property
    def first_scored_position(self) -> int:
        """L: the queries' labels are scored (positions L .. L + Q - 1)."""
        return self.spec.num_demos

    @property
    def class_tokens(self) -> tuple[int, ...]:
        """(0, 1): class 0 is the label -1, class 1 the label +1 (the envs' ``action="class"``)."""
        return (0, 1)

    @property
    def oracle_name(self) -> str:
        if self.spec.dictionary == "orthogonal":
            return "bayes (closed form, knows the dictionary)"
        return "bayes (exact enumeration, knows the dictionary)"

    def _tables(self, device: torch.device | str) -> dict[str, Tensor]:
        key = str(device)
        if key not in self._device_tables:
            w, s = self.world, self.spec
            tab = {
                name: torch.tensor(getattr(w, name), dtype=torch.float32, device=device)
                for name in ("a", "b", "c", "d")
            }
            tab["thresholds"] = inverse_cdf_thresholds(
                torch.tensor(self.concept_law, device=device)
            )
            unit = {"a": s.alpha, "b": s.beta, "c": s.gamma, "d": s.delta}
            for name, norm in unit.items():  # float64 unit directions for projections
                tab[f"{name}64"] = torch.tensor(getattr(w, name) / norm, device=device)
            if s.dictionary == "gaussian":
                tab.update(self._enumeration_tables(device))
            self._device_tables[key] = tab
        return self._device_tables[key]

    def _enumeration_tables(self, device: torch.device | str) -> dict[str, Tensor]:
        """The ``"gaussian"`` oracle's hypotheses: word means (H, d) and squared norms, the
        index (K, 2, H_k) of those with k in the support with sign e (e index 0: -1, 1: +1);
        label means (K, 2, H_r, d_y) per (kappa, y) and their squared norms."""
        w, s = self.world, self.spec
        k = s.num_concepts
        supports, signs = [], []
        for support in combinations(range(k), s.s_extra + 1):
            for sign in product((-1, 1), repeat=s.s_extra + 1):
                row_s, row_e = np.zeros(k), np.zeros(k)
                row_s[list(support)] = 1.0
                row_e[list(support)] = sign
                supports.append(row_s)
                signs.append(row_e)
        ins, sgn = np.array(supports), np.array(signs)
        means = ins @ w.a + sgn @ w.b
        index = np.stack(
            [np.stack([np.flatnonzero(sgn[:, j] == e) for e in (-1, 1)]) for j in range(k)]
        )
        r = s.label_extra_concepts
        label = np.zeros((k, 2, math.comb(k - 1, r) * 2**r, s.d_y))
        for kappa in range(k):
            others = [j for j in range(k) if j != kappa]
            for yi, y in enumerate((-1, 1)):
                h = 0
                for extra in combinations(others, r):
                    for rho in product((-1, 1), repeat=r):
                        mean = w.c[kappa] + y * w.d[kappa]
                        for j, sign in zip(extra, rho, strict=True):
                            mean = mean + w.c[j] + sign * w.d[j]
                        label[kappa, yi, h] = mean
                        h += 1

        def t(x: np.ndarray) -> Tensor:
            return torch.tensor(x, device=device)

        return {
            "word_means": t(means),
            "word_sq": t((means**2).sum(-1)),
            "word_index": torch.tensor(index, device=device),
            "label_means": t(label),
            "label_sq": t((label**2).sum(-1)),
        }

    # ------------------------------------------------------------------------- sampling
    def sample_prompts(
        self,
        batch_size: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        num_demos: int | None = None,
    ) -> dict[str, Tensor]:
        """``batch_size`` prompts as a dict (B = batch_size, L = ``num_demos``,
        default the spec's, Q = ``num_queries``, T = L + Q): ``demo_x`` (B, L, d), ``demo_u``
        (B, L, d_y) and ``queries_x`` (B, Q, d) float32; ``demo_y`` (B, L) and ``queries_y``
        (B, Q) int64 in {-1, +1}; ``query_x`` (B, d) and ``query_y`` (B,): the first query;
        ``task_concept`` (B,) int64; ``mapping`` (B,) int64 in {-1, +1}; ``support`` (B, T, K)
        bool and ``semantic_sign`` (B, T, K) int8 (words 0 .. L - 1 then the queries); plus
        ``words`` (B, T, d) (demo_x and the queries are its views), ``coefficient``,
        ``clean_label``, ``label_concept``, ``label_support`` and ``label_sign`` (module
        docstring). Fully vectorised: the support is the ``s_extra`` smallest of K uniform
        scores with k*'s set above 1, then k* forced on; signs, coefficients and noises take
        one draw each. Every draw is made on ``generator.device``."""
        check_batch_size(batch_size)
        s = self.spec
        L = s.num_demos if num_demos is None else as_int("num_demos", num_demos, 1)
        gen = generator
        dev = gen.device
        device = torch.device(device) if device is not None else dev
        tab = self._tables(dev)
        B, T, K = batch_size, L + s.num_queries, s.num_concepts
        u = open_uniform((B,), gen, dev, torch.float64)
        kstar = (u[:, None] > tab["thresholds"]).sum(-1)
        if s.mapping == "random":
            m = torch.randint(0, 2, (B,), generator=gen, device=dev) * 2 - 1
        else:
            m = torch.full((B,), 1 if s.mapping == "fixed" else -1, device=dev)
        kidx = kstar[:, None, None].expand(B, T, 1)
        support = torch.zeros(B, T, K, dtype=torch.bool, device=dev)
        if s.s_extra:
            scores = torch.rand(B, T, K, generator=gen, device=dev)
            scores.scatter_(-1, kidx, 2.0)
            extra = scores.topk(s.s_extra, -1, largest=False, sorted=False).indices
            support.scatter_(-1, extra, True)
        support.scatter_(-1, kidx, True)
        sign = torch.randint(0, 2, (B, T, K), generator=gen, device=dev, dtype=torch.int8)
        sign = sign * 2 - 1
        coef = support.to(torch.float32)
        if s.coef_jitter:
            jitter = torch.rand(B, T, K, generator=gen, device=dev).mul_(2.0).sub_(1.0)
            coef = coef * jitter.mul_(s.coef_jitter).add_(1.0)
        words = torch.randn(B, T, s.d, generator=gen, device=dev).mul_(s.sigma)
        flat = words.view(B * T, s.d)
        flat.addmm_(coef.view(B * T, K), tab["a"])
        flat.addmm_((coef * sign).view(B * T, K), tab["b"])
        clean = m[:, None] * sign.gather(-1, kidx)[..., 0].long()
        labels = clean
        if s.label_noise:
            flip = torch.rand(B, T, generator=gen, device=dev) < s.label_noise
            labels = torch.where(flip, -clean, clean)
        kappa = (kstar + 1) % K if s.cross_pairing else kstar
        lidx = kappa[:, None, None].expand(B, L, 1)
        label_support = torch.zeros(B, L, K, dtype=torch.bool, device=dev)
        label_sign = torch.zeros(B, L, K, dtype=torch.int8, device=dev)
        r = s.label_extra_concepts
        if r:
            scores = torch.rand(B, L, K, generator=gen, device=dev)
            scores.scatter_(-1, lidx, 2.0)
            extra = scores.topk(r, -1, largest=False, sorted=False).indices
            label_support.scatter_(-1, extra, True)
            rho = torch.randint(0, 2, (B, L, K), generator=gen, device=dev, dtype=torch.int8)
            label_sign = torch.where(label_support, rho * 2 - 1, label_sign)
        label_support.scatter_(-1, lidx, True)
        label_sign.scatter_(-1, lidx, labels[:, :L, None].to(torch.int8))
        demo_u = torch.randn(B, L, s.d_y, generator=gen, device=dev).mul_(s.sigma_y)
        lflat = demo_u.view(B * L, s.d_y)
        lcoef = label_support.to(torch.float32).view(B * L, K)
        lflat.addmm_(lcoef, tab["c"])
        lflat.addmm_(label_sign.to(torch.float32).view(B * L, K), tab["d"])
        out = {
            "words": words,
            "demo_u": demo_u,
            "demo_y": labels[:, :L],
            "queries_y": labels[:, L:],
            "query_y": labels[:, L],
            "task_concept": kstar,
            "mapping": m,
            "support": support,
            "semantic_sign": sign,
            "coefficient": coef,
            "clean_label": clean,
            "label_concept": kappa,
            "label_support": label_support,
            "label_sign": label_sign,
        }
        out = {key: v.to(device) for key, v in out.items()}
        out["demo_x"], out["query_x"] = out["words"][:, :L], out["words"][:, L]
        out["queries_x"] = out["words"][:, L:]
        return out

    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> Batch:
        """``batch_size`` prompts (:meth:`sample_prompts`) in the batch layout of the module
        docstring."""
        p = self.sample_prompts(batch_size, generator=generator, device=device)
        B, L = p["demo_y"].shape
        s = self.spec
        T = L + s.num_queries
        features = torch.empty(B, T, s.d + s.d_y, device=p["words"].device)
        features[..., : s.d] = p["words"]  # every entry written once (no zero fill first)
        features[:, :L, s.d :] = p["demo_u"]
        features[:, L:, s.d :] = 0.0
        tokens = torch.zeros(B, T, dtype=torch.int64, device=features.device)
        tokens[:, :L] = (p["demo_y"] + 1) // 2
        targets = torch.cat([tokens[:, 1 : L + 1], (p["queries_y"] + 1) // 2], 1)
        mask = torch.zeros(B, T, dtype=torch.bool, device=features.device)
        mask[:, L:] = True
        keys = (
            "task_concept", "mapping", "support", "semantic_sign", "coefficient",
            "clean_label", "label_concept", "label_support", "label_sign",
        )  # fmt: skip
        return Batch(
            tokens=tokens,
            targets=targets,
            loss_mask=mask,
            params={key: p[key] for key in keys},
            vocab_size=2,
            true_probs_fn=self.true_probs,
            features=features,
        )

    def true_probs(self, batch: Batch) -> Tensor:
        """(B, T, 2) float32 the law of each target given the latents: 1 - p on the clean
        label m eps_{i,k*} of the next word i = t + 1 at t < L - 1 and of query q at t = L + q,
        a point mass on the placeholder token 0 at t = L - 1."""
        clean = batch.params["clean_label"]  # (B, T): words 0 .. L + Q - 1
        p = self.spec.label_noise
        plus = torch.where(clean > 0, 1.0 - p, p).to(torch.float32)
        law = torch.stack([1.0 - plus, plus], -1)
        out = torch.empty_like(law)
        L = clean.shape[1] - self.spec.num_queries
        out[:, : L - 1] = law[:, 1:L]
        out[:, L - 1, 0], out[:, L - 1, 1] = 1.0, 0.0
        out[:, L:] = law[:, L:]
        return out

    # ------------------------------------------------------------------- the exact oracle
    def oracle(self, batch: Batch) -> Tensor:
        """(B, T, 2) float32 exact Bayes log-probabilities given the tokens and features (the
        prompt) and the world: :meth:`query_log_probs` at the queries, the placeholder's point
        mass at t = L - 1 and (1/2, 1/2) before (module docstring). Raises ``ValueError`` for
        a batch without features or of the wrong width."""
        return _layout(self.queries_log_probs(batch.tokens, batch.features), batch.seq_len)

    def query_log_probs(
        self, tokens: Tensor, features: Tensor | None, *, context: bool = True
    ) -> Tensor:
        """(B, 2) float64 log P(y_q = -1, +1 | prompt) of the exact posterior (module
        docstring), from ``tokens`` (B, L + 1) int64 (the demonstration labels) and
        ``features`` (B, L + 1, d + d_y) float32; any L >= 1. With ``num_queries`` Q > 1 it is
        :meth:`queries_log_probs`, (B, Q, 2). ``context=False`` conditions on the query word
        x_q alone (the no-context Bayes predictor). Raises ``ValueError`` for missing or
        mis-shaped features."""
        out = self.queries_log_probs(tokens, features, context=context)
        return out[:, 0] if self.spec.num_queries == 1 else out

    def queries_log_probs(
        self, tokens: Tensor, features: Tensor | None, *, context: bool = True
    ) -> Tensor:
        """(B, Q, 2) float64 log P(y_q = -1, +1 | prompt) of each of the Q = ``num_queries``
        queries (module docstring): query q given the demonstrations and the words of queries
        0 .. q, from ``tokens`` (B, L + Q) int64 and ``features`` (B, L + Q, d + d_y) float32;
        any L >= 1. ``context=False``: each query word alone. Computed in float64 log space,
        in blocks of 512 prompts. Raises ``ValueError`` for missing or mis-shaped features."""
        s = self.spec
        if features is None or features.dim() != 3 or features.shape[-1] != s.d + s.d_y:
            got = None if features is None else tuple(features.shape)
            raise ValueError(f"features must be (B, L + 1, {s.d + s.d_y}) (d + d_y), got {got}")
        q = s.num_queries
        if tokens.shape != features.shape[:2] or features.shape[1] < q + 1:
            raise ValueError(
                f"tokens {tuple(tokens.shape)} must be (B, L + {q}) with L >= 1 (num_queries "
                f"= {q}), matching features {tuple(features.shape)}"
            )
        blocks = [
            self._query_block(tokens[i : i + 512], features[i : i + 512], context)
            for i in range(0, tokens.shape[0], 512)
        ]
        return torch.cat(blocks)

    def _query_block(self, tokens: Tensor, features: Tensor, context: bool) -> Tensor:
        """(B, Q, 2) the posteriors of the Q queries (:meth:`queries_log_probs`)."""
        s = self.spec
        Q = s.num_queries
        L = tokens.shape[1] - Q
        tab = self._tables(features.device)
        x = features[..., : s.d].to(torch.float64)
        word = self._word_terms(x if context else x[:, L:], tab)  # (B, T', K, 2)
        log_law = torch.log(torch.tensor(self.concept_law, device=x.device))
        ctx = log_law.expand(x.shape[0], -1)[:, None]  # (B, 1, K)
        p = s.label_noise
        same = math.log1p(-p)
        flip = math.log(p) if p > 0 else -math.inf

        def noisy(kept: Tensor, flipped: Tensor) -> Tensor:
            """log((1 - p) e^kept + p e^flipped); without noise exactly ``kept`` (what
            logaddexp returns there, without its passes: a third of the oracle's time)."""
            if p == 0:
                return kept
            return torch.logaddexp(kept + same, flipped + flip)

        q = word[:, -Q:]  # (B, Q, K, 2): e = -1, +1
        if context:
            y = tokens[:, :L].long() * 2 - 1  # (B, L) in {-1, +1}
            u = features[:, :L, s.d :].to(torch.float64)
            ctx = ctx + self._label_terms(u, y, tab).sum(1)[:, None]
            if Q > 1:  # the earlier queries' words, their labels unseen: sum_e A(k*, e)
                seen = torch.logsumexp(q, -1)  # (B, Q, K)
                ctx = ctx + (seen.cumsum(1) - seen)  # queries 0 .. j - 1 before query j
        mappings = {"fixed": (1,), "switched": (-1,), "random": (1, -1)}[s.mapping]
        log_pm = -math.log(len(mappings))
        joint = []
        for m in mappings:
            total = ctx
            if context:
                # P(y_l | m e) = 1 - p when e = m y_l, else p; e index 1 is e = +1
                match = (m * y > 0).long()[..., None, None].expand(-1, -1, word.shape[2], 1)
                w = word[:, :L]
                demo = noisy(w.gather(-1, match)[..., 0], w.gather(-1, 1 - match)[..., 0])
                total = total + demo.sum(1)[:, None]
            # y_q = +1 needs m e = +1 (e index 1 if m = +1), y_q = -1 the other sign
            plus = q[..., 1] if m > 0 else q[..., 0]
            minus = q[..., 0] if m > 0 else q[..., 1]
            query = torch.stack([noisy(minus, plus), noisy(plus, minus)], -1)  # (B, Q, K, 2)
            joint.append(torch.logsumexp(total[..., None] + query, 2) + log_pm)
        out = torch.logsumexp(torch.stack(joint), 0)
        return out - torch.logsumexp(out, -1, keepdim=True)

    def _word_terms(self, x: Tensor, tab: Mapping[str, Tensor]) -> Tensor:
        """(B, T, K, 2) float64 log A_i(k*, e) (module docstring) up to a constant shared by
        every (k*, e), e index 0 for -1 and 1 for +1; ``x`` (B, T, d) float64."""
        s = self.spec
        sig2 = s.oracle_sigma**2
        if s.dictionary == "gaussian":
            ll = (x @ tab["word_means"].T - tab["word_sq"] / 2.0) / sig2  # (B, T, H)
            idx = tab["word_index"]  # (K, 2, H_k)
            return torch.logsumexp(ll[..., idx], -1)
        pa, pb = x @ tab["a64"].T, x @ tab["b64"].T  # (B, T, K)
        loglam = torch.stack(
            [
                _log_ratio(pa, e * pb, s.alpha, s.beta, s.oracle_sigma, s.coef_jitter)
                for e in (-1, 1)
            ],
            -1,
        )
        log_big = torch.logsumexp(loglam, -1) - math.log(2.0)  # log Lambda_{i,k}
        others = leave_one_out_esp(log_big, s.s_extra)  # (B, T, K)
        return loglam + others[..., None]

    def _label_terms(self, u: Tensor, y: Tensor, tab: Mapping[str, Tensor]) -> Tensor:
        """(B, L, K) float64 log U_l(k*) up to a constant: the likelihood of label token
        ``u`` (B, L, d_y) float64 with its concept kappa(k*) carrying the observed label ``y``
        (B, L) in {-1, +1} and r = ``label_extra_concepts`` other concepts."""
        s = self.spec
        sig2 = s.oracle_sigma_y**2
        yi = (y > 0).long()
        if s.dictionary == "gaussian":
            means = tab["label_means"]  # (K, 2, H_r, d_y)
            k, _, h, dy = means.shape
            ll = (u @ means.reshape(-1, dy).T - tab["label_sq"].reshape(-1) / 2.0) / sig2
            per = torch.logsumexp(ll.reshape(*u.shape[:2], k, 2, h), -1)  # (B, L, K, 2)
            out = per.gather(-1, yi[..., None, None].expand(-1, -1, k, 1))[..., 0]
        else:
            pc, pd = u @ tab["c64"].T, u @ tab["d64"].T
            out = _log_ratio(pc, y[..., None] * pd, s.gamma, s.delta, s.oracle_sigma_y, 0.0)
            if s.label_extra_concepts:
                pair = torch.stack(
                    [
                        _log_ratio(pc, e * pd, s.gamma, s.delta, s.oracle_sigma_y, 0.0)
                        for e in (-1, 1)
                    ],
                    -1,
                )
                log_big = torch.logsumexp(pair, -1) - math.log(2.0)
                out = out + leave_one_out_esp(log_big, s.label_extra_concepts)
        return torch.roll(out, -1, -1) if s.cross_pairing else out

    # ------------------------------------------------------------ reference predictors
    def _prompt(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(demo_x (B, L, d), demo_u (B, L, d_y), demo_y (B, L) int64 in {-1, +1}, queries_x
        (B, Q, d)) read from a batch's tokens and features."""
        s, f = self.spec, batch.features
        if f is None:
            raise ValueError("multi-concept strategies need batch.features")
        L = batch.seq_len - s.num_queries
        return f[:, :L, : s.d], f[:, :L, s.d :], batch.tokens[:, :L].long() * 2 - 1, f[:, L:, : s.d]

    def dictionary_oracle(self, batch: Batch) -> Tensor:
        """(B,) int64 in {-1, 0, +1} the dictionary oracle's prediction ((B, Q) with Q =
        ``num_queries`` > 1, :meth:`dictionary_signs`)."""
        signs = self.dictionary_signs(batch)
        return signs[:, 0] if self.spec.num_queries == 1 else signs

    def dictionary_signs(self, batch: Batch) -> Tensor:
        """(B, Q) int64 in {-1, 0, +1} the dictionary oracle's prediction at each query q:
        k^ = argmax_k sum_l <u_l, c_k> / gamma^2 + sum_i <x_i, a_k> / alpha^2 (the L
        demonstrations and the words of queries 0 .. q), s^_i = sign <x_i, b_k^>, m^ = sign
        sum_l y_l s^_l (random mapping; +1 fixed, -1 switched), y^_q = m^ s^_q (0: a tie)."""
        s = self.spec
        tab = self._tables(batch.features.device if batch.features is not None else "cpu")
        demo_x, demo_u, demo_y, queries_x = self._prompt(batch)
        x = torch.cat([demo_x, queries_x], 1).to(torch.float64)
        L = demo_x.shape[1]
        label_score = (demo_u.to(torch.float64) @ tab["c64"].T).sum(1) / s.gamma  # (B, K)
        word_score = (x @ tab["a64"].T).cumsum(1)[:, L:] / s.alpha  # (B, Q, K): words .. L + q
        b_hat = tab["b64"][(label_score[:, None] + word_score).argmax(-1)]  # (B, Q, d)
        query_signs = torch.sign((x[:, L:] * b_hat).sum(-1)).long()  # (B, Q)
        if s.mapping == "random":
            demo_signs = torch.sign(torch.einsum("bld,bqd->bql", x[:, :L], b_hat)).long()
            m_hat = torch.sign((demo_y[:, None] * demo_signs).sum(-1))  # (B, Q)
        else:
            m_hat = 1 if s.mapping == "fixed" else -1
        return m_hat * query_signs

    @property
    def strategies(self) -> Mapping[str, Strategy]:
        """Reference predictors at the query, least to most informed:
        ``uniform``; ``majority`` (the majority demonstration label); ``no_context`` (the
        exact Bayes posterior given x_q alone and the dictionary); the dictionary-free
        in-context rules ``softmax_vote`` (tau = :data:`SOFTMAX_TAU`), ``nearest_centroid``
        and ``ridge`` (lambda = :data:`RIDGE_LAMBDA`), which read demo_x, demo_y and x_q only;
        ``dictionary_oracle`` (:meth:`dictionary_oracle`). Sign rules put 1 - HARD_EPS on
        their label (1/2 each on a tie); every strategy has the oracle's laws at t < L."""

        def uniform(batch: Batch) -> Tensor:
            shape = (batch.batch_size, self.spec.num_queries, 2)
            return _layout(torch.full(shape, -math.log(2.0)), batch.seq_len)

        def no_context(batch: Batch) -> Tensor:
            lp = self.queries_log_probs(batch.tokens, batch.features, context=False)
            return _layout(lp, batch.seq_len)

        def rule(score: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]) -> Strategy:
            def predict(batch: Batch) -> Tensor:
                x, u, y, queries = self._prompt(batch)
                signs = [torch.sign(score(x, u, y, q)) for q in queries.unbind(1)]
                return _sign_log_probs(torch.stack(signs, 1), batch.seq_len)

            return predict

        def dictionary(batch: Batch) -> Tensor:
            return _sign_log_probs(self.dictionary_signs(batch), batch.seq_len)

        return {
            "uniform": uniform,
            "majority": rule(lambda x, u, y, q: majority_score(y)),
            "no_context": no_context,
            "softmax_vote": rule(lambda x, u, y, q: softmax_vote_score(x, y, q, SOFTMAX_TAU)),
            "nearest_centroid": rule(lambda x, u, y, q: centroid_score(x, y, q)),
            "ridge": rule(lambda x, u, y, q: ridge_score(x, y, q, RIDGE_LAMBDA)),
            "dictionary_oracle": dictionary,
        }

    # ------------------------------------------------------------- analytic accuracies
    def bayes_error(self) -> float:
        """The analytic error of the dictionary oracle (orthogonal dictionary,
        k* identified from the context): per word e = p + (1 - 2p) E_z Phi(-z beta / sigma)
        (p = ``label_noise``; z ~ U[1 - c, 1 + c], 64-point Gauss-Legendre; 0 at sigma = 0),
        the exact Bayes error given k* for the fixed and switched mappings; for the random
        mapping (1 - F) e + F (1 - e) with F = P(majority of the L demonstrations' y_l m s^_l
        is wrong) + 1/2 P(tie), each wrong with probability e: the majority-vote rule's
        error, an upper bound of the Bayes error, equal to it up to O(F) terms. Raises
        ``ValueError`` for the ``"gaussian"`` dictionary (no closed form)."""
        s = self.spec
        if s.dictionary != "orthogonal":
            raise ValueError("bayes_error: closed form for dictionary='orthogonal' only")
        p = s.label_noise
        if s.sigma == 0.0:
            q = 0.0
        elif s.coef_jitter == 0.0:
            q = 0.5 * math.erfc(s.beta / s.sigma / math.sqrt(2.0))
        else:
            nodes, weights = np.polynomial.legendre.leggauss(64)
            z = 1.0 + s.coef_jitter * nodes
            q = float(
                (
                    weights
                    * np.array([0.5 * math.erfc(v * s.beta / s.sigma / math.sqrt(2.0)) for v in z])
                ).sum()
                / 2.0
            )
        e = p + (1.0 - 2.0 * p) * q
        if s.mapping != "random":
            return e
        L = s.num_demos
        pmf = [math.comb(L, j) * e**j * (1.0 - e) ** (L - j) for j in range(L + 1)]
        fail = sum(pmf[j] for j in range(L + 1) if 2 * j > L)
        fail += 0.5 * pmf[L // 2] if L % 2 == 0 else 0.0
        return (1.0 - fail) * e + fail * (1.0 - e)

    def no_context_accuracy(self) -> float:
        """The exact accuracy of the no-context Bayes predictor (x_q alone, dictionary known)
        in the noiseless limit sigma -> 0 with z = 1: the query's support S and signs are then
        read exactly, P(k* = k | S) is proportional to p(k) on S, and the rule picks the label
        of larger posterior mass: an expectation over the C(K, s + 1) supports and 2^(s + 1)
        signs, then p + (1 - 2p) acc under label noise p; 1/2 for the random mapping. Uniform
        law, s = ``s_extra``: E[max(n, s + 1 - n)] / (s + 1), n ~ Bin(s + 1, 1/2) (0.75 at
        C0). The formula (s + 2) / (2 (s + 1)) = 0.667 is the accuracy of reading the sign of
        one active concept picked at random, not the Bayes rule's. Raises ``ValueError`` when
        the enumeration exceeds :data:`MAX_HYPOTHESES` supports x signs."""
        s = self.spec
        if s.mapping == "random":
            return 0.5
        k, n = s.num_concepts, s.s_extra + 1
        if math.comb(k, n) * 2**n > MAX_HYPOTHESES:
            raise ValueError(
                f"no_context_accuracy: C({k}, {n}) 2^{n} supports x signs exceed {MAX_HYPOTHESES}"
            )
        law = self.concept_law
        signs = np.array(list(product((-1, 1), repeat=n)), dtype=np.float64)  # (2^n, n)
        acc = 0.0
        for support in combinations(range(k), n):
            w = law[list(support)]
            mass = w.sum()
            if mass == 0.0:
                continue
            prob_support = mass / math.comb(k - 1, n - 1)
            plus = (signs > 0).astype(np.float64) @ w  # posterior mass of label +1 (x mass)
            acc += prob_support * np.maximum(plus, mass - plus).mean() / mass
        p = s.label_noise
        return p + (1.0 - 2.0 * p) * float(acc)

    # ------------------------------------------------------------------ named splits
    @property
    def named_splits(self) -> Mapping[str, str]:
        """The OOD splits (same world; ``docs/envs/ICL-MultiConcept-v0.md``, Splits): ``iid``
        (the default concept law), ``ood_length_N`` for N in :data:`OOD_LENGTHS` (any N >= 1 is
        accepted), ``ood_skew`` (:func:`skewed_concept_law`), ``train_skew`` (the same law, named
        for the run that trains on it and scores ``iid``: ``task.split_task("train_skew")`` is the
        task to train), ``ood_switched`` (m = -1), ``ood_noise`` (sigma x :data:`NOISE_FACTOR`),
        ``ood_heldout_concepts`` (k* uniform over the held-out concepts; only with
        ``heldout_concepts`` > 0) and ``ood_cross_pairing``."""
        s = self.spec
        out = {"iid": f"L = {s.num_demos}, k* uniform over the training concepts"}
        for n in OOD_LENGTHS:
            out[f"ood_length_{n}"] = f"L = {n} demonstrations (any ood_length_N, N >= 1)"
        out["ood_skew"] = f"p(k* = 0) = {SKEW_MASS}, the rest uniform over the training concepts"
        out["train_skew"] = "the ood_skew law as a training distribution (train on it, score iid)"
        out["ood_switched"] = "m = -1 for every prompt: mu^+ takes the label -1"
        out["ood_noise"] = f"sigma x {NOISE_FACTOR:g} = {s.sigma * NOISE_FACTOR:g}"
        if s.heldout_concepts:
            out["ood_heldout_concepts"] = (
                f"k* uniform over the {s.heldout_concepts} concepts never the task concept in "
                "training"
            )
        out["ood_cross_pairing"] = "label tokens carry concept (k* + 1) mod K"
        return out

    def split_task(self, name: str) -> MultiConceptTask:
        """The task of named split ``name`` (:attr:`named_splits`, or ``ood_length_N``);
        raises ``ValueError`` naming the valid splits for anything else."""
        s = self.spec
        length = re.fullmatch(r"ood_length_([1-9][0-9]*)", name) if isinstance(name, str) else None
        if length:
            return MultiConceptTask(replace(s, num_demos=int(length.group(1))))
        if name not in self.named_splits:
            super().split_task(name)
        k, h = s.num_concepts, s.heldout_concepts
        if name == "iid":
            spec = replace(s, concept_probs=None)
        elif name in ("ood_skew", "train_skew"):
            spec = replace(s, concept_probs=skewed_concept_law(s))
        elif name == "ood_switched":
            spec = replace(s, mapping="switched")
        elif name == "ood_noise":
            spec = replace(s, sigma=s.sigma * NOISE_FACTOR)
        elif name == "ood_heldout_concepts":
            law = tuple(0.0 if i < k - h else 1.0 / h for i in range(k))
            spec = replace(s, concept_probs=law)
        else:
            spec = replace(s, cross_pairing=True)
        return MultiConceptTask(spec)

    # ----------------------------------------------------------------------- env info
    def online(self, batch: Batch) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        """The laws at the queries t = L .. L + Q - 1 only: ``(true, oracle)``, (B, 2) float32
        numpy (the query label's law given the latents, and :meth:`queries_log_probs`
        exponentiated). Raises ``ValueError`` at any other position."""
        first = batch.seq_len - self.spec.num_queries
        true = batch.true_probs[:, first:].cpu().numpy()  # (B, Q, 2)
        oracle = self.queries_log_probs(batch.tokens, batch.features).exp().float().cpu().numpy()

        def step(t: int) -> tuple[np.ndarray, np.ndarray]:
            if not first <= t < batch.seq_len:
                raise ValueError(
                    f"online: this task scores positions {first} .. {batch.seq_len - 1} only, "
                    f"got t={t}"
                )
            return true[:, t - first], oracle[:, t - first]

        return step

    def episode_info(self, batch: Batch) -> dict[str, object]:
        """Per-episode env info, numpy int64 (B,): ``task_concept`` k*,
        ``mapping`` m in {-1, +1} and ``query_y`` in {-1, +1} (the label after noise; the
        last query's with ``num_queries`` > 1, given at the episode's last step)."""
        p = batch.params
        return {
            "task_concept": p["task_concept"].cpu().numpy().copy(),
            "mapping": p["mapping"].cpu().numpy().copy(),
            "query_y": (batch.targets[:, -1] * 2 - 1).cpu().numpy(),
        }


def _log_ratio(pa: Tensor, pb: Tensor, alpha: float, beta: float, sigma: float, c: float) -> Tensor:
    """log lambda: the likelihood ratio of "the concept is active with these signs" to "it is
    not", from the projections ``pa`` on a^ and ``pb`` on e b^ (float64, the sign e already
    applied), norms ``alpha``, ``beta``, noise ``sigma`` > 0 (the spec's ``oracle_sigma``,
    floored) and coefficient jitter ``c`` (module docstring: z = 1, or z ~ U[1 - c, 1 + c] in
    closed form)."""
    sig = sigma
    if c == 0.0:
        return (alpha * pa + beta * pb - (alpha**2 + beta**2) / 2.0) / sig**2
    n = math.sqrt(alpha**2 + beta**2)
    w = (alpha * pa + beta * pb) / n
    const = math.log(sig * math.sqrt(2.0 * math.pi) / (2.0 * c * n))
    return (
        w**2 / (2.0 * sig**2)
        + const
        + _log_ndtr_diff((n * (1 + c) - w) / sig, (n * (1 - c) - w) / sig)
    )
