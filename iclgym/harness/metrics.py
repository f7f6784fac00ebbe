"""Per-position scoring functions shared by the harness, the envs and the training loop.

All take log-probabilities (natural log) over the last axis and return one value per position.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cross_entropy(log_q: Tensor, targets: Tensor) -> Tensor:
    """-log q(target) at every position, nats; shape of ``targets``."""
    return -log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl_divergence(p: Tensor, log_q: Tensor, log_p: Tensor | None = None) -> Tensor:
    """KL(p || q) = sum_j p_j (log p_j - log q_j) over the last axis, nats, for probabilities
    ``p`` and log-probabilities ``log_q`` (``log_p``: log p when at hand, saves a log). Entries
    with p_j = 0 contribute 0 whatever q_j is (0 log 0 = 0, also against q_j = 0); an entry
    with p_j > 0 and q_j = 0 makes the KL +inf. The one KL of the harness (``evaluate``)."""
    log_p = torch.log(p) if log_p is None else log_p
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=log_q.dtype))
    return terms.sum(-1)


def kl_divergence_log(log_p: Tensor, log_q: Tensor) -> Tensor:
    """:func:`kl_divergence` from log-probabilities ``log_p`` (entries of -inf contribute 0)."""
    return kl_divergence(log_p.exp(), log_q, log_p)


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy -sum p log p, nats."""
    return -torch.xlogy(p, p).sum(-1)


def accuracy(log_q: Tensor, targets: Tensor) -> Tensor:
    """1.0 where the argmax prediction equals the target (first index wins ties)."""
    return (log_q.argmax(-1) == targets).to(torch.float32)
