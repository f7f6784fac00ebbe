"""Probability outputs and task model metrics in the one trainer (issue 10, for every family):

- a model declaring ``iclgym_output = "probabilities"`` is trained with the squared loss
  ``1/2 ||f - e_y||^2`` averaged over the scored positions (checked against the formula
  written as a plain loop, value and gradient, selection not multiplication), and read by the
  predictor as ``log(clip(f, 1e-6) / sum)``;
- the multi-seed engine computes the same loss: a copy equals its separate run (a causal
  probability model on Markov chains with Adam, the linear transformer on sparse contextual
  bigrams with SGD, model metrics included);
- ``task.model_metrics(model)`` is logged in every evaluation record (single and multi-seed),
  its learning curves are plotted, and a metric named like a record key is refused before
  training;
- ``iclgym train --recipe ren2024`` runs the paper's protocol through the trainer and
  ``iclgym eval --predictor checkpoint:...`` scores the result.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from iclgym.cli import main
from iclgym.harness import ModelPredictor, build_model, evaluate, load_model
from iclgym.harness.model import PROBABILITY_FLOOR, check_model, output_scores
from iclgym.harness.multiseed import copy_losses
from iclgym.harness.train import (
    RunOptions,
    Targets,
    TrainConfig,
    loss_of_output,
    scored_loss,
    train,
)
from iclgym.registry import make_task
from iclgym.tasks.sparse_bigram import SparseContextualBigramTask

QUIET = RunOptions(checkpoint_every=10, progress=False, plot=False)
LINEAR = "baselines.linear_transformer:make_model"
SCB_ID = "ICL-SparseContextualBigram-v0"
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


class Bilinear(nn.Module):
    """A causal probability model written here: ``f_t = E[x_t] W`` (random init, not a
    distribution), declared with the contract's attribute."""

    iclgym_output = "probabilities"

    def __init__(self, vocab_size: int, seq_len: int, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.out = nn.Linear(width, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(tokens))


def make_bilinear(vocab_size: int, seq_len: int, width: int = 6) -> Bilinear:
    return Bilinear(vocab_size, seq_len, width)


class LogitsNamedOdd(Bilinear):
    iclgym_output = "probs"


def read_log(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def evals(folder) -> list[dict]:
    return [r for r in read_log(folder) if r["type"] == "eval"]


@pytest.fixture(scope="module")
def markov():
    return make_task("ICL-MarkovChain-v0", seq_len=12)


@pytest.fixture(scope="module")
def scb():
    return SparseContextualBigramTask(vocab_size=5, seq_len=9, n_support=2, p_family="dirichlet")


# -------------------------------------------------------------------------------- loss
def test_squared_loss_is_the_plain_formula_at_the_scored_positions_only():
    f = torch.tensor(
        [
            [[0.2, 0.5, 0.3], [1.5, -0.5, 0.0], [0.1, 0.1, 0.1]],
            [[0.0, 0.0, 1.0], [0.4, 0.4, -0.2], [2.0, 0.0, 0.0]],
        ],
        dtype=torch.float64,
    ).requires_grad_()
    targets = torch.tensor([[1, 0, 2], [2, 1, 0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    poisoned = torch.where(mask[..., None], f, torch.tensor(float("nan"), dtype=f.dtype))
    selected = Targets.select(targets, mask, output="probabilities")
    loss = loss_of_output(poisoned, selected)
    # 1/2 sum_v (f_v - [v = y])^2 at each scored position, averaged over the 4 of them
    plain, count = 0.0, 0
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                y = int(targets[b, t])
                plain += 0.5 * sum((f.detach()[b, t, v].item() - (v == y)) ** 2 for v in range(3))
                count += 1
    assert count == 4
    assert loss.item() == pytest.approx(plain / count, rel=1e-12)
    # by hand: (0.04 + 0.25 + 0.09) + (0.25 + 0.25 + 0) + (0.16 + 0.36 + 0.04) + (1 + 0 + 0)
    assert loss.item() == pytest.approx(0.5 * 2.44 / 4, rel=1e-12)
    loss.backward()
    onehot = torch.nn.functional.one_hot(targets, 3).to(f.dtype)
    expected = torch.where(mask[..., None], (f.detach() - onehot) / count, torch.zeros(()))
    torch.testing.assert_close(f.grad, expected)  # finite, 0 off the scored positions
    per_position = scored_loss(f.detach()[mask], selected, reduction="none")
    assert per_position.shape == (4,) and per_position.mean().item() == pytest.approx(loss.item())
    # every position scored: the reshape path gives the same loss
    dense = Targets.select(targets, torch.ones_like(mask), output="probabilities")
    assert dense.dense
    torch.testing.assert_close(
        loss_of_output(f.detach(), dense), loss_of_output(f.detach(), replace(dense, dense=False))
    )


def test_copy_losses_use_the_same_squared_loss_per_copy():
    out = torch.randn(3, 4, 5, 6)
    targets = []
    for n in range(3):
        mask = torch.rand(4, 5) < 0.3 + 0.2 * n
        mask[0, 0] = True
        targets.append(Targets.select(torch.randint(0, 6, (4, 5)), mask, output="probabilities"))
    losses = copy_losses(out, targets)  # copies score different numbers of positions
    for n in range(3):
        torch.testing.assert_close(losses[n], loss_of_output(out[n], targets[n]))
        ce = Targets(targets[n].rows, targets[n].cols, targets[n].tokens)
        assert not torch.allclose(losses[n], loss_of_output(out[n], ce))


# ----------------------------------------------------------------------------- predictor
def test_predictor_reads_a_probability_output_as_clipped_renormalised_log_probs(scb):
    f = torch.tensor([[0.5, 0.25, 0.0, -0.3, 0.05], [2.0, 1.0, 1.0, 0.0, 0.0]])
    got = output_scores(f, 5, "probabilities")
    for row in range(2):
        clipped = [max(float(v), PROBABILITY_FLOOR) for v in f[row]]
        total = sum(clipped)
        for v in range(5):
            assert got[row, v].item() == pytest.approx(
                torch.tensor(clipped[v] / total).log().item(), rel=1e-6
            )
    assert torch.equal(output_scores(f, 5), torch.log_softmax(f, -1))  # logits by default
    model = build_model(LINEAR, scb, seed=0)
    with torch.no_grad():
        model.value.copy_(torch.tensor(scb.transition))
        model.attention.copy_(torch.tensor(scb.attn))
    assert check_model(model, scb).output == "probabilities"
    predictor = ModelPredictor(model)
    batch = scb.sample(64, generator=scb.generator(0, "test"))
    raw = model(batch.tokens).detach()
    torch.testing.assert_close(predictor.predict(batch), output_scores(raw, 5, "probabilities"))
    # at (P, attn) the read distribution is the Bayes law (positive here): the oracle's report
    report = evaluate(predictor, scb, split="test", num_sequences=512)
    assert report.excess_loss == pytest.approx(0, abs=1e-5)
    assert report.kl == pytest.approx(report.oracle_kl, abs=1e-5)


def test_an_unknown_declared_output_is_refused(markov, tmp_path):
    with pytest.raises(ValueError, match=r"iclgym_output='probs' of LogitsNamedOdd is invalid"):
        check_model(LogitsNamedOdd(markov.vocab_size, markov.seq_len), markov)
    with pytest.raises(ValueError, match="iclgym_output='probs'"):
        ModelPredictor(LogitsNamedOdd(markov.vocab_size, markov.seq_len))
    with pytest.raises(ValueError, match="iclgym_output='probs'"):
        train(
            LogitsNamedOdd(markov.vocab_size, markov.seq_len),
            markov,
            TrainConfig(steps=2),
            replace(QUIET, out=str(tmp_path / "odd")),
        )
    assert not (tmp_path / "odd").exists()


# ----------------------------------------------------------------- training, many seeds
def _markov_config(**kwargs) -> TrainConfig:
    base = TrainConfig(
        steps=30,
        batch_size=8,
        optimizer="adam",
        lr=0.02,
        weight_decay=0.0,
        eval_every=10,
        eval_sequences=32,
        eval_batch_size=32,
    )
    return replace(base, **kwargs)


def test_a_probability_model_learns_the_squared_loss_and_loads_back(markov, tmp_path):
    model = build_model(f"{__name__}:make_bilinear", markov, seed=0)
    run = replace(QUIET, out=str(tmp_path / "run"))
    summary = train(model, markov, _markov_config(steps=60), run)
    log = read_log(run.out)
    assert log[0]["model_output"] == "probabilities" and log[0]["model_metrics"] == []
    records = [r for r in log if r["type"] == "eval"]
    assert records[-1]["batch_loss"] < records[1]["batch_loss"]  # the squared loss goes down
    # the logged batch loss of step 1 is the squared loss of the declared output on the first
    # batch of the train stream, not its cross-entropy
    one = replace(QUIET, out=str(tmp_path / "one"))
    fresh = build_model(f"{__name__}:make_bilinear", markov, seed=0)
    train(fresh, markov, _markov_config(steps=1, eval_every=1), one)
    first = markov.sample(8, generator=markov.generator(0, "train"))
    reference = build_model(f"{__name__}:make_bilinear", markov, seed=0)
    with torch.no_grad():
        out = reference(first.tokens)
    selected = Targets.select(first.targets, first.loss_mask, None, "probabilities")
    squared = loss_of_output(out, selected).item()
    ce = loss_of_output(out, replace(selected, output="logits")).item()
    logged = evals(one.out)[-1]["batch_loss"]
    assert logged == pytest.approx(squared, rel=1e-6) and logged != pytest.approx(ce, rel=0.01)
    loaded = load_model(run.out, markov)
    assert type(loaded) is Bilinear
    torch.testing.assert_close(loaded.out.weight, model.out.weight)
    assert summary["model_output"] == "probabilities"


def _assert_copy_equals_run(single: Path, copy: Path, metric_keys=()) -> None:
    a = torch.load(single / "checkpoint.pt", weights_only=True)
    b = torch.load(copy / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], **TOLERANCE)
    ra, rb = evals(single), evals(copy)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "kl_last", "batch_loss", *metric_keys):
            if x[key] is None:
                assert y[key] is None
            else:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key


def test_many_seeds_of_a_probability_model_equal_their_separate_runs(markov, tmp_path):
    config = _markov_config()
    template = build_model(f"{__name__}:make_bilinear", markov, seed=0)
    train(template, markov, config, replace(QUIET, out=str(tmp_path / "seeds"), seeds=(0, 3)))
    for s in (0, 3):
        model = build_model(f"{__name__}:make_bilinear", markov, seed=s)
        out = tmp_path / f"single{s}"
        train(model, markov, replace(config, seed=s), replace(QUIET, out=str(out)))
        _assert_copy_equals_run(out, tmp_path / "seeds" / f"seed{s}")


def test_many_seeds_log_each_copys_model_metrics(scb, tmp_path):
    """The linear transformer (deterministic init: the copies differ by their data) with SGD:
    each copy's model metrics, computed from its own parameters, equal its separate run's."""
    config = TrainConfig(
        steps=30,
        batch_size=32,
        optimizer="sgd",
        lr=0.5,
        weight_decay=0.0,
        eval_every=10,
        eval_sequences=64,
        eval_batch_size=64,
    )
    keys = list(scb.model_metrics(build_model(LINEAR, scb)))
    assert "dist_P" in keys and "excess_mse" in keys
    template = build_model(LINEAR, scb, seed=0)
    summary = train(
        template, scb, config, replace(QUIET, out=str(tmp_path / "seeds"), seeds=(0, 1))
    )
    finals = [r["final"] for r in summary["runs"]]
    assert finals[0]["dist_P"] != finals[1]["dist_P"]  # different data, different copies
    for s in (0, 1):
        out = tmp_path / f"single{s}"
        train(
            build_model(LINEAR, scb, seed=s),
            scb,
            replace(config, seed=s),
            replace(QUIET, out=str(out)),
        )
        _assert_copy_equals_run(out, tmp_path / "seeds" / f"seed{s}", keys)
        model = load_model(tmp_path / "seeds" / f"seed{s}", scb)
        assert evals(out)[-1]["dist_Q"] == pytest.approx(scb.model_metrics(model)["dist_Q"])
    assert summary["final"]["dist_P"] == pytest.approx(sum(f["dist_P"] for f in finals) / 2)


# ------------------------------------------------------------------------ model metrics
def test_model_metrics_are_logged_at_every_evaluation_and_plotted(scb, tmp_path):
    model = build_model(LINEAR, scb, seed=0, mu=tuple(float(m) for m in scb.stationary))
    config = TrainConfig(
        steps=40,
        batch_size=64,
        optimizer="iclgym.harness.optimizers:ppg",
        optimizer_args=("lam=0.01",),
        lr=0.3,
        weight_decay=0.0,
        eval_every=10,
        eval_sequences=64,
        eval_batch_size=64,
    )
    run = replace(QUIET, out=str(tmp_path / "run"), plot=True)
    summary = train(model, scb, config, run)
    log = read_log(run.out)
    keys = log[0]["model_metrics"]
    assert keys == list(scb.model_metrics(model))
    records = [r for r in log if r["type"] == "eval"]
    assert [r["step"] for r in records] == [0, 10, 20, 30, 40]
    assert all(set(keys) <= set(r) for r in records)
    assert records[0]["excess_mse_rel"] == pytest.approx(1.0)
    assert records[0]["dist_Q"] == pytest.approx(1.0)
    final = scb.model_metrics(load_model(run.out, scb))
    for key in keys:
        assert records[-1][key] == pytest.approx(final[key], rel=1e-6, abs=1e-12), key
    assert records[-1]["excess_mse_rel"] < records[0]["excess_mse_rel"]
    assert summary["final"]["dist_P"] == records[-1]["dist_P"]
    assert Path(summary["metrics_plot"]).name == "model_metrics.png"
    assert (Path(run.out) / "model_metrics.png").stat().st_size > 10_000
    written = json.loads((Path(run.out) / "summary.json").read_text())
    assert written["final"]["support_recall"] == records[-1]["support_recall"]


def with_metrics(task, names=("weight_norm",)):
    """``task`` (a Markov chain task) as an instance of a subclass with a model-metrics hook:
    the generic path, any task and any model."""

    def model_metrics(self, model):
        norm = sum(p.detach().square().sum() for p in model.parameters()).sqrt()
        return {name: norm for name in names}

    cls = type("MarkovWithMetrics", (type(task),), {"model_metrics": model_metrics})
    return cls(task.spec)


def test_any_task_metric_is_logged_and_a_clashing_name_is_refused(markov, tmp_path):
    task = with_metrics(markov)
    model = build_model(f"{__name__}:make_bilinear", markov, seed=0)
    run = replace(QUIET, out=str(tmp_path / "run"), plot=True)
    train(model, task, _markov_config(steps=20), run)
    records = evals(run.out)
    norm = sum(p.detach().square().sum() for p in model.parameters()).sqrt().item()
    assert records[-1]["weight_norm"] == pytest.approx(norm, rel=1e-6)
    assert records[0]["weight_norm"] != records[-1]["weight_norm"]
    assert (Path(run.out) / "model_metrics.png").is_file()
    for name in ("loss", "val_loss", "step"):
        bad = with_metrics(markov, names=(name,))
        folder = tmp_path / f"bad-{name}"
        with pytest.raises(ValueError, match=rf"model_metrics names \['{name}'\] are invalid"):
            train(model, bad, _markov_config(steps=2), replace(QUIET, out=str(folder)))
        assert not folder.exists()


def test_a_task_without_metrics_writes_no_metrics_plot(markov, tmp_path):
    run = replace(QUIET, out=str(tmp_path / "run"), plot=True)
    summary = train(
        build_model(f"{__name__}:make_bilinear", markov), markov, _markov_config(steps=10), run
    )
    assert "metrics_plot" not in summary and not (Path(run.out) / "model_metrics.png").exists()


# ------------------------------------------------------------------------------ the CLI
def test_ren2024_recipe_trains_the_squared_loss_and_eval_reads_its_checkpoint(tmp_path, capsys):
    """``iclgym train --recipe ren2024`` (200 of its 1500 steps): the proximal method leaves
    the plateau (excess/initial about 0.007 at step 200 on task seed 0), then ``iclgym eval``
    scores the checkpoint as the clipped, renormalised output."""
    out = tmp_path / "ren"
    args = ["train", "--recipe", "ren2024", "--steps", "200", "--eval-every", "100"]
    assert main([*args, "--eval-sequences", "512", "--out", str(out)]) in (0, None)
    printed = capsys.readouterr().out  # the summary shows the task's model metrics at the end
    records = evals(out)
    shown = f"model metrics: excess_mse {records[-1]['excess_mse']:.4g}, excess_mse_rel"
    assert shown in printed and "unseen-token" not in printed  # no embedding rows to report
    assert [r["step"] for r in records] == [0, 100, 200]
    assert records[0]["excess_mse_rel"] == pytest.approx(1.0)
    assert records[-1]["excess_mse_rel"] < 0.02 and records[-1]["support_recall"] == 1.0
    assert records[-1]["batch_loss"] < 0.4  # 1/2 (Bayes MSE 0.709 + excess): squared loss
    capsys.readouterr()
    assert main(["eval", SCB_ID, "--predictor", f"checkpoint:{out}", "--json"]) in (0, None)
    (report,) = json.loads(capsys.readouterr().out)
    assert report["excess_loss"] < 0.1 and report["nearest_strategy"] == "uniform_attention"
