"""The iclgym command: list, describe, eval, train (any model by name or import path, recipes,
the run-folder lock), sweep, and one-line errors with exit status 2 for every mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from iclgym.cli import main
from iclgym.harness.train import run_lock


def test_list_and_describe(capsys):
    assert main(["list"]) == 0
    assert "ICL-MarkovChain-v0" in capsys.readouterr().out
    assert main(["describe", "ICL-NGram-v0"]) == 0
    assert "trigram" in capsys.readouterr().out


def test_describe_takes_spec_overrides(capsys):
    """Some named splits exist only for some specs: `describe --set` lists them (reported:
    `eval --split` pointed at describe, which had no way to show ood_heldout_concepts)."""
    assert main(["describe", "ICL-MultiConcept-v0"]) == 0
    assert "ood_heldout_concepts" not in capsys.readouterr().out
    assert main(["describe", "ICL-MultiConcept-v0", "--set", "heldout_concepts=2"]) == 0
    out = capsys.readouterr().out
    assert "ood_heldout_concepts" in out and "heldout_concepts=2" in out
    assert main(["describe", "ICL-MultiConcept-v0", "--set", "heldout_concepts=9"]) == 2


def test_list_imports_no_torch():
    code = (
        "import sys\nfrom iclgym.cli import main\nmain(['list'])\nassert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_eval_json_is_always_a_list_and_the_table(capsys):
    args = ["eval", "ICL-MarkovChain-v0", "--num-sequences", "64", "--set", "num_states=2"]
    assert main([*args, "--predictor", "ngram:2", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert isinstance(reports, list) and len(reports) == 1
    report = reports[0]
    assert report["task"]["num_states"] == 2 and report["predictor"] == "ngram:2"
    assert report["oracle"] and report["oracle_mc_error"] >= 0
    assert main([*args, "--predictor", "ngram:0", "--predictor", "oracle", "--json"]) == 0
    uniform, oracle = json.loads(capsys.readouterr().out)
    assert uniform["cross_entropy"] == pytest.approx(0.693147, abs=1e-5)  # ngram:0 = uniform
    assert oracle["excess_loss"] == pytest.approx(0.0, abs=1e-6)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "oracle" in out and "unigram" in out and "Monte-Carlo error" in out
    # What confuses a newcomer is said on the screen where it confuses.
    assert "order=2 is the n-gram order" in out and "a first-order chain" in out
    true_row = next(line for line in out.splitlines() if line.startswith("true*"))
    assert float(true_row.split()[2]) < 0  # its excess loss, explained by the footnote:
    assert "* true: reads each sequence's hidden parameters" in out


def strict_loads(text: str) -> object:
    """json.loads that refuses NaN and Infinity (not JSON: jq and JavaScript reject them)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "env_id", ["ICL-PriorityGraph-v0", "ICL-SparseContextualBigram-v0", "ICL-MultiConcept-v0"]
)
def test_eval_json_is_strict_with_one_sequence(env_id, capsys):
    """One sequence has no standard error (NaN): the JSON says null, as `iclgym regret`'s."""
    assert main(["eval", env_id, "--num-sequences", "1", "--json"]) == 0
    reports = strict_loads(capsys.readouterr().out)
    assert all(r["excess_loss_se"] is None and r["cross_entropy"] >= 0 for r in reports)


def test_eval_reports_mse_for_real_valued_labels(capsys):
    args = ["eval", "ICL-SymbolTemplate-v0", "--num-sequences", "200", "--json"]
    assert main([*args, "--predictor", "oracle", "--predictor", "template_prior"]) == 0
    oracle, prior = json.loads(capsys.readouterr().out)
    assert oracle["mse"] == 0.0 and oracle["value_accuracy"] == 1.0  # exact template matching
    assert prior["mse"] == 1.0  # predicts 0 against +-1
    assert main(["eval", "ICL-MarkovChain-v0", "--num-sequences", "8", "--json"]) == 0
    assert all(r["mse"] is None for r in json.loads(capsys.readouterr().out))


# -------------------------------------------------------------- one-line errors, exit 2
def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "garbage": tmp_path / "garbage.pt",
        "text": tmp_path / "text.pt",
        "empty": tmp_path / "empty.pt",
        "foreign": tmp_path / "foreign.pt",
    }
    files["garbage"].write_bytes(bytes(range(256)) * 4)
    files["text"].write_text("not a checkpoint\n")
    files["empty"].write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, files["foreign"])
    return files


def error_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    files = bad_files(tmp_path)
    markov = ["eval", "ICL-MarkovChain-v0", "--num-sequences", "8"]
    train = ["train", "ICL-MarkovChain-v0", "--steps", "1", "--out", str(tmp_path / "run")]
    cases = [
        (
            [*markov, "--set", "bogus=1"],
            "spec key 'bogus' is invalid for ICL-MarkovChain-v0: "
            "expected one of num_states, order, seq_len",
        ),
        ([*markov, "--set", "alpha=-1"], "alpha=-1"),
        (
            [*markov, "--predictor", "ngram:200"],
            r"order=200 is invalid: expected an int in [0, 35]",
        ),
        ([*markov, "--predictor", "ngram:2:inf"], "alpha=inf is invalid: expected a float in"),
        ([*markov, "--predictor", "ngram:2:1e-301"], "alpha=1e-301 is invalid"),
        ([*markov, "--predictor", "ngram:x"], "expected ngram:ORDER[:ALPHA]"),
        ([*markov, "--predictor", "magic"], "unknown predictor 'magic': use 'oracle'"),
        ([*markov, "--predictor", f"checkpoint:{tmp_path / 'missing.pt'}"], "does not exist"),
        ([*markov, "--split", "holdout"], "split='holdout' is invalid for MarkovChainTask"),
        ([*markov, "--num-sequences", "0"], "num_sequences=0 is invalid"),
        (["eval"], "ENV_ID"),
        (["eval", "ICL-Nope-v0"], "unknown iclgym env id 'ICL-Nope-v0'"),
        ([*train, "--recipe", "nope"], "recipe='nope' is invalid: expected one of edelman2024"),
        ([*train, "--model", "rnn"], "model='rnn' is invalid: expected one of transformer"),
        (
            [*train, "--model", "no.such.module:make"],
            "import path 'no.such.module:make' does not resolve",
        ),
        ([*train, "--model", "baselines.mlp"], "model='baselines.mlp' is invalid"),
        ([*train, "--model", "baselines.mlp:nothing"], "'baselines.mlp' has no attribute"),
        ([*train, "--model", "mlp"], "model reads future tokens"),
        ([*train, "--model-arg", "colour=3"], "does not take the arguments ['colour']"),
        ([*train, "--model-arg", "d_model"], "--model-arg expects KEY=VALUE"),
        ([*train, "--optimizer", "rmsprop"], "optimizer='rmsprop' is invalid: expected one of"),
        ([*train, "--optimizer", "torch.optim:Nope"], "does not resolve"),
        ([*train, "--steps", "many"], "--steps: invalid literal for int()"),
        ([*train, "--lr", "0"], "lr=0.0 is invalid"),
        ([*train, "--colour", "red"], "Unrecognized options: --colour"),
        (["train"], "an env id is needed"),
        (["sweep", "--seed", "3"], "--seed is not a sweep option"),
        (["speed", "--seconds", "0"], "seconds=0.0 is invalid"),
        (["fly"], "command 'fly' is invalid: expected one of list"),
    ]
    for kind in ("garbage", "text", "empty"):
        cases.append(
            (
                [*markov, "--predictor", f"checkpoint:{files[kind]}"],
                "is not a readable torch checkpoint",
            )
        )
    cases.append(
        (
            [*markov, "--predictor", f"checkpoint:{files['foreign']}"],
            "is not an iclgym training checkpoint",
        )
    )
    if not torch.cuda.is_available():
        for command in (markov, train):
            cases.append(
                (
                    [*command, "--device", "cuda"],
                    "device='cuda' is invalid: CUDA is not available on this machine",
                )
            )
    return cases


def test_every_mistake_is_one_line_and_exit_status_2(tmp_path, capsys):
    for argv, expected in error_cases(tmp_path):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, captured.err)
        assert expected in lines[0], (argv, lines[0])
        assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing was trained


def test_errors_as_a_real_process_have_no_traceback(tmp_path):
    files = bad_files(tmp_path)
    for argv in (
        ["eval", "ICL-MarkovChain-v0", "--predictor", f"checkpoint:{files['garbage']}"],
        ["train", "ICL-MarkovChain-v0", "--set", "bogus=1", "--out", str(tmp_path / "r")],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "iclgym.cli", *argv], capture_output=True, text=True
        )
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_alpha_inside_the_range_is_computed_not_refused(capsys):
    for alpha in ("1e-50", "1e300"):
        argv = [
            "eval",
            "ICL-MarkovChain-v0",
            "--num-sequences",
            "16",
            "--json",
            "--predictor",
            f"ngram:2:{alpha}",
        ]
        assert main(argv) == 0
        (report,) = json.loads(capsys.readouterr().out)
        assert report["cross_entropy"] == pytest.approx(report["cross_entropy"])  # not NaN


# --------------------------------------------------- train: models by name and by path
class GRUModel(nn.Module):
    """A user's model, defined here and given to ``iclgym train`` by import path."""

    def __init__(self, vocab_size: int, seq_len: int, hidden: int = 16, values: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1 if values else vocab_size)

    def forward(self, tokens):
        states, _ = self.gru(self.embed(tokens))
        return self.head(states)


def make_gru(vocab_size: int, seq_len: int, hidden: int = 16, values: bool = False) -> GRUModel:
    return GRUModel(vocab_size, seq_len, hidden, values)


@pytest.mark.parametrize(
    ("env_id", "flags", "model_args"),
    [
        (
            "ICL-MarkovChain-v0",
            ["--set", "seq_len=24", "--steps", "30", "--eval-every", "10"],
            ["--model-arg", "hidden=12"],
        ),
        (
            "ICL-SymbolTemplate-v0",
            [
                "--set",
                "train_alphabet_size=16",
                "--data",
                "finite",
                "--epochs",
                "40",
                "--optimizer",
                "adam",
                "--lr",
                "0.01",
                "--weight-decay",
                "0",
                "--eval-every",
                "0",
                "--eval-splits",
                "validation",
                "test",
            ],
            ["--model-arg", "values=True"],
        ),
    ],
)
def test_train_a_user_model_by_import_path_and_evaluate_it(
    tmp_path, capsys, env_id, flags, model_args
):
    out = tmp_path / "gru"
    argv = [
        "train",
        env_id,
        "--model",
        f"{__name__}:make_gru",
        *model_args,
        *flags,
        "--batch-size",
        "16",
        "--eval-sequences",
        "64",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"{env_id}: " in printed and "run folder" in printed
    summary = json.loads((out / "summary.json").read_text())
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["model"]["factory"]["factory"] == f"{__name__}:make_gru"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["type"] == "eval"]
    key = "train_loss" if "train_loss" in evals[-1] else "loss"  # finite regime: its own set
    assert evals[-1][key] < evals[0][key]  # it learned something
    if env_id == "ICL-SymbolTemplate-v0":
        assert summary["model_output"] == "values" and "test_mse" in summary["final"]
        assert summary["untrained_rows"] is None  # the GRU exposes no input_embedding hook
    ev = ["eval", env_id, "--predictor", f"checkpoint:{out}", "--num-sequences", "64", "--json"]
    if env_id == "ICL-MarkovChain-v0":
        ev += ["--set", "seq_len=24"]
    else:
        ev += ["--set", "train_alphabet_size=16"]
    assert main(ev) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["predictor"] == f"checkpoint:{out}"
    if env_id == "ICL-MarkovChain-v0":
        assert report["kl_last"] < 0.5 and report["excess_loss"] > 0
    else:
        assert report["mse"] is not None and report["cross_entropy"] is None


def test_train_by_name_with_a_recipe_and_flags_that_override_it(tmp_path, capsys):
    out = tmp_path / "lstm"
    argv = [
        "train",
        "--recipe",
        "edelman2024",
        "--model",
        "lstm",
        "--model-arg",
        "hidden_size=8",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--eval-sequences",
        "32",
        "--set",
        "seq_len=20",
        "--no-progress",
        "--no-plot",
        "--out",
        str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["task"]["env_id"] == "ICL-MarkovChain-v0"
    assert start["task"]["spec"]["seq_len"] == 20 and start["task"]["spec"]["num_states"] == 3
    assert start["model"]["factory"] == {
        "factory": "baselines.lstm:make_model",
        "args": {"hidden_size": 8},  # the recipe's transformer arguments do not apply
        "vocab_size": 3,
        "seq_len": 20,
    }
    config = start["train_config"]
    assert (config["lr"], config["eval_every"], config["optimizer"]) == (5e-4, 2, "adamw")
    # the value head of boix2023 carries over to another model that takes n_outputs
    out = tmp_path / "mlp"
    argv = [
        "train",
        "--recipe",
        "boix2023",
        "--model",
        "mlp",
        "--set",
        "train_alphabet_size=8",
        "--epochs",
        "2",
        "--eval-sequences",
        "16",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["model"]["factory"]["args"] == {"n_outputs": 1}
    assert start["model_output"] == "values"


def test_a_second_train_into_a_locked_run_folder_refuses(tmp_path, capsys):
    out = tmp_path / "busy"
    argv = ["train", "ICL-MarkovChain-v0", "--steps", "2", "--out", str(out), "--no-progress"]
    with run_lock(out):
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run folder") and "in use by another training process" in err
    assert main(argv) == 0  # free again


def test_sweep_subcommand_runs_a_grid(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sweep", "--recipe", "boix2023-mlp", "--ns", "8", "--seeds", "0", "--epochs", "1"]
    assert main([*args, "--eval-sequences", "20", "--out", str(out)]) == 0
    assert "median test MSE" in capsys.readouterr().out
    assert (out / "sweep.txt").is_file() and (out / "sweep.png").is_file()
    assert (
        main(
            [
                "sweep",
                "--recipe",
                "boix2023",
                "--set",
                "preset=nope",
                "--ns",
                "8",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "preset='nope'" in capsys.readouterr().err
