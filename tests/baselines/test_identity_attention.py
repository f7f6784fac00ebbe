"""The two identity scalars, bidirectional attention and the template init of the transformer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.transformer import Transformer, TransformerConfig


def template_model(seed=0, **kwargs):
    settings = {
        "vocab_size": 11,
        "max_len": 5,
        "n_layers": 2,
        "n_heads": 2,
        "d_model": 8,
        "mlp": True,
        "mlp_width": 16,
        "activation": "gelu",
        "dropout": 0.0,
        "positional": "learned",
        "causal": False,
        "init": "default",
        **kwargs,
    }
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(**settings))


TOKENS = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))


def test_identity_scalars_start_at_zero_and_leave_the_function_unchanged():
    plain = template_model()
    both = template_model(kq_identity=True, vo_identity=True)
    for block in both.blocks:
        assert torch.equal(block.attn.kq_identity_scale, torch.zeros(2))
        assert torch.equal(block.attn.vo_identity_scale, torch.zeros(2))
    missing = both.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing.missing_keys) == sorted(
        f"blocks.{i}.attn.{n}_identity_scale" for i in range(2) for n in ("kq", "vo")
    )
    with torch.no_grad():
        torch.testing.assert_close(both(TOKENS), plain(TOKENS))
    assert both.num_parameters() == plain.num_parameters() + 2 * 2 * 2
    loss = both(TOKENS).sum()
    loss.backward()
    assert all(b.attn.kq_identity_scale.grad.abs().sum() > 0 for b in both.blocks)
    assert all(b.attn.vo_identity_scale.grad.abs().sum() > 0 for b in both.blocks)


def reference_attention(attn, x, causal):
    """Boix-Adserà et al. 2024's formulas (its reference code) written out per head: logits s <q_i,
    k_j> + c_KQ a_h <x_i, x_j>, output W_O concat_h(A_h v) + c_VO sum_h b_h A_h x."""
    _B, T, d = x.shape
    H, e = attn.n_heads, attn.head_dim
    wq, wk, wv = attn.qkv.weight.split(d)
    a = getattr(attn, "kq_identity_scale", torch.zeros(H)) * getattr(attn, "kq_mult", 1.0)
    b = getattr(attn, "vo_identity_scale", torch.zeros(H)) * getattr(attn, "vo_mult", 1.0)
    heads, skip = [], torch.zeros_like(x)
    for h in range(H):
        rows = slice(h * e, (h + 1) * e)
        q, k, v = x @ wq[rows].T, x @ wk[rows].T, x @ wv[rows].T
        logits = q @ k.transpose(1, 2) / math.sqrt(e) + a[h] * (x @ x.transpose(1, 2))
        if causal:
            logits = logits.masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
        weights = logits.softmax(-1)
        heads.append(weights @ v)
        skip = skip + b[h] * (weights @ x)
    return F.linear(torch.cat(heads, -1), attn.out.weight) + skip


@pytest.mark.parametrize("mult", [1.0, 30.0])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("kq", "vo"), [(True, False), (False, True), (True, True)])
def test_identity_terms_match_the_spec_formula(causal, kq, vo, mult):
    model = template_model(
        kq_identity=kq, vo_identity=vo, causal=causal, kq_identity_mult=mult, vo_identity_mult=mult
    )
    attn = model.blocks[0].attn
    with torch.no_grad():
        if kq:
            attn.kq_identity_scale.copy_(torch.tensor([0.3, -0.2]))
        if vo:
            attn.vo_identity_scale.copy_(torch.tensor([0.7, 1.5]))
        x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
        for return_attention in (False, True):
            out, _ = attn(x, return_attention)
            torch.testing.assert_close(out, reference_attention(attn, x, causal))


def test_bidirectional_attention_sees_later_tokens_and_causal_does_not():
    edited = TOKENS.clone()
    edited[:, -1] = (edited[:, -1] + 1) % 11
    with torch.no_grad():
        for causal in (False, True):
            model = template_model(causal=causal, kq_identity=True).eval()
            changed = (model(TOKENS)[:, 0] - model(edited)[:, 0]).abs().max() > 1e-6
            assert changed == (not causal)


def test_template_options_init_and_errors():
    model = template_model(n_outputs=1)
    assert model(TOKENS).shape == (3, 5, 1)
    assert abs(model.embed.weight.std().item() - 1.0) < 0.3  # N(0, 1) embeddings
    assert model.blocks[0].mlp.up.out_features == 16
    with pytest.raises(ValueError, match="next-token logits"):
        model.predict(None)
    with pytest.raises(ValueError, match="relative"):
        TransformerConfig(vocab_size=3, causal=False)
    with pytest.raises(ValueError, match="activation"):
        TransformerConfig(vocab_size=3, activation="tanh")
    with pytest.raises(ValueError, match="init"):
        TransformerConfig(vocab_size=3, init="xavier")
    with pytest.raises(ValueError, match="n_outputs"):
        TransformerConfig(vocab_size=3, tied=True, n_outputs=1)
    for bad in (0.0, -1.0, math.inf, True):
        with pytest.raises(ValueError, match="vo_identity_mult"):
            TransformerConfig(vocab_size=3, vo_identity_mult=bad)
