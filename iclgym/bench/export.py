"""Frozen evaluation sets as Parquet files, for models trained and scored outside Python loops.

:func:`export_parquet` writes the held-out set that :func:`~iclgym.harness.evaluate.evaluate`
scores (the same :class:`~iclgym.harness.evaluate.HeldOut`: same split stream, seed, batches
and oracle) to one Parquet file; :func:`read_parquet` reads it back as an :class:`ExportedSet`
and :func:`score_parquet` scores predictions on it through ``evaluate`` itself, so its
:class:`~iclgym.harness.evaluate.Report` equals ``evaluate(predictor, env_id, split=...,
seed=..., num_sequences=..., batch_size=..., **spec)`` (one formula, no second implementation).
Writing and reading need pyarrow (``pip install iclgym[export]``).

**Schema**: one row per sequence (S rows of T positions, V tokens, F features):

- ``tokens``, ``targets``: list<int64> (T), the model input and the next token at each position;
- ``loss_mask``: list<bool> (T), the scored positions;
- ``features``: list<list<float32>> (T, F), continuous inputs (only tasks that have them);
- ``true_probs``: list<list<float32>> (T, V), the law each target was drawn from;
- ``oracle_log_probs``: list<list<float32>> (T, V), the Bayes oracle's log-probs (nats), NaN
  where ``loss_mask`` is False;
- ``strategy_<name>_log_probs``: the same for each reference strategy of the task;
- provenance: ``env_id`` (string, e.g. ``ICL-MarkovChain-v0``), ``version`` (int32, its
  ``-vN``), ``fingerprint`` (string, :func:`export_fingerprint`), ``split`` (string), ``seed``
  (int64, the evaluation seed), ``row_index`` (int64, 0 .. S - 1: the row's place in the set).

Position ``t`` has seen ``tokens[: t + 1]`` (and ``features[: t + 1]``) and predicts
``targets[t]``; only positions with ``loss_mask`` count. The schema metadata key ``b"iclgym"``
holds a JSON object: ``format``, ``iclgym_version``, ``env_id``, ``version``, ``family``,
``overrides`` (the spec overrides given), ``spec`` (the id's fully resolved spec),
``task_spec`` (the scored task's spec: a named split's variant), ``split``, ``seed``,
``num_sequences``, ``batch_size``, ``vocab_size``, ``seq_len``, ``feature_dim``, ``oracle`` (how
it is computed), ``oracle_mc`` (per batch of ``batch_size`` rows: the oracle's Monte-Carlo
``[bias, se, scored count]``, zeros for a closed form), ``strategies`` (names, in order),
``label_values`` (per token, ``null`` for non-label tokens; ``null`` for tasks without
real-valued labels), ``label_values_dtype`` and ``fingerprint``.

Scoring by hand: with ``lq`` a model's log-probs (nats), a sequence's cross-entropy is the mean
of ``-lq[t, targets[t]]`` over its scored positions; ``Report.excess_loss`` is the mean over
sequences of that minus the same for ``oracle_log_probs`` (and ``cross_entropy`` the mean over
sequences of the first). :func:`score_parquet` computes every field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iclgym.harness.evaluate import HeldOut, Report, evaluate
from iclgym.harness.predictors import OraclePredictor, Predictor, StrategyPredictor
from iclgym.tasks.base import Batch, OracleEstimate, Task, TaskSpec, resolve_split

EXPORT_FORMAT = "iclgym-export-v1"
"""Version of the file layout; part of every fingerprint."""
METADATA_KEY = b"iclgym"
"""The Arrow schema metadata key of the file-level JSON."""


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "exporting evaluation sets needs pyarrow: pip install iclgym[export]"
        ) from None
    return pa, pc, pq


def env_version(env_id: str) -> int:
    """The ``N`` of an env id ending in ``-vN``; ``ValueError`` otherwise."""
    match = re.fullmatch(r".+-v(\d+)", env_id)
    if match is None:
        raise ValueError(f"env id {env_id!r} does not end in -vN")
    return int(match.group(1))


def export_fingerprint(
    env_id: str,
    spec: Mapping[str, Any],
    *,
    split: str,
    seed: int,
    num_sequences: int,
    batch_size: int,
) -> str:
    """sha256 (hex) of what an exported set is drawn from, as in
    :func:`iclgym.bench.suite.fingerprint`: ``json.dumps`` (sorted keys) of the export format,
    the env id and its version, the fully resolved ``spec`` (defaults included), the split,
    the seed, the number of sequences and the batch size (a task's draws may depend on it)."""
    payload = {
        "format": EXPORT_FORMAT,
        "env_id": env_id,
        "version": env_version(env_id),
        "spec": dict(spec),
        "split": split,
        "seed": seed,
        "num_sequences": num_sequences,
        "batch_size": batch_size,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, eq=False)
class ExportedSet:
    """An exported evaluation set: S sequences of T positions over V tokens, on the CPU.

    Built by :func:`read_parquet`; :meth:`held_out` makes the
    :class:`~iclgym.harness.evaluate.HeldOut` that :func:`score_parquet` scores.
    """

    env_id: str
    version: int
    fingerprint: str
    family: str
    overrides: Mapping[str, Any]
    """The spec overrides given to :func:`export_parquet`."""
    spec: Mapping[str, Any]
    """The env id's fully resolved spec."""
    task_spec: Mapping[str, Any]
    """The scored task's spec (a named split's variant; ``Report.task`` minus ``family``)."""
    split: str
    seed: int
    batch_size: int
    vocab_size: int
    feature_dim: int
    oracle: str
    """How the oracle is computed (``task.oracle_name``)."""
    oracle_mc: tuple[tuple[float, float, int], ...]
    """Per batch of ``batch_size`` rows: the oracle's Monte-Carlo (bias, se, scored count)."""
    label_values: Tensor | None
    """(V,) real value of each label token (NaN elsewhere), or None."""
    iclgym_version: str
    tokens: Tensor
    """(S, T) int64."""
    targets: Tensor
    """(S, T) int64."""
    loss_mask: Tensor
    """(S, T) bool."""
    true_probs: Tensor
    """(S, T, V) float32."""
    oracle_log_probs: Tensor
    """(S, T, V) float32, nats; NaN at unscored positions."""
    strategy_log_probs: Mapping[str, Tensor]
    """name -> (S, T, V) float32, nats; NaN at unscored positions; in the task's order."""
    features: Tensor | None
    """(S, T, F) float32, or None."""
    row_index: Tensor
    """(S,) int64, 0 .. S - 1."""

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def task(self) -> FrozenTask:
        """The set as a :class:`Task` whose oracle and strategies read the stored arrays."""
        return FrozenTask(self)

    def make_task(self) -> Task:
        """The live task this set was drawn from (the scored variant for a named split), rebuilt
        from the registry, e.g. to resolve a predictor with
        :func:`~iclgym.harness.predictors.resolve_predictor`. ``ValueError`` when this iclgym
        builds a different task for the recorded env id and overrides."""
        from iclgym.registry import make_task

        task, _ = resolve_split(make_task(self.env_id, **self.overrides), self.split)
        if task.name != self.family or task.spec.to_dict() != dict(self.task_spec):
            raise ValueError(
                f"this iclgym builds a different task for {self.env_id} with {dict(self.overrides)}"
                f" (split {self.split!r}) than the one exported with iclgym {self.iclgym_version}"
            )
        return task

    def batches(self, device: torch.device | str = "cpu") -> list[Batch]:
        """The set in its original batches of ``batch_size`` rows, on ``device``. Each batch's
        ``params`` hold the stored arrays (``row_index``, ``true_probs``, ``oracle_log_probs``,
        ``strategy:<name>``), not the latent task parameters: predictors must not read them."""
        out = []
        for start in range(0, self.num_sequences, self.batch_size):
            rows = slice(start, start + self.batch_size)
            params = {
                "row_index": self.row_index[rows],
                "true_probs": self.true_probs[rows],
                "oracle_log_probs": self.oracle_log_probs[rows],
                **{f"strategy:{k}": v[rows] for k, v in self.strategy_log_probs.items()},
            }
            batch = Batch(
                tokens=self.tokens[rows],
                targets=self.targets[rows],
                loss_mask=self.loss_mask[rows],
                params=params,
                vocab_size=self.vocab_size,
                true_probs_fn=_stored_true_probs,
                features=None if self.features is None else self.features[rows],
            )
            out.append(batch.to(device))
        return out

    def held_out(self, device: torch.device | str = "cpu") -> HeldOut:
        """The :class:`HeldOut` of this set: the batches, oracle, strategies and Monte-Carlo
        error of the exported one, recomputing nothing."""
        return HeldOut(
            self.task(),
            split=self.split,
            seed=self.seed,
            device=device,
            batches=self.batches(device),
            env_id=self.env_id,
        )


def _stored_true_probs(batch: Batch) -> Tensor:
    return batch.params["true_probs"]


class _Spec(TaskSpec):
    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"Spec({self._values!r})"


@dataclass(frozen=True)
class _StoredEstimate(OracleEstimate):
    error: tuple[float, float] = (0.0, 0.0)

    def mc_error(self, targets: Tensor, mask: Tensor) -> tuple[float, float]:
        return self.error


class FrozenTask(Task):
    """An :class:`ExportedSet` seen as a task: family name, spec, vocabulary and label values of
    the exported one; :meth:`oracle`, :meth:`oracle_estimate` (with the stored Monte-Carlo
    error) and :attr:`strategies` return the stored log-probs of the batches of
    :meth:`ExportedSet.batches`. It draws no new data: :meth:`sample` raises ``ValueError``."""

    def __init__(self, data: ExportedSet) -> None:
        super().__init__(_Spec(data.task_spec))
        self.data = data
        self.name = data.family  # type: ignore[misc]

    @property
    def vocab_size(self) -> int:
        return self.data.vocab_size

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    @property
    def feature_dim(self) -> int:
        return self.data.feature_dim

    @property
    def label_values(self) -> Tensor | None:
        return self.data.label_values

    @property
    def oracle_name(self) -> str:
        return self.data.oracle

    def sample(self, batch_size, *, generator, device=None) -> Batch:
        raise ValueError("a frozen evaluation set draws no new sequences")

    def oracle(self, batch: Batch) -> Tensor:
        return batch.params["oracle_log_probs"]

    def oracle_estimate(self, batch: Batch) -> OracleEstimate:
        """The stored oracle with its stored Monte-Carlo error; ``ValueError`` for a batch that
        is not one of :meth:`ExportedSet.batches` (the error is stored per batch)."""
        rows = batch.params["row_index"].cpu()
        start, size = int(rows[0]), self.data.batch_size
        whole = torch.arange(start, min(start + size, self.data.num_sequences))
        if start % size or not torch.equal(rows, whole):
            raise ValueError("the oracle's Monte-Carlo error is stored per exported batch only")
        bias, se, _ = self.data.oracle_mc[start // size]
        return _StoredEstimate(batch.params["oracle_log_probs"], error=(bias, se))

    @property
    def strategies(self) -> Mapping[str, Any]:
        return {name: _StoredStrategy(name) for name in self.data.strategy_log_probs}


@dataclass(frozen=True)
class _StoredStrategy:
    name: str

    def __call__(self, batch: Batch) -> Tensor:
        return batch.params[f"strategy:{self.name}"]


class _ArrayPredictor:
    """Predictions given as one (S, T, V) or (S, T, 1) array over the whole set."""

    def __init__(self, values: Tensor, name: str) -> None:
        self.values, self.name = values, name

    def predict(self, batch: Batch) -> Tensor:
        rows = batch.params["row_index"].to(self.values.device)
        return self.values[rows].to(batch.tokens.device)


# ------------------------------------------------------------------------------------ writing


def export_parquet(
    env_id: str,
    out: str | os.PathLike[str],
    *,
    split: str = "test",
    num_sequences: int = 1024,
    seed: int = 0,
    spec: Mapping[str, Any] | None = None,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Path:
    """Write ``num_sequences`` sequences of ``split`` (seed ``seed``) of ``env_id`` with spec
    overrides ``spec`` to the Parquet file ``out`` (zstd; parent folders are created; written
    to a temporary file and renamed, so a reader never sees a partial file) and return its path.

    The set is the :class:`HeldOut` that ``evaluate`` draws for the same arguments (including
    ``batch_size``: some tasks' draws depend on it). Schema: the module docstring. Raises
    ``ImportError`` without pyarrow, ``ValueError`` for an unknown id, spec key or value, split,
    or a ``num_sequences``, ``seed`` or ``batch_size`` out of range, or an ``out`` not named
    ``*.parquet``.
    """
    if Path(out).suffix != ".parquet":
        raise ValueError(f"export out={str(out)!r} must end in .parquet: the file is Parquet")
    _pyarrow()
    from iclgym.registry import get_entry, make_task

    overrides = dict(spec or {})
    env_id = get_entry(env_id).env_id
    task = make_task(env_id, **overrides)
    held = HeldOut(
        task,
        split=split,
        seed=seed,
        num_sequences=num_sequences,
        batch_size=batch_size,
        device=device,
        progress=progress,
        env_id=env_id,
    )
    data = _collect(held, env_id, overrides, task.spec.to_dict(), batch_size)
    return _write(data, Path(out))


def _collect(
    held: HeldOut,
    env_id: str,
    overrides: Mapping[str, Any],
    spec: Mapping[str, Any],
    batch_size: int,
) -> ExportedSet:
    """The arrays and metadata of ``held`` (an exported set before writing), on the CPU."""
    import iclgym

    scored = held.task
    batches = [part.batch.to("cpu") for part in held.parts]
    tokens = torch.cat([b.tokens for b in batches])
    S, T = tokens.shape
    V = scored.vocab_size
    oracle = torch.full((S, T, V), float("nan"))
    strategies = {name: torch.full((S, T, V), float("nan")) for name in held.strategy_names}
    start = 0
    for part in held.parts:
        rows, cols = part.rows.cpu() + start, part.cols.cpu()
        oracle[rows, cols] = part.oracle.cpu()
        for name, (_, log_s) in part.strategies.items():
            strategies[name][rows, cols] = log_s.cpu()
        start += part.batch.batch_size
    features = None
    if batches[0].features is not None:
        features = torch.cat([b.features for b in batches]).float()
    values = held.label_values
    fingerprint = export_fingerprint(
        env_id,
        spec,
        split=held.split,
        seed=held.seed,
        num_sequences=S,
        batch_size=batch_size,
    )
    return ExportedSet(
        env_id=env_id,
        version=env_version(env_id),
        fingerprint=fingerprint,
        family=scored.name,
        overrides=MappingProxyType(dict(overrides)),
        spec=MappingProxyType(dict(spec)),
        task_spec=MappingProxyType(scored.spec.to_dict()),
        split=held.split,
        seed=held.seed,
        batch_size=batch_size,
        vocab_size=V,
        feature_dim=scored.feature_dim,
        oracle=held.oracle_name,
        oracle_mc=tuple(part.mc for part in held.parts),
        label_values=None if values is None else values.cpu(),
        iclgym_version=iclgym.__version__,
        tokens=tokens,
        targets=torch.cat([b.targets for b in batches]),
        loss_mask=torch.cat([b.loss_mask for b in batches]),
        true_probs=torch.cat([b.true_probs.float() for b in batches]),
        oracle_log_probs=oracle,
        strategy_log_probs=MappingProxyType(strategies),
        features=features,
        row_index=torch.arange(S),
    )


def _strategy_column(name: str) -> str:
    return f"strategy_{name}_log_probs"


def _metadata(data: ExportedSet) -> dict[str, Any]:
    values = data.label_values
    return {
        "format": EXPORT_FORMAT,
        "iclgym_version": data.iclgym_version,
        "env_id": data.env_id,
        "version": data.version,
        "family": data.family,
        "overrides": dict(data.overrides),
        "spec": dict(data.spec),
        "task_spec": dict(data.task_spec),
        "split": data.split,
        "seed": data.seed,
        "num_sequences": data.num_sequences,
        "batch_size": data.batch_size,
        "vocab_size": data.vocab_size,
        "seq_len": data.seq_len,
        "feature_dim": data.feature_dim,
        "oracle": data.oracle,
        "oracle_mc": [list(mc) for mc in data.oracle_mc],
        "strategies": list(data.strategy_log_probs),
        "label_values": None
        if values is None
        else [v if np.isfinite(v) else None for v in values.tolist()],
        "label_values_dtype": None if values is None else str(values.dtype).removeprefix("torch."),
        "fingerprint": data.fingerprint,
    }


def _nested(pa, array: np.ndarray):
    """(S, d1, ..., dk) array -> an Arrow list<...list<values>> array (k levels) of S rows."""
    if array.size >= 2**31:
        raise ValueError(f"an array of {array.size} values is too large for one file")
    out = pa.array(array.reshape(-1))
    count = array.size
    for size in reversed(array.shape[1:]):
        count //= size
        offsets = pa.array(np.arange(count + 1, dtype=np.int32) * size)
        out = pa.ListArray.from_arrays(offsets, out)
    return out


def _write(data: ExportedSet, path: Path) -> Path:
    pa, _, pq = _pyarrow()
    S = data.num_sequences
    columns: dict[str, Any] = {
        "tokens": _nested(pa, data.tokens.numpy()),
        "targets": _nested(pa, data.targets.numpy()),
        "loss_mask": _nested(pa, data.loss_mask.numpy()),
    }
    if data.features is not None:
        columns["features"] = _nested(pa, data.features.numpy())
    columns["true_probs"] = _nested(pa, data.true_probs.numpy())
    columns["oracle_log_probs"] = _nested(pa, data.oracle_log_probs.numpy())
    for name, log_probs in data.strategy_log_probs.items():
        columns[_strategy_column(name)] = _nested(pa, log_probs.numpy())
    columns["env_id"] = pa.array([data.env_id] * S, pa.string())
    columns["version"] = pa.array([data.version] * S, pa.int32())
    columns["fingerprint"] = pa.array([data.fingerprint] * S, pa.string())
    columns["split"] = pa.array([data.split] * S, pa.string())
    columns["seed"] = pa.array([data.seed] * S, pa.int64())
    columns["row_index"] = pa.array(data.row_index.numpy(), pa.int64())
    table = pa.table(columns)
    meta = json.dumps(_metadata(data), default=str).encode()
    table = table.replace_schema_metadata({METADATA_KEY: meta})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------ reading


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples of a frozen spec (recursively)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _dense(pc, column, name: str, depth: int) -> np.ndarray:
    """A column of ``depth`` nested equal-length lists -> an (S, d1, ..., d_depth) array."""
    array = column.combine_chunks()
    rows = len(array)
    dims = []
    for _ in range(depth):
        if array.null_count:
            raise ValueError(f"column {name!r} has null lists")
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        if lengths.size and (lengths != lengths[0]).any():
            raise ValueError(f"column {name!r} has lists of different lengths")
        dims.append(int(lengths[0]) if lengths.size else 0)
        array = array.flatten()
    if array.null_count:
        raise ValueError(f"column {name!r} has null values")
    return array.to_numpy(zero_copy_only=False).reshape(rows, *dims).copy()


def read_parquet(path: str | os.PathLike[str]) -> ExportedSet:
    """Read a file written by :func:`export_parquet`.

    Raises ``ImportError`` without pyarrow and ``ValueError`` for a file that is not an
    iclgym export (no ``b"iclgym"`` metadata, another format), whose rows are missing,
    reordered or from another export (provenance columns disagreeing with the metadata), whose
    fingerprint does not match its metadata, or whose arrays have the wrong shapes.
    """
    pa, pc, pq = _pyarrow()
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{str(path)!r} is not an iclgym export (no {METADATA_KEY!r} metadata)")
    meta = json.loads(raw)
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{str(path)!r} has format {meta.get('format')!r}; this iclgym reads {EXPORT_FORMAT}"
        )
    S, T, V = meta["num_sequences"], meta["seq_len"], meta["vocab_size"]
    if table.num_rows != S:
        raise ValueError(f"{str(path)!r} has {table.num_rows} rows, its metadata says {S}")
    spec = _tuples(meta["spec"])
    fingerprint = export_fingerprint(
        meta["env_id"],
        spec,
        split=meta["split"],
        seed=meta["seed"],
        num_sequences=S,
        batch_size=meta["batch_size"],
    )
    if fingerprint != meta["fingerprint"]:
        raise ValueError(f"{str(path)!r}: the fingerprint does not match the metadata")
    if len(meta["oracle_mc"]) != -(-S // meta["batch_size"]):
        raise ValueError(f"{str(path)!r}: oracle_mc does not have one entry per batch")
    row_index = table.column("row_index").to_numpy()
    if not np.array_equal(row_index, np.arange(S)):
        raise ValueError(f"{str(path)!r}: rows are missing or reordered (row_index)")
    for name in ("env_id", "version", "fingerprint", "split", "seed"):
        if pc.any(pc.not_equal(table.column(name), pa.scalar(meta[name]))).as_py():
            raise ValueError(f"{str(path)!r}: column {name!r} disagrees with the file's metadata")

    def tensor(name: str, depth: int, shape: Sequence[int]) -> Tensor:
        array = _dense(pc, table.column(name), name, depth)
        if array.shape != tuple(shape):
            raise ValueError(f"column {name!r} has shape {array.shape}, expected {tuple(shape)}")
        return torch.from_numpy(array)

    label_values = None
    if meta["label_values"] is not None:
        dtype = getattr(torch, meta["label_values_dtype"])
        values = [math.nan if v is None else v for v in meta["label_values"]]
        label_values = torch.tensor(values, dtype=dtype)
    F = meta["feature_dim"]
    features = None
    if "features" in table.column_names:
        features = tensor("features", 2, (S, T, F))
    return ExportedSet(
        env_id=meta["env_id"],
        version=meta["version"],
        fingerprint=meta["fingerprint"],
        family=meta["family"],
        overrides=MappingProxyType(_tuples(meta["overrides"])),
        spec=MappingProxyType(spec),
        task_spec=MappingProxyType(_tuples(meta["task_spec"])),
        split=meta["split"],
        seed=meta["seed"],
        batch_size=meta["batch_size"],
        vocab_size=V,
        feature_dim=F,
        oracle=meta["oracle"],
        oracle_mc=tuple((float(b), float(s), int(n)) for b, s, n in meta["oracle_mc"]),
        label_values=label_values,
        iclgym_version=meta["iclgym_version"],
        tokens=tensor("tokens", 1, (S, T)),
        targets=tensor("targets", 1, (S, T)),
        loss_mask=tensor("loss_mask", 1, (S, T)),
        true_probs=tensor("true_probs", 2, (S, T, V)),
        oracle_log_probs=tensor("oracle_log_probs", 2, (S, T, V)),
        strategy_log_probs=MappingProxyType(
            {name: tensor(_strategy_column(name), 2, (S, T, V)) for name in meta["strategies"]}
        ),
        features=features,
        row_index=torch.from_numpy(row_index.astype(np.int64)),
    )


# ------------------------------------------------------------------------------------ scoring


def score_parquet(
    source: str | os.PathLike[str] | ExportedSet,
    predictor: Predictor | Tensor | np.ndarray | str,
    *,
    device: torch.device | str = "cpu",
    per_sequence: bool = False,
    name: str | None = None,
) -> Report:
    """Score ``predictor`` on an exported set (a path or an :class:`ExportedSet`) with
    :func:`~iclgym.harness.evaluate.evaluate`; the :class:`Report` equals ``evaluate``'s on
    the same env id, spec, split, seed, number of sequences and batch size.

    ``predictor`` is one of:

    * ``"oracle"`` or a strategy name: the stored log-probs (an ``OraclePredictor`` or
      ``StrategyPredictor`` of the exported task, same family and spec, is read the same way);
    * an (S, T, V) array of log-probs (nats), or (S, T, 1) label values on tasks with
      real-valued labels, row ``i`` for ``row_index`` i (only scored positions are read;
      reported as ``name``, default ``"predictions"``);
    * any :class:`Predictor`: called on :meth:`ExportedSet.batches` (tokens, targets, loss mask,
      features; no latent task parameters).

    Raises ``ValueError`` for an unknown name, an array with other than S rows, or predictions
    of the wrong shape (from ``evaluate``).
    """
    data = source if isinstance(source, ExportedSet) else read_parquet(source)
    frozen = data.task()
    if isinstance(predictor, str):
        if predictor == "oracle":
            resolved: Predictor = OraclePredictor(frozen)
        elif predictor in data.strategy_log_probs:
            resolved = StrategyPredictor(frozen, predictor)
        else:
            raise ValueError(
                f"unknown stored predictor {predictor!r}: expected 'oracle' or one of "
                f"{', '.join(data.strategy_log_probs)}; pass a Predictor object for anything "
                "else (e.g. resolve_predictor(text, exported.make_task()))"
            )
    elif isinstance(predictor, (Tensor, np.ndarray)):
        values = torch.as_tensor(predictor)
        if values.ndim != 3 or values.shape[0] != data.num_sequences:
            raise ValueError(
                f"predictions of shape {tuple(values.shape)}: expected "
                f"({data.num_sequences}, T, V) log-probs or ({data.num_sequences}, T, 1) values"
            )
        resolved = _ArrayPredictor(values, name or "predictions")
    elif isinstance(predictor, OraclePredictor) and _is_exported(predictor.task, data):
        resolved = OraclePredictor(frozen)
    elif isinstance(predictor, StrategyPredictor) and _is_exported(predictor.task, data):
        resolved = StrategyPredictor(frozen, predictor.name)
    else:
        resolved = predictor
    return evaluate(resolved, data.held_out(device), per_sequence=per_sequence)


def _is_exported(task: Task, data: ExportedSet) -> bool:
    if isinstance(task, FrozenTask):
        return task.data.fingerprint == data.fingerprint
    return getattr(task, "name", None) == data.family and task.spec.to_dict() == dict(
        data.task_spec
    )
