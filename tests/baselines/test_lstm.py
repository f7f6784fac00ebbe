"""The LSTM baseline: the written-out cell equals torch.nn.LSTM, causal, value head, vmap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baselines.lstm import LSTM, LSTMConfig, make_model
from iclgym.harness import build_model, check_model
from iclgym.registry import make_task


@pytest.mark.parametrize("n_layers", [1, 2])
def test_equals_torch_lstm_with_the_same_weights(n_layers):
    torch.manual_seed(0)
    model = LSTM(LSTMConfig(vocab_size=5, hidden_size=12, n_layers=n_layers)).eval()
    reference = nn.LSTM(12, 12, num_layers=n_layers, batch_first=True)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            getattr(reference, f"weight_ih_l{i}").copy_(layer.input.weight)
            getattr(reference, f"bias_ih_l{i}").copy_(layer.input.bias)
            getattr(reference, f"weight_hh_l{i}").copy_(layer.recurrent.weight)
            getattr(reference, f"bias_hh_l{i}").zero_()
    tokens = torch.randint(0, 5, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states, _ = reference(model.embed(tokens))
        torch.testing.assert_close(model(tokens), model.head(states), rtol=1e-5, atol=1e-6)


def test_causal_sizes_hooks_and_errors():
    model = make_model(vocab_size=7, seq_len=20, hidden_size=8)
    tokens = torch.randint(0, 7, (2, 20))
    edited = tokens.clone()
    edited[:, 10:] = (edited[:, 10:] + 1) % 7
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[:, :10], model(edited)[:, :10], rtol=0, atol=0)
    assert model(tokens).shape == (2, 20, 7)
    assert make_model(7, 20, n_outputs=1)(tokens).shape == (2, 20, 1)
    d, V = 8, 7
    assert model.num_parameters() == V * d + (d * 4 * d + 4 * d) + d * 4 * d + (d * V + V)
    assert model.input_embedding() is model.embed.weight
    assert model.layers[0].input.bias[d : 2 * d].eq(1.0).all()  # forget gate starts open
    for bad in ({"hidden_size": 0}, {"n_layers": 1.5}, {"dropout": 1.0}, {"n_outputs": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LSTMConfig(vocab_size=7, **bad)


def test_contract_on_next_token_and_template_tasks():
    markov = make_task("ICL-MarkovChain-v0", seq_len=24)
    check = check_model(build_model("baselines.lstm:make_model", markov, hidden_size=8), markov)
    assert check.output == "logits" and check.causality_checked and not check.attention
    templates = make_task("ICL-SymbolTemplate-v0")
    value = build_model("baselines.lstm:make_model", templates, hidden_size=8, n_outputs=1)
    assert check_model(value, templates).output == "values"


def test_vmap_over_stacked_copies_equals_separate_calls():
    models = [make_model(5, 6, hidden_size=4) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    tokens = torch.randint(0, 5, (2, 6))

    def call(p, b):
        return torch.func.functional_call(models[0], (p, b), (tokens,))

    stacked = torch.vmap(call)(params, buffers)
    for i, model in enumerate(models):
        torch.testing.assert_close(stacked[i], model(tokens))
