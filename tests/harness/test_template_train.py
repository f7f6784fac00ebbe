"""Template training protocol, untouched unseen-symbol embeddings, regression scores, sweep."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from iclgym.harness.regression import evaluate_regression, expected_value, nearest_label
from iclgym.harness.sweep import main as sweep_main
from iclgym.harness.template_train import (
    TemplateTrainConfig,
    build_template_model,
    train_template_model,
)
from iclgym.tasks.templates import SymbolTemplateTask

SMALL = {"train_alphabet_size": 16, "val_alphabet_size": 8, "test_alphabet_size": 32}
TINY = {"d_model": 16, "n_heads": 2, "mlp_width": 32, "eval_sequences": 200}


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_training_fits_and_leaves_unseen_embedding_rows_bit_identical(kind):
    task = SymbolTemplateTask(**SMALL)
    config = TemplateTrainConfig(model=kind, epochs=150, **TINY)
    result = train_template_model(task, config)
    model = result["model_object"]
    assert result["untrained_rows_checked"] and result["steps"] == 150
    assert result["n_train"] == 16 and result["batch_size"] == 16
    assert result["train_mse"] < 0.05, result
    initial = build_template_model(task, config)  # same seed: the initial weights
    start = task.alphabets["validation"][0]
    if kind == "mlp":
        rows = lambda m: m.embed.weight.view(task.seq_len, task.vocab_size, -1)[:, start:]  # noqa: E731
    else:
        rows = lambda m: m.embed.weight[start:]  # noqa: E731
    assert torch.equal(rows(model), rows(initial))
    train_start = task.alphabets["train"][0]
    assert not torch.equal(
        model.embed.weight[train_start:start], initial.embed.weight[train_start:start]
    )
    for split in ("val", "test"):
        assert 0.0 <= result[f"{split}_accuracy"] <= 1.0 and result[f"{split}_mse"] > 0
    assert result["error"] == result["test_mse"]


def test_classification_and_copy_labels_train_with_cross_entropy():
    task = SymbolTemplateTask(preset="same_different", label_type="classification", **SMALL)
    result = train_template_model(task, TemplateTrainConfig(epochs=150, **TINY))
    assert result["train_accuracy"] == 1.0 and result["error"] == 1.0 - result["test_accuracy"]
    copy = SymbolTemplateTask(preset="copy", label_type="multiclass", **SMALL)
    result = train_template_model(copy, TemplateTrainConfig(epochs=2, vo_identity=True, **TINY))
    assert not result["untrained_rows_checked"]  # a tied unembedding trains every row
    assert result["model"] == "transformer+vo"


def test_config_validation():
    with pytest.raises(ValueError, match="model='rnn'"):
        TemplateTrainConfig(model="rnn")
    with pytest.raises(ValueError, match="transformer options"):
        TemplateTrainConfig(model="mlp", kq_identity=True)
    with pytest.raises(ValueError, match="lr="):
        TemplateTrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="device='gpu0'"):
        TemplateTrainConfig(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            TemplateTrainConfig(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_trains_on_the_same_strings_as_the_cpu_run():
    task = SymbolTemplateTask(**SMALL)
    config = TemplateTrainConfig(d_model=32, n_heads=2, mlp_width=64, epochs=30, kq_identity=True)
    cpu = train_template_model(task, config)
    gpu = train_template_model(task, replace(config, device="cuda"))
    assert next(gpu["model_object"].parameters()).is_cuda
    assert gpu["n_train"] == cpu["n_train"] and gpu["steps"] == cpu["steps"]
    assert gpu["untrained_rows_checked"]
    # the same data and init; float differences between the devices stay small
    assert gpu["train_mse"] == pytest.approx(cpu["train_mse"], abs=0.05)


def test_regression_helpers():
    values = torch.tensor([float("nan"), -1.0, 1.0, float("nan")])
    log_q = torch.tensor([[0.0, 0.25, 0.75, 0.0]]).clamp_min(1e-30).log()
    assert expected_value(log_q, values).item() == pytest.approx(0.5)
    assert nearest_label(torch.tensor([0.2, -0.1, 3.0]), values).tolist() == [1.0, -1.0, 1.0]
    task = SymbolTemplateTask(**SMALL)
    zero = evaluate_regression(lambda b: torch.zeros(b.batch_size), task, num_sequences=500)
    assert zero["mse"] == 1.0 and zero["chance_mse"] == pytest.approx(1.0, abs=0.02)


def test_sweep_writes_json_table_and_png(tmp_path, capsys):
    out = tmp_path / "sweep"
    sweep_main(
        [
            "--models",
            "mlp",
            "transformer+kq",
            "--widths",
            "32",
            "--ns",
            "8",
            "16",
            "--seeds",
            "0",
            "1",
            "--epochs",
            "2",
            "--eval-sequences",
            "50",
            "--out",
            str(out),
        ]
    )
    records = json.loads((out / "sweep.json").read_text())
    assert len(records) == 8 and {r["model"] for r in records} == {"mlp", "transformer+kq"}
    assert {r["n"] for r in records} == {8, 16} and all(r["n_train"] == r["n"] for r in records)
    table = (out / "sweep.txt").read_text()
    assert "transformer+kq" in table and "n=16" in table
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_resume_trains_only_missing_cells(tmp_path, capsys):
    out = tmp_path / "sweep"
    common = ["--models", "transformer", "--widths", "32", "--ns", "8", "--epochs", "2"]
    common += ["--eval-sequences", "50", "--out", str(out)]
    first = sweep_main([*common, "--seeds", "0"])
    both = sweep_main([*common, "--seeds", "0", "1", "--resume"])
    assert len(first) == 1 and len(both) == 2
    assert both[0] == json.loads(json.dumps(first[0]))  # seed 0 read back, not retrained
    assert [r["config"]["seed"] for r in both] == [0, 1]
    assert "in sweep.json" in capsys.readouterr().out
    again = sweep_main([*common, "--seeds", "0", "1", "--resume"])
    assert again == json.loads(json.dumps(both))  # nothing retrained
    assert len(json.loads((out / "sweep.json").read_text())) == 2


def test_sweep_over_widths_at_one_n_plots_error_against_width(tmp_path, monkeypatch):
    import matplotlib.axes

    xlabels = []
    original = matplotlib.axes.Axes.set_xlabel
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "set_xlabel",
        lambda ax, text, *a, **k: xlabels.append(text) or original(ax, text, *a, **k),
    )
    out = tmp_path / "widths"
    args = ["--models", "transformer", "--widths", "32", "64", "--ns", "8", "--seeds", "0"]
    sweep_main([*args, "--epochs", "1", "--eval-sequences", "20", "--out", str(out)])
    assert xlabels and xlabels[-1].startswith("embedding width D (n = 8")
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
