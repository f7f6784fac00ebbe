"""The versioned suite (``iclgym.bench.suite``): unique entries covering every registered task
family, every split resolvable, and fingerprints that change exactly with what a score is
computed on."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import iclgym
from iclgym.bench import SUITE, SUITE_VERSION, fingerprint
from iclgym.registry import ENVS
from iclgym.tasks.base import resolve_split


def test_entries_are_unique_reasoned_and_cover_every_family():
    names = [e.name for e in SUITE]
    assert len(set(names)) == len(names) and SUITE_VERSION == "iclgym-suite-v0"
    assert all(len(e.reason) > 20 and e.seeds == (0, 1, 2) for e in SUITE)
    families = {ENVS[e.env_id].family for e in SUITE}
    assert families == {ENVS[i].family for i in iclgym.list_envs()}
    for entry in SUITE:
        task, stream = resolve_split(entry.task(), entry.split)  # every split resolves
        assert stream in ("test", "validation") and task.seq_len >= 2
        assert 0 < entry.quick_steps < entry.steps


def test_fingerprints_follow_the_data_and_only_the_data():
    entry = SUITE[0]
    assert fingerprint(entry) == fingerprint(replace(entry))  # stable
    assert fingerprint(entry) == fingerprint(replace(entry, reason="reworded", steps=5))
    changed = [
        replace(entry, split="validation"),
        replace(entry, seeds=(0, 1)),
        replace(entry, eval_sequences=512),
        replace(entry, spec=MappingProxyType({**entry.spec, "alpha": 0.5})),
    ]
    prints = {fingerprint(e) for e in changed} | {fingerprint(entry)}
    assert len(prints) == len(changed) + 1
    assert len({fingerprint(e) for e in SUITE}) == len(SUITE)
