"""The results store (``iclgym.bench.store``): rows round-trip, are immutable per key, and a
writer killed with SIGKILL mid-stream loses no committed row and leaves no partial one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest

from iclgym.bench import ResultRow, ResultsStore

ROW = ResultRow(
    suite_version="iclgym-suite-v0", entry="markov/bigram", model="transformer",
    config_hash="abc", seed=0, fingerprint="f" * 64, iclgym_version="0.1.0", git_commit="deadbeef",
    parameters=5472, train_flops=1.5e12, wall_s=61.0, device="cpu",
    scores={"excess_loss": 0.0123, "excess_loss_se": 0.001, "accuracy": 0.58},
)  # fmt: skip


def test_rows_round_trip_and_are_immutable_per_key(tmp_path):
    with ResultsStore(tmp_path / "results.db") as store:
        first = store.add(ROW)
        second = store.add(replace(ROW, seed=1, scores={"excess_loss": 0.02}))
        assert (first, second) == (1, 2) and len(store) == 2
        row = store.rows(seed=0)[0]
        assert row["scores"] == ROW.scores and row["verified"] is False and row["created"]
        assert {k: row[k] for k in ("entry", "model", "parameters")} == {
            "entry": "markov/bigram", "model": "transformer", "parameters": 5472,
        }  # fmt: skip
        with pytest.raises(ValueError, match="already stored"):
            store.add(replace(ROW, scores={"excess_loss": 0.0}))  # a changed claim
        store.mark_verified(first)
        assert store.rows(id=first)[0]["verified"] is True
        with pytest.raises(ValueError, match="no result with id 99"):
            store.mark_verified(99)
        with pytest.raises(ValueError, match="unknown columns"):
            store.rows(score=1)
        assert store.check() == "ok"
    assert ResultsStore(tmp_path / "results.db").rows(model="transformer")[1]["seed"] == 1


WRITER = textwrap.dedent(
    """
    import sys
    from dataclasses import replace
    from iclgym.bench import ResultRow, ResultsStore
    store = ResultsStore(sys.argv[1])
    row = ResultRow(**eval(sys.argv[2]))
    big = {"curve": list(range(20000))}  # large rows: the kill lands inside writes
    seed = 0
    while True:
        store.add(replace(row, seed=seed, scores={**big, "seed": seed}))
        seed += 1
    """
)


def test_sigkill_mid_write_loses_no_committed_row_and_leaves_no_partial_row(tmp_path):
    path = tmp_path / "results.db"
    fields = {**ROW.__dict__, "scores": {}}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), repr(fields)])
    try:
        deadline = time.monotonic() + 60
        seen = 0
        while seen < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
            if path.exists():
                with ResultsStore(path) as reader:
                    seen = len(reader)
        assert seen >= 30, "the writer did not commit rows"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    with ResultsStore(path) as store:
        assert store.check() == "ok"
        rows = store.rows()
        assert len(rows) >= seen  # nothing committed was lost
        assert [r["id"] for r in rows] == list(range(1, len(rows) + 1))
        for r in rows:  # every row whole: all columns, its full payload
            assert r["scores"]["seed"] == r["seed"] and len(r["scores"]["curve"]) == 20000
            assert all(r[c] is not None for c in ("fingerprint", "device", "git_commit"))
        store.add(replace(ROW, seed=10**6))  # the database is writable again
