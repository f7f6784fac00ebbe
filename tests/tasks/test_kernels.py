"""Compiled Markov-chain kernels (iclgym.tasks.kernels) against the torch reference code."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iclgym.tasks import MarkovChainTask, kernels
from iclgym.tasks.estimators import dirichlet_log_predictive, in_context_counts, ngram_log_probs
from iclgym.tasks.markov import inverse_cdf_thresholds
from iclgym.tasks.stationary import gth_stationary, lifted_transition


def _both(task: MarkovChainTask, batch_size: int, seed: int, monkeypatch):
    fast = task.sample(batch_size, generator=task.generator(seed))
    monkeypatch.setattr(kernels, "ENABLED", False)
    slow = task.sample(batch_size, generator=task.generator(seed))
    monkeypatch.setattr(kernels, "ENABLED", True)
    return fast, slow


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_states": 2},
        {"num_states": 3, "seq_len": 40},
        {"num_states": 3, "order": 3, "alpha": 0.5},
        {"num_states": 3, "order": 4, "init": "uniform"},
        {"num_states": 2, "order": 6},
        {"num_states": 5, "order": 3, "alpha": (0.2, 1.0, 2.0, 0.7, 5.0)},
        {"num_states": 10, "order": 3, "alpha": 2.0},
        {"num_states": 80, "seq_len": 30},  # more thresholds than COUNT_MAX: binary search
        {"num_states": 40, "alpha": 0.01},
        {"num_states": 3, "order": 1},
        {"num_states": 3, "prior": "unigram", "order": 3},
        {"num_states": 4, "prior": "doubly_stochastic"},
        {"num_states": 3, "prior": "mixture"},
        {"num_states": 3, "alpha": 1e-300},  # log-space stationary solve (torch)
    ],
)
def test_kernels_draw_the_same_batch_as_the_torch_path(kwargs, monkeypatch):
    """The same generator gives the same tokens, tables and (to rounding) first-context law with
    the compiled kernels as with the torch reference code (the CUDA path)."""
    task = MarkovChainTask(**{"seq_len": 60, **kwargs})
    fast, slow = _both(task, 96, 4, monkeypatch)
    assert torch.equal(fast.tokens, slow.tokens) and torch.equal(fast.targets, slow.targets)
    assert torch.equal(fast.params["transition"], slow.params["transition"])
    torch.testing.assert_close(
        fast.params["initial_law"], slow.params["initial_law"], rtol=1e-6, atol=0
    )


# sha256 (16 hex digits) of the tokens and last targets of 256 sequences from generator(11),
# drawn by iclgym at commit 03d7223 (before the compiled kernels), torch 2.13.0: a seed keeps
# drawing the same data from one release to the next.
PINNED_STREAMS = [
    ({"num_states": 3, "order": 2, "seq_len": 64}, "46c07cb7139dc6f5"),
    ({"num_states": 3, "order": 3, "seq_len": 64, "alpha": 0.5}, "ad59624a039942f9"),
    ({"num_states": 10, "order": 2, "seq_len": 64, "init": "uniform"}, "5ee3d78822c154dd"),
    ({"num_states": 80, "order": 2, "seq_len": 32}, "2732905926a06262"),
    ({"num_states": 2, "seq_len": 64, "prior": "doubly_stochastic"}, "44bc4e28a44e3d39"),
]


@pytest.mark.skipif(
    not torch.__version__.startswith("2.13."), reason="pinned with torch 2.13's generators"
)
@pytest.mark.parametrize(("kwargs", "digest"), PINNED_STREAMS)
def test_a_seed_draws_the_data_of_earlier_releases(kwargs, digest):
    task = MarkovChainTask(**kwargs)
    batch = task.sample(256, generator=task.generator(11))
    data = batch.tokens.numpy().tobytes() + batch.targets[:, -1].numpy().tobytes()
    assert hashlib.sha256(data).hexdigest()[:16] == digest


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(2, 130),
    zeros=st.floats(0.0, 0.9),
    power=st.floats(1.0, 30.0),
    scale=st.sampled_from([1.0, 1.0000002, 0.9999998]),
    seed=st.integers(0, 2**31 - 1),
)
def test_threshold_kernel_equals_torch_bit_for_bit(m, zeros, power, scale, seed):
    """Rows with zeros (also trailing), tiny entries and sums rounded above or below 1."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(64, m, generator=g) ** power
    p[torch.rand(64, m, generator=g) < zeros] = 0.0
    p[0] = 0.0
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30) * scale
    fast = kernels.inverse_cdf_thresholds(p)
    assert torch.equal(fast, inverse_cdf_thresholds(p))
    assert bool((fast[:, 1:] >= fast[:, :-1]).all())  # nondecreasing: binary search is valid


def _reference_tokens(cdf, first, u, k):
    """One sequence and one step at a time: count thresholds below 1 - u."""
    states = cdf.shape[1]
    out = torch.empty(cdf.shape[0], u.shape[0], dtype=torch.int64)
    for b in range(cdf.shape[0]):
        s = int(first[b])
        for i in range(u.shape[0]):
            token = int((1.0 - u[i, b] > cdf[b, s]).sum())
            s = (s * k) % states + token
            out[b, i] = token
    return out


@pytest.mark.parametrize(("k", "order"), [(2, 2), (3, 2), (3, 3), (2, 5), (66, 2), (100, 2)])
def test_walk_kernel_equals_a_step_by_step_walk(k, order):
    g = torch.Generator().manual_seed(k + order)
    states = k ** (order - 1)
    tables = torch.rand(5, states, k, generator=g) ** 3
    tables[:, :, -1] = 0.0  # a trailing zero: never drawn
    tables /= tables.sum(-1, keepdim=True)
    cdf = inverse_cdf_thresholds(tables)
    first = torch.randint(0, states, (5,), generator=g)
    u = torch.rand(50, 5, generator=g)
    out = torch.full((5, 52), -1, dtype=torch.int64)
    kernels.walk(cdf, first, u, out)
    assert torch.equal(out[:, 2:], _reference_tokens(cdf, first, u, k))
    assert bool((out[:, :2] == -1).all()) and int(out[:, 2:].max()) < k - 1


@pytest.mark.parametrize(("k", "states", "alpha"), [(3, 3, 1.0), (10, 10, 0.1), (3, 9, 1.0)])
def test_gth_kernel_equals_the_torch_elimination(k, states, alpha):
    g = torch.Generator().manual_seed(states)
    gamma = torch._standard_gamma(torch.full((200, states, k), alpha, dtype=torch.float64), g)
    tables = gamma / gamma.sum(-1, keepdim=True)
    pi = kernels.gth_stationary(tables)
    torch.testing.assert_close(pi, gth_stationary(lifted_transition(tables)), rtol=1e-10, atol=0)


def test_gth_kernel_keeps_small_entries_and_refuses_reducible_chains():
    table = torch.tensor([[[1 - 1e-20, 1e-20], [1e-30, 1 - 1e-30]]], dtype=torch.float64)
    pi = kernels.gth_stationary(table)[0]
    assert pi[0].item() == pytest.approx(1e-10, rel=1e-9)
    reducible = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.25, 0.25]]])
    with pytest.raises(ValueError, match="reducible"):
        kernels.gth_stationary(reducible.double())


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 6),
    order=st.integers(1, 4),
    seq=st.integers(1, 40),
    vector=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ngram_kernel_equals_the_sort_based_estimator_bit_for_bit(k, order, seq, vector, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, k, (7, seq), generator=g)
    alpha = torch.rand(k, generator=g) * 3 + 0.01 if vector else 0.5
    reference = dirichlet_log_predictive(*in_context_counts(tokens, k, order), alpha)
    assert torch.equal(kernels.ngram_log_probs(tokens, k, order, alpha), reference)
    assert torch.equal(ngram_log_probs(tokens, k, order, alpha), reference)


@pytest.mark.parametrize(
    ("k", "order", "alpha"), [(3, 2, 1.0), (2, 3, 0.5), (3, 1, 1.0), (4, 4, (0.2, 1.0, 2.0, 0.7))]
)
def test_online_step_kernel_equals_the_numpy_step_bit_for_bit(k, order, alpha, monkeypatch):
    task = MarkovChainTask(num_states=k, order=order, alpha=alpha, seq_len=30)
    batch = task.sample(16, generator=task.generator(8))
    fast = task.online(batch)
    monkeypatch.setattr(kernels, "ENABLED", False)
    slow = task.online(batch)
    for t in range(30):
        (true_a, oracle_a), (true_b, oracle_b) = fast(t), slow(t)
        assert np.array_equal(true_a, true_b) and np.array_equal(oracle_a, oracle_b)
    with pytest.raises(ValueError, match="in order"):
        fast(3)


def test_samplers_and_oracles_run_on_the_library_thread_count(monkeypatch):
    """Every Task subclass's sample/oracle runs with iclgym.tasks.base.THREADS torch threads
    on the calling thread, whatever torch's own count, which is restored after."""
    import threading

    from iclgym.tasks import base

    seen: list[int] = []

    class Probe(MarkovChainTask):
        def sample(self, batch_size, *, generator, device=None):
            seen.append(torch.get_num_threads())
            return super().sample(batch_size, generator=generator, device=device)

    task = Probe(num_states=3, seq_len=10)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        task.sample(4, generator=task.generator(0))
        assert seen[-1] == 1 and torch.get_num_threads() == 2
        monkeypatch.setattr(base, "THREADS", None)
        task.sample(4, generator=task.generator(0))
        assert seen[-1] == 2
        monkeypatch.setattr(base, "THREADS", 1)
        worker = threading.Thread(target=lambda: task.sample(4, generator=task.generator(0)))
        worker.start()
        worker.join()
        assert seen[-1] == 1 and torch.get_num_threads() == 2  # the caller's count untouched
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [
        ("ICL-SparseContextualBigram-v0", {}),
        ("ICL-PriorityGraph-v0", {"context_len": 9}),
        ("ICL-SymbolTemplate-v0", {}),
        ("ICL-SameDifferent-v0", {}),
        ("ICL-SymbolCopy-v0", {}),
        # a template cdf (not uniform digits), class labels, a random preset's many slots
        ("ICL-SymbolTemplate-v0", {"template_probs": (0.2, 0.8), "label_type": "multiclass"}),
        ("ICL-SymbolTemplate-v0", {"preset": "random", "random_num_templates": 12}),
    ],
)
def test_one_switch_turns_every_compiled_sampler_off_and_the_data_stay(env_id, kwargs, monkeypatch):
    """kernels.ENABLED also routes the other families' compiled samplers to their torch code
    (the CUDA path): the same generator gives the same batch either way."""
    from iclgym.registry import make_task

    task = make_task(env_id, **kwargs)
    fast = task.sample(64, generator=task.generator(2))
    monkeypatch.setattr(kernels, "ENABLED", False)
    slow = task.sample(64, generator=task.generator(2))
    assert torch.equal(fast.tokens, slow.tokens) and torch.equal(fast.targets, slow.targets)
    for key, value in fast.params.items():
        assert torch.equal(value, slow.params[key]), key
