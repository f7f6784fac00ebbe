"""``iclgym bench`` and ``iclgym verify`` end to end on tiny suite entries: rows hold the
documented scores, a rerun resumes without new rows, the summary's score and interval match the
stored per-sequence excess, and verification accepts honest results and rejects tampered
claims, a wrong suite version, a checkpoint that does not load and an unknown entry, each with
its reason."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from iclgym.bench import SUITE, ResultsStore
from iclgym.bench.run import BenchModel, format_summary, run_bench, run_folder, summarize
from iclgym.bench.store import COLUMNS, ResultRow
from iclgym.bench.verify import verify_bundle, verify_result
from iclgym.cli import main

TINY = tuple(
    replace(e, quick_steps=3, seeds=(0, 1), eval_sequences=48)
    for e in SUITE
    if e.name in ("markov/bigram", "multi-concept/switched")
)
MODEL = BenchModel("transformer d_model=16 n_layers=1 n_heads=1 --quick",
                   "baselines.transformer:make_model",
                   {"d_model": 16, "n_layers": 1, "n_heads": 1})  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    store = tmp_path_factory.mktemp("bench") / "results.db"
    summary = run_bench(MODEL, store, quick=True, entries=TINY, progress=False)
    return store, summary


def test_rows_hold_the_scores_and_a_rerun_resumes(bench):
    store, summary = bench
    with ResultsStore(store) as results:
        rows = results.rows()
    assert len(rows) == 4 and {(r["entry"], r["seed"]) for r in rows} == {
        (e.name, s) for e in TINY for s in (0, 1)
    }
    for row in rows:
        s = row["scores"]
        assert len(s["sequence_excess"]) == len(s["floor_sequence_excess"]) == 48
        assert s["excess_loss"] == pytest.approx(np.mean(s["sequence_excess"]), abs=1e-6)
        assert s["score"] == pytest.approx(
            1 - np.mean(s["sequence_excess"]) / np.mean(s["floor_sequence_excess"]), abs=1e-6
        )
        assert np.mean(s["floor_sequence_excess"]) > 0.01  # the floor ignores the context
        assert row["parameters"] > 0 and row["train_flops"] == 6.0 * row["parameters"] * 3 * 64 * (
            next(e for e in TINY if e.name == row["entry"]).task().seq_len
        )
        assert (store.parent / row["checkpoint"]).is_file() and not row["verified"]
    again = run_bench(MODEL, store, quick=True, entries=TINY, progress=False)
    assert len(ResultsStore(store)) == 4
    assert again["entries"].keys() == summary["entries"].keys()
    bundle = json.loads((run_folder(store, MODEL, True) / "bundle.json").read_text())
    assert len(bundle["results"]) == 4 and bundle["model"]["factory"] == MODEL.factory


def test_summary_scores_pool_seeds_and_the_interval_covers_them(bench):
    store, summary = bench
    rows = ResultsStore(store).rows()
    for entry in TINY:
        mine = [r for r in rows if r["entry"] == entry.name]
        model = np.mean([np.mean(r["scores"]["sequence_excess"]) for r in mine])
        floor = np.mean([np.mean(r["scores"]["floor_sequence_excess"]) for r in mine])
        got = summary["entries"][entry.name]
        assert got["score"] == pytest.approx(1 - model / floor, abs=1e-9)
        lo, hi = got["ci"]
        assert lo <= got["score"] <= hi and hi - lo > 0
        assert got["seeds"] == [0, 1]
    scores = sorted(e["score"] for e in summary["entries"].values())
    assert summary["iqm"] == pytest.approx(np.mean(scores))  # 2 entries: nothing trimmed
    text = format_summary(summary, MODEL.name)
    assert "IQM over entries" in text and all(e.name in text for e in TINY)


def test_iqm_trims_a_quarter_from_each_end():
    rows = []
    for i, value in enumerate([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 10.0]):
        rows.append({"entry": f"e{i}", "seed": 0, "parameters": 1, "wall_s": 1.0,
                     "scores": {"sequence_excess": [1 - value] * 4, "floor_sequence_excess":
                                [1.0] * 4, "excess_loss": 1 - value, "accuracy": 0.5}})  # fmt: skip
    summary = summarize(rows, [f"e{i}" for i in range(8)])
    assert summary["iqm"] == pytest.approx(np.mean([0.2, 0.3, 0.4, 0.5]))


def test_verify_accepts_an_honest_row_and_marks_it(bench):
    store, _ = bench
    verdict = verify_result(store, 1, suite=TINY)
    assert verdict.ok, verdict.reason
    row = ResultsStore(store).rows(id=1)[0]
    assert row["verified"] and verdict.recomputed["excess_loss"] == pytest.approx(
        row["scores"]["excess_loss"], abs=1e-9
    )
    with pytest.raises(ValueError, match="no result with id 99"):
        verify_result(store, 99, suite=TINY)


def _bundle(bench, tmp_path):
    store, _ = bench
    folder = tmp_path / "submission"
    shutil.copytree(run_folder(store, MODEL, True), folder)
    return folder, json.loads((folder / "bundle.json").read_text())


def _write(folder, bundle):
    (folder / "bundle.json").write_text(json.dumps(bundle))
    return folder


def test_an_honest_bundle_is_verified_into_a_new_store(bench, tmp_path):
    folder, _ = _bundle(bench, tmp_path)
    new_store = tmp_path / "board" / "results.db"
    verdicts = verify_bundle(folder, new_store, suite=TINY)
    assert all(v.ok for v in verdicts) and len(verdicts) == 4
    rows = ResultsStore(new_store).rows()
    assert len(rows) == 4 and all(r["verified"] for r in rows)
    assert all((new_store.parent / r["checkpoint"]).is_file() for r in rows)


def test_tampered_claims_are_rejected_naming_the_entry(bench, tmp_path):
    folder, bundle = _bundle(bench, tmp_path)
    claim = bundle["results"][2]
    claim["scores"]["excess_loss"] -= 0.01  # a better loss than the checkpoint earns
    claim["scores"]["score"] += 0.05
    store = tmp_path / "store.db"
    verdicts = verify_bundle(_write(folder, bundle), store, suite=TINY)
    bad = [v for v in verdicts if not v.ok]
    assert [(v.entry, v.seed) for v in bad] == [(claim["entry"], claim["seed"])]
    assert "excess_loss claimed" in bad[0].reason and "score claimed" in bad[0].reason
    assert not store.exists() or len(ResultsStore(store)) == 0  # nothing of it is stored


def test_wrong_suite_version_unknown_entry_and_broken_checkpoint_are_rejected(bench, tmp_path):
    folder, bundle = _bundle(bench, tmp_path)
    wrong = {**bundle, "suite_version": "iclgym-suite-v9"}
    verdicts = verify_bundle(_write(folder, wrong), suite=TINY)
    assert not any(v.ok for v in verdicts) and "iclgym-suite-v9" in verdicts[0].reason

    bundle["results"][0]["entry"] = "markov/imaginary"
    (folder / bundle["results"][1]["checkpoint"]).write_bytes(b"not a checkpoint")
    bundle["results"][3]["fingerprint"] = "0" * 64
    verdicts = verify_bundle(_write(folder, bundle), suite=TINY)
    reasons = [v.reason for v in verdicts]
    assert "not in iclgym-suite-v0" in reasons[0]
    assert "checkpoint does not load" in reasons[1]
    assert verdicts[2].ok
    assert "fingerprint" in reasons[3]
    with pytest.raises(ValueError, match="not an iclgym-bundle-1 bundle"):
        verify_bundle(_write(folder, {"results": []}), suite=TINY)


def test_cli_bench_and_verify(tmp_path, capsys):
    store = tmp_path / "cli.db"
    argv = ["bench", "--model", "mlp", "--quick", "--store", str(store),
            "--entries", "priority-graph/planted"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "priority-graph/planted" in out and "IQM over entries" in out
    rows = ResultsStore(store).rows()
    assert len(rows) == 3 and all(r["scores"]["steps"] == 100 for r in rows)
    assert main(["verify", str(rows[0]["id"]), "--store", str(store)]) == 0
    assert "1/1 verified" in capsys.readouterr().out
    assert main(["bench", "--entries", "nope/none", "--store", str(store)]) == 2
    assert "entries ['nope/none'] are invalid" in capsys.readouterr().err


def test_predictor_rows_are_scored_and_verified_from_their_name(tmp_path, capsys):
    store = tmp_path / "predictors.db"
    for text in ("oracle", "ngram:2"):
        assert main(["bench", "--predictor", text, "--store", str(store),
                     "--entries", "markov/bigram"]) == 0  # fmt: skip
    rows = {r["model"]: r for r in ResultsStore(store).rows()}
    assert rows["oracle"]["scores"]["excess_loss"] == pytest.approx(0.0, abs=1e-6)
    assert rows["oracle"]["scores"]["score"] == pytest.approx(1.0, abs=1e-5)
    # The in-context bigram is the Bayes predictor up to the Dirichlet concentration.
    assert 0.9 < rows["ngram:2"]["scores"]["score"] < 1.0
    assert rows["ngram:2"]["parameters"] == 0 and rows["ngram:2"]["checkpoint"] == (
        "predictor:ngram:2"
    )
    capsys.readouterr()
    assert main(["verify", str(rows["ngram:2"]["id"]), "--store", str(store)]) == 0
    assert ResultsStore(store).rows(id=rows["ngram:2"]["id"])[0]["verified"]


def test_cli_leaderboard_and_export(bench, tmp_path, capsys):
    store, summary = bench
    out = tmp_path / "board"
    assert main(["leaderboard", "--store", str(store), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    html, md = (out / "leaderboard.html").read_text(), (out / "leaderboard.md").read_text()
    assert MODEL.name in html and MODEL.name in md and "1 model configurations" in printed
    assert f"{summary['iqm']:.2f}" in md
    assert main(["leaderboard", "--store", str(tmp_path / "none.db")]) == 2
    assert "none.db" in capsys.readouterr().err

    pytest.importorskip("pyarrow")
    from iclgym.bench.export import score_parquet
    from iclgym.harness import StrategyPredictor, evaluate
    from iclgym.registry import make_task

    path = tmp_path / "markov.parquet"
    argv = ["export", "ICL-MarkovChain-v0", "--num-sequences", "64", "--set", "num_states=4",
            "--out", str(path)]  # fmt: skip
    assert main(argv) == 0 and path.is_file()
    ours = score_parquet(path, "uniform")
    task = make_task("ICL-MarkovChain-v0", num_states=4)
    ref = evaluate(StrategyPredictor(task, "uniform"), task, split="test", num_sequences=64)
    assert ours.excess_loss == pytest.approx(ref.excess_loss, abs=1e-9)


def test_runs_a_model_cannot_do_are_reported_and_the_rest_stored(tmp_path):
    mlp = BenchModel("mlp", "baselines.mlp:make_model", {"width": 8})
    entries = [*TINY, replace(next(e for e in SUITE if e.name == "priority-graph/planted"),
                              quick_steps=3, seeds=(0,), eval_sequences=32)]  # fmt: skip
    summary = run_bench(mlp, tmp_path / "r.db", quick=True, entries=entries, progress=False)
    # The MLP reads the whole sequence: it cannot score every position of a Markov chain.
    assert sorted(summary["failed"]) == ["markov/bigram seed 0", "markov/bigram seed 1"]
    assert all("reads future tokens" in e for e in summary["failed"].values())
    assert set(summary["entries"]) == {"multi-concept/switched", "priority-graph/planted"}
    assert "FAILED markov/bigram seed 0" in format_summary(summary, "mlp")


def _forge(bundle, i, **changes):
    claim = bundle["results"][i]
    for key, value in changes.items():
        if key in claim["scores"]:
            claim["scores"][key] = value
        else:
            claim[key] = value
    return claim


def test_forgeries_the_leaderboard_would_show_are_rejected(bench, tmp_path):
    folder, bundle = _bundle(bench, tmp_path)
    n = len(bundle["results"][0]["scores"]["sequence_excess"])
    _forge(bundle, 0, sequence_excess=[0.0] * n)  # the board's score reads these arrays
    _forge(bundle, 1, parameters=1)  # a smaller size class
    _forge(bundle, 2, score=float("nan"))  # NaN is never within tolerance
    _forge(bundle, 3, model="oracle-in-disguise", checkpoint="predictor:oracle", parameters=0,
           train_flops=0.0)  # fmt: skip
    store = tmp_path / "store.db"
    verdicts = verify_bundle(_write(folder, bundle), store, suite=TINY)
    reasons = [v.reason for v in verdicts]
    assert not any(v.ok for v in verdicts) and not store.exists()
    assert "sequence_excess differs" in reasons[0]
    assert "parameters claimed 1" in reasons[1]
    assert "score claimed nan" in reasons[2]
    assert "must be named 'oracle'" in reasons[3]


def test_malformed_claims_are_rejected_with_the_field(bench, tmp_path):
    folder, bundle = _bundle(bench, tmp_path)
    bundle["results"][0]["scores"] = [1, 2]
    del bundle["results"][1]["wall_s"]
    bundle["results"][2]["seed"] = "abc"
    bundle["results"][3] = "not a claim"
    reasons = [v.reason for v in verify_bundle(_write(folder, bundle), suite=TINY)]
    assert "scores must be a JSON object" in reasons[0]
    assert "misses the fields ['wall_s']" in reasons[1]
    assert "seed='abc' has the wrong type" in reasons[2]
    assert "must be a JSON object, got str" in reasons[3]
    with pytest.raises(ValueError, match="holds no list of results"):
        verify_bundle(_write(folder, {"format": "iclgym-bundle-1", "results": {"a": 1}}))
    bad_store = tmp_path / "text.db"
    bad_store.write_text("not sqlite " * 100)
    with pytest.raises(ValueError, match="is not an iclgym results store"):
        verify_result(bad_store, 1)
    with pytest.raises(ValueError, match="no results store"):
        verify_result(tmp_path / "absent.db", 1)
    assert not (tmp_path / "absent.db").exists()


def test_a_bundle_does_not_vouch_for_an_edited_stored_row(bench, tmp_path):
    import sqlite3

    folder, _ = _bundle(bench, tmp_path)
    store = tmp_path / "board.db"
    assert all(v.ok for v in verify_bundle(folder, store, suite=TINY))
    with ResultsStore(store) as results:  # forge row 2 in place, clear its flag
        row = results.rows(id=2)[0]
        forged = {**row["scores"], "score": 0.99, "sequence_excess": [0.0] * 48}
    with sqlite3.connect(store) as db:
        db.execute("UPDATE results SET scores = ?, verified = 0 WHERE id = 2",
                   (json.dumps(forged),))  # fmt: skip
    assert all(v.ok for v in verify_bundle(folder, store, suite=TINY))  # the genuine claims
    assert not ResultsStore(store).rows(id=2)[0]["verified"]  # but not the forged row


def test_bad_model_arguments_fail_once_before_any_run(tmp_path, capsys):
    with pytest.raises(ValueError, match="does not take the arguments"):
        run_bench(replace(MODEL, args={"no_such_arg": 1}), tmp_path / "x.db", quick=True,
                  entries=TINY, progress=False)  # fmt: skip
    assert not (tmp_path / "x.db").exists()
    argv = ["bench", "--model", "lstm", "--model-arg", "no_such_arg=1", "--quick", "--store",
            str(tmp_path / "y.db"), "--entries", "priority-graph/planted"]  # fmt: skip
    assert main(argv) == 2 and "does not take the arguments" in capsys.readouterr().err


def test_the_interval_keeps_the_test_sets_variance():
    """Seeds share the held-out sequences: two identical seeds give the one seed's interval
    (a bootstrap that resampled sequences per seed would halve its variance)."""
    rng = np.random.default_rng(0)
    excess = list(rng.exponential(0.2, size=200))
    row = {"entry": "e", "seed": 0, "parameters": 1, "wall_s": 1.0,
           "scores": {"sequence_excess": excess, "floor_sequence_excess": [1.0] * 200,
                      "excess_loss": float(np.mean(excess)), "accuracy": 0.5}}  # fmt: skip
    one = summarize([row], ["e"])["entries"]["e"]["ci"]
    two = summarize([row, {**row, "seed": 1}], ["e"])["entries"]["e"]["ci"]
    assert (two[1] - two[0]) == pytest.approx(one[1] - one[0], rel=0.15)


def test_run_folders_are_per_suite_version(bench):
    store, _ = bench
    assert run_folder(store, MODEL, True).parent.name == "iclgym-suite-v0"


def test_scoring_runs_on_the_bench_thread_count(tmp_path):
    import torch

    from iclgym.bench.run import BENCH_TRAIN, run_predictor_bench

    seen = []

    class Probe:  # the uniform law, noting the thread count it is called under
        name = "probe"

        def __init__(self, task):
            self.task = task

        def predict(self, batch):
            seen.append(torch.get_num_threads())
            return torch.log_softmax(torch.zeros(batch.true_probs.shape), -1)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_predictor_bench("probe:x", tmp_path / "p.db", {"probe": lambda _, task: Probe(task)},
                            entries=TINY[:1], progress=False)  # fmt: skip
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {BENCH_TRAIN.threads} == {1}


def _beats_oracle(real):
    """``score_model`` whose excess loss is 1 nat below the oracle's (what a model reading
    future tokens past the causality probe scores)."""

    def fake(*args, **kwargs):
        scores = real(*args, **kwargs)
        return {**scores, "excess_loss": -1.0, "excess_loss_se": 0.01}

    return fake


def test_a_result_that_beats_the_oracle_is_never_stored_or_verified(bench, tmp_path, monkeypatch):
    from iclgym.bench import run, verify
    from iclgym.bench.store import check_oracle_bound

    check_oracle_bound("e", {"excess_loss": -0.001, "excess_loss_se": 0.001})  # within chance
    with pytest.raises(ValueError, match=r"^markov/bigram: excess loss -0.5 \+- 0.01 \(SE\)"):
        check_oracle_bound("markov/bigram", {"excess_loss": -0.5, "excess_loss_se": 0.01,
                                             "oracle_mc_error": 0.001})  # fmt: skip
    folder, _ = _bundle(bench, tmp_path)
    monkeypatch.setattr(verify, "score_model", _beats_oracle(verify.score_model))
    verdicts = verify_bundle(folder, tmp_path / "v.db", suite=TINY)
    assert not any(v.ok for v in verdicts) and not (tmp_path / "v.db").exists()
    assert all("beats the exact Bayes oracle" in v.reason for v in verdicts)

    monkeypatch.setattr(run, "score_model", _beats_oracle(run.score_model))
    summary = run_bench(MODEL, tmp_path / "b.db", quick=True, entries=TINY[:1], progress=False)
    assert sorted(summary["failed"]) == ["markov/bigram seed 0", "markov/bigram seed 1"]
    assert all("markov/bigram: excess loss -1" in e for e in summary["failed"].values())
    assert len(ResultsStore(tmp_path / "b.db")) == 0
    with pytest.raises(ValueError, match="beats the exact Bayes oracle"):
        run.run_predictor_bench("uniform", tmp_path / "p.db", entries=TINY[:1], progress=False)
    assert len(ResultsStore(tmp_path / "p.db")) == 0
    row = ResultsStore(bench[0]).rows()[0]
    forged = {k: row[k] for k in COLUMNS} | {"scores": {**row["scores"], "excess_loss": -1.0},
                                             "seed": 9}  # fmt: skip
    with pytest.raises(ValueError, match="beats the exact Bayes oracle"):
        ResultsStore(tmp_path / "p.db").add(ResultRow(**forged))


def test_a_claim_must_be_its_checkpoints_run(bench, tmp_path):
    import torch

    folder, bundle = _bundle(bench, tmp_path)
    good = json.loads(json.dumps(bundle))
    _forge(bundle, 0, model="oracle", checkpoint=bundle["results"][0]["checkpoint"])
    _forge(bundle, 1, seed=7)
    _forge(bundle, 2, config_hash="0" * 16)
    _forge(bundle, 3, train_flops=1.0)
    reasons = [v.reason for v in verify_bundle(_write(folder, bundle), suite=TINY)]
    assert "model 'oracle' is a predictor's name" in reasons[0]
    assert "seed claimed 7" in reasons[1]
    assert "config_hash claimed '0000000000000000'" in reasons[2]
    assert "train_flops claimed 1.0" in reasons[3]

    bundle = json.loads(json.dumps(good))
    _forge(bundle, 0, steps=2000)
    for claim in bundle["results"]:  # another model's name, consistently everywhere
        claim["model"] = "lstm --quick"
    bundle["model"]["name"] = "lstm --quick"
    reasons = [v.reason for v in verify_bundle(_write(folder, bundle), suite=TINY)]
    assert all("model 'lstm --quick' does not name the checkpoint's factory" in r for r in reasons)

    bundle = json.loads(json.dumps(good))
    _forge(bundle, 0, steps=2000)
    bundle["model"]["factory"] = "baselines.lstm:make_model"
    reasons = [v.reason for v in verify_bundle(_write(folder, bundle), suite=TINY)]
    assert "scores.steps claimed 2000, the checkpoint's run gives 3" in reasons[0]
    assert all("bundle model factory/args" in r for r in reasons[1:])

    bundle = json.loads(json.dumps(good))  # seed 1's checkpoint, copied, under seed 0's claim
    first, second = (folder / c["checkpoint"] for c in bundle["results"][:2])
    state = torch.load(first, weights_only=False)
    state["meta"]["train_config"]["seed"] = 1  # its recorded seed edited to fit the claim
    torch.save(state, second)
    bundle["results"][1] = {**bundle["results"][0], "seed": 1}
    bundle["results"][1]["checkpoint"] = good["results"][1]["checkpoint"]
    reasons = [v.reason for v in verify_bundle(_write(folder, bundle), suite=TINY)]
    assert (
        reasons[0] == ""
        and "is also the claim of markov/bigram seed 0 (same weights)" in (reasons[1])
    )
    bundle["results"][1]["checkpoint"] = bundle["results"][0]["checkpoint"]
    bundle["results"][1]["seed"] = 0
    bundle["results"][1]["config_hash"] = bundle["results"][0]["config_hash"]
    assert verify_bundle(_write(folder, bundle), suite=TINY)[1].reason == ""  # the same claim


def test_bad_arguments_create_no_store_and_export_writes_only_parquet(tmp_path, capsys):
    from iclgym.bench.export import export_parquet
    from iclgym.bench.run import run_predictor_bench

    with pytest.raises(ValueError, match="unknown predictor 'bogus'"):
        run_predictor_bench("bogus", tmp_path / "d" / "a.db", entries=TINY, progress=False)
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match=r"out='.*n.csv' must end in .parquet"):
        export_parquet("ICL-MarkovChain-v0", tmp_path / "n.csv", num_sequences=8)
    assert not (tmp_path / "n.csv").exists()
