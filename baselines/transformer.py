"""A GPT-style causal transformer baseline, readable top to bottom (nanoGPT style).

The default configuration is the reference model of Edelman et al. 2024
(its official code's ``Relative_Transformer``): 2 layers, attention only, width 16, 1 head,
pre-LayerNorm plus a final LayerNorm, no absolute positions, Shaw-style relative positions
(one table of shape (max_len + 1, d_model) per layer, score (q.k + q.r_{i-j}) / sqrt(d_head)),
bias-free Q/K/V/output/LM head, dropout 0.1, init N(0, 0.02) with output projections
N(0, 0.01). For k = 3 it has 5,472 parameters (k = 2: 5,440).

Other options: learned absolute, rotary or no positions; an MLP per block (4x ReLU by
default, any width, GELU); tied unembedding; a replaceable input layer (``embed``: any module
mapping ids to (B, T, d)); ``n_outputs`` other than V (e.g. 1 for a regression head);
bidirectional attention (``causal=False``); PyTorch's default init (``init="default"``).

The two identity scalars of Boix-Adserà et al. 2024 (its reference code's
``wkwq_identity_scalings`` and ``wvwo_identity_scalings``), both initialised at 0 and
trainable, per head h, with x~ the block's LayerNormed attention input: ``kq_identity`` adds
``a_h * <x~_i, x~_j>`` to the attention logits (outside
the 1/sqrt(d_head) scaling), ``vo_identity`` adds ``sum_h b_h * sum_j A_h[i, j] x~_j`` to the
attention output (after W_O); each term has a fixed factor (c_KQ, c_VO; 1 by default, as in the
reference's regression model).
Relative positions (without the identity scalars) run through :class:`RelativeAttention`, an
autograd function with its own backward that skips the all-future corner of the (T, T)
scores and has a ``vmap`` rule, so stacked copies of the model train together
(:mod:`iclgym.harness.multiseed`). The other schemes use ``F.scaled_dot_product_attention``
when neither the weights (``forward(..., return_attention=True)``, the probes) nor attention
dropout nor a gradient through an additive term is needed, and explicit weights otherwise.
Dropout draws 16-bit masks (:func:`dropout`).

The model follows the iclgym model contract (:mod:`iclgym.harness.model`: (B, T) ids ->
(B, T, V) logits, or (B, T, 1) values with ``n_outputs=1``), with its optional hooks
(``return_attention``, ``num_parameters``, ``decay_parameters``, ``input_embedding``), and
implements the ``Predictor`` protocol. :func:`make_model` is its factory for
``iclgym train --model transformer``; checkpoints of the trainer rebuild it through
``iclgym.harness.model.load_model``.
"""

from __future__ import annotations

import itertools
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
        feature_dim: F >= 0, the width of the task's continuous features (0: token-only).
            With F > 0 the input at position t is the token embedding plus a Linear map of
            the features (B, T, F) at t, and the model is called ``forward(tokens,
            features)`` (the model contract's feature tasks, e.g. multi-concept prompts).
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
    feature_dim: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.feature_dim, int) or isinstance(self.feature_dim, bool):
            raise ValueError(f"feature_dim={self.feature_dim!r} is invalid: expected an int >= 0")
        if self.feature_dim < 0:
            raise ValueError(f"feature_dim={self.feature_dim!r} is invalid: expected an int >= 0")
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


DROP_LEVELS = 1 << 16
"""Dropout masks are drawn as 16-bit integers: the drop probability is ``p`` rounded to a
multiple of 2^-16 (0.1 -> 6554 / 65536 = 0.1000061) and kept entries are scaled by the exact
inverse of the keep probability, so the mean is preserved exactly."""
CHUNK_ELEMENTS = 160_000
"""Attention-matrix entries per chunk of :class:`RelativeAttention` (16 sequences of T = 100,
640 KB in float32), but at least :data:`CHUNK_SEQUENCES` sequences. Measured on this project's
CPU: the evaluation forward of 1024 sequences took 97 ms in chunks of 16 sequences and 127 ms in
chunks of 64 (the (T, T) temporaries of a chunk stay in cache), training steps the same."""
CHUNK_SEQUENCES = 4
"""Fewest sequences per chunk: with 16 stacked copies (:meth:`RelativeAttention.vmap`) a chunk of
4 sequences of every copy was 12% faster than chunks of 1 (fewer, larger kernels)."""


def dropout_threshold(p: float) -> tuple[int, float]:
    """(drop count out of 2^16, scale of the kept entries) of dropout rate ``p``."""
    drop = round(p * DROP_LEVELS)
    return drop, DROP_LEVELS / (DROP_LEVELS - drop)


def random_bits(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Uniform 16-bit integers (int16) of ``shape`` from the global torch generator, four per
    64-bit draw (about 3x cheaper than ``torch.rand`` per entry on CPU). Created from ``like``,
    so that under ``torch.func.vmap(..., randomness="different")`` every copy draws its own."""
    n = math.prod(shape)
    words = like.new_empty(((n + 3) // 4,), dtype=torch.int64).random_(-(2**63), None)
    return words.view(torch.int16)[:n].view(shape)


def keep_mask(bits: Tensor, drop: int, dtype: torch.dtype) -> Tensor:
    """1.0 where the 16-bit value (offset to [0, 2^16)) is >= ``drop``, else 0.0: every entry
    is kept with probability 1 - drop / 2^16."""
    return (bits.to(dtype) + (32769 - drop)).clamp(0, 1)  # int16 + 32768 >= drop <=> ... >= 1


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: zero each entry with probability ``p`` (rounded to 2^-16, see
    :data:`DROP_LEVELS`) and scale the others by 1 / (1 - p). The masks come from
    :func:`random_bits` (the global torch generator): the law of ``F.dropout`` with that
    rounding, without its ``bernoulli_`` kernel, which was a third of a training step on CPU."""
    if not training or p == 0:
        return x
    drop, scale = dropout_threshold(p)
    return x * keep_mask(random_bits(x, tuple(x.shape)), drop, x.dtype) * scale


class Dropout(nn.Module):
    """:func:`dropout` as a module."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


class RelativeAttention(torch.autograd.Function):
    """Causal attention with Shaw relative positions and attention dropout, forward and
    backward written out, in chunks of sequences and causal blocks of queries.

    For every copy n, head h and sequence: ``A = softmax(s q k^T + s skew(q R^T) + causal)`` and
    ``y = (A * M) v / (1 - p)``, with s = 1 / sqrt(e), R the (T + 1, e) table of relative rows
    of (n, h) and M the 0/1 dropout keep mask. The skew puts q_i . r_{i-j} at (i, j) without a
    copy: with the table's rows in the order (unused, distance T-1, ..., distance 0), the
    (T, T + 1) product q R^T read flat from offset T holds entry (i, j) at row i, column
    T + j - i (Huang et al. 2018); entries j > i land in the next row and are masked.

    Cost: the queries are cut into blocks [s, L) (:func:`causal_blocks`) that attend to keys
    [0, L) only, which skips the all-future corner: 3/4 of the (T, T) work with two blocks.
    The backward needs only A and A * M of each block (no mask, no logits), and the sequences
    run in chunks of :data:`CHUNK_ELEMENTS` attention entries.

    Inputs: ``qkv`` (N, B, T, 3, H, e): q, k, v of N stacked copies (N = 1 for one model);
    ``table`` (N, H, e, T + 1); ``bits`` (N, H, B, :func:`mask_size` (T)) int16 from
    :func:`random_bits`, or None (no dropout); ``drop`` from :func:`dropout_threshold`;
    ``need_weights``. Outputs: y (N, B, T, H, e); the attention weights A (N * H, B, T, T)
    when ``need_weights`` (not differentiable), else None; then the saved tensors (internal).
    Under ``torch.func.vmap`` the vmapped copies join the copy axis (:meth:`vmap`), so the
    chunks cover every copy at once.
    """

    @staticmethod
    def forward(qkv, table, bits, drop, need_weights):
        N, B, T, _, H, e = qkv.shape
        G = N * H
        scale, keep_scale = 1.0 / math.sqrt(e), DROP_LEVELS / (DROP_LEVELS - drop)
        table = table.reshape(G, e, T + 1)
        blocks = causal_blocks(T)
        masks = [_future(s, L, qkv) for s, L, _ in blocks]
        chunk = max(CHUNK_ELEMENTS // (G * T * T), min(B, CHUNK_SEQUENCES))
        y = qkv.new_empty(N, B, T, H, e)
        full = qkv.new_zeros(G, B, T, T) if need_weights else None
        saved = []
        for c0 in range(0, B, chunk):
            C = min(chunk, B - c0)
            q, k, v = (_groups(qkv[:, c0 : c0 + C, :, i]) for i in range(3))  # (G * C, T, e)
            q = q * scale
            rel = torch.bmm(q.view(G, C * T, e), table)  # (G, C * T, T + 1)
            rel = rel.view(G * C, T * (T + 1))[:, T:].view(G * C, T, T)  # the skew: a view
            out = q.new_empty(G * C, T, e)
            for (s, L, offset), future in zip(blocks, masks, strict=True):
                logits = torch.add(rel[:, s:L, :L], future)
                w = logits.baddbmm_(q[:, s:L], k[:, :L].transpose(1, 2)).softmax(-1)
                if full is not None:
                    full[:, c0 : c0 + C, s:L, :L] = w.view(G, C, L - s, L)
                if bits is not None:
                    part = bits[:, :, c0 : c0 + C, offset : offset + (L - s) * L]
                    wd = part.reshape(G * C, L - s, L).to(w.dtype)  # keep_mask, in place:
                    wd.add_(32769 - drop).clamp_(0, 1).mul_(w)  # A * M
                    saved += [w, wd]
                    out[:, s:L] = torch.bmm(wd, v[:, :L]).mul_(keep_scale)
                else:
                    saved.append(w)
                    out[:, s:L] = torch.bmm(w, v[:, :L])
            y[:, c0 : c0 + C] = out.view(N, H, C, T, e).permute(0, 2, 3, 1, 4)
        return (y, full, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, table, bits, drop, _ = inputs
        ctx.drop, ctx.dropout = drop, bits is not None
        ctx.save_for_backward(qkv, table, *output[2:])
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))

    @staticmethod
    def backward(ctx, dy, *_):
        qkv, table, *saved = ctx.saved_tensors
        N, _, T, _, H, e = qkv.shape
        G = N * H
        scale, keep_scale = 1.0 / math.sqrt(e), DROP_LEVELS / (DROP_LEVELS - ctx.drop)
        table_t = table.reshape(G, e, T + 1).transpose(1, 2)
        dqkv = torch.empty_like(qkv)
        dtable = table.new_zeros(G, e, T + 1)
        differentiable = torch.is_grad_enabled()  # torch.func.grad of the backward: no out=
        per_block = 2 if ctx.dropout else 1
        blocks = causal_blocks(T)
        per_chunk = per_block * len(blocks)
        c0 = 0
        for i in range(0, len(saved), per_chunk):  # the forward's chunks
            C = saved[i].shape[0] // G
            rows = slice(c0, c0 + C)
            q, k, v = (_groups(qkv[:, rows, :, j]) for j in range(3))
            q = q * scale
            g = _groups(dy[:, rows])
            if ctx.dropout:
                g = g * keep_scale
            # d(q R^T) as (G * C, T (T + 1)): T zeros, then dlogits (the skew's inverse)
            buffer = q.new_empty(G * C, T * (T + 1))
            buffer[:, :T] = 0
            dlogits = buffer[:, T:].view(G * C, T, T)
            dq, dk, dv = torch.empty_like(q), k, v  # dk, dv: set by the last block
            for b in reversed(range(len(blocks))):  # the last block sees every key: first
                s, L, _ = blocks[b]
                w = saved[i + per_block * b]
                wd = saved[i + per_block * b + per_block - 1]
                gb = g[:, s:L]
                if L == T:
                    dv = torch.bmm(wd.transpose(1, 2), gb)
                else:
                    dv[:, :L] += torch.bmm(wd.transpose(1, 2), gb)
                    dlogits[:, s:L, L:] = 0  # the block's future keys
                # softmax backward with the mask: w * dw = (w * m) * dy v^T, so
                # dlogits = t - w * sum_j t with t = (A * M) * (dy v^T); 0 wherever w = 0
                t = torch.bmm(gb, v[:, :L].transpose(1, 2))
                if differentiable:
                    t = t * wd
                    dl = t - w * t.sum(-1, keepdim=True)
                    dlogits[:, s:L, :L] = dl
                else:
                    dl = dlogits[:, s:L, :L]
                    torch.mul(t, wd, out=dl)
                    dl.addcmul_(w, dl.sum(-1, keepdim=True), value=-1)
                dq[:, s:L] = torch.bmm(dl, k[:, :L])
                if L == T:
                    dk = torch.bmm(dl.transpose(1, 2), q[:, s:L])
                else:
                    dk[:, :L] += torch.bmm(dl.transpose(1, 2), q[:, s:L])
            drel = buffer.view(G, C * T, T + 1)
            dq = torch.baddbmm(dq.view(G, C * T, e), drel, table_t)
            dtable = torch.baddbmm(dtable, q.view(G, C * T, e).transpose(1, 2), drel)
            for j, grad in enumerate((dq.mul_(scale), dk, dv)):
                dqkv[:, rows, :, j] = grad.view(N, H, C, T, e).permute(0, 2, 3, 1, 4)
            c0 += C
        return dqkv, dtable.view(table.shape), None, None, None

    @staticmethod
    def vmap(info, in_dims, qkv, table, bits, drop, need_weights):
        def fold(x: Tensor | None, dim: int | None) -> Tensor | None:
            """The vmapped copies (at ``dim``) joined with the copy axis 0."""
            if x is None:
                return None
            x = x.movedim(dim, 0) if dim is not None else x.expand(info.batch_size, *x.shape)
            return x.flatten(0, 1)

        y, w, *saved = RelativeAttention.apply(
            fold(qkv, in_dims[0]),
            fold(table, in_dims[1]),
            fold(bits, in_dims[2]),
            drop,
            need_weights,
        )
        n = info.batch_size
        y = y.unflatten(0, (n, -1))
        w = w.unflatten(0, (n, -1)) if w is not None else None
        saved = [t.unflatten(0, (n, -1)) for t in saved]  # (G * C, ...) with G = copies x heads
        return (y, w, *saved), (0, None if w is None else 0, *([0] * len(saved)))


def causal_blocks(T: int) -> list[tuple[int, int, int]]:
    """Query blocks ``(s, L, offset)`` of :class:`RelativeAttention`: queries [s, L) attend to
    keys [0, L); ``offset`` is where the block's (L - s, L) dropout draws start in a
    sequence's :func:`mask_size` draws. Two blocks from T = 32 on (3/4 of the (T, T) work),
    one below."""
    cuts = [0, T // 2, T] if T >= 32 else [0, T]
    blocks, offset = [], 0
    for s, L in itertools.pairwise(cuts):
        blocks.append((s, L, offset))
        offset += (L - s) * L
    return blocks


def mask_size(T: int) -> int:
    """Dropout draws per sequence and head of :class:`RelativeAttention`: the blocks' areas."""
    return sum((L - s) * L for s, L, _ in causal_blocks(T))


def _future(s: int, L: int, like: Tensor) -> Tensor:
    """(L - s, L) additive mask of query block [s, L): -inf on keys j > query i."""
    i = torch.arange(s, L, device=like.device)[:, None]
    j = torch.arange(L, device=like.device)
    return torch.zeros((), dtype=like.dtype, device=like.device).masked_fill(j > i, -math.inf)


def _groups(x: Tensor) -> Tensor:
    """(N, C, T, H, e) -> (N * H * C, T, e): one (T, e) matrix per copy, head and sequence."""
    N, C, T, H, e = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(N * H * C, T, e)


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
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        drop = self.training and self.dropout > 0
        kq, vo = hasattr(self, "kq_identity_scale"), hasattr(self, "vo_identity_scale")
        if self.positional == "relative" and not (kq or vo):
            y, weights = self._relative_attention(qkv, return_attention, drop)
            return self.resid_dropout(self.out(y)), weights
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, e) each
        if self.positional == "rotary":
            q, k = self._rotary(q, k)
        has_bias = self.positional == "relative" or kq
        # SDPA when the weights are not needed and no additive term needs a gradient (functorch
        # cannot differentiate SDPA's attention mask on CPU, so vmap over copies could not)
        fused = not (return_attention or drop or vo) and not (has_bias and torch.is_grad_enabled())
        weights = None
        if fused and not has_bias:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            q = q * (1.0 / math.sqrt(self.head_dim))
            bias = torch.zeros(T, T, device=x.device, dtype=q.dtype)
            if self.causal:
                bias = bias.masked_fill_(bias.new_ones(T, T, dtype=torch.bool).triu_(1), -math.inf)
            if self.positional == "relative":
                bias = self._rel_scores(q) + bias
            if kq:  # not scaled by 1/sqrt(d_head): <x~_i, x~_i> is about d
                gram = x @ x.transpose(-2, -1)  # (B, T, T)
                scale = self.kq_mult * self.kq_identity_scale
                bias = bias + scale.view(1, -1, 1, 1) * gram.unsqueeze(1)
            if fused:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            else:
                weights = (q @ k.transpose(-2, -1)).add_(bias).softmax(-1)
                y = dropout(weights, self.dropout, self.training) @ v
        y = self.out(y.transpose(1, 2).reshape(B, T, d))
        if vo:  # outside W_O, summed over heads
            scale = self.vo_mult * self.vo_identity_scale
            y = y + torch.einsum("h,bhij,bjd->bid", scale, weights, x)
        return self.resid_dropout(y), weights

    def _relative_attention(
        self, qkv: Tensor, return_attention: bool, drop: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Shaw relative attention through :class:`RelativeAttention`: (B, T, 3, H, e) stacked
        q, k, v -> (B, T, d) and, with ``return_attention``, the (B, H, T, T) weights."""
        B, T, _, H, e = qkv.shape
        dist = torch.arange(T - 1, -1, -1, device=qkv.device).clamp_(max=self.max_len)
        table = self.rel_dropout(self.rel_table)[dist]  # (T, d), distance T-1 first
        table = F.pad(table, (0, 0, 1, 0)).view(T + 1, H, e).permute(1, 2, 0).contiguous()
        bits = random_bits(qkv, (1, H, B, mask_size(T))) if drop else None
        count = dropout_threshold(self.dropout)[0] if drop else 0
        y, weights, *_ = RelativeAttention.apply(
            qkv[None], table[None], bits, count, return_attention
        )
        weights = weights.transpose(0, 1) if weights is not None else None  # (B, H, T, T)
        return y.view(B, T, H * e), weights


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
        if config.feature_dim:
            self.feature_embed = nn.Linear(config.feature_dim, config.d_model)
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

    def forward(
        self, tokens: Tensor, features: Tensor | None = None, return_attention: bool = False
    ):
        """Next-token logits (B, T, V) from tokens (B, T) and, with ``feature_dim`` F > 0,
        features (B, T, F) float32 (required then, refused otherwise: ``ValueError``); with
        ``return_attention`` also a list with one (B, H, T, T) attention-weight tensor per
        layer (rows sum to 1, zero above the diagonal)."""
        x = self.embed(tokens)
        if (features is None) != (self.config.feature_dim == 0):
            raise ValueError(
                f"this model has feature_dim={self.config.feature_dim}: call it with "
                + ("features (B, T, F)" if self.config.feature_dim else "tokens only")
            )
        if features is not None:
            x = x + self.feature_embed(features)
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
            return F.log_softmax(self(*batch.inputs).float(), dim=-1)
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
