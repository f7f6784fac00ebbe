"""Score any predictor on any task against the Bayes-optimal oracle.

``evaluate`` draws held-out sequences from the task's seeded split stream, runs the predictor
and the oracle on the same batches, and returns a :class:`Report`: mean cross-entropy,
excess loss over the oracle, KL(true || predictor) per position and at the last position,
accuracy next to the oracle's, per-position curves, and strategy attribution
(KL(strategy || predictor) for every reference strategy, and the nearest one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from iclgym.harness.metrics import accuracy, cross_entropy, entropy, kl_divergence
from iclgym.harness.predictors import Predictor
from iclgym.tasks.base import Task


@dataclass(frozen=True)
class Report:
    """Evaluation of one predictor on one task split; all losses in nats per token."""

    predictor: str
    env_id: str | None
    task: Mapping[str, object]
    split: str
    seed: int
    num_sequences: int
    cross_entropy: float
    cross_entropy_se: float
    oracle_cross_entropy: float
    excess_loss: float
    excess_loss_se: float
    entropy: float
    kl: float
    kl_last: float
    kl_last_se: float
    oracle_kl: float
    oracle_kl_last: float
    accuracy: float
    oracle_accuracy: float
    strategy_kl: Mapping[str, float]
    strategy_kl_last: Mapping[str, float]
    nearest_strategy: str
    curves: Mapping[str, list[float]] = field(repr=False)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def to_json(self, **kwargs: object) -> str:
        return json.dumps(self.to_dict(), **kwargs)  # type: ignore[arg-type]


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    se = values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return values.mean().item(), se


@torch.no_grad()
def evaluate(
    predictor: Predictor,
    task: Task | str,
    *,
    split: str = "test",
    seed: int = 0,
    num_sequences: int = 2048,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = False,
    **task_kwargs: object,
) -> Report:
    """Evaluate ``predictor`` on ``num_sequences`` sequences of ``split``.

    ``task`` is a :class:`Task` or a registered env id (``task_kwargs`` override its spec).
    The same ``(task, split, seed, num_sequences, batch_size)`` always gives the same data.
    """
    env_id = None
    if isinstance(task, str):
        from iclgym.registry import make_task

        env_id, task = task, make_task(task, **task_kwargs)
    elif task_kwargs:
        raise ValueError("task keyword overrides need an env id, not a Task instance")
    if num_sequences < 1 or batch_size < 1:
        raise ValueError(f"num_sequences={num_sequences} and batch_size={batch_size} must be >= 1")
    generator = task.generator(seed, split, device)
    names = list(task.strategies)
    per_seq: dict[str, list[torch.Tensor]] = {k: [] for k in ("ce", "oracle_ce", "kl_last")}
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(task.seq_len, device=device)

    def add(name: str, values: torch.Tensor) -> None:
        total = values.sum(0)
        sums[name] = sums[name] + total if name in sums else total

    done = 0
    with tqdm(total=num_sequences, disable=not progress, desc="evaluate", unit="seq") as bar:
        while done < num_sequences:
            size = min(batch_size, num_sequences - done)
            batch = task.sample(size, generator=generator, device=device)
            mask = batch.loss_mask.to(torch.float32)
            log_q = predictor.predict(batch)
            if log_q.shape != (*batch.tokens.shape, batch.vocab_size):
                raise ValueError(
                    f"predictor returned shape {tuple(log_q.shape)}, expected "
                    f"{(*batch.tokens.shape, batch.vocab_size)}"
                )
            log_o = task.oracle(batch)
            p = batch.true_probs
            ce, oracle_ce = cross_entropy(log_q, batch.targets), cross_entropy(log_o, batch.targets)
            kl, oracle_kl = kl_divergence(p, log_q), kl_divergence(p, log_o)
            tokens_per_seq = mask.sum(1)
            per_seq["ce"].append((ce * mask).sum(1) / tokens_per_seq)
            per_seq["oracle_ce"].append((oracle_ce * mask).sum(1) / tokens_per_seq)
            per_seq["kl_last"].append(kl[:, -1])
            counts += mask.sum(0)
            for name, values in (
                ("cross_entropy", ce),
                ("oracle_cross_entropy", oracle_ce),
                ("kl", kl),
                ("oracle_kl", oracle_kl),
                ("accuracy", accuracy(log_q, batch.targets)),
                ("oracle_accuracy", accuracy(log_o, batch.targets)),
                ("entropy", entropy(p)),
            ):
                add(name, values * mask)
            for name, strategy in task.strategies.items():
                log_s = strategy(batch)
                add(f"strategy:{name}", kl_divergence(log_s.exp(), log_q) * mask)
            done += size
            bar.update(size)

    curves = {k: (v / counts).tolist() for k, v in sums.items() if not k.startswith("strategy:")}
    strat_curves = {n: sums[f"strategy:{n}"] / counts for n in names}
    total = counts.sum()
    mean = {k: (v.sum() / total).item() for k, v in sums.items()}
    ce_mean, ce_se = _mean_se(torch.cat(per_seq["ce"]))
    excess, excess_se = _mean_se(torch.cat(per_seq["ce"]) - torch.cat(per_seq["oracle_ce"]))
    kl_last, kl_last_se = _mean_se(torch.cat(per_seq["kl_last"]))
    strategy_kl_last = {n: c[-1].item() for n, c in strat_curves.items()}
    return Report(
        predictor=getattr(predictor, "name", type(predictor).__name__),
        env_id=env_id,
        task={"family": task.name, **task.spec.to_dict()},
        split=split,
        seed=seed,
        num_sequences=num_sequences,
        cross_entropy=ce_mean,
        cross_entropy_se=ce_se,
        oracle_cross_entropy=mean["oracle_cross_entropy"],
        excess_loss=excess,
        excess_loss_se=excess_se,
        entropy=mean["entropy"],
        kl=mean["kl"],
        kl_last=kl_last,
        kl_last_se=kl_last_se,
        oracle_kl=mean["oracle_kl"],
        oracle_kl_last=curves["oracle_kl"][-1],
        accuracy=mean["accuracy"],
        oracle_accuracy=mean["oracle_accuracy"],
        strategy_kl={n: (sums[f"strategy:{n}"].sum() / total).item() for n in names},
        strategy_kl_last=strategy_kl_last,
        nearest_strategy=min(strategy_kl_last, key=strategy_kl_last.__getitem__),
        curves=curves,
    )
