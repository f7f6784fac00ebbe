"""Phase detection on a logged training curve (Edelman et al. 2024's phase label: the nearest
strategy; ``docs/results/markov-chain.md``).

Every evaluation record carries ``strategy_kl_last`` (KL(strategy || model) at the last
position) and its argmin ``nearest``, the phase label. From a sequence of records this module
finds the phases (maximal runs of one label; the long ones are the plateaus) and the persistent
switch step from one strategy to another. Evaluations with a non-finite (NaN, infinite or
null) ``kl_last`` or strategy KL carry no phase: every function here ignores them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from math import isfinite
from typing import Any

from iclgym.validation import is_real

Record = Mapping[str, Any]


def _finite(value: Any) -> bool:
    return is_real(value) and isfinite(value)


def finite_records(records: Sequence[Record]) -> list[Record]:
    """The records whose ``kl_last`` and every ``strategy_kl_last`` value are finite numbers."""
    return [
        r
        for r in records
        if _finite(r.get("kl_last"))
        and all(_finite(v) for v in (r.get("strategy_kl_last") or {}).values())
    ]


def phases(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Maximal runs of evaluations with the same nearest strategy, in order.

    Each phase has ``label``, ``start_step`` and ``end_step`` (its first and last evaluation),
    ``checkpoints`` (how many evaluations) and the ``kl_last`` range inside it.
    """
    out: list[dict[str, Any]] = []
    for rec in finite_records(records):
        if out and out[-1]["label"] == rec["nearest"]:
            phase = out[-1]
            phase["end_step"] = rec["step"]
            phase["checkpoints"] += 1
            phase["kl_last_min"] = min(phase["kl_last_min"], rec["kl_last"])
            phase["kl_last_max"] = max(phase["kl_last_max"], rec["kl_last"])
        else:
            out.append(
                {
                    "label": rec["nearest"],
                    "start_step": rec["step"],
                    "end_step": rec["step"],
                    "checkpoints": 1,
                    "kl_last_min": rec["kl_last"],
                    "kl_last_max": rec["kl_last"],
                }
            )
    return out


def plateaus(records: Sequence[Record], min_checkpoints: int = 3) -> list[dict[str, Any]]:
    """The phases that last at least ``min_checkpoints`` evaluations (short runs are
    transitions or noise)."""
    return [p for p in phases(records) if p["checkpoints"] >= min_checkpoints]


def persistent_switch_step(
    records: Sequence[Record], before: str = "unigram", after: str = "bigram"
) -> int | None:
    """First checkpoint step from which KL(after || model) < KL(before || model) holds at
    every later checkpoint; ``None`` when it does not hold at the last one (or either strategy
    is missing)."""
    switch = None
    for rec in finite_records(records):
        kl = rec["strategy_kl_last"]
        if before not in kl or after not in kl:
            return None
        if kl[after] >= kl[before]:
            switch = None
        elif switch is None:
            switch = rec["step"]
    return switch


def phase_report(records: Sequence[Record], order: Sequence[str] = ()) -> dict[str, Any]:
    """Everything above in one JSON-friendly dict (used by the training summary).

    ``switch_step`` is the unigram -> bigram switch (target T4 of docs/results/markov-chain.md);
    ``switches`` has the persistent switch between every pair of consecutive strategies in ``order``
    (e.g. uniform, unigram, bigram, trigram for an order-3 task).
    """
    return {
        "switch_step": persistent_switch_step(records),
        "switches": {
            f"{a}->{b}": persistent_switch_step(records, a, b) for a, b in pairwise(order)
        },
        "phases": phases(records),
        "plateaus": plateaus(records),
    }
