"""Score any predictor on any task against the Bayes-optimal oracle.

:class:`HeldOut` is a fixed evaluation set with everything about it that does not depend on
the predictor, computed once: the sequences (from the task's seeded split stream), the true
next-token laws, the oracle's prediction and its Monte-Carlo error, and every reference
strategy's prediction, all kept only at the scored positions. :func:`evaluate` runs a predictor
on it and returns a :class:`Report`: mean cross-entropy, excess loss over the oracle, KL(true
|| predictor) over the scored positions and at each sequence's last scored position, accuracy
next to the oracle's, per-position curves, strategy attribution (KL(strategy || predictor) for
every reference strategy, and the nearest one) and, for tasks with real-valued labels, the
squared error of the predicted label value. ``iclgym eval`` and the trainer's periodic
evaluation both go through :func:`evaluate`.

**Scored positions only.** Every metric is computed on the positions of ``batch.loss_mask``
*selected* (never multiplied by the mask), so a predictor's values at unscored positions,
``-inf`` or NaN included, cannot reach any number. A predictor equal to the oracle at the
scored positions gets the oracle's report exactly.

**Value predictors.** On tasks with ``task.label_values`` a predictor may return (B, T, 1) real
predictions instead of log-probabilities (a value model, :mod:`iclgym.harness.model`); its report
has the MSE fields and ``accuracy`` (the nearest label value equals the true one), and ``None``
for the fields that need a distribution (cross-entropy, KL, strategies).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from iclgym.harness.metrics import kl_divergence
from iclgym.harness.predictors import OraclePredictor, Predictor
from iclgym.tasks.base import Batch, Task, resolve_split
from iclgym.validation import is_real

PRIVILEGED_STRATEGIES = ("true",)
"""Strategies that read the latent parameters: reported, never a ``nearest_strategy``."""


def expected_value(log_q: Tensor, values: Tensor) -> Tensor:
    """E_q[value] over the label tokens (q renormalised over them): (N, V), (V,) -> (N,)."""
    is_label = torch.isfinite(values)
    q = log_q[:, is_label].softmax(-1)
    return q @ values[is_label].to(q.dtype)


def nearest_label(pred: Tensor, values: Tensor) -> Tensor:
    """The label value closest to each prediction (the first one on ties): (N,) -> (N,)."""
    labels = values[torch.isfinite(values)].unique().to(pred)
    return labels[(pred[:, None] - labels).abs().argmin(1)]


@dataclass
class _Part:
    """One batch of a held-out set, kept at its N scored positions."""

    batch: Batch
    rows: Tensor  # (N,) sequence index of each scored position
    cols: Tensor  # (N,) position index
    targets: Tensor  # (N,)
    true: Tensor  # (N, V) true next-token law
    log_true: Tensor  # (N, V) its log (floored: entries where true = 0 are never read)
    oracle: Tensor  # (N, V) oracle log-probs
    oracle_ce: Tensor  # (N,)
    oracle_kl: Tensor  # (N,)
    oracle_acc: Tensor  # (N,)
    entropy: Tensor  # (N,)
    strategies: dict[str, tuple[Tensor, Tensor]]  # name -> (probs, log-probs), (N, V) each
    last: Tensor  # (B,) index in 0..N-1 of each sequence's last scored position
    values: Tensor | None  # (N,) true label values (tasks with label_values)
    mc: tuple[float, float, int]  # oracle Monte-Carlo (bias, se, scored count) of this batch
    seq_counts: Tensor  # (B,) scored positions per sequence


class HeldOut:
    """A fixed evaluation set and the predictor-independent quantities on it, computed once.

    The sequences are ``num_sequences`` draws of ``split`` from ``task.generator(seed, split)``
    (a named split of ``task.named_splits``: its variant task on the ``"test"`` stream, see
    :func:`~iclgym.tasks.base.resolve_split`; ``self.task`` is then that variant)
    in batches of ``batch_size`` (the same arguments always give the same data), or the given
    ``batches``. The oracle (``task.oracle_estimate``) and every strategy run once per batch,
    here; :func:`evaluate` then only runs the predictor. Memory: a few (N, V) float32 tensors,
    N = the number of scored positions.
    """

    def __init__(
        self,
        task: Task,
        *,
        split: str = "test",
        seed: int = 0,
        num_sequences: int = 2048,
        batch_size: int = 512,
        device: torch.device | str = "cpu",
        progress: bool = False,
        batches: Sequence[Batch] | None = None,
        env_id: str | None = None,
    ) -> None:
        self.split, self.seed, self.env_id = split, seed, env_id
        self.device = torch.device(device)
        if batches is None:
            for name, value in (("num_sequences", num_sequences), ("batch_size", batch_size)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
            task, stream = resolve_split(task, split)
            gen = task.generator(seed, stream, device)
            starts = range(0, num_sequences, batch_size)
            sizes = [min(batch_size, num_sequences - d) for d in starts]
            batches = (task.sample(b, generator=gen, device=device) for b in sizes)
        else:
            batches = list(batches)
            num_sequences = sum(b.batch_size for b in batches)
        self.task = task
        self.num_sequences = num_sequences
        values = getattr(task, "label_values", None)
        self.label_values = values.to(self.device) if values is not None else None
        names = list(task.strategies)
        self.strategy_names = names
        self.parts: list[_Part] = []
        bar = tqdm(total=num_sequences, disable=not progress, desc="held-out set", unit="seq")
        with bar:
            for batch in batches:
                self.parts.append(self._part(batch, names))
                bar.update(batch.batch_size)
        self.oracle_name = task.oracle_name
        count = sum(p.mc[2] for p in self.parts)
        self.oracle_mc_bias = sum(p.mc[0] * p.mc[2] for p in self.parts) / count
        self.oracle_mc_se = math.sqrt(sum((p.mc[1] * p.mc[2]) ** 2 for p in self.parts)) / count
        self.seq_len = task.seq_len
        self._oracle_sums: _Sums | None = None

    def oracle_sums(self) -> _Sums:
        """Per-position and per-sequence sums of the oracle's metrics and the entropy (computed
        on first use, then shared by every evaluation)."""
        if self._oracle_sums is None:
            sums = _Sums(self.seq_len, self.device)
            for part in self.parts:
                ones = torch.ones_like(part.oracle_ce, dtype=torch.float64)
                sums.counts = sums.counts.index_add(0, part.cols, ones)
                sums.add("oracle_cross_entropy", part, part.oracle_ce, per_seq=True)
                sums.add("oracle_kl", part, part.oracle_kl, last=True)
                sums.add("oracle_accuracy", part, part.oracle_acc)
                sums.add("entropy", part, part.entropy)
            self._oracle_sums = sums
        return self._oracle_sums.copy()

    def _part(self, batch: Batch, names: Iterable[str]) -> _Part:
        mask = batch.loss_mask
        rows, cols = mask.nonzero(as_tuple=True)
        if rows.numel() == 0:
            raise ValueError("a held-out batch has no scored position (loss_mask all False)")
        targets = batch.targets[rows, cols]
        estimate = self.task.oracle_estimate(batch)  # the oracle: once per batch
        oracle = estimate.log_probs[rows, cols].float()
        true = batch.true_probs[rows, cols].float()
        log_true = true.clamp_min(1e-45).log()
        strategies = {}
        for name in names:
            log_s = self.task.strategies[name](batch)[rows, cols].float()
            strategies[name] = (log_s.exp(), log_s)
        # each sequence's last scored position: the largest flat index of its row
        last = torch.full((batch.batch_size,), -1, dtype=torch.long, device=rows.device)
        last.scatter_reduce_(0, rows, torch.arange(rows.numel(), device=rows.device), "amax")
        bias, se = estimate.mc_error(batch.targets, mask)
        values = None
        if self.label_values is not None:
            values = self.label_values[targets]
        return _Part(
            batch=batch,
            rows=rows,
            cols=cols,
            targets=targets,
            true=true,
            log_true=log_true,
            oracle=oracle,
            oracle_ce=-oracle.gather(-1, targets[:, None])[:, 0],
            oracle_kl=kl_divergence(true, oracle, log_true),
            oracle_acc=(oracle.argmax(-1) == targets).float(),
            entropy=-torch.xlogy(true, true).sum(-1),
            strategies=strategies,
            last=last[last >= 0],
            values=values,
            mc=(bias, se, int(rows.numel())),
            seq_counts=mask.sum(1).double(),
        )

    @property
    def oracle_mc_error(self) -> float:
        """``bias + 3 se`` of the oracle's mean cross-entropy over the whole set (nats/token):
        with high probability the oracle's CE is at most this far above the exact Bayes CE.
        0 for a closed-form oracle."""
        return self.oracle_mc_bias + 3 * self.oracle_mc_se

    def strategy_kl_last_references(self) -> dict[str, float]:
        """KL(true || strategy) at each sequence's last scored position, mean over the set, per
        non-privileged strategy (the reference lines of the phase diagram)."""
        out = {}
        for name in self.strategy_names:
            if name in PRIVILEGED_STRATEGIES:
                continue
            kls = []
            for part in self.parts:
                p, log_p = part.true[part.last], part.log_true[part.last]
                kls.append(kl_divergence(p, part.strategies[name][1][part.last], log_p))
            out[name] = torch.cat(kls).mean().item()
        return out


@dataclass(frozen=True)
class Report:
    """Evaluation of one predictor on one task split; losses in nats per token, over the
    scored positions only. Fields that need a distribution are ``None`` for a value predictor;
    the MSE fields are ``None`` for tasks without real-valued labels."""

    predictor: str
    env_id: str | None
    task: Mapping[str, object]
    split: str
    seed: int
    num_sequences: int
    oracle: str
    """How the oracle is computed (``task.oracle_name``)."""
    oracle_mc_error: float
    """Monte-Carlo error bound of the oracle's CE over this set: bias + 3 se (0: closed form)."""
    oracle_mc_bias: float
    oracle_mc_se: float
    cross_entropy: float | None
    cross_entropy_se: float | None
    oracle_cross_entropy: float
    excess_loss: float | None
    excess_loss_se: float | None
    entropy: float
    kl: float | None
    kl_last: float | None
    kl_last_se: float | None
    oracle_kl: float
    oracle_kl_last: float
    accuracy: float
    """Argmax accuracy (first token wins ties); for a value predictor, the nearest label value
    equals the true one."""
    accuracy_se: float
    """Standard error of ``accuracy`` over sequences (each sequence's mean accuracy: positions
    within a sequence are not independent, sequences are)."""
    oracle_accuracy: float
    mse: float | None
    """Squared error of the predicted label value (a value predictor's output, else E_q[value]
    over the label tokens), tasks with real-valued labels."""
    mse_se: float | None
    value_accuracy: float | None
    """The label value nearest to the predicted value equals the true one (sign accuracy for
    +-1 labels)."""
    chance_mse: float | None
    """MSE of predicting the mean label of this set (the chance level)."""
    strategy_kl: Mapping[str, float] | None
    strategy_kl_last: Mapping[str, float] | None
    nearest_strategy: str | None
    """argmin of ``strategy_kl_last`` over the non-privileged strategies (the phase label)."""
    curves: Mapping[str, list[float | None]] = field(repr=False)
    """Per-position means (``None`` at positions never scored)."""
    sequence_excess: tuple[float, ...] | None = field(default=None, repr=False)
    """Each held-out sequence's excess loss (its mean cross-entropy minus the oracle's,
    nats/token), in the set's order: the unit a bootstrap resamples. Only with
    ``evaluate(..., per_sequence=True)`` and log-prob predictors."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def to_json(self, **kwargs: object) -> str:
        """:func:`strict_json` of :meth:`to_dict` (NaN standard errors become null)."""
        return strict_json(self.to_dict(), **kwargs)


ORACLE_MARGIN = 1e-3
"""Nats by which a mean excess loss may fall below -(3 SE + the oracle's Monte-Carlo error)
before :func:`beats_oracle` calls it impossible: rare large gains of the oracle make the
per-sequence excess heavy-tailed (k = 1000, T = 20: the uniform predictor was 1e-5 nats,
'10 SE', ahead on 500 sequences, with the oracle ahead in expectation), so the standard error
alone flags honest predictors; a predictor that reads future tokens is ahead by nats."""


def beats_oracle(report: Report) -> bool:
    """True when ``report``'s predictor beats the exact Bayes oracle beyond chance: mean excess
    loss < -(3 SE + oracle MC error + :data:`ORACLE_MARGIN`). No predictor that sees only the
    context can (the oracle is Bayes-optimal), so such a score reads what it should not: future
    tokens or, for the privileged ``true`` strategy, the hidden parameters. False for value
    predictors (no excess loss)."""
    if report.excess_loss is None:
        return False
    return report.excess_loss < -oracle_bound(report.excess_loss_se, report.oracle_mc_error)


def oracle_bound(se: float | None, mc_error: float | None) -> float:
    """How far (nats/token) an honest mean excess loss may fall below 0 by chance:
    3 ``se`` + ``mc_error`` + :data:`ORACLE_MARGIN`, a missing or non-finite ``se`` or
    ``mc_error`` counting 0 (the one rule of :func:`beats_oracle` and the result store)."""

    def finite(x: float | None) -> float:
        return max(float(x), 0.0) if is_real(x) and math.isfinite(x) else 0.0  # type: ignore[arg-type]

    return 3 * finite(se) + finite(mc_error) + ORACLE_MARGIN


def json_safe(obj: object) -> object:
    """``obj`` with every non-finite float (NaN, inf; Python or numpy) replaced by None,
    through dicts, lists and tuples: what strict JSON can hold (a standard error of one
    sequence is NaN)."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json(obj: object, **kwargs: object) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)`` with ``allow_nan=False``: valid JSON for
    every parser (Python's default writes the non-standard ``NaN``)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)  # type: ignore[arg-type]


def _mean_se(values: Tensor) -> tuple[float, float]:
    n = values.numel()
    se = values.std().item() / math.sqrt(n) if n > 1 else math.nan
    return values.mean().item(), se


class _Sums:
    """Per-position sums and per-sequence sums of per-token values, in float64: float32 sums
    of cross-entropies near log V moved means by ~1e-5 nats at V = 1000, which made the
    uniform predictor 'beat' the exact oracle by 10 standard errors."""

    def __init__(self, seq_len: int, device: torch.device) -> None:
        self.pos: dict[str, Tensor] = {}
        self.seq: dict[str, list[Tensor]] = {}
        self.last: dict[str, list[Tensor]] = {}
        self.counts = torch.zeros(seq_len, device=device, dtype=torch.float64)
        self.T = seq_len

    def add(
        self, name: str, part: _Part, values: Tensor, per_seq: bool = False, last: bool = False
    ) -> None:
        """Add (N,) per-token ``values``: per position; per sequence (their mean) if
        ``per_seq``; at each sequence's last scored position if ``last``."""
        values = values.double()
        pos = torch.zeros(self.T, device=values.device, dtype=torch.float64)
        pos.index_add_(0, part.cols, values)
        self.pos[name] = self.pos[name] + pos if name in self.pos else pos
        if per_seq:
            B = part.batch.batch_size
            sums = torch.zeros(B, device=values.device, dtype=torch.float64)
            sums.index_add_(0, part.rows, values)
            self.seq.setdefault(name, []).append((sums / part.seq_counts)[part.seq_counts > 0])
        if last:
            self.last.setdefault(name, []).append(values[part.last])

    def copy(self) -> _Sums:
        out = _Sums(self.T, self.counts.device)
        out.counts = self.counts
        out.pos, out.seq, out.last = dict(self.pos), dict(self.seq), dict(self.last)
        return out

    def mean(self, name: str) -> float:
        return (self.pos[name].sum() / self.counts.sum()).item()

    def curve(self, name: str) -> list[float | None]:
        return [
            (s / c).item() if c > 0 else None
            for s, c in zip(self.pos[name], self.counts, strict=True)
        ]


@torch.no_grad()
def evaluate(
    predictor: Predictor,
    task: Task | str | HeldOut,
    *,
    split: str = "test",
    seed: int = 0,
    num_sequences: int = 2048,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = False,
    per_sequence: bool = False,
    **task_kwargs: object,
) -> Report:
    """Evaluate ``predictor`` on ``num_sequences`` sequences of ``split`` (see :class:`Report`).

    ``task`` is a :class:`Task`, a registered env id (``task_kwargs`` override its spec) or a
    :class:`HeldOut` set (then the data arguments are ignored: the set fixes them). ``split``
    is a seed-stream split (``"train"``, ``"validation"``, ``"test"``) or one of the task's
    ``named_splits`` (held-out distributions such as longer contexts). The same
    ``(task, split, seed, num_sequences, batch_size)`` always gives the same data. Raises
    ``ValueError`` for a predictor output that is not (B, T, V) log-probabilities (or (B, T, 1)
    values on a task with real-valued labels). ``per_sequence`` also returns each sequence's
    excess loss (:attr:`Report.sequence_excess`).
    """
    if isinstance(task, HeldOut):
        if task_kwargs:
            raise ValueError("task keyword overrides need an env id, not a HeldOut set")
        held_out = task
    else:
        env_id = None
        if isinstance(task, str):
            from iclgym.registry import make_task

            env_id, task = task, make_task(task, **task_kwargs)
        elif task_kwargs:
            raise ValueError("task keyword overrides need an env id, not a Task instance")
        held_out = HeldOut(
            task,
            split=split,
            seed=seed,
            num_sequences=num_sequences,
            batch_size=batch_size,
            device=device,
            progress=progress,
            env_id=env_id,
        )
    return _score(predictor, held_out, progress, per_sequence)


def _score(
    predictor: Predictor, held: HeldOut, progress: bool, per_sequence: bool = False
) -> Report:
    task, V = held.task, held.task.vocab_size
    values_table = held.label_values
    device = held.device
    sums = held.oracle_sums()
    names = held.strategy_names
    value_mode: bool | None = None
    squared: list[Tensor] = []
    value_hits: list[Tensor] = []
    labels: list[Tensor] = []
    # the task's own oracle is already on the held-out set: reuse it (it may be an estimate
    # that costs seconds per batch, and recomputing would redraw its samples)
    own_oracle = isinstance(predictor, OraclePredictor) and predictor.task is task
    with tqdm(total=held.num_sequences, disable=not progress, desc="evaluate", unit="seq") as bar:
        for part in held.parts:
            B, T = part.batch.tokens.shape
            if own_oracle:
                is_values, sel = False, part.oracle  # (N, V), already selected
            else:
                out = predictor.predict(part.batch)
                if tuple(out.shape) == (B, T, V):
                    is_values = False
                elif values_table is not None and tuple(out.shape) == (B, T, 1) and V != 1:
                    is_values = True
                else:
                    expected = f"{(B, T, V)}" + (
                        f" log-probs or {(B, T, 1)} values" if values_table is not None else ""
                    )
                    raise ValueError(
                        f"predictor returned shape {tuple(out.shape)}, expected {expected}"
                    )
                sel = out[part.rows, part.cols].to(device)  # (N, V) or (N, 1): selection
            if value_mode is not None and is_values != value_mode:
                raise ValueError("predictor switched between log-probs and values across batches")
            value_mode = is_values
            if is_values:
                pred = sel[:, 0].double()
            else:
                log_q = sel
                ce = -log_q.gather(-1, part.targets[:, None])[:, 0]
                sums.add("cross_entropy", part, ce, per_seq=True)
                sums.add("kl", part, kl_divergence(part.true, log_q, part.log_true), last=True)
                sums.add("accuracy", part, log_q.argmax(-1) == part.targets, per_seq=True)
                for name in names:
                    p, log_p = part.strategies[name]
                    sums.add(f"strategy:{name}", part, kl_divergence(p, log_q, log_p), last=True)
                pred = None
                if values_table is not None:
                    pred = expected_value(log_q, values_table).double()
            if part.values is not None and pred is not None:
                y = part.values.double()
                squared.append((pred - y) ** 2)
                hit = nearest_label(pred, values_table) == y
                value_hits.append(hit.float())
                labels.append(y)
                if is_values:
                    sums.add("accuracy", part, hit, per_seq=True)
            bar.update(B)

    mse = mse_se = value_accuracy = chance_mse = None
    if squared:
        err, y = torch.cat(squared), torch.cat(labels)
        mse, mse_se = _mean_se(err)
        value_accuracy = torch.cat(value_hits).mean().item()
        chance_mse = ((y - y.mean()) ** 2).mean().item()
    oracle_kl_last = torch.cat(sums.last["oracle_kl"])
    ce = ce_se = excess = excess_se = kl = kl_last = kl_last_se = sequence_excess = None
    strategy_kl = strategy_kl_last = nearest = None
    curve_names = ["oracle_cross_entropy", "oracle_kl", "oracle_accuracy", "entropy", "accuracy"]
    if not value_mode:
        per_seq_ce = torch.cat(sums.seq["cross_entropy"])
        ce, ce_se = _mean_se(per_seq_ce)
        per_seq_excess = per_seq_ce - torch.cat(sums.seq["oracle_cross_entropy"])
        excess, excess_se = _mean_se(per_seq_excess)
        if per_sequence:
            sequence_excess = tuple(per_seq_excess.double().cpu().tolist())
        kl = sums.mean("kl")
        kl_last, kl_last_se = _mean_se(torch.cat(sums.last["kl"]))
        strategy_kl = {n: sums.mean(f"strategy:{n}") for n in names}
        strategy_kl_last = {n: torch.cat(sums.last[f"strategy:{n}"]).mean().item() for n in names}
        candidates = {n: v for n, v in strategy_kl_last.items() if n not in PRIVILEGED_STRATEGIES}
        nearest = min(candidates, key=candidates.__getitem__) if candidates else None
        curve_names += ["cross_entropy", "kl"]
    return Report(
        predictor=getattr(predictor, "name", type(predictor).__name__),
        env_id=held.env_id,
        task={"family": task.name, **task.spec.to_dict()},
        split=held.split,
        seed=held.seed,
        num_sequences=held.num_sequences,
        oracle=held.oracle_name,
        oracle_mc_error=held.oracle_mc_error,
        oracle_mc_bias=held.oracle_mc_bias,
        oracle_mc_se=held.oracle_mc_se,
        cross_entropy=ce,
        cross_entropy_se=ce_se,
        oracle_cross_entropy=sums.mean("oracle_cross_entropy"),
        excess_loss=excess,
        excess_loss_se=excess_se,
        entropy=sums.mean("entropy"),
        kl=kl,
        kl_last=kl_last,
        kl_last_se=kl_last_se,
        oracle_kl=sums.mean("oracle_kl"),
        oracle_kl_last=oracle_kl_last.mean().item(),
        accuracy=sums.mean("accuracy"),
        accuracy_se=_mean_se(torch.cat(sums.seq["accuracy"]))[1],
        oracle_accuracy=sums.mean("oracle_accuracy"),
        mse=mse,
        mse_se=mse_se,
        value_accuracy=value_accuracy,
        chance_mse=chance_mse,
        strategy_kl=strategy_kl,
        strategy_kl_last=strategy_kl_last,
        nearest_strategy=nearest,
        curves={name: sums.curve(name) for name in curve_names},
        sequence_excess=sequence_excess,
    )
