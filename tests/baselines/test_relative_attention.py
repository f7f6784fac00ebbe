"""The transformer's relative-attention function against the plain Shaw formula (values and
gradients, chunked, clipped distances), its dropout against replayed 16-bit draws, and the
16-bit dropout law and its independence across vectorised copies (``torch.vmap``)."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.transformer import (
    DROP_LEVELS,
    Transformer,
    TransformerConfig,
    causal_blocks,
    dropout,
    dropout_threshold,
    keep_mask,
    mask_size,
    random_bits,
)


# ------------------------------------------------------------- the relative attention
def plain_relative_attention(model: Transformer, tokens: torch.Tensor, masks=None):
    """The model's forward written out with the Shaw formula on a gathered (T, T, d) table
    (as the official code computes it), optional 0/1 attention masks per layer."""
    x = model.embed(tokens)
    T = x.shape[1]
    pos = torch.arange(T)
    dist = (pos[:, None] - pos[None, :]).clamp(0, model.config.max_len)
    p = model.config.dropout
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        h = block.ln_attn(x)
        B, _, d = h.shape
        H, e = attn.n_heads, attn.head_dim
        q, k, v = attn.qkv(h).view(B, T, 3, H, e).permute(2, 0, 3, 1, 4)
        rel = attn.rel_table[dist].view(T, T, H, e)
        scores = (q @ k.transpose(-1, -2) + torch.einsum("bhie,ijhe->bhij", q, rel)) / math.sqrt(e)
        weights = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
        weights = weights.softmax(-1)
        if masks is not None:
            weights = weights * masks[layer] / (1 - dropout_threshold(p)[0] / DROP_LEVELS)
        x = x + attn.out((weights @ v).transpose(1, 2).reshape(B, T, d))
    return model.lm_head(model.ln_f(x))


@pytest.mark.parametrize(("heads", "T", "max_len", "B"), [(1, 100, 100, 37), (2, 30, 20, 5)])
def test_relative_attention_matches_the_plain_formula(heads, T, max_len, B):
    """Values and gradients in float64, on more sequences than one chunk holds (37 > 16) and
    with distances clipped at max_len (T=30 > 20)."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=3, max_len=max_len, n_heads=heads, dropout=0.0)
    model = Transformer(config).double()
    tokens = torch.randint(0, 3, (B, T))
    out, expected = model(tokens), plain_relative_attention(model, tokens)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    grads = torch.autograd.grad(out.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        logits, attention = model.eval()(tokens, return_attention=True)
    torch.testing.assert_close(logits, expected.detach(), rtol=1e-10, atol=1e-12)
    assert attention[0].shape == (B, heads, T, T) and attention[0].triu(1).abs().max() == 0


def replayed_masks(T: int, B: int, drop: int) -> torch.Tensor:
    """(B, 1, T, T) 0/1 keep masks from the draws the function takes for one layer: per
    sequence, one (L - s, L) block of draws per causal block, zero elsewhere."""
    bits = random_bits(torch.zeros(1), (1, 1, B, mask_size(T)))[0, 0]
    masks = torch.zeros(B, T, T, dtype=torch.float64)
    for s, L, offset in causal_blocks(T):
        block = bits[:, offset : offset + (L - s) * L].reshape(B, L - s, L)
        masks[:, s:L, :L] = keep_mask(block, drop, torch.float64)
    return masks.unsqueeze(1)


@pytest.mark.parametrize("T", [40, 17])  # two causal blocks, one
def test_relative_attention_dropout_applies_the_drawn_masks(T):
    """In training mode the function drops exactly the entries its 16-bit draws select: the
    same draws through the plain formula give the same values and gradients."""
    assert [b[:2] for b in causal_blocks(40)] == [(0, 20), (20, 40)]
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=3, max_len=T, dropout=0.3)).double()
    for module in model.modules():  # attention dropout only: the other masks are not replayed
        if module is not model and hasattr(module, "p"):
            module.p = 0.0
    tokens = torch.randint(0, 3, (20, T))
    torch.manual_seed(1)
    out = model(tokens)
    torch.manual_seed(1)  # the draws of the two layers, in order
    drop = dropout_threshold(0.3)[0]
    masks = [replayed_masks(T, 20, drop) for _ in range(2)]
    expected = plain_relative_attention(model, tokens, masks)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    for g, e in zip(
        torch.autograd.grad(out.sum(), params),
        torch.autograd.grad(expected.sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
    assert 0.25 < 1 - masks[0].tril().sum().item() / (20 * T * (T + 1) / 2) < 0.35


# ------------------------------------------------------------------------- dropout law
def test_dropout_masks_keep_the_law_and_are_independent_across_copies():
    drop, scale = dropout_threshold(0.1)
    assert drop == 6554 and scale == pytest.approx(1 / (1 - 6554 / 65536))
    torch.manual_seed(0)
    x = torch.ones(4, 250_000)
    out = torch.vmap(lambda v: dropout(v, 0.1, True), randomness="different")(x)
    kept = out != 0
    rate = 1 - kept.float().mean(1)  # per copy; se = sqrt(0.1 * 0.9 / 250000) = 6e-4
    assert (rate - drop / DROP_LEVELS).abs().max() < 0.003
    assert out.mean(1).sub(1).abs().max() < 0.005  # E = 1: the scale is exact
    assert out.unique().tolist() == [0.0, pytest.approx(scale)]
    # independent copies: agreement of two masks = p^2 + (1-p)^2, far from 1 (identical masks)
    agree = (kept[0] == kept[1]).float().mean().item()
    assert agree == pytest.approx(0.1**2 + 0.9**2, abs=0.005)
    with pytest.raises(RuntimeError, match="randomness"):  # vmap refuses silent shared masks
        torch.vmap(lambda v: dropout(v, 0.1, True))(x)
