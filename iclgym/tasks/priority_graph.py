"""Token-priority graphs (Li, Huang, Ildiz, Rawat, Oymak 2024, *Mechanics of Next Token
Prediction with Self-Attention*, AISTATS 2024, arXiv 2403.08081): next-token prediction as hard
retrieval of the highest-priority tokens of the context followed by a soft composition among
them (the env page is ``docs/envs/ICL-PriorityGraph-v0.md``; this module is the task, the planted
sampler, Oracle C and the planted metrics; the token-priority graphs of a dataset, Oracles A and B,
the Graph-SVM and the paper's model live in :mod:`iclgym.tasks.priority_graph_theory` and
:mod:`baselines.priority_attention`).

**Modes**. ``mode="planted"`` (the benchmark default, an iclgym design, not the paper's): a
planted priority structure fixed by ``instance_seed``; for every query token k a permutation of
the K tokens cut into consecutive blocks of sizes ~ U{1 .. s_max} gives ``level[k, j]`` (the
block index of j: later blocks have higher priority) and ``beta[k, j] ~ N(0, sigma_beta^2)``.
A context is T tokens i.i.d. uniform over [K] (without replacement with ``distinct=True``), its
last token is the query k = x_{T-1} (part of the attended context; it may be the label), and the
label is drawn from Oracle C's law (the R -> infinity limit of the paper's model):

- hard retrieval: ``S* = {j in X : level[k, j] = max_{i in X} level[k, i]}``;
- soft composition: ``p(j) = n_X(j) exp(beta[k, j]) / sum_{i in S*} n_X(i) exp(beta[k, i])`` on
  S*, 0 elsewhere (n_X(j): the multiplicity of j in X).

``deterministic=True`` labels by the argmax of that law (smallest token id on ties); the label's
law is then the point mass there. ``mode="paper"`` draws samples uniformly from the paper's fixed
dataset (:func:`iclgym.tasks.priority_graph_theory.paper_dataset`, redrawn until its TPGs are
cyclic / acyclic as asked); see :class:`PriorityGraphTask` for its oracle.

**Batch mapping** (single label, as the sparse contextual bigrams): ``tokens`` (B, T) are the
context x_0 .. x_{T-1}; ``targets[:, t] = tokens[:, t + 1]`` for t < T - 1 and ``targets[:, T -
1]`` is the label y, the only scored position (:attr:`PriorityGraphTask.first_scored_position`
= T - 1, the query). The envs show the T context tokens and then the label (their sequence x_0
.. x_T). ``true_probs`` is the law of the next context token at t < T - 1 (uniform over [K], or
over the tokens not yet seen with ``distinct=True``; in paper mode the dataset's law of the next
token given the prefix) and the label's law at T - 1. ``params`` holds ``top_mask`` (B, K) bool
(S*; in paper mode the undominated tokens of the context under the dataset's own TPG, which on
the training set are the label's SCC among the context's tokens) and ``oracle_probs`` (B, K)
float64 (the label's law: Oracle C, or the dataset law in paper mode).

**Sampling** (vectorised torch; on the CPU one compiled pass over the rows for planted contexts
with repeats, :func:`planted_draw`, the same numbers). Every row reads its own
words of the generator (T + 1 64-bit words, K + 1 with ``distinct=True``, one in paper mode), so
drawing B1 then B2 rows gives the rows of one draw of B1 + B2
(:attr:`PriorityGraphTask.sample_composes`). A word w in [0, 2**63) gives the token ``floor(u
K)`` with u = (w >> 10) / 2**53 in [0, 1) (the top log2 K bits of w for a power of two, an
integer multiply-shift below K = 1024); distinct contexts are the first T entries of the
argsort of K words (a uniform random permutation); the label is an inverse-CDF draw, the first
token j with ``u * c[K-1] <= c[j]`` for the cumulative weights c (:func:`planted_weights`) and u
= ((w >> 10) + 1) / 2**53 in (0, 1], so a token of weight 0 is never drawn. With
``deterministic=True`` the label word is read and unused, so the contexts are those of
``deterministic=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from numba import njit
from torch import Tensor

from iclgym.tasks import kernels
from iclgym.tasks.base import Batch, Strategy, Task, TaskSpec, check_batch_size
from iclgym.tasks.priority_graph_theory import (
    EMBEDDINGS,
    EmpiricalTPG,
    PaperDataset,
    PaperTheory,
    paper_dataset,
)
from iclgym.validation import (
    as_bool,
    as_float,
    as_int,
    check_memory,
    check_sequence_memory,
    invalid,
)

MODES = ("planted", "paper")
DEFAULT_S_MAX = 3
"""The default largest planted block, capped at K (``docs/envs/ICL-PriorityGraph-v0.md``)."""
ORACLE_A_SAMPLES = 2000
"""Planted mode: the training set of the ``oracle_a`` strategy, the first 2000 samples of the
train split of seed 0 (the planted reproduction in ``docs/envs/ICL-PriorityGraph-v0.md`` uses
n_train = 2000)."""
INSTANCE_STREAM = 9
"""Seed stream of ``instance_seed`` for the planted levels and betas
(``numpy.random.SeedSequence(instance_seed, spawn_key=(9,))``); streams 0-8 of a seed are the
data splits, dropout, the templates' training set, model init, batch order and the sparse
bigrams' task and transfer draws."""
UNIFORM_MULTIPLY_MAX = 1024
"""Uniform indices below this range are drawn by an integer multiply-shift (the 53-bit product
fits in int64), above it in float64."""
LOG_FLOOR = 1e-30
"""Log-probabilities are floored at log(1e-30) where a law is exactly 0."""
NORMAL_BOUND = 16.0
"""A bound on |z| of numpy's ``standard_normal`` draws: its ziggurat returns |z| < r + sqrt(2 *
53 ln 2) ~ 12.23 (r ~ 3.654, tail draws from 53-bit uniforms), so 16 leaves a margin."""
SIGMA_BETA_MAX = 1e306
"""The largest ``sigma_beta``: every planted beta = sigma_beta z has |beta| < 16 sigma_beta
(:data:`NORMAL_BOUND`), so every difference of two betas (the shifted ``beta - max beta`` of
Oracle C) stays below 2 * 16 * 1e306 = 3.2e307, finite in float64 (max ~1.8e308)."""


@dataclass(frozen=True)
class PriorityGraphSpec(TaskSpec):
    """Parameters of a token-priority-graph task (``docs/envs/ICL-PriorityGraph-v0.md``, Arguments).

    Attributes:
        mode: ``"planted"`` (default: fresh contexts from a planted priority structure) or
            ``"paper"`` (samples of the paper's fixed dataset).
        num_tokens: K >= 2, the vocabulary.
        context_len: T >= 1 context tokens (the last is the query); T <= K with
            ``distinct=True``.
        s_max: 1 <= s_max <= K, the largest block of the planted levels (1: every token its own
            level, pure hard retrieval; K may give one block: pure soft composition); None
            (default): min(3, K), 3 where K allows it. Planted mode only.
        sigma_beta: in [0, :data:`SIGMA_BETA_MAX` = 1e306], the scale of the planted composition
            weights beta (0: the label is count-weighted uniform over S*); the bound keeps every
            beta and every difference of two betas finite (|beta| < 16 sigma_beta).
        distinct: planted contexts without repeated tokens (the paper's sampling for T <= K).
        deterministic: planted labels are the argmax of Oracle C's law (smallest id on ties).
        instance_seed: int >= 0; the planted levels and betas (stream :data:`INSTANCE_STREAM`)
            and the paper-mode dataset depend on it only.
        n: paper mode, n >= 1 samples in the fixed dataset (n >= 2 with ``cyclic=True``: one
            sample's edges all leave its label, so its graphs have no cycle).
        d: paper mode, d >= 1 embedding dimension; in paper mode d >= K for ``random`` (K
            independent rows) and ``ortho``, d >= K + 1 for ``equi-corr``
            (:func:`iclgym.tasks.priority_graph_theory.paper_embeddings`).
        embedding: paper mode, one of ``"random"``, ``"ortho"``, ``"equi-corr"``.
        cyclic: paper mode, redraw the dataset until some TPG has an SCC with more than one node
            (True) or until every SCC is a singleton (False).
        max_tries: paper mode, >= 1 redraws before the rejection loop raises.

    The paper-mode fields are validated in both modes and used only in paper mode; ``s_max``
    and ``sigma_beta`` are used only in planted mode, and ``distinct=True`` /
    ``deterministic=True`` are refused in paper mode (the paper's generator fixes both).
    Integers may be numpy integers, flags numpy bools. Raises ``ValueError`` naming the
    parameter, its value and the valid range, including sizes whose tables or 64 sequences
    would not fit in memory (:func:`iclgym.validation.check_sequence_memory`).
    """

    mode: str = "planted"
    num_tokens: int = 8
    context_len: int = 6
    s_max: int | None = None
    sigma_beta: float = 1.0
    distinct: bool = False
    deterministic: bool = False
    instance_seed: int = 0
    n: int = 6
    d: int = 8
    embedding: str = "random"
    cyclic: bool = True
    max_tries: int = 10_000

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise invalid("mode", self.mode, f"one of {MODES}")
        k = as_int("num_tokens", self.num_tokens, 2)
        t = as_int("context_len", self.context_len, 1)
        put("num_tokens", k)
        put("context_len", t)
        if self.mode == "planted":
            s_max = min(DEFAULT_S_MAX, k) if self.s_max is None else self.s_max
            put("s_max", as_int("s_max", s_max, 1, k))
        elif self.s_max is not None:  # unused in paper mode, but a bad value is still bad
            put("s_max", as_int("s_max", self.s_max, 1, k))
        put("sigma_beta", as_float("sigma_beta", self.sigma_beta, 0.0, SIGMA_BETA_MAX))
        for flag in ("distinct", "deterministic", "cyclic"):
            put(flag, as_bool(flag, getattr(self, flag)))
        if self.distinct and t > k:
            raise invalid(
                "context_len", t, f"an int in [1, {k}] with distinct=True (T <= num_tokens)"
            )
        put("instance_seed", as_int("instance_seed", self.instance_seed, 0))
        n = as_int("n", self.n, 1)
        d = as_int("d", self.d, 1)
        put("n", n)
        put("d", d)
        if not isinstance(self.embedding, str) or self.embedding not in EMBEDDINGS:
            raise invalid("embedding", self.embedding, f"one of {EMBEDDINGS}")
        put("max_tries", as_int("max_tries", self.max_tries, 1))
        check_memory("num_tokens", k, 24.0 * k * k, f"the {k}x{k} level and beta tables")
        check_sequence_memory("context_len", t, t, k)
        if self.mode == "paper":
            for flag in ("distinct", "deterministic"):
                if getattr(self, flag):
                    raise invalid(flag, True, "False with mode='paper' (the paper's generator)")
            if self.cyclic and n < 2:
                raise invalid(
                    "n", n, "an int >= 2 with cyclic=True (one sample's graph has no cycle)"
                )
            need = k + 1 if self.embedding == "equi-corr" else k
            if d < need:
                raise invalid(
                    "d",
                    d,
                    f"an int >= {need} with mode='paper', num_tokens={k} and embedding="
                    f"{self.embedding!r} (K independent rows; equi-corr spends one more direction)",
                )
            check_memory("n", n, 8.0 * n * (t + 2 * k + 2), f"the {n}-sample dataset tables")
            check_memory("d", d, 8.0 * d * (k + d), f"the {k}x{d} embeddings")


def planted_instance(spec: PriorityGraphSpec) -> tuple[np.ndarray, np.ndarray]:
    """The planted priority structure of ``spec`` (planted mode): ``(level, beta)``, both
    (K, K) indexed ``[query k, token j]``, ``level`` int64 (block index of j in query k's
    permutation: 0 .. number of blocks - 1, higher = higher priority) and ``beta`` float64.

    From ``numpy.random.SeedSequence(spec.instance_seed, spawn_key=(INSTANCE_STREAM,))``: for k =
    0 .. K - 1 in turn a permutation of [K] and K block sizes ~ U{1 .. s_max} (the blocks cut
    the permutation in order; the sizes past its end are unused), then ``beta = sigma_beta *
    N(0, 1)`` (K, K). The levels do not depend on ``sigma_beta`` and beta scales with it."""
    k, s_max = spec.num_tokens, spec.s_max
    rng = np.random.default_rng(
        np.random.SeedSequence(spec.instance_seed, spawn_key=(INSTANCE_STREAM,))
    )
    level = np.empty((k, k), dtype=np.int64)
    for q in range(k):
        perm = rng.permutation(k)
        ends = np.cumsum(rng.integers(1, s_max + 1, size=k))
        level[q, perm] = np.searchsorted(ends, np.arange(k), side="right")
    beta = spec.sigma_beta * rng.standard_normal((k, k))
    return level, beta


def planted_weights(tokens: Tensor, level: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Unnormalised Oracle C: ``(weights, top)`` for ``tokens`` (B, T) int64 (ids in [0, K), the
    query last), ``level`` (K, K) int64 and ``beta`` (K, K) float64 (``[query, token]``, on the
    device of ``tokens``). ``top`` (B, K) bool is S* (the present tokens of the query's highest
    level present); ``weights`` (B, K) float64 are ``n_X(j) exp(beta[k, j] - max_i beta[k, i])``
    on S* and 0 elsewhere (the shift is common to a row, so it cancels in the law).

    O(B (T + K)) work without a (B, T, K) one-hot: the level of every position is read
    from the flattened (K * K) level table, the top level is a max over
    the T positions, a scatter-add of the top positions over the token ids counts n_X(j), and
    one product with the query's row of exp(beta) weighs them. When some ``exp`` of the
    shifted beta underflows (a spread of beta beyond ~700 within a query row) the weights are
    computed in log space instead."""
    b, k = tokens.shape[0], level.shape[0]
    query = tokens[:, -1:]
    cell = (query * k + tokens).reshape(-1)  # index of (query, token) in the flat table
    lev = level.reshape(-1).index_select(0, cell).view(tokens.shape)
    in_top = lev == lev.amax(1, keepdim=True)  # (B, T) positions holding a token of S*
    counts = torch.zeros(b, k, dtype=torch.float64, device=tokens.device)
    counts.scatter_add_(1, tokens, in_top.double())  # n_X(j) on S*, exact integers
    exp_beta = (beta - beta.amax(1, keepdim=True)).exp()
    if bool((exp_beta > 0).all()):
        weights = counts * exp_beta.index_select(0, query[:, 0])
        return weights, weights > 0
    top = counts > 0
    logits = torch.where(top, counts.log() + beta[query[:, 0]], -torch.inf)
    return (logits - logits.amax(1, keepdim=True)).exp(), top


def planted_law(tokens: Tensor, level: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Oracle C (closed form), the label's law given the context: ``(probs,
    top)``, ``probs`` (B, K) float64 ``n_X(j) exp(beta[k, j])`` normalised over S* (0
    elsewhere) and ``top`` (B, K) bool S*; arguments as in :func:`planted_weights`."""
    weights, top = planted_weights(tokens, level, beta)
    return weights / weights.sum(1, keepdim=True), top


def first_argmax(logits: Tensor) -> Tensor:
    """(B,) int64 argmax over the last axis of (B, K) ``logits``, the smallest index on ties
    (explicitly, whatever the device's ``argmax`` does)."""
    k = logits.shape[-1]
    ids = torch.arange(k, device=logits.device)
    is_max = logits == logits.amax(-1, keepdim=True)
    return torch.where(is_max, ids, k).amin(-1)


def _uniform_index(words: Tensor, m: int) -> Tensor:
    """``floor(u m)`` with u = (w >> 10) / 2**53 in [0, 1) for 63-bit words ``w``."""
    if m & (m - 1) == 0:  # the same number for a power of two: the top log2(m) bits
        return words >> (64 - m.bit_length())
    if m < UNIFORM_MULTIPLY_MAX:
        return ((words >> 10) * m) >> 53
    u = (words >> 10).double().mul_(2.0**-53)
    return (u * m).long().clamp_(max=m - 1)


def _open_unit(words: Tensor) -> Tensor:
    """u = ((w >> 10) + 1) / 2**53 in (0, 1], float64."""
    return ((words >> 10) + 1).double().mul_(2.0**-53)


@njit(cache=True, nogil=True)
def _planted_draw(  # pragma: no cover - compiled
    words, shift, level, exp_beta, deterministic, seq, probs, top
):
    b, t = seq.shape[0], seq.shape[1] - 1
    k = level.shape[0]
    count = np.zeros(k)  # n_X(j) of the row (each row's last pass zeroes it again)
    for r in range(b):
        query = kernels.uniform_index(words[r, t - 1], shift, k)
        high = -1
        for p in range(t):
            seq[r, p] = j = kernels.uniform_index(words[r, p], shift, k)
            count[j] += 1.0
            lj = level[query, j]
            high = lj if lj > high else high
        total = 0.0  # the weights n_X(j) exp_beta (on S*) in probs, their sum, first argmax
        best = 0
        for j in range(k):
            w = count[j] * exp_beta[query, j] * (level[query, j] == high)
            probs[r, j] = w
            top[r, j] = w > 0
            count[j] = 0.0
            best = j if w > probs[r, best] else best
            total += w
        if deterministic:  # the first argmax, a point mass
            for j in range(k):
                probs[r, j] = 0.0
            probs[r, best] = 1.0
            seq[r, t] = best
        else:  # inverse CDF: the tokens whose cumulative weight (torch's cumsum) is below u total
            x = np.float64((words[r, t] >> 10) + 1) * 2.0**-53 * total
            label = 0
            cdf = 0.0
            for j in range(k):
                w = probs[r, j]
                cdf += w
                label += cdf < x
                probs[r, j] = w / total
            seq[r, t] = label


def planted_draw(
    words: Tensor, k: int, level: Tensor, beta: Tensor, deterministic: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The planted sampler's ``(tokens, targets, oracle_probs, top_mask)`` from its words (B,
    T + 1) int64 on the CPU in one pass, the same numbers bit for bit as the torch code of
    :meth:`PriorityGraphTask.sample` (``tests/tasks/test_priority_graph.py``), which makes
    ~20 passes over the batch (``tokens`` and ``targets`` are views of one (B, T + 1) tensor,
    x_0 .. x_{T-1} then the label); None where that code takes a path this kernel lacks (K >=
    :data:`UNIFORM_MULTIPLY_MAX`, or a beta spread whose ``exp`` underflows)."""
    if not kernels.available(words.device) or k >= UNIFORM_MULTIPLY_MAX:
        return None
    exp_beta = (beta - beta.amax(1, keepdim=True)).exp()
    if not bool((exp_beta > 0).all()):
        return None
    b, t = words.shape[0], words.shape[1] - 1
    seq = torch.empty(b, t + 1, dtype=torch.int64)  # the context, then the label
    probs = torch.empty(b, k, dtype=torch.float64)
    top = torch.empty(b, k, dtype=torch.bool)
    shift = 64 - k.bit_length() if k & (k - 1) == 0 else 0
    _planted_draw(
        words.numpy(),
        shift,
        level.numpy(),
        exp_beta.numpy(),
        deterministic,
        seq.numpy(),
        probs.numpy(),
        top.numpy(),
    )
    return seq[:, :t], seq[:, 1:], probs, top


class PriorityGraphTask(Task):
    """Sampler, oracle, strategies and metrics of :class:`PriorityGraphSpec`.

    **Planted mode.** The oracle is Oracle C (:func:`planted_law`), exact Bayes: the label's law
    given the context under the planted instance.

    **Paper mode.** A batch row is sample i ~ U{0 .. n - 1} of the fixed dataset (every split
    draws from the same n samples through its own seed stream: the paper reports training-set
    metrics only). The exact Bayes law of the label given the context is then the dataset's
    empirical label law among the samples whose context is the same sequence:
    ``p(j | X) = #{i : X_i = X, y_i = j} / #{i : X_i = X}`` (a point mass unless the dataset
    repeats a context with different labels). :meth:`oracle` computes it from the tokens and
    raises ``ValueError`` for a context that is not in the dataset (where it is undefined).
    """

    name = "priority_graph"
    spec: PriorityGraphSpec

    def __init__(self, spec: PriorityGraphSpec | None = None, **kwargs: object) -> None:
        if spec is not None and kwargs:
            raise ValueError("pass either a spec or keyword arguments, not both")
        super().__init__(spec if spec is not None else PriorityGraphSpec(**kwargs))  # type: ignore[arg-type]
        s = self.spec
        self._device_tables: dict[str, dict[str, Tensor]] = {}
        self._level = self._beta = None
        self._dataset: dict[str, np.ndarray] | None = None
        self._paper: PaperDataset | None = None
        if s.mode == "planted":
            level, beta = planted_instance(s)
            level.setflags(write=False)
            beta.setflags(write=False)
            self._level, self._beta = level, beta
        else:
            self._dataset = self._load_paper_dataset()

    # ------------------------------------------------------------------ the task instance
    @property
    def vocab_size(self) -> int:
        return self.spec.num_tokens

    @property
    def seq_len(self) -> int:
        """T: the context tokens (the label is the last target)."""
        return self.spec.context_len

    @property
    def first_scored_position(self) -> int:
        """T - 1: only the label, predicted at the query, is scored."""
        return self.spec.context_len - 1

    @property
    def sample_composes(self) -> bool:
        """True: each row reads its own words of the stream (module docstring)."""
        return True

    @property
    def level(self) -> np.ndarray:
        """(K, K) int64 read-only planted levels ``[query, token]`` (planted mode)."""
        if self._level is None:
            raise ValueError("mode='paper' has no planted levels (use mode='planted')")
        return self._level

    @property
    def beta(self) -> np.ndarray:
        """(K, K) float64 read-only planted composition weights ``[query, token]``."""
        if self._beta is None:
            raise ValueError("mode='paper' has no planted beta (use mode='planted')")
        return self._beta

    @cached_property
    def num_levels(self) -> np.ndarray:
        """(K,) int64 number of planted levels (blocks) of each query token (planted mode)."""
        return self.level.max(1) + 1

    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        key = str(device)
        if key not in self._device_tables:
            k, t = self.vocab_size, self.seq_len
            tab: dict[str, Tensor] = {}
            if self._level is not None:
                tab["level"] = torch.tensor(self._level).to(device)
                tab["beta"] = torch.tensor(self._beta).to(device)
            else:
                data = self._dataset
                tab["contexts"] = torch.tensor(data["contexts"]).to(device)
                tab["labels"] = torch.tensor(data["labels"]).to(device)
                tab["unique"] = torch.tensor(data["unique"]).to(device)
                tab["group"] = torch.tensor(data["group"]).to(device)
                tab["law"] = torch.tensor(data["law"]).to(device)
                tab["top"] = torch.tensor(data["top"]).to(device)
            if self.spec.distinct:  # 1 / (number of unseen tokens) after t + 1 tokens
                left = torch.arange(k - 1, k - t, -1, device=device, dtype=torch.float32)
                tab["unseen"] = 1.0 / left  # (T - 1,)
            self._device_tables[key] = tab
        return self._device_tables[key]

    # ------------------------------------------------------------------------- sampling
    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> Batch:
        """``batch_size`` rows (module docstring): tokens (B, T) int64, targets (B, T) int64
        with the label last, ``params["top_mask"]`` (B, K) bool and ``params["oracle_probs"]``
        (B, K) float64; paper mode adds ``params["sample_index"]`` (B,) int64."""
        check_batch_size(batch_size)
        device = torch.device(device) if device is not None else generator.device
        s = self.spec
        k, t = s.num_tokens, s.context_len
        gen_device = generator.device
        tab = self._tables(gen_device)
        params: dict[str, Tensor] = {}
        if s.mode == "planted":
            width = (k if s.distinct else t) + 1
            words = torch.empty((batch_size, width), dtype=torch.int64, device=gen_device)
            words.random_(generator=generator)  # uniform on [0, 2**63)
            drawn = None
            if not s.distinct:  # the compiled pass, else the torch reference
                drawn = planted_draw(words, k, tab["level"], tab["beta"], s.deterministic)
            if drawn is None:
                drawn = self._planted_torch(words, tab)
            tokens, targets, params["oracle_probs"], params["top_mask"] = drawn
        else:
            words = torch.empty((batch_size, 1), dtype=torch.int64, device=gen_device)
            words.random_(generator=generator)
            index = _uniform_index(words[:, 0], s.n)
            tokens = tab["contexts"][index]
            label = tab["labels"][index]
            params["oracle_probs"] = tab["law"][tab["group"][index]]
            params["sample_index"] = index
            params["top_mask"] = tab["top"][index]
            targets = torch.cat([tokens[:, 1:], label[:, None]], 1)
        mask = torch.zeros(batch_size, t, dtype=torch.bool, device=device)
        mask[:, t - 1] = True
        return Batch(
            tokens=tokens.to(device),
            targets=targets.to(device),
            loss_mask=mask,
            params={name: v.to(device) for name, v in params.items()},
            vocab_size=k,
            true_probs_fn=self.true_probs,
        )

    def _planted_torch(
        self, words: Tensor, tab: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Planted ``(tokens, targets, oracle_probs, top_mask)`` from the words (B, width) in
        torch (any device; the reference of :func:`planted_draw`)."""
        s = self.spec
        k, t = s.num_tokens, s.context_len
        tokens = words[:, :k].argsort(1)[:, :t] if s.distinct else _uniform_index(words[:, :t], k)
        weights, top = planted_weights(tokens, tab["level"], tab["beta"])
        cdf = weights.cumsum(1)
        total = cdf[:, -1:]
        if s.deterministic:
            label = first_argmax(weights)
            probs = torch.zeros_like(weights).scatter_(1, label[:, None], 1.0)
        else:
            # j with cdf[j - 1] < u total <= cdf[j]: never a token of weight 0 (u in (0, 1])
            label = (cdf < _open_unit(words[:, -1:]) * total).sum(1)
            probs = weights / total
        return tokens, torch.cat([tokens[:, 1:], label[:, None]], 1), probs, top

    def _context_law(self, tokens: Tensor) -> Tensor:
        """(B, T - 1, K) float32 law of the next context token x_{t+1} given x_0 .. x_t, at t =
        0 .. T - 2 (exact zeros where a token cannot come next). Planted: uniform over [K], or
        over the tokens not yet seen with ``distinct=True``. Paper: the fraction of the dataset
        rows with that prefix whose next token is j (rows are drawn uniformly); a prefix that is
        not in the dataset raises ``ValueError``."""
        b, t = tokens.shape
        k = self.vocab_size
        if t == 1:
            return torch.empty(b, 0, k, device=tokens.device)
        if self.spec.mode == "paper":
            return self._paper_prefix_law(tokens)
        if not self.spec.distinct:
            return torch.full((1, 1, k), 1.0 / k, device=tokens.device).expand(b, t - 1, k)
        tab = self._tables(tokens.device)
        seen = torch.zeros(b, t - 1, k, dtype=torch.bool, device=tokens.device)
        seen.scatter_(2, tokens[:, : t - 1, None], True)
        seen = seen.cummax(1).values
        return torch.where(seen, 0.0, tab["unseen"][None, :, None])

    def _paper_prefix_law(self, tokens: Tensor) -> Tensor:
        tab = self._tables(tokens.device)
        ctx = tab["contexts"]  # (n, T)
        n, (b, t), k = ctx.shape[0], tokens.shape, self.vocab_size
        out = torch.empty(b, t - 1, k, device=tokens.device)
        for pos in range(t - 1):  # a loop over positions, not over the batch
            both = torch.cat([ctx[:, : pos + 1], tokens[:, : pos + 1]], 0)
            _, inverse = torch.unique(both, dim=0, return_inverse=True)
            groups = int(inverse.max()) + 1
            counts = torch.zeros(groups, k, dtype=torch.float64, device=tokens.device)
            counts.index_put_(
                (inverse[:n], ctx[:, pos + 1]),
                torch.ones(n, dtype=torch.float64, device=tokens.device),
                accumulate=True,
            )
            row = counts[inverse[n:]]
            total = row.sum(1, keepdim=True)
            if bool((total == 0).any()):
                raise ValueError(
                    "a context prefix is not in the paper-mode dataset: its law is defined on "
                    "the dataset's contexts only"
                )
            out[:, pos] = (row / total).float()
        return out

    def true_probs(self, batch: Batch) -> Tensor:
        """(B, T, K) float32: the next context token's law at t < T - 1 (see
        :meth:`_context_law`), the label's law ``params["oracle_probs"]`` at T - 1."""
        context = self._context_law(batch.tokens)
        last = batch.params["oracle_probs"].float()[:, None]
        return torch.cat([context, last], 1)

    # ------------------------------------------------------------ oracle and strategies
    def _check_tokens(self, tokens: Tensor) -> None:
        k, t = self.vocab_size, self.seq_len
        if tokens.ndim != 2 or tokens.shape[1] != t:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} are invalid: expected (B, {t}) (the "
                "context, the query last)"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= k):
            raise ValueError(f"tokens are invalid: expected ids in [0, {k - 1}]")

    def bayes_probs(self, tokens: Tensor) -> Tensor:
        """(B, K) float64, the exact Bayes law of the label given the context ``tokens`` (B, T)
        int64: Oracle C in planted mode (the argmax point mass with ``deterministic=True``), the
        dataset's label law among identical contexts in paper mode (``ValueError`` for a
        context outside the dataset)."""
        self._check_tokens(tokens)
        tab = self._tables(tokens.device)
        if self.spec.mode == "planted":
            weights, _ = planted_weights(tokens, tab["level"], tab["beta"])
            if self.spec.deterministic:
                label = first_argmax(weights)
                return torch.zeros_like(weights).scatter_(1, label[:, None], 1.0)
            return weights / weights.sum(1, keepdim=True)
        return tab["law"][self._paper_groups(tokens)]

    def _paper_groups(self, tokens: Tensor) -> Tensor:
        """(B,) int64 index of each row's context among the dataset's distinct contexts."""
        tab = self._tables(tokens.device)
        unique = tab["unique"]
        both = torch.cat([unique, tokens], 0)
        _, inverse = torch.unique(both, dim=0, return_inverse=True)
        lookup = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.int64, device=tokens.device)
        lookup[inverse[: unique.shape[0]]] = torch.arange(unique.shape[0], device=tokens.device)
        groups = lookup[inverse[unique.shape[0] :]]
        if (groups < 0).any():
            raise ValueError(
                "oracle: a context is not in the paper-mode dataset (the dataset's label law is "
                "defined on its own contexts only)"
            )
        return groups

    def _with_context(self, tokens: Tensor, last: Tensor) -> Tensor:
        """(B, T, K) float32 log-probs: the context law at t < T - 1 and ``last`` (B, K)
        probabilities at the query (floored at :data:`LOG_FLOOR`)."""
        law = torch.cat([self._context_law(tokens), last.float()[:, None]], 1)
        return law.clamp_min(LOG_FLOOR).log()

    def oracle(self, batch: Batch) -> Tensor:
        """Bayes log-probabilities (B, T, K) float32 given the tokens: the next context token's
        law at t < T - 1 and :meth:`bayes_probs` at the query (closed form)."""
        return self._with_context(batch.tokens, self.bayes_probs(batch.tokens))

    @property
    def oracle_name(self) -> str:
        if self.spec.mode == "paper":
            return "bayes (closed form, the fixed dataset's label law given the context)"
        return "bayes (closed form, Oracle C: knows the planted levels and beta)"

    def online(self, batch: Batch) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        """The laws at the label (t = T - 1) only, from ``params["oracle_probs"]`` (the label's
        law is the oracle's: the oracle is exact and sees everything the label depends on):
        ``(true, oracle)``, (B, K) float32 numpy, or (B,) int64 point masses with
        ``deterministic=True``. O(B K). Raises ``ValueError`` at any other position."""
        probs = batch.params["oracle_probs"]
        if self.spec.deterministic:
            law = probs.argmax(1).cpu().numpy()
        else:
            law = probs.float().cpu().numpy()
        last = self.seq_len - 1

        def step(t: int) -> tuple[np.ndarray, np.ndarray]:
            if t != last:
                raise ValueError(f"online: this task scores position {last} only, got t={t}")
            return law, law

        return step

    def episode_info(self, batch: Batch) -> dict[str, object]:
        """Per-episode env info (given after the step): ``query_token`` (B,)
        int64, and ``top_mask`` (B, K) bool (S*) where the batch has it; paper mode adds
        ``sample_index`` (B,) int64. The env adds ``label`` (y) and ``oracle_pred`` (the
        oracle's argmax, smallest id on ties)."""
        info: dict[str, object] = {"query_token": batch.tokens[:, -1].cpu().numpy().copy()}
        for key in ("top_mask", "sample_index"):
            if key in batch.params:
                info[key] = batch.params[key].cpu().numpy().copy()
        return info

    @property
    def strategies(self) -> Mapping[str, Strategy]:
        """Reference predictors at the query (the context law elsewhere), least to most
        informed; each reads the tokens only:

        - ``uniform``: 1/K;
        - ``copy_last``: the point mass on the query token x_{T-1};
        - ``unigram``: the in-context counts ``n_X(j) / T``. This is the paper's model at
          W = 0 (uniform attention, ``iden`` head), the "count-weighted uniform over the
          context" baseline;
        - ``hard_retrieval`` (planted mode): ``n_X(j) / sum_{S*} n_X`` on S*, the
          "count-weighted uniform over the retrieved tokens": Oracle C with beta = 0, i.e. the
          exact law when ``sigma_beta = 0`` (knows the levels, not beta);
        - ``oracle_a``: Oracle A of :attr:`oracle_a_tpg`, the empirical TPG of a training set
          (planted: 2000 train samples of seed 0; paper: the dataset itself): ``n_X(j)`` normalised
          over the undominated tokens of the context (beta = 0: no ``W^fin``), and over all
          undominated tokens of an ambiguous context (incomparable or unseen tokens;
          :meth:`~iclgym.tasks.priority_graph_theory.EmpiricalTPG.predict`).
        """

        def const(last_fn: Callable[[Tensor], Tensor]) -> Strategy:
            def predict(batch: Batch) -> Tensor:
                return self._with_context(batch.tokens, last_fn(batch.tokens))

            return predict

        k = self.vocab_size
        out: dict[str, Strategy] = {
            "uniform": const(lambda x: torch.full((x.shape[0], k), 1.0 / k, device=x.device)),
            "copy_last": const(
                lambda x: torch.zeros(x.shape[0], k, device=x.device).scatter_(1, x[:, -1:], 1.0)
            ),
            "unigram": const(self._unigram),
        }
        if self.spec.mode == "planted":
            out["hard_retrieval"] = const(self._hard_retrieval)
        out["oracle_a"] = const(self._oracle_a)
        return out

    def _unigram(self, tokens: Tensor) -> Tensor:
        counts = torch.zeros(
            tokens.shape[0], self.vocab_size, dtype=torch.float64, device=tokens.device
        )
        counts.scatter_add_(
            1, tokens, torch.ones(tokens.shape, dtype=torch.float64, device=tokens.device)
        )
        return counts / tokens.shape[1]

    def _hard_retrieval(self, tokens: Tensor) -> Tensor:
        tab = self._tables(tokens.device)
        probs, _ = planted_law(tokens, tab["level"], torch.zeros_like(tab["beta"]))
        return probs

    # ------------------------------------------------------------------------ paper mode
    def _load_paper_dataset(self) -> dict[str, np.ndarray]:
        s = self.spec
        data = paper_dataset(
            s.n,
            s.context_len,
            s.num_tokens,
            s.d,
            s.embedding,
            s.cyclic,
            seed=s.instance_seed,
            max_tries=s.max_tries,
        )
        self._paper = data
        unique, group = np.unique(data.contexts, axis=0, return_inverse=True)
        group = group.reshape(-1)
        law = np.zeros((unique.shape[0], s.num_tokens))
        np.add.at(law, (group, data.labels), 1.0)
        law /= law.sum(1, keepdims=True)
        top, _ = self.empirical_tpg_of(data.contexts, data.labels).top_sets(data.contexts)
        return {
            "contexts": data.contexts,
            "labels": data.labels,
            "unique": unique.astype(np.int64),
            "group": group.astype(np.int64),
            "law": law,
            "top": top,
        }

    def empirical_tpg_of(self, contexts: np.ndarray, labels: np.ndarray) -> EmpiricalTPG:
        """:class:`~iclgym.tasks.priority_graph_theory.EmpiricalTPG` of a training set over
        this task's K tokens."""
        return EmpiricalTPG.fit(contexts, labels, self.vocab_size)

    @property
    def paper_data(self) -> PaperDataset:
        """The fixed dataset of paper mode (contexts, labels, embeddings)."""
        if self._dataset is None:
            raise ValueError("mode='planted' has no fixed dataset (use mode='paper')")
        return self._paper

    def train_set(self, device: torch.device | str = "cpu") -> Batch:
        """Paper mode: the fixed dataset in order, n rows (the trainer's finite data with
        ``train_sequences=0``; the ``li2024`` recipe trains on it full-batch), with the
        ``params`` of :meth:`sample` (``sample_index`` = 0 .. n - 1). Raises ``ValueError`` in
        planted mode, which has no fixed training set (draw one with ``sample``)."""
        if self._dataset is None:
            raise ValueError(
                "mode='planted' has no fixed training set: set train_sequences >= 1 (a sample of "
                "the train split), or use mode='paper'"
            )
        dev = torch.device(device)
        tab = self._tables(dev)
        index = torch.arange(self.spec.n, device=dev)
        tokens, label = tab["contexts"], tab["labels"]
        mask = torch.zeros(tokens.shape, dtype=torch.bool, device=dev)
        mask[:, -1] = True
        return Batch(
            tokens=tokens.clone(),
            targets=torch.cat([tokens[:, 1:], label[:, None]], 1),
            loss_mask=mask,
            params={
                "oracle_probs": tab["law"][tab["group"]],
                "sample_index": index,
                "top_mask": tab["top"].clone(),
            },
            vocab_size=self.vocab_size,
            true_probs_fn=self.true_probs,
        )

    @cached_property
    def paper_theory(self) -> PaperTheory:
        """Paper mode: the theory of the fixed dataset (TPG, Graph-SVM, W^fin;
        :class:`~iclgym.tasks.priority_graph_theory.PaperTheory`), fitted on first use."""
        return PaperTheory.of(self.paper_data)

    def model_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """Paper mode: the paper's training-set metrics of a model exposing ``weight`` (d, d)
        and this dataset's ``embeddings`` (K, d) (Li et al. 2024's figures: corr(W, W^svm), the
        decomposition, top-SCC mass, label attention, loss, ...; :meth:`PaperTheory.
        model_metrics`), ``{}`` for any other model. Planted mode: ``{}`` (its metrics need
        data: :func:`planted_metrics`)."""
        if self._dataset is None:
            return {}
        return self.paper_theory.model_metrics(model)

    @cached_property
    def oracle_a_tpg(self) -> EmpiricalTPG:
        """The empirical TPG behind the ``oracle_a`` strategy: of the fixed dataset in paper
        mode; in planted mode of :data:`ORACLE_A_SAMPLES` samples of the train split of seed 0
        (``task.sample(2000, generator=task.generator(0, "train"))``)."""
        if self._dataset is not None:
            return self.empirical_tpg_of(self._paper.contexts, self._paper.labels)
        batch = self.sample(ORACLE_A_SAMPLES, generator=self.generator(0, "train"), device="cpu")
        return self.empirical_tpg_of(batch.tokens.numpy(), batch.targets[:, -1].numpy())

    def _oracle_a(self, tokens: Tensor) -> Tensor:
        probs, _ = self.oracle_a_tpg.predict(tokens.cpu().numpy())
        return torch.from_numpy(probs).to(tokens.device)


def planted_metrics(log_probs: Tensor, batch: Batch) -> dict[str, float]:
    """The planted-mode metrics (``docs/envs/ICL-PriorityGraph-v0.md``) for a predictor's label
    log-probabilities, means over the batch's rows.

    ``log_probs``: (B, K) (or (B, T, K), read at the last position) natural-log probabilities
    of the label, renormalised here with ``log_softmax`` (so logits are accepted; ``-inf``
    entries are probability 0). ``batch``: a batch of a :class:`PriorityGraphTask` with
    ``params["top_mask"]`` (S*) and ``params["oracle_probs"]`` (p_C). Argmaxes take the
    smallest id on ties. Returns floats:

    - ``acc_label``: argmax q = y (fraction); ``oracle_acc_label``: argmax p_C = y (its ceiling);
    - ``acc_oracle``: argmax q = argmax p_C;
    - ``retrieval_mass``: sum of q over S*; ``retrieval_acc``: argmax q in S*;
    - ``composition_TV``: 1/2 sum_{S*} |q / q(S*) - p_C| over the rows with |S*| >= 2 (NaN when
      there is none, and on a row where q(S*) = 0 it is 1); ``multi_fraction``: the fraction
      of rows with |S*| >= 2;
    - ``kl``: KL(p_C || q) (nats; inf when q puts 0 where p_C does not);
    - ``nll``: -log q(y) (nats); ``oracle_entropy``: H(p_C) (nats);
    - ``excess_nll`` = ``nll`` - ``oracle_entropy`` (nats; its expectation is ``kl``).

    Raises ``ValueError`` for a shape that is not (B, K) or (B, T, K), a row with NaN or with
    every entry ``-inf``, or a batch without ``top_mask`` / ``oracle_probs``.
    """
    if "top_mask" not in batch.params or "oracle_probs" not in batch.params:
        raise ValueError(
            "planted_metrics needs batch.params['top_mask'] and ['oracle_probs'] (a planted "
            "PriorityGraphTask batch)"
        )
    b, k = batch.batch_size, batch.vocab_size
    if log_probs.ndim == 3 and log_probs.shape[:2] == (b, batch.seq_len):
        log_probs = log_probs[:, -1]
    if tuple(log_probs.shape) != (b, k):
        raise ValueError(
            f"log_probs of shape {tuple(log_probs.shape)} are invalid: expected ({b}, {k}) or "
            f"({b}, {batch.seq_len}, {k})"
        )
    bad = torch.isnan(log_probs).any(-1) | (log_probs == -torch.inf).all(-1)
    if bool(bad.any()):
        raise ValueError(
            f"log_probs are invalid in {int(bad.sum())} of {b} rows: NaN, or -inf everywhere "
            "(no probability mass); expected log-probabilities or logits with a finite entry"
        )
    log_q = log_probs.double().log_softmax(-1)
    q = log_q.exp()
    p = batch.params["oracle_probs"].double().to(q.device)
    top = batch.params["top_mask"].to(q.device)
    y = batch.targets[:, -1].to(q.device)
    pred = first_argmax(log_q)
    best = first_argmax(p.clamp_min(0).log())
    rows = torch.arange(b, device=q.device)
    zero = torch.zeros((), dtype=torch.float64, device=q.device)
    with torch.no_grad():
        kl = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - log_q), zero).sum(1)
        entropy = -torch.where(p > 0, p * p.clamp_min(1e-300).log(), zero).sum(1)
        nll = -log_q[rows, y]
        mass = torch.where(top, q, zero).sum(1)
        multi = top.sum(1) >= 2
        renorm = torch.where(top, q, zero) / mass[:, None]
        tv = torch.where(mass > 0, 0.5 * (renorm - p).abs().sum(1), 1.0)
        composition = tv[multi].mean().item() if bool(multi.any()) else float("nan")
    return {
        "acc_label": (pred == y).double().mean().item(),
        "oracle_acc_label": (best == y).double().mean().item(),
        "acc_oracle": (pred == best).double().mean().item(),
        "retrieval_mass": mass.mean().item(),
        "retrieval_acc": top[rows, pred].double().mean().item(),
        "composition_TV": composition,
        "multi_fraction": multi.double().mean().item(),
        "kl": kl.mean().item(),
        "nll": nll.mean().item(),
        "oracle_entropy": entropy.mean().item(),
        "excess_nll": (nll.mean() - entropy.mean()).item(),
    }


__all__ = [
    "INSTANCE_STREAM",
    "MODES",
    "ORACLE_A_SAMPLES",
    "SIGMA_BETA_MAX",
    "PriorityGraphSpec",
    "PriorityGraphTask",
    "first_argmax",
    "planted_instance",
    "planted_law",
    "planted_metrics",
    "planted_weights",
]
