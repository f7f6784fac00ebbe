"""Harness: report fields are consistent and attribution finds the right strategy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from baselines.ngram import NGramPredictor
from iclgym.harness import OraclePredictor, evaluate
from iclgym.tasks import MarkovChainTask


def test_oracle_report_and_uniform_cross_entropy():
    task = MarkovChainTask(num_states=3, seq_len=40)
    oracle = evaluate(OraclePredictor(task), task, num_sequences=600, batch_size=256)
    assert oracle.excess_loss == pytest.approx(0.0, abs=1e-6)
    assert oracle.kl == pytest.approx(oracle.oracle_kl, abs=1e-6)
    assert oracle.accuracy == pytest.approx(oracle.oracle_accuracy)
    assert oracle.cross_entropy == pytest.approx(oracle.entropy + oracle.kl, abs=0.02)
    uniform = evaluate(NGramPredictor(3, order=0), task, num_sequences=600, batch_size=256)
    assert uniform.cross_entropy == pytest.approx(math.log(3), abs=1e-5)
    assert len(uniform.curves["kl"]) == 40 and uniform.nearest_strategy == "uniform"
    assert uniform.strategy_kl_last["uniform"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads(uniform.to_json())["predictor"] == "ngram:0:1"


@pytest.mark.parametrize(("order", "name"), [(1, "unigram"), (2, "bigram")])
def test_attribution_names_the_matching_strategy(order, name):
    task = MarkovChainTask(num_states=3, seq_len=60)
    report = evaluate(NGramPredictor(3, order=order), task, num_sequences=300, batch_size=300)
    assert report.nearest_strategy == name


def test_same_arguments_same_report_and_bad_predictor_shape():
    a = evaluate(NGramPredictor(3, order=1), "ICL-MarkovChain-v0", num_sequences=64, seed=4)
    b = evaluate(NGramPredictor(3, order=1), "ICL-MarkovChain-v0", num_sequences=64, seed=4)
    assert a == b

    class Wrong:
        def predict(self, batch):
            return torch.zeros(batch.batch_size, batch.seq_len, 2)

    with pytest.raises(ValueError, match="shape"):
        evaluate(Wrong(), "ICL-MarkovChain-v0", num_sequences=8)
