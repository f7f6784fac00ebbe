"""Unit tests of the transformer baseline: size, causality, attention paths, errors, loading."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from baselines.transformer import (
    POSITIONAL,
    Transformer,
    TransformerConfig,
    dropout,
    make_model,
)
from iclgym.harness import build_model, check_model
from iclgym.registry import make_task


def make(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(**{"vocab_size": 3, **kwargs}))


def perturbed_after(tokens: torch.Tensor, start: int, vocab: int) -> torch.Tensor:
    edited = tokens.clone()
    edited[:, start:] = (edited[:, start:] + 1) % vocab
    return edited


@pytest.mark.parametrize(("k", "expected"), [(2, 5440), (3, 5472)])
def test_reference_parameter_count(k, expected):
    # the official code's model (Edelman et al. 2024): 5,440 (k=2) and 5,472 (k=3).
    assert make(vocab_size=k).num_parameters() == expected


def test_parameter_count_of_variants():
    d, T, V = 16, 100, 3
    attention = 4 * d * d + 2 * d  # Q, K, V, output (bias-free) and the LayerNorm
    mlp = 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)  # LayerNorm + two biased Linears
    base = V * d + 2 * attention + 2 * d  # embedding, 2 blocks, final LayerNorm
    assert make(positional="none").num_parameters() == base + V * d
    assert make(positional="rotary", tied=True).num_parameters() == base
    assert make(positional="learned", mlp=True).num_parameters() == base + V * d + T * d + 2 * mlp
    assert make().num_parameters() == base + V * d + 2 * (T + 1) * d


@pytest.mark.parametrize(("positional", "mlp"), list(itertools.product(POSITIONAL, [False, True])))
def test_causal_for_every_positional_scheme(positional, mlp):
    # Editing tokens >= 60 must leave the logits of positions < 60 unchanged
    # (the official min_model once was not), on both attention paths.
    model = make(positional=positional, mlp=mlp, n_heads=2).eval()
    tokens = torch.randint(0, 3, (4, 100), generator=torch.Generator().manual_seed(1))
    edited = perturbed_after(tokens, 60, 3)
    with torch.no_grad():
        for return_attention in (False, True):
            out, out_edited = (
                model(t, return_attention=return_attention) for t in (tokens, edited)
            )
            if return_attention:
                out, out_edited = out[0], out_edited[0]
            torch.testing.assert_close(out[:, :60], out_edited[:, :60], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, 60:], out_edited[:, 60:])


@pytest.mark.parametrize("positional", POSITIONAL)
def test_causal_in_training_mode(positional):
    # The training path (explicit attention with dropout): the same dropout masks for both
    # inputs, then the same check as above, and no gradient flows from early outputs to late
    # inputs.
    model = make(positional=positional, mlp=True).train()
    tokens = torch.randint(0, 3, (4, 100), generator=torch.Generator().manual_seed(1))
    outputs = []
    for t in (tokens, perturbed_after(tokens, 60, 3)):
        torch.manual_seed(5)
        outputs.append(model(t))
    torch.testing.assert_close(outputs[0][:, :60], outputs[1][:, :60], rtol=0, atol=1e-6)
    embedded = model.embed(tokens).detach().requires_grad_()
    model.embed = nn.Identity()
    model(embedded)[:, :60].sum().backward()
    assert embedded.grad[:, 60:].abs().max() == 0
    assert embedded.grad[:, :60].abs().max() > 0


@pytest.mark.parametrize("positional", POSITIONAL)
def test_attention_paths_agree_and_weights_are_causal(positional):
    model = make(positional=positional, n_heads=2, mlp=True).eval()
    tokens = torch.randint(0, 3, (3, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = model(tokens)
        explicit, attention = model(tokens, return_attention=True)
    torch.testing.assert_close(fast, explicit, rtol=1e-4, atol=1e-5)
    assert len(attention) == 2
    for weights in attention:
        assert weights.shape == (3, 2, 50, 50)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 50))
        assert weights.triu(1).abs().max() == 0


@pytest.mark.parametrize("T", [5, 9, 14])
def test_relative_scores_match_the_plain_formula(T):
    # score_ij = q_i . r_{min(i - j, max_len)} for j <= i, written out with a gathered table.
    model = make(max_len=8, n_heads=2).eval()  # no dropout on the table
    attn = model.blocks[0].attn
    q = torch.randn(2, 2, T, 8)
    pos = torch.arange(T)
    dist = (pos[:, None] - pos[None, :]).clamp(0, 8)
    table = attn.rel_table[dist].view(T, T, 2, 8)
    expected = torch.einsum("bhie,ijhe->bhij", q, table)
    lower = torch.ones(T, T, dtype=torch.bool).tril()
    torch.testing.assert_close(attn._rel_scores(q)[..., lower], expected[..., lower])


def test_relative_positions_run_beyond_max_len_and_learned_positions_refuse():
    tokens = torch.randint(0, 3, (2, 30))
    assert make(max_len=20)(tokens).shape == (2, 30, 3)
    with pytest.raises(ValueError, match="max_len"):
        make(max_len=20, positional="learned")(tokens)


def test_init_follows_the_reference():
    model = make(d_model=64, max_len=400)
    block = model.blocks[0]
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(block.attn.out.weight.std().item() - 0.01) < 0.001
    assert abs(block.attn.rel_table.std().item() - 0.02) < 0.002
    assert block.attn.qkv.bias is None and block.attn.out.bias is None
    assert model.lm_head.bias is None
    decay, no_decay = model.decay_parameters()
    assert {id(p) for p in decay} == {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)
    }
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_replaceable_input_layer():
    class OneHot(nn.Module):  # a feature input layer: ids -> one-hot -> width 16
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 16)

        def forward(self, tokens):
            return self.proj(nn.functional.one_hot(tokens, 3).float())

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=3), embed=OneHot()).eval()
    tokens = torch.randint(0, 3, (2, 100))
    with torch.no_grad():
        out, edited = model(tokens), model(perturbed_after(tokens, 60, 3))
    assert out.shape == (2, 100, 3)
    torch.testing.assert_close(out[:, :60], edited[:, :60], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="tied"):
        Transformer(TransformerConfig(vocab_size=3, tied=True), embed=OneHot())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 16, "n_heads": 3}, "not divisible by 3 heads"),
        ({"d_model": 16, "first_layer_heads": 5}, "not divisible by 5 heads"),
        ({"positional": "alibi"}, "positional='alibi'"),
        ({"positional": "rotary", "d_model": 6, "n_heads": 2}, "even head width"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": 1.5}, "vocab_size"),
    ],
)
def test_bad_configs_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{"vocab_size": 3, **kwargs})


def test_first_layer_heads():
    model = make(first_layer_heads=2, d_model=32)
    assert [b.attn.n_heads for b in model.blocks] == [2, 1]


def test_dropout_keeps_the_mean_and_rate():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    out = dropout(x, 0.1, training=True)
    assert abs((out == 0).float().mean().item() - 0.1) < 0.003
    assert abs(out.mean().item() - 1.0) < 0.01
    assert dropout(x, 0.1, training=False) is x


def test_predict_returns_log_probs_in_eval_mode():
    task = make_task("ICL-MarkovChain-v0")
    batch = task.sample(4, generator=task.generator(0))
    model = make(dropout=0.5).train()
    log_q = model.predict(batch)
    assert model.training  # restored
    assert not log_q.requires_grad
    torch.testing.assert_close(log_q.logsumexp(-1), torch.zeros(4, 100))
    torch.testing.assert_close(log_q, model.predict(batch))  # no dropout: deterministic
    with pytest.raises(ValueError, match="vocab_size"):
        make(vocab_size=4).predict(batch)


def test_factory_head_dim_mlp_ratio_and_contract_hooks():
    model = make_model(vocab_size=5, seq_len=12, d_model=64, head_dim=16, mlp=True, mlp_ratio=2)
    assert model.config.n_heads == 4 and model.config.mlp_width == 128
    assert model.config.max_len == 12
    with pytest.raises(ValueError, match="head_dim=24"):
        make_model(5, 12, d_model=64, head_dim=24)
    with pytest.raises(ValueError, match="mlp_ratio=0"):
        make_model(5, 12, mlp_ratio=0)
    assert model.input_embedding() is model.embed.weight
    assert make_model(5, 12, tied=True).input_embedding() is None
    task = make_task("ICL-MarkovChain-v0", seq_len=30)
    check = check_model(build_model("baselines.transformer:make_model", task), task)
    assert check.output == "logits" and check.causality_checked and check.attention
    for positional in ("learned", "rotary", "none"):  # every scheme passes the probe
        check_model(build_model(make_model, task, positional=positional, n_heads=2), task)
