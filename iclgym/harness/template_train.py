"""Train a model on a template task with the paper protocol and score it on unseen symbols.

Protocol (``shared/specs/symbol-templates.md`` sections 5 and 6): a fixed training set of
``n_train`` strings over the train alphabet (:meth:`SymbolTemplateTask.train_set`; by default
``n_train`` = n, the alphabet size), Adam (lr 1e-3, no weight decay, so the embedding rows of
symbols never seen stay untouched), batches of ``min(n_train, batch_size)`` strings reshuffled
every epoch, a fixed number of epochs; MSE on the real label for regression, cross-entropy
over the label tokens otherwise. After training the untrained rows (validation and test
symbols) of the input embedding are checked bit for bit against their initial values (spec
pitfall 3; skipped for a tied unembedding, whose softmax trains every row) and the model is
scored on the train set and on fresh strings of the validation and test alphabets.

Models: ``transformer`` (the section 5 reference: learned N(0, 1) token and position
embeddings, pre-LN blocks with a GELU MLP, no causal mask, output read at the appended QUERY
token, a tied unembedding for next-token labels, optional identity scalars) and ``mlp``
(:mod:`baselines.mlp`, one-hot concat -> ReLU layers).

:class:`TemplateTrainConfig` doubles as the command line:
``python -m iclgym.harness.template_train --set preset=aba_abb --kq-identity``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.mlp import MLP, MLPConfig
from baselines.transformer import Transformer, TransformerConfig
from iclgym.harness.regression import nearest_label
from iclgym.tasks.base import SPLITS, Batch, stream_seed
from iclgym.tasks.templates import SymbolTemplateTask

MODELS = ("transformer", "mlp")


@dataclass(frozen=True)
class TemplateTrainConfig:
    """Model and training settings; every field is also a ``--flag``.

    Attributes:
        model: ``"transformer"`` or ``"mlp"``.
        d_model: transformer embedding width D.
        n_layers: transformer blocks.
        n_heads: attention heads per block (head width D / n_heads).
        mlp_width: hidden width of the transformer's MLP, and of the MLP baseline's layers.
        mlp_depth: hidden ReLU layers of the MLP baseline.
        kq_identity: transformer with the trainable a_h <x~_i, x~_j> attention term.
        vo_identity: transformer with the trainable b_h sum_j A_ij x~_j output term.
        kq_identity_mult: c_KQ, fixed factor of the a_h term (in effect a_h's learning-rate
            multiplier under Adam; 1 as in the reference regression model).
        vo_identity_mult: c_VO, fixed factor of the b_h term (the copy task needs a large
            one: see ``docs/results/symbol-templates.md``, T5).
        lr: Adam learning rate (constant, no weight decay).
        batch_size: strings per step (the effective batch is min(n_train, batch_size)).
        epochs: passes over the fixed training set.
        seed: model init and batch order.
        eval_sequences: fresh validation and test strings scored at the end.
        eval_seed: seed of the validation and test strings.
        device: torch device of the model and the batches (``"cpu"``, ``"cuda"``, ...); the
            data are drawn on the CPU either way, so a seed gives the same strings on every
            device.
        threads: torch CPU threads during the run (1, as in the spec's measurements: these
            models are small, and on a shared 2-core machine 2 threads were up to 80x slower
            per step than 1; 0 = leave torch's setting).
    """

    model: str = "transformer"
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_width: int = 256
    mlp_depth: int = 2
    kq_identity: bool = False
    vo_identity: bool = False
    kq_identity_mult: float = 1.0
    vo_identity_mult: float = 1.0
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: int = 1000
    seed: int = 0
    eval_sequences: int = 1000
    eval_seed: int = 0
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r} is invalid: expected one of {MODELS}")
        for name in ("d_model", "n_layers", "n_heads", "mlp_width", "mlp_depth", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
        for name in ("epochs", "eval_sequences", "seed", "eval_seed", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= 0")
        for name in ("lr", "kq_identity_mult", "vo_identity_mult"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is invalid: expected a finite float > 0")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device={self.device!r} is invalid: expected a torch device"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} is invalid: CUDA is not available here")
        if self.model == "mlp" and (self.kq_identity or self.vo_identity):
            raise ValueError("kq_identity/vo_identity are transformer options, not for model='mlp'")

    @property
    def label(self) -> str:
        """Short model name: mlp, transformer, transformer+kq, transformer+vo, ..."""
        if self.model == "mlp":
            return "mlp"
        return "transformer" + "+kq" * self.kq_identity + "+vo" * self.vo_identity


def build_template_model(task: SymbolTemplateTask, config: TemplateTrainConfig) -> nn.Module:
    """A fresh model for ``task``; the init depends only on ``config.seed``."""
    kind = task.spec.label_type
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(config.seed, 5))
        if config.model == "mlp":
            outputs = 1 if kind == "regression" else task.vocab_size
            return MLP(
                MLPConfig(
                    task.vocab_size, task.seq_len, outputs, config.mlp_width, config.mlp_depth
                )
            )
        model_config = TransformerConfig(
            vocab_size=task.vocab_size,
            max_len=task.seq_len,
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            d_model=config.d_model,
            mlp=True,
            mlp_width=config.mlp_width,
            activation="gelu",
            dropout=0.0,
            positional="learned",
            causal=False,
            tied=kind == "multiclass",
            n_outputs=1 if kind == "regression" else None,
            kq_identity=config.kq_identity,
            vo_identity=config.vo_identity,
            kq_identity_mult=config.kq_identity_mult,
            vo_identity_mult=config.vo_identity_mult,
            init="default",
        )
        return Transformer(model_config)


def label_output(model: nn.Module, tokens: Tensor) -> Tensor:
    """The model's output at the scored (last, QUERY) position: (B, outputs)."""
    out = model(tokens)
    return out[:, -1] if out.dim() == 3 else out


def _untrained_rows(model: nn.Module, task: SymbolTemplateTask) -> Tensor | None:
    """A copy of the input-embedding rows of the validation and test symbols (None when a
    tied unembedding trains them through the softmax)."""
    rows = torch.cat([torch.arange(s, s + n) for s, n in map(task.alphabets.get, SPLITS[1:])])
    if isinstance(model, MLP):
        table = model.embed.weight.view(task.seq_len, task.vocab_size, -1)
        return table[:, rows].detach().clone()
    if model.config.tied:
        return None
    return model.embed.weight[rows].detach().clone()


def _loss(task: SymbolTemplateTask, out: Tensor, batch: Batch) -> Tensor:
    if task.spec.label_type == "regression":
        return F.mse_loss(out[:, 0], batch.params["label_value"])
    return F.cross_entropy(out, batch.targets[:, -1])


@torch.no_grad()
def score(
    model: nn.Module, task: SymbolTemplateTask, batch: Batch, chunk: int = 4096
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``batch``: MSE and nearest-label accuracy for
    regression (sign accuracy for +-1), cross-entropy and token accuracy otherwise."""
    was_training = model.training
    model.eval()
    outs = [
        label_output(model, batch.tokens[i : i + chunk]) for i in range(0, batch.batch_size, chunk)
    ]
    model.train(was_training)
    out = torch.cat(outs)
    if task.spec.label_type == "regression":
        y = batch.params["label_value"]
        pred = out[:, 0]
        return {
            "mse": F.mse_loss(pred, y).item(),
            "accuracy": (nearest_label(pred, task.label_values) == y).float().mean().item(),
        }
    target = batch.targets[:, -1]
    return {
        "loss": F.cross_entropy(out, target).item(),
        "accuracy": (out.argmax(-1) == target).float().mean().item(),
    }


def train_template_model(
    task: SymbolTemplateTask, config: TemplateTrainConfig, *, log_every: int = 0
) -> dict[str, Any]:
    """Train per the module protocol; returns the config, train/validation/test scores
    (``train_*``, ``val_*``, ``test_*``), ``error`` (test MSE for regression, else 1 - test
    accuracy), the number of steps and ``wall_s``. Raises ``AssertionError`` if an untrained
    embedding row changed."""
    if not isinstance(task, SymbolTemplateTask):
        raise ValueError(f"train_template_model needs a SymbolTemplateTask, got {task!r}")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(task, config, log_every)
    finally:
        torch.set_num_threads(threads)


def _train(task: SymbolTemplateTask, config: TemplateTrainConfig, log_every: int) -> dict[str, Any]:
    start_time = time.perf_counter()
    device = torch.device(config.device)
    model = build_template_model(task, config).to(device)
    data = task.train_set().to(device)
    n = data.batch_size
    size = min(n, config.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=0.0)
    frozen = _untrained_rows(model, task)
    gen = torch.Generator().manual_seed(stream_seed(config.seed, 6))
    model.train()
    steps = 0
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, size):
            rows = order[i : i + size]
            batch = Batch(
                tokens=data.tokens[rows],
                targets=data.targets[rows],
                loss_mask=data.loss_mask[rows],
                params={k: v[rows] for k, v in data.params.items()},
                vocab_size=data.vocab_size,
                true_probs_fn=data.true_probs_fn,
            )
            loss = _loss(task, label_output(model, batch.tokens), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        if log_every and (epoch + 1) % log_every == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the wall time covers the queued kernels
    train_wall = time.perf_counter() - start_time
    after = _untrained_rows(model, task)
    if frozen is not None:
        assert torch.equal(frozen, after), "embedding rows of unseen symbols changed in training"
    result: dict[str, Any] = {
        "config": asdict(config),
        "model": config.label,
        "task": task.spec.to_dict(),
        "n": task.spec.train_alphabet_size,
        "n_train": n,
        "batch_size": size,
        "steps": steps,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "untrained_rows_checked": frozen is not None,
    }
    splits = {"train": data}
    for split in ("validation", "test"):
        gen_eval = task.generator(config.eval_seed, split)
        splits[split] = task.sample(config.eval_sequences, generator=gen_eval).to(device)
    for split, batch in splits.items():
        prefix = {"train": "train", "validation": "val", "test": "test"}[split]
        result.update({f"{prefix}_{k}": v for k, v in score(model, task, batch).items()})
    regression = task.spec.label_type == "regression"
    result["error"] = result["test_mse"] if regression else 1.0 - result["test_accuracy"]
    result["train_wall_s"] = train_wall
    result["wall_s"] = time.perf_counter() - start_time
    result["model_object"] = model
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m iclgym.harness.template_train [--env ID] [--set KEY=VALUE] [flags]``."""
    from iclgym.harness.train import add_dataclass_arguments, dataclass_values
    from iclgym.registry import make_task, parse_overrides

    parser = argparse.ArgumentParser(
        prog="iclgym template-train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--env", default="ICL-SymbolTemplate-v0", help="a template env id")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_dataclass_arguments(parser, TemplateTrainConfig)
    args = parser.parse_args(argv)
    task = make_task(args.env, **parse_overrides(args.overrides))
    result = train_template_model(
        task, TemplateTrainConfig(**dataclass_values(TemplateTrainConfig, args))
    )
    result.pop("model_object")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
