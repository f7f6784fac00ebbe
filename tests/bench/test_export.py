"""Frozen evaluation sets (``iclgym.bench.export``): the file holds exactly the held-out set that
``evaluate`` draws, scoring it gives ``evaluate``'s report field for field, provenance and
fingerprints follow the data, and plain pyarrow reads the documented schema."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from baselines.ngram import NGramPredictor  # noqa: E402
from iclgym.bench.export import (  # noqa: E402
    METADATA_KEY,
    export_fingerprint,
    export_parquet,
    read_parquet,
    score_parquet,
)
from iclgym.harness import HeldOut, OraclePredictor, StrategyPredictor, evaluate  # noqa: E402
from iclgym.registry import make_task  # noqa: E402

SMALL = {"train_alphabet_size": 16, "val_alphabet_size": 8, "test_alphabet_size": 32}
CASES = {
    # id, spec overrides, split, sequences, batch size (two batches, the last one short)
    "markov": ("ICL-MarkovChain-v0", {"seq_len": 20}, "test", 24, 16),
    "template": ("ICL-SymbolTemplate-v0", SMALL, "validation", 24, 16),  # real labels, 1 scored
    "concept": ("ICL-MultiConcept-v0", {}, "ood_length_8", 24, 16),  # features, named split
}


def same(a, b) -> bool:
    """Equal, NaN equal to NaN (recursively)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_same_report(got, want) -> None:
    got, want = got.to_dict(), want.to_dict()
    assert [k for k in want if not same(got[k], want[k])] == []


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    env_id, spec, split, n, batch_size = CASES[request.param]
    path = tmp_path_factory.mktemp("export") / f"{request.param}.parquet"
    out = export_parquet(
        env_id, path, split=split, num_sequences=n, seed=3, spec=spec, batch_size=batch_size
    )
    assert out == path and path.exists()
    task = make_task(env_id, **spec)
    held = HeldOut(task, split=split, seed=3, num_sequences=n, batch_size=batch_size, env_id=env_id)
    return path, held, CASES[request.param]


def test_file_holds_the_held_out_set_with_provenance(exported):
    path, held, (env_id, spec, split, n, batch_size) = exported
    data = read_parquet(path)
    batches = [part.batch for part in held.parts]
    assert torch.equal(data.tokens, torch.cat([b.tokens for b in batches]))
    assert torch.equal(data.targets, torch.cat([b.targets for b in batches]))
    assert torch.equal(data.loss_mask, torch.cat([b.loss_mask for b in batches]))
    assert torch.equal(data.true_probs, torch.cat([b.true_probs.float() for b in batches]))
    if batches[0].features is None:
        assert data.features is None
    else:
        assert torch.equal(data.features, torch.cat([b.features for b in batches]))
        assert data.features.shape == (n, held.task.seq_len, held.task.feature_dim)
    # the oracle and strategies at the scored positions; NaN elsewhere
    mask = data.loss_mask
    assert torch.equal(data.oracle_log_probs[mask], torch.cat([p.oracle for p in held.parts]))
    assert data.oracle_log_probs[~mask].isnan().all()
    assert list(data.strategy_log_probs) == held.strategy_names
    first = held.strategy_names[0]
    want = torch.cat([p.strategies[first][1] for p in held.parts])
    assert torch.equal(data.strategy_log_probs[first][mask], want)
    # provenance and metadata
    table = pq.read_table(path)
    assert set(table.column("env_id").to_pylist()) == {env_id}
    assert set(table.column("version").to_pylist()) == {0}
    assert set(table.column("split").to_pylist()) == {split}
    assert set(table.column("seed").to_pylist()) == {3}
    assert table.column("row_index").to_pylist() == list(range(n))
    assert set(table.column("fingerprint").to_pylist()) == {data.fingerprint}
    full_spec = make_task(env_id, **spec).spec.to_dict()
    assert dict(data.spec) == full_spec and dict(data.overrides) == spec
    assert data.fingerprint == export_fingerprint(
        env_id, full_spec, split=split, seed=3, num_sequences=n, batch_size=batch_size
    )
    assert (data.env_id, data.version, data.family) == (env_id, 0, held.task.name)
    assert dict(data.task_spec) == held.task.spec.to_dict()
    assert data.make_task().spec == held.task.spec


def test_scores_from_the_file_equal_evaluate(exported):
    path, held, (env_id, spec, split, n, batch_size) = exported
    data = read_parquet(path)
    task = held.task
    fresh = {"split": split, "seed": 3, "num_sequences": n, "batch_size": batch_size, **spec}
    # the oracle: the stored one, whether named, an OraclePredictor or an array
    want = evaluate(OraclePredictor(task), held)
    assert_same_report(score_parquet(path, "oracle"), want)
    assert_same_report(score_parquet(data, data.oracle_log_probs, name="oracle"), want)
    assert score_parquet(data, "oracle").excess_loss == 0.0
    base = make_task(env_id, **spec)  # a named split's held-out task is a variant of it
    if split in ("test", "validation"):
        oracle = OraclePredictor(base)
        assert_same_report(score_parquet(data, oracle), evaluate(oracle, env_id, **fresh))
    for name in ("uniform", held.strategy_names[1]):
        stored = evaluate(StrategyPredictor(task, name), held)
        assert_same_report(score_parquet(data, name), stored)
        assert_same_report(score_parquet(data, StrategyPredictor(task, name)), stored)
        # the id's own task: stored when it is the scored task, else run on the file's batches
        predictor = StrategyPredictor(base, name)
        want = evaluate(predictor, env_id, **fresh)
        assert_same_report(score_parquet(data, predictor), want)
    # a predictor run on the file's batches (tokens and features only)
    name = "softmax_vote" if data.features is not None else "uniform"

    class FromInputs:
        def __init__(self, task) -> None:
            self.task, self.name = task, "from-inputs"

        def predict(self, batch):
            return self.task.strategies[name](batch)

    got = score_parquet(data, FromInputs(task), per_sequence=True)
    assert_same_report(got, evaluate(FromInputs(task), held, per_sequence=True))


def test_models_and_value_predictions_score_alike(exported):
    path, held, (env_id, *_) = exported
    if env_id == "ICL-MarkovChain-v0":
        model = NGramPredictor(3, order=1)
        got = score_parquet(path, model)
        assert_same_report(got, evaluate(model, held))
        assert got.excess_loss > 0 and got.oracle_mc_error > 0
    elif env_id == "ICL-SymbolTemplate-v0":  # (S, T, 1) label values
        data = read_parquet(path)

        class Constant:
            name = "constant"

            def predict(self, batch):
                out = torch.full((*batch.tokens.shape, 1), math.nan)
                out[:, -1, 0] = 0.25
                return out

        values = torch.full((data.num_sequences, data.seq_len, 1), math.nan)
        values[:, -1, 0] = 0.25
        got = score_parquet(data, values, name="constant")
        assert got.mse is not None and got.cross_entropy is None
        assert_same_report(got, evaluate(Constant(), held))
        assert_same_report(score_parquet(data, Constant()), got)


def test_fingerprint_follows_seed_split_size_and_spec():
    spec = make_task("ICL-MarkovChain-v0").spec.to_dict()
    base = {"split": "test", "seed": 0, "num_sequences": 64, "batch_size": 512}
    one = export_fingerprint("ICL-MarkovChain-v0", spec, **base)
    assert one == export_fingerprint("ICL-MarkovChain-v0", dict(spec), **base)
    changed = [
        export_fingerprint("ICL-MarkovChain-v0", spec, **{**base, "seed": 1}),
        export_fingerprint("ICL-MarkovChain-v0", spec, **{**base, "split": "validation"}),
        export_fingerprint("ICL-MarkovChain-v0", spec, **{**base, "num_sequences": 65}),
        export_fingerprint("ICL-MarkovChain-v0", {**spec, "alpha": 0.5}, **base),
        export_fingerprint("ICL-NGram-v0", spec, **base),
    ]
    assert len({one, *changed}) == len(changed) + 1


def test_plain_pyarrow_reads_the_documented_schema(exported):
    path, held, (env_id, spec, split, n, _) = exported
    script = textwrap.dedent(
        f"""
        import json, sys
        import pyarrow.parquet as pq
        schema = pq.read_schema({str(path)!r})
        meta = json.loads(schema.metadata[b"iclgym"])
        table = pq.read_table({str(path)!r}, columns=["tokens", "true_probs", "row_index"])
        row = table.slice(0, 1).to_pylist()[0]
        assert "iclgym" not in sys.modules and "torch" not in sys.modules
        print(json.dumps({{
            "fields": {{f.name: str(f.type) for f in schema}},
            "meta": meta,
            "T": len(row["tokens"]),
            "V": len(row["true_probs"][0]),
        }}))
        """
    )
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True,
                                    text=True, check=True).stdout)  # fmt: skip
    nested = "list<element: list<element: float>>"
    want = {
        "tokens": "list<element: int64>",
        "targets": "list<element: int64>",
        "loss_mask": "list<element: bool>",
        **({"features": nested} if held.task.feature_dim else {}),
        "true_probs": nested,
        "oracle_log_probs": nested,
        **{f"strategy_{s}_log_probs": nested for s in held.strategy_names},
        "env_id": "string",
        "version": "int32",
        "fingerprint": "string",
        "split": "string",
        "seed": "int64",
        "row_index": "int64",
    }
    assert out["fields"] == want
    meta = out["meta"]
    assert (out["T"], out["V"]) == (held.task.seq_len, held.task.vocab_size)
    assert meta["vocab_size"] == held.task.vocab_size and meta["seq_len"] == held.task.seq_len
    assert meta["env_id"] == env_id and meta["split"] == split and meta["num_sequences"] == n
    assert meta["format"] == "iclgym-export-v1" and meta["iclgym_version"]
    assert meta["spec"] == json.loads(json.dumps(make_task(env_id, **spec).spec.to_dict()))
    assert len(meta["oracle_mc"]) == 2 and meta["strategies"] == held.strategy_names
    has_values = getattr(held.task, "label_values", None) is not None
    assert (meta["label_values"] is not None) == has_values


def test_bad_files_and_predictors_are_refused(tmp_path, monkeypatch):
    path = export_parquet("ICL-PriorityGraph-v0", tmp_path / "a.parquet", num_sequences=6)
    table = pq.read_table(path)
    pq.write_table(table.slice(1), tmp_path / "short.parquet")
    with pytest.raises(ValueError, match="rows"):
        read_parquet(tmp_path / "short.parquet")
    pq.write_table(table.take([1, 0, 2, 3, 4, 5]), tmp_path / "shuffled.parquet")
    with pytest.raises(ValueError, match="reordered"):
        read_parquet(tmp_path / "shuffled.parquet")
    pq.write_table(table.replace_schema_metadata({}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="not an iclgym export"):
        read_parquet(tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="unknown stored predictor"):
        score_parquet(path, "bigram")
    with pytest.raises(ValueError, match="expected"):
        score_parquet(path, np.zeros((5, 6, 8), np.float32))
    with pytest.raises(ValueError, match="split"):
        export_parquet("ICL-PriorityGraph-v0", tmp_path / "b.parquet", split="nope")
    assert not (tmp_path / "b.parquet").exists()
    assert table.schema.metadata[METADATA_KEY]
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"iclgym\[export\]"):
        export_parquet("ICL-PriorityGraph-v0", tmp_path / "c.parquet", num_sequences=2)
