"""Token-priority graphs, planted and paper mode: spec validation, the planted instance, Oracle C
against a plain reference, the sampler's law against Oracle C, the planted special cases,
multiplicity weighting, distinct and deterministic modes, seeding, the planted metrics on
hand-computed examples, the strategies and the env id (``docs/envs/ICL-PriorityGraph-v0.md``)."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.env_util import make_vec_env

from iclgym.harness import OraclePredictor, StrategyPredictor, evaluate
from iclgym.registry import make_task
from iclgym.tasks import TASK_FAMILIES
from iclgym.tasks.base import Batch
from iclgym.tasks.priority_graph import (
    LOG_FLOOR,
    SIGMA_BETA_MAX,
    PriorityGraphSpec,
    PriorityGraphTask,
    first_argmax,
    planted_draw,
    planted_instance,
    planted_law,
    planted_metrics,
)
from iclgym.tasks.priority_graph_theory import EmpiricalTPG, paper_dataset


def draw(task, n, split="train", seed=0):
    return task.sample(n, generator=task.generator(seed, split))


def reference_law(tokens, level, beta):
    """Oracle C written plainly, one context at a time."""
    out, tops = [], []
    for row in np.asarray(tokens).tolist():
        k = row[-1]
        counts = {j: row.count(j) for j in set(row)}
        top_level = max(level[k, j] for j in counts)
        top = [j for j in counts if level[k, j] == top_level]
        weights = {j: counts[j] * math.exp(beta[k, j]) for j in top}
        z = sum(weights.values())
        p = np.zeros(level.shape[0])
        mask = np.zeros(level.shape[0], dtype=bool)
        for j in top:
            p[j] = weights[j] / z
            mask[j] = True
        out.append(p)
        tops.append(mask)
    return np.array(out), np.array(tops)


# ------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "both"}, r"mode='both' is invalid: expected one of \('planted', 'paper'\)"),
        ({"num_tokens": 1}, r"num_tokens=1 is invalid: expected an int >= 2"),
        ({"num_tokens": 8.0}, r"num_tokens=8.0 is invalid"),
        ({"num_tokens": True}, r"num_tokens=True is invalid"),
        ({"context_len": 0}, r"context_len=0 is invalid: expected an int >= 1"),
        ({"s_max": 0}, r"s_max=0 is invalid: expected an int in \[1, 8\]"),
        ({"mode": "paper", "n": 1}, r"n=1 is invalid: expected an int >= 2 with cyclic=True"),
        ({"s_max": 9}, r"s_max=9 is invalid: expected an int in \[1, 8\]"),
        (
            {"sigma_beta": -0.1},
            r"sigma_beta=-0.1 is invalid: expected a finite float in \[0, 1e\+306\]",
        ),
        (
            {"sigma_beta": 1.7e308},
            r"sigma_beta=1.7e\+308 is invalid: expected a finite float in \[0, 1e\+306\]",
        ),
        ({"sigma_beta": 1.1e306}, r"sigma_beta=1.1e\+306 is invalid"),
        ({"sigma_beta": math.inf}, r"sigma_beta=inf is invalid"),
        ({"sigma_beta": math.nan}, r"sigma_beta=nan is invalid"),
        ({"distinct": 1}, r"distinct=1 is invalid: expected a bool"),
        ({"deterministic": "yes"}, r"deterministic='yes' is invalid: expected a bool"),
        ({"cyclic": None}, r"cyclic=None is invalid: expected a bool"),
        (
            {"distinct": True, "context_len": 9},
            r"context_len=9 is invalid: expected an int in \[1, 8\] with distinct=True",
        ),
        ({"instance_seed": -1}, r"instance_seed=-1 is invalid: expected an int >= 0"),
        ({"n": 0}, r"n=0 is invalid: expected an int >= 1"),
        ({"d": 0}, r"d=0 is invalid: expected an int >= 1"),
        ({"embedding": "gauss"}, r"embedding='gauss' is invalid: expected one of"),
        ({"max_tries": 0}, r"max_tries=0 is invalid: expected an int >= 1"),
        ({"mode": "paper", "d": 7}, r"d=7 is invalid: expected an int >= 8 with mode='paper'"),
        (
            {"mode": "paper", "d": 8, "embedding": "equi-corr"},
            r"d=8 is invalid: expected an int >= 9 with mode='paper'",
        ),
        ({"mode": "paper", "distinct": True}, r"distinct=True is invalid: expected False with"),
        ({"mode": "paper", "deterministic": True}, r"deterministic=True is invalid: expected"),
        ({"num_tokens": 10**6}, r"num_tokens=1000000 is invalid: .* would take .*iB"),
        ({"context_len": 10**9}, r"context_len=1000000000 is invalid: .*iB"),
    ],
)
def test_every_bad_value_names_the_parameter_and_the_valid_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PriorityGraphSpec(**kwargs)


def test_paper_rejection_failure_is_a_named_error():
    with pytest.raises(ValueError, match="max_tries=5 draws"):  # 40 samples over 4 tokens:
        PriorityGraphTask(  # some graph has a cycle in every draw of this seed
            mode="paper", n=40, context_len=4, num_tokens=4, d=4, cyclic=False, max_tries=5
        )


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    spec = PriorityGraphSpec(
        num_tokens=np.int64(6),
        context_len=np.int32(4),
        s_max=np.int64(2),
        sigma_beta=np.float32(0.5),
        distinct=np.bool_(True),
        instance_seed=np.uint8(3),
    )
    assert spec == PriorityGraphSpec(
        num_tokens=6, context_len=4, s_max=2, sigma_beta=0.5, distinct=True, instance_seed=3
    )
    assert type(spec.num_tokens) is int and type(spec.distinct) is bool
    assert type(spec.sigma_beta) is float
    assert TASK_FAMILIES["priority_graph"] is PriorityGraphTask


# ------------------------------------------------------------------ planted instance
@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 12),
    s_frac=st.floats(0, 1),
    sigma=st.sampled_from([0.0, 0.3, 1.0, 3.0]),
    seed=st.integers(0, 2**31),
)
def test_levels_are_blocks_of_a_permutation_with_sizes_at_most_s_max(k, s_frac, sigma, seed):
    s_max = 1 + int(s_frac * (k - 1))
    spec = PriorityGraphSpec(num_tokens=k, s_max=s_max, sigma_beta=sigma, instance_seed=seed)
    level, beta = planted_instance(spec)
    assert level.shape == beta.shape == (k, k) and level.dtype == np.int64
    for q in range(k):
        sizes = np.bincount(level[q])
        assert (sizes >= 1).all() and (sizes <= s_max).all()  # contiguous levels 0 .. L - 1
    base_level, base_beta = planted_instance(
        PriorityGraphSpec(num_tokens=k, s_max=s_max, sigma_beta=1.0, instance_seed=seed)
    )
    np.testing.assert_array_equal(level, base_level)  # levels do not depend on sigma_beta
    np.testing.assert_allclose(beta, sigma * base_beta, rtol=0, atol=0)


def test_instance_is_a_function_of_the_instance_seed_only():
    a = PriorityGraphTask(instance_seed=5)
    b = PriorityGraphTask(instance_seed=5, context_len=20, distinct=False)
    c = PriorityGraphTask(instance_seed=6)
    np.testing.assert_array_equal(a.level, b.level)
    np.testing.assert_array_equal(a.beta, b.beta)
    assert not np.array_equal(a.beta, c.beta)
    assert not a.level.flags.writeable and not a.beta.flags.writeable
    np.testing.assert_array_equal(a.num_levels, a.level.max(1) + 1)


def test_block_sizes_are_uniform_on_1_to_s_max():
    """The first block of each permutation has size ~ U{1 .. s_max} (never truncated when
    s_max <= K): pooled over 400 instances, each size within 5 standard errors of 1/s_max."""
    s_max, k = 3, 8
    firsts = []
    for seed in range(400):
        level, _ = planted_instance(
            PriorityGraphSpec(num_tokens=k, s_max=s_max, instance_seed=seed)
        )
        firsts.extend(np.bincount(level[q])[0] for q in range(k))
    freq = np.bincount(firsts, minlength=s_max + 1)[1:] / len(firsts)
    se = math.sqrt((1 / s_max) * (1 - 1 / s_max) / len(firsts))
    assert np.abs(freq - 1 / s_max).max() < 5 * se, freq


# --------------------------------------------------------------------------- oracle C
@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(2, 9),
    t=st.integers(1, 10),
    s_max=st.integers(1, 9),
    sigma=st.sampled_from([0.0, 0.5, 2.0]),
    distinct=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_oracle_c_matches_a_plain_reference(k, t, s_max, sigma, distinct, seed):
    s_max = min(s_max, k)
    t = min(t, k) if distinct else t
    task = PriorityGraphTask(
        num_tokens=k,
        context_len=t,
        s_max=s_max,
        sigma_beta=sigma,
        distinct=distinct,
        instance_seed=seed,
    )
    batch = draw(task, 64, seed=seed)
    ref, ref_top = reference_law(batch.tokens, task.level, task.beta)
    np.testing.assert_allclose(batch.params["oracle_probs"].numpy(), ref, atol=1e-12)
    np.testing.assert_array_equal(batch.params["top_mask"].numpy(), ref_top)
    np.testing.assert_allclose(task.bayes_probs(batch.tokens).numpy(), ref, atol=1e-12)
    oracle = task.oracle(batch)[:, -1].double().exp().numpy()
    np.testing.assert_allclose(oracle, np.maximum(ref, LOG_FLOOR), rtol=1e-5, atol=1e-7)
    y = batch.targets[:, -1].numpy()
    assert (ref[np.arange(64), y] > 0).all()  # every label is in S*
    assert (ref_top <= np.eye(k, dtype=bool)[batch.tokens.numpy()].any(1)).all()  # S* within X


def test_multiplicity_weighting_on_a_hand_built_context():
    """Multiplicities count: p(j) ∝ n_X(j) exp(beta[k, j]) on S*."""
    level = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0]])  # query 2 ranks token 0 above
    beta = torch.zeros(3, 3, dtype=torch.float64)
    beta[1, 0] = math.log(0.5)
    tokens = torch.tensor([[0, 0, 1], [2, 2, 1], [1, 0, 2], [1, 1, 2]])
    probs, top = planted_law(tokens, level, beta)
    expected = [
        [0.5, 0.5, 0.0],  # query 1, one level: (2 * 0.5, 1 * 1)
        [0.0, 1 / 3, 2 / 3],  # counts 1 and 2, beta 0
        [1.0, 0.0, 0.0],  # query 2: token 0 alone on the top level
        [0.0, 2 / 3, 1 / 3],  # token 0 absent: counts over {1, 2}
    ]
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-12)
    assert top.tolist() == [
        [True, True, False],
        [False, True, True],
        [True, False, False],
        [False, True, True],
    ]
    assert (probs[~top] == 0).all()


def test_an_extreme_beta_spread_is_composed_in_log_space():
    """exp(beta - max beta) underflows for a spread beyond ~745 nats: S* = {0, 1} whose betas
    are 900 below token 2's still gets the law (1/3, 2/3) from the multiplicities."""
    level = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 0]])
    beta = torch.zeros(3, 3, dtype=torch.float64)
    beta[2] = torch.tensor([-800.0, -800.0, 100.0])
    probs, top = planted_law(torch.tensor([[0, 1, 1, 2], [2, 2, 2, 2]]), level, beta)
    np.testing.assert_allclose(probs.numpy(), [[1 / 3, 2 / 3, 0.0], [0.0, 0.0, 1.0]], atol=1e-12)
    assert top.tolist() == [[True, True, False], [False, False, True]]


def test_s_max_1_is_acyclic_pure_hard_retrieval():
    task = PriorityGraphTask(num_tokens=8, context_len=6, s_max=1)
    assert (np.sort(task.level, 1) == np.arange(8)).all()  # every token its own level
    batch = draw(task, 4096)
    assert (batch.params["top_mask"].sum(1) == 1).all()
    probs = batch.params["oracle_probs"]
    assert ((probs == 0) | (probs == 1)).all()
    assert torch.equal(batch.targets[:, -1], probs.argmax(1))
    tpg = EmpiricalTPG.fit(batch.tokens.numpy(), batch.targets[:, -1].numpy(), 8)
    assert not tpg.has_cycle  # the planted order is a total order per query


def test_a_single_block_is_pure_soft_composition():
    """K = 2, s_max = 2: a seed whose two queries have one block each; S* is every present
    token and p ∝ n_X(j) exp(beta[k, j])."""
    seed = next(
        s
        for s in range(200)
        if (PriorityGraphTask(num_tokens=2, s_max=2, instance_seed=s).num_levels == 1).all()
    )
    task = PriorityGraphTask(num_tokens=2, context_len=5, s_max=2, instance_seed=seed)
    batch = draw(task, 512)
    present = torch.nn.functional.one_hot(batch.tokens, 2).sum(1)
    assert torch.equal(batch.params["top_mask"], present > 0)
    beta = torch.tensor(task.beta)[batch.tokens[:, -1]]
    soft = present * beta.exp()
    np.testing.assert_allclose(
        batch.params["oracle_probs"].numpy(), (soft / soft.sum(1, keepdim=True)).numpy(), 1e-12
    )


def test_sigma_beta_0_is_count_weighted_uniform_over_s_star():
    task = PriorityGraphTask(sigma_beta=0.0, context_len=10)
    assert (task.beta == 0).all()
    batch = draw(task, 2048)
    counts = torch.nn.functional.one_hot(batch.tokens, 8).sum(1).double()
    top = batch.params["top_mask"]
    expected = torch.where(top, counts, 0.0)
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(batch.params["oracle_probs"], expected, rtol=0, atol=1e-12)
    hard = task.strategies["hard_retrieval"](batch)
    torch.testing.assert_close(hard, task.oracle(batch), rtol=0, atol=0)


# ------------------------------------------------------------------- sampler vs law
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"distinct": True}, {"num_tokens": 5, "context_len": 12, "s_max": 5, "sigma_beta": 2.0}],
)
def test_sampled_labels_follow_oracle_c(kwargs):
    """Per token j, the count of labels j against sum_i p_i(j) (variance sum_i p_i(1 - p_i)),
    and the same for 'label = argmax p', within 5 standard errors over 200k rows."""
    task = PriorityGraphTask(**kwargs)
    batch = draw(task, 200_000, seed=11)
    p = batch.params["oracle_probs"]
    y = batch.targets[:, -1]
    k = task.vocab_size
    observed = torch.bincount(y, minlength=k).double()
    expected = p.sum(0)
    se = (p * (1 - p)).sum(0).sqrt()
    z = ((observed - expected) / se.clamp_min(1e-9)).abs()
    assert (z[expected > 0] < 5).all(), z
    assert (observed[expected == 0] == 0).all()
    rows = torch.arange(y.numel())
    best = first_argmax(p)
    hit = p[rows, best]
    z_best = ((y == best).double().sum() - hit.sum()) / (hit * (1 - hit)).sum().sqrt()
    assert abs(z_best.item()) < 5
    assert batch.params["top_mask"][rows, y].all()


@pytest.mark.parametrize("distinct", [False, True])
def test_context_tokens_are_uniform_and_distinct_mode_has_no_repeats(distinct):
    task = PriorityGraphTask(num_tokens=6, context_len=5 if distinct else 9, distinct=distinct)
    batch = draw(task, 60_000, seed=2)
    x = batch.tokens
    sorted_x = x.sort(1).values
    repeats = (sorted_x[:, 1:] == sorted_x[:, :-1]).any(1)
    if distinct:
        assert not repeats.any()
    else:  # 9 tokens over 6 ids always repeat
        assert repeats.all()
    for col in range(x.shape[1]):  # each position uniform over the 6 ids
        freq = torch.bincount(x[:, col], minlength=6).double() / x.shape[0]
        assert (freq - 1 / 6).abs().max() < 5 * math.sqrt(5 / 36 / x.shape[0])
    law = batch.true_probs
    torch.testing.assert_close(law.sum(-1), torch.ones(law.shape[:2]))
    nxt = law[:, :-1].gather(2, batch.targets[:, :-1, None])
    assert (nxt > 0).all()  # every drawn next token had positive probability
    if distinct:
        assert torch.allclose(law[:, 0].max(1).values, torch.tensor(1 / 5))


def test_deterministic_labels_are_the_argmax_with_the_smallest_id_on_ties():
    soft = PriorityGraphTask(sigma_beta=0.0, context_len=4)
    hard = PriorityGraphTask(sigma_beta=0.0, context_len=4, deterministic=True)
    a, b = draw(soft, 4096, seed=3), draw(hard, 4096, seed=3)
    assert torch.equal(a.tokens, b.tokens)  # the label word is read in both modes
    p = a.params["oracle_probs"]
    ties = (p == p.max(1, keepdim=True).values).sum(1) >= 2
    assert ties.sum() > 100  # sigma_beta = 0 with equal counts: many ties
    smallest = torch.where(p == p.max(1, keepdim=True).values, torch.arange(8), 8).amin(1)
    assert torch.equal(b.targets[:, -1], smallest)
    assert torch.equal(b.params["oracle_probs"].argmax(1), smallest)
    assert (b.params["oracle_probs"].sum(1) == 1).all()
    true, oracle = hard.online(b)(3)
    assert true.dtype == np.int64 and np.array_equal(true, smallest.numpy())
    assert np.array_equal(oracle, true)


def test_oracle_a_recovers_a_deterministic_planted_order():
    """Deterministic labels over distinct contexts: per query the label is the top of a total
    order (level, then beta), so the empirical TPG of the 2000 training samples behind
    ``oracle_a`` ranks every test context like Oracle C, none ambiguous."""
    task = PriorityGraphTask(deterministic=True, distinct=True)
    batch = draw(task, 4096, "test")
    top, ambiguous = task.oracle_a_tpg.top_sets(batch.tokens.numpy())
    assert not ambiguous.any() and (top.sum(1) == 1).all()
    a = task.strategies["oracle_a"](batch)[:, -1].exp()
    assert torch.equal(a.argmax(1), batch.targets[:, -1])


def test_first_argmax_prefers_the_smallest_index():
    x = torch.tensor([[1.0, 3.0, 3.0], [-math.inf, -math.inf, 0.0], [2.0, 2.0, 2.0]])
    assert first_argmax(x).tolist() == [1, 2, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # K = 8: the top bits of each word
        {"num_tokens": 5, "context_len": 9},  # the multiply-shift
        {"num_tokens": 13, "context_len": 3, "sigma_beta": 3.0},
        {"deterministic": True},
        {"s_max": 1},
        {"sigma_beta": 0.0},
        {"num_tokens": 2, "context_len": 1},
    ],
)
def test_compiled_planted_draw_matches_the_torch_reference_bit_for_bit(kwargs):
    task = PriorityGraphTask(**kwargs)
    words = torch.empty(4000, task.seq_len + 1, dtype=torch.int64)
    words.random_(generator=task.generator(1))
    tab = task._tables(torch.device("cpu"))
    got = planted_draw(words, task.vocab_size, tab["level"], tab["beta"], task.spec.deterministic)
    for a, b in zip(got, task._planted_torch(words, tab), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_planted_draw_leaves_an_underflowing_beta_spread_to_torch():
    words = torch.zeros(2, 4, dtype=torch.int64)
    beta = torch.zeros(3, 3, dtype=torch.float64)
    beta[2] = torch.tensor([-800.0, -800.0, 100.0])
    assert planted_draw(words, 3, torch.zeros(3, 3, dtype=torch.int64), beta, False) is None
    task = PriorityGraphTask(sigma_beta=400.0, num_tokens=4, context_len=5)
    batch = draw(task, 64)  # the torch path: the law is still normalised
    torch.testing.assert_close(batch.params["oracle_probs"].sum(1), torch.ones(64).double())


@pytest.mark.parametrize("distinct", [False, True])
def test_largest_sigma_beta_keeps_beta_and_the_law_finite(distinct):
    """At sigma_beta = SIGMA_BETA_MAX every beta and every difference of two betas is finite
    (1.7e308 passed as finite and gave inf betas and NaN laws in 2.4% of the rows)."""
    for seed in range(20):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy's overflow RuntimeWarning
            task = PriorityGraphTask(
                num_tokens=5,
                context_len=5,
                sigma_beta=SIGMA_BETA_MAX,
                distinct=distinct,
                instance_seed=seed,
            )
        beta = task.beta
        assert np.isfinite(beta).all()
        assert np.isfinite(beta[:, :, None] - beta[:, None, :]).all()
        batch = draw(task, 1000, seed=seed)
        probs = batch.params["oracle_probs"]
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(1), torch.ones(1000, dtype=torch.float64))
        assert bool(batch.params["top_mask"].gather(1, batch.targets[:, -1:]).all())
        torch.testing.assert_close(task.bayes_probs(batch.tokens), probs)


# ------------------------------------------------------------------------- seeding
def test_seeds_splits_and_batch_composition():
    task = PriorityGraphTask()
    a, b = draw(task, 256, seed=4), draw(task, 256, seed=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    test = draw(task, 256, "test", seed=4)
    val = draw(task, 256, "validation", seed=4)
    assert (a.tokens != test.tokens).any(1).float().mean() > 0.9
    assert (val.tokens != test.tokens).any(1).float().mean() > 0.9
    assert task.sample_composes
    for kwargs in ({}, {"distinct": True}, {"mode": "paper"}):
        t = PriorityGraphTask(**kwargs)
        gen = t.generator(9)
        parts = [t.sample(n, generator=gen) for n in (3, 1, 12)]
        whole = t.sample(16, generator=t.generator(9))
        assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
        assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)


# ------------------------------------------------------------------------- metrics
def _hand_batch() -> Batch:
    """Two rows over K = 3: row 0 S* = {0, 1} with p_C = (0.75, 0.25, 0), y = 1; row 1 S* =
    {2}, p_C = e_2, y = 2."""
    tokens = torch.tensor([[0, 1, 2], [2, 0, 1]])
    targets = torch.tensor([[1, 2, 1], [0, 1, 2]])
    return Batch(
        tokens=tokens,
        targets=targets,
        loss_mask=torch.tensor([[False, False, True]] * 2),
        params={
            "top_mask": torch.tensor([[True, True, False], [False, False, True]]),
            "oracle_probs": torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64),
        },
        vocab_size=3,
        true_probs_fn=lambda b: None,
    )


def test_planted_metrics_on_a_hand_computed_example():
    batch = _hand_batch()
    q = torch.tensor([[0.2, 0.6, 0.2], [0.5, 0.0, 0.5]], dtype=torch.float64)
    m = planted_metrics(q.log(), batch)
    # argmax: row 0 -> 1 (= y, != oracle argmax 0, in S*); row 1 -> 0 (first of a tie; != y)
    assert m["acc_label"] == 0.5 and m["oracle_acc_label"] == 0.5
    assert m["acc_oracle"] == 0.0 and m["retrieval_acc"] == 0.5
    assert m["retrieval_mass"] == pytest.approx((0.8 + 0.5) / 2)
    assert m["multi_fraction"] == 0.5
    # row 0 renormalised on S*: (0.25, 0.75) vs (0.75, 0.25): TV 0.5
    assert m["composition_TV"] == pytest.approx(0.5)
    kl0 = 0.75 * math.log(0.75 / 0.2) + 0.25 * math.log(0.25 / 0.6)
    kl1 = math.log(1 / 0.5)
    assert m["kl"] == pytest.approx((kl0 + kl1) / 2)
    nll = (-math.log(0.6) - math.log(0.5)) / 2
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / 2
    assert m["nll"] == pytest.approx(nll) and m["oracle_entropy"] == pytest.approx(entropy)
    assert m["excess_nll"] == pytest.approx(nll - entropy)
    # logits are accepted (renormalised) and (B, T, K) is read at the last position
    full = torch.zeros(2, 3, 3, dtype=torch.float64)
    full[:, -1] = q.log() + 7.0
    assert planted_metrics(full, batch) == pytest.approx(m)


def test_planted_metrics_edge_cases_and_errors():
    batch = _hand_batch()
    zero_on_top = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]).log()
    m = planted_metrics(zero_on_top, batch)
    assert m["composition_TV"] == 1.0 and m["kl"] == math.inf and m["nll"] == math.inf
    single = PriorityGraphTask(s_max=1)
    b = draw(single, 64)
    assert math.isnan(planted_metrics(single.oracle(b), b)["composition_TV"])  # no |S*| >= 2
    with pytest.raises(ValueError, match=r"log_probs of shape \(2, 4\) are invalid"):
        planted_metrics(torch.zeros(2, 4), batch)
    with pytest.raises(ValueError, match="top_mask"):
        planted_metrics(torch.zeros(2, 3), Batch(**{**batch.__dict__, "params": {}}))
    for bad in (torch.full((2, 3), math.nan), torch.full((2, 3), -math.inf)):
        with pytest.raises(ValueError, match="log_probs are invalid in 2 of 2 rows"):
            planted_metrics(bad, batch)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_s_max_defaults_to_three_capped_at_the_vocabulary(k):
    """K = 2 works without naming s_max (the default 3 is capped at K); in paper mode
    s_max is unused and stays None unless given."""
    assert PriorityGraphTask(num_tokens=k).spec.s_max == min(3, k)
    env = gym.make("ICL-PriorityGraph-v0", num_tokens=k)
    env.reset(seed=0)
    assert env.unwrapped.task.spec.s_max == min(3, k)
    paper = PriorityGraphSpec(mode="paper", num_tokens=2, context_len=2, d=2)
    assert paper.s_max is None


def test_oracle_metrics_are_perfect_and_strategies_are_ordered():
    task = PriorityGraphTask()
    batch = draw(task, 20_000, "test", seed=1)
    m = planted_metrics(task.oracle(batch), batch)
    assert m["acc_oracle"] == 1.0 and m["retrieval_mass"] == pytest.approx(1.0)
    assert m["retrieval_acc"] == 1.0 and m["kl"] == pytest.approx(0.0, abs=1e-9)
    assert m["composition_TV"] == pytest.approx(0.0, abs=1e-6)
    assert m["acc_label"] == m["oracle_acc_label"]
    assert abs(m["excess_nll"]) < 0.02  # mean of nll - H over 20k rows: SE ~ 0.004
    kls = {name: planted_metrics(s(batch), batch)["kl"] for name, s in task.strategies.items()}
    assert kls["hard_retrieval"] < kls["unigram"] < kls["uniform"] < kls["copy_last"]
    assert kls["oracle_a"] < kls["unigram"]
    unigram = task.strategies["unigram"](batch)[:, -1].exp()
    counts = torch.nn.functional.one_hot(batch.tokens, 8).sum(1) / 6
    torch.testing.assert_close(unigram, counts.float().clamp_min(LOG_FLOOR))
    copy = task.strategies["copy_last"](batch)[:, -1].exp()
    assert torch.equal(copy.argmax(1), batch.tokens[:, -1]) and (copy.max(1).values == 1).all()


def test_no_strategy_or_perturbed_oracle_beats_oracle_c_beyond_three_standard_errors():
    for kwargs in ({}, {"distinct": True}, {"deterministic": True, "sigma_beta": 0.5}):
        task = PriorityGraphTask(**kwargs)
        oracle = evaluate(OraclePredictor(task), task, num_sequences=4096, seed=1)
        assert oracle.excess_loss == pytest.approx(0, abs=1e-6)
        for name in task.strategies:
            report = evaluate(StrategyPredictor(task, name), task, num_sequences=4096, seed=1)
            assert report.excess_loss >= -3 * report.excess_loss_se, (kwargs, name)

        class Perturbed:
            name = "perturbed oracle"

            def __init__(self, task):
                self.task = task

            def predict(self, batch):
                logp = self.task.oracle(batch)
                noise = torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))
                return torch.log_softmax(logp + 0.3 * noise, -1)

        report = evaluate(Perturbed(task), task, num_sequences=4096, seed=1)
        assert report.excess_loss >= -3 * report.excess_loss_se


# ------------------------------------------------------------------------ paper mode
def test_paper_mode_draws_the_fixed_dataset_and_its_label_law():
    task = PriorityGraphTask(mode="paper", n=6, context_len=4, num_tokens=6, d=8, instance_seed=2)
    data = paper_dataset(6, 4, 6, 8, "random", True, seed=2)
    np.testing.assert_array_equal(task.paper_data.contexts, data.contexts)
    np.testing.assert_array_equal(task.paper_data.labels, data.labels)
    batch = draw(task, 3000, seed=1)
    idx = batch.params["sample_index"].numpy()
    np.testing.assert_array_equal(batch.tokens.numpy(), data.contexts[idx])
    np.testing.assert_array_equal(batch.targets[:, -1].numpy(), data.labels[idx])
    freq = np.bincount(idx, minlength=6) / idx.size  # rows uniform over the n samples
    assert np.abs(freq - 1 / 6).max() < 5 * math.sqrt(5 / 36 / idx.size)
    law = task.bayes_probs(batch.tokens).numpy()
    for i in range(6):  # the label law among identical contexts, written plainly
        same = (data.contexts == data.contexts[i]).all(1)
        expected = np.bincount(data.labels[same], minlength=6) / same.sum()
        np.testing.assert_allclose(law[idx == i], np.broadcast_to(expected, law[idx == i].shape))
    tpg = EmpiricalTPG.fit(data.contexts, data.labels, 6)
    assert tpg.has_cycle
    top = batch.params["top_mask"].numpy()
    assert top[np.arange(3000), batch.targets[:, -1].numpy()].all()  # label in the top SCC
    test = draw(task, 3000, "test", seed=1)  # the same dataset through another stream
    assert not np.array_equal(test.params["sample_index"].numpy(), idx)
    assert set(test.params["sample_index"].tolist()) <= set(range(6))
    with pytest.raises(ValueError, match="not in the paper-mode dataset"):
        task.bayes_probs(torch.tensor([[5, 5, 5, 5]]))
    with pytest.raises(ValueError, match="no planted levels"):
        _ = task.level


def test_paper_mode_prefix_law_and_acyclic_oracle_a():
    task = PriorityGraphTask(mode="paper", n=4, context_len=6, num_tokens=8, cyclic=False)
    assert not EmpiricalTPG.fit(task.paper_data.contexts, task.paper_data.labels, 8).has_cycle
    batch = draw(task, 500)
    law = batch.true_probs
    torch.testing.assert_close(law.sum(-1), torch.ones(law.shape[:2]))
    assert (law[:, :-1].gather(2, batch.targets[:, :-1, None]) > 0).all()
    ctx = torch.tensor(task.paper_data.contexts)
    first = torch.bincount(ctx[:, 1][ctx[:, 0] == batch.tokens[0, 0]], minlength=8).double()
    torch.testing.assert_close(law[0, 0].double(), first / first.sum())
    # acyclic: hard retrieval alone fixes every training label (Li et al. 2024)
    a = task.strategies["oracle_a"](batch)[:, -1].exp()
    assert torch.equal(a.argmax(1), batch.targets[:, -1]) and (a.max(1).values == 1).all()
    m = planted_metrics(task.oracle(batch), batch)
    assert m["retrieval_mass"] == pytest.approx(1.0) and m["multi_fraction"] == 0.0


# ------------------------------------------------------------------------- the env
def test_env_id_defaults_and_info():
    task = make_task("ICL-PriorityGraph-v0")
    assert task.spec == PriorityGraphSpec()
    env = gym.make("ICL-PriorityGraph-v0")
    assert env.observation_space == gym.spaces.MultiDiscrete([9] * 7)
    assert env.action_space == gym.spaces.Discrete(8)
    obs, info = env.reset(seed=0)
    assert obs[-1] == 8 and (obs[:-1] < 8).all() and info["t"] == 5
    _, reward, terminated, truncated, info = env.step(int(obs[5]))
    assert terminated and not truncated
    assert reward == float(int(obs[5]) == info["label"])
    top = np.asarray(info["top_mask"], dtype=bool)
    assert top[info["label"]] and info["oracle_probs"][~top].sum() == 0
    assert info["oracle_pred"] == int(np.argmax(info["oracle_probs"]))
    assert info["query_token"] == obs[5]
    venv = gym.make_vec("ICL-PriorityGraph-v0", num_envs=4)
    venv.reset(seed=0)
    _, _, terminated, _, vinfo = venv.step(np.zeros(4, dtype=np.int64))
    assert terminated.all() and vinfo["top_mask"].shape == (4, 8)
    paper = gym.make("ICL-PriorityGraph-v0", mode="paper", context_len=4, num_tokens=6)
    paper.reset(seed=0)
    _, _, _, _, pinfo = paper.step(0)
    assert 0 <= pinfo["sample_index"] < 6


def test_paper_train_set_and_model_metrics_hook():
    from baselines.priority_attention import PriorityAttention

    task = PriorityGraphTask(mode="paper", n=6, context_len=4, num_tokens=6, instance_seed=1)
    data = task.paper_data
    train = task.train_set()
    np.testing.assert_array_equal(train.tokens.numpy(), data.contexts)
    np.testing.assert_array_equal(train.targets[:, -1].numpy(), data.labels)
    assert train.loss_mask[:, -1].all() and not train.loss_mask[:, :-1].any()
    rows = draw(task, 64)
    index = rows.params["sample_index"]
    for key in ("oracle_probs", "top_mask"):
        assert torch.equal(train.params[key][index], rows.params[key])
    torch.testing.assert_close(train.true_probs[index], rows.true_probs)
    with pytest.raises(ValueError, match="mode='planted' has no fixed training set"):
        PriorityGraphTask().train_set()
    model = PriorityAttention(data.embeddings).double()
    with torch.no_grad():
        model.W.weight.copy_(torch.from_numpy(3.0 * task.paper_theory.w_svm))
    metrics = task.model_metrics(model)
    assert metrics["corr_svm"] == pytest.approx(1.0)
    expected = task.paper_theory.metrics(3.0 * task.paper_theory.w_svm)
    del expected["norm_diff"]
    assert metrics == pytest.approx(expected)
    assert task.model_metrics(torch.nn.Linear(2, 2)) == {}
    assert PriorityGraphTask().model_metrics(model) == {}


def test_li2024_with_another_dataset_but_the_default_embeddings_is_refused(tmp_path):
    """--set instance_seed=3 without --model-arg embedding_seed=3: the model's E is not the
    dataset's, so the trainer refuses before the run folder exists (the theory's metrics are
    of the dataset's E); with the matching seed it trains."""
    from dataclasses import replace

    from iclgym.harness import RECIPES, RunOptions, build_model, train

    recipe = RECIPES["li2024"]
    task = PriorityGraphTask(**{**recipe.spec, "instance_seed": 3})
    config = replace(recipe.train, epochs=3, eval_every=0)
    quiet = RunOptions(out=str(tmp_path / "run"), progress=False, plot=False)
    wrong = build_model("baselines.priority_attention:make_model", task, **recipe.model_args)
    with pytest.raises(ValueError, match="embedding_seed = the task's instance_seed"):
        train(wrong, task, config, quiet)
    assert not (tmp_path / "run").exists()
    args = {**recipe.model_args, "embedding_seed": 3}
    right = build_model("baselines.priority_attention:make_model", task, **args)
    summary = train(right, task, config, quiet)
    assert "corr_svm" in summary["final"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"deterministic": True},
        {"distinct": True, "action": "distribution"},
        {"context_len": 1, "observation": "window", "action": "logits"},
        {"num_tokens": 32, "context_len": 16, "s_max": 8, "observation": "token"},
        {"mode": "paper", "context_len": 4, "num_tokens": 6},
        {"mode": "paper", "n": 4, "context_len": 10, "num_tokens": 6, "cyclic": False},
    ],
)
def test_variants_pass_both_checkers_the_passive_checker_and_sb3(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make("ICL-PriorityGraph-v0", **kwargs)  # wrapped in the passive checker
        check_env(env.unwrapped)
        if kwargs.get("action") != "distribution":  # SB3 wants Box actions in [-1, 1]
            sb3_check_env(env.unwrapped)
        env.reset(seed=1)
        for _ in range(20):
            _, reward, terminated, _, info = env.step(env.action_space.sample())
            assert terminated and np.isfinite(reward) and "label" in info
            env.reset()
    venv = make_vec_env("ICL-PriorityGraph-v0", n_envs=2, seed=0, env_kwargs=kwargs)
    venv.reset()
    _, rewards, _, infos = venv.step(np.array([venv.action_space.sample() for _ in range(2)]))
    assert np.isfinite(rewards).all() and all("top_mask" in i for i in infos)
