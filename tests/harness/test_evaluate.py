"""evaluate: report fields, attribution, scoring by selection, value predictors, the oracle's
Monte-Carlo error and the held-out cache (oracle and strategies run once per batch)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from baselines.ngram import NGramPredictor
from iclgym.harness import HeldOut, OraclePredictor, StrategyPredictor, evaluate
from iclgym.registry import make_task
from iclgym.tasks import MarkovChainTask, OracleEstimate
from iclgym.tasks.templates import SymbolTemplateTask

SMALL = {"train_alphabet_size": 16, "val_alphabet_size": 8, "test_alphabet_size": 32}


def test_oracle_report_and_uniform_cross_entropy():
    task = MarkovChainTask(num_states=3, seq_len=40)
    oracle = evaluate(OraclePredictor(task), task, num_sequences=600, batch_size=256)
    assert oracle.excess_loss == pytest.approx(0.0, abs=1e-6)
    assert oracle.kl == pytest.approx(oracle.oracle_kl, abs=1e-6)
    assert oracle.accuracy == pytest.approx(oracle.oracle_accuracy)
    assert oracle.cross_entropy == pytest.approx(oracle.entropy + oracle.kl, abs=0.02)
    assert oracle.oracle == task.oracle_name
    uniform = evaluate(NGramPredictor(3, order=0), task, num_sequences=600, batch_size=256)
    assert uniform.cross_entropy == pytest.approx(math.log(3), abs=1e-5)
    assert len(uniform.curves["kl"]) == 40 and uniform.nearest_strategy == "uniform"
    assert uniform.strategy_kl_last["uniform"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads(uniform.to_json())["predictor"] == "ngram:0:1"
    assert uniform.mse is None  # no real-valued labels


@pytest.mark.parametrize(("order", "name"), [(1, "unigram"), (2, "bigram")])
def test_attribution_names_the_matching_strategy(order, name):
    task = MarkovChainTask(num_states=3, seq_len=60)
    report = evaluate(NGramPredictor(3, order=order), task, num_sequences=300, batch_size=300)
    assert report.nearest_strategy == name


def test_privileged_strategy_is_never_the_nearest():
    task = MarkovChainTask(num_states=3, seq_len=60)
    report = evaluate(StrategyPredictor(task, "true"), task, num_sequences=200)
    assert report.strategy_kl_last["true"] == pytest.approx(0.0, abs=1e-6)
    assert report.nearest_strategy != "true"


def test_same_arguments_same_report_and_bad_predictor_shape():
    a = evaluate(NGramPredictor(3, order=1), "ICL-MarkovChain-v0", num_sequences=64, seed=4)
    b = evaluate(NGramPredictor(3, order=1), "ICL-MarkovChain-v0", num_sequences=64, seed=4)
    assert a == b

    class Wrong:
        def predict(self, batch):
            return torch.zeros(batch.batch_size, batch.seq_len, 2)

    with pytest.raises(ValueError, match="shape"):
        evaluate(Wrong(), "ICL-MarkovChain-v0", num_sequences=8)


class LabelOnly:
    """The oracle at the scored positions, ``fill`` (-inf, NaN, ...) everywhere else."""

    def __init__(self, task, fill: float) -> None:
        self.task, self.fill, self.name = task, fill, "oracle"

    def predict(self, batch):
        mask = batch.loss_mask[..., None]
        return torch.where(mask, self.task.oracle(batch), torch.tensor(self.fill))


@pytest.mark.parametrize("fill", [-math.inf, math.nan, math.inf])
@pytest.mark.parametrize("label_type", ["regression", "multiclass"])
def test_unscored_positions_never_reach_the_report(fill, label_type):
    preset = "copy" if label_type == "multiclass" else "aba_abb"
    task = SymbolTemplateTask(preset=preset, label_type=label_type, **SMALL)
    oracle = evaluate(OraclePredictor(task), task, num_sequences=300, batch_size=128)
    masked = evaluate(LabelOnly(task, fill), task, num_sequences=300, batch_size=128)
    assert masked == oracle  # every field, curves and strategies included
    assert masked.cross_entropy < 1e-6 and masked.excess_loss == 0.0
    assert masked.kl < 1e-6 and masked.accuracy == 1.0
    if label_type == "regression":
        assert masked.mse == 0.0 and masked.value_accuracy == 1.0
    curve = masked.curves["cross_entropy"]
    assert curve[:-1] == [None] * (task.seq_len - 1) and curve[-1] < 1e-6


class Values:
    """A value predictor: (B, T, 1), the label value plus ``noise`` at the scored position."""

    def __init__(self, noise: float) -> None:
        self.noise, self.name = noise, f"values{noise}"

    def predict(self, batch):
        out = torch.full((*batch.tokens.shape, 1), math.nan)
        out[:, -1, 0] = batch.params["label_value"] + self.noise
        return out


def test_value_predictors_get_mse_and_label_accuracy():
    task = SymbolTemplateTask(**SMALL)
    exact = evaluate(Values(0.0), task, num_sequences=200)
    assert exact.mse == 0.0 and exact.accuracy == 1.0 and exact.value_accuracy == 1.0
    assert exact.cross_entropy is None and exact.kl is None and exact.nearest_strategy is None
    assert exact.chance_mse == pytest.approx(1.0, abs=0.1)
    off = evaluate(Values(0.5), task, num_sequences=200)
    assert off.mse == pytest.approx(0.25) and off.accuracy == 1.0  # still nearest the label
    wrong = evaluate(Values(-1.5), task, num_sequences=200)  # +1 -> -0.5 (nearest -1)
    y = HeldOut(task, num_sequences=200).parts[0].values
    assert wrong.accuracy == pytest.approx((y < 0).float().mean().item())
    prior = evaluate(StrategyPredictor(task, "template_prior"), task, num_sequences=200)
    assert prior.mse == pytest.approx(1.0) and prior.value_accuracy == pytest.approx(
        (y < 0).float().mean().item()
    )  # E[value] = 0: a tie, the first label (-1) wins


class NoisyOracleTask(MarkovChainTask):
    """A Markov task whose oracle is R = 4 noisy replicates around the add-alpha bigram, with
    a call counter."""

    calls = 0

    def oracle_estimate(self, batch):
        type(self).calls += 1
        exact = self.strategies["bigram"](batch)
        gen = torch.Generator().manual_seed(int(batch.tokens.sum()))
        noise = 0.05 * torch.randn((4, *exact.shape), generator=gen)
        replicates = (exact + noise).log_softmax(-1)
        pooled = replicates.exp().mean(0).log()
        return OracleEstimate(pooled, replicates)


def test_oracle_monte_carlo_error_is_combined_over_batches_and_computed_once():
    task = NoisyOracleTask(num_states=3, seq_len=30)
    whole = task.sample(96, generator=task.generator(0, "test"))
    one = HeldOut(task, batches=[whole])
    estimate = task.oracle_estimate(whole)
    bias, se = estimate.mc_error(whole.targets, whole.loss_mask)
    assert (one.oracle_mc_bias, one.oracle_mc_se) == pytest.approx((bias, se))
    pieces = [
        type(whole)(
            tokens=whole.tokens[i : i + 32],
            targets=whole.targets[i : i + 32],
            loss_mask=whole.loss_mask[i : i + 32],
            params={k: v[i : i + 32] for k, v in whole.params.items()},
            vocab_size=whole.vocab_size,
            true_probs_fn=whole.true_probs_fn,
        )
        for i in range(0, 96, 32)
    ]
    # per-batch oracles differ (their noise is per batch), but bias and variance add up:
    three = HeldOut(task, batches=pieces)
    manual = [task.oracle_estimate(p).mc_error(p.targets, p.loss_mask) for p in pieces]
    counts = [p.loss_mask.sum().item() for p in pieces]
    total = sum(counts)
    assert three.oracle_mc_bias == pytest.approx(
        sum(b * n for (b, _), n in zip(manual, counts, strict=True)) / total
    )
    assert three.oracle_mc_se == pytest.approx(
        math.sqrt(sum((s * n) ** 2 for (_, s), n in zip(manual, counts, strict=True))) / total
    )
    assert three.oracle_mc_error == pytest.approx(three.oracle_mc_bias + 3 * three.oracle_mc_se)
    assert three.oracle_mc_se > 0
    before = NoisyOracleTask.calls
    for order in (0, 1, 2):
        report = evaluate(NGramPredictor(3, order=order), three)
        assert report.oracle_mc_error == three.oracle_mc_error
    assert NoisyOracleTask.calls == before  # scoring never calls the oracle again
    closed = evaluate(OraclePredictor(SymbolTemplateTask(**SMALL)), SymbolTemplateTask(**SMALL))
    assert closed.oracle_mc_error == 0.0 and closed.oracle == "bayes (closed form)"


def test_held_out_set_is_scored_like_fresh_data():
    task = MarkovChainTask(num_states=3, seq_len=40)
    held = HeldOut(task, split="validation", seed=3, num_sequences=100, batch_size=40)
    fresh = evaluate(
        NGramPredictor(3, order=2),
        task,
        split="validation",
        seed=3,
        num_sequences=100,
        batch_size=40,
    )
    assert evaluate(NGramPredictor(3, order=2), held) == fresh


def test_accuracy_se_is_over_sequences():
    """One scored position per prompt (multi-concept): the SE of the accuracy is the binomial
    sqrt(a (1 - a) / (n - 1)) over the n prompts; with many scored positions per sequence it
    is the SE of the per-sequence accuracies, above the naive per-position binomial one."""
    task = make_task("ICL-MultiConcept-v0")
    report = evaluate(StrategyPredictor(task, "softmax_vote"), task, num_sequences=1000)
    a = report.accuracy
    assert report.accuracy_se == pytest.approx(math.sqrt(a * (1 - a) / 999), rel=1e-4)
    markov = make_task("ICL-MarkovChain-v0", seq_len=50)
    r = evaluate(StrategyPredictor(markov, "unigram"), markov, num_sequences=400)
    naive = math.sqrt(r.accuracy * (1 - r.accuracy) / (400 * 50))
    assert r.accuracy_se > naive


def test_per_sequence_excess_and_the_marginal_predictor():
    """per_sequence=True: the sequence excesses average to excess_loss. The marginal (the
    best context-free law) beats uniform where the labels are a small part of the vocabulary,
    matches the exact marginal of a symmetric prior (uniform over 3 states on a Dirichlet(1)
    chain), and reads no token."""
    from iclgym.harness import MarginalPredictor

    templates = make_task("ICL-SymbolTemplate-v0")
    marginal = MarginalPredictor(templates, num_sequences=2048)
    report = evaluate(marginal, templates, num_sequences=300, per_sequence=True)
    assert len(report.sequence_excess) == 300
    assert sum(report.sequence_excess) / 300 == pytest.approx(report.excess_loss, rel=1e-5)
    uniform = evaluate(StrategyPredictor(templates, "uniform"), templates, num_sequences=300)
    assert report.excess_loss < uniform.excess_loss - 5  # two labels, not ~1,800 tokens
    markov = make_task("ICL-MarkovChain-v0", seq_len=20)
    law = MarginalPredictor(markov, num_sequences=8192).log_law.exp()
    torch.testing.assert_close(law, torch.full((20, 3), 1 / 3), atol=0.02, rtol=0)
    batch = markov.sample(4, generator=markov.generator(0))
    edited = type(batch)(**{**batch.__dict__, "tokens": (batch.tokens + 1) % 3})
    pred = MarginalPredictor(markov, num_sequences=64)
    assert torch.equal(pred.predict(batch), pred.predict(edited))


def test_kl_helpers_follow_zero_log_zero_and_are_infinite_off_the_support():
    """A reviewer's case: kl_divergence([1, 0] || [1, 0]) was NaN (0 * -inf) and
    kl_divergence_log([.5, .5] || [1, 0]) was -0.35 (the +inf term zeroed). The one KL of the
    harness (evaluate uses it) now gives 0 and +inf, and the textbook sum elsewhere."""
    from iclgym.harness.metrics import kl_divergence, kl_divergence_log

    inf = float("inf")
    log_q = torch.tensor([0.0, -inf], dtype=torch.float64)
    assert kl_divergence(torch.tensor([1.0, 0.0], dtype=torch.float64), log_q).item() == 0.0
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert kl_divergence_log(half.log(), log_q).item() == inf
    assert kl_divergence(half, log_q).item() == inf
    g = torch.Generator().manual_seed(0)
    p = torch.rand(50, 7, generator=g, dtype=torch.float64).softmax(-1)
    q = torch.rand(50, 7, generator=g, dtype=torch.float64).softmax(-1)
    want = (p * (p / q).log()).sum(-1)
    torch.testing.assert_close(kl_divergence(p, q.log()), want)
    torch.testing.assert_close(kl_divergence_log(p.log(), q.log()), want)
