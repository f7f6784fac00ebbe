"""Mechanistic probes on attention patterns (the induction-head circuit of Edelman et al. 2024).

A statistical induction head is two attention layers: layer 1 copies the previous token into
each position (a previous-token head), layer 2 attends from the current token x_t to the
positions s that followed an earlier occurrence of x_t (x_{s-1} = x_t) and reads off x_s, which
is an in-context bigram count. The two scores below measure how much attention mass follows
each of those patterns; both lie in [0, 1].
"""

from __future__ import annotations

from torch import Tensor


def previous_token_score(attention: Tensor) -> float:
    """Mean attention mass on position t - 1, over queries t >= 1 and the batch.

    ``attention`` is one layer's (B, H, T, T) weights (rows are queries); with several heads
    the best head counts, because one previous-token head suffices.
    """
    mass = attention.diagonal(offset=-1, dim1=-2, dim2=-1)  # (B, H, T - 1): A[t, t-1]
    return mass.mean(dim=(0, 2)).max().item()


def induction_score(attention: Tensor, tokens: Tensor) -> float:
    """Mean attention mass on keys s with x_{s-1} = x_t, over queries with such a key.

    ``attention`` is one layer's (B, H, T, T) weights, ``tokens`` the (B, T) input; keys
    s = 1..t are eligible (causal). Queries without a matching key are skipped, since no
    pattern can put mass there. With several heads the best head counts.
    """
    T = tokens.shape[1]
    # Index [b, t - 1, s - 1] for query t = 1..T-1 and key s = 1..T-1: x_{s-1} == x_t.
    match = tokens[:, None, :-1] == tokens[:, 1:, None]
    match &= tokens.new_ones(T - 1, T - 1, dtype=bool).tril()  # causal: key s <= query t
    queries = match.any(-1)  # (B, T-1)
    mass = (attention[:, :, 1:, 1:] * match[:, None]).sum(-1)  # (B, H, T-1)
    per_head = mass.sum(dim=(0, 2)) / queries.sum().clamp_min(1)  # mass is 0 off-query
    return per_head.max().item()
