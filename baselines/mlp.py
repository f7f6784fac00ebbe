"""A fully connected baseline for fixed-length tasks: one-hot concat -> ReLU MLP.

The input is the concatenation of the one-hot codes of the T tokens (T * V features); the
first Linear layer is computed as a sum of T embedding lookups (row ``t * V + token``), which
is the same map without building the one-hot matrix. The rows of tokens never seen in
training get no gradient, so on unseen symbols the network acts with its random init: the
failure that target T1 of ``docs/results/symbol-templates.md`` reproduces.

It reads the whole sequence, so it is bidirectional: under the model contract
(:mod:`iclgym.harness.model`) it suits tasks that score one position per sequence (template
labels). Its one prediction is broadcast over the T positions: (B, T, n_outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MLPConfig:
    """Architecture of :class:`MLP`.

    Attributes:
        vocab_size: token ids V per position.
        seq_len: positions T of the input.
        n_outputs: output size (1 for a value head, V for next-token logits).
        width: hidden width of each ReLU layer.
        depth: number of hidden ReLU layers.
        feature_dim: F >= 0, the width of the task's continuous features (0: token-only); the
            flattened features (T * F) then feed the first layer beside the one-hot codes.
    """

    vocab_size: int
    seq_len: int
    n_outputs: int = 1
    width: int = 256
    depth: int = 2
    feature_dim: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_outputs", "width", "depth", "feature_dim"):
            value, low = getattr(self, name), 0 if name == "feature_dim" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= {low}")


class MLP(nn.Module):
    """``out = W_k relu(... relu(W_1 onehot(x) + b_1) ...)``; PyTorch's default Linear init
    (the first layer's rows uniform in +-1/sqrt(T * V), as a Linear of that fan-in)."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        fan_in = config.seq_len * config.vocab_size
        self.embed = nn.Embedding(fan_in, config.width)  # the first layer's weight, transposed
        self.bias = nn.Parameter(torch.empty(config.width))
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.embed.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)
        if config.feature_dim:  # PyTorch's Linear init for its own fan-in
            self.feature_in = nn.Linear(config.seq_len * config.feature_dim, config.width, False)
        self.hidden = nn.ModuleList(
            nn.Linear(config.width, config.width) for _ in range(config.depth - 1)
        )
        self.head = nn.Linear(config.width, config.n_outputs)
        self.register_buffer(
            "offsets", torch.arange(config.seq_len) * config.vocab_size, persistent=False
        )

    def features(self, tokens: Tensor, inputs: Tensor | None = None) -> Tensor:
        """(B, T) token ids (and, with ``feature_dim`` F > 0, the continuous ``inputs`` (B, T,
        F)) -> (B, n_outputs): the network's one prediction per sequence. Raises
        ``ValueError`` for another length or a missing / unexpected feature input."""
        if tokens.shape[1] != self.config.seq_len:
            raise ValueError(f"expected {self.config.seq_len} tokens, got {tokens.shape[1]}")
        if (inputs is None) != (self.config.feature_dim == 0):
            raise ValueError(f"this model has feature_dim={self.config.feature_dim}")
        pre = self.embed(tokens + self.offsets).sum(1) + self.bias
        if inputs is not None:
            pre = pre + self.feature_in(inputs.flatten(1))
        h = F.relu(pre)
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.head(h)

    def forward(self, tokens: Tensor, features: Tensor | None = None) -> Tensor:
        """(B, T) token ids (and features (B, T, F) when ``feature_dim`` > 0) -> (B, T,
        n_outputs), the prediction repeated at every position."""
        out = self.features(tokens, features)
        return out[:, None, :].expand(-1, tokens.shape[1], -1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def input_embedding(self) -> Tensor:
        """The first layer's weight as (V, T, width): row ``v`` holds token v's weights at
        every position (zero-gradient rows for tokens never seen in training)."""
        c = self.config
        return self.embed.weight.view(c.seq_len, c.vocab_size, c.width).transpose(0, 1)


def make_model(
    vocab_size: int,
    seq_len: int,
    n_outputs: int | None = None,
    width: int = 256,
    depth: int = 2,
    feature_dim: int = 0,
) -> MLP:
    """The factory of the model contract (``iclgym train --model mlp``): ``n_outputs`` None
    means V logits; 1 is a value head for tasks with real-valued labels; ``feature_dim`` is
    the task's (given by the harness for feature tasks)."""
    return MLP(MLPConfig(vocab_size, seq_len, n_outputs or vocab_size, width, depth, feature_dim))
