"""The one-hot MLP baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baselines.mlp import MLP, MLPConfig, make_model


def test_equals_a_linear_layer_on_concatenated_one_hot_codes():
    torch.manual_seed(0)
    model = MLP(MLPConfig(vocab_size=7, seq_len=3, n_outputs=2, width=16, depth=2))
    tokens = torch.randint(0, 7, (5, 3))
    one_hot = F.one_hot(tokens, 7).flatten(1).float()  # (B, T * V)
    first = F.relu(one_hot @ model.embed.weight + model.bias)
    expected = model.head(F.relu(model.hidden[0](first)))
    out = model(tokens)
    assert out.shape == (5, 3, 2)  # one prediction per sequence, at every position
    for t in range(3):
        torch.testing.assert_close(out[:, t], expected)
    assert model.num_parameters() == 21 * 16 + 16 + (16 * 16 + 16) + (16 * 2 + 2)


def test_unseen_tokens_get_no_gradient_and_errors():
    model = MLP(MLPConfig(vocab_size=7, seq_len=3))
    model(torch.randint(0, 4, (8, 3))).sum().backward()
    grad = model.embed.weight.grad.view(3, 7, -1)
    assert grad[:, 4:].abs().sum() == 0 and grad[:, :4].abs().sum() > 0
    with pytest.raises(ValueError, match="expected 3 tokens"):
        model(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="width=0"):
        MLPConfig(vocab_size=7, seq_len=3, width=0)


def test_factory_and_input_embedding_view():
    model = make_model(vocab_size=7, seq_len=3, width=8)
    assert model.config.n_outputs == 7  # None: next-token logits
    assert make_model(7, 3, n_outputs=1).config.n_outputs == 1
    table = model.input_embedding()  # (V, T, width): token v's weights at every position
    assert table.shape == (7, 3, 8)
    for t in range(3):
        torch.testing.assert_close(table[:, t], model.embed.weight[t * 7 : (t + 1) * 7])
