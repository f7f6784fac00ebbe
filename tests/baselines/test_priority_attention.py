"""The paper's one-layer attention model of token-priority graphs (``baselines.priority_attention``)
and normalised GD (``iclgym.harness.optimizers.normalized_gd``): the formulas of
Li et al. 2024 (and its reference code) against the numpy theory module, the model contract
(shapes, causality through the harness's own probe), and the optimiser's step length."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from baselines import MODELS
from baselines.priority_attention import PriorityAttention, make_model, paper_loss
from iclgym.harness import TrainConfig
from iclgym.harness.model import check_model
from iclgym.harness.optimizers import NormalizedGD, normalized_gd
from iclgym.registry import make_task
from iclgym.tasks.priority_graph_theory import (
    attention_nll,
    attention_weights,
    paper_dataset,
    paper_embeddings,
)


def _model(k=6, d=8, seed=0, **kwargs):
    torch.manual_seed(seed)
    return make_model(k, 4, d=d, embedding="random", embedding_seed=seed, **kwargs).double()


def test_factory_uses_the_paper_embeddings_and_the_default_linear_init():
    m = _model(seed=3)
    np.testing.assert_array_equal(m.embeddings.numpy(), paper_embeddings(6, 8, "random", 3))
    w = m.weight.detach()
    assert w.shape == (8, 8) and w.abs().max() <= 1 / math.sqrt(8)
    assert w.std() > 0.5 / math.sqrt(3 * 8)  # U(-a, a) has std a / sqrt(3)
    assert [name for name, _ in m.named_parameters()] == ["W.weight"]
    e = np.eye(6, 7)
    np.testing.assert_array_equal(make_model(6, 4, embeddings=e).embeddings.numpy(), e)
    assert MODELS["priority_attention"].factory == "baselines.priority_attention:make_model"


def test_iden_head_is_log_of_summed_attention_at_every_prefix():
    ds = paper_dataset(6, 4, 6, 8, seed=0)
    m = _model()
    tokens = torch.from_numpy(ds.contexts)
    out = m(tokens)
    assert out.shape == (6, 4, 6) and out.dtype == torch.float64
    w = m.weight.detach().numpy()
    for t in range(1, 5):
        s = attention_weights(w, ds.contexts[:, :t], ds.embeddings)  # query x_{t-1}
        p = np.zeros((6, 6))
        np.add.at(p, (np.arange(6)[:, None], ds.contexts[:, :t]), s)
        np.testing.assert_allclose(
            out[:, t - 1].detach().exp().numpy(), p + m.eps, rtol=1e-12, atol=0
        )


def test_trainer_loss_is_the_paper_nll_with_the_same_gradient():
    ds = paper_dataset(6, 4, 6, 8, seed=1)
    m = _model(seed=1)
    out = m(torch.from_numpy(ds.contexts))[:, -1]
    labels = torch.from_numpy(ds.labels)
    ce = torch.nn.functional.cross_entropy(out, labels)  # what the trainer computes
    ce.backward()
    loss, grad = attention_nll(m.weight.detach().numpy(), ds.contexts, ds.labels, ds.embeddings)
    assert ce.item() == pytest.approx(loss + math.log(1 + 6 * m.eps), abs=1e-9)
    np.testing.assert_allclose(m.weight.grad.numpy(), grad, atol=1e-9)
    assert paper_loss(out, labels).item() == pytest.approx(loss, abs=1e-9)


def test_gen_head_and_the_local_losses():
    ds = paper_dataset(6, 4, 6, 8, seed=2)
    m = _model(seed=2, head="gen")
    out = m(torch.from_numpy(ds.contexts))[:, -1]
    w = m.weight.detach().numpy()
    s = attention_weights(w, ds.contexts, ds.embeddings)
    f = np.einsum("nt,ntd->nd", s, ds.embeddings[ds.contexts])
    np.testing.assert_allclose(out.detach().numpy(), f @ ds.embeddings.T, atol=1e-12)
    labels = torch.from_numpy(ds.labels)
    p = torch.softmax(out, -1)[torch.arange(6), labels]
    assert paper_loss(out, labels, "ce", "gen").item() == pytest.approx(-p.log().mean().item())
    assert paper_loss(out, labels, "lsq2", "gen").item() == pytest.approx(
        (1 - p).pow(2).mean().item()
    )
    with pytest.raises(ValueError, match="loss='nll'"):
        paper_loss(out, labels, "nll", "gen")
    with pytest.raises(ValueError, match="loss='mse'"):
        paper_loss(out, labels, "mse")


def test_model_passes_the_harness_contract_and_causality_probe():
    task = make_task("ICL-MarkovChain-v0", num_states=5, seq_len=12)
    for head in ("iden", "gen"):
        m = make_model(5, 12, d=6, embedding="ortho", head=head).double()
        checked = check_model(m, task, torch.device("cpu"))
        assert checked.output == "logits"
    m = make_model(5, 12, d=6).double()
    tokens = torch.randint(0, 5, (3, 12), generator=torch.Generator().manual_seed(0))
    out, attn = m(tokens, return_attention=True)
    assert attn[0].shape == (3, 1, 12, 12)
    assert torch.allclose(attn[0].sum(-1), torch.ones(3, 1, 12, dtype=torch.float64))
    assert (attn[0][0, 0].triu(1) == 0).all()
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 5
    assert torch.equal(m(changed)[:, :7], out[:, :7])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head": "linear"}, "head"),
        ({"embedding": "sphere"}, "embedding"),
        ({"embeddings": np.eye(5, 8)}, "embeddings"),
        ({"eps": 0.0}, "eps"),
        ({"d": 4, "embedding": "ortho"}, "d=4"),
    ],
)
def test_factory_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(6, 4, **kwargs)


def test_normalized_gd_moves_by_lr_and_refuses_decay():
    m = _model()
    config = TrainConfig(
        optimizer="iclgym.harness.optimizers:normalized_gd", lr=0.01, weight_decay=0
    )
    opt = normalized_gd(m, config)
    assert isinstance(opt, NormalizedGD)
    ds = paper_dataset(6, 4, 6, 8, seed=0)
    tokens, labels = torch.from_numpy(ds.contexts), torch.from_numpy(ds.labels)
    for _ in range(3):
        before = m.weight.detach().clone()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(tokens)[:, -1], labels)
        loss.backward()
        g = m.weight.grad.clone()
        opt.step()
        step = m.weight.detach() - before
        assert step.norm().item() == pytest.approx(0.01, rel=1e-12)
        assert torch.allclose(step, -0.01 * g / g.norm(), atol=1e-15)
    opt.zero_grad(set_to_none=True)
    before = m.weight.detach().clone()
    opt.step()  # no gradient: no move
    assert torch.equal(m.weight.detach(), before)
    with pytest.raises(ValueError, match=r"weight_decay=0\.1"):
        normalized_gd(m, TrainConfig(optimizer="iclgym.harness.optimizers:normalized_gd"))
    with pytest.raises(ValueError, match="momentum"):
        normalized_gd(m, TrainConfig(optimizer="sgd", weight_decay=0, momentum=0.9))


def test_normalized_gd_uses_the_joint_norm_of_all_parameters():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = NormalizedGD([a, b], lr=0.5)
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0, 0.0])
    opt.step()
    assert torch.allclose(a, torch.tensor([-0.3, 0.0]))
    assert torch.allclose(b, torch.tensor([0.0, -0.4, 0.0]))
    with pytest.raises(ValueError, match="lr=0"):
        NormalizedGD([a], lr=0)


def test_priority_attention_refuses_bad_embeddings():
    with pytest.raises(ValueError, match="embeddings"):
        PriorityAttention(np.zeros(3))
    with pytest.raises(ValueError, match="embeddings"):
        PriorityAttention(np.full((2, 2), np.nan))


def test_model_token_scores_are_the_theory_scores():
    from iclgym.tasks.priority_graph_theory import token_scores

    m = _model(seed=4)
    np.testing.assert_allclose(
        m.token_scores().detach().numpy(),
        token_scores(m.weight.detach().numpy(), m.embeddings.numpy()),
        atol=1e-12,
    )


def test_li2024_recipe_builds_the_dataset_embeddings_and_its_optimiser():
    from iclgym.harness import RECIPES, build_model
    from iclgym.harness.train import build_optimizer

    recipe = RECIPES["li2024"]
    task = make_task(recipe.env_id, **recipe.spec)
    model = build_model(MODELS[recipe.model].factory, task, seed=0, **recipe.model_args)
    np.testing.assert_array_equal(model.embeddings.numpy(), task.paper_data.embeddings)
    assert recipe.train.batch_size == task.spec.n and recipe.train.dtype == "float64"
    assert isinstance(build_optimizer(model, recipe.train), NormalizedGD)
