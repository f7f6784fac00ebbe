"""Decision-pretrained transformer (DPT; Lee et al. 2023, *Supervised Pretraining Can Learn
In-Context Reinforcement Learning*, arXiv 2306.14892), in its streaming form for iclgym's
exogenous-token tasks (the ``lee2023`` recipe, ``docs/recipes.md``).

**Mapping** (iclgym's). One task is one draw of the generator's parameters (a Markov
table, ...); the stream x_0, x_1, ... is exogenous, so a prediction never changes the next
token and DPT reduces to an in-context predictor trained with privileged labels. A transition
is (s_i, a_i, r_i, s'_i) with the state s_i the last ``state_len`` tokens up to x_i (n - 1 for
an order-n chain) and s'_i = x_{i+1}. The behaviour action and reward carry no information
about the task beyond s'_i, so this model drops their slots (a zero ablation: legitimate, and
cheaper).

**Streaming DPT** (an iclgym design): a causal GPT-2-style transformer over the
transition stream. Element t embeds the transition that ends at x_t, i.e. the one-hot codes of
[s_{t-1}; s'_{t-1} = x_t] = x_{t - state_len} .. x_t (PAD before the sequence start) through
one Linear, as the original embeds [s, a, s', r]; learned absolute positions are added (as
GPT-2's ``inputs_embeds`` path does). Position t predicts the label for the query state s_t
from the transitions up to t, so every position trains at once and the model plugs into the
env's step loop. The label is the trainer's switch (:attr:`iclgym.harness.TrainConfig.labels`):
``soft`` (the true law p_phi(. | s_t), the default of the ``lee2023`` recipe: its population
minimiser is the posterior predictive, the Bayes log-loss predictor), ``hard`` (argmax of the
true law, faithful DPT's optimal action a*; its argmax is posterior sampling's mode, not the
Bayes 0-1 prediction) or ``sampled`` (the realised token, plain next-token training in DPT's
input format).

**Differences from the original code** (``jon--lee/decision-pretrained-transformer`` @
15172df): plain torch blocks (:mod:`baselines.transformer`) instead of Hugging Face GPT-2 (no
``transformers`` dependency); the head count is a real parameter (the original hard-codes 1
and ignores ``--head``); the faithful variant (query first, one query per sequence, the label
repeated at every prefix) is not built here: under the model contract every position is a
next-token prediction, which is the streaming form.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from baselines.transformer import Transformer, TransformerConfig
from iclgym.harness.model import ModelPredictor, load_predictor
from iclgym.tasks.base import Task
from iclgym.validation import as_int


class TransitionEmbedding(nn.Module):
    """(B, T) token ids -> (B, T, d_model): element t is ``Linear([onehot(x_{t-m}); ...;
    onehot(x_t)])`` with m = ``state_len`` (the transition s_{t-1} -> x_t), computed as a sum
    of m + 1 embedding lookups (one table per slot, PAD id V before the sequence start) plus a
    bias: the same map as the Linear on the concatenated one-hot codes, without building
    them. Init: PyTorch's Linear init for fan-in (m + 1) (V + 1)."""

    def __init__(self, vocab_size: int, state_len: int, d_model: int) -> None:
        super().__init__()
        self.vocab_size = as_int("vocab_size", vocab_size, 1)
        self.state_len = as_int("state_len", state_len, 1)
        slots, width = self.state_len + 1, self.vocab_size + 1
        self.table = nn.Embedding(slots * width, d_model)
        self.bias = nn.Parameter(torch.zeros(d_model))
        bound = (slots * width) ** -0.5
        nn.init.uniform_(self.table.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)
        self.register_buffer("offsets", torch.arange(slots) * width, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, T) int64 -> (B, T, d_model)."""
        m = self.state_len
        pad = tokens.new_full((tokens.shape[0], m), self.vocab_size)
        padded = torch.cat([pad, tokens], 1)
        window = padded.unfold(1, m + 1, 1)  # (B, T, m + 1): x_{t-m} .. x_t
        return self.table(window + self.offsets).sum(2) + self.bias


class StreamingDPT(Transformer):
    """The streaming DPT (module docstring): :class:`TransitionEmbedding` -> pre-LN GPT-2-style
    blocks (learned positions, GELU MLP) -> a head of V logits at every position, causal. The
    model contract's ``forward(tokens[, features]) -> (B, T, V)``."""

    def __init__(self, config: TransformerConfig, state_len: int = 1) -> None:
        super().__init__(config, TransitionEmbedding(config.vocab_size, state_len, config.d_model))
        self.state_len = state_len


def make_model(
    vocab_size: int,
    seq_len: int,
    state_len: int = 1,
    d_model: int = 32,
    n_layers: int = 3,
    n_heads: int = 1,
    dropout: float = 0.0,
    feature_dim: int = 0,
) -> StreamingDPT:
    """The factory of the model contract (``iclgym train --model dpt``). Defaults: the
    original's ``--embd 32 --layer 3``, one head (what it really runs; ``n_heads`` is a real
    parameter here), dropout 0, GPT-2 blocks (GELU MLP 4x, learned positions over
    ``seq_len``). ``state_len``: tokens per state (n - 1 for an order-n chain). Raises
    ``ValueError`` for invalid sizes."""
    config = TransformerConfig(
        vocab_size=vocab_size,
        max_len=seq_len,
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        mlp=True,
        activation="gelu",
        dropout=dropout,
        positional="learned",
        feature_dim=feature_dim,
    )
    return StreamingDPT(config, state_len)


def from_text(text: str, task: Task) -> ModelPredictor:
    """``RUN`` (the part after ``dpt:`` on the command line): the checkpoint of a run folder
    of ``iclgym train --model dpt`` (or ``--recipe lee2023``), named ``dpt:RUN``. Raises
    ``ValueError`` when the checkpoint holds another model."""
    predictor = load_predictor(text, task)
    if not isinstance(predictor.model, StreamingDPT):
        raise ValueError(
            f"dpt:{text} holds a {type(predictor.model).__name__}, not a streaming DPT: use "
            f"--predictor checkpoint:{text}"
        )
    predictor.name = f"dpt:{text}"
    return predictor


class DPTAgent:
    """A trained streaming DPT acting in an iclgym env's step loop (DPT's online
    deployment): from the ``observation="context"`` observation (tokens x_0 .. x_t then PAD,
    as an array (T + 1,) or a batch (N, T + 1) of a vector env; a Dict with ``"tokens"`` and
    ``"features"`` for a feature task) it reads the model's law at t and returns the action
    of ``mode``: ``"greedy"`` (argmax, the first token on ties), ``"sample"`` (a draw from
    softmax(logits / temperature), seeded by ``seed``) or ``"distribution"`` (that law, for
    ``action="distribution"`` envs). With full-information feedback the revealed prefix is the
    same offline and online, so this is both deployments. Raises ``ValueError`` for another
    mode, a temperature <= 0, or an observation without revealed tokens."""

    MODES = ("greedy", "sample", "distribution")

    def __init__(
        self, model: nn.Module, mode: str = "greedy", temperature: float = 1.0, seed: int = 0
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode={mode!r} is invalid: expected one of {self.MODES}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected a float > 0")
        self.model, self.mode, self.temperature = model, mode, float(temperature)
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab_size = model.config.vocab_size

    @torch.no_grad()
    def act(self, observation: Any) -> Any:
        features = None
        if isinstance(observation, dict):
            observation, features = observation["tokens"], observation["features"]
        tokens = torch.as_tensor(np.asarray(observation), dtype=torch.long)
        single = tokens.dim() == 1
        tokens = tokens[None] if single else tokens
        revealed = (tokens != self.vocab_size).sum(1)  # PAD = V after the revealed prefix
        if (revealed == 0).any():
            raise ValueError("the observation reveals no token: use observation='context'")
        t = int(revealed.max()) - 1
        inputs = [tokens[:, : t + 1].clamp_max(self.vocab_size - 1)]
        if features is not None:
            f = torch.as_tensor(np.asarray(features), dtype=torch.float32)
            inputs.append((f[None] if single else f)[:, : t + 1])
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(*inputs).float()
        finally:
            self.model.train(was_training)
        rows = torch.arange(tokens.shape[0])
        logits = logits[rows, revealed - 1]  # each row's last revealed position
        if self.mode == "greedy":
            action = logits.argmax(-1).numpy()
        elif self.mode == "sample":
            probs = (logits / self.temperature).softmax(-1)
            action = torch.multinomial(probs, 1, generator=self.generator)[:, 0].numpy()
        else:
            action = (logits / self.temperature).softmax(-1).numpy().astype(np.float32)
        return action[0] if single else action
