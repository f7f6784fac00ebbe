"""Verification of bench results: re-evaluate each claimed result from its checkpoint on the
fingerprinted data and accept it only when the recomputed scores match the claim.

A claim is a stored row (``iclgym verify RESULT_ID``) or an entry of a submission bundle
(``iclgym verify PATH/bundle.json``, written by ``iclgym bench`` beside its checkpoints:
:func:`iclgym.bench.run.write_bundle`). Each is rejected, with the reason, when its suite
version is not the installed suite's, its entry is not in the suite, its data fingerprint is
not the entry's, its checkpoint is missing or does not load onto the entry's task, or a
recomputed score differs from the claim by more than the tolerance. Evaluation is
deterministic for a given device, so the tolerances only absorb floating-point reordering
across machines (they are far below any score difference a leaderboard reads: the excess
loss's standard error on 1024 sequences is about 1e-3 nats).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iclgym.bench.run import (
    BUNDLE_FORMAT,
    PREDICTOR_PREFIX,
    bench_threads,
    floor_excess,
    held_out,
    relative_path,
    score_model,
)
from iclgym.bench.store import COLUMNS, ResultRow, ResultsStore
from iclgym.bench.suite import SUITE, SUITE_VERSION, SuiteEntry, fingerprint
from iclgym.harness import resolve_predictor
from iclgym.harness.model import load_model, num_parameters
from iclgym.harness.predictors import PredictorKind

TOLERANCE = {"excess_loss": 1e-4, "accuracy": 1e-4, "score": 1e-3}
"""Largest accepted |recomputed - claimed| per score (nats/token; fraction; normalised)."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim: ``ok``, the ``reason`` when rejected, and the recomputed
    scores (empty when the claim was rejected before evaluation)."""

    entry: str
    seed: int
    ok: bool
    reason: str = ""
    recomputed: Mapping[str, float] = field(default_factory=dict)
    row_id: int | None = None


def check_claim(claim: Any) -> None:
    """Raise ``ValueError`` naming the field when ``claim`` is not a mapping with every store
    column of the right type (``scores`` a mapping holding the per-sequence arrays)."""
    if not isinstance(claim, Mapping):
        raise ValueError(f"a claim must be a JSON object, got {type(claim).__name__}")
    missing = [c for c in COLUMNS if c not in claim]
    if missing:
        raise ValueError(f"claim misses the fields {missing}")
    types = {"seed": int, "parameters": int, "train_flops": (int, float), "wall_s": (int, float)}
    for name, kind in types.items():
        if not isinstance(claim[name], kind) or isinstance(claim[name], bool):
            raise ValueError(f"claim field {name}={claim[name]!r} has the wrong type")
    for name in ("suite_version", "entry", "model", "config_hash", "fingerprint", "checkpoint"):
        if not isinstance(claim[name], str):
            raise ValueError(f"claim field {name}={claim[name]!r} is not a string")
    scores = claim["scores"]
    if not isinstance(scores, Mapping):
        raise ValueError(f"claim scores must be a JSON object, got {type(scores).__name__}")
    for name in ("sequence_excess", "floor_sequence_excess"):
        if not isinstance(scores.get(name), list):
            raise ValueError(f"claim scores miss the per-sequence array {name!r}")


def _differs(claimed: Any, value: float, tol: float) -> bool:
    """True unless ``claimed`` is a finite number within ``tol`` of ``value`` (NaN differs)."""
    if not isinstance(claimed, (int, float)) or isinstance(claimed, bool):
        return True
    return not abs(float(claimed) - value) <= tol


@bench_threads
def verify_claim(
    claim: Mapping[str, Any],
    base: Path,
    device: str = "cpu",
    suite: Sequence[SuiteEntry] = SUITE,
    kinds: Mapping[str, PredictorKind] | None = None,
) -> Verdict:
    """Check one claim (a mapping with the store's columns; ``checkpoint`` relative to
    ``base``, or ``predictor:TEXT`` rebuilt with the predictor ``kinds``) by re-evaluating it
    on its entry's scored set (the entry looked up by name in ``suite``): the summary scores,
    both per-sequence excess arrays (what the leaderboard's scores and intervals are computed
    from) and the parameter count must match. A ``predictor:TEXT`` claim must be named
    ``TEXT`` and claim no parameters and no training. Note that loading a checkpoint imports
    and calls the model factory it names: verify only bundles whose code you trust."""
    known = claim if isinstance(claim, Mapping) else {}
    entry_name, seed = str(known.get("entry")), known.get("seed", -1)

    def reject(reason: str, **recomputed: float) -> Verdict:
        return Verdict(entry_name, seed, False, reason, recomputed, known.get("id"))

    try:
        check_claim(claim)
    except ValueError as err:
        return reject(f"malformed claim: {err}")
    if claim["suite_version"] != SUITE_VERSION:
        return reject(
            f"suite version {claim['suite_version']!r} is not the installed suite {SUITE_VERSION!r}"
        )
    entries = {e.name: e for e in suite}
    if entry_name not in entries:
        return reject(f"entry {entry_name!r} is not in {SUITE_VERSION}")
    entry = entries[entry_name]
    if claim["fingerprint"] != fingerprint(entry):
        return reject(f"data fingerprint {claim['fingerprint']!r} is not {entry_name}'s")
    if not claim["checkpoint"]:
        return reject("no checkpoint was kept for this result")
    checkpoint = claim["checkpoint"]
    predictor = checkpoint.startswith(PREDICTOR_PREFIX)
    if predictor:
        text = checkpoint.removeprefix(PREDICTOR_PREFIX)
        if claim["model"] != text or claim["parameters"] != 0 or claim["train_flops"] != 0:
            return reject(
                f"a {checkpoint!r} result must be named {text!r} with 0 parameters and 0 "
                f"training FLOPs (got {claim['model']!r}, {claim['parameters']}, "
                f"{claim['train_flops']})"
            )
    try:
        held = held_out(entry, device)
        if predictor:
            net = resolve_predictor(text, held.task, kinds, device=device)
        else:
            net = load_model(base / checkpoint, held.task, device)
    except ValueError as err:
        return reject(f"checkpoint does not load: {err}")
    scores = score_model(net, held, floor_excess(entry, held))
    recomputed = {k: float(scores[k]) for k in TOLERANCE}
    claimed = claim["scores"]
    bad = [
        f"{key} claimed {claimed.get(key)!r}, recomputed {recomputed[key]:.6g}"
        for key, tol in TOLERANCE.items()
        if _differs(claimed.get(key), recomputed[key], tol)
    ]
    for key in ("sequence_excess", "floor_sequence_excess"):
        mine, theirs = np.asarray(scores[key], dtype=np.float64), claimed[key]
        try:
            gap = float(np.max(np.abs(np.asarray(theirs, dtype=np.float64) - mine)))
        except (TypeError, ValueError):  # wrong length or not numbers
            gap = float("nan")
        if not gap <= TOLERANCE["excess_loss"]:
            bad.append(f"{key} differs from the recomputed one (max gap {gap:.3g})")
    params = 0 if predictor else num_parameters(net)
    if claim["parameters"] != params:
        bad.append(f"parameters claimed {claim['parameters']}, the checkpoint has {params}")
    if bad:
        return reject("scores differ beyond tolerance: " + "; ".join(bad), **recomputed)
    return Verdict(entry_name, seed, True, "", recomputed, claim.get("id"))


def verify_result(
    store: str | Path,
    row_id: int,
    device: str = "cpu",
    suite: Sequence[SuiteEntry] = SUITE,
    kinds: Mapping[str, PredictorKind] | None = None,
) -> Verdict:
    """Verify stored row ``row_id`` and, when it holds, set its ``verified`` flag. Raises
    ``ValueError`` when there is no store at ``store`` or it has no such row."""
    if not Path(store).is_file():
        raise ValueError(f"no results store at {store}")
    with ResultsStore(store) as results:
        rows = results.rows(id=row_id)
        if not rows:
            raise ValueError(f"no result with id {row_id} in {store}")
        verdict = verify_claim(rows[0], results.path.parent, device, suite, kinds)
        if verdict.ok:
            results.mark_verified(row_id)
    return verdict


def verify_bundle(
    path: str | Path,
    store: str | Path | None = None,
    device: str = "cpu",
    suite: Sequence[SuiteEntry] = SUITE,
    kinds: Mapping[str, PredictorKind] | None = None,
) -> list[Verdict]:
    """Verify every claim of a submission bundle (``bundle.json`` or its folder). When all
    hold and ``store`` is given, the claims are added to it marked verified; a claim whose key
    is already stored marks that row only if the stored row is the claim itself (otherwise
    the stored row is verified on its own first). Raises ``ValueError`` for a file that is not
    a bundle."""
    path = Path(path)
    if path.is_dir():
        path = path / "bundle.json"
    try:
        bundle = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a readable bundle: {err}") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{str(path)!r} is not an {BUNDLE_FORMAT} bundle")
    claims = bundle.get("results", [])
    if not isinstance(claims, list) or not claims:
        raise ValueError(f"bundle {str(path)!r} holds no list of results")
    verdicts = []
    for claim in claims:
        if isinstance(claim, Mapping) and bundle.get("suite_version") != SUITE_VERSION:
            claim = {**claim, "suite_version": bundle.get("suite_version")}
        verdicts.append(verify_claim(claim, path.parent, device, suite, kinds))
    if store is not None and all(v.ok for v in verdicts):
        with ResultsStore(store) as results:
            for claim in claims:
                row = {k: claim[k] for k in COLUMNS}
                if row["checkpoint"] and not row["checkpoint"].startswith(PREDICTOR_PREFIX):
                    # re-anchor the checkpoint path at the store's folder
                    absolute = path.parent / row["checkpoint"]
                    row["checkpoint"] = relative_path(absolute, results.path.parent)
                key = {k: row[k] for k in ("suite_version", "entry", "model", "config_hash")}
                existing = results.rows(**key, seed=row["seed"])
                if not existing:
                    results.mark_verified(results.add(ResultRow(**row)))
                    continue
                stored = existing[0]
                same = all(stored[k] == row[k] for k in COLUMNS)
                if same or verify_claim(stored, results.path.parent, device, suite, kinds).ok:
                    results.mark_verified(stored["id"])
    return verdicts


def format_verdicts(verdicts: list[Verdict]) -> str:
    """One line per claim (``verified`` or ``REJECTED: reason``) and a count."""
    lines = [
        f"{v.entry:32s} seed {v.seed}: " + ("verified" if v.ok else f"REJECTED: {v.reason}")
        for v in verdicts
    ]
    ok = sum(v.ok for v in verdicts)
    lines.append(f"{ok}/{len(verdicts)} verified")
    return "\n".join(lines)
