"""The one trainer: run folder and logs, resume and Ctrl-C, the lock, failing early, the loss
by selection, optimisers and schedules, both data regimes, value models, probes, phases and
plots. Runs are tiny (small batches and held-out sets) so the file takes seconds."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from iclgym.harness import ModelPredictor, build_model, evaluate, load_predictor
from iclgym.harness.model import check_model, load_model
from iclgym.harness.phases import persistent_switch_step, phase_report, phases, plateaus
from iclgym.harness.plots import plot_run
from iclgym.harness.probes import induction_score, previous_token_score
from iclgym.harness.train import (
    FiniteData,
    RunOptions,
    StreamData,
    Targets,
    TrainConfig,
    loss_of_output,
    lr_factor,
    run_lock,
    train,
    training_labels,
)
from iclgym.registry import make_task
from iclgym.tasks.templates import SymbolTemplateTask

TRANSFORMER = "baselines.transformer:make_model"
TINY = TrainConfig(steps=40, batch_size=8, eval_every=10, eval_sequences=48, eval_batch_size=32)
QUIET = RunOptions(checkpoint_every=10, progress=False, plot=False)
SMALL_TEMPLATES = {"train_alphabet_size": 16, "val_alphabet_size": 8, "test_alphabet_size": 32}
TEMPLATE_MODEL = {
    "d_model": 16,
    "n_heads": 2,
    "mlp": True,
    "mlp_width": 32,
    "activation": "gelu",
    "dropout": 0.0,
    "positional": "learned",
    "causal": False,
    "init": "default",
}
FINITE = TrainConfig(
    data="finite",
    epochs=150,
    batch_size=1024,
    optimizer="adam",
    lr=1e-3,
    betas=(0.9, 0.999),
    weight_decay=0.0,
    eval_every=0,
    eval_sequences=200,
    eval_batch_size=200,
    eval_splits=("validation", "test"),
)


@pytest.fixture(scope="module")
def task():
    return make_task("ICL-MarkovChain-v0", seq_len=32)


def model_for(task, seed=0, **args):
    return build_model(TRANSFORMER, task, seed=seed, **args)


def run_in(tmp_path, name="run", **kwargs) -> RunOptions:
    return replace(QUIET, out=str(tmp_path / name), **kwargs)


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------- run folder, logs
def test_train_logs_evaluations_checkpoint_summary_and_plot(tmp_path, task):
    run = run_in(tmp_path, plot=True)
    summary = train(model_for(task), task, TINY, run)
    log = read_log(run.out)
    assert log[0]["type"] == "start" and log[0]["num_parameters"] == summary["num_parameters"]
    assert log[0]["model"]["factory"]["factory"] == TRANSFORMER
    evals = [r for r in log if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    assert [r["sequences"] for r in evals] == [0, 80, 160, 240, 320]
    for rec in evals:
        assert set(rec["strategy_kl_last"]) == {"uniform", "unigram", "bigram", "true"}
        phase_kl = {k: v for k, v in rec["strategy_kl_last"].items() if k != "true"}
        assert rec["nearest"] == min(phase_kl, key=phase_kl.get)  # privileged `true` excluded
        assert 0 <= rec["prev_token_score"] <= 1 and 0 <= rec["induction_score"] <= 1
        assert rec["loss"] > 0 and rec["kl_last"] > 0
    assert evals[0]["batch_loss"] is None and evals[1]["batch_loss"] > 0
    assert evals[0]["nearest"] == "uniform"  # an untrained model predicts about uniformly
    assert log[-1]["type"] == "summary" and summary["final"] == evals[-1]
    refs = summary["references"]
    assert refs["uniform"] > refs["unigram"] > refs["bigram"] > 0
    assert summary["oracle"]["name"] == task.oracle_name
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 40
    # the trainer's evaluation is evaluate() on the same held-out set
    model = load_model(run.out, task)
    report = evaluate(
        ModelPredictor(model), task, split="validation", num_sequences=48, batch_size=32
    )
    assert report.cross_entropy == pytest.approx(evals[-1]["loss"], rel=1e-5)
    assert report.kl_last == pytest.approx(evals[-1]["kl_last"], rel=1e-5)
    batch = task.sample(4, generator=task.generator(0, "test"))
    assert load_predictor(run.out, task).predict(batch).shape == (4, 32, 3)


def test_training_learns_the_unigram_phase(tmp_path, task):
    config = replace(
        TINY, steps=150, batch_size=32, eval_every=150, eval_sequences=256, eval_batch_size=256
    )
    train(model_for(task), task, config, run_in(tmp_path))
    first, last = [r for r in read_log(tmp_path / "run") if r["type"] == "eval"]
    assert last["kl_last"] < first["kl_last"] - 0.05
    assert last["nearest"] == "unigram"


# --------------------------------------------------------------------- resume, Ctrl-C
def test_resume_gives_bit_identical_weights(tmp_path, task):
    straight = train(model_for(task), task, TINY, run_in(tmp_path, "straight"))
    train(model_for(task), task, replace(TINY, steps=20), run_in(tmp_path, "split"))
    resumed = train(model_for(task), task, TINY, run_in(tmp_path, "split", resume=True))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    assert_same_state(a["model"], b["model"])
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert_same_state(sa, sb)
    assert torch.equal(a["data"]["rng"], b["data"]["rng"])
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert straight["final"] == {**resumed["final"], "elapsed_s": straight["final"]["elapsed_s"]}
    evals = [r for r in read_log(tmp_path / "split") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]


def test_finite_regime_resumes_mid_epoch_bit_identically(tmp_path):
    task = SymbolTemplateTask(**SMALL_TEMPLATES)
    # 16 strings in batches of 6: 3 steps per epoch (6, 6, 4), 4 epochs; stop after 5 steps
    config = replace(FINITE, epochs=4, batch_size=6, eval_every=5)
    args = {**TEMPLATE_MODEL, "n_outputs": 1}
    straight = train(build_model(TRANSFORMER, task, **args), task, config, run_in(tmp_path, "a"))
    assert straight["step"] == 12 and straight["sequences"] == 64
    train(
        build_model(TRANSFORMER, task, **args),
        task,
        replace(config, epochs=2),
        run_in(tmp_path, "b", checkpoint_every=5),
    )
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6
    resumed = train(
        build_model(TRANSFORMER, task, **args), task, config, run_in(tmp_path, "b", resume=True)
    )
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert_same_state(a["model"], b["model"])
    assert resumed["final"]["test_mse"] == straight["final"]["test_mse"]


class InterruptingTask:
    """The wrapped task, but a Ctrl-C (SIGINT to this process) arrives while the training
    batch number ``at`` is drawn."""

    def __init__(self, task, at: int, batch_size: int) -> None:
        self.task, self.at, self.batch_size, self.calls = task, at, batch_size, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def sample(self, batch_size, **kwargs):
        if batch_size == self.batch_size:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGINT)
        return self.task.sample(batch_size, **kwargs)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, task):
    train(model_for(task), task, TINY, run_in(tmp_path, "straight"))
    run = run_in(tmp_path, "interrupted", checkpoint_every=1000)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 13"):
        train(model_for(task), InterruptingTask(task, 13, TINY.batch_size), TINY, run)
    state = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 13  # the step in flight was finished, then saved
    log = read_log(run.out)
    assert log[-1]["type"] == "summary" and log[-1]["interrupted"]
    assert [r["step"] for r in log if r["type"] == "eval"] == [0, 10]  # none off schedule
    batch = task.sample(2, generator=task.generator(1))
    assert load_predictor(run.out, task).predict(batch).shape == (2, 32, 3)
    train(model_for(task), task, TINY, replace(run, resume=True))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)
    assert_same_state(a["model"], b["model"])


VARYING = ("wall_s", "steps_per_s", "peak_rss_mib", "out", "checkpoint", "elapsed_s")


def comparable(record):
    """A summary or eval record without its timings and paths."""
    if isinstance(record, dict):
        return {k: comparable(v) for k, v in record.items() if k not in VARYING}
    return record


def test_a_resumed_interrupted_run_writes_the_uninterrupted_summary(tmp_path, task):
    """Ctrl-C off the evaluation schedule (step 33 of 40, dropout on): the resumed run's
    summary.json and eval records equal the uninterrupted run's, field by field (no extra
    evaluation at the interruption, the running batch loss carried by the checkpoint)."""
    straight = run_in(tmp_path, "straight", checkpoint_every=1000)
    train(model_for(task, dropout=0.3), task, TINY, straight)
    run = run_in(tmp_path, "stopped", checkpoint_every=1000)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 33"):
        train(model_for(task, dropout=0.3), InterruptingTask(task, 33, TINY.batch_size), TINY, run)
    train(model_for(task, dropout=0.3), task, TINY, replace(run, resume=True))
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert a.keys() == b.keys()
    for key in set(a) - set(VARYING):
        assert comparable(b[key]) == comparable(a[key]), key
    evals = [
        [comparable(r) for r in read_log(r.out) if r["type"] == "eval"] for r in (straight, run)
    ]
    assert evals[0] == evals[1]


class PoisonedTask(InterruptingTask):
    """The wrapped task; the model turns to NaN outputs while training batch ``at`` is drawn."""

    def __init__(self, task, at: int, batch_size: int, model) -> None:
        super().__init__(task, at, batch_size)
        self.model = model

    def sample(self, batch_size, **kwargs):
        if batch_size == self.batch_size:
            self.calls += 1
            if self.calls == self.at:
                self.model.poisoned = True
        return self.task.sample(batch_size, **kwargs)


class NaNAfter(nn.Module):
    """Logits of an embedding, all NaN once ``poisoned`` is set."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)
        self.poisoned = False

    def forward(self, tokens):
        out = self.embed(tokens)
        return out * math.nan if self.poisoned else out


def make_nan_after(vocab_size: int, seq_len: int) -> NaNAfter:
    return NaNAfter(vocab_size, seq_len)


def test_a_non_finite_training_loss_stops_the_run_and_keeps_the_checkpoint(tmp_path, task):
    model = build_model(f"{__name__}:make_nan_after", task)
    run = run_in(tmp_path)
    with pytest.raises(ValueError, match=r"^training loss is nan at step 15: .*checkpoint .* kept"):
        train(model, PoisonedTask(task, 15, TINY.batch_size, model), TINY, run)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 10
    model.poisoned = True
    with pytest.raises(ValueError, match=r"training loss is nan at step 1: .*no checkpoint"):
        train(model, task, TINY, run_in(tmp_path, "fresh"))


def test_summary_and_log_are_strict_json(tmp_path, task):
    """A one-sequence held-out set has a NaN standard error: written as null, never NaN."""
    config = replace(TINY, steps=2, eval_sequences=1, eval_batch_size=1)
    summary = train(model_for(task), task, config, run_in(tmp_path))
    assert math.isnan(summary["final"]["kl_last_se"])

    def refuse(constant):
        raise AssertionError(f"{constant} in strict JSON")

    folder = tmp_path / "run"
    saved = json.loads((folder / "summary.json").read_text(), parse_constant=refuse)
    assert saved["final"]["kl_last_se"] is None
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def test_phases_ignore_non_finite_evaluations():
    nan = math.nan
    records = [
        {"step": s, "nearest": n, "kl_last": k, "strategy_kl_last": {"unigram": u, "bigram": b}}
        for s, n, k, u, b in (
            (0, "unigram", nan, nan, nan),
            (10, "unigram", 0.5, 0.1, 0.4),
            (20, "bigram", None, 0.3, None),
            (30, "unigram", 0.4, 0.1, 0.3),
        )
    ]
    assert [(p["label"], p["start_step"], p["end_step"]) for p in phases(records)] == [
        ("unigram", 10, 30)
    ]
    assert persistent_switch_step(records) is None
    assert persistent_switch_step(records[:1]) is None  # no switch from NaN
    report = phase_report(records, order=["unigram", "bigram"])
    assert report["switches"] == {"unigram->bigram": None}


def test_a_second_process_cannot_train_into_a_locked_folder(tmp_path, task):
    folder = tmp_path / "run"
    with run_lock(folder), pytest.raises(ValueError, match="in use by another training"):
        train(model_for(task), task, TINY, run_in(tmp_path))
    assert not (folder / "checkpoint.pt").exists()
    train(model_for(task), task, replace(TINY, steps=2), run_in(tmp_path))  # released


# ---------------------------------------------------------------------- failing early
def test_each_training_loss_is_its_formula_on_the_predicted_law():
    """TrainConfig.loss: cross_entropy -log p_y, squared 1/2 ||p - e_y||^2, lsq2 (1 - p_y)^2
    (Li et al. 2024), p the softmax of logits or a probability output as given (the clipped,
    renormalised f for cross_entropy); auto is cross-entropy of logits and the squared loss of
    probabilities."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    f = torch.rand(2, 3, 5, generator=g, dtype=torch.float64) - 0.1  # raw, some entries < 0
    targets = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    y = targets[mask]
    onehot = torch.eye(5, dtype=torch.float64)[y]
    clipped = f[mask].clamp_min(1e-6)
    for out, kind, p, log_p in (
        (logits, "logits", logits[mask].softmax(-1), logits[mask].log_softmax(-1)),
        (f, "probabilities", f[mask], (clipped / clipped.sum(-1, keepdim=True)).log()),
    ):
        expected = {
            "cross_entropy": -log_p[range(len(y)), y].mean(),
            "squared": 0.5 * (p - onehot).pow(2).sum(-1).mean(),
            "lsq2": (1 - p[range(len(y)), y]).pow(2).mean(),
        }
        expected["auto"] = expected["squared" if kind == "probabilities" else "cross_entropy"]
        for loss, value in expected.items():
            got = loss_of_output(out, Targets.select(targets, mask, output=kind, loss=loss))
            torch.testing.assert_close(got, value, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="loss='hinge' is invalid"):
        TrainConfig(loss="hinge")


def test_soft_labels_are_the_expected_sampled_loss_and_hard_labels_the_argmax():
    """TrainConfig.labels (the DPT label switch, docs/harness.md): soft labels train each loss's
    expectation under the true law pi (cross_entropy sum_y pi_y (-log p_y), lsq2 sum_y pi_y
    (1 - p_y)^2; squared 1/2 ||p - pi||^2, whose gradient is the expectation's); a value
    model trains towards the law's mean value; hard labels are argmax pi, the lowest token on
    a tie."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    laws = torch.rand(2, 3, 4, generator=g, dtype=torch.float64)
    laws[0, 0, 1] = 0.0  # a zero entry: 0 * log p counts as 0
    laws = laws / laws.sum(-1, keepdim=True)
    targets = torch.randint(0, 4, (2, 3), generator=g)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    pi, p = laws[mask], logits[mask].softmax(-1)
    expected = {
        "cross_entropy": -(pi * p.log()).sum(-1).mean(),
        "lsq2": (pi * (1 - p).pow(2)).sum(-1).mean(),
    }
    for loss, value in expected.items():
        got = loss_of_output(logits, Targets.select(targets, mask, loss=loss, laws=laws))
        torch.testing.assert_close(got, value, rtol=1e-12, atol=1e-12)
    squared = loss_of_output(logits, Targets.select(targets, mask, loss="squared", laws=laws))
    expectation = sum(
        pi[:, y] @ (0.5 * (p - torch.eye(4, dtype=p.dtype)[y]).pow(2).sum(-1)) for y in range(4)
    ) / len(pi)
    (g_soft,) = torch.autograd.grad(squared, logits)
    (g_expect,) = torch.autograd.grad(expectation, logits)
    torch.testing.assert_close(g_soft, g_expect, rtol=1e-12, atol=1e-12)
    values = torch.tensor([0.0, 1.0, -1.0, 3.0], dtype=torch.float64)
    valued = Targets.select(targets, mask, label_values=values, laws=laws)
    torch.testing.assert_close(valued.values, pi @ values)
    task = make_task("ICL-MarkovChain-v0", num_states=3, seq_len=12)
    batch = task.sample(8, generator=task.generator(0))
    hard, _, none = training_labels(batch, "hard")
    assert none is None and torch.equal(hard, batch.true_probs.argmax(-1))
    tie = replace(batch, true_probs_fn=lambda b: torch.full((8, 12, 3), 1 / 3))
    assert (training_labels(tie, "hard")[0] == 0).all()
    sampled, _, none = training_labels(batch, "sampled")
    assert none is None and sampled is batch.targets
    _, _, soft = training_labels(batch, "soft")
    torch.testing.assert_close(soft, batch.true_probs)
    with pytest.raises(ValueError, match="labels='oracle' is invalid"):
        TrainConfig(labels="oracle")


def test_soft_labels_train_single_and_many_seed_runs_alike(tmp_path, task):
    """labels="soft" through the one trainer: the first logged loss is the soft
    cross-entropy of the untrained model on the first train batch, and a two-copy run equals
    its single-seed runs."""
    config = replace(TINY, steps=3, eval_every=0, labels="soft", weight_decay=0.0)
    model = model_for(task, dropout=0.0)
    batch = task.sample(config.batch_size, generator=task.generator(config.seed, "train"))
    with torch.no_grad():
        first = loss_of_output(
            model(batch.tokens),
            Targets.select(batch.targets, batch.loss_mask, laws=batch.true_probs),
        ).item()
    train(model, task, replace(config, steps=1), run_in(tmp_path, "one"))
    end = [r for r in read_log(tmp_path / "one") if r["type"] == "eval"][-1]
    assert end["batch_loss"] == pytest.approx(first, rel=1e-5)
    multi = train(model_for(task, dropout=0.0), task, config, run_in(tmp_path, "m", seeds="0,1"))
    for n, seed in enumerate((0, 1)):
        single = train(
            model_for(task, dropout=0.0, seed=seed),
            task,
            replace(config, seed=seed),
            run_in(tmp_path, f"s{seed}"),
        )
        assert multi["runs"][n]["final"]["loss"] == pytest.approx(single["final"]["loss"])


def test_lsq2_trains_through_the_trainer_and_value_models_refuse_it(tmp_path, task):
    """The first logged training loss of a loss='lsq2' run is (1 - p_y)^2 of the untrained
    model on the first train batch; a value model (n_outputs=1) refuses any loss but auto."""
    config = replace(TINY, steps=1, eval_every=0, loss="lsq2", weight_decay=0.0)
    model = model_for(task, dropout=0.0)
    inputs, targets, mask, _ = StreamData(task, config).next()
    with torch.no_grad():
        p = model(*inputs).softmax(-1)[mask]
    expected = (1 - p[range(len(p)), targets[mask]]).pow(2).mean().item()
    train(model, task, config, run_in(tmp_path))
    end = [r for r in read_log(tmp_path / "run") if r["type"] == "eval"][-1]
    assert end["batch_loss"] == pytest.approx(expected, rel=1e-5)
    templates = SymbolTemplateTask(**SMALL_TEMPLATES)
    value_model = build_model(TRANSFORMER, templates, n_outputs=1, **TEMPLATE_MODEL)
    with pytest.raises(ValueError, match="loss='lsq2' is invalid for a value model"):
        train(value_model, templates, replace(FINITE, loss="lsq2"), run_in(tmp_path, "v"))
    assert not (tmp_path / "v").exists()


def test_a_checkpoint_older_than_a_config_field_resumes_with_its_default(tmp_path, task):
    """A run folder written before TrainConfig.loss existed (its checkpoint has no "loss")
    resumes under the default, which it trained with; another loss is still refused."""
    config = replace(TINY, steps=10)
    train(model_for(task), task, config, run_in(tmp_path))
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    del state["meta"]["train_config"]["loss"]
    torch.save(state, path)
    resume = run_in(tmp_path, resume=True)
    train(model_for(task), task, replace(config, steps=20), resume)
    assert [r["step"] for r in read_log(tmp_path / "run") if r["type"] == "eval"][-1] == 20
    with pytest.raises(ValueError, match=r"train_config.loss: checkpoint 'auto' != now 'lsq2'"):
        train(model_for(task), task, replace(config, steps=30, loss="lsq2"), resume)


def test_bad_input_fails_before_training(tmp_path, task):
    run = run_in(tmp_path)
    other = make_task("ICL-MarkovChain-v0", num_states=4)
    with pytest.raises(ValueError, match=r"output shape \(2, 32, 4\) is invalid: expected"):
        train(build_model(TRANSFORMER, other), task, TINY, run)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="does not exist"):
        train(model_for(task), task, TINY, replace(run, resume=True))
    config = replace(TINY, steps=10)
    train(model_for(task), task, config, run)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="exists: pass resume=True"):
        train(model_for(task), task, config, run)
    resume = replace(run, resume=True)
    with pytest.raises(ValueError, match=r"train_config.lr: checkpoint 0.0005 != now 0.001"):
        train(model_for(task), task, replace(config, steps=20, lr=1e-3), resume)
    with pytest.raises(ValueError, match=r"model.factory: checkpoint"):
        train(model_for(task, d_model=32), task, replace(config, steps=20), resume)
    longer = make_task("ICL-MarkovChain-v0", seq_len=32, alpha=0.5)
    with pytest.raises(ValueError, match=r"task.spec: checkpoint"):
        train(model_for(longer), longer, replace(config, steps=20), resume)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(ValueError, match="vocab_size=3, but the task has vocab_size=4"):
        load_predictor(tmp_path / "run", other)


class PeekingModel(nn.Module):
    """Logits at position t from the embedding of token t + 1: reads the future."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)

    def forward(self, tokens):
        return self.embed(tokens.roll(-1, dims=1))


class BagModel(nn.Module):
    """Every position sees the mean embedding of the whole sequence: bidirectional."""

    def __init__(self, vocab_size: int, seq_len: int, n_outputs: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(8, n_outputs or vocab_size)

    def forward(self, tokens):
        h = self.embed(tokens).mean(1, keepdim=True).expand(-1, tokens.shape[1], -1)
        return self.head(h)


def test_causality_probe_refuses_models_that_read_the_future(tmp_path, task):
    for model in (PeekingModel(3, 32), BagModel(3, 32)):
        with pytest.raises(ValueError, match="reads future tokens: its output at position"):
            train(model, task, TINY, run_in(tmp_path))
    assert not (tmp_path / "run").exists()
    # a template task scores one position: bidirectional models are allowed there
    templates = SymbolTemplateTask(**SMALL_TEMPLATES)
    check = check_model(BagModel(templates.vocab_size, 4, n_outputs=1), templates)
    assert check.output == "values" and not check.causality_checked
    assert check_model(model_for(task), task).causality_checked


@pytest.mark.parametrize(
    ("output", "match"),
    [
        (lambda t: torch.zeros(t.shape[0], 3), r"output shape \(2, 3\) is invalid"),
        (lambda t: torch.zeros(*t.shape, 1), r"output shape \(2, 32, 1\) is invalid"),
        (lambda t: (t, t), "model output is a tuple"),
        (lambda t: 1 / 0, "model forward failed .* ZeroDivisionError"),
    ],
)
def test_output_contract_errors(task, output, match):
    class Model(nn.Module):
        def forward(self, tokens):
            return output(tokens)

    with pytest.raises(ValueError, match=match):
        check_model(Model(), task)  # a (B, T, 1) value output needs real-valued labels


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"seed": -1}, "seed"),
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop' is invalid"),
        ({"data": "replay"}, "data='replay'"),
        ({"eval_splits": ("train",)}, "eval_splits"),
        ({"device": "gpu0"}, "device='gpu0'"),
        ({"optimizer_args": ("lr",)}, "KEY=VALUE"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_device_is_refused_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        TrainConfig(device="cuda")


def test_optimizer_import_path_errors(tmp_path, task):
    with pytest.raises(ValueError, match="does not resolve"):
        train(
            model_for(task), task, replace(TINY, optimizer="nowhere.at_all:opt"), run_in(tmp_path)
        )
    bad = replace(TINY, optimizer=f"{__name__}:not_an_optimizer")
    with pytest.raises(ValueError, match=r"expected a torch\.optim\.Optimizer"):
        train(model_for(task), task, bad, run_in(tmp_path))


def not_an_optimizer(model, config):
    return "sgd"


# -------------------------------------------------------------------------- the loss
def test_loss_reads_scored_positions_only():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    targets = torch.randint(0, 5, (2, 4))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[:, -1] = True
    poisoned = torch.where(mask[..., None], logits, torch.tensor(float("nan")))
    poisoned = poisoned.masked_fill(~mask[..., None] & (torch.arange(5) == 0), -math.inf)
    loss = loss_of_output(poisoned, Targets.select(targets, mask))
    expected = torch.nn.functional.cross_entropy(logits[:, -1], targets[:, -1])
    assert torch.equal(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, :-1].abs().sum() == 0
    values = torch.tensor([0.0, -1.0, 1.0, 0.0, 0.0])
    out = torch.full((2, 4, 1), float("nan"))
    out[:, -1, 0] = torch.tensor([0.5, -0.5])
    targets[:, -1] = torch.tensor([2, 1])
    mse = loss_of_output(out, Targets.select(targets, mask, values))
    assert mse.item() == pytest.approx(0.25)


def test_fully_scored_batches_select_by_reshape_with_the_same_loss_and_gradient():
    logits = torch.randn(3, 5, 4, requires_grad=True)
    targets = torch.randint(0, 4, (3, 5))
    dense = Targets.select(targets, torch.ones(3, 5, dtype=torch.bool))
    assert dense.dense and not Targets.select(targets, targets > 0).dense
    loss_reshape = loss_of_output(logits, dense)
    (grad_reshape,) = torch.autograd.grad(loss_reshape, logits)
    loss_gather = loss_of_output(logits, replace(dense, dense=False))
    (grad_gather,) = torch.autograd.grad(loss_gather, logits)
    assert torch.equal(loss_reshape, loss_gather) and torch.equal(grad_reshape, grad_gather)


# ----------------------------------------------------------------- optimisers, schedules
class NormalisedGD(torch.optim.Optimizer):
    """theta <- theta - lr * g / ||g|| (the global norm): a custom step for the hook test."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad / norm)


def normalised_gd(model, config, scale: float = 1.0):
    return NormalisedGD(model.parameters(), lr=config.lr * scale)


def test_custom_optimizer_factory_is_the_step_and_matches_a_plain_loop(tmp_path, task):
    config = replace(
        TINY,
        steps=3,
        eval_every=0,
        optimizer=f"{__name__}:normalised_gd",
        optimizer_args=("scale=2.0",),
        lr=0.01,
    )
    trained = model_for(task, dropout=0.0)
    train(trained, task, config, run_in(tmp_path))
    reference = model_for(task, dropout=0.0)
    gen = task.generator(0, "train")
    for _ in range(3):
        batch = task.sample(8, generator=gen)
        loss = torch.nn.functional.cross_entropy(
            reference(batch.tokens).flatten(0, 1), batch.targets.flatten()
        )
        reference.zero_grad()
        loss.backward()
        with torch.no_grad():
            norm = torch.sqrt(sum((p.grad**2).sum() for p in reference.parameters()))
            for p in reference.parameters():
                p.sub_(0.02 * p.grad / norm)
    for a, b in zip(trained.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lr_schedule_warmup_cosine_and_grad_clip(tmp_path, task):
    config = TrainConfig(schedule="cosine", warmup_steps=10, lr=1e-3, min_lr=1e-4, steps=110)
    factors = [lr_factor(config, s, 110) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert lr_factor(TrainConfig(), 500, 2000) == 1.0
    # one SGD step with clipping moves the weights by at most lr * clip
    model = model_for(task, dropout=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    clipped = replace(
        TINY, steps=1, optimizer="sgd", lr=1.0, weight_decay=0.0, grad_clip=1e-3, eval_every=0
    )
    train(model, task, clipped, run_in(tmp_path))
    moved = torch.sqrt(
        sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), before, strict=True))
    )
    assert 0 < moved.item() <= 1e-3 * (1 + 1e-5)


def test_float64_training(tmp_path, task):
    model = model_for(task)
    summary = train(model, task, replace(TINY, steps=4, dtype="float64"), run_in(tmp_path))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert math.isfinite(summary["final"]["loss"])


# ----------------------------------------------------- finite regime, template protocol
def test_finite_regime_epochs_are_permutations_of_the_training_set():
    task = SymbolTemplateTask(**SMALL_TEMPLATES)
    data = FiniteData(task, replace(FINITE, batch_size=6, epochs=2))
    assert data.n == 16 and data.size == 6 and data.steps(replace(FINITE, epochs=2)) == 6
    rows = {tuple(t.tolist()) for t in data.data.tokens}
    for _ in range(2):
        seen = [tuple(t.tolist()) for _ in range(3) for t in data.next()[0][0]]
        assert len(seen) == 16 and set(seen) == rows
    drawn = FiniteData(task, replace(FINITE, train_sequences=5))
    assert drawn.n == 5  # N sequences of the train stream instead of the task's own set


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_template_protocol_fits_and_leaves_unseen_embedding_rows_bit_identical(tmp_path, name):
    task = SymbolTemplateTask(**SMALL_TEMPLATES)
    if name == "mlp":
        factory, args = "baselines.mlp:make_model", {"n_outputs": 1, "width": 32}
    else:
        factory, args = TRANSFORMER, {**TEMPLATE_MODEL, "n_outputs": 1}
    model = build_model(factory, task, **args)
    initial = build_model(factory, task, **args)  # same seed: the initial weights
    summary = train(model, task, FINITE, run_in(tmp_path))
    final = summary["final"]
    assert summary["step"] == 150 and summary["model_output"] == "values"
    assert summary["untrained_rows"]["unchanged"]
    unseen = summary["untrained_rows"]["rows"]
    assert unseen == task.vocab_size - len(FiniteData(task, FINITE).seen_tokens)
    assert final["train_mse"] < 0.05, final
    start = task.alphabets["validation"][0]
    assert torch.equal(model.input_embedding()[start:], initial.input_embedding()[start:])
    train_start = task.alphabets["train"][0]
    trained = slice(train_start, start)
    assert not torch.equal(model.input_embedding()[trained], initial.input_embedding()[trained])
    for prefix in ("", "test_"):
        assert 0.0 <= final[f"{prefix}accuracy"] <= 1.0 and final[f"{prefix}mse"] > 0
    assert final["loss"] == final["mse"]  # a value model's loss is its MSE


def test_weight_decay_on_embeddings_is_reported_as_changed_rows(tmp_path):
    task = SymbolTemplateTask(**SMALL_TEMPLATES)
    model = build_model(TRANSFORMER, task, **TEMPLATE_MODEL, n_outputs=1)
    model.decay_parameters = lambda: (list(model.parameters()), [])
    config = replace(FINITE, epochs=3, optimizer="adamw", weight_decay=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(model, task, config, run_in(tmp_path))
    assert summary["untrained_rows"]["unchanged"] is False
    assert any("changed in training" in str(w.message) for w in caught)


def test_classification_and_copy_labels_train_with_cross_entropy(tmp_path):
    task = SymbolTemplateTask(
        preset="same_different", label_type="classification", **SMALL_TEMPLATES
    )
    model = build_model(TRANSFORMER, task, **TEMPLATE_MODEL)
    summary = train(model, task, FINITE, run_in(tmp_path, "cls"))
    assert summary["model_output"] == "logits" and summary["final"]["train_accuracy"] == 1.0
    copy = SymbolTemplateTask(preset="copy", label_type="multiclass", **SMALL_TEMPLATES)
    tied = build_model(TRANSFORMER, copy, **TEMPLATE_MODEL, tied=True, vo_identity=True)
    summary = train(tied, copy, replace(FINITE, epochs=2), run_in(tmp_path, "copy"))
    assert summary["untrained_rows"] is None  # a tied unembedding trains every row


# ------------------------------------------------------------------------------ probes
def test_previous_token_probe_on_hand_built_patterns():
    T = 6
    prev = torch.zeros(2, 1, T, T)
    prev[:, :, 0, 0] = 1
    prev[:, :, torch.arange(1, T), torch.arange(T - 1)] = 1  # every query on t - 1
    assert previous_token_score(prev) == pytest.approx(1.0)
    uniform = torch.ones(T, T).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(2, 1, T, T)
    expected = sum(1 / (t + 1) for t in range(1, T)) / (T - 1)
    assert previous_token_score(uniform) == pytest.approx(expected)
    two_heads = torch.cat([uniform, prev], dim=1)  # the best head counts
    assert previous_token_score(two_heads) == pytest.approx(1.0)


def test_induction_probe_on_hand_built_patterns():
    tokens = torch.tensor([[0, 1, 0, 2, 0, 1]])
    T = tokens.shape[1]
    # Queries with a key s <= t such that x_{s-1} = x_t: t=2 (s=1), t=4 (s=1, 3),
    # t=5 (x_5=1: s=2). Put all mass on the matching keys: score 1.
    induction = torch.zeros(1, 1, T, T)
    for t, keys in {0: [0], 1: [0], 2: [1], 3: [0], 4: [1, 3], 5: [2]}.items():
        induction[0, 0, t, keys] = 1 / len(keys)
    assert induction_score(induction, tokens) == pytest.approx(1.0)
    self_attention = torch.eye(T).expand(1, 1, T, T)  # only s = t: x_{t-1} = x_t never holds
    assert induction_score(self_attention, tokens) == pytest.approx(0.0)
    half = 0.5 * induction + 0.5 * self_attention
    assert induction_score(half, tokens) == pytest.approx(0.5)


# ------------------------------------------------------------------------------ phases
def curve(labels_and_kl):
    """Eval records with given nearest labels; KL(bigram||m) < KL(unigram||m) iff bigram."""
    out = []
    for i, (label, kl) in enumerate(labels_and_kl):
        strat = {"uniform": 0.5, "unigram": 0.1, "bigram": 0.3}
        if label == "uniform":
            strat = {"uniform": 0.01, "unigram": 0.1, "bigram": 0.3}
        if label == "bigram":
            strat = {"uniform": 0.5, "unigram": 0.3, "bigram": 0.05}
        out.append({"step": 10 * i, "nearest": label, "kl_last": kl, "strategy_kl_last": strat})
    return out


def test_phase_detection_on_a_synthetic_curve():
    labels = ["uniform"] * 2 + ["unigram"] * 5 + ["bigram"] + ["unigram"] + ["bigram"] * 4
    records = curve([(label, 0.3 - 0.01 * i) for i, label in enumerate(labels)])
    assert persistent_switch_step(records) == 90  # the early blip at step 70 does not persist
    found = phases(records)
    assert [(p["label"], p["start_step"], p["end_step"]) for p in found] == [
        ("uniform", 0, 10),
        ("unigram", 20, 60),
        ("bigram", 70, 70),
        ("unigram", 80, 80),
        ("bigram", 90, 120),
    ]
    assert found[1]["kl_last_max"] == pytest.approx(0.28)
    assert found[1]["kl_last_min"] == pytest.approx(0.24)
    assert [p["label"] for p in plateaus(records)] == ["unigram", "bigram"]
    report = phase_report(records, order=["uniform", "unigram", "bigram"])
    assert report["switch_step"] == 90
    assert report["switches"] == {"uniform->unigram": 20, "unigram->bigram": 90}
    assert persistent_switch_step(records[:-1] + curve([("unigram", 0.2)])) is None
    assert persistent_switch_step(curve([("unigram", 0.2)] * 4)) is None


def test_plot_writes_a_png(tmp_path):
    records = curve([("uniform", 0.28), ("unigram", 0.17), ("unigram", 0.16), ("bigram", 0.05)])
    for i, rec in enumerate(records):
        rec.update(sequences=640 * i, prev_token_score=0.1 * i, induction_score=0.2 * i)
    path = plot_run(
        records, {"uniform": 0.28, "unigram": 0.17, "bigram": 0.026}, tmp_path / "p.png"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("positional", ["relative", "rotary"])
def test_the_loss_maps_over_stacked_model_copies(task, positional):
    """functional_call + vmap(grad) of loss_of_output over copies (each with its own batch)
    equals the separate losses and gradients, for the relative positions of the edelman2024
    model (its attention function has a vmap rule) and for SDPA's path (rotary). The trainer's
    multi-seed engine (tests/harness/test_multiseed.py) runs vmap with an outer backward."""
    models = [model_for(task, seed=s, dropout=0.0, positional=positional) for s in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    batches = [task.sample(4, generator=task.generator(s)) for s in range(3)]
    tokens = torch.stack([b.tokens for b in batches])
    selected = [Targets.select(b.targets, b.loss_mask) for b in batches]
    rows, cols, ids = (
        torch.stack([getattr(t, k) for t in selected]) for k in ("rows", "cols", "tokens")
    )

    def loss(p, b, x, r, c, y):
        out = torch.func.functional_call(models[0], (p, b), (x,))
        return loss_of_output(out, Targets(r, c, y))

    losses = torch.vmap(loss)(params, buffers, tokens, rows, cols, ids)
    grads = torch.vmap(torch.func.grad(loss))(params, buffers, tokens, rows, cols, ids)
    for i, model in enumerate(models):
        separate = loss_of_output(model(batches[i].tokens), selected[i])
        torch.testing.assert_close(losses[i], separate)
        separate.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_finite_run_trains_on_the_same_strings_as_the_cpu_run(tmp_path):
    task = SymbolTemplateTask(**SMALL_TEMPLATES)
    args = {**TEMPLATE_MODEL, "d_model": 32, "kq_identity": True, "n_outputs": 1}
    config = replace(FINITE, epochs=30)
    cpu = train(build_model(TRANSFORMER, task, **args), task, config, run_in(tmp_path, "cpu"))
    model = build_model(TRANSFORMER, task, **args)
    gpu = train(model, task, replace(config, device="cuda"), run_in(tmp_path, "gpu"))
    assert next(model.parameters()).is_cuda
    assert gpu["step"] == cpu["step"] and gpu["untrained_rows"]["unchanged"]
    # the same training strings, init and batch order; float differences stay small
    assert gpu["final"]["train_mse"] == pytest.approx(cpu["final"]["train_mse"], abs=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_run_resumes(tmp_path, task):
    config = replace(TINY, device="cuda")
    straight = train(model_for(task), task, config, run_in(tmp_path, "a"))
    train(model_for(task), task, replace(config, steps=20), run_in(tmp_path, "b"))
    resumed = train(model_for(task), task, config, run_in(tmp_path, "b", resume=True))
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 40 and a["cuda_rng"] is not None
    # CUDA's embedding backward sums with atomics, so runs agree to rounding, not bit for bit
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], atol=1e-5, rtol=1e-4)
    assert straight["final"]["kl_last"] == pytest.approx(resumed["final"]["kl_last"], abs=1e-4)
