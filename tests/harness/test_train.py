"""Unit tests of the training harness: config and CLI, resume, Ctrl-C, errors, probes, phases,
plots. Runs are tiny (small batches and held-out sets) so the file takes seconds."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from baselines.transformer import load_predictor
from iclgym.harness.phases import persistent_switch_step, phase_report, phases, plateaus
from iclgym.harness.plots import plot_run
from iclgym.harness.probes import induction_score, previous_token_score
from iclgym.harness.train import (
    TrainConfig,
    add_dataclass_arguments,
    add_train_arguments,
    build_model,
    main,
    run_from_args,
    train,
)
from iclgym.registry import make_task

TINY = dict(
    steps=40,
    batch_size=8,
    eval_every=10,
    eval_sequences=48,
    eval_batch_size=32,
    checkpoint_every=10,
    progress=False,
    plot=False,
)


@pytest.fixture(scope="module")
def task():
    return make_task("ICL-MarkovChain-v0", seq_len=32)


def tiny_config(tmp_path, name="run", **kwargs) -> TrainConfig:
    return TrainConfig(**{**TINY, "run_dir": str(tmp_path / name), **kwargs})


def read_log(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------- training
def test_train_logs_evaluations_checkpoint_summary_and_plot(tmp_path, task):
    config = tiny_config(tmp_path, plot=True)
    summary = train(build_model(task, 0), task, config)
    log = read_log(config.run_dir)
    assert log[0]["type"] == "start" and log[0]["num_parameters"] == summary["num_parameters"]
    evals = [r for r in log if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    assert [r["sequences"] for r in evals] == [0, 80, 160, 240, 320]
    for rec in evals:
        assert set(rec["strategy_kl_last"]) == {"uniform", "unigram", "bigram"}
        assert rec["nearest"] == min(rec["strategy_kl_last"], key=rec["strategy_kl_last"].get)
        assert 0 <= rec["prev_token_score"] <= 1 and 0 <= rec["induction_score"] <= 1
        assert rec["loss"] > 0 and rec["kl_last"] > 0
    assert evals[0]["nearest"] == "uniform"  # an untrained model predicts about uniformly
    assert log[-1]["type"] == "summary" and summary["final"] == evals[-1]
    refs = summary["references"]
    assert refs["uniform"] > refs["unigram"] > refs["bigram"] > 0
    assert summary["switch_step"] is None or summary["switch_step"] in {0, 10, 20, 30, 40}
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 40
    model = load_predictor(config.run_dir, task)  # what `iclgym eval --predictor checkpoint:` uses
    batch = task.sample(4, generator=task.generator(0, "test"))
    assert model.predict(batch).shape == (4, 32, 3)


def test_training_learns_the_unigram_phase(tmp_path, task):
    config = tiny_config(
        tmp_path, steps=150, batch_size=32, eval_every=150, eval_sequences=256, eval_batch_size=256
    )
    train(build_model(task, 0), task, config)
    first, last = [r for r in read_log(config.run_dir) if r["type"] == "eval"]
    assert last["kl_last"] < first["kl_last"] - 0.05
    assert last["nearest"] == "unigram"


def test_resume_gives_bit_identical_weights(tmp_path, task):
    straight = train(build_model(task, 0), task, tiny_config(tmp_path, "straight"))
    train(build_model(task, 0), task, tiny_config(tmp_path, "split", steps=20))
    resumed = train(build_model(task, 0), task, tiny_config(tmp_path, "split", resume=True))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    assert_same_state(a["model"], b["model"])
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert_same_state(sa, sb)
    assert torch.equal(a["data_rng"], b["data_rng"]) and torch.equal(a["torch_rng"], b["torch_rng"])
    assert straight["final"]["kl_last"] == resumed["final"]["kl_last"]
    evals = [r for r in read_log(tmp_path / "split") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]


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
    train(build_model(task, 0), task, tiny_config(tmp_path, "straight"))
    config = tiny_config(tmp_path, "interrupted", checkpoint_every=1000)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 13"):
        train(build_model(task, 0), InterruptingTask(task, 13, TINY["batch_size"]), config)
    state = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 13  # the step in flight was finished, then saved
    log = read_log(config.run_dir)
    assert log[-1]["type"] == "summary" and log[-1]["interrupted"]
    assert [r["step"] for r in log if r["type"] == "eval"] == [0, 10, 13]
    batch = task.sample(2, generator=task.generator(1))
    assert load_predictor(config.run_dir, task).predict(batch).shape == (2, 32, 3)
    train(build_model(task, 0), task, replace(config, resume=True))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)
    assert_same_state(a["model"], b["model"])


# ------------------------------------------------------------------- failing early
def test_bad_input_fails_before_training(tmp_path, task):
    config = tiny_config(tmp_path, steps=10)
    with pytest.raises(ValueError, match="vocab_size=4 does not match the task's vocab_size=3"):
        train(build_model(make_task("ICL-MarkovChain-v0", num_states=4), 0), task, config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="does not exist"):
        train(build_model(task, 0), task, replace(config, resume=True))
    train(build_model(task, 0), task, config)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="exists: pass resume=True"):
        train(build_model(task, 0), task, config)
    with pytest.raises(ValueError, match=r"train_config.lr: checkpoint 0.0005 != now 0.001"):
        train(build_model(task, 0), task, replace(config, resume=True, steps=20, lr=1e-3))
    with pytest.raises(ValueError, match=r"model_config.d_model: checkpoint 16 != now 32"):
        train(build_model(task, 0, d_model=32), task, replace(config, resume=True, steps=20))
    other = make_task("ICL-MarkovChain-v0", seq_len=32, alpha=0.5)
    with pytest.raises(ValueError, match=r"task.spec: checkpoint"):
        train(build_model(other, 0), other, replace(config, resume=True, steps=20))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(ValueError, match="vocab_size=3, but the task has vocab_size=4"):
        load_predictor(tmp_path / "run", make_task("ICL-MarkovChain-v0", num_states=4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"seed": -1}, "seed"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


# ------------------------------------------------------------------------ command line
def test_dataclass_arguments_mirror_the_fields():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    args = parser.parse_args(["--steps", "5", "--betas", "0.8", "0.9", "--no-plot"])
    assert (args.steps, args.betas, args.plot, args.lr) == (5, [0.8, 0.9], False, 5e-4)
    assert "AdamW learning rate" in parser.format_help()


def test_cli_trains_a_model(tmp_path, capsys):
    run_dir = tmp_path / "cli"
    argv = shlex.split(
        "ICL-MarkovChain-v0 --set num_states=2 --set seq_len=24 --positional rotary --n-heads 2 "
        "--mlp --steps 6 --batch-size 4 --eval-every 3 --eval-sequences 16 --no-progress "
        "--no-plot"
    )
    main([*argv, "--run-dir", str(run_dir)])
    assert "ICL-MarkovChain-v0: 6 steps" in capsys.readouterr().out
    start = read_log(run_dir)[0]
    assert start["task"]["spec"]["num_states"] == 2
    assert start["model_config"]["positional"] == "rotary" and start["model_config"]["mlp"]
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    with pytest.raises(ValueError, match="positional='alibi'"):
        run_from_args(
            parser.parse_args(
                ["ICL-MarkovChain-v0", "--positional", "alibi", "--run-dir", str(tmp_path / "bad")]
            )
        )
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        main(["ICL-MarkovChain-v0", "--n-heads", "3", "--run-dir", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        main(["ICL-MarkovChain-v0", "--set", "num_states", "--run-dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------- probes
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


# ---------------------------------------------------------------------------- phases
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
