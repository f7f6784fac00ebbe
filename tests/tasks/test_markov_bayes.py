"""The Markov oracle is exact Bayes for every prior and init (issue 8, section 1).

Each closed form is checked against an independent reference (a plain loop, or numerical
quadrature of the posterior on a grid); each estimator against quadrature or a large bank of
prior draws, within its own reported Monte-Carlo error; and the general property "no
predictor beats the oracle by more than 3 standard errors" over every registered id and prior.
"""

from __future__ import annotations

import math

import pytest
import torch

from iclgym.registry import list_envs, make_task
from iclgym.tasks import MarkovChainTask
from iclgym.tasks import markov_bayes as mb
from iclgym.tasks.estimators import ngram_log_probs


def per_sequence_ce(log_q: torch.Tensor, batch) -> torch.Tensor:
    """(B,) mean cross-entropy over the scored positions."""
    ce = -log_q.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1).double()
    mask = batch.loss_mask.double()
    return (ce * mask).sum(1) / mask.sum(1)


# ------------------------------------------------------------------------- closed forms
def slow_unigram(tokens, k, order, alpha, init):
    """Add-alpha over the tokens drawn from r, one position at a time."""
    batch, seq = tokens.shape
    out = torch.empty(batch, seq, k, dtype=torch.float64)
    alpha = torch.as_tensor(alpha, dtype=torch.float64).expand(k)
    for b in range(batch):
        for t in range(seq):
            start = 0 if init == "stationary" or order == 1 else order - 1
            if t < start - 1:  # predicting a token of the uniform first context
                out[b, t] = 1.0 / k
                continue
            counts = torch.zeros(k, dtype=torch.float64)
            for u in range(start, t + 1):
                counts[tokens[b, u]] += 1
            out[b, t] = (counts + alpha) / (counts.sum() + alpha.sum())
    return out


@pytest.mark.parametrize("init", ["stationary", "uniform"])
@pytest.mark.parametrize(("k", "order", "alpha"), [(2, 2, 1.0), (3, 3, (0.5, 1.0, 2.0))])
def test_unigram_prior_oracle_equals_plain_loop(k, order, alpha, init):
    task = MarkovChainTask(num_states=k, order=order, alpha=alpha, init=init, prior="unigram")
    batch = task.sample(6, generator=task.generator(0))
    assert task.oracle_name == "bayes (closed form)"
    ref = slow_unigram(batch.tokens[:, :30], k, order, alpha, init)
    got = task.oracle(batch).exp()[:, :30].double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_doubly_stochastic_k2_is_the_switch_count_rule():
    """P(switch) = (switches + 1) / (transitions + 2) (issue 8)."""
    task = MarkovChainTask(num_states=2, prior="doubly_stochastic", seq_len=40)
    batch = task.sample(5, generator=task.generator(1))
    got = task.oracle(batch).exp()
    for b in range(5):
        x = batch.tokens[b].tolist()
        for t in range(40):
            switches = sum(x[u] != x[u - 1] for u in range(1, t + 1))
            p_switch = (switches + 1) / (t + 2)
            assert got[b, t, 1 - x[t]].item() == pytest.approx(p_switch, rel=1e-5)


def grid_mixture_k2(tokens, alpha, mix_p, init, points=20000):
    """Mixture predictive by quadrature on midpoint grids: r = P(token 1) ~ Beta(alpha1,
    alpha0) for the unigram part, a = P(switch) ~ U(0, 1) for the doubly-stochastic part."""
    g = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    a0, a1 = alpha
    log_prior_r = (a1 - 1) * g.log() + (a0 - 1) * (1 - g).log()
    log_prior_r -= torch.logsumexp(log_prior_r, 0)
    out = torch.empty(tokens.shape[0], tokens.shape[1], 2, dtype=torch.float64)
    for b in range(tokens.shape[0]):
        x = tokens[b].tolist()
        for t in range(len(x)):
            ones = sum(x[: t + 1])
            # unigram: every token ~ r (stationary start) or x_0 uniform then r
            n1 = ones if init == "stationary" else ones - x[0]
            n0 = (t + 1 - ones) if init == "stationary" else (t - (ones - x[0]))
            log_first_u = 0.0 if init == "stationary" else math.log(0.5)
            lu = log_prior_r + n1 * g.log() + n0 * (1 - g).log() + log_first_u
            switches = sum(x[u] != x[u - 1] for u in range(1, t + 1))
            ld = (
                switches * g.log()
                + (t - switches) * (1 - g).log()
                + math.log(0.5)
                - math.log(points)
            )
            zu, zd = torch.logsumexp(lu, 0), torch.logsumexp(ld, 0)
            pu = (torch.softmax(lu, 0) * g).sum()  # P(next = 1) under the unigram part
            p_switch = (torch.softmax(ld, 0) * g).sum()
            pd = p_switch if x[t] == 0 else 1 - p_switch
            wu = mix_p * zu.exp() / (mix_p * zu.exp() + (1 - mix_p) * zd.exp())
            p1 = wu * pu + (1 - wu) * pd
            out[b, t] = torch.stack([1 - p1, p1])
    return out


@pytest.mark.parametrize("init", ["stationary", "uniform"])
def test_mixture_k2_oracle_equals_quadrature(init):
    alpha = (1.5, 2.0)
    task = MarkovChainTask(
        num_states=2, prior="mixture", mix_p=0.25, alpha=alpha, init=init, seq_len=12
    )
    batch = task.sample(6, generator=task.generator(2))
    ref = grid_mixture_k2(batch.tokens, alpha, 0.25, init)
    torch.testing.assert_close(task.oracle(batch).exp().double(), ref, rtol=0, atol=2e-5)


# Issue 8, section 1: add-alpha's excess over the exact Bayes predictive (nats/token, 8,192
# test sequences, default stationary init), measured by the issue's author.
ISSUE_GAPS = {
    ("unigram", 2, 20): 0.0251,
    ("unigram", 2, 100): 0.0114,
    ("unigram", 3, 20): 0.0528,
    ("unigram", 3, 100): 0.0304,
    ("doubly_stochastic", 2, 20): 0.0207,
    ("doubly_stochastic", 2, 100): 0.0117,
    ("mixture", 2, 20): 0.0105,
    ("mixture", 2, 100): 0.0073,
    ("dirichlet", 2, 20): 0.0053,  # the stationary first-token likelihood
    ("dirichlet", 2, 100): 0.0013,
    ("dirichlet", 3, 20): 0.0042,
    ("dirichlet", 3, 100): 0.0010,
}


@pytest.mark.parametrize(("prior", "k", "seq_len"), list(ISSUE_GAPS))
def test_addalpha_gap_to_the_oracle_matches_issue_8(prior, k, seq_len):
    """The issue's numbers are themselves 8,192-sequence estimates: compare with the standard
    error of a difference of two such estimates (sqrt 2 * ours), at 4 standard errors."""
    task = MarkovChainTask(num_states=k, prior=prior, seq_len=seq_len)
    gen = task.generator(0, "test")
    gaps, mc = [], 0.0
    for _ in range(4):
        batch = task.sample(2048, generator=gen)
        est = task.oracle_estimate(batch)
        gaps.append(
            per_sequence_ce(task.addalpha(batch.tokens), batch)
            - per_sequence_ce(est.log_probs, batch)
        )
        bias, se = est.mc_error(batch.targets, batch.loss_mask)
        mc = max(mc, bias + 3 * se)
    gap = torch.cat(gaps)
    se = gap.std().item() / math.sqrt(gap.numel())
    ref = ISSUE_GAPS[(prior, k, seq_len)]
    assert abs(gap.mean().item() - ref) <= 4 * math.sqrt(2) * se + mc, (gap.mean(), ref, se)


# ------------------------------------------------------------------------- estimators
def grid_dirichlet_stationary_k2(tokens, alpha, points=800):
    """Exact predictive for k = 2 Dirichlet rows under the stationary start by quadrature:
    a = P01 ~ Beta(alpha1, alpha0), b = P10 ~ Beta(alpha0, alpha1), likelihood
    pi(x_0) prod P^N with pi = (b, a) / (a + b)."""
    g = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    a, b = g.view(-1, 1), g.view(1, -1)
    a0, a1 = alpha
    log_prior = ((a1 - 1) * a.log() + (a0 - 1) * (1 - a).log()) + (
        (a0 - 1) * b.log() + (a1 - 1) * (1 - b).log()
    )
    out = torch.empty(tokens.shape[0], tokens.shape[1], 2, dtype=torch.float64)
    for i in range(tokens.shape[0]):
        x = tokens[i].tolist()
        log_pi = (b if x[0] == 0 else a).log() - (a + b).log()
        for t in range(len(x)):
            n = torch.zeros(2, 2)
            for u in range(1, t + 1):
                n[x[u - 1], x[u]] += 1
            ll = (
                log_prior
                + log_pi
                + n[0, 1] * a.log()
                + n[0, 0] * (1 - a).log()
                + n[1, 0] * b.log()
                + n[1, 1] * (1 - b).log()
            )
            w = torch.softmax(ll.flatten(), 0).view_as(ll)
            p_leave = (w * (a if x[t] == 0 else b)).sum()  # P(next != x_t)
            p1 = p_leave if x[t] == 0 else 1 - p_leave
            out[i, t] = torch.stack([1 - p1, p1])
    return out


@pytest.mark.parametrize("alpha", [(1.0, 1.0), (2.0, 3.0)])
def test_dirichlet_stationary_estimator_matches_quadrature(alpha):
    task = MarkovChainTask(num_states=2, alpha=alpha, seq_len=10)
    task.oracle_samples = 8192
    batch = task.sample(12, generator=task.generator(3))
    ref = grid_dirichlet_stationary_k2(batch.tokens, alpha)
    est = task.oracle_estimate(batch)
    assert est.replicates is not None and "importance sampling" in task.oracle_name
    diff = (est.log_probs.exp().double() - ref).abs().max().item()
    assert diff < 0.01, diff
    gap = (per_sequence_ce(est.log_probs, batch) - per_sequence_ce(ref.log(), batch)).mean()
    bias, se = est.mc_error(batch.targets, batch.loss_mask)
    assert abs(gap.item()) <= bias + 4 * se + 1e-4, (gap, bias, se)


def prior_bank_predictive(task, tokens, draws, seed):
    """Doubly-stochastic predictive by self-normalised importance sampling over a large bank
    of exact prior draws shared by every sequence (accurate for short sequences)."""
    batch, seq = tokens.shape
    k = task.spec.num_states
    num = torch.zeros(batch, seq, k, dtype=torch.float64)
    den = torch.zeros(batch, seq, 1, dtype=torch.float64)
    for chunk in range(draws // 200_000):
        bank = task.log_doubly_stochastic(
            200_000, torch.Generator().manual_seed(seed + chunk), "cpu"
        )
        ll = torch.zeros(batch, bank.shape[0], dtype=torch.float64)
        for t in range(seq):
            if t:
                ll += bank[:, tokens[:, t - 1], tokens[:, t]].T
            w = ll.exp()
            rows = bank[:, tokens[:, t], :].exp().permute(1, 0, 2)
            num[:, t] += torch.einsum("bn,bnk->bk", w, rows)
            den[:, t] += w.sum(1, keepdim=True)
    return num / den


def test_doubly_stochastic_k3_smc_matches_a_large_prior_bank():
    task = MarkovChainTask(num_states=3, prior="doubly_stochastic", seq_len=5)
    task.oracle_samples = 4096
    batch = task.sample(12, generator=task.generator(4))
    ref = prior_bank_predictive(task, batch.tokens, 1_000_000, seed=50)
    est = task.oracle_estimate(batch)
    assert "sequential Monte Carlo" in task.oracle_name
    assert (est.log_probs.exp().double() - ref).abs().max().item() < 0.03


def test_smc_on_k2_recovers_the_closed_form():
    """The SMC machinery run where a closed form exists (k = 2) agrees with it."""
    task = MarkovChainTask(num_states=2, prior="doubly_stochastic", seq_len=60)
    batch = task.sample(64, generator=task.generator(5))
    reps = mb._doubly_stochastic(task, batch.tokens, 1024, torch.Generator().manual_seed(0))
    pooled = mb._pool(reps, batch.tokens)
    exact = mb._switch_k2(batch.tokens)
    assert (pooled.exp() - exact.exp()).abs().max().item() < 0.06
    gap = per_sequence_ce(pooled.float(), batch) - per_sequence_ce(exact.float(), batch)
    assert abs(gap.mean().item()) < 5e-4


def test_order3_first_context_uses_the_stationary_prefix_law():
    """Issue 8: ICL-NGram-v0, k=3, order 3, alpha=(5, .5, .5), T=20. Inside the first context
    the Bayes predictive of x_1 given x_0 is E[pi(x_0, x_1)] / E[pi(x_0)] under the prior; a
    bank of 200,000 prior draws gives it (to ~0.003); the oracle must agree, and its CE at
    t = 0 is about 0.514 nats (the old oracle predicted uniform there: 1.0986)."""
    alpha = (5.0, 0.5, 0.5)
    task = make_task("ICL-NGram-v0", num_states=3, order=3, alpha=alpha, seq_len=20)
    bank = task.log_tables(200_000, torch.Generator().manual_seed(9), "cpu")
    pi = task.stationary(bank.exp()).view(-1, 3, 3)  # (N, x_0, x_1)
    ref = pi.mean(0) / pi.mean(0).sum(-1, keepdim=True)  # q(x_1 | x_0)
    batch = task.sample(4096, generator=task.generator(0, "test"))
    est = task.oracle_estimate(batch)
    got = est.log_probs[:, 0].exp().double()
    assert (got - ref[batch.tokens[:, 0]]).abs().max().item() < 0.02
    ce0 = -est.log_probs[:, 0].gather(-1, batch.targets[:, :1]).mean().item()
    assert abs(ce0 - 0.514) < 0.04, ce0  # 4096 sequences: SE about 0.01


# ------------------------------------------------------- no predictor beats the oracle
MARKOV_CASES = [
    ("ICL-MarkovChain-v0", {"num_states": k, "prior": prior, "init": init})
    for prior in ("dirichlet", "unigram", "doubly_stochastic", "mixture")
    for k in (2, 3)
    for init in ("stationary", "uniform")
] + [
    ("ICL-NGram-v0", {"num_states": 2, "order": 3, "prior": prior, "init": init})
    for prior in ("dirichlet", "unigram")
    for init in ("stationary", "uniform")
]


def challengers(task, batch, oracle: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every strategy but the privileged ``true``, the in-context unigram counting x_0 with
    the prior's alpha, the add-alpha predictor, and the oracle with the prior mean inside
    the first context (issue 8's list)."""
    out = {name: s(batch) for name, s in task.strategies.items() if name != "true"}
    spec = getattr(task, "spec", None)
    if isinstance(task, MarkovChainTask):
        k = spec.num_states
        alpha = task.alpha_vector() if isinstance(spec.alpha, tuple) else spec.alpha
        out["unigram_alpha"] = ngram_log_probs(batch.tokens, k, 1, alpha)
        out["addalpha"] = task.addalpha(batch.tokens)
        prior_mean = (task.alpha_vector() / task.alpha_vector().sum()).log().float()
        first = oracle.clone()
        first[:, : max(1, spec.order - 1)] = prior_mean
        out["prior_mean_first_context"] = first
    return out


@pytest.mark.parametrize(
    ("env_id", "overrides"),
    MARKOV_CASES + [(e, {}) for e in list_envs() if "Markov" not in e and "NGram" not in e],
)
def test_no_predictor_beats_the_oracle_by_3_standard_errors(env_id, overrides):
    seq = {"seq_len": 20} if "Markov" in env_id or "NGram" in env_id else {}
    task = make_task(env_id, **overrides, **seq)
    gen = task.generator(0, "test")
    diffs: dict[str, list[torch.Tensor]] = {}
    mc = 0.0
    for _ in range(2):
        batch = task.sample(1024, generator=gen)
        est = task.oracle_estimate(batch)
        oracle_ce = per_sequence_ce(est.log_probs, batch)
        bias, se = est.mc_error(batch.targets, batch.loss_mask)
        mc = max(mc, bias + 3 * se)
        for name, log_q in challengers(task, batch, est.log_probs).items():
            diffs.setdefault(name, []).append(per_sequence_ce(log_q, batch) - oracle_ce)
    for name, parts in diffs.items():
        d = torch.cat(parts)
        se = d.std().item() / math.sqrt(d.numel())
        assert d.mean().item() >= -3 * se - mc, (env_id, overrides, name, d.mean(), se, mc)


def test_monte_carlo_error_covers_the_distance_to_a_precise_oracle():
    """The error an estimate reports bounds its distance to a 16x larger estimate."""
    task = MarkovChainTask(num_states=3, prior="mixture", mix_p=0.5, seq_len=30)
    batch = task.sample(256, generator=task.generator(6))
    task.oracle_samples = 32
    rough = task.oracle_estimate(batch)
    task.oracle_samples = 512
    fine = task.oracle_estimate(batch)
    gap = (per_sequence_ce(rough.log_probs, batch) - per_sequence_ce(fine.log_probs, batch)).mean()
    bias, se = rough.mc_error(batch.targets, batch.loss_mask)
    assert bias > 0 and se > 0
    assert abs(gap.item()) <= bias + 3 * se, (gap, bias, se)


def test_closed_forms_report_no_monte_carlo_error():
    task = MarkovChainTask(num_states=3, init="uniform")
    batch = task.sample(8, generator=task.generator(0))
    est = task.oracle_estimate(batch)
    assert est.replicates is None and est.mc_error(batch.targets, batch.loss_mask) == (0.0, 0.0)


def test_oracle_is_a_deterministic_function_of_the_batch():
    task = MarkovChainTask(num_states=3, prior="doubly_stochastic", seq_len=15)
    batch = task.sample(16, generator=task.generator(0))
    assert torch.equal(task.oracle(batch), task.oracle(batch))
