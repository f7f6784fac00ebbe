"""The exact Bayes predictive of in-context Markov chains, for every prior and init.

Position t has seen ``x_0 .. x_t`` and predicts ``x_{t+1}``; the Bayes predictive is
``E[P(x_{t+1} | P, x_0..x_t) | x_0..x_t]`` under the task's prior (the priors of Edelman et al. 2024
and their official code, ``docs/envs/ICL-MarkovChain-v0.md``; issue 8 section 1). ``N_t`` counts the
transitions seen so far (context -> token), ``c_t`` is the context ending at t, ``c_0`` the first
context.

Closed forms:

* **Dirichlet rows, uniform init**: the rows' posterior is Dir(alpha + N_t), so the predictive
  is add-alpha, ``(N_t[c_t, j] + alpha_j) / (N_t[c_t] + sum alpha)``; uniform inside the first
  context (t < n - 2).
* **Unigram prior** (every row equals one r ~ Dir(alpha)): tokens are i.i.d. r after the first
  context, and under ``init="stationary"`` the first context is i.i.d. r too (the stationary law
  of an i.i.d. chain), so the predictive is add-alpha over the token counts of ``x_0 .. x_t``
  (stationary) or ``x_{n-1} .. x_t`` (uniform; uniform inside the first context).
* **Doubly stochastic, k = 2**: ``P = [[1 - a, a], [a, 1 - a]]`` with a ~ U(0, 1), whose
  stationary law is uniform whatever a: ``P(switch) = (switches + 1) / (transitions + 2)``.
* **Mixture** (unigram with probability ``mix_p``, else doubly stochastic): both components'
  predictives weighted by ``mix_p * Z_unigram`` and ``(1 - mix_p) * Z_ds``, with ``Z`` each
  component's marginal likelihood of ``x_0 .. x_t`` (the first token included: r(x_0) under a
  stationary unigram start, 1/k otherwise). ``Z`` is the product of the component's own
  predictives, so the mixture needs nothing more than the components.

Estimators (no closed form; R = :data:`REPLICATES` independent replicates, so
:meth:`~iclgym.tasks.base.OracleEstimate.mc_error` can report the Monte-Carlo error):

* **Dirichlet rows, stationary init**: the posterior is ``Dir(alpha + N_t)`` times the
  stationary likelihood ``pi_P(c_0)`` of the first context. Samples ``P_s ~ Dir(alpha + N_t)``
  weighted by ``w_s = pi_{P_s}(c_0)`` (self-normalised importance sampling) give
  ``E[w P] / E[w]``; the estimate used is the control-variate form
  ``q_addalpha + sum_s w_s P_s / sum_s w_s - mean_s P_s``, whose noise shrinks with the
  correction itself (the plain sample mean of ``P_s`` estimates the exactly known add-alpha
  mean with the same noise). Samples for all t come from one draw: a Gamma(alpha) table per
  sample plus one Exp(1) per observed transition (a Gamma(a) plus an Exp(1) is a Gamma(a + 1)),
  so each t's sample is exactly ``Dir(alpha + N_t)``. Inside the first context of an order-n
  chain (t < n - 2) the predictive is a ratio of prior expectations of stationary marginals,
  estimated with the same prior samples. Every ``pi`` is a log-space GTH elimination
  (:mod:`iclgym.tasks.stationary`).
* **Doubly stochastic, 3 <= k <= 5** (and the doubly-stochastic part of the mixture):
  sequential Monte Carlo over t (Chopin 2002, "A sequential particle filter method for static
  models"): particles from the exact uniform prior, reweighted by each new transition,
  resampled (systematic) when the effective sample size drops below half, and moved by
  Metropolis-Hastings steps that add +e, -e on a random 2 x 2 minor (which keeps every row and
  column sum) with the exact posterior ``prod P_ij ** N_ij`` as target. Each replicate's
  evidence is the product of its predictives; replicates are pooled weighted by evidence.
* **Sinkhorn tables** (``approx_sinkhorn``, k >= 6): their prior has no known density, so the
  estimate is importance sampling from prior draws (exact as the samples grow; its reported
  error grows with T, as the weights degenerate).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from iclgym.tasks.base import OracleEstimate
from iclgym.tasks.estimators import context_index, in_context_counts, one_hot
from iclgym.tasks.stationary import (
    gth_stationary,
    lifted_log_transition,
    lifted_transition,
    log_gth_stationary,
)


def default_samples(spec) -> int:
    """Monte-Carlo samples (particles) per sequence, all replicates together, when the task does
    not set ``oracle_samples``: 256 SMC particles (doubly stochastic), 128 importance samples for
    first-order Dirichlet chains and 64 for higher orders, whose per-sample stationary
    elimination costs O(k**(3(n-1))). These keep the reported Monte-Carlo error near 1e-4
    nats/token or below on the registry defaults (docs/envs/ICL-MarkovChain-v0.md)."""
    kind = _kind(spec)
    if kind in ("smc", "prior_is"):
        return 256
    return 128 if spec.num_contexts <= 4 else 64


REPLICATES = 4
"""Independent replicates the samples are split into (for the Monte-Carlo error)."""
MH_MOVES = 20
"""Metropolis-Hastings steps per particle after each resampling of the SMC oracle."""
CHUNK_ELEMENTS = 2**24
"""Float64 elements per working tensor; batches are processed in chunks of sequences below it."""


def oracle_name(spec, samples: int | None = None) -> str:
    """How :func:`bayes_oracle` computes the predictive for ``spec`` (a MarkovChainSpec)."""
    kind = _kind(spec)
    if kind == "closed":
        return "bayes (closed form)"
    method = {
        "dirichlet_stationary": "importance sampling, add-alpha control variate",
        "smc": "sequential Monte Carlo",
        "prior_is": "importance sampling from the prior",
    }[kind]
    samples = samples or default_samples(spec)
    return f"bayes ({method}; {samples} samples per sequence in {REPLICATES} replicates)"


def _kind(spec) -> str:
    if spec.order == 1 or spec.prior == "unigram":
        return "closed"
    if spec.prior == "dirichlet":
        return "closed" if spec.init == "uniform" else "dirichlet_stationary"
    if spec.num_states == 2:
        return "closed"
    return "smc" if not spec.approx_sinkhorn else "prior_is"


def _generator(tokens: Tensor) -> torch.Generator:
    """A generator seeded by the tokens themselves: the oracle is a deterministic function of
    the batch, and different batches get independent Monte-Carlo samples."""
    digest = hashlib.blake2b(tokens.cpu().numpy().tobytes(), digest_size=8).digest()
    return torch.Generator(device=tokens.device).manual_seed(int.from_bytes(digest) >> 1)


def bayes_oracle(task, tokens: Tensor, samples: int | None = None) -> OracleEstimate:
    """The exact Bayes predictive of ``task`` (a MarkovChainTask) on ``tokens`` (B, T) int64.

    Returns an :class:`~iclgym.tasks.base.OracleEstimate` on the tokens' device: log-probabilities
    (B, T, k) float32 and, for the estimators, R replicates (R, B, T, k) pooled into them. The
    estimators run on the CPU with a generator seeded by the tokens, so a batch gets the same
    oracle on every device.
    """
    estimate = _bayes_oracle(task, tokens.cpu(), samples)
    if tokens.device.type == "cpu":
        return estimate
    replicates = estimate.replicates
    return OracleEstimate(
        estimate.log_probs.to(tokens.device),
        None if replicates is None else replicates.to(tokens.device),
    )


def _bayes_oracle(task, tokens: Tensor, samples: int | None) -> OracleEstimate:
    spec = task.spec
    samples = samples or default_samples(spec)
    if samples < 2 * REPLICATES:
        raise ValueError(f"samples={samples} is invalid: expected an int >= {2 * REPLICATES}")
    kind = _kind(spec)
    if spec.prior == "mixture":
        return _mixture(task, tokens, samples)
    if kind == "closed":
        return OracleEstimate(_closed_form(task, tokens).float())
    gen = _generator(tokens)
    if kind == "dirichlet_stationary":
        states = spec.num_contexts
        cost = 8 * samples * states * max(states, spec.num_states)
        pool, reps = _chunked(lambda x: _dirichlet_stationary(task, x, samples, gen), tokens, cost)
        return OracleEstimate(pool.float(), reps.float())
    reps = _ds_replicates(task, tokens, samples, gen)
    return OracleEstimate(_pool(reps, tokens).float(), reps.float())


def _ds_replicates(task, tokens: Tensor, samples: int, gen) -> Tensor:
    cost = 8 * samples * task.spec.num_states**2
    return _chunked(lambda x: (_doubly_stochastic(task, x, samples, gen),), tokens, cost)[0]


def _chunked(fn, tokens: Tensor, per_sequence: int) -> tuple[Tensor, ...]:
    """``fn`` over chunks of sequences, concatenated along the batch axis (axis -3 of every
    output: (..., B, T, k)); ``per_sequence`` float64 elements of working memory per
    sequence bound the chunk by :data:`CHUNK_ELEMENTS`."""
    batch = tokens.shape[0]
    size = max(1, min(batch, CHUNK_ELEMENTS // per_sequence))
    parts = [fn(tokens[i : i + size]) for i in range(0, batch, size)]
    return tuple(torch.cat(p, dim=-3) for p in zip(*parts, strict=True))


# ------------------------------------------------------------------------- closed forms
def _closed_form(task, tokens: Tensor) -> Tensor:
    spec = task.spec
    if spec.order == 1 or spec.prior == "unigram":
        return _unigram(task, tokens)
    if spec.prior == "dirichlet":  # uniform init: float32 already (no float64 round trip)
        return task.addalpha(tokens)
    return _switch_k2(tokens)


def _unigram(task, tokens: Tensor) -> Tensor:
    """i.i.d. tokens with r ~ Dir(alpha): add-alpha over the tokens drawn from r so far."""
    spec = task.spec
    k, n = spec.num_states, spec.order
    alpha = task.alpha_vector(tokens.device)
    counts = one_hot(tokens, k).double().cumsum(1)  # tokens x_0 .. x_t
    skip = 0 if (spec.init == "stationary" or n == 1) else n - 1  # uniform first context
    if skip:
        counts = counts - counts[:, skip - 1 : skip]  # drop x_0 .. x_{n-2}
        counts[:, : skip - 1] = 0.0
    log_q = (counts + alpha).log() - (counts.sum(-1, keepdim=True) + alpha.sum()).log()
    if skip > 1:
        log_q[:, : skip - 1] = -math.log(k)  # predicting a token of the uniform first context
    return log_q


def _switch_k2(tokens: Tensor) -> Tensor:
    """k = 2 doubly stochastic: P(switch) = (switches + 1) / (transitions + 2)."""
    switched = (tokens[:, 1:] != tokens[:, :-1]).double()
    switches = torch.cat([switched.new_zeros(tokens.shape[0], 1), switched.cumsum(1)], 1)
    transitions = torch.arange(tokens.shape[1], dtype=torch.float64, device=tokens.device)
    p_switch = (switches + 1.0) / (transitions + 2.0)
    stay = tokens.unsqueeze(-1) == torch.arange(2, device=tokens.device)
    return torch.where(stay, (1.0 - p_switch).unsqueeze(-1), p_switch.unsqueeze(-1)).log()


def _log_evidence(log_q: Tensor, tokens: Tensor, log_first: Tensor) -> Tensor:
    """(..., B, T) log marginal likelihood of ``x_0 .. x_t``: the first token's log-probability
    ``log_first`` (B,) plus the predictive's log-probabilities of ``x_1 .. x_t``."""
    seen = log_q[..., :-1, :].gather(-1, tokens[:, 1:].expand(*log_q.shape[:-3], -1, -1)[..., None])
    steps = torch.cat([log_first.expand(*log_q.shape[:-3], -1)[..., None], seen[..., 0]], -1)
    return steps.cumsum(-1)


def _pool(log_q: Tensor, tokens: Tensor) -> Tensor:
    """Pool R replicate predictives (R, B, T, k) weighted by their evidence of x_0 .. x_t (the
    first token's law is common to all and cancels)."""
    log_z = _log_evidence(log_q, tokens, log_q.new_zeros(tokens.shape[0]))
    weights = torch.softmax(log_z, dim=0).unsqueeze(-1)
    return torch.logsumexp(log_q + weights.log(), dim=0)


# ------------------------------------------------------------------------------ mixture
def _mixture(task, tokens: Tensor, samples: int) -> OracleEstimate:
    spec = task.spec
    k = spec.num_states
    log_u = _unigram(task, tokens)
    if spec.init == "stationary":  # x_0 ~ r: its predictive is the prior mean
        alpha = task.alpha_vector(tokens.device)
        first_u = (alpha / alpha.sum()).log()[tokens[:, 0]]
    else:
        first_u = tokens.new_full((tokens.shape[0],), -math.log(k), dtype=torch.float64)
    first_d = torch.full_like(first_u, -math.log(k))  # doubly stochastic: pi is uniform
    if k == 2:
        log_d, reps = _switch_k2(tokens), None
    else:
        reps = _ds_replicates(task, tokens, samples, _generator(tokens))
        log_d = _pool(reps, tokens)

    def mix(log_d: Tensor) -> Tensor:
        lead = log_d.shape[:-3]
        z_u = _log_evidence(log_u.expand(*lead, -1, -1, -1), tokens, first_u)
        z_d = _log_evidence(log_d, tokens, first_d)
        a = z_u + (math.log(spec.mix_p) if spec.mix_p > 0 else -math.inf)
        b = z_d + (math.log1p(-spec.mix_p) if spec.mix_p < 1 else -math.inf)
        weight = torch.stack([a, b]).log_softmax(0).unsqueeze(-1)  # (2, ..., B, T, 1)
        return torch.logsumexp(weight + torch.stack([log_u.expand_as(log_d), log_d]), 0)

    pooled = mix(log_d).float()
    return OracleEstimate(pooled, None if reps is None else mix(reps).float())


# ------------------------------------------------------- Dirichlet rows, stationary init
LINEAR_ALPHA_RANGE = (0.05, 1e100)
"""Concentrations for which the importance sampler keeps its Gamma tables in linear float64: a
Gamma(0.05) draw underflows below 1e-308 with probability ~1e-16, and products of two
Gamma(1e100) draws stay finite. Outside it the tables live in log space (same estimator,
slower)."""


class _GammaTables:
    """Per-sample Gamma tables G (B, S, states, k) whose normalised rows are the samples
    ``P ~ Dir(alpha + N_t)``: drawn once (Gamma(alpha)), then one Exp(1) added per revealed
    transition. Kept in linear float64, or in log space for tiny concentrations."""

    def __init__(self, alpha: Tensor, shape: tuple[int, ...], gen: torch.Generator) -> None:
        low, high = LINEAR_ALPHA_RANGE
        self.log = float(alpha.min()) < low or float(alpha.max()) > high
        self.gen = gen
        a = alpha.expand(*shape).contiguous()
        if self.log:  # log Gamma(a) = log Gamma(a + 1) + log(U) / a: no underflow
            g = torch._standard_gamma(a + 1.0, generator=gen).log_()
            u = 1.0 - torch.rand(a.shape, generator=gen, dtype=torch.float64, device=a.device)
            self.g = g.add_(u.log_() / a)
            self.rows = self.g.logsumexp(-1)
        else:
            self.g = torch._standard_gamma(a, generator=gen)
            self.rows = self.g.sum(-1)
        self.index = torch.arange(shape[0], device=a.device)

    def reveal(self, context: Tensor, token: Tensor) -> None:
        """Add an Exp(1) draw to cell (context, token) of every sample (B,) of each sequence."""
        b = self.index
        cell = self.g[b, :, context, token]  # (B, S)
        e = torch.empty_like(cell).exponential_(generator=self.gen)
        if self.log:
            self.g[b, :, context, token] = torch.logaddexp(cell, e.log_())
            self.rows[b, :, context] = self.g[b, :, context].logsumexp(-1)
        else:
            self.g[b, :, context, token] = cell + e
            self.rows[b, :, context] += e

    def probs(self) -> Tensor:
        """(..., states, k) every sample's transition table."""
        if self.log:
            return (self.g - self.rows.unsqueeze(-1)).exp()
        return self.g / self.rows.unsqueeze(-1)

    def row(self, context: Tensor) -> Tensor:
        """(B, S, k) sampled probability rows of ``context`` (B,)."""
        b = self.index
        if self.log:
            return (self.g[b, :, context] - self.rows[b, :, context].unsqueeze(-1)).exp()
        return self.g[b, :, context] / self.rows[b, :, context].unsqueeze(-1)

    def log_weight(self, first: Tensor) -> Tensor:
        """(B, S) log pi_P(first) of every sample, ``first`` (B,) a context.

        First-order chains with k <= 3 and linear tables use the Markov chain tree theorem
        (pi_i proportional to the rate-weighted sum over spanning trees directed into i,
        Freidlin & Wentzell): a handful of products and sums, no subtraction."""
        g, rows = self.g, self.rows
        states, k = g.shape[-2], g.shape[-1]
        if self.log or states != k or k > 3:
            index = first.view(-1, 1, 1).expand(-1, g.shape[1], 1)
            return self.log_stationary().gather(-1, index).squeeze(-1)
        if k == 2:  # y = (G10, G01) for rates G: pi_i ~ g_i y_i
            tree = torch.stack([g[..., 1, 0], g[..., 0, 1]], -1)
        else:
            out0 = g[..., 0, 1] + g[..., 0, 2]
            out1 = g[..., 1, 0] + g[..., 1, 2]
            tree = torch.stack(
                [
                    g[..., 2, 0] * out1 + g[..., 1, 0] * g[..., 2, 1],
                    g[..., 2, 1] * out0 + g[..., 0, 1] * g[..., 2, 0],
                    g[..., 1, 2] * out0 + g[..., 0, 2] * g[..., 1, 0],
                ],
                -1,
            )
        pi = tree * rows
        index = first.view(-1, 1, 1).expand(-1, g.shape[1], 1)
        return (pi.gather(-1, index).squeeze(-1) / pi.sum(-1)).log()

    def log_stationary(self) -> Tensor:
        """(B, S, states) log stationary law of every sample's lifted chain (GTH).

        In linear space GTH runs on the unnormalised rates G, whose continuous-time stationary
        law y gives the chain's as pi_c = y_c * g_c / sum (the rows' normalisation is the
        holding time), so no table is normalised."""
        if self.log:
            log_p = self.g - self.rows.unsqueeze(-1)
            return log_gth_stationary(lifted_log_transition(log_p))
        y = gth_stationary(lifted_transition(self.g)) * self.rows
        return (y / y.sum(-1, keepdim=True)).log()


FIRST_CONTEXT_SEED = 20241
"""Seed of the prior draws behind :func:`_first_context_tables` (a fixed bank: the tables are a
function of the spec alone)."""


def _first_context_tables(task) -> list[tuple[Tensor, Tensor]]:
    """Predictives at t = 0 .. n - 2 for Dirichlet rows under the stationary start, where no
    transition has been seen: ``q(x_{t+1} | x_0..x_t) = E[m(x_0..x_{t+1})] / E[m(x_0..x_t)]``
    with ``m`` the marginal of the joint stationary law of ``(c_0, x_{n-1})``
    (``pi_P(c_0) P[c_0, x_{n-1}]``) and E the prior expectation. They depend on the prefix
    alone, so one large bank of prior draws (up to 2**16, fewer for big lifted chains) serves
    every sequence; computed once per task and cached. Returns, per t, the pooled (k**(t+1),
    k) table and its R replicate tables (R, k**(t+1), k), float64."""
    cached = task.__dict__.get("_first_context_tables")
    if cached is not None:
        return cached
    spec = task.spec
    k, n, states = spec.num_states, spec.order, spec.num_contexts
    per_island = max(64, min(2**14, 2**25 // (states**3 * REPLICATES)))
    gen = torch.Generator().manual_seed(FIRST_CONTEXT_SEED)
    alpha = task.alpha_vector()
    joint = torch.zeros(REPLICATES, states * k, dtype=torch.float64)
    chunk = max(1, 2**22 // (states * states * REPLICATES))
    for start in range(0, per_island, chunk):
        size = min(chunk, per_island - start)
        tables = _GammaTables(alpha, (REPLICATES, size, states, k), gen)
        pi = tables.log_stationary().exp()  # (R, size, states)
        joint += (pi.unsqueeze(-1) * tables.probs()).sum(1).view(REPLICATES, -1)
    out = [(_prefix_table(joint.sum(0), k, t), _prefix_table(joint, k, t)) for t in range(n - 1)]
    task.__dict__["_first_context_tables"] = out
    return out


def _prefix_table(joint: Tensor, k: int, t: int) -> Tensor:
    """(..., k**(t+1), k) law of the (t+2)-th token given the first t+1 tokens, from a joint
    law (..., k**n) over n >= t + 2 tokens (oldest digit most significant)."""
    lead = joint.shape[:-1]
    m = joint.view(*lead, k ** (t + 2), -1).sum(-1).view(*lead, k ** (t + 1), k)
    return m / m.sum(-1, keepdim=True)


def _dirichlet_stationary(task, tokens: Tensor, samples: int, gen) -> tuple[Tensor, Tensor]:
    """Pooled (B, T, k) and replicate (R, B, T, k) log-predictives for Dirichlet rows under the
    stationary init (module docstring): importance sampling with the add-alpha control
    variate."""
    spec = task.spec
    k, n = spec.num_states, spec.order
    batch, seq = tokens.shape
    states = spec.num_contexts
    device = tokens.device
    alpha = task.alpha_vector(device)
    m = samples // REPLICATES
    total = m * REPLICATES
    tables = _GammaTables(alpha, (batch, total, states, k), gen)
    ctx = context_index(tokens, k, n - 1)  # (B, T): context ending at t, -1 before n - 2
    first = ctx[:, n - 2]  # c_0
    counts, totals = in_context_counts(tokens, k, n)  # add-alpha statistics at every t
    q_addalpha = (counts.double() + alpha) / (totals.double() + alpha.sum()).unsqueeze(-1)
    pool = torch.empty(batch, seq, k, dtype=torch.float64, device=device)
    reps = torch.empty(REPLICATES, batch, seq, k, dtype=torch.float64, device=device)
    for t, (table, table_reps) in enumerate(_first_context_tables(task)):
        prefix = context_index(tokens[:, : t + 1], k, t + 1)[:, t]  # x_0 .. x_t
        table, table_reps = table.to(device), table_reps.to(device)
        _store(pool, reps, t, table[prefix], table_reps[:, prefix].transpose(0, 1))

    def correction(w: Tensor, p: Tensor) -> Tensor:  # (..., S), (..., S, k) -> (..., k)
        return (w.unsqueeze(-1) * p).sum(-2) / w.sum(-1, keepdim=True) - p.mean(-2)

    for t in range(n - 1, seq):
        tables.reveal(ctx[:, t - 1], tokens[:, t])  # the transition c_{t-1} -> x_t
        log_w = tables.log_weight(first)  # (B, S): log pi_P(c_0)
        w = (log_w - log_w.amax(1, keepdim=True)).exp()
        p = tables.row(ctx[:, t])  # (B, S, k)
        base = q_addalpha[:, t]  # (B, k): the exact mean of p under Dir(alpha + N_t)
        island = correction(w.view(batch, REPLICATES, m), p.view(batch, REPLICATES, m, k))
        _store(pool, reps, t, base + correction(w, p), base.unsqueeze(1) + island, floor=base)
    return pool.log(), reps.log()


def _store(pool: Tensor, reps: Tensor, t: int, q: Tensor, q_reps: Tensor, floor=None) -> None:
    """Write position t's pooled (B, k) and replicate (B, R, k) predictives, clamped at
    1e-6 of ``floor`` (a control-variate estimate can undershoot 0 by Monte-Carlo noise) and
    renormalised."""

    def clean(q: Tensor) -> Tensor:
        if floor is not None:
            q = torch.maximum(q, 1e-6 * (floor if q.dim() == floor.dim() else floor[:, None]))
        return q / q.sum(-1, keepdim=True)

    pool[:, t] = clean(q)
    reps[:, :, t] = clean(q_reps).transpose(0, 1)


# ------------------------------------------------------------------ doubly stochastic
def _doubly_stochastic(task, tokens: Tensor, samples: int, gen) -> Tensor:
    """Replicate log-predictives (R, B, T, k) for doubly-stochastic tables: SMC with
    Metropolis-Hastings moves for the uniform Birkhoff prior, importance sampling from the prior
    for Sinkhorn tables (module docstring)."""
    spec = task.spec
    k = spec.num_states
    batch, seq = tokens.shape
    device = tokens.device
    m = samples // REPLICATES
    move = not spec.approx_sinkhorn
    p = task.log_doubly_stochastic(batch * REPLICATES * m, gen, device).exp()
    p = p.view(batch, REPLICATES, m, k, k)
    log_w = torch.zeros(batch, REPLICATES, m, dtype=torch.float64, device=device)
    counts = torch.zeros(batch, k, k, dtype=torch.float64, device=device)
    out = torch.empty(REPLICATES, batch, seq, k, dtype=torch.float64, device=device)
    rows_index = torch.arange(batch, device=device)
    for t in range(seq):
        x = tokens[:, t].view(batch, 1, 1, 1, 1).expand(-1, REPLICATES, m, 1, k)
        rows = p.gather(3, x).squeeze(3)  # (B, R, m, k): each particle's row of x_t
        w = torch.softmax(log_w, -1).unsqueeze(-1)
        out[:, :, t] = (w * rows).sum(2).transpose(0, 1)
        if t == seq - 1:
            break
        nxt = tokens[:, t + 1]
        log_w += rows.gather(-1, nxt.view(batch, 1, 1, 1).expand(-1, REPLICATES, m, 1))[
            ..., 0
        ].log()
        counts[rows_index, tokens[:, t], nxt] += 1.0
        if move:
            p, log_w = _resample_move(p, log_w, counts, gen)
    return out.clamp_min(1e-300).log()


def _resample_move(p: Tensor, log_w: Tensor, counts: Tensor, gen) -> tuple[Tensor, Tensor]:
    """Resample (systematic) the replicates whose effective sample size fell below half, then
    move their particles with :data:`MH_MOVES` Metropolis-Hastings steps on 2 x 2 minors."""
    m, k = p.shape[2], p.shape[3]
    w = torch.softmax(log_w, -1)
    ess = 1.0 / (w * w).sum(-1)  # (B, R)
    need = ess < m / 2
    if not bool(need.any()):
        return p, log_w
    b_idx, r_idx = need.nonzero(as_tuple=True)
    wn = w[b_idx, r_idx]  # (n, m)
    n = wn.shape[0]
    cdf = wn.cumsum(-1)
    cdf[:, -1] = 1.0
    u = (
        torch.rand(n, 1, generator=gen, dtype=torch.float64, device=p.device)
        + torch.arange(m, device=p.device)
    ) / m
    pick = torch.searchsorted(cdf, u).clamp_max_(m - 1)
    chosen = p[b_idx, r_idx].gather(1, pick.view(n, m, 1, 1).expand(-1, -1, k, k))
    chosen = _mh_moves(chosen, counts[b_idx], gen)
    p = p.clone()
    p[b_idx, r_idx] = chosen
    log_w = log_w.clone()
    log_w[b_idx, r_idx] = 0.0
    return p, log_w


def _mh_moves(p: Tensor, counts: Tensor, gen) -> Tensor:
    """:data:`MH_MOVES` random-walk Metropolis-Hastings steps targeting the posterior
    ``prod p_ij ** counts_ij`` on the Birkhoff polytope (uniform prior), for particles p
    (n, m, k, k) and counts (n, k, k). A step adds (+e, -e; -e, +e) to a random 2 x 2 minor,
    e ~ N(0, sigma^2) with sigma the particles' spread (so steps shrink with the posterior);
    the move is symmetric, so it is accepted with probability min(1, likelihood ratio)."""
    n, m, k, _ = p.shape
    device, steps = p.device, MH_MOVES
    flat = p.reshape(n, m, k * k).clone()
    flat_counts = counts.reshape(n, 1, k * k).expand(-1, m, -1)
    sigma = flat.std(1).mean(-1).clamp_min(1e-12).view(n, 1, 1)
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64, device=device)
    # all random numbers at once: rows, columns, step sizes and acceptance uniforms
    i1 = torch.randint(k, (steps, n, m), generator=gen, device=device)
    j1 = torch.randint(k, (steps, n, m), generator=gen, device=device)
    i2 = (i1 + torch.randint(1, k, (steps, n, m), generator=gen, device=device)) % k
    j2 = (j1 + torch.randint(1, k, (steps, n, m), generator=gen, device=device)) % k
    cells = torch.stack([i1 * k + j1, i2 * k + j2, i1 * k + j2, i2 * k + j1], -1)
    moves = torch.randn(steps, n, m, 1, generator=gen, dtype=torch.float64, device=device)
    moves = moves * sigma * sign  # (steps, n, m, 4)
    log_u = torch.rand(steps, n, m, generator=gen, dtype=torch.float64, device=device).log_()
    for step in range(steps):
        old = flat.gather(-1, cells[step])
        ratio = moves[step] / old  # new / old - 1
        valid = (ratio > -1.0).all(-1)
        log_change = ratio.clamp_min(-1.0 + 1e-15).log1p()  # finite even for invalid moves
        log_ratio = (flat_counts.gather(-1, cells[step]) * log_change).sum(-1)
        accept = (valid & (log_u[step] < log_ratio)).unsqueeze(-1)
        flat.scatter_(-1, cells[step], torch.where(accept, old + moves[step], old))
    return flat.view(n, m, k, k)
