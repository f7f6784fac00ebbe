"""The trial backends (``iclgym.harness.backends``): a sweep and a bench on a local Ray cluster
write the same records/rows as the local backend, a worker killed mid-trial is retried and the
sweep completes, and a sweep with a failed trial resumes by running only the missing trial."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from iclgym.harness.backends import Backend, TrialsFailed, run_trials
from iclgym.harness.sweep import ModelChoice, run_sweep
from iclgym.harness.train import TrainConfig

ray = pytest.importorskip("ray", reason="Ray is the optional extra iclgym[ray]")

HERE = Path(__file__).parent
CONFIG = TrainConfig(steps=6, batch_size=16, eval_every=0, eval_sequences=32)
GRID = dict(widths=(8, 16), seeds=(0, 1), spec={"seq_len": 24}, config=CONFIG)
RAY = Backend("ray")
VOLATILE = ("wall_s", "out")  # where and how long, not what


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local Ray cluster of 2 workers for the module (its workers import tests/harness)."""
    path = os.pathsep.join([str(HERE), str(HERE.parents[1])])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})  # fmt: skip
    yield
    ray.shutdown()


def _same(records):
    """Records without where and how long each ran (the out folder, wall and elapsed time)."""
    out = []
    for r in records:
        row = {k: v for k, v in r.items() if k not in VOLATILE}
        row["final"] = {k: v for k, v in r["final"].items() if k != "elapsed_s"}
        out.append(row)
    return out


def _lstm(factory="baselines.lstm:make_model", **args):
    return ModelChoice("lstm", factory, args, "hidden_size")


def test_sweep_on_ray_equals_the_local_backend_record_for_record(tmp_path):
    local = run_sweep("ICL-MarkovChain-v0", models=[_lstm()], out=tmp_path / "local", **GRID)
    remote = run_sweep("ICL-MarkovChain-v0", models=[_lstm()], out=tmp_path / "ray",
                       backend=RAY, **GRID)  # fmt: skip
    assert len(local) == 4 and _same(remote) == _same(local)
    assert all(Path(r["out"]).parent == tmp_path / "ray" / "runs" for r in remote)


def test_a_worker_killed_mid_trial_is_retried_and_the_sweep_completes(tmp_path):
    marker = tmp_path / "killed-once"
    choice = _lstm("ray_trials:dying_lstm", marker=str(marker))
    records = run_sweep("ICL-MarkovChain-v0", models=[choice], out=tmp_path / "sweep",
                        backend=RAY, **GRID)  # fmt: skip
    assert marker.exists() and len(records) == 4  # one worker died, its trial ran again
    reference = run_sweep("ICL-MarkovChain-v0", models=[_lstm()], out=tmp_path / "ref", **GRID)
    drop = lambda rs: [{k: v for k, v in r.items() if k not in ("factory", "model_args")}  # noqa: E731
                       for r in _same(rs)]  # fmt: skip
    assert drop(records) == drop(reference)  # the retried trial trained from scratch


def test_a_failed_trial_is_rerun_alone_on_resume(tmp_path, capsys):
    choice = _lstm("ray_trials:failing_lstm", marker=str(tmp_path / "failed"), fail_width=16)
    out = tmp_path / "sweep"
    with pytest.raises(TrialsFailed, match="injected trial failure") as err:
        run_sweep("ICL-MarkovChain-v0", models=[choice], out=out, backend=RAY, **GRID)
    assert len(err.value.failures) == 1
    import json

    assert len(json.loads((out / "sweep.json").read_text())) == 3  # the others are recorded
    capsys.readouterr()
    records = run_sweep("ICL-MarkovChain-v0", models=[choice], out=out, backend=RAY,
                        resume=True, **GRID)  # fmt: skip
    assert "3 of 4 cells already in sweep.json" in capsys.readouterr().out
    assert [(r["width"], r["seed"]) for r in records] == [(8, 0), (8, 1), (16, 0), (16, 1)]


def test_bench_on_ray_writes_the_local_rows(tmp_path):
    from iclgym.bench import SUITE, ResultsStore
    from iclgym.bench.run import BenchModel, run_bench

    entries = [replace(e, quick_steps=3, seeds=(0, 1), eval_sequences=32)
               for e in SUITE if e.name == "markov/bigram"]  # fmt: skip
    model = BenchModel("lstm", "baselines.lstm:make_model", {"hidden_size": 16})
    rows = {}
    for name, backend in (("local", None), ("ray", RAY)):
        store = tmp_path / name / "results.db"
        run_bench(model, store, quick=True, entries=entries, progress=False, backend=backend)
        rows[name] = {(r["entry"], r["seed"]): (r["scores"], r["parameters"], r["fingerprint"])
                      for r in ResultsStore(store).rows()}  # fmt: skip
    assert len(rows["local"]) == 2 and rows["ray"] == rows["local"]


def test_run_trials_reports_failures_after_the_others_and_checks_its_backend():
    results = {}
    with pytest.raises(TrialsFailed) as err:
        run_trials(_half, [(1,), (0,), (4,)], results.__setitem__, RAY, progress=False)
    assert results == {0: 1.0, 2: 0.25} and list(err.value.failures) == [1]
    with pytest.raises(ValueError, match="backend='dask' is invalid"):
        Backend("dask")
    with pytest.raises(ValueError, match="needs the ray backend"):
        Backend("local", address="auto")
    with pytest.raises(ValueError, match="needs the ray backend"):
        Backend("local", workers=4)
    with pytest.raises(ValueError, match="workers=0 is invalid"):
        Backend("ray", workers=0)


def test_an_address_nobody_answers_fails_at_once():
    import socket

    from iclgym.harness.backends import _check_reachable

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="no Ray cluster answers"):
        _check_reachable(f"127.0.0.1:{port}", timeout=2.0)
    with pytest.raises(ValueError, match="no Ray cluster answers"):
        _check_reachable(f"ray://127.0.0.1:{port}", timeout=2.0)
    _check_reachable("auto")  # left to Ray


def _half(x: int) -> float:
    return 1.0 / x
