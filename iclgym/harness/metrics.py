"""Per-position scoring functions shared by the harness, the envs and the training loop.

All take log-probabilities (natural log) over the last axis and return one value per position.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cross_entropy(log_q: Tensor, targets: Tensor) -> Tensor:
    """-log q(target) at every position, nats; shape of ``targets``."""
    return -log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl_divergence(p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_j p_j (log p_j - log q_j), with 0 log 0 = 0; probabilities ``p``."""
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


def kl_divergence_log(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) for log-probabilities ``log_p`` (entries of -inf contribute 0)."""
    p = log_p.exp()
    return (p * (log_p - log_q)).nan_to_num_(0.0, posinf=0.0, neginf=0.0).sum(-1)


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy -sum p log p, nats."""
    return -torch.xlogy(p, p).sum(-1)


def accuracy(log_q: Tensor, targets: Tensor) -> Tensor:
    """1.0 where the argmax prediction equals the target (first index wins ties)."""
    return (log_q.argmax(-1) == targets).to(torch.float32)
