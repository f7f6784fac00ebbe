"""Sparse contextual bigrams: spec validation, task parameters, sampler law and fast path vs a
plain reference, oracle and closed forms vs Monte Carlo, transfer pairs, the oracle ladder,
and the env id (``docs/envs/ICL-SparseContextualBigram-v0.md``)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from iclgym.harness import OraclePredictor, StrategyPredictor, evaluate
from iclgym.registry import make_task
from iclgym.tasks import TASK_FAMILIES, make_family_task
from iclgym.tasks.markov import inverse_cdf_thresholds
from iclgym.tasks.sparse_bigram import (
    SparseContextualBigramSpec,
    SparseContextualBigramTask,
    make_transfer_pair,
    project_simplex,
    stationary_law,
    transition_correlation,
)
from iclgym.tasks.sparse_bigram_ladder import (
    em,
    kernel_attention,
    moment_transition,
    oracle_ladder,
)

SMALL = {"vocab_size": 4, "seq_len": 6, "n_support": 2}


def draw(task, n, split="train", seed=0):
    return task.sample(n, generator=task.generator(seed, split))


def linear_output(v, a, tokens):
    """Plain reference of f(X) = sum_t A[t, k] V[:, x_t], one sequence at a time."""
    out = np.zeros((tokens.shape[0], v.shape[0]))
    for i, row in enumerate(tokens.tolist()):
        k = row[-1]
        for t, x in enumerate(row[:-1]):
            out[i] += a[t, k] * v[:, x]
    return out


# ------------------------------------------------------------------------ validation
CUSTOM_P = ((0.5, 0.5), (0.5, 0.5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 1}, r"vocab_size=1 is invalid: expected an int >= 2"),
        ({"vocab_size": True}, r"vocab_size=True is invalid"),
        ({"vocab_size": 8.0}, r"vocab_size=8.0 is invalid"),
        ({"seq_len": 0}, r"seq_len=0 is invalid: expected an int >= 1"),
        ({"n_support": 0}, r"n_support=0 is invalid: expected an int in \[1, 128\]"),
        ({"seq_len": 4, "n_support": 5}, r"n_support=5 is invalid: expected an int in \[1, 4\]"),
        ({"p_family": "birkhoff"}, r"p_family='birkhoff' is invalid: expected one of"),
        ({"n_perms": 0}, r"n_perms=0 is invalid: expected an int >= 1"),
        ({"p_floor": 1.0}, r"p_floor=1.0 is invalid: expected a finite float in \[0, 1\)"),
        ({"p_floor": -0.1}, r"p_floor=-0.1 is invalid"),
        ({"p_floor": math.nan}, r"p_floor=nan is invalid"),
        ({"p_alpha": 0.0}, r"p_alpha=0.0 is invalid: expected a finite float in \(0, inf\)"),
        ({"p_alpha": -1}, r"p_alpha=-1 is invalid"),
        ({"q_weights": "zipf"}, r"q_weights='zipf' is invalid: expected one of"),
        ({"q_alpha": 0}, r"q_alpha=0 is invalid"),
        ({"q_floor": 1.5}, r"q_floor=1.5 is invalid: expected a finite float in \[0, 1\]"),
        ({"q_weights": "dirichlet", "q_floor": 0.0}, r"q_floor=0.0 is invalid: .*\(0, 1\]"),
        ({"task_seed": -1}, r"task_seed=-1 is invalid: expected an int >= 0"),
        ({"p_family": "custom"}, r"transition=None is invalid: expected an NxN matrix"),
        (  # the floor was accepted and silently unused with a custom P
            {"vocab_size": 2, "p_family": "custom", "p_floor": 0.2, "transition": CUSTOM_P},
            r"p_floor=0.2 is invalid: expected 0.0 with p_family='custom'",
        ),
        ({"vocab_size": 2, "transition": CUSTOM_P}, r"transition=.* expected None with"),
        (
            {"vocab_size": 3, "p_family": "custom", "transition": CUSTOM_P},
            r"transition=.* expected a finite 3x3 array",
        ),
        (
            {"vocab_size": 2, "p_family": "custom", "transition": ((1.2, 0.5), (-0.2, 0.5))},
            r"transition=.* expected non-negative entries",
        ),
        (
            {"vocab_size": 2, "p_family": "custom", "transition": ((0.5, 0.5), (0.4, 0.5))},
            r"transition=.* columns summing to 1 within 1e-06 \(column-stochastic",
        ),
        (
            {"vocab_size": 2, "p_family": "custom", "transition": ((1.0, 0.0), (0.0, 1.0))},
            r"transition=.* an irreducible chain",
        ),
        (
            {"vocab_size": 2, "p_family": "custom", "transition": ((0.5, 0.5), (0.5, math.nan))},
            r"transition=.* finite",
        ),
        ({**SMALL, "attn": np.full((5, 4), 0.2)}, r"attn=.* expected a finite 6x4 array"),
        ({**SMALL, "attn": np.full((6, 4), -1 / 6)}, r"attn=.* non-negative entries"),
        ({**SMALL, "attn": np.full((6, 4), 0.1)}, r"attn=.* columns summing to 1"),
        (
            {**SMALL, "attn": np.vstack([np.full((3, 4), 1 / 3), np.zeros((3, 4))])},
            r"attn=.* at most n_support=2 non-zeros per column \(column 0 has 3\)",
        ),
        ({"vocab_size": 10**6}, r"vocab_size=1000000 is invalid: .* would take .*iB"),
        ({"vocab_size": 64, "seq_len": 10**8}, r"seq_len=100000000 is invalid: .*iB"),
    ],
)
def test_every_bad_value_names_the_parameter_and_the_valid_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseContextualBigramSpec(**kwargs)


def test_reducible_dirichlet_draw_is_refused_naming_the_seed():
    match = r"task_seed=0 is invalid: .*irreducible.*raise p_alpha or set p_floor"
    with pytest.raises(ValueError, match=match):
        SparseContextualBigramTask(p_family="dirichlet", p_alpha=1e-4, vocab_size=8)


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    spec = SparseContextualBigramSpec(
        vocab_size=np.int64(8),
        seq_len=np.int32(16),
        n_support=np.uint8(3),
        n_perms=np.int16(2),
        p_floor=np.float32(0.25),
        task_seed=np.int64(4),
    )
    plain = SparseContextualBigramSpec(
        vocab_size=8, seq_len=16, n_support=3, n_perms=2, p_floor=0.25, task_seed=4
    )
    assert spec == plain
    assert all(type(getattr(spec, k)) is int for k in ("vocab_size", "seq_len", "n_support"))
    np.testing.assert_array_equal(
        SparseContextualBigramTask(spec).transition, SparseContextualBigramTask(plain).transition
    )


def test_family_is_registered_and_the_registry_builds_it():
    assert TASK_FAMILIES["sparse_contextual_bigram"] is SparseContextualBigramTask
    task = make_task("ICL-SparseContextualBigram-v0", seq_len=32, task_seed=3)
    assert isinstance(task, SparseContextualBigramTask)
    assert (task.vocab_size, task.seq_len, task.first_scored_position) == (8, 33, 32)
    with pytest.raises(ValueError, match="spec key 'num_states' is invalid"):
        make_task("ICL-SparseContextualBigram-v0", num_states=3)


# ------------------------------------------------------------------ compiled kernels
@pytest.mark.parametrize(
    "kwargs",
    [
        {"vocab_size": 8, "seq_len": 128, "n_support": 2},  # the top bits of each word
        {"vocab_size": 6, "seq_len": 10, "n_support": 1},  # the multiply-shift
        {"vocab_size": 5, "seq_len": 20, "n_support": 3, "p_family": "dirichlet"},  # mu's CDF
        {"vocab_size": 3, "seq_len": 7, "n_support": 4, "q_weights": "dirichlet"},
    ],
)
def test_compiled_draw_and_laws_match_the_torch_and_numpy_reference(kwargs):
    """The CPU sampler's kernel against its torch reference, and the online laws' kernel
    against the float32 numpy computation it replaced, bit for bit."""
    task = SparseContextualBigramTask(**kwargs)
    words = torch.empty(3000, task.spec.seq_len + 3, dtype=torch.int64)
    words.random_(generator=task.generator(1))
    tab = task._tables(torch.device("cpu"))
    for a, b in zip(task._draw(words, tab), task._draw_torch(words, tab), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    batch = task.sample(3000, generator=task.generator(2))
    true, oracle = task.online(batch)(task.spec.seq_len)
    tokens, src = batch.tokens.numpy(), batch.params["src_pos"].numpy()
    columns, k = task._columns32, tokens[:, -1]
    sources = np.take_along_axis(tokens, task.support[k], 1)
    w = task._weights32[k]
    want = w[:, 0, None] * columns[sources[:, 0]]
    for j in range(1, sources.shape[1]):
        want += w[:, j, None] * columns[sources[:, j]]
    np.testing.assert_array_equal(true, columns[tokens[np.arange(len(src)), src]])
    np.testing.assert_array_equal(oracle, want)


# ------------------------------------------------------------------ task parameters
@pytest.mark.parametrize("family", ["perm_mixture", "dirichlet"])
def test_task_parameters_are_a_function_of_task_seed_only(family):
    a = SparseContextualBigramTask(p_family=family, task_seed=5)
    b = make_family_task("sparse_contextual_bigram", p_family=family, task_seed=5)
    c = SparseContextualBigramTask(p_family=family, task_seed=6)
    np.testing.assert_array_equal(a.transition, b.transition)
    np.testing.assert_array_equal(a.attn, b.attn)
    assert not np.array_equal(a.transition, c.transition)
    assert not np.array_equal(a.attn, c.attn)
    # P and attn come from separate streams: the weights of q do not move P
    d = SparseContextualBigramTask(p_family=family, task_seed=5, q_weights="dirichlet")
    np.testing.assert_array_equal(a.transition, d.transition)
    for arr in (a.transition, a.attn, a.stationary, a.support):
        assert not arr.flags.writeable


def test_perm_mixture_is_a_doubly_stochastic_mixture_of_permutations():
    task = SparseContextualBigramTask(vocab_size=6, n_perms=3, task_seed=2)
    p = task.transition
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    assert ((p > 0).sum(0) <= 3).all()
    np.testing.assert_array_equal(task.stationary, np.full(6, 1 / 6))
    floored = SparseContextualBigramTask(vocab_size=6, n_perms=3, task_seed=2, p_floor=0.3)
    np.testing.assert_allclose(floored.transition, 0.7 * p + 0.3 / 6, atol=1e-12)


def test_dirichlet_family_has_the_stationary_law_of_its_columns():
    task = SparseContextualBigramTask(p_family="dirichlet", p_alpha=0.5, task_seed=1)
    p, mu = task.transition, task.stationary
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(p @ mu, mu, atol=1e-12)
    assert (mu > 0).all() and mu.sum() == pytest.approx(1.0)


def test_attention_supports_and_weights_follow_the_spec():
    uniform = SparseContextualBigramTask(vocab_size=8, seq_len=20, n_support=3, task_seed=0)
    a = uniform.attn
    assert a.shape == (20, 8)
    np.testing.assert_allclose(a.sum(0), 1.0)
    assert ((a > 0).sum(0) == 3).all() and set(np.unique(a).round(12)) == {0.0, round(1 / 3, 12)}
    for k in range(8):
        assert sorted(uniform.support[k].tolist()) == np.flatnonzero(a[:, k]).tolist()
    floor = 0.4
    dirichlet = SparseContextualBigramTask(
        vocab_size=8, seq_len=20, n_support=3, q_weights="dirichlet", q_floor=floor
    )
    w = dirichlet.attn[dirichlet.attn > 0]
    assert w.size == 24 and (w >= floor / 3 - 1e-12).all() and not np.allclose(w, 1 / 3)


def test_supports_are_uniform_subsets_of_the_positions():
    """Over many task seeds every position is in a support about Q / T of the time."""
    t, q = 8, 2
    counts = np.zeros(t)
    for seed in range(150):
        counts += (
            SparseContextualBigramTask(vocab_size=4, seq_len=t, n_support=q, task_seed=seed)
            .attn.astype(bool)
            .sum(1)
        )
    draws = 150 * 4
    p = q / t
    z = (counts - draws * p) / math.sqrt(draws * p * (1 - p))
    assert np.abs(z).max() < 4.5


def test_custom_transition_and_attn_are_used_and_renormalised():
    p = np.array([[0.2, 0.5, 0.3], [0.3, 0.5, 0.3], [0.5, 0.0, 0.4]])
    attn = np.zeros((4, 3))
    attn[[0, 3], 0] = 0.5
    attn[1, 1] = 1.0
    attn[[1, 2], 2] = (0.25, 0.75)
    task = SparseContextualBigramTask(
        vocab_size=3, seq_len=4, n_support=2, p_family="custom", transition=p, attn=attn
    )
    np.testing.assert_allclose(task.transition, p)
    np.testing.assert_allclose(task.attn, attn)
    np.testing.assert_allclose(task.stationary, stationary_law(p))
    np.testing.assert_allclose(p @ task.stationary, task.stationary, atol=1e-12)
    # column 1 has one non-zero: its support is padded with a position of weight 0
    assert task.support[1, 0] == 1 and task.support[1, 1] != 1
    batch = draw(task, 20000)
    src, k = batch.params["src_pos"], batch.tokens[:, -1]
    assert (src[k == 1] == 1).all()


# -------------------------------------------------------------------------- sampler
def reference_sample(task, batch_size, generator):
    """The sampler written plainly: the same T + 3 words per row, read one by one with the
    inverse CDF of the documented sampling order."""
    t, n = task.context_len, task.vocab_size
    words = torch.empty((batch_size, t + 3), dtype=torch.int64).random_(generator=generator)
    u = (((words >> 10) + 1).double() * 2.0**-53).tolist()
    bits = (words >> 10).tolist()  # 53-bit integers
    mu_thr = inverse_cdf_thresholds(torch.tensor(task.stationary)).tolist()

    def inverse(thresholds, x):
        return sum(x > c for c in thresholds)

    tokens, targets, sources = [], [], []
    for row, ints in zip(u, bits, strict=True):
        if np.allclose(task.stationary, 1 / n):  # floor(U N), U = ints / 2**53 in [0, 1)
            x = [(b * n) >> 53 for b in ints[: t + 1]]
        else:
            x = [inverse(mu_thr, v) for v in row[: t + 1]]
        k = x[-1]
        weights = [task.attn[s, k] for s in task.support[k]]
        w_thr = inverse_cdf_thresholds(torch.tensor(weights)).tolist()
        s = int(task.support[k][inverse(w_thr, row[t + 1])])
        p_thr = inverse_cdf_thresholds(torch.tensor(task.transition[:, x[s]])).tolist()
        tokens.append(x)
        targets.append(inverse(p_thr, row[t + 2]))
        sources.append(s)
    return torch.tensor(tokens), torch.tensor(targets), torch.tensor(sources)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"p_family": "dirichlet", "q_weights": "dirichlet", "n_support": 3},
        {"n_support": 1},
        {"vocab_size": 5},
    ],
)
def test_fast_sampler_equals_the_plain_reference(kwargs):
    task = SparseContextualBigramTask(**{**SMALL, "seq_len": 7, **kwargs})
    batch = draw(task, 300, seed=4)
    tokens, target, src = reference_sample(task, 300, task.generator(4))
    torch.testing.assert_close(batch.tokens, tokens)
    torch.testing.assert_close(batch.targets[:, -1], target)
    torch.testing.assert_close(batch.params["src_pos"], src)
    torch.testing.assert_close(batch.targets[:, :-1], batch.tokens[:, 1:])
    assert batch.loss_mask[:, -1].all() and not batch.loss_mask[:, :-1].any()


def test_sampled_law_matches_the_parameters():
    """Token frequencies ~ mu, source positions given k ~ q^(k), outputs given x_s ~ P[:, x_s],
    and the output marginal ~ mu, within 5 standard errors."""
    task = SparseContextualBigramTask(
        vocab_size=4, seq_len=5, n_support=3, p_family="dirichlet", q_weights="dirichlet"
    )
    n = 200_000
    batch = draw(task, n, seed=1)
    tokens, out, src = (
        batch.tokens.numpy(),
        batch.targets[:, -1].numpy(),
        batch.params["src_pos"].numpy(),
    )
    mu, p, attn = task.stationary, task.transition, task.attn

    def close(freq, law, count):
        se = np.sqrt(law * (1 - law) / count) + 1e-12
        assert (np.abs(freq - law) <= 5 * se + 1e-9).all(), (freq, law)

    close(np.bincount(tokens.ravel(), minlength=4) / tokens.size, mu, tokens.size)
    close(np.bincount(out, minlength=4) / n, mu, n)
    k = tokens[:, -1]
    source = tokens[np.arange(n), src]
    for j in range(4):
        rows = k == j
        close(np.bincount(src[rows], minlength=5) / rows.sum(), attn[:, j], rows.sum())
        rows = source == j
        close(np.bincount(out[rows], minlength=4) / rows.sum(), p[:, j], rows.sum())


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 12),
    st.integers(1, 10),
    st.integers(1, 4),
    st.sampled_from(["perm_mixture", "dirichlet"]),
    st.sampled_from(["uniform", "dirichlet"]),
    st.integers(0, 1000),
)
def test_every_draw_is_possible_under_the_parameters(n, t, q, family, weights, seed):
    """Any spec: tokens in [0, N), the source position in the support of q^(k) with positive
    weight, the output of positive probability under P[:, x_s], targets shifted tokens."""
    q = min(q, t)
    task = SparseContextualBigramTask(
        vocab_size=n, seq_len=t, n_support=q, p_family=family, q_weights=weights, task_seed=seed
    )
    batch = draw(task, 64, seed=seed)
    tokens, out = batch.tokens.numpy(), batch.targets[:, -1].numpy()
    src = batch.params["src_pos"].numpy()
    assert tokens.shape == (64, t + 1) and ((tokens >= 0) & (tokens < n)).all()
    rows = np.arange(64)
    assert (task.attn[src, tokens[:, -1]] > 0).all()
    assert (task.transition[out, tokens[rows, src]] > 0).all()
    np.testing.assert_array_equal(batch.targets[:, :-1].numpy(), tokens[:, 1:])


def test_draws_compose_across_batch_sizes_and_seeds_and_splits_differ():
    task = SparseContextualBigramTask(**SMALL)
    assert task.sample_composes
    gen = task.generator(3)
    parts = [task.sample(b, generator=gen) for b in (1, 7, 64)]
    whole = draw(task, 72, seed=3)
    torch.testing.assert_close(torch.cat([b.tokens for b in parts]), whole.tokens)
    torch.testing.assert_close(torch.cat([b.targets for b in parts]), whole.targets)
    again = draw(task, 72, seed=3)
    torch.testing.assert_close(again.params["src_pos"], whole.params["src_pos"])
    other = draw(task, 72, split="test", seed=3)
    assert not torch.equal(other.tokens, whole.tokens)


def test_batch_size_is_checked():
    task = SparseContextualBigramTask(**SMALL)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            task.sample(bad, generator=task.generator(0))


# ----------------------------------------------------------- laws, oracle, strategies
def test_true_probs_and_oracle_are_the_laws_of_the_spec():
    task = SparseContextualBigramTask(vocab_size=5, seq_len=9, n_support=3, p_family="dirichlet")
    batch = draw(task, 64)
    tokens = batch.tokens.numpy()
    true = batch.true_probs.numpy()
    np.testing.assert_allclose(
        true[:, :-1], np.broadcast_to(task.stationary, (64, 9, 5)), rtol=1e-6
    )
    source = tokens[np.arange(64), batch.params["src_pos"].numpy()]
    np.testing.assert_allclose(true[:, -1], task.transition[:, source].T, rtol=1e-6)
    bayes = linear_output(task.transition, task.attn, tokens)
    np.testing.assert_allclose(task.bayes_probs(batch.tokens).numpy(), bayes, atol=1e-12)
    oracle = task.oracle(batch).exp().numpy()
    np.testing.assert_allclose(oracle[:, -1], bayes, rtol=1e-5)
    np.testing.assert_allclose(oracle[:, 0], np.broadcast_to(task.stationary, (64, 5)), rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(B, 10\)"):
        task.bayes_probs(batch.tokens[:, 1:])


def test_online_laws_and_episode_info():
    task = SparseContextualBigramTask(**SMALL)
    batch = draw(task, 32)
    step = task.online(batch)
    true, oracle = step(6)
    np.testing.assert_allclose(true, batch.true_probs[:, -1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(oracle, task.bayes_probs(batch.tokens).numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="scores position 6 only"):
        step(5)
    info = task.episode_info(batch)
    np.testing.assert_array_equal(info["query_token"], batch.tokens[:, -1].numpy())
    np.testing.assert_array_equal(info["src_pos"], batch.params["src_pos"].numpy())


def test_strategies_are_the_linear_models_they_name():
    task = SparseContextualBigramTask(vocab_size=5, seq_len=9, n_support=2, p_family="dirichlet")
    batch = draw(task, 40)
    tokens = batch.tokens.numpy()
    assert list(task.strategies) == ["uniform", "unigram", "uniform_attention", "true"]
    for name in ("uniform", "unigram", "uniform_attention"):
        v, a = task.strategy_parameters(name)
        got = task.strategies[name](batch)[:, -1].exp().numpy()
        np.testing.assert_allclose(got, linear_output(v, a, tokens), rtol=1e-5)
    np.testing.assert_allclose(
        task.strategies["unigram"](batch)[:, -1].exp().numpy(),
        np.broadcast_to(task.stationary, (40, 5)),
        rtol=1e-5,
    )
    true = task.strategies["true"](batch)[:, -1].exp()
    torch.testing.assert_close(true, batch.true_probs[:, -1])
    with pytest.raises(ValueError, match="name='nope' is invalid"):
        task.strategy_parameters("nope")


# ------------------------------------------------------------------- closed forms
def monte_carlo(task, v, a, n=200_000, seed=0):
    """(mean, se) of ||P X q - V X a||^2 and of the Bayes squared error over n examples."""
    batch = draw(task, n, split="validation", seed=seed)
    p = task.bayes_probs(batch.tokens)
    f = torch.from_numpy(linear_output_fast(v, a, batch.tokens))
    gap = ((p - f) ** 2).sum(-1)
    onehot = torch.nn.functional.one_hot(batch.targets[:, -1], task.vocab_size).double()
    err = ((onehot - p) ** 2).sum(-1)
    return (gap.mean().item(), gap.std().item() / math.sqrt(n)), (
        err.mean().item(),
        err.std().item() / math.sqrt(n),
    )


def linear_output_fast(v, a, tokens):
    weights = torch.from_numpy(a).T[tokens[:, -1]]
    h = torch.zeros(tokens.shape[0], v.shape[0], dtype=torch.float64)
    h.scatter_add_(1, tokens[:, :-1], weights)
    return (h @ torch.from_numpy(v).T).numpy()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vocab_size": 8, "seq_len": 128},
        {"vocab_size": 5, "seq_len": 12, "n_support": 3, "p_family": "dirichlet"},
    ],
)
def test_closed_forms_match_monte_carlo(kwargs):
    """Reproduction C (``docs/results/sparse-contextual-bigram.md``): the Bayes MSE and the excess
    of a random linear model against 200k Monte-Carlo examples, within 4 standard errors; the
    always-mu predictor's MSE is 1 - ||mu||^2."""
    task = SparseContextualBigramTask(**kwargs)
    rng = np.random.default_rng(0)
    n, t = task.vocab_size, task.context_len
    v = rng.dirichlet(np.ones(n), size=n).T
    a = rng.dirichlet(np.ones(t), size=n).T
    (gap, gap_se), (bayes, bayes_se) = monte_carlo(task, v, a)
    assert abs(task.population_excess_mse(v, a) - gap) <= 4 * gap_se
    assert abs(task.bayes_mse - bayes) <= 4 * bayes_se
    mu = task.stationary
    unigram = task.population_mse(*task.strategy_parameters("unigram"))
    assert unigram == pytest.approx(1 - mu @ mu, abs=1e-12)
    assert task.population_excess_mse(task.transition, task.attn) == pytest.approx(0, abs=1e-12)
    assert task.initial_excess == pytest.approx(unigram - task.bayes_mse, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.1, 3.0))
def test_excess_is_a_nonnegative_quadratic_zero_at_the_truth(seed, scale):
    task = SparseContextualBigramTask(vocab_size=4, seq_len=5, n_support=2, p_family="dirichlet")
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(4, 4)) * scale
    a = rng.normal(size=(5, 4))
    e = task.population_excess_mse(v, a)
    assert e >= 0
    # a quadratic form in (V - P, A - attn) jointly with the cross terms: check the scaling of
    # the pure V-deviation (A at the truth): excess(P + c D, attn) = c^2 excess(P + D, attn)
    d = v
    one = task.population_excess_mse(task.transition + d, task.attn)
    two = task.population_excess_mse(task.transition + 2 * d, task.attn)
    assert two == pytest.approx(4 * one, rel=1e-9, abs=1e-12)


def test_parameter_metrics_at_the_truth_and_at_the_init():
    task = SparseContextualBigramTask(vocab_size=8, seq_len=32, task_seed=1)
    truth = task.parameter_metrics(task.transition, task.attn)
    assert truth["excess_mse"] == pytest.approx(0, abs=1e-12)
    for key in ("dist_P", "dist_Q"):
        assert truth[key] == pytest.approx(0, abs=1e-12)
    for key in ("alpha_V", "alpha_A", "corr_V", "support_recall"):
        assert truth[key] == pytest.approx(1)
    init = task.parameter_metrics(*task.strategy_parameters("unigram"))
    for key in ("excess_mse_rel", "dist_P", "dist_Q"):
        assert init[key] == pytest.approx(1)
    for key in ("alpha_V", "alpha_A"):
        assert init[key] == pytest.approx(0, abs=1e-12)
    # torch tensors are read too; wrong shapes are refused
    same = task.parameter_metrics(torch.tensor(task.transition), torch.tensor(task.attn))
    assert same == truth
    with pytest.raises(ValueError, match=r"attention=.* expected a finite 32x8 array"):
        task.population_excess_mse(task.transition, task.attn[:-1])
    # recall: the top-Q positions of one column moved off the support
    a = task.attn.copy()
    a[:, 0] = np.roll(a[:, 0], 1)
    assert task.parameter_metrics(task.transition, a)["support_recall"] == pytest.approx(7 / 8)


def test_model_metrics_reads_the_value_and_attention_hook():
    task = SparseContextualBigramTask(**SMALL)

    class Truth(nn.Module):
        def value_and_attention(self):
            return torch.tensor(task.transition), torch.tensor(task.attn)

    assert task.model_metrics(Truth())["excess_mse"] == pytest.approx(0, abs=1e-12)
    assert task.model_metrics(nn.Linear(2, 2)) == {}


# --------------------------------------------------------------- no predictor beats it
def test_no_predictor_beats_the_oracle_beyond_three_standard_errors():
    """DESIGN.md property: the strategies, random linear models and perturbed oracles score no
    better than the Bayes oracle (cross-entropy through evaluate, and the closed-form MSE)."""
    task = SparseContextualBigramTask(vocab_size=6, seq_len=16, n_support=2, p_family="dirichlet")
    oracle = evaluate(OraclePredictor(task), task, num_sequences=4096, seed=1)
    assert oracle.excess_loss == pytest.approx(0, abs=1e-6)
    for name in ("uniform", "unigram", "uniform_attention"):
        report = evaluate(StrategyPredictor(task, name), task, num_sequences=4096, seed=1)
        assert report.excess_loss >= -3 * report.excess_loss_se

    class Perturbed:
        name = "perturbed oracle"

        def __init__(self, eps):
            self.eps = eps

        def predict(self, batch):
            logp = task.oracle(batch)
            noise = torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))
            return torch.log_softmax(logp + self.eps * noise, -1)

    for eps in (0.01, 0.1, 1.0):
        report = evaluate(Perturbed(eps), task, num_sequences=4096, seed=1)
        assert report.excess_loss >= -3 * report.excess_loss_se
    rng = np.random.default_rng(3)
    for _ in range(20):
        v = task.transition + 0.05 * rng.normal(size=(6, 6))
        a = np.abs(task.attn + 0.05 * rng.normal(size=task.attn.shape))
        assert task.population_mse(v, a) >= task.bayes_mse


# ------------------------------------------------------------------------ transfer
@pytest.mark.parametrize("rho", [0.707, 0.11, 0.0, -0.12, -0.5])
def test_transfer_pair_realises_the_correlation_and_keeps_mu(rho):
    spec = SparseContextualBigramSpec(vocab_size=8, seq_len=32, task_seed=2)
    pair = make_transfer_pair(spec, rho)
    assert pair.rho == pytest.approx(rho, abs=1e-6) and pair.target_rho == rho
    assert 0.0 <= pair.mix <= 1.0
    up, down = pair.upstream, pair.downstream
    np.testing.assert_array_equal(up.transition, SparseContextualBigramTask(spec).transition)
    np.testing.assert_allclose(down.transition.sum(0), 1, atol=1e-12)
    np.testing.assert_allclose(down.transition.sum(1), 1, atol=1e-9)  # doubly stochastic
    np.testing.assert_allclose(down.stationary, up.stationary, atol=1e-9)
    assert pair.rho == pytest.approx(
        transition_correlation(up.transition, down.transition), abs=1e-9
    )
    assert not np.array_equal(down.attn, up.attn)
    assert (down.spec.seq_len, down.spec.n_support) == (32, 2)
    same = make_transfer_pair(spec.to_dict(), rho)
    np.testing.assert_array_equal(same.downstream.transition, down.transition)


def test_transfer_pair_share_attn_and_bad_arguments():
    spec = SparseContextualBigramSpec(vocab_size=8, seq_len=32)
    pair = make_transfer_pair(spec, 0.5, share_attn=True)
    np.testing.assert_array_equal(pair.downstream.attn, pair.upstream.attn)
    for bad in (1.0, -1.0, math.nan, "0.5"):
        with pytest.raises(ValueError, match="rho="):
            make_transfer_pair(spec, bad)
    with pytest.raises(ValueError, match="share_attn=1 is invalid: expected a bool"):
        make_transfer_pair(spec, 0.5, share_attn=1)
    custom = make_transfer_pair(pair.downstream.spec, 0.3)  # a custom upstream: dirichlet P_ind
    assert custom.rho == pytest.approx(0.3, abs=1e-6)


def test_transfer_pair_refuses_an_undefined_correlation():
    """A P whose columns all equal mu has a zero centred part: corr(P, P~) is 0/0 (a
    ZeroDivisionError, or a meaningless value from rounding noise, before)."""
    flat2 = {"p_family": "custom", "vocab_size": 2, "transition": [[0.5, 0.5], [0.5, 0.5]]}
    col = [0.2, 0.3, 0.5]  # rank one, mu = col: the centred part is rounding noise
    rank_one = {"p_family": "custom", "vocab_size": 3, "transition": [[c] * 3 for c in col]}
    for spec in (flat2, rank_one):
        with pytest.raises(ValueError, match=r"spec is invalid for a transfer pair: .*numerically"):
            make_transfer_pair(spec, 0.5)
    with pytest.raises(ValueError, match=r"spec is invalid for a transfer pair"):
        make_transfer_pair({"vocab_size": 8, "p_floor": 1.0 - 1e-10}, 0.5)  # P ~ uniform


def test_transfer_pair_refuses_an_unreachable_rho():
    """With N = 2 a doubly stochastic P reaches only corr +-1 (0.5 gave -0.9999999 before);
    below the anti-correlated limit of a non-uniform mu the old bisection stopped at c = 1."""
    gap = r"rho=.* is invalid: .*reachable.*\[-1, 1\], except \(-1, 1\): it jumps"
    for rho in (0.5, -0.5, 0.0):
        with pytest.raises(ValueError, match=gap):
            make_transfer_pair({"vocab_size": 2}, rho)
    assert make_transfer_pair({"vocab_size": 2}, -0.9999999).rho == pytest.approx(-1.0)
    spec = {"p_family": "dirichlet", "vocab_size": 4, "p_alpha": 0.3}
    with pytest.raises(ValueError, match=r"rho=-0.99 is invalid: .* lies in \[-0.06\d*, 1\]"):
        make_transfer_pair(spec, -0.99)
    assert make_transfer_pair(spec, -0.06).rho == pytest.approx(-0.06, abs=1e-6)


@pytest.mark.parametrize(("seed", "n", "rho"), [(1, 3, -0.5), (1, 3, -0.75), (0, 4, -0.45)])
def test_transfer_pair_reaches_a_rho_at_an_interior_minimum(seed, n, rho):
    """Dirichlet P (non-uniform mu): a rho below both corr(P, P_ind) and the anti path's end is
    still reached at the interior minimum of the anti path (before: c = 1 and a wrong rho)."""
    spec = SparseContextualBigramSpec(
        p_family="dirichlet", vocab_size=n, p_alpha=1.0, seq_len=4, task_seed=seed
    )
    pair = make_transfer_pair(spec, rho)
    p, mu = pair.upstream.transition, pair.upstream.stationary
    assert pair.rho == pytest.approx(rho, abs=1e-6) and 0.0 < pair.mix < 1.0
    assert transition_correlation(p, pair.downstream.transition, mu) == pytest.approx(rho, abs=1e-6)
    anti = (1.0 - p) / (n - 1)
    assert transition_correlation(p, anti, mu) > rho  # the anti path's end does not reach it
    with pytest.raises(ValueError, match=r"rho=-0.95 is invalid: .*lies in \[-0.\d+, 1\]"):
        make_transfer_pair(spec, -0.95)


def test_transfer_pair_of_a_floored_p_gives_an_unfloored_custom_downstream():
    """The upstream floor is already in P and P_ind: the custom downstream spec has p_floor=0
    (a custom P refuses a floor) and its transition as built."""
    pair = make_transfer_pair(SparseContextualBigramSpec(vocab_size=6, p_floor=0.2), 0.5)
    assert pair.downstream.spec.p_floor == 0.0
    np.testing.assert_array_equal(
        pair.downstream.transition, np.array(pair.downstream.spec.transition)
    )
    assert pair.rho == pytest.approx(0.5, abs=1e-6)


def test_transition_correlation_refuses_a_zero_centred_part():
    task = SparseContextualBigramTask(vocab_size=3, seq_len=4)
    p, mu = task.transition, task.stationary
    flat = np.repeat(mu[:, None], 3, 1)
    with pytest.raises(ValueError, match=r"second=.* is invalid: .*numerically zero.*undefined"):
        transition_correlation(p, flat, mu)
    with pytest.raises(ValueError, match=r"first=.* is invalid: .*numerically zero"):
        transition_correlation(np.full((3, 3), 1 / 3), p)


def test_correlation_is_a_cosine_of_the_centred_matrices():
    task = SparseContextualBigramTask(vocab_size=6, seq_len=8)
    p = task.transition
    assert transition_correlation(p, p) == pytest.approx(1.0)
    anti = (1.0 - p) / 5
    assert transition_correlation(p, anti) == pytest.approx(-1.0)


# --------------------------------------------------------------------- oracle ladder
def test_ladder_estimators_converge_to_the_truth_as_samples_grow():
    task = SparseContextualBigramTask(vocab_size=5, seq_len=12, n_support=2, task_seed=3)
    errors = {}
    for n in (2_000, 50_000):
        batch = draw(task, n, seed=7)
        x, o = batch.tokens, batch.targets[:, -1]
        errors[n] = (
            np.abs(moment_transition(task, x, o) - task.transition).max(),
            np.abs(kernel_attention(task, x, o) - task.attn).max(),
            np.abs(
                em(task, x, o, attn=task.attn, iterations=30).transition - task.transition
            ).max(),
            np.abs(
                em(task, x, o, transition=task.transition, iterations=30).attn - task.attn
            ).max(),
        )
    for small, large in zip(errors[2_000], errors[50_000], strict=True):
        assert large < small and large < 0.05
    p_hat = moment_transition(task, x, o)
    np.testing.assert_allclose(p_hat.sum(0), 1.0, atol=1e-12)
    assert (p_hat >= 0).all()
    q_hat = kernel_attention(task, x, o)
    assert ((q_hat > 0).sum(0) <= 2).all()
    np.testing.assert_allclose(q_hat.sum(0), 1.0, atol=1e-12)


def test_joint_em_plateaus_then_finds_both():
    """Joint EM from uniform P and attn stays at excess/initial > 0.99 for its
    first 10 iterations, then recovers P and attn."""
    task = SparseContextualBigramTask(vocab_size=8, seq_len=128, n_support=2, task_seed=0)
    batch = draw(task, 20_000, seed=100)
    result = em(task, batch.tokens, batch.targets[:, -1], iterations=60, track=True)
    rel = [h["excess_mse_rel"] for h in result.history]
    assert min(rel[:10]) > 0.99
    assert rel[-1] < 0.01 and result.history[-1]["support_recall"] == 1.0
    with pytest.raises(ValueError, match="iterations=0 is invalid"):
        em(task, batch.tokens, batch.targets[:, -1], iterations=0)
    with pytest.raises(ValueError, match=r"expected \(n, 129\)"):
        em(task, batch.tokens[:, 1:], batch.targets[:, -1])


def test_oracle_ladder_rungs():
    task = SparseContextualBigramTask(vocab_size=6, seq_len=16, n_support=2, task_seed=1)
    rungs = oracle_ladder(task, 10_000, seed=2, iterations=40)
    names = [(r.rung, r.method) for r in rungs]
    assert names == [
        ("bayes", "closed form"),
        ("knows_attn", "moments"),
        ("knows_attn", "em"),
        ("knows_P", "kernel"),
        ("knows_P", "em"),
        ("neither", "joint em"),
    ]
    assert rungs[0].metrics["excess_mse"] == pytest.approx(0, abs=1e-12)
    for r in rungs[1:]:
        assert 0 < r.metrics["excess_mse_rel"] < 0.05, (r.rung, r.method, r.metrics)
        if r.rung == "knows_attn":
            assert r.metrics["dist_Q"] == pytest.approx(0, abs=1e-12)
        if r.rung == "knows_P":
            assert r.metrics["dist_P"] == pytest.approx(0, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=12))
def test_project_simplex_matches_a_plain_reference(values):
    """The projection is the simplex point closest to x: compare with the plain formula
    max(x - theta, 0) with theta found by bisection on sum = 1."""
    x = torch.tensor(values, dtype=torch.float64)
    got = project_simplex(x[:, None], dim=0)[:, 0]
    lo, hi = x.min().item() - 1.0, x.max().item()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (x - mid).clamp_min(0).sum() > 1:
            lo = mid
        else:
            hi = mid
    torch.testing.assert_close(got, (x - 0.5 * (lo + hi)).clamp_min(0), atol=1e-9, rtol=0)
    assert got.sum().item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- env
def test_env_episode_is_one_step_at_the_query():
    env = gym.make("ICL-SparseContextualBigram-v0", seq_len=16)
    task = env.unwrapped.task
    obs, info = env.reset(seed=0)
    assert obs.shape == (18,) and obs[-1] == 8 and (obs[:17] < 8).all() and info["t"] == 16
    obs2, reward, terminated, truncated, info = env.step(3)
    assert terminated and not truncated
    y = obs2[-1]
    assert reward == float(y == 3) and (obs2[:17] == obs[:17]).all()
    bayes = task.bayes_probs(torch.from_numpy(obs[None, :17].astype(np.int64)))[0].numpy()
    np.testing.assert_allclose(info["oracle_probs"], bayes, rtol=1e-5)
    assert info["query_token"] == obs[16] and 0 <= info["src_pos"] < 16
    np.testing.assert_allclose(
        info["true_probs"], task.transition[:, obs[info["src_pos"]]], rtol=1e-6
    )
    assert info["label"] == y and info["oracle_pred"] == int(np.argmax(bayes))
    dist = gym.make("ICL-SparseContextualBigram-v0", seq_len=16, action="distribution")
    dist.reset(seed=0)
    _, reward, *_ = dist.step(np.full(8, 0.125, np.float32))
    assert reward == pytest.approx(-((7 / 8) ** 2) - 7 / 64)  # -||e_y - f||^2 (the paper's loss)
    logprob = gym.make(
        "ICL-SparseContextualBigram-v0", seq_len=16, action="distribution", reward="logprob"
    )
    logprob.reset(seed=0)
    _, reward, *_ = logprob.step(np.full(8, 0.125, np.float32))
    assert reward == pytest.approx(math.log(1 / 8))


def test_vector_env_gives_query_and_source_arrays():
    venv = gym.make_vec("ICL-SparseContextualBigram-v0", num_envs=4, seq_len=16)
    obs, _ = venv.reset(seed=0)
    _, rewards, terminated, _, info = venv.step(np.zeros(4, np.int64))
    assert terminated.all() and rewards.shape == (4,)
    np.testing.assert_array_equal(info["query_token"], obs[:, 16])
    assert info["src_pos"].shape == (4,) and (info["src_pos"] < 16).all()
    venv.close()
