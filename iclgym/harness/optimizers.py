"""Optimisers for the trainer's import-path hook (``--optimizer iclgym.harness.optimizers:ppg``).

Each factory has the hook's signature ``factory(model, config, **optimizer_args)`` (``config``
a :class:`~iclgym.harness.train.TrainConfig`; ``optimizer_args`` from ``--optimizer-args
KEY=VALUE``) and returns a ``torch.optim.Optimizer``, whose ``step()`` the trainer calls once
per batch after ``backward()`` and whose ``state_dict`` it checkpoints.

- :func:`ppg`: :class:`ProximalGradient`, the preconditioned proximal gradient method of
  sparse contextual bigrams (Ren, Wang, Lee 2024, arXiv 2410.23438;
  ``scb_ppg``) for a model with a value matrix ``value`` (N, N) and a linear
  attention table ``attention`` (T, N) (:mod:`baselines.linear_transformer`).
- :func:`sgd`: plain SGD (``torch.optim.SGD``) with an optional separate learning rate for the
  attention parameters: the SGD baseline (lambda = 0, no constraints, constant lr) and
  the softmax variant's lr_V / lr_W pair.
- :func:`normalized_gd`: :class:`NormalizedGD`, full-batch normalised gradient descent of
  token-priority graphs (Li et al. 2024, arXiv 2403.08081): the
  gradient divided by its Frobenius norm, plain SGD, no momentum.

Only the class of method is stated in the paper (its abstract); the preconditioner, prox,
renormalisation and schedule below are iclgym's reconstruction, which reproduces the paper's
qualitative claims (docs/results/sparse-contextual-bigram.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from iclgym.harness.model import decay_parameters
from iclgym.tasks.sparse_bigram import project_simplex
from iclgym.validation import as_float, invalid

PRECONDITIONERS = ("none", "mu")


class ProximalGradient(torch.optim.Optimizer):
    """Preconditioned proximal gradient on (V, A) (``scb_ppg``, Ren, Wang, Lee 2024).

    One step, with ``eta_t = lr / (1 + t / tau)`` (``tau`` = 0: no decay) and the gradients G_V,
    G_A already in ``.grad`` (batch means of the squared loss):

    1. V: ``G_V <- G_V - 1 (1^T G_V) / N`` (V's column sums stay 1), column j divided by
       ``N mu_j`` (``precond="mu"``; the identity for uniform ``mu``), ``V <- V - eta_t G_V``.
    2. A: column k of ``G_A`` divided by ``N mu_k`` (``precond="mu"``), ``A <- A - eta_t G_A``.
    3. Prox of ``lam ||A||_1`` on the non-negative orthant: ``A <- max(A - eta_t lam, 0)``; a
       column that becomes all zero gets back its pre-prox ``max(A, 0)``.
    4. ``renorm``: each column of A rescaled to sum 1; an all-zero column resets to 1/T.

    ``simplex_proj=True`` replaces 3-4 by the Euclidean projection of each column onto the
    simplex (an ablation: it drifts into the flat valley, dist_P about 0.4). Ablations
    ``precond="none"``, ``lam=0``, ``renorm=False`` as named.

    Args:
        value: V (N, N), a leaf tensor.
        attention: A (T, N), a leaf tensor.
        lr: eta > 0 (the trainer's schedule may rescale it per step).
        lam: l1 weight lambda >= 0.
        precond: ``"mu"`` or ``"none"``.
        mu: the stationary law (N positive floats, renormalised) for ``precond="mu"``; None:
            uniform (then ``"mu"`` is the identity: the perm_mixture setting).
        renorm: rescale A's columns to sum 1 after the prox.
        tau: decay time of ``eta_t`` in steps, >= 0 (0: constant).
        simplex_proj: project A's columns onto the simplex instead of prox + renorm.

    Raises ``ValueError`` naming the argument for shapes that are not (N, N) and (T, N), and
    values outside the ranges above.
    """

    def __init__(
        self,
        value: Tensor,
        attention: Tensor,
        *,
        lr: float = 0.3,
        lam: float = 0.01,
        precond: str = "mu",
        mu: Any = None,
        renorm: bool = True,
        tau: float = 0.0,
        simplex_proj: bool = False,
    ) -> None:
        if value.ndim != 2 or value.shape[0] != value.shape[1]:
            raise invalid("value", tuple(value.shape), "a square (N, N) tensor")
        n = value.shape[0]
        if attention.ndim != 2 or attention.shape[1] != n:
            raise invalid("attention", tuple(attention.shape), f"a (T, {n}) tensor")
        lr = as_float("lr", lr, 0.0, low_open=True)
        lam = as_float("lam", lam, 0.0)
        tau = as_float("tau", tau, 0.0)
        if precond not in PRECONDITIONERS:
            raise invalid("precond", precond, f"one of {PRECONDITIONERS}")
        for name, flag in (("renorm", renorm), ("simplex_proj", simplex_proj)):
            if not isinstance(flag, bool):
                raise invalid(name, flag, "a bool")
        if mu is not None:
            law = torch.as_tensor(mu, dtype=torch.float64)
            if law.shape != (n,) or not bool(torch.isfinite(law).all()) or (law <= 0).any():
                raise invalid("mu", mu, f"{n} positive floats (the stationary law)")
            mu = tuple((law / law.sum()).tolist())
        defaults = {
            "lr": lr,
            "lam": lam,
            "tau": tau,
            "precond": precond,
            "mu": mu,
            "renorm": renorm,
            "simplex_proj": simplex_proj,
        }
        groups = [
            {"params": [value], "role": "value"},
            {"params": [attention], "role": "attention"},
        ]
        super().__init__(groups, defaults)

    def _scale(self, group: dict[str, Any], like: Tensor) -> Tensor | None:
        """(1, N) the preconditioner's column divisors ``N mu``, or None (identity)."""
        if group["precond"] == "none" or group["mu"] is None:
            return None
        mu = torch.tensor(group["mu"], dtype=like.dtype, device=like.device)
        return (mu.numel() * mu)[None, :]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One proximal-gradient step (class docstring); returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (param,) = group["params"]
            state = self.state[param]
            t = state.get("step", 0)
            state["step"] = t + 1
            eta = group["lr"] / (1.0 + t / group["tau"]) if group["tau"] > 0 else group["lr"]
            grad = param.grad
            scale = self._scale(group, param)
            if group["role"] == "value":
                if grad is None:
                    continue
                g = grad - grad.mean(0, keepdim=True)
                if scale is not None:
                    g = g / scale
                param.sub_(g, alpha=eta)
                continue
            if grad is not None:
                g = grad if scale is None else grad / scale
                param.sub_(g, alpha=eta)
            if group["simplex_proj"]:
                param.copy_(project_simplex(param, dim=0))
                continue
            before = param.clamp_min(0.0)
            shrunk = (param - eta * group["lam"]).clamp_min(0.0)
            dead = shrunk.sum(0) == 0
            shrunk[:, dead] = before[:, dead]
            if group["renorm"]:
                total = shrunk.sum(0, keepdim=True)
                uniform = torch.full_like(shrunk, 1.0 / shrunk.shape[0])
                shrunk = torch.where(total > 0, shrunk / total.clamp_min(1e-300), uniform)
            param.copy_(shrunk)
        return loss


def _linear_parameters(model: nn.Module, what: str) -> tuple[nn.Parameter, nn.Parameter]:
    value, attention = getattr(model, "value", None), getattr(model, "attention", None)
    if not isinstance(value, nn.Parameter) or not isinstance(attention, nn.Parameter):
        raise ValueError(
            f"optimizer {what} needs a model with parameters 'value' (N, N) and a linear "
            f"attention table 'attention' (T, N) (baselines.linear_transformer, softmax=False); "
            f"{type(model).__name__} has none"
        )
    others = [name for name, p in model.named_parameters() if p is not value and p is not attention]
    if others:
        raise ValueError(
            f"optimizer {what} updates only 'value' and 'attention'; {type(model).__name__} "
            f"also has {others}"
        )
    return value, attention


def ppg(
    model: nn.Module,
    config: Any,
    lam: float = 0.01,
    precond: str = "mu",
    mu: Any = None,
    renorm: bool = True,
    tau: float = 0.0,
    simplex_proj: bool = False,
) -> ProximalGradient:
    """``--optimizer iclgym.harness.optimizers:ppg``: :class:`ProximalGradient` on the model's
    ``value`` and ``attention`` with ``lr = config.lr`` (e.g. ``--optimizer-args lam=0.005
    tau=1000``). Raises ``ValueError`` for a model without those two parameters (or with
    others), or a config with weight decay or momentum (the method has neither: its regulariser
    is the l1 prox)."""
    for name in ("weight_decay", "momentum"):
        if getattr(config, name, 0.0):
            raise invalid(
                name, getattr(config, name), "0 for optimizer ppg (its regulariser is lam)"
            )
    value, attention = _linear_parameters(model, "ppg")
    return ProximalGradient(
        value,
        attention,
        lr=config.lr,
        lam=lam,
        precond=precond,
        mu=mu,
        renorm=renorm,
        tau=tau,
        simplex_proj=simplex_proj,
    )


def sgd(model: nn.Module, config: Any, attention_lr: float | None = None) -> torch.optim.SGD:
    """``--optimizer iclgym.harness.optimizers:sgd``: ``torch.optim.SGD`` with ``lr =
    config.lr`` and ``config.momentum``; the attention parameters (``attention`` or
    ``attention_logits``) at ``attention_lr`` when given (the softmax variant: lr_V 0.3, lr_W 30,
    docs/results/sparse-contextual-bigram.md). ``config.weight_decay`` applies as in the trainer's
    built-in ``sgd`` (to the model's decayed parameters: nn.Linear weights unless the model says
    otherwise).
    Raises ``ValueError`` for ``attention_lr`` <= 0 or a model without attention parameters
    when ``attention_lr`` is given."""
    decay_ids = {id(p) for p in decay_parameters(model)[0]}
    attention = [
        p
        for name, p in model.named_parameters()
        if name.split(".")[-1] in ("attention", "attention_logits")
    ]
    if attention_lr is not None:
        attention_lr = as_float("attention_lr", attention_lr, 0.0, low_open=True)
        if not attention:
            raise ValueError(
                f"attention_lr is given but {type(model).__name__} has no parameter named "
                "'attention' or 'attention_logits'"
            )
    attention_ids = {id(p) for p in attention}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        groups.setdefault((id(p) in attention_ids, id(p) in decay_ids), []).append(p)
    param_groups = [
        {
            "params": params,
            "lr": attention_lr if is_attention and attention_lr is not None else config.lr,
            "weight_decay": config.weight_decay if decayed else 0.0,
        }
        for (is_attention, decayed), params in groups.items()
    ]
    return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum)


class NormalizedGD(torch.optim.Optimizer):
    """Normalised gradient descent (Li et al. 2024, the
    reference code's ``normalize_grad`` then SGD): ``p <- p - lr * g_p / ||g||_F`` with ``||g||_F``
    the Frobenius norm of all the parameters' gradients together (one matrix W for the paper's
    model, so its own norm), no momentum, no weight decay. Every step moves the parameters by
    exactly ``lr`` in Frobenius norm, so ``||W(tau)|| <= ||W(0)|| + lr tau``; a step whose
    gradient is 0 (or absent) leaves them. The trainer's schedule may rescale ``lr``.

    Raises ``ValueError`` for ``lr`` <= 0 or no parameters.
    """

    def __init__(self, params: Any, lr: float) -> None:
        lr = as_float("lr", lr, 0.0, low_open=True)
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One normalised step (class docstring); returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        present = [g for g in grads if g is not None]
        if not present:
            return loss
        norm = torch.stack([g.pow(2).sum() for g in present]).sum().sqrt()
        if norm == 0:
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad / norm, alpha=group["lr"])
        return loss


def normalized_gd(model: nn.Module, config: Any) -> NormalizedGD:
    """``--optimizer iclgym.harness.optimizers:normalized_gd``: :class:`NormalizedGD` on every
    parameter of the model with ``lr = config.lr`` (recipe ``li2024``: lr 0.01, full batch,
    float64). Raises ``ValueError`` for a config with weight decay or momentum (the method has
    neither) or a model without parameters."""
    for name in ("weight_decay", "momentum"):
        if getattr(config, name, 0.0):
            raise invalid(
                name, getattr(config, name), "0 for optimizer normalized_gd (plain normalised GD)"
            )
    params = list(model.parameters())
    if not params:
        raise ValueError(
            f"optimizer normalized_gd needs parameters; {type(model).__name__} has none"
        )
    return NormalizedGD(params, lr=config.lr)


__all__ = ["PRECONDITIONERS", "NormalizedGD", "ProximalGradient", "normalized_gd", "ppg", "sgd"]
