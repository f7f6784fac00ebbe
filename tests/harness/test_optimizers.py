"""The optimisers of the trainer's import-path hook: the preconditioned proximal gradient step
against its documented steps written plainly, its constraints, ablations, schedule and state, the
factories through the trainer, and the SGD factory."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from baselines.linear_transformer import make_model, squared_loss
from iclgym.harness import RunOptions, TrainConfig, train
from iclgym.harness.optimizers import ProximalGradient, ppg, sgd
from iclgym.harness.train import build_optimizer
from iclgym.tasks.sparse_bigram import SparseContextualBigramTask, project_simplex

N, T = 5, 7


def reference_step(v, a, g_v, g_a, *, eta, lam, mu, precond="mu", renorm=True):
    """The documented steps (``ProximalGradient``), one by one (numpy)."""
    scale = N * np.asarray(mu) if precond == "mu" else np.ones(N)
    g = g_v - g_v.sum(0, keepdims=True) / N
    g = g / scale[None, :]
    v = v - eta * g
    a = a - eta * (g_a / scale[None, :])
    out = a.copy()
    for k in range(N):
        col = np.maximum(a[:, k] - eta * lam, 0.0)
        if col.sum() == 0:
            col = np.maximum(a[:, k], 0.0)
        if renorm:
            col = col / col.sum() if col.sum() > 0 else np.full(T, 1.0 / T)
        out[:, k] = col
    return v, out


def params(seed=0):
    rng = np.random.default_rng(seed)
    v = rng.dirichlet(np.ones(N), size=N).T
    a = rng.dirichlet(np.ones(T), size=N).T
    return v, a, rng.normal(size=(N, N)), 0.05 * rng.normal(size=(T, N))


@pytest.mark.parametrize("precond", ["mu", "none"])
@pytest.mark.parametrize("renorm", [True, False])
def test_step_equals_the_spec_steps(precond, renorm):
    v, a, g_v, g_a = params()
    mu = np.random.default_rng(1).dirichlet(np.ones(N))
    value = torch.tensor(v, requires_grad=True)
    attention = torch.tensor(a, requires_grad=True)
    opt = ProximalGradient(
        value, attention, lr=0.3, lam=0.02, precond=precond, mu=tuple(mu), renorm=renorm
    )
    value.grad, attention.grad = torch.tensor(g_v), torch.tensor(g_a)
    opt.step()
    ref_v, ref_a = reference_step(
        v, a, g_v, g_a, eta=0.3, lam=0.02, mu=mu, precond=precond, renorm=renorm
    )
    np.testing.assert_allclose(value.detach().numpy(), ref_v, atol=1e-12)
    np.testing.assert_allclose(attention.detach().numpy(), ref_a, atol=1e-12)
    np.testing.assert_allclose(value.detach().sum(0).numpy(), v.sum(0), atol=1e-12)
    if renorm:
        np.testing.assert_allclose(attention.detach().sum(0).numpy(), 1.0, atol=1e-12)


def test_prox_prunes_dead_columns_restore_and_zero_columns_reset():
    value = torch.full((N, N), 1.0 / N, requires_grad=True)
    a = torch.full((T, N), 1.0 / T, dtype=torch.float32)
    a[:, 1] = 0.001  # below eta * lam everywhere: the prox would empty it -> restored
    a[:, 2] = -0.5  # all negative before the prox: restore gives zeros -> uniform
    a[0, 3], a[1:, 3] = 0.9, 0.1 / (T - 1)  # small entries pruned, the big one kept
    attention = a.clone().requires_grad_(True)
    opt = ProximalGradient(value, attention, lr=1.0, lam=0.05)
    value.grad = torch.zeros(N, N)
    attention.grad = torch.zeros(T, N)
    opt.step()
    out = attention.detach()
    torch.testing.assert_close(out[:, 1], torch.full((T,), 1.0 / T))  # restored, renormalised
    torch.testing.assert_close(out[:, 2], torch.full((T,), 1.0 / T))
    assert out[0, 3] == pytest.approx(1.0) and (out[1:, 3] == 0).all()
    torch.testing.assert_close(out[:, 0], torch.full((T,), 1.0 / T))


def test_schedule_decays_as_one_over_one_plus_t_over_tau():
    value = torch.zeros(N, N, requires_grad=True)
    attention = torch.full((T, N), 1.0 / T, requires_grad=True)
    opt = ProximalGradient(value, attention, lr=0.5, lam=0.0, tau=10.0)
    g = torch.zeros(N, N)
    g[0, 0], g[1, 0] = 1.0, -1.0  # column sums 0: centring leaves it
    moved = []
    for _ in range(4):
        before = value.detach().clone()
        value.grad, attention.grad = g.clone(), torch.zeros(T, N)
        opt.step()
        moved.append((before - value.detach())[0, 0].item())
    np.testing.assert_allclose(moved, [0.5 / (1 + t / 10) for t in range(4)], rtol=1e-6)


def test_simplex_projection_ablation():
    v, a, g_v, g_a = params(2)
    value = torch.tensor(v, requires_grad=True)
    attention = torch.tensor(a, requires_grad=True)
    opt = ProximalGradient(value, attention, lr=1.0, lam=0.5, simplex_proj=True)
    value.grad, attention.grad = torch.tensor(g_v), torch.tensor(10 * g_a)
    opt.step()
    expected = project_simplex(torch.tensor(a - 10 * g_a), dim=0)
    torch.testing.assert_close(attention.detach(), expected)


def test_state_dict_resumes_bit_for_bit():
    task = SparseContextualBigramTask(vocab_size=N, seq_len=T, task_seed=1)

    def fresh():
        model = make_model(N, T + 1).double()
        return model, ProximalGradient(model.value, model.attention, lr=0.3, lam=0.01, tau=5.0)

    def steps(model, opt, gen, count):
        for _ in range(count):
            b = task.sample(32, generator=gen)
            loss = squared_loss(model.query_output(b.tokens), b.targets[:, -1])
            opt.zero_grad()
            loss.backward()
            opt.step()

    model, opt = fresh()
    gen = task.generator(0)
    steps(model, opt, gen, 6)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), gen.get_state()))
    steps(model, opt, gen, 6)
    other, other_opt = fresh()
    other.load_state_dict(saved[0])
    other_opt.load_state_dict(saved[1])
    gen2 = task.generator(0)
    gen2.set_state(saved[2])
    steps(other, other_opt, gen2, 6)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, r"lr=0.0 is invalid"),
        ({"lam": -1.0}, r"lam=-1.0 is invalid"),
        ({"tau": -2.0}, r"tau=-2.0 is invalid"),
        ({"precond": "adam"}, r"precond='adam' is invalid: expected one of"),
        ({"mu": (0.5, 0.5)}, r"mu=.* 5 positive floats"),
        ({"mu": (0.0, 0.25, 0.25, 0.25, 0.25)}, r"mu=.* positive"),
        ({"renorm": 1}, r"renorm=1 is invalid: expected a bool"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    value = torch.zeros(N, N, requires_grad=True)
    attention = torch.zeros(T, N, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        ProximalGradient(value, attention, **kwargs)
    with pytest.raises(ValueError, match=r"value=.* square"):
        ProximalGradient(torch.zeros(N, N + 1), attention)
    with pytest.raises(ValueError, match=r"attention=.* a \(T, 5\) tensor"):
        ProximalGradient(value, torch.zeros(T, N + 1))


def test_factories_through_the_trainer_hook():
    model = make_model(N, T + 1)
    config = TrainConfig(
        optimizer="iclgym.harness.optimizers:ppg",
        optimizer_args=("lam=0.02", "tau=100.0"),
        lr=0.2,
        weight_decay=0.0,
    )
    opt = build_optimizer(model, config)
    assert isinstance(opt, ProximalGradient)
    assert [g["role"] for g in opt.param_groups] == ["value", "attention"]
    assert opt.param_groups[0]["lam"] == 0.02 and opt.param_groups[1]["tau"] == 100.0
    assert opt.param_groups[0]["lr"] == 0.2
    with pytest.raises(ValueError, match=r"weight_decay=0.1 is invalid: expected 0 for .*ppg"):
        ppg(model, TrainConfig())
    with pytest.raises(ValueError, match="needs a model with parameters 'value'"):
        ppg(make_model(N, T + 1, softmax=True), config)
    with pytest.raises(ValueError, match="needs a model"):
        ppg(nn.Linear(2, 2), config)
    softmax = make_model(N, T + 1, softmax=True)
    opt = sgd(softmax, TrainConfig(lr=0.3, weight_decay=0.0), attention_lr=30.0)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(softmax.value)] == 0.3 and lrs[id(softmax.attention_logits)] == 30.0
    with pytest.raises(ValueError, match="attention_lr is given but Linear has no parameter"):
        sgd(nn.Linear(2, 2), TrainConfig(), attention_lr=1.0)
    with pytest.raises(ValueError, match=r"attention_lr=0.0 is invalid"):
        sgd(softmax, TrainConfig(), attention_lr=0.0)


def test_ppg_trains_through_the_one_trainer_and_keeps_the_constraints(tmp_path):
    """The hook end to end: 30 steps of ``train`` with ``--optimizer ...:ppg`` on the env's
    task; V's columns still sum to 1, A's columns lie on the simplex, the checkpoint holds the
    optimiser state."""
    task = SparseContextualBigramTask(vocab_size=N, seq_len=16, task_seed=0)
    model = make_model(N, 17)
    config = TrainConfig(
        steps=30,
        batch_size=64,
        optimizer="iclgym.harness.optimizers:ppg",
        optimizer_args=("lam=0.01",),
        lr=0.1,
        weight_decay=0.0,
        eval_every=15,
        eval_sequences=128,
        eval_batch_size=128,
    )
    summary = train(model, task, config, RunOptions(out=str(tmp_path), progress=False, plot=False))
    assert summary["step"] == 30
    torch.testing.assert_close(model.value.detach().sum(0), torch.ones(N))
    a = model.attention.detach()
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(0), torch.ones(N))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["state"][0]["step"] == 30
