"""The iclgym command: list, describe, eval (table and JSON), errors."""

from __future__ import annotations

import json

from iclgym.cli import main


def test_list_and_describe(capsys):
    assert main(["list"]) == 0
    assert "ICL-MarkovChain-v0" in capsys.readouterr().out
    assert main(["describe", "ICL-NGram-v0"]) == 0
    assert "trigram" in capsys.readouterr().out


def test_eval_json_and_table(capsys):
    args = ["eval", "ICL-MarkovChain-v0", "--num-sequences", "64", "--set", "num_states=2"]
    assert main([*args, "--predictor", "ngram:2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"]["num_states"] == 2 and abs(report["excess_loss"]) < 1e-6
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "oracle" in out and "unigram" in out


def test_eval_bad_input_exits_2(capsys):
    assert main(["eval", "ICL-MarkovChain-v0", "--set", "alpha=-1"]) == 2
    assert "alpha=-1" in capsys.readouterr().err
    assert main(["eval", "ICL-MarkovChain-v0", "--predictor", "magic"]) == 2


def test_sweep_subcommand_runs_a_grid(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sweep", "--models", "mlp", "--ns", "8", "--seeds", "0", "--epochs", "1"]
    assert main([*args, "--eval-sequences", "20", "--out", str(out)]) == 0
    assert "median test MSE" in capsys.readouterr().out
    assert (out / "sweep.txt").is_file() and (out / "sweep.png").is_file()
    assert main(["sweep", "--set", "preset=nope", "--ns", "8", "--out", str(out)]) == 2


def test_eval_reports_mse_for_real_valued_labels(capsys):
    args = ["eval", "ICL-SymbolTemplate-v0", "--num-sequences", "200", "--json"]
    assert main([*args, "--predictor", "oracle"]) == 0
    assert json.loads(capsys.readouterr().out)["mse"] == 0.0  # exact template matching
    assert main([*args, "--predictor", "template_prior"]) == 0
    assert json.loads(capsys.readouterr().out)["mse"] == 1.0  # predicts 0 against +-1
    assert main(["eval", "ICL-MarkovChain-v0", "--num-sequences", "8", "--json"]) == 0
    assert all("mse" not in r for r in json.loads(capsys.readouterr().out))
