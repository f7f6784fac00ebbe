"""A GPT-style causal transformer baseline, readable top to bottom (nanoGPT style).

The default configuration is the reference model of Edelman et al. 2024
(``shared/specs/markov-chain.md`` section 5): 2 layers, attention only, width 16, 1 head,
pre-LayerNorm plus a final LayerNorm, no absolute positions, Shaw-style relative positions
(one table of shape (max_len + 1, d_model) per layer, score (q.k + q.r_{i-j}) / sqrt(d_head)),
bias-free Q/K/V/output/LM head, dropout 0.1, init N(0, 0.02) with output projections
N(0, 0.01). For k = 3 it has 5,472 parameters (k = 2: 5,440).

Other options: learned absolute, rotary or no positions; an MLP per block (4x ReLU by
default, any width, GELU); tied unembedding; a replaceable input layer (``embed``: any module
mapping ids to (B, T, d)); ``n_outputs`` other than V (e.g. 1 for a regression head);
bidirectional attention (``causal=False``); PyTorch's default init (``init="default"``).

The two identity scalars of Boix-Adserà et al. 2024 (``shared/specs/symbol-templates.md``
section 5), both initialised at 0 and trainable, per head h, with x~ the block's LayerNormed
attention input: ``kq_identity`` adds ``a_h * <x~_i, x~_j>`` to the attention logits (outside
the 1/sqrt(d_head) scaling), ``vo_identity`` adds ``sum_h b_h * sum_j A_h[i, j] x~_j`` to the
attention output (after W_O); each term has a fixed factor (c_KQ, c_VO; 1 by default, as in the
reference's regression model).
Attention runs through ``F.scaled_dot_product_attention`` (for relative positions the q.r term
is passed as an additive float mask). The weights are computed explicitly when they are asked
for (``forward(..., return_attention=True)`` returns them per layer for the probes) and when
training with attention dropout, where SDPA on CPU falls back to its unfused math path with an
extra safe-softmax pass (measured slower than the plain softmax below).

The model follows the iclgym model contract (:mod:`iclgym.harness.model`: (B, T) ids ->
(B, T, V) logits, or (B, T, 1) values with ``n_outputs=1``), with its optional hooks
(``return_attention``, ``num_parameters``, ``decay_parameters``, ``input_embedding``), and
implements the ``Predictor`` protocol. :func:`make_model` is its factory for
``iclgym train --model transformer``; checkpoints of the trainer rebuild it through
``iclgym.harness.model.load_model``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iclgym.tasks.base import Batch

POSITIONAL = ("relative", "learned", "rotary", "none")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
INITS = ("small", "default")


@dataclass(frozen=True)
class TransformerConfig:
    """Architecture of :class:`Transformer`; validated on construction.

    Attributes:
        vocab_size: number of token ids V (the output size).
        max_len: longest training context T. Learned positions cannot go beyond it; relative
            positions clip distances at ``max_len`` (the table's last row), rotary and none
            have no limit.
        n_layers: attention blocks.
        n_heads: heads per block; must divide ``d_model``.
        first_layer_heads: heads of the first block when it differs (the reference order-n
            model uses n - 1 heads in layer 1 and 1 head above); ``None`` means ``n_heads``.
        d_model: residual width d.
        mlp: add a 4x ReLU MLP to every block (False = attention-only).
        dropout: rate on embeddings, attention weights, residual branches, relative table.
        positional: ``"relative"`` (Shaw), ``"learned"`` (absolute), ``"rotary"`` or ``"none"``.
        tied: use the token embedding as the unembedding (needs an ``nn.Embedding`` input).
        causal: mask attention to future positions (False = bidirectional, not with
            relative positions).
        mlp_width: hidden width of the MLP (``None`` = 4 * d_model).
        activation: MLP activation, ``"relu"`` or ``"gelu"``.
        n_outputs: size of the output head (``None`` = vocab_size; 1 for regression).
        kq_identity: add the trainable per-head a_h * <x~_i, x~_j> to the attention logits.
        vo_identity: add the trainable sum_h b_h * sum_j A_h[i, j] x~_j to the attention output.
        kq_identity_mult: c_KQ, the fixed factor of the a_h term (the reference's
            ``wkwq_id_mult``). With Adam a scalar moves about lr per step whatever its
            gradient, so c is in effect the learning-rate multiplier of the scalar.
        vo_identity_mult: c_VO, the fixed factor of the b_h term (``wvwo_id_mult``).
        init: ``"small"`` (N(0, 0.02), output projections N(0, 0.01)) or ``"default"``
            (PyTorch's Linear init, N(0, 1) token and position embeddings: the template
            reference model).
    """

    vocab_size: int
    max_len: int = 100
    n_layers: int = 2
    n_heads: int = 1
    first_layer_heads: int | None = None
    d_model: int = 16
    mlp: bool = False
    dropout: float = 0.1
    positional: str = "relative"
    tied: bool = False
    causal: bool = True
    mlp_width: int | None = None
    activation: str = "relu"
    n_outputs: int | None = None
    kq_identity: bool = False
    vo_identity: bool = False
    kq_identity_mult: float = 1.0
    vo_identity_mult: float = 1.0
    init: str = "small"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_len", "n_layers", "n_heads", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
        if self.first_layer_heads is not None and (
            not isinstance(self.first_layer_heads, int) or self.first_layer_heads < 1
        ):
            raise ValueError(
                f"first_layer_heads={self.first_layer_heads!r} is invalid: expected None or "
                "an int >= 1"
            )
        for heads in {self.n_heads, self.heads(0)}:
            if self.d_model % heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by {heads} heads: choose a head "
                    "count that divides the width"
                )
            if self.positional == "rotary" and (self.d_model // heads) % 2:
                raise ValueError(
                    f"positional='rotary' needs an even head width, got d_model={self.d_model} "
                    f"/ {heads} heads = {self.d_model // heads}"
                )
        if self.positional not in POSITIONAL:
            raise ValueError(
                f"positional={self.positional!r} is invalid: expected one of {POSITIONAL}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} is invalid: expected a float in [0, 1)")
        for name in ("mlp_width", "n_outputs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} is invalid: expected None or an int >= 1")
        for name in ("kq_identity_mult", "vo_identity_mult"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"{name}={value!r} is invalid: expected a finite float > 0")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={self.activation!r} is invalid: expected one of {tuple(ACTIVATIONS)}"
            )
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is invalid: expected one of {INITS}")
        if not self.causal and self.positional == "relative":
            raise ValueError(
                "causal=False is invalid with positional='relative' (its distance table is "
                "causal): use 'learned', 'rotary' or 'none'"
            )
        if self.tied and self.n_outputs not in (None, self.vocab_size):
            raise ValueError(f"tied=True needs n_outputs=None (= vocab_size), got {self.n_outputs}")

    def heads(self, layer: int) -> int:
        """Number of heads of block ``layer`` (0-based)."""
        if layer == 0 and self.first_layer_heads is not None:
            return self.first_layer_heads
        return self.n_heads


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, same law as ``F.dropout`` but with masks from ``torch.rand``, which is
    about twice as fast as the ``bernoulli_`` kernel behind ``F.dropout`` on CPU (that kernel was
    a third of the reference training step)."""
    if not training or p == 0:
        return x
    return torch.where(torch.rand_like(x) >= p, x, 0.0) * (1.0 / (1.0 - p))


class Dropout(nn.Module):
    """:func:`dropout` as a module."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention (causal unless ``causal=False``) with a choice of positional
    scheme and the optional identity scalars (see the module docstring).

    For ``relative``, row m of a per-layer table (m = i - j, clipped at ``max_len``) is added to
    the key: score_ij = q_i . (k_j + r_{i-j}) / sqrt(e). Dropout acts on the table rows (the
    reference drops each gathered (i, j) copy separately, which needs a (T, T, d) tensor per
    layer and step). For ``rotary``, q and k are rotated by position before the dot product.
    """

    def __init__(self, config: TransformerConfig, n_heads: int) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.positional, self.max_len = config.positional, config.max_len
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # Q, K and V stacked: one matmul
        self.out = nn.Linear(d, d, bias=False)
        self.dropout = config.dropout
        self.causal = config.causal
        self.resid_dropout = Dropout(config.dropout)
        if config.kq_identity:  # a_h: logits += c_KQ a_h <x~_i, x~_j>
            self.kq_identity_scale = nn.Parameter(torch.zeros(n_heads))
            self.kq_mult = config.kq_identity_mult
        if config.vo_identity:  # b_h: output += c_VO sum_h b_h sum_j A_h[i, j] x~_j
            self.vo_identity_scale = nn.Parameter(torch.zeros(n_heads))
            self.vo_mult = config.vo_identity_mult
        if self.positional == "relative":
            self.rel_table = nn.Parameter(torch.empty(config.max_len + 1, d))
            self.rel_dropout = Dropout(config.dropout)

    def _rotary(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate channel pairs (2i, 2i+1) of q and k by angle t * 10000^(-2i/e) at position t."""
        e, T = self.head_dim, q.shape[2]
        inv_freq = 10000.0 ** (-torch.arange(0, e, 2, device=q.device, dtype=q.dtype) / e)
        angle = torch.arange(T, device=q.device, dtype=q.dtype)[:, None] * inv_freq  # (T, e/2)
        cos, sin = angle.cos(), angle.sin()

        def rotate(x: Tensor) -> Tensor:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

        return rotate(q), rotate(k)

    def _rel_scores(self, q: Tensor) -> Tensor:
        """q_i . r_{i-j} for every (i, j), (B, H, T, T); entries j > i are meaningless.

        One matmul with the table in reversed distance order gives S[i, c] = q_i . r_{T-1-c};
        the "skew" of Huang et al. 2018 (pad a column on the left, view as (T + 1, T), drop the
        first row) then shifts row i left by T - 1 - i, so entry (i, j) holds S[i, T-1-(i-j)].
        """
        B, H, T, _ = q.shape
        dist = torch.arange(T - 1, -1, -1, device=q.device).clamp_(max=self.max_len)
        table = self.rel_dropout(self.rel_table)[dist]  # (T, d), distance T-1 first
        table = table.view(T, H, self.head_dim).transpose(0, 1)  # (H, T, e)
        scores = F.pad(q @ table.transpose(1, 2), (1, 0))  # (B, H, T, T + 1)
        return scores.view(B, H, T + 1, T)[:, :, 1:]

    def forward(self, x: Tensor, return_attention: bool) -> tuple[Tensor, Tensor | None]:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.positional == "rotary":
            q, k = self._rotary(q, k)
        drop = self.training and self.dropout > 0
        kq, vo = hasattr(self, "kq_identity_scale"), hasattr(self, "vo_identity_scale")
        explicit = return_attention or drop or vo  # the weights themselves are needed
        weights = None
        if self.positional != "relative" and not (explicit or kq):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            q = q * (1.0 / math.sqrt(self.head_dim))
            bias = torch.zeros(T, T, device=x.device)
            if self.causal:
                future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu_(1)
                bias = bias.masked_fill_(future, -math.inf)
            if self.positional == "relative":
                bias = self._rel_scores(q) + bias
            if kq:  # not scaled by 1/sqrt(d_head): <x~_i, x~_i> is about d
                gram = x @ x.transpose(-2, -1)  # (B, T, T)
                scale = self.kq_mult * self.kq_identity_scale
                bias = bias + scale.view(1, -1, 1, 1) * gram.unsqueeze(1)
            if explicit:
                weights = (q @ k.transpose(-2, -1)).add_(bias).softmax(-1)
                y = dropout(weights, self.dropout, self.training) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        y = self.out(y.transpose(1, 2).reshape(B, T, d))
        if vo:  # outside W_O, summed over heads
            scale = self.vo_mult * self.vo_identity_scale
            y = y + torch.einsum("h,bhij,bjd->bid", scale, weights, x)
        return self.resid_dropout(y), weights


class MLP(nn.Module):
    """Position-wise MLP, 4x ReLU by default (with biases, as in the reference)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        width = config.mlp_width or 4 * config.d_model
        self.up = nn.Linear(config.d_model, width)
        self.out = nn.Linear(width, config.d_model)
        self.dropout = Dropout(config.dropout)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.out(self.activation(self.up(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x)) if enabled."""

    def __init__(self, config: TransformerConfig, n_heads: int) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config, n_heads)
        if config.mlp:
            self.ln_mlp = nn.LayerNorm(config.d_model)
            self.mlp = MLP(config)

    def forward(self, x: Tensor, return_attention: bool) -> tuple[Tensor, Tensor | None]:
        h, weights = self.attn(self.ln_attn(x), return_attention)
        x = x + h
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.ln_mlp(x))
        return x, weights


class Transformer(nn.Module):
    """Decoder-only transformer: embed -> blocks -> final LayerNorm -> unembedding.

    ``embed`` replaces the default token embedding ``nn.Embedding(vocab_size, d_model)``; it
    must map the model input (token ids or features) to (B, T, d_model).
    """

    def __init__(self, config: TransformerConfig, embed: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = embed if embed is not None else nn.Embedding(config.vocab_size, config.d_model)
        if config.tied and not isinstance(self.embed, nn.Embedding):
            raise ValueError("tied=True needs an nn.Embedding input layer to share its weight")
        if config.positional == "learned":
            self.pos_embed = nn.Embedding(config.max_len, config.d_model)
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, config.heads(layer)) for layer in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        if not config.tied:
            self.lm_head = nn.Linear(
                config.d_model, config.n_outputs or config.vocab_size, bias=False
            )
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, 0.02) for linear, embedding and relative-table weights; N(0, 0.01) for the
        output projections (attention and MLP); LayerNorm at (1, 0), biases at 0. With
        ``init="default"`` Linear layers keep PyTorch's init and the token and position
        embeddings are N(0, 1). The identity scalars start at 0 either way."""
        for name, p in self.named_parameters():
            if name.startswith("embed.") and not isinstance(self.embed, nn.Embedding):
                continue  # a user-supplied input layer keeps its own init
            if name.endswith("identity_scale"):
                continue  # zeros: the model starts as the plain transformer
            if self.config.init == "default":
                if name in ("embed.weight", "pos_embed.weight"):
                    nn.init.normal_(p, mean=0.0, std=1.0)
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            else:
                std = 0.01 if name.endswith("out.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: Tensor, return_attention: bool = False):
        """Next-token logits (B, T, V); with ``return_attention`` also a list with one
        (B, H, T, T) attention-weight tensor per layer (rows sum to 1, zero above the diagonal).
        """
        x = self.embed(tokens)
        length = x.shape[1]
        if self.config.positional == "learned":
            if length > self.config.max_len:
                raise ValueError(
                    f"sequence length {length} exceeds max_len={self.config.max_len} of the "
                    "learned positional embedding"
                )
            x = x + self.pos_embed.weight[:length]
        x = self.drop(x)
        attention = []
        for block in self.blocks:
            x, weights = block(x, return_attention)
            attention.append(weights)
        x = self.ln_f(x)
        logits = F.linear(x, self.embed.weight) if self.config.tied else self.lm_head(x)
        return (logits, attention) if return_attention else logits

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        """Predictor protocol: next-token log-probabilities (B, T, V), eval mode, no grad."""
        if self.config.n_outputs not in (None, self.config.vocab_size):
            raise ValueError(
                f"predict() needs next-token logits, but this model has n_outputs="
                f"{self.config.n_outputs}"
            )
        if batch.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"batch vocab_size={batch.vocab_size} does not match the model's "
                f"vocab_size={self.config.vocab_size}"
            )
        was_training = self.training
        self.eval()
        try:
            return F.log_softmax(self(batch.tokens).float(), dim=-1)
        finally:
            self.train(was_training)

    def decay_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decayed, not decayed): weight decay applies to Linear weights only (reference)."""
        decay = {id(m.weight): m.weight for m in self.modules() if isinstance(m, nn.Linear)}
        rest = [p for p in self.parameters() if id(p) not in decay]
        return list(decay.values()), rest

    def input_embedding(self) -> Tensor | None:
        """The token embedding (V, d_model), or None when it is tied to the unembedding (the
        softmax then trains every row) or replaced by another input layer."""
        if self.config.tied or not isinstance(self.embed, nn.Embedding):
            return None
        return self.embed.weight


def make_model(
    vocab_size: int,
    seq_len: int,
    head_dim: int | None = None,
    mlp_ratio: int | None = None,
    **config: object,
) -> Transformer:
    """The factory of the model contract: a :class:`Transformer` with ``max_len = seq_len`` and
    the :class:`TransformerConfig` fields in ``config`` (defaults: the Edelman et al. reference
    model). ``head_dim`` sets ``n_heads = d_model // head_dim`` and ``mlp_ratio`` sets
    ``mlp_width = mlp_ratio * d_model`` (so a width sweep changes ``d_model`` alone).
    Raises ``ValueError`` for invalid settings."""
    d_model = config.get("d_model", TransformerConfig.d_model)
    if head_dim is not None:
        if not isinstance(head_dim, int) or head_dim < 1 or d_model % head_dim:
            raise ValueError(
                f"head_dim={head_dim!r} is invalid: expected an int >= 1 dividing d_model={d_model}"
            )
        config["n_heads"] = d_model // head_dim
    if mlp_ratio is not None:
        if not isinstance(mlp_ratio, int) or mlp_ratio < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio!r} is invalid: expected an int >= 1")
        config["mlp_width"] = mlp_ratio * d_model
    return Transformer(TransformerConfig(vocab_size=vocab_size, max_len=seq_len, **config))
