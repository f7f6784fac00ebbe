"""Many seeds in one process (issue 9 item 5): every copy equals its separate single-seed run,
resume and Ctrl-C, per-seed folders that ``iclgym eval`` reads, failing early; and the pieces it
rests on: stacked copies under vmap and vmap(grad), per-copy dropout and losses (the
attention function and the dropout law themselves: ``tests/baselines/test_relative_attention.py``).

Equality tolerance: weights and optimiser moments to atol 1e-5 (float32 runs of 40-60 steps
differ by about 1e-7: the vectorised kernels sum in another order), evaluation metrics to a
relative 1e-5."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from baselines.transformer import (
    Transformer,
    TransformerConfig,
)
from iclgym.cli import main
from iclgym.harness import RECIPES, build_model, evaluate, load_model, load_predictor
from iclgym.harness.model import ModelPredictor
from iclgym.harness.multiseed import Copies, copy_losses
from iclgym.harness.train import (
    FiniteData,
    RunOptions,
    Targets,
    TrainConfig,
    format_seeds,
    loss_of_output,
    parse_seeds,
    train,
)
from iclgym.registry import make_task
from iclgym.tasks.templates import SymbolTemplateTask

TRANSFORMER = "baselines.transformer:make_model"
RECIPE = RECIPES["edelman2024"]
# the edelman2024 model without dropout, on the recipe's task; short runs of small batches
MARKOV_MODEL = {**RECIPE.model_args, "dropout": 0.0}
MARKOV = replace(
    RECIPE.train,
    steps=40,
    batch_size=16,
    eval_every=20,
    eval_sequences=64,
    eval_batch_size=64,
    grad_clip=0.5,  # per-copy clipping is part of what must match
)
QUIET = RunOptions(checkpoint_every=20, progress=False, plot=False)
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
    "n_outputs": 1,
}
FINITE = TrainConfig(
    data="finite",
    epochs=40,
    batch_size=6,  # 16 strings: batches of 6, 6, 4
    optimizer="adam",
    lr=1e-3,
    betas=(0.9, 0.999),
    weight_decay=0.0,
    eval_every=20,
    eval_sequences=40,
    eval_batch_size=40,
    eval_splits=("validation", "test"),
)
METRICS = ("loss", "kl_last", "accuracy", "batch_loss", "prev_token_score", "induction_score")
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(scope="module")
def markov():
    return make_task(RECIPE.env_id, **RECIPE.spec)


def run_in(tmp_path, name, **kwargs) -> RunOptions:
    return replace(QUIET, out=str(tmp_path / name), **kwargs)


def read_log(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def checkpoint(folder) -> dict:
    return torch.load(Path(folder) / "checkpoint.pt", weights_only=True)


def assert_same_run(single: Path, copy_folder: Path) -> None:
    """A copy of a multi-seed run equals the separate run: weights, optimiser moments, data
    stream, and every evaluation record."""
    a, b = checkpoint(single), checkpoint(copy_folder)
    assert a["step"] == b["step"] and a["sequences"] == b["sequences"]
    assert a["meta"] == b["meta"]  # a single run's checkpoint: resumable on its own
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], **TOLERANCE)
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], **TOLERANCE)
    assert torch.equal(a["data"]["rng"], b["data"]["rng"])  # the same batches were drawn
    evals_a = [r for r in read_log(single) if r["type"] == "eval"]
    evals_b = [r for r in read_log(copy_folder) if r["type"] == "eval"]
    assert [r["step"] for r in evals_a] == [r["step"] for r in evals_b]
    for ra, rb in zip(evals_a, evals_b, strict=True):
        for key in METRICS + tuple(k for k in ra if k.startswith(("val_", "test_", "train_"))):
            if ra.get(key) is None:
                assert rb.get(key) is None, key
            else:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (key, ra["step"])
        assert ra.get("nearest") == rb.get("nearest")


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("positional", ["relative", "rotary", "learned"])
def test_vectorised_copies_match_each_copy_with_vmap_and_vmap_grad(positional):
    """The relative path's vmap rule (copies folded into the chunked function) and the other
    positional schemes: outputs and gradients of stacked copies equal each copy's own."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(Transformer(TransformerConfig(3, 30, dropout=0.0, positional=positional)))
    copies = Copies(models)
    tokens = torch.randint(0, 3, (3, 20, 30), generator=torch.Generator().manual_seed(4))
    out = copies(tokens)
    out.square().sum().backward()

    def loss(p, b, x):
        return torch.func.functional_call(models[0], (p, b), (x,)).square().sum()

    grads = torch.vmap(torch.func.grad(loss))(copies.params, copies.buffers, tokens)
    for n, model in enumerate(models):  # the template keeps its own weights: any copy works
        own = model(tokens[n])
        torch.testing.assert_close(out[n], own, rtol=1e-5, atol=1e-6)
        own.square().sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(copies.params[name].grad[n], p.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(grads[name][n], p.grad, rtol=1e-4, atol=1e-5)


def test_copies_draw_their_own_dropout_and_agree_without_it():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=3, max_len=50))  # dropout 0.1
    copies = Copies([model, copy.deepcopy(model)])  # two identical copies
    tokens = torch.randint(0, 3, (8, 50))
    train_out = copies(tokens)
    assert (train_out[0] - train_out[1]).abs().max() > 1e-3  # different masks
    copies.train(False)
    with torch.no_grad():
        eval_out = copies(tokens)
    torch.testing.assert_close(eval_out[0], eval_out[1], rtol=0, atol=0)


def test_copy_losses_equal_the_single_loss_per_copy():
    out = torch.randn(3, 4, 6, 5)
    targets = []
    for n in range(3):
        mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(n)) < 0.5 + 0.2 * n
        targets.append(Targets.select(torch.randint(0, 5, (4, 6)), mask))
    losses = copy_losses(out, targets)  # copies score different numbers of positions
    for n in range(3):
        torch.testing.assert_close(losses[n], loss_of_output(out[n], targets[n]))
    values = torch.tensor([0.0, -1.0, 1.0, 0.5, 2.0])
    value_targets = [replace(t, values=values[t.tokens]) for t in targets]
    mse = copy_losses(out[..., :1], value_targets)
    for n in range(3):
        torch.testing.assert_close(mse[n], loss_of_output(out[n, ..., :1], value_targets[n]))


# ------------------------------------------------------------ equality with single runs
def test_every_copy_equals_its_single_seed_run_on_the_markov_recipe(tmp_path, markov):
    """The edelman2024 model (relative positions) with dropout 0: AdamW with decoupled
    weight decay on the Linear weights, per-copy gradient clipping, probes."""
    seeds = (0, 3, 5)
    template = build_model(TRANSFORMER, markov, **MARKOV_MODEL)
    summary = train(template, markov, MARKOV, run_in(tmp_path, "multi", seeds="0,3,5"))
    assert summary["seeds"] == list(seeds) and len(summary["runs"]) == 3
    for n, seed in enumerate(seeds):
        model = build_model(TRANSFORMER, markov, seed=seed, **MARKOV_MODEL)
        single = train(model, markov, replace(MARKOV, seed=seed), run_in(tmp_path, f"s{seed}"))
        assert_same_run(tmp_path / f"s{seed}", tmp_path / "multi" / f"seed{seed}")
        assert summary["runs"][n]["final"]["kl_last"] == pytest.approx(single["final"]["kl_last"])
    finals = [r["final"]["loss"] for r in summary["runs"]]
    assert summary["final"]["loss"] == pytest.approx(sum(finals) / 3)
    assert summary["final_sd"]["loss"] > 0  # the seeds differ
    on_disk = json.loads((tmp_path / "multi" / "seeds.json").read_text())
    assert on_disk["switch_steps"] == summary["switch_steps"]


def test_template_finite_regime_copies_equal_their_single_runs(tmp_path):
    """Boix-Adserà protocol: bidirectional value model, learned positions, Adam, the task's own
    training set reshuffled per seed; the unseen-symbol embedding rows stay bit-identical."""
    task = SymbolTemplateTask(**SMALL_TEMPLATES)
    template = build_model(TRANSFORMER, task, **TEMPLATE_MODEL)
    summary = train(template, task, FINITE, run_in(tmp_path, "multi", seeds=(0, 1)))
    for seed in (0, 1):
        model = build_model(TRANSFORMER, task, seed=seed, **TEMPLATE_MODEL)
        train(model, task, replace(FINITE, seed=seed), run_in(tmp_path, f"s{seed}"))
        assert_same_run(tmp_path / f"s{seed}", tmp_path / "multi" / f"seed{seed}")
    assert summary["model_output"] == "values" and summary["untrained_rows"]["unchanged"]
    assert summary["step"] == 40 * 3


def test_per_copy_training_sets_and_sgd(tmp_path):
    """train_sequences > 0 draws each seed's own fixed set (one held-out train set per copy);
    SGD with momentum and L2 decay."""
    task = make_task("ICL-MarkovChain-v0", seq_len=24)
    config = TrainConfig(
        data="finite",
        train_sequences=20,
        epochs=6,
        batch_size=8,
        optimizer="sgd",
        momentum=0.9,
        lr=0.05,
        weight_decay=0.01,
        eval_every=5,
        eval_sequences=32,
        eval_batch_size=32,
    )
    args = {"dropout": 0.0, "positional": "rotary"}
    train(build_model(TRANSFORMER, task, **args), task, config, run_in(tmp_path, "m", seeds=(1, 2)))
    for seed in (1, 2):
        model = build_model(TRANSFORMER, task, seed=seed, **args)
        train(model, task, replace(config, seed=seed), run_in(tmp_path, f"s{seed}"))
        assert_same_run(tmp_path / f"s{seed}", tmp_path / "m" / f"seed{seed}")
    a, b = (FiniteData(task, replace(config, seed=s)).data.tokens for s in (1, 2))
    assert not torch.equal(a, b)  # the copies did train on different sets


def test_dropout_copies_train_like_their_single_runs(tmp_path, markov):
    """With dropout the copies draw other masks than their single runs (one joint stream), so
    they agree in distribution only: the same init and batches, and losses within the spread
    the masks make (measured: below 0.0015 at step 40 for the recipe model)."""
    config = replace(MARKOV, grad_clip=0.0)
    args = RECIPE.model_args  # dropout 0.1
    summary = train(
        build_model(TRANSFORMER, markov, **args),
        markov,
        config,
        run_in(tmp_path, "multi", seeds=(0, 1)),
    )
    for n, seed in enumerate((0, 1)):
        single = train(
            build_model(TRANSFORMER, markov, seed=seed, **args),
            markov,
            replace(config, seed=seed),
            run_in(tmp_path, f"s{seed}"),
        )
        a, b = single["final"], summary["runs"][n]["final"]
        assert a["loss"] != b["loss"]  # not the same masks
        assert abs(a["loss"] - b["loss"]) < 0.01
        assert abs(a["kl_last"] - b["kl_last"]) < 0.01
        first_a, first_b = (
            read_log(f)[1] for f in (tmp_path / f"s{seed}", tmp_path / "multi" / f"seed{seed}")
        )
        assert first_a["loss"] == pytest.approx(first_b["loss"], rel=1e-6)  # same init


# ----------------------------------------------------------- folders, resume, Ctrl-C
def test_seed_folders_are_single_run_folders(tmp_path, markov):
    run = run_in(tmp_path, "multi", seeds=(0, 1))
    config = replace(MARKOV, steps=10, eval_every=5)
    train(build_model(TRANSFORMER, markov, **MARKOV_MODEL), markov, config, run)
    folder = tmp_path / "multi" / "seed1"
    log = read_log(folder)
    assert log[0]["type"] == "start" and log[0]["train_config"]["seed"] == 1
    assert log[0]["seeds"] == {"seeds": [0, 1], "out": str(tmp_path / "multi")}
    assert [r["step"] for r in log if r["type"] == "eval"] == [0, 5, 10]
    summary = json.loads((folder / "summary.json").read_text())
    model = load_model(folder, markov)  # the trained weights of seed 1
    held = evaluate(
        ModelPredictor(model), markov, split="validation", num_sequences=64, batch_size=64
    )
    assert held.cross_entropy == pytest.approx(summary["final"]["loss"], rel=1e-5)
    with pytest.raises(ValueError, match=r"multi-seed run .* use one seed's folder"):
        load_predictor(tmp_path / "multi", markov)
    # a seed folder continues alone as a single run (dropout 0: the same trajectory)
    longer = replace(config, steps=20, seed=1)
    train(
        build_model(TRANSFORMER, markov, seed=1, **MARKOV_MODEL),
        markov,
        longer,
        replace(QUIET, out=str(folder), resume=True),
    )
    train(
        build_model(TRANSFORMER, markov, seed=1, **MARKOV_MODEL),
        markov,
        longer,
        run_in(tmp_path, "straight"),
    )
    assert_same_run(tmp_path / "straight", folder)


def test_multi_seed_resume_is_bit_identical(tmp_path, markov):
    template = build_model(TRANSFORMER, markov, **RECIPE.model_args)  # with dropout
    straight = train(template, markov, MARKOV, run_in(tmp_path, "straight", seeds=(0, 1)))
    train(template, markov, replace(MARKOV, steps=20), run_in(tmp_path, "split", seeds=(0, 1)))
    resumed = train(template, markov, MARKOV, run_in(tmp_path, "split", seeds=(0, 1), resume=True))
    a, b = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "split")
    assert a["step"] == b["step"] == 40
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    for ra, rb in zip(straight["runs"], resumed["runs"], strict=True):
        assert ra["final"] == {**rb["final"], "elapsed_s": ra["final"]["elapsed_s"]}
    log = read_log(tmp_path / "split" / "seed1")
    assert [r["step"] for r in log if r["type"] == "eval"] == [0, 20, 40]
    assert [r["type"] for r in log].count("resume") == 1
    with pytest.raises(ValueError, match=r"train_config.seeds: checkpoint \[0, 1\] != now"):
        train(
            template,
            markov,
            replace(MARKOV, steps=60),
            run_in(tmp_path, "split", seeds=(0, 2), resume=True),
        )
    with pytest.raises(ValueError, match="single run's: resume it without seeds"):
        train(
            template,
            markov,
            replace(MARKOV, steps=60),
            run_in(tmp_path, "split/seed0", seeds=(0, 1), resume=True),
        )


class InterruptingTask:
    """The wrapped task; a Ctrl-C (SIGINT) arrives while training batch ``at`` is drawn."""

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


def test_ctrl_c_saves_the_joint_checkpoint_and_resumes_exactly(tmp_path, markov):
    template = build_model(TRANSFORMER, markov, **RECIPE.model_args)
    train(template, markov, MARKOV, run_in(tmp_path, "straight", seeds=(0, 1)))
    run = run_in(tmp_path, "stopped", seeds=(0, 1), checkpoint_every=1000)
    task = InterruptingTask(markov, 2 * 13 + 1, MARKOV.batch_size)  # 2 draws per step
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 14"):
        train(template, task, MARKOV, run)
    assert checkpoint(tmp_path / "stopped")["step"] == 14
    for seed in (0, 1):
        log = read_log(tmp_path / "stopped" / f"seed{seed}")
        assert log[-1]["type"] == "summary" and log[-1]["interrupted"]
        assert [r["step"] for r in log if r["type"] == "eval"] == [0]  # none off schedule
    train(template, markov, MARKOV, replace(run, resume=True))
    a, b = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "stopped")
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name


# ---------------------------------------------------------------------- failing early
class ItemModel(nn.Module):
    """Reads a tensor value in Python (``.item()``): cannot run under vmap."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)

    def forward(self, tokens):
        out = self.embed(tokens)
        return out * 2 if out.sum().item() > 0 else out


def make_item_model(vocab_size: int, seq_len: int) -> ItemModel:
    return ItemModel(vocab_size, seq_len)


class Norm(nn.Module):
    """Embedding logits through a batch norm (``bn``) or scaled by a constant buffer."""

    def __init__(self, vocab_size: int, seq_len: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)
        self.bn = nn.BatchNorm1d(vocab_size) if batch_norm else None
        self.register_buffer("scale", torch.full((vocab_size,), 2.0))

    def forward(self, tokens):
        out = self.embed(tokens) * self.scale
        return out if self.bn is None else self.bn(out.transpose(1, 2)).transpose(1, 2)


def make_norm(vocab_size: int, seq_len: int, batch_norm: bool = True) -> Norm:
    return Norm(vocab_size, seq_len, batch_norm)


def test_a_model_that_updates_buffers_is_refused_and_constant_buffers_match(tmp_path, markov):
    """Batch-norm statistics (updated by a training forward) cannot train with seeds; the dry
    run leaves the copies' buffers as built, and a constant buffer trains like one run."""
    template = build_model(f"{__name__}:make_norm", markov)
    with pytest.raises(ValueError, match=r"^model cannot train with seeds: .*'bn.running_mean'"):
        train(template, markov, MARKOV, run_in(tmp_path, "bn", seeds=(0, 1)))
    assert not (tmp_path / "bn").exists()
    assert int(template.bn.num_batches_tracked) == 0
    template = build_model(f"{__name__}:make_norm", markov, batch_norm=False)
    config = replace(MARKOV, steps=20, eval_every=10)
    train(template, markov, config, run_in(tmp_path, "m", seeds=(0, 1)))
    single = build_model(f"{__name__}:make_norm", markov, seed=1, batch_norm=False)
    train(single, markov, replace(config, seed=1), run_in(tmp_path, "one"))
    assert_same_run(tmp_path / "one", tmp_path / "m" / "seed1")


def make_nan(vocab_size: int, seq_len: int) -> Norm:
    model = Norm(vocab_size, seq_len, batch_norm=False)
    model.scale.fill_(math.nan)
    return model


def test_a_non_finite_training_loss_stops_the_copies(tmp_path, markov):
    run = run_in(tmp_path, "nan", seeds=(3, 4))
    with pytest.raises(ValueError, match=r"^training loss of seed 3 is nan at step 1: "):
        train(build_model(f"{__name__}:make_nan", markov), markov, MARKOV, run)
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


def not_an_optimizer(model, config):
    return torch.optim.SGD(model.parameters(), lr=config.lr)


def test_bad_input_fails_before_the_run_folder_exists(tmp_path, markov):
    run = run_in(tmp_path, "m", seeds=(0, 1))
    template = build_model(TRANSFORMER, markov, **MARKOV_MODEL)
    with pytest.raises(ValueError, match=r"cannot be vectorised over seeds.*train the seeds in"):
        train(build_model(f"{__name__}:make_item_model", markov), markov, MARKOV, run)
    with pytest.raises(ValueError, match="custom optimiser factory cannot be vectorised"):
        train(template, markov, replace(MARKOV, optimizer=f"{__name__}:not_an_optimizer"), run)
    with pytest.raises(ValueError, match="seed=3 and seeds=0,1 are exclusive"):
        train(template, markov, replace(MARKOV, seed=3), run)
    with pytest.raises(ValueError, match="seeds need a model built by build_model"):
        train(Transformer(TransformerConfig(3)), markov, MARKOV, run)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0-15", tuple(range(16))), ("0,3,5", (0, 3, 5)), (("0-2", 7), (0, 1, 2, 7)), (4, (4,))],
)
def test_seed_lists(value, expected):
    assert parse_seeds(value) == expected
    assert parse_seeds(format_seeds(expected)) == expected
    assert RunOptions(seeds=value).seeds == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("0-x", "integers, comma-separated"),
        ("5-2", "range '5-2' is empty"),
        ("1,1", "repeated"),
        (-1, ">= 0"),
        ("", "integers"),
    ],
)
def test_bad_seed_lists(value, match):
    with pytest.raises(ValueError, match=match):
        parse_seeds(value)


def test_cli_trains_seeds_and_evaluates_one(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "train",
        "ICL-MarkovChain-v0",
        "--set",
        "seq_len=24",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--eval-sequences",
        "32",
        "--batch-size",
        "8",
        "--seeds",
        "0-1",
        "3",
        "--out",
        str(out),
        "--no-progress",
        "--no-plot",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["seed0", "seed1", "seed3"]
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [0, 1, 3]
    capsys.readouterr()
    predictor = f"checkpoint:{out / 'seed3'}"
    eval_argv = [
        "eval",
        "ICL-MarkovChain-v0",
        "--set",
        "seq_len=24",
        "--predictor",
        predictor,
        "--num-sequences",
        "32",
        "--json",
    ]
    assert main(eval_argv) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictor"] == predictor
    assert main([*argv[:-4], "--seeds", "0-x", "--out", str(tmp_path / "bad")]) == 2
    assert "seeds=" in capsys.readouterr().err
