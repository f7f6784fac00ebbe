"""The one-layer linear (and softmax) transformer of sparse contextual bigrams: output against a
plain loop, the documented init, the squared loss and its gradients against the
formulas, the model contract and the task's metrics hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines import MODELS
from baselines.linear_transformer import (
    OUTPUT_FLOOR,
    LinearTransformer,
    LinearTransformerConfig,
    make_model,
    squared_loss,
)
from iclgym.harness import ModelPredictor, build_model
from iclgym.harness.model import check_model
from iclgym.tasks.sparse_bigram import SparseContextualBigramTask

TASK = SparseContextualBigramTask(vocab_size=5, seq_len=9, n_support=2, p_family="dirichlet")


def batch(n=32, seed=0):
    return TASK.sample(n, generator=TASK.generator(seed))


def random_model(softmax=False, seed=0):
    model = make_model(TASK.vocab_size, TASK.seq_len, softmax=softmax).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64))
    return model


def test_output_is_v_x_a_k_by_a_plain_loop():
    for softmax in (False, True):
        model = random_model(softmax)
        b = batch()
        v = model.value.detach().numpy()
        a = model.attention_matrix().detach().numpy()
        expected = np.zeros((32, 5))
        for i, row in enumerate(b.tokens.tolist()):
            for t, x in enumerate(row[:-1]):
                expected[i] += a[t, row[-1]] * v[:, x]
        np.testing.assert_allclose(model.query_output(b.tokens).detach().numpy(), expected)
        if softmax:
            w = model.attention_logits.detach()
            torch.testing.assert_close(model.attention_matrix(), torch.softmax(w, 0))


def test_forward_is_the_raw_output_at_the_query_and_the_predictor_clips_it():
    """The model declares a probability output: forward is f itself at the query (0 at the
    context, never scored); the harness's predictor reads it as clip(f, 1e-6) / sum."""
    model = random_model()
    with torch.no_grad():
        model.value[0] = -1.0  # negative outputs for token 0: clipped by the predictor only
    b = batch()
    f = model.query_output(b.tokens).detach()
    out = model(b.tokens).detach()
    assert LinearTransformer.iclgym_output == "probabilities"
    assert out.shape == (32, 10, 5)
    assert (out[:, :-1] == 0).all()
    assert torch.equal(out[:, -1], f) and (out[:, -1, 0] < 0).all()
    log_probs = ModelPredictor(model).predict(b)
    clipped = f.clamp_min(OUTPUT_FLOOR)
    torch.testing.assert_close(log_probs[:, -1].exp(), clipped / clipped.sum(-1, keepdim=True))
    assert (log_probs[:, -1, 0].exp() < 1e-5).all()


def test_init_predicts_mu_and_the_attention_gradient_has_no_positional_signal():
    """The init: V's columns are mu, A = 1/T; the output is mu for every input, and the
    attention gradient is the same at every position t (column k gets
    (1/B) sum_{i: k_i = k} mu^T (mu - e_{y_i}), zero in expectation, and a uniform column stays
    uniform after renormalisation): no signal on where to attend. V's gradient is not 0."""
    mu = tuple(TASK.stationary)
    model = make_model(TASK.vocab_size, TASK.seq_len, mu=mu).double()
    b = batch(256)
    f = model.query_output(b.tokens)
    torch.testing.assert_close(f, torch.tensor(mu, dtype=torch.float64).expand(256, -1))
    y = b.targets[:, -1]
    squared_loss(f, y).backward()
    grad = model.attention.grad
    m = torch.tensor(mu, dtype=torch.float64)
    k = b.tokens[:, -1]
    per_sample = m @ m - m[y]  # mu^T (mu - e_y)
    expected = torch.zeros(5, dtype=torch.float64).index_add_(0, k, per_sample) / 256
    torch.testing.assert_close(grad, expected.expand(9, -1))
    assert model.value.grad.abs().max() > 0
    uniform = make_model(5, 10)
    torch.testing.assert_close(uniform.value, torch.full((5, 5), 0.2))
    torch.testing.assert_close(uniform.attention, torch.full((9, 5), 1 / 9))


def test_squared_loss_gradients_are_the_spec_formulas():
    """G_V = mean_i r_i h_i^T and G_A[t, k] = (1/B) sum_{i: k_i = k} (V^T r_i)[x_{i,t}] with
    h_i = X_i a_{k_i} and r_i = V h_i - e_{y_i}."""
    model = random_model()
    b = batch(64)
    y = b.targets[:, -1]
    loss = squared_loss(model.query_output(b.tokens), y)
    loss.backward()
    v = model.value.detach().numpy()
    a = model.attention.detach().numpy()
    tokens = b.tokens.numpy()
    g_v, g_a = np.zeros_like(v), np.zeros_like(a)
    for i, row in enumerate(tokens):
        k = row[-1]
        h = np.zeros(5)
        for t, x in enumerate(row[:-1]):
            h[x] += a[t, k]
        r = v @ h - np.eye(5)[y[i]]
        g_v += np.outer(r, h) / 64
        back = v.T @ r
        for t, x in enumerate(row[:-1]):
            g_a[t, k] += back[x] / 64
    np.testing.assert_allclose(model.value.grad.numpy(), g_v, atol=1e-12)
    np.testing.assert_allclose(model.attention.grad.numpy(), g_a, atol=1e-12)
    onehot = np.eye(5)[y.numpy()]
    f = model.query_output(b.tokens).detach().numpy()
    assert loss.item() == pytest.approx(0.5 * ((f - onehot) ** 2).sum(-1).mean())


def test_truth_gives_the_task_metrics_of_the_bayes_predictor():
    model = make_model(TASK.vocab_size, TASK.seq_len).double()
    with torch.no_grad():
        model.value.copy_(torch.tensor(TASK.transition))
        model.attention.copy_(torch.tensor(TASK.attn))
    metrics = TASK.model_metrics(model)
    assert metrics["excess_mse"] == pytest.approx(0, abs=1e-12)
    assert metrics["support_recall"] == 1.0
    b = batch()
    torch.testing.assert_close(model(b.tokens)[:, -1], TASK.bayes_probs(b.tokens))
    torch.testing.assert_close(
        ModelPredictor(model).predict(b)[:, -1].exp(),
        TASK.oracle(b)[:, -1].exp().double(),
        rtol=1e-5,
        atol=1e-6,
    )
    init = TASK.model_metrics(make_model(TASK.vocab_size, TASK.seq_len, mu=TASK.stationary))
    assert init["excess_mse_rel"] == pytest.approx(1.0, rel=1e-5)


def test_model_contract_and_names():
    for name in ("linear_transformer", "softmax_transformer"):
        entry = MODELS[name]
        model = build_model(entry.factory, TASK, seed=0, **entry.args)
        assert isinstance(model, LinearTransformer)
        assert model.config.softmax == (name == "softmax_transformer")
        checked = check_model(model, TASK)
        assert checked.output == "probabilities" and not checked.causality_checked
        assert model.num_parameters() == 5 * 5 + 9 * 5
        v, a = model.value_and_attention()
        assert v.shape == (5, 5) and a.shape == (9, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 1, "seq_len": 5}, "vocab_size=1 is invalid"),
        ({"vocab_size": 4, "seq_len": 1}, r"seq_len=1 is invalid: expected an int >= 2"),
        ({"vocab_size": 4, "seq_len": 5, "softmax": 1}, "softmax=1 is invalid"),
        ({"vocab_size": 2, "seq_len": 5, "mu": (0.5, 0.6)}, "mu=.* summing to 1"),
        ({"vocab_size": 2, "seq_len": 5, "mu": (1.0,)}, "mu=.* 2 non-negative floats"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearTransformerConfig(**kwargs)


def test_wrong_token_shape_raises():
    model = make_model(5, 10)
    with pytest.raises(ValueError, match=r"expected \(B, 10\)"):
        model(torch.zeros(2, 9, dtype=torch.int64))
