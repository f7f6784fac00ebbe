"""The reference transformer of multi-concept prompts: one softmax attention read at the query,
then a two-layer ReLU MLP with fixed output signs (after Bu et al. 2024, arXiv 2411.02199; a
reconstruction of the paper's two-layer model, ``docs/envs/ICL-MultiConcept-v0.md``: not the
paper's exact model).

With the demonstrations ``e_l = [x_l; u_l]`` (l = 1..L) and the query ``e_q = [x_q; 0]`` in
R^D (D = d + d_y, the task's features: ``features[:, l]`` and ``features[:, L]``):

    s_l = <W_K e_l, W_Q e_q>          (no 1/sqrt(D))
    a   = softmax(s) over the L demonstrations (the query's own slot is not a key)
    o   = sum_l a_l W_V e_l
    f   = (1/sqrt(m)) sum_{r=1..m} rho_r ReLU(<w_r, o>)

with W_Q, W_K, W_V (D, D) and w (m, D) trained, all drawn i.i.d. N(0, init_std^2) with
``init_std = 1/sqrt(D)`` by default (at 0.01 the model does not move), and
rho = (+1 for the first m/2 neurons, -1 for the rest) a buffer, never trained. The model
predicts sign(f); its loss is the logistic loss ``log(1 + exp(-y f))``.

**Output under the model contract** (:mod:`iclgym.harness.model`): logits (B, T, 2), T = L + 1,
with ``[-f/2, f/2]`` at the query (the last position, the only one scored; token 0 is the label
-1, token 1 the label +1) and 0 elsewhere (never read). The harness's softmax cross-entropy is
then the logistic loss exactly:

    -log softmax([-f/2, f/2])_{(y+1)/2} = log(1 + exp(-y f)),   y in {-1, +1},

because ``e^{yf/2} / (e^{f/2} + e^{-f/2}) = 1 / (1 + e^{-yf})``. The token ids are not read:
the demonstrations' labels reach the model only through their label vectors u_l, and the
query's placeholder token carries nothing.

The model takes any T >= 2 (the ``ood_length`` splits, L = 4..64, use the same weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from iclgym.validation import as_float, as_int, invalid

LATENT_KEYS = ("task_concept", "semantic_sign")
"""The latents :func:`correct_attention_weight` reads from ``batch.params`` (k* (B,) and the
signs eps (B, T, K))."""


class ConceptAttention(nn.Module):
    """The reference transformer (module docstring).

    Args:
        feature_dim: D = d + d_y, the width of the task's features, >= 1.
        width: m, the MLP's neurons, an even int >= 2 (half get rho = +1, half -1).
        init_std: standard deviation of the N(0, init_std^2) init of W_Q, W_K, W_V and w;
            None: 1/sqrt(D).

    Parameters ``W_Q``, ``W_K``, ``W_V`` (D, D) and ``w`` (m, D); buffer ``rho`` (m,).
    ``forward(tokens (B, T) int64, features (B, T, D)) -> (B, T, 2)`` logits;
    ``return_attention=True`` also returns ``[(B, 1, T, T)]``. Raises ``ValueError`` for bad
    sizes.
    """

    iclgym_output = "logits"

    def __init__(self, feature_dim: int, width: int = 32, init_std: float | None = None) -> None:
        super().__init__()
        d = as_int("feature_dim", feature_dim, 1)
        m = as_int("width", width, 2)
        if m % 2:
            raise invalid("width", width, "an even int >= 2 (half the neurons have rho = -1)")
        std = (
            1.0 / math.sqrt(d)
            if init_std is None
            else as_float("init_std", init_std, 0.0, low_open=True)
        )
        self.feature_dim, self.width, self.init_std = d, m, std
        self.W_Q = nn.Parameter(torch.randn(d, d) * std)
        self.W_K = nn.Parameter(torch.randn(d, d) * std)
        self.W_V = nn.Parameter(torch.randn(d, d) * std)
        self.w = nn.Parameter(torch.randn(m, d) * std)
        rho = torch.cat((torch.ones(m // 2), -torch.ones(m // 2)))
        self.register_buffer("rho", rho)

    def _check(self, features: Tensor) -> Tensor:
        if features.ndim != 3 or features.shape[1] < 2 or features.shape[2] != self.feature_dim:
            raise ValueError(
                f"features of shape {tuple(features.shape)} are invalid: expected (B, T, "
                f"{self.feature_dim}) with T >= 2 (L >= 1 demonstrations and the query)"
            )
        return features.to(self.W_Q.dtype)

    def query_attention(self, features: Tensor) -> Tensor:
        """(B, T, D) features -> (B, L) attention ``a = softmax_l <W_K e_l, W_Q e_q>`` of the
        query (the last position) over the L = T - 1 demonstrations; rows sum to 1."""
        e = self._check(features)
        keys = e[:, :-1] @ self.W_K.T  # (B, L, D)
        query = e[:, -1] @ self.W_Q.T  # (B, D)
        return torch.softmax(torch.einsum("bld,bd->bl", keys, query), dim=-1)

    def query_output(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, D) features -> (f (B,), a (B, L)): the MLP output at the query and the
        attention it read (module docstring)."""
        e = self._check(features)
        a = self.query_attention(e)
        o = torch.einsum("bl,bld->bd", a, e[:, :-1] @ self.W_V.T)  # sum_l a_l W_V e_l
        f = torch.relu(o @ self.w.T) @ self.rho.to(o.dtype) / math.sqrt(self.width)
        return f, a

    def forward(self, tokens: Tensor, features: Tensor, return_attention: bool = False) -> Any:
        """(B, T) int64 tokens (not read) and (B, T, D) features -> (B, T, 2) logits:
        ``[-f/2, f/2]`` at the last position, 0 before it. With ``return_attention`` also
        ``[A]``, A (B, 1, T, T): row T - 1 holds a over the demonstration columns 0..T-2 (0 on
        the query's own column), every other row is 0 (no other position attends). Built
        without in-place writes (``torch.func.vmap`` maps it over stacked copies)."""
        if tokens.shape != features.shape[:2]:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} do not fit features of shape "
                f"{tuple(features.shape)}: expected (B, T) and (B, T, {self.feature_dim})"
            )
        f, a = self.query_output(features)
        b, t = tokens.shape
        last = torch.stack((-f / 2, f / 2), dim=-1)[:, None]  # (B, 1, 2)
        logits = torch.cat((last.new_zeros(b, t - 1, 2), last), dim=1)
        if not return_attention:
            return logits
        row = torch.cat((a, a.new_zeros(b, 1)), dim=1)[:, None, None]  # (B, 1, 1, T)
        attention = torch.cat((row.new_zeros(b, 1, t - 1, t), row), dim=2)
        return logits, [attention]

    def decay_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Every trained matrix is a weight (the harness's default split would find no
        ``nn.Linear`` and decay nothing under ``--weight-decay``)."""
        return [self.W_Q, self.W_K, self.W_V, self.w], []


@torch.no_grad()
def correct_attention_weight(
    model: ConceptAttention, features: Tensor, params: Mapping[str, Tensor]
) -> Tensor:
    """The "correct attention weight" of Bu et al. 2024's figures (a diagnostic, not a target): per
    prompt, the query's attention mass on the demonstrations whose k*-semantic sign equals the
    query's, ``sum_l a_l [eps_{l,k*} = eps_{q,k*}]``.

    Args:
        model: a :class:`ConceptAttention`.
        features: (B, T, D) the batch's features (``batch.features``).
        params: the batch's latents (``batch.params``): ``task_concept`` (B,) int64 k* and
            ``semantic_sign`` (B, T, K) the signs eps in {-1, +1}.

    Returns (B,) float in [0, 1] (model dtype). Raises ``ValueError`` when a latent is missing or
    its shape does not fit ``features``. Evaluated under ``no_grad``, in the model's current
    mode.
    """
    missing = [k for k in LATENT_KEYS if k not in params]
    if missing:
        raise ValueError(
            f"the batch's params lack {missing}: the correct attention weight needs the latents "
            f"{list(LATENT_KEYS)} of a multi-concept batch"
        )
    concept, sign = params["task_concept"], params["semantic_sign"]
    b, t = features.shape[:2]
    if concept.shape != (b,) or sign.ndim != 3 or sign.shape[:2] != (b, t):
        raise ValueError(
            f"latents task_concept {tuple(concept.shape)} and semantic_sign "
            f"{tuple(sign.shape)} do not fit features {tuple(features.shape)}: expected ({b},) "
            f"and ({b}, {t}, K)"
        )
    a = model.query_attention(features)  # (B, L)
    idx = concept.to(torch.int64).to(sign.device)[:, None, None].expand(-1, t, 1)
    own = sign.gather(2, idx)[..., 0]  # (B, T): eps_{i, k*}
    match = (own[:, :-1] == own[:, -1:]).to(a.dtype).to(a.device)
    return (a * match).sum(-1)


def make_model(
    vocab_size: int,
    seq_len: int,
    feature_dim: int = 0,
    width: int = 32,
    init_std: float | None = None,
) -> ConceptAttention:
    """Factory for the harness (``--model concept_attention``, recipe ``bu2024``):
    :class:`ConceptAttention` over the task's D = ``feature_dim`` features, m = ``width``.
    ``seq_len`` is unused (any T >= 2). Raises ``ValueError`` for ``vocab_size`` other than 2
    (the head is a binary logistic one), for a missing ``feature_dim`` (a token-only task), and
    for bad sizes."""
    if as_int("vocab_size", vocab_size, 1) != 2:
        raise invalid("vocab_size", vocab_size, "2 (the labels -1 and +1 of a binary task)")
    as_int("seq_len", seq_len, 2)
    if not feature_dim:
        raise ValueError(
            f"feature_dim={feature_dim!r} is invalid: this model needs a task with continuous "
            "features (task.feature_dim > 0, e.g. ICL-MultiConcept-v0)"
        )
    return ConceptAttention(feature_dim, width, init_std)


__all__ = ["LATENT_KEYS", "ConceptAttention", "correct_attention_weight", "make_model"]
