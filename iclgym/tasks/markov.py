"""In-context Markov chains and order-n chains (Edelman et al. 2024, arXiv 2402.11004).

Every sequence draws its own transition table ``P`` (one row per context of ``order - 1``
tokens, rows from the prior) and then ``seq_len + 1`` tokens from the chain. Contexts are
indexed newest-last (see :mod:`iclgym.tasks.estimators`), so the newest token of a lifted state
``s`` is ``s % k`` and the successor of ``s`` after token ``j`` is ``(s * k) % k**(n-1) + j``.

**Sampling** (the process of Edelman et al. 2024, vectorised). Dirichlet rows are drawn in log space
in float64 (``log Gamma(a) = log Gamma(a + 1) + log(U) / a``), so no concentration in
:data:`~iclgym.tasks.estimators.ALPHA_RANGE` underflows to a NaN or a reducible table; the
stationary law of the first context is the GTH elimination of those log-tables
(:mod:`iclgym.tasks.stationary`, subtraction-free). Tokens are inverse-CDF draws with uniforms
in (0, 1] against cumulative rows that are exactly 1 from their last positive entry on, so a
token of probability 0 in the stored table is never drawn. On the CPU the thresholds, the
stationary solve and the walk run as compiled kernels (:mod:`iclgym.tasks.kernels`) on the same
random numbers: the torch code here is the reference and the CUDA path, and a seed gives the
same tokens on either (tested). Speeds: ``docs/speed.md``.

**Oracle.** :meth:`MarkovChainTask.oracle` is the exact Bayes predictive for every prior and
init (:mod:`iclgym.tasks.markov_bayes`): a closed form where one exists, otherwise an
importance-sampling or sequential Monte-Carlo estimate whose Monte-Carlo error
:meth:`MarkovChainTask.oracle_estimate` reports. The add-alpha predictive of the true order
(the ``bigram`` strategy for first-order chains) is exact Bayes only for Dirichlet rows with
``init="uniform"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from iclgym.tasks import kernels, markov_bayes
from iclgym.tasks.base import Batch, OracleEstimate, Strategy, Task, TaskSpec, check_batch_size
from iclgym.tasks.estimators import check_alpha, context_index, ngram_log_probs
from iclgym.tasks.stationary import (
    lifted_transition,
    stationary_from_log,
    stationary_from_probs,
)
from iclgym.validation import as_bool, as_float, as_int, check_sequence_memory, invalid

PRIORS = ("dirichlet", "doubly_stochastic", "unigram", "mixture")
INITS = ("stationary", "uniform")
MAX_TABLE_ENTRIES = 10**6  # k**order entries per sequence before allow_large_table is needed
MAX_STATIONARY_STATES = 1024  # lifted states k**(order-1) the stationary elimination accepts
EXACT_BIRKHOFF_MAX_K = 5  # exact uniform doubly-stochastic sampling by rejection up to this k
STRATEGY_NAMES = {0: "uniform", 1: "unigram", 2: "bigram", 3: "trigram"}


def strategy_name(order: int) -> str:
    """``uniform``, ``unigram``, ``bigram``, ``trigram``, then ``4-gram``, ``5-gram``, ..."""
    return STRATEGY_NAMES.get(order, f"{order}-gram")


@dataclass(frozen=True)
class MarkovChainSpec(TaskSpec):
    """Parameters of an in-context Markov-chain task (``docs/envs/ICL-MarkovChain-v0.md``).

    Attributes:
        num_states: vocabulary size k >= 2.
        order: n-gram order n >= 1; the next token depends on the last n - 1 tokens
            (2 = first-order chain, 1 = i.i.d. tokens).
        seq_len: scored positions T >= n; T + 1 tokens are drawn.
        alpha: Dirichlet concentration, a float in [1e-300, 1e300] or k such floats.
        init: law of the first n - 1 tokens, ``"stationary"`` or ``"uniform"``.
        prior: ``"dirichlet"`` (i.i.d. rows), ``"doubly_stochastic"`` (uniform on the Birkhoff
            polytope, n = 2), ``"unigram"`` (every row equals one Dirichlet draw) or
            ``"mixture"`` (unigram with probability ``mix_p``, else doubly stochastic).
        mix_p: fraction of unigram chains under ``prior="mixture"``, in [0, 1].
        approx_sinkhorn: allow Sinkhorn-normalised (not uniform) doubly-stochastic tables
            for k > 5, where exact rejection sampling is impractical.
        allow_large_table: allow more than 10**6 table entries per sequence.

    Integers may be numpy integers. Raises ``ValueError`` naming the parameter, its value and
    the valid range for anything outside them, including sizes whose 64 sequences would not
    fit in memory (:func:`iclgym.validation.check_sequence_memory`).
    """

    num_states: int = 3
    order: int = 2
    seq_len: int = 100
    alpha: float | tuple[float, ...] = 1.0
    init: str = "stationary"
    prior: str = "dirichlet"
    mix_p: float = 0.25
    approx_sinkhorn: bool = False
    allow_large_table: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        k = as_int("num_states", self.num_states, 2)
        n = as_int("order", self.order, 1)
        put("num_states", k)
        put("order", n)
        put("seq_len", as_int("seq_len", self.seq_len, n))
        put("alpha", check_alpha(self.alpha, k))
        if self.init not in INITS:
            raise invalid("init", self.init, f"one of {INITS}")
        if self.prior not in PRIORS:
            raise invalid("prior", self.prior, f"one of {PRIORS}")
        put("mix_p", as_float("mix_p", self.mix_p, 0.0, 1.0))
        for name in ("approx_sinkhorn", "allow_large_table"):
            put(name, as_bool(name, getattr(self, name)))
        if self.prior in ("doubly_stochastic", "mixture"):
            if n != 2:
                raise invalid("order", n, f"2 for prior={self.prior!r} (square tables)")
            if k > EXACT_BIRKHOFF_MAX_K and not self.approx_sinkhorn:
                raise invalid(
                    "num_states",
                    k,
                    f"<= {EXACT_BIRKHOFF_MAX_K} for exact doubly-stochastic sampling; pass "
                    "approx_sinkhorn=True to accept Sinkhorn tables (not uniform)",
                )
        if k**n > MAX_TABLE_ENTRIES and not self.allow_large_table:
            raise invalid(
                "num_states**order",
                k**n,
                f"<= {MAX_TABLE_ENTRIES} table entries (pass allow_large_table=True)",
            )
        if self.init == "stationary" and n > 1 and k ** (n - 1) > MAX_STATIONARY_STATES:
            raise invalid(
                "num_states**(order-1)",
                k ** (n - 1),
                f"<= {MAX_STATIONARY_STATES} lifted states for init='stationary' "
                "(use init='uniform')",
            )
        check_sequence_memory("seq_len", self.seq_len, self.seq_len, k)

    @property
    def num_contexts(self) -> int:
        """Rows of the transition table, k**(n-1)."""
        return self.num_states ** (self.order - 1)


def _token_packed(states: int, k: int) -> bool:
    """Whether the walk on ``states`` lifted states of ``k`` tokens packs every state's next
    token in an int32 (order >= 3, when the successor fields of :meth:`MarkovChainTask._walk`
    would need more than 31 bits and the token fields do not)."""
    width = next(w for w in range(1, 64) if (states - 1) * w < 2**w)
    return states > k and states * width > 31 and states * (k - 1).bit_length() <= 31


def inverse_cdf_thresholds(probs: Tensor) -> Tensor:
    """(..., m - 1) thresholds for inverse-CDF draws from ``probs`` (..., m): the cumulative
    sums, set to exactly 1 from the last positive entry on. With ``u`` uniform in (0, 1] the
    draw ``(u > thresholds).sum(-1)`` picks token j iff ``cdf[j-1] < u <= cdf[j]``, an empty
    interval whenever ``probs[j] == 0`` (also for the last tokens, where a rounded cumulative
    sum below 1 would otherwise leave room). Sums rounded above 1 are clamped to 1 (no draw
    changes, as ``u <= 1``), so the thresholds are nondecreasing: a binary search finds the
    same token as the count."""
    m = probs.shape[-1]
    index = torch.arange(m, device=probs.device)
    last = torch.where(probs > 0, index, 0).amax(-1, keepdim=True)
    cdf = torch.where(index >= last, 1.0, probs.cumsum(-1).clamp_max_(1.0))
    return cdf[..., :-1].contiguous()


def open_uniform(shape: tuple[int, ...], generator: torch.Generator, device, dtype=None) -> Tensor:
    """Uniforms in (0, 1] (``1 - torch.rand``): never exactly 0, so inverse-CDF draws against
    :func:`inverse_cdf_thresholds` never pick a probability-0 token."""
    return 1.0 - torch.rand(shape, generator=generator, device=device, dtype=dtype)


class MarkovChainTask(Task):
    """Sampler, oracle and strategies for :class:`MarkovChainSpec`."""

    name = "markov_chain"
    spec: MarkovChainSpec
    privileged_strategies = frozenset({"true"})

    oracle_samples: int | None = None
    """Monte-Carlo samples (per sequence, all replicates together) of the oracle where it has no
    closed form (None: :func:`~iclgym.tasks.markov_bayes.default_samples`); more samples,
    smaller :meth:`oracle_estimate` error, proportionally more time."""

    def __init__(self, spec: MarkovChainSpec | None = None, **kwargs: object) -> None:
        if spec is not None and kwargs:
            raise ValueError("pass either a spec or keyword arguments, not both")
        super().__init__(spec if spec is not None else MarkovChainSpec(**kwargs))  # type: ignore[arg-type]

    @property
    def vocab_size(self) -> int:
        return self.spec.num_states

    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    def alpha_vector(self, device: torch.device | str = "cpu") -> Tensor:
        """(k,) float64 Dirichlet concentration."""
        return torch.as_tensor(self.spec.alpha, dtype=torch.float64, device=device).expand(
            self.spec.num_states
        )

    # ----------------------------------------------------------------- transition tables
    def log_dirichlet(self, shape: tuple[int, ...], gen: torch.Generator, device) -> Tensor:
        """Log Dirichlet(alpha) rows (*shape, k), float64, drawn in log space.

        ``log G = log Gamma(a + 1) + log(U) / a`` is a log Gamma(a) draw that cannot underflow
        for any a in ALPHA_RANGE; the rows are ``log_softmax(log G)``. Dirichlet(1, ..., 1) rows
        are normalised Exp(1) draws: exact and far cheaper.
        """
        k = self.spec.num_states
        if self.spec.alpha == 1.0:
            return self._uniform_dirichlet(shape, gen, device).log_()
        alpha = self.alpha_vector(device).expand(*shape, k).contiguous()
        log_g = torch._standard_gamma(alpha + 1.0, generator=gen).log_()
        u = open_uniform(alpha.shape, gen, device, torch.float64)
        log_g += u.log_() / alpha
        return torch.log_softmax(log_g, dim=-1)

    def _uniform_dirichlet(self, shape: tuple[int, ...], gen: torch.Generator, device) -> Tensor:
        """Dirichlet(1, ..., 1) rows (*shape, k), float64: Exp(1) draws over their sum (no
        overflow; clamped at the smallest normal double, so every entry is positive)."""
        e = torch.empty(*shape, self.spec.num_states, device=device, dtype=torch.float64)
        e.exponential_(generator=gen).clamp_min_(torch.finfo(torch.float64).tiny)
        return e.div_(e.sum(-1, keepdim=True))

    def log_doubly_stochastic(self, batch: int, gen: torch.Generator, device) -> Tensor:
        """(batch, k, k) log doubly-stochastic tables, float64: exact uniform on the Birkhoff
        polytope for k <= 5, Sinkhorn-normalised Dirichlet(1) tables (not uniform, opt-in
        ``approx_sinkhorn``) above."""
        k = self.spec.num_states
        if k > EXACT_BIRKHOFF_MAX_K:  # opt-in approximation (Sinkhorn is not uniform)
            table = torch.empty(batch, k, k, device=device, dtype=torch.float64)
            table.exponential_(generator=gen).clamp_min_(torch.finfo(torch.float64).tiny)
            for _ in range(200):
                table = table / table.sum(-2, keepdim=True)
                table = table / table.sum(-1, keepdim=True)
            return table.log()
        # Exact uniform law on the Birkhoff polytope: its first k-1 rows lie in a product of
        # simplices, so propose those rows uniformly (Dirichlet(1)) and accept when the forced
        # last row (one minus the column sums) is positive.
        accepted: list[Tensor] = []
        needed = batch
        while needed > 0:
            proposals = max(64, 4 * needed * _BIRKHOFF_INVERSE_ACCEPTANCE[k])
            e = torch.empty(proposals, k - 1, k, device=device, dtype=torch.float64)
            e.exponential_(generator=gen)
            rows = e / e.sum(-1, keepdim=True)
            last = 1.0 - rows.sum(-2)
            ok = (last > 0).all(-1) & (rows > 0).all(-1).all(-1)
            good = torch.cat([rows[ok], last[ok].unsqueeze(1)], dim=1)[:needed]
            accepted.append(good)
            needed -= good.shape[0]
        return torch.cat(accepted).log()

    def log_tables(self, batch: int, gen: torch.Generator, device) -> Tensor:
        """(batch, k**(n-1), k) float64 log transition tables drawn from the prior."""
        spec = self.spec
        if spec.prior == "dirichlet":
            return self.log_dirichlet((batch, spec.num_contexts), gen, device)
        if spec.prior == "unigram":
            row = self.log_dirichlet((batch, 1), gen, device)
            return row.expand(batch, spec.num_contexts, spec.num_states).contiguous()
        tables = self.log_doubly_stochastic(batch, gen, device)
        if spec.prior == "mixture":
            rows = self.log_dirichlet((batch, 1), gen, device).expand_as(tables)
            is_unigram = torch.rand(batch, generator=gen, device=device) < spec.mix_p
            tables = torch.where(is_unigram[:, None, None], rows, tables)
        return tables

    def draw_tables(self, batch: int, gen: torch.Generator, device) -> tuple[Tensor, Tensor | None]:
        """``(probs, log_tables)``: (batch, k**(n-1), k) float64 transition tables drawn from the
        prior, as :meth:`log_tables` draws them (the same random numbers), and their logs.
        Dirichlet(1) tables are drawn in linear space (``log_tables`` is then None), which
        skips a logarithm and an exponential per entry (about 10% of a k = 100 call); the
        float32 tables the sampler walks and stores came out identical to the log-space
        draw's in every one of 31 M entries compared, and ``tests/tasks/test_kernels.py``
        pins the tokens."""
        spec = self.spec
        if spec.prior == "dirichlet" and spec.alpha == 1.0:
            return self._uniform_dirichlet((batch, spec.num_contexts), gen, device), None
        log_tables = self.log_tables(batch, gen, device)
        return log_tables.exp(), log_tables

    # ------------------------------------------------------------------ initial context
    def lifted_transition(self, tables: Tensor) -> Tensor:
        """(B, S, S) transition matrix of the chain on contexts of n - 1 tokens."""
        return lifted_transition(tables)

    def stationary(self, tables: Tensor) -> Tensor:
        """Stationary law (B, S) float64 of the lifted chain of probability ``tables``
        (B, S, k), by GTH elimination (:mod:`iclgym.tasks.stationary`); raises ``ValueError``
        for a reducible table (its stationary law is not unique)."""
        return stationary_from_probs(tables)

    def _initial_law(self, log_tables: Tensor | None, probs: Tensor) -> Tensor:
        """(B, S) float64 law of the first context (stationary or uniform) of the tables
        ``probs`` (B, S, k) float64, with their logs ``log_tables`` or None."""
        batch, states, _ = probs.shape
        if self.spec.init == "uniform":
            return probs.new_full((batch, states), 1.0 / states)
        if log_tables is None:
            return stationary_from_probs(probs)
        return stationary_from_log(log_tables, probs)

    def _init_conditionals(self, law: Tensor, first_state: Tensor) -> Tensor:
        """True next-token laws (B, n-2, k) at the positions inside the initial context."""
        k, n = self.spec.num_states, self.spec.order
        out = []
        for known in range(1, n - 1):  # digits x_0..x_{known-1} are known, x_known is next
            joint = law.view(law.shape[0], k**known, k, -1).sum(-1)
            prefix = first_state // k ** (n - 1 - known)
            row = joint.gather(1, prefix.view(-1, 1, 1).expand(-1, 1, k)).squeeze(1)
            out.append(row / row.sum(-1, keepdim=True))
        return torch.stack(out, 1)

    # ------------------------------------------------------------------------ sampling
    @staticmethod
    def _walk(cdf: Tensor, start: Tensor, u: Tensor) -> Tensor:
        """Lifted states (steps + 1, B) visited from ``start``, by inverse CDF with uniforms u.

        ``cdf`` (B, S, k-1) holds :func:`inverse_cdf_thresholds` of the rows, so the next
        token from state s is the number of entries of ``cdf[b, s]`` below ``u[i, b]``;
        ``u`` (steps, B) is uniform in (0, 1]. When every state's successor fits in one
        int64 (``S * width <= 63`` bits) all successors of a step are packed up front and the
        time loop is two integer ops per step: each field holds ``successor * width``, which
        is also the shift that reads the next field. Larger tables fall back to gathering the
        current row.
        """
        batch, states, km1 = cdf.shape
        k = km1 + 1
        steps = u.shape[0]
        base = torch.arange(states, device=cdf.device) * k % states
        width = next(w for w in range(1, 64) if (states - 1) * w < 2**w)
        if _token_packed(states, k):
            return MarkovChainTask._walk_tokens(cdf, start, u, km1.bit_length())
        if states * width <= 63:
            dtype = torch.int32 if states * width <= 31 else torch.int64
            packed = torch.full(
                (steps, batch),
                sum(int(base[s]) * width << (width * s) for s in range(states)),
                dtype=dtype,
                device=cdf.device,
            )
            thresholds = cdf.permute(1, 2, 0).contiguous()  # (S, k-1, B)
            for s in range(states):
                for j in range(km1):
                    packed.add_((u > thresholds[s, j]).to(dtype), alpha=width << (width * s))
            shift = (start * width).to(dtype)
            visited = [shift]
            for i in range(steps):
                shift = torch.bitwise_right_shift(packed[i], shift).bitwise_and_(2**width - 1)
                visited.append(shift)
            return torch.stack(visited).div_(width, rounding_mode="floor")
        rows = cdf.reshape(batch * states, km1)
        offset = torch.arange(batch, device=cdf.device) * states
        out = torch.empty(steps + 1, batch, dtype=torch.int64, device=cdf.device)
        out[0] = start
        for i in range(steps):
            token = (u[i].unsqueeze(1) > rows.index_select(0, offset + out[i])).sum(1)
            out[i + 1] = base[out[i]] + token
        return out

    @staticmethod
    def _walk_tokens(cdf: Tensor, start: Tensor, u: Tensor, bits: int) -> Tensor:
        """:meth:`_walk` for order >= 3 with every state's next *token* packed in one int32
        (``S * bits <= 31``; the successor field of :meth:`_walk` would need int64 there):
        field s holds the token drawn from state s, and the loop forms the successor
        ``(state % (S / k)) * k + token``. The same states as the lifted-state walk (tested)."""
        _, states, km1 = cdf.shape
        k, mask = km1 + 1, 2**bits - 1
        keep = states // k
        packed = torch.zeros(u.shape, dtype=torch.int32, device=cdf.device)
        thresholds = cdf.permute(1, 2, 0).contiguous()
        for s in range(states):
            for j in range(km1):
                packed.add_((u > thresholds[s, j]).to(torch.int32), alpha=1 << (bits * s))
        state = start.to(torch.int32)
        visited = [state]
        for i in range(u.shape[0]):
            token = torch.bitwise_right_shift(packed[i], state * bits).bitwise_and_(mask)
            state = (state % keep).mul_(k).add_(token)
            visited.append(state)
        return torch.stack(visited).long()

    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> Batch:
        check_batch_size(batch_size)
        device = torch.device(device) if device is not None else generator.device
        spec = self.spec
        k, n, t = spec.num_states, spec.order, spec.seq_len
        probs, log_tables = self.draw_tables(batch_size, generator, device)
        tables = probs.float()  # the stored table: the walk and true_probs use it
        fast = kernels.available(device)  # compiled CPU kernels: the same draws (tested)
        cdf = kernels.inverse_cdf_thresholds(tables) if fast else inverse_cdf_thresholds(tables)
        if n == 1:  # i.i.d. tokens: no time loop
            u = open_uniform((batch_size, t + 1, 1), generator, device)
            seq = (u > cdf).sum(-1)
            law = tables.new_ones(batch_size, 1)
        else:
            law64 = self._initial_law(log_tables, probs)
            u0 = open_uniform((batch_size, 1), generator, device, torch.float64)
            first = (u0 > inverse_cdf_thresholds(law64)).sum(-1)
            law = law64.float()
            seq = torch.empty(batch_size, t + 1, dtype=torch.int64, device=device)
            digits = k ** torch.arange(n - 2, -1, -1, device=device)
            seq[:, : n - 1] = first.unsqueeze(1) // digits % k
            if fast:  # the same draws as open_uniform, 1 - u in the kernel
                u = torch.rand((t + 2 - n, batch_size), generator=generator, device=device)
                kernels.walk(cdf, first, u, seq)
                return self._batch(seq, tables, law)
            u = open_uniform((t + 2 - n, batch_size), generator, device)
            states = self._walk(cdf, first, u)
            seq[:, n - 1 :] = states[1:].T if n == 2 else states[1:].T % k
        return self._batch(seq, tables, law)

    def _batch(self, seq: Tensor, tables: Tensor, law: Tensor) -> Batch:
        batch_size, t = seq.shape[0], self.spec.seq_len
        return Batch(
            tokens=seq[:, :t],
            targets=seq[:, 1:],
            loss_mask=torch.ones(batch_size, t, dtype=torch.bool, device=seq.device),
            params={"transition": tables, "initial_law": law},
            vocab_size=self.spec.num_states,
            true_probs_fn=self.true_probs,
        )

    def true_probs(self, batch: Batch) -> Tensor:
        """True next-token laws (B, T, k): the table row of each context, and inside the first
        context (order > 2) the conditional of the initial law."""
        k, n = self.spec.num_states, self.spec.order
        tables = batch.params["transition"]
        if n == 1:
            return tables.expand(-1, batch.seq_len, -1)
        ctx = context_index(batch.tokens, k, n - 1)[:, n - 2 :]
        rows = tables.gather(1, ctx.unsqueeze(-1).expand(-1, -1, k))
        if n == 2:
            return rows
        return torch.cat([self._first_context_laws(batch), rows], 1)

    def _first_context_laws(self, batch: Batch) -> Tensor:
        """True laws (B, n-2, k) at the positions inside the first context (order > 2)."""
        k, n = self.spec.num_states, self.spec.order
        digits = k ** torch.arange(n - 2, -1, -1, device=batch.tokens.device)
        first = (batch.tokens[:, : n - 1] * digits).sum(1)
        return self._init_conditionals(batch.params["initial_law"], first)

    # ------------------------------------------------------------ oracle and strategies
    def addalpha(self, tokens: Tensor) -> Tensor:
        """The add-alpha predictive of the true order (B, T, k) log-probs: counts of the
        transitions seen so far plus alpha, uniform inside the first context. Exact Bayes for
        Dirichlet rows under ``init="uniform"``; under ``"stationary"`` it ignores the first
        context's stationary likelihood (gap measured in ``docs/envs/ICL-MarkovChain-v0.md``).
        Fast (the env's per-step reference for that case, :attr:`online_oracle`)."""
        spec = self.spec
        alpha = self.alpha_vector(tokens.device) if isinstance(spec.alpha, tuple) else spec.alpha
        log_probs = ngram_log_probs(tokens, spec.num_states, spec.order, alpha)
        if spec.order > 2:
            log_probs[:, : spec.order - 2] = -math.log(spec.num_states)
        return log_probs

    def oracle(self, batch: Batch) -> Tensor:
        """Exact Bayes next-token log-probabilities (B, T, k) float32 for this spec's prior and
        init (:mod:`iclgym.tasks.markov_bayes`); a Monte-Carlo estimate where no closed form
        exists (:attr:`oracle_name` says which; :meth:`oracle_estimate` gives its error)."""
        return self.oracle_estimate(batch).log_probs

    def oracle_estimate(self, batch: Batch) -> OracleEstimate:
        """:meth:`oracle` with its Monte-Carlo replicates (None for closed forms)."""
        return markov_bayes.bayes_oracle(self, batch.tokens, self.oracle_samples)

    @property
    def notes(self) -> tuple[str, ...]:
        n = self.spec.order
        reads = {1: "no previous token: i.i.d. tokens", 2: "the last token: a first-order chain"}
        return (
            f"order={n} is the n-gram order: the next token depends on "
            + reads.get(n, f"the last {n - 1} tokens: an order-{n - 1} chain"),
        )

    @property
    def oracle_name(self) -> str:
        return markov_bayes.oracle_name(self.spec, self.oracle_samples)

    @property
    def online_oracle(self) -> str:
        """What :meth:`online` gives as the oracle: the exact oracle, except for Dirichlet rows
        under ``init="stationary"``, where it is :meth:`addalpha`."""
        if (
            self.spec.prior == "dirichlet"
            and self.spec.init == "stationary"
            and self.spec.order > 1
        ):
            return "add-alpha (Bayes without the stationary first-context likelihood)"
        return self.oracle_name

    def online(self, batch: Batch) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        """True rows and oracle one position at a time.

        Dirichlet rows: the add-alpha predictive (:attr:`online_oracle`), in O(B * V) work per
        step. Other priors: the exact oracle of the whole batch, computed up front.
        For Dirichlet rows it computes up front every position's context column and the count
        cell each step reveals (vectorised over positions), then keeps running transition
        counts; a step reveals one observation (one scatter-add), reads the table row and the
        count row of the new context (two gathers) and normalises; on CPU tensors a step is one
        compiled pass (:func:`iclgym.tasks.kernels.online_step`, the same values). Equals
        :attr:`Batch.true_probs` and :meth:`addalpha` position by position (tested).
        """
        if self.spec.prior != "dirichlet":
            return super().online(batch)
        k, n, states = self.spec.num_states, self.spec.order, self.spec.num_contexts
        size = batch.batch_size
        cols = size * states
        # (T, B), one row per step, in int32 (cell indices < k * cols fit when it does; the
        # transposition runs on bytes where tokens fit in one: 4x less memory traffic)
        narrow = torch.uint8 if k <= 256 else torch.int32
        index = np.int32 if k * cols < 2**31 else np.int64
        tokens = batch.tokens.to(narrow).T.contiguous().cpu().numpy().astype(index)
        alpha = np.broadcast_to(np.asarray(self.spec.alpha, dtype=np.float32), (k,))
        offset = np.arange(size, dtype=index) * states
        uniform = np.full((size, k), 1.0 / k, dtype=np.float32)
        init = self._first_context_laws(batch).cpu().numpy() if n > 2 else None
        # Up front (the envs build this in their worker thread), per position t: the column of
        # its context (the last n - 1 tokens, newest-last: sum_j x_{t-j} k^j, zeros before
        # the start) and the count cell the step reveals (x_t after the context of t - 1).
        ctx = np.zeros_like(tokens) if n == 1 else tokens.copy()
        for j in range(1, n - 1):
            ctx[j:] += tokens[:-j] * k**j
        rows = ctx + offset
        state = {"t": 0}
        if kernels.available(batch.tokens.device):  # one compiled pass per step
            row_tables = batch.params["transition"].reshape(cols, k).contiguous().numpy()
            row_counts = np.zeros((cols, k), dtype=np.float32)  # a sequence's rows contiguous
            row_alpha = np.ascontiguousarray(alpha)

            def compiled(t: int) -> tuple[np.ndarray, np.ndarray]:
                if t != state["t"]:
                    raise ValueError(f"online positions must be visited in order, got {t}")
                state["t"] = t + 1
                if t < n - 2:
                    return init[:, t], uniform
                return kernels.online_step(t, n, tokens, rows, row_counts, row_tables, row_alpha)

            return compiled
        # token-major layouts (k, B * S): numpy reduces and gathers fast along the long axis
        tables = batch.params["transition"].reshape(cols, k).T.contiguous().cpu().numpy()
        counts = np.zeros((k, cols), dtype=np.float32)
        flat_counts = counts.reshape(-1)
        alpha = alpha[:, None]
        cells = tokens * cols
        cells[0] += offset
        cells[1:] += rows[:-1]

        def step(t: int) -> tuple[np.ndarray, np.ndarray]:
            if t != state["t"]:
                raise ValueError(f"online positions must be visited in order, got {t}")
            state["t"] = t + 1
            if t >= n - 1:  # reveal observation x_t; distinct sequences hit distinct cells
                flat_counts[cells[t]] += 1.0
            if t < n - 2:
                return init[:, t], uniform
            c = np.take(counts, rows[t], axis=1)
            c += alpha
            c /= c.sum(0)
            return np.take(tables, rows[t], axis=1).T, c.T

        return step

    @property
    def strategies(self) -> Mapping[str, Strategy]:
        """uniform, unigram (add-one, as in the reference code), every m-gram up to the order
        (add-alpha), and ``true`` (the true transition row: privileged information)."""
        k, alpha = self.spec.num_states, self.spec.alpha

        def m_gram(m: int) -> Strategy:
            def predict(batch: Batch) -> Tensor:
                a = 1.0 if m == 1 else alpha
                if isinstance(a, tuple):
                    a = self.alpha_vector(batch.tokens.device)
                return ngram_log_probs(batch.tokens, k, m, a)

            return predict

        named: dict[str, Strategy] = {
            strategy_name(m): m_gram(m) for m in range(self.spec.order + 1)
        }
        named["true"] = lambda batch: batch.true_probs.clamp_min(1e-30).log()
        return named


# Proposals per accepted exact doubly-stochastic table, 1 / acceptance rounded up; used only to
# size the rejection batches. Acceptance measured on 400,000 proposals: k=3 0.500, k=4 0.208,
# k=5 0.075 (k=2 always accepts).
_BIRKHOFF_INVERSE_ACCEPTANCE = {2: 1, 3: 2, 4: 5, 5: 14}
