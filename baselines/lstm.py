"""An LSTM baseline, readable top to bottom: embedding -> LSTM layers -> linear head.

The recurrent comparison of the templates paper (Boix-Adserà et al. 2024 and its reference
code: "a ReLU Elman RNN, an LSTM") and the sequence
model behind stable-baselines3's recurrent agents. Causal by construction: the state at
position t has read ``tokens[:, : t + 1]`` only, so it suits every task of the model contract
(:mod:`iclgym.harness.model`): (B, T) ids -> (B, T, V) logits, or (B, T, 1) values with
``n_outputs=1``.

The cell is written out (gates named after the maths, one ``nn.Linear`` for the input and one
for the recurrent weights of each layer) instead of calling ``nn.LSTM``, so the module is plain
parameters and tensor ops, which ``torch.func.functional_call`` and ``vmap`` can map over
stacked copies. Per layer and position t (sigma the logistic function):

    i, f, g, o = split(W x_t + b + U h_{t-1})
    c_t = sigma(f) * c_{t-1} + sigma(i) * tanh(g)
    h_t = sigma(o) * tanh(c_t)

with h_{-1} = c_{-1} = 0. Init: PyTorch's ``nn.LSTM`` law (uniform in +-1/sqrt(hidden)) for the
cell, N(0, 1) for the token embedding, PyTorch's Linear init for the head; the forget-gate bias
starts at 1 (Jozefowicz et al. 2015).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from iclgym.validation import as_float, as_int


@dataclass(frozen=True)
class LSTMConfig:
    """Architecture of :class:`LSTM`.

    Attributes:
        vocab_size: token ids V (the input and, by default, the output size).
        hidden_size: width of the embedding and of every layer's state.
        n_layers: stacked LSTM layers.
        n_outputs: size of the head (None = vocab_size; 1 for a value head).
        dropout: rate between layers and before the head (0 = none).
        feature_dim: F >= 0, the width of the task's continuous features (0: token-only); a
            Linear map of the features at t is added to token t's embedding.
    """

    vocab_size: int
    hidden_size: int = 128
    n_layers: int = 1
    n_outputs: int | None = None
    dropout: float = 0.0
    feature_dim: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "n_layers"):
            as_int(name, getattr(self, name), 1)
        as_int("feature_dim", self.feature_dim, 0)
        if self.n_outputs is not None:
            as_int("n_outputs", self.n_outputs, 1)
        as_float("dropout", self.dropout, 0.0, 1.0, high_open=True)


class LSTMLayer(nn.Module):
    """One LSTM layer over a whole sequence: (B, T, d) -> (B, T, d)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.input = nn.Linear(size, 4 * size)  # W and b, all four gates stacked (i, f, g, o)
        self.recurrent = nn.Linear(size, 4 * size, bias=False)  # U
        bound = 1.0 / math.sqrt(size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():
            self.input.bias[size : 2 * size].fill_(1.0)  # forget gate open at the start

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        pre = self.input(x)  # the input part of every gate at once: (B, T, 4d)
        h = c = x.new_zeros(B, self.size)
        states = []
        for t in range(T):
            i, f, g, o = (pre[:, t] + self.recurrent(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            states.append(h)
        return torch.stack(states, dim=1)


class LSTM(nn.Module):
    """Token embedding -> ``n_layers`` LSTM layers -> linear head, at every position."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)  # N(0, 1) init
        if config.feature_dim:
            self.feature_embed = nn.Linear(config.feature_dim, config.hidden_size)
        self.layers = nn.ModuleList(LSTMLayer(config.hidden_size) for _ in range(config.n_layers))
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.n_outputs or config.vocab_size)

    def forward(self, tokens: Tensor, features: Tensor | None = None) -> Tensor:
        """(B, T) token ids (and features (B, T, F) when ``feature_dim`` > 0) -> (B, T,
        n_outputs) outputs (logits or values). Raises ``ValueError`` for a missing or
        unexpected feature input."""
        if (features is None) != (self.config.feature_dim == 0):
            raise ValueError(f"this model has feature_dim={self.config.feature_dim}")
        x = self.embed(tokens)
        if features is not None:
            x = x + self.feature_embed(features)
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else self.drop(x))
        return self.head(self.drop(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def input_embedding(self) -> Tensor:
        """The token embedding (V, hidden_size)."""
        return self.embed.weight


def make_model(
    vocab_size: int,
    seq_len: int,
    hidden_size: int = 128,
    n_layers: int = 1,
    n_outputs: int | None = None,
    dropout: float = 0.0,
    feature_dim: int = 0,
) -> LSTM:
    """The factory of the model contract (``iclgym train --model lstm``); ``seq_len`` is not
    needed (an LSTM runs on any length). The other arguments are :class:`LSTMConfig`'s."""
    return LSTM(LSTMConfig(vocab_size, hidden_size, n_layers, n_outputs, dropout, feature_dim))
