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

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iclgym.bench.run import (
    BENCH_TRAIN,
    BUNDLE_FORMAT,
    PREDICTOR_PREFIX,
    BenchModel,
    bench_threads,
    floor_excess,
    held_out,
    predictor_config_hash,
    relative_path,
    score_model,
    train_flops,
)
from iclgym.bench.store import COLUMNS, ResultRow, ResultsStore, check_oracle_bound
from iclgym.bench.suite import SUITE, SUITE_VERSION, SuiteEntry, fingerprint
from iclgym.harness import resolve_predictor
from iclgym.harness.model import load_checkpoint, load_model, num_parameters
from iclgym.harness.predictors import PredictorKind
from iclgym.harness.train import parse_assignments

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


PROTOCOL = ("data", "batch_size", "optimizer", "lr", "betas", "weight_decay", "schedule",
            "warmup_steps", "grad_clip", "loss", "labels", "dtype")  # fmt: skip
"""The :data:`BENCH_TRAIN` settings a bench checkpoint's recorded run must have."""


def model_names(models: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """``iclgym bench --model`` names: ``models`` or the baselines' ``MODELS`` (entries with
    ``factory`` and ``args``); empty when baselines is not importable."""
    if models is not None:
        return models
    try:
        from baselines import MODELS
    except ImportError:
        return {}
    return MODELS


def name_fits(
    name: str,
    factory: str,
    args: Mapping[str, Any],
    quick: bool,
    models: Mapping[str, Any] | None = None,
) -> bool:
    """True when the bench name ``name`` (``MODEL [KEY=VALUE ...] [--quick]``, as ``iclgym
    bench`` writes it) builds ``factory`` with ``args`` at the ``quick`` budget; ``MODEL`` is
    a name of :func:`model_names` or the factory's import path."""
    words = name.split(" ")
    if (words[-1] == "--quick") != quick:
        return False
    words = words[:-1] if quick else words
    known = model_names(models)
    if words[0] in known:
        base = (known[words[0]].factory, dict(known[words[0]].args))
    else:
        base = (words[0], {})
    try:
        named = {**base[1], **parse_assignments(words[1:], "model name")}
    except ValueError:
        return False
    return base[0] == factory and json.dumps(named, sort_keys=True, default=str) == json.dumps(
        dict(args), sort_keys=True, default=str
    )


def _mismatch(label: str, claimed: Any, recorded: Any) -> str:
    return f"{label} claimed {claimed!r}, the checkpoint's run gives {recorded!r}"


def check_provenance(
    claim: Mapping[str, Any],
    entry: SuiteEntry,
    state: Mapping[str, Any],
    seq_len: int,
    parameters: int,
    models: Mapping[str, Any] | None = None,
) -> str:
    """The first field of a model ``claim`` that its checkpoint ``state`` contradicts, as a
    reason (``""``: none): the name against the recorded factory and arguments, the seed,
    the step budget (``steps``, the entry's ``steps`` or, named ``--quick``, ``quick_steps``),
    the bench training protocol, the config hash and the training FLOPs recomputed from them
    and the checkpoint's ``parameters``."""
    info = state.get("model_factory") or {}
    meta = state.get("meta") or {}
    run = meta.get("train_config") or {}
    factory, args = info.get("factory"), info.get("args") or {}
    quick = claim["model"].endswith(" --quick")
    if not name_fits(claim["model"], factory, args, quick, models):
        return (f"model {claim['model']!r} does not name the checkpoint's factory {factory!r} "
                f"with arguments {args!r}")  # fmt: skip
    if run.get("seed") != claim["seed"]:
        return _mismatch("seed", claim["seed"], run.get("seed"))
    steps = claim["scores"].get("steps")
    if steps != state.get("step"):
        return _mismatch("scores.steps", steps, state.get("step"))
    budget = entry.quick_steps if quick else entry.steps
    if steps != budget:
        return f"scores.steps={steps!r} is not {entry.name}'s {'quick ' * quick}budget {budget}"
    protocol = json.loads(json.dumps({k: getattr(BENCH_TRAIN, k) for k in PROTOCOL}))
    for key, value in protocol.items():
        if run.get(key) != value:
            return (
                f"the checkpoint was trained with {key}={run.get(key)!r}, not the bench's {value!r}"
            )
    expected = BenchModel(claim["model"], factory, args).config_hash(quick)
    if claim["config_hash"] != expected:
        return _mismatch("config_hash", claim["config_hash"], expected)
    flops = train_flops(parameters, steps, seq_len)
    if not abs(float(claim["train_flops"]) - flops) <= 1e-9 * flops:
        return _mismatch("train_flops", claim["train_flops"], flops)
    return ""


def _is_predictor(name: str, task: Any, kinds: Any, device: str) -> bool:
    """True when ``name`` resolves to a predictor (``oracle``, a strategy, ``ngram:2``)."""
    try:
        resolve_predictor(name, task, kinds, device=device)
    except (ValueError, KeyError, TypeError):
        return False
    return True


def weights_hash(state: Mapping[str, Any]) -> str:
    """sha256 of a checkpoint's weights (``state["model"]``, by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.get("model", {}).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@bench_threads
def verify_claim(
    claim: Mapping[str, Any],
    base: Path,
    device: str = "cpu",
    suite: Sequence[SuiteEntry] = SUITE,
    kinds: Mapping[str, PredictorKind] | None = None,
    models: Mapping[str, Any] | None = None,
) -> Verdict:
    """Check one claim (a mapping with the store's columns; ``checkpoint`` relative to
    ``base``, or ``predictor:TEXT`` rebuilt with the predictor ``kinds``) by re-evaluating it
    on its entry's scored set (the entry looked up by name in ``suite``): the summary scores,
    both per-sequence excess arrays (what the leaderboard's scores and intervals are computed
    from) and the parameter count must match, and the scores must not beat the Bayes oracle
    (:func:`check_oracle_bound`). A ``predictor:TEXT`` claim must be named ``TEXT``, seed 0,
    with its config hash and no parameters and no training; a model claim's name, seed,
    budget, config hash and FLOPs must be its checkpoint's (:func:`check_provenance`, with
    the model names ``models``), and a predictor's name is no model's. Note that loading a
    checkpoint imports and calls the model factory it names: verify only bundles whose code
    you trust."""
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
        if claim["seed"] != 0 or "steps" in claim["scores"]:
            return reject(f"a {checkpoint!r} result has seed 0 and no steps")
        if claim["config_hash"] != predictor_config_hash(text):
            return reject(f"config_hash claimed {claim['config_hash']!r}, the predictor "
                          f"{text!r} has {predictor_config_hash(text)!r}")  # fmt: skip
    try:
        held = held_out(entry, device)
        if predictor:
            net = resolve_predictor(text, held.task, kinds, device=device)
        else:
            if _is_predictor(claim["model"], held.task, kinds, device):
                return reject(
                    f"model {claim['model']!r} is a predictor's name: its result has checkpoint "
                    f"'{PREDICTOR_PREFIX}{claim['model']}' and no parameters"
                )
            net = load_model(base / checkpoint, held.task, device)
            reason = check_provenance(claim, entry, load_checkpoint(base / checkpoint),
                                      held.task.seq_len, num_parameters(net), models)  # fmt: skip
            if reason:
                return reject(reason)
    except ValueError as err:
        return reject(f"checkpoint does not load: {err}")
    scores = score_model(net, held, floor_excess(entry, held))
    try:
        check_oracle_bound(entry_name, scores)
    except ValueError as err:
        return reject(str(err))
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
    verdicts, seen = [], {}
    for claim in claims:
        if isinstance(claim, Mapping) and bundle.get("suite_version") != SUITE_VERSION:
            claim = {**claim, "suite_version": bundle.get("suite_version")}
        verdict = verify_claim(claim, path.parent, device, suite, kinds)
        if verdict.ok:
            reason = _bundle_reason(claim, bundle.get("model"), path.parent, seen)
            if reason:
                verdict = Verdict(verdict.entry, verdict.seed, False, reason, verdict.recomputed)
        verdicts.append(verdict)
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


def _bundle_reason(claim: Mapping[str, Any], model: Any, base: Path, seen: dict[str, tuple]) -> str:
    """Why a verified ``claim`` does not fit its bundle (``""``: it does): its name is not the
    bundle's ``model`` name, the bundle's factory and arguments are not its checkpoint's, or
    its checkpoint (file or weights) is another claim's; records its checkpoint in ``seen``."""
    model = model if isinstance(model, Mapping) else {}
    if claim["model"] != model.get("name"):
        return f"model {claim['model']!r} is not the bundle's model name {model.get('name')!r}"
    if claim["checkpoint"].startswith(PREDICTOR_PREFIX):
        return ""
    path = (base / claim["checkpoint"]).resolve()
    state = load_checkpoint(path)
    info = state.get("model_factory") or {}
    recorded = {"factory": info.get("factory"), "args": info.get("args") or {}}
    given = {"factory": model.get("factory"), "args": model.get("args")}
    if json.dumps(given, sort_keys=True, default=str) != json.dumps(recorded, sort_keys=True,
                                                                     default=str):  # fmt: skip
        return f"bundle model factory/args {given} are not the checkpoint's {recorded}"
    me = (claim["entry"], claim["seed"], claim["model"], claim["config_hash"])
    for key in (f"file:{path}", f"weights:{weights_hash(state)}"):
        other = seen.setdefault(key, me)
        if other != me:
            return (
                f"checkpoint {claim['checkpoint']!r} is also the claim of {other[0]} seed "
                f"{other[1]} (same {key.split(':')[0]})"
            )
    return ""


def format_verdicts(verdicts: list[Verdict]) -> str:
    """One line per claim (``verified`` or ``REJECTED: reason``) and a count."""
    lines = [
        f"{v.entry:32s} seed {v.seed}: " + ("verified" if v.ok else f"REJECTED: {v.reason}")
        for v in verdicts
    ]
    ok = sum(v.ok for v in verdicts)
    lines.append(f"{ok}/{len(verdicts)} verified")
    return "\n".join(lines)
