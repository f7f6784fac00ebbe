"""The one-layer attention model of token-priority graphs (Li, Huang, Ildiz, Rawat, Oymak 2024,
*Mechanics of Next Token Prediction with Self-Attention*, arXiv 2403.08081;
the reference code's ``MLayerAttn`` with one layer).

Fixed token embeddings E (K, d) (a buffer, never trained) and one trained matrix W (d, d), the
weight of a bias-free ``nn.Linear(d, d)`` (PyTorch's default init U(-1/sqrt d, 1/sqrt d)), so
the score of position s under the query x_t is ``a_s = x_s^T W x_t`` (PyTorch's layout). At every
position t the model reads the prefix x_0 .. x_t with query x_t (causal: the task scores only
the last position T - 1, where the whole context is read, the query included):

- ``s = softmax_{s <= t}(a_s)``, ``f = sum_s s_s x_s`` (identity value);
- head ``iden`` (the global figures): ``p_hat_j = sum_{s: x_s = j} s_s`` (attention summed per
  token id, the dual-basis linear head ``E (E^T E)^+``); the output is ``log(p_hat + eps)`` as
  logits, so the trainer's cross-entropy is ``-log(p_hat_y + eps) + log(1 + K eps)``: the
  paper's ``nll`` up to a constant (the same gradients), and evaluation reads ``(p_hat + eps) /
  (1 + K eps)``;
- head ``gen`` (the local runs): logits ``E f``, trained with the trainer's softmax
  cross-entropy: the paper's ``ce``.

The paper's third loss, ``lsq2 = (1 - softmax(E f)_y)^2``, is :func:`paper_loss` (the trainer's
squared loss of a probability output is ``1/2 ||f - e_y||^2``, a different function).
Everything runs in the parameters' dtype: the paper's protocol is float64 (``--dtype float64``,
recipe ``li2024``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iclgym.tasks.priority_graph_theory import EMBEDDINGS, paper_embeddings
from iclgym.validation import as_float, as_int, invalid

HEADS = ("iden", "gen")
LOSSES = ("nll", "ce", "lsq2")


class PriorityAttention(nn.Module):
    """One attention layer with combined key-query W over fixed embeddings (module docstring).

    Args:
        embeddings: (K, d) fixed token embeddings (any float array; stored as a buffer).
        head: ``"iden"`` or ``"gen"``.
        eps: the ``nll`` floor of the ``iden`` head, > 0 (keeps absent tokens finite).

    ``forward(tokens (B, T) int64) -> (B, T, K)`` logits; ``forward(tokens,
    return_attention=True)`` also returns ``[(B, 1, T, T)]`` (rows are queries).
    """

    iclgym_output = "logits"

    def __init__(self, embeddings: Any, head: str = "iden", eps: float = 1e-12) -> None:
        super().__init__()
        e = torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
        if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1 or not torch.isfinite(e).all():
            raise invalid("embeddings", f"an array of shape {tuple(e.shape)}", "finite (K, d)")
        if head not in HEADS:
            raise invalid("head", head, f"one of {', '.join(map(repr, HEADS))}")
        self.head = head
        self.eps = as_float("eps", eps, 0.0, low_open=True)
        self.register_buffer("embeddings", e)  # float64 until the module is cast
        self.W = nn.Linear(e.shape[1], e.shape[1], bias=False)

    @property
    def weight(self) -> Tensor:
        """(d, d) W."""
        return self.W.weight

    def _table(self) -> Tensor:
        return self.embeddings.to(self.W.weight.dtype)

    def token_scores(self) -> Tensor:
        """(K, K) ``beta[k, j] = E[j]^T W E[k]``: the score of token j under query k."""
        e = self._table()
        return self.W(e) @ e.T  # [k, j] = (W e_k) . e_j

    def attention(self, tokens: Tensor) -> Tensor:
        """(B, T, T) causal attention: row t is the softmax over s <= t of ``x_s^T W x_t``
        (read from the (K, K) token scores: the same numbers as the (B, T, T) products)."""
        t = tokens.shape[1]
        by_query = self.token_scores()[tokens]  # (B, T, K): row t scores every token under x_t
        scores = by_query.gather(2, tokens[:, None, :].expand(-1, t, -1))  # [b, t, s]
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)

    def forward(self, tokens: Tensor, return_attention: bool = False) -> Any:
        attn = self.attention(tokens)
        if self.head == "iden":
            b, t = tokens.shape
            k = self.embeddings.shape[0]
            index = tokens[:, None, :].expand(-1, t, -1)
            p_hat = attn.new_zeros(b, t, k).scatter_add(2, index, attn)  # per-token sums
            out = torch.log(p_hat + self.eps)
        else:
            e = self._table()
            out = (attn @ e[tokens]) @ e.T  # logits E f, f = X^T s
        return (out, [attn[:, None]]) if return_attention else out

    def input_embedding(self) -> Tensor:
        """The fixed embedding table (K, d): a buffer, never trained."""
        return self.embeddings


def paper_loss(output: Tensor, labels: Tensor, loss: str = "nll", head: str = "iden") -> Tensor:
    """The paper's losses (Li et al. 2024) of a :class:`PriorityAttention` output at the scored
    position, ``output`` (B, K) and ``labels`` (B,) int64, mean over the batch:

    - ``nll`` (``iden`` head): ``-log(p_hat_y + eps)`` = ``-output[y]``;
    - ``ce`` (``gen`` head): ``-log softmax(output)_y``;
    - ``lsq2`` (``gen`` head): ``(1 - softmax(output)_y)^2``.
    Raises ``ValueError`` for an unknown loss or a loss that does not fit the head."""
    if loss not in LOSSES:
        raise invalid("loss", loss, f"one of {', '.join(map(repr, LOSSES))}")
    if (loss == "nll") != (head == "iden"):
        raise invalid("loss", loss, f"'nll' with head 'iden', 'ce' or 'lsq2' with 'gen' ({head=})")
    picked = output.gather(1, labels[:, None])[:, 0]
    if loss == "nll":
        return -picked.mean()
    if loss == "ce":
        return F.cross_entropy(output, labels)
    return (1.0 - torch.softmax(output, -1).gather(1, labels[:, None])[:, 0]).pow(2).mean()


def make_model(
    vocab_size: int,
    seq_len: int,
    d: int = 8,
    embedding: str = "ortho",
    embedding_seed: int = 0,
    embeddings: Any = None,
    head: str = "iden",
    eps: float = 1e-12,
) -> PriorityAttention:
    """Factory for the harness (``--model priority_attention`` or
    ``baselines.priority_attention:make_model``): :class:`PriorityAttention` over
    ``embeddings`` (K, d) when given, else :func:`~iclgym.tasks.priority_graph_theory.
    paper_embeddings` ``(vocab_size, d, embedding, embedding_seed)`` (paper mode: pass the
    task's ``d``, ``embedding`` and ``instance_seed`` to get the dataset's E, or the array
    itself). ``seq_len`` is unused (any context length). Raises ``ValueError`` for bad sizes,
    an unknown embedding or head, or embeddings with another number of rows than
    ``vocab_size``."""
    vocab_size = as_int("vocab_size", vocab_size, 1)
    as_int("seq_len", seq_len, 1)
    if embeddings is None:
        if embedding not in EMBEDDINGS:
            raise invalid("embedding", embedding, f"one of {', '.join(map(repr, EMBEDDINGS))}")
        embeddings = paper_embeddings(vocab_size, d, embedding, embedding_seed)
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] != vocab_size:
        raise invalid("embeddings", f"an array of shape {e.shape}", f"({vocab_size}, d)")
    return PriorityAttention(e, head=head, eps=eps)


__all__ = ["HEADS", "LOSSES", "PriorityAttention", "make_model", "paper_loss"]
