"""Template tasks: validation, vocabulary layout, sampler properties, oracle (T2)."""

from __future__ import annotations

import math

import pytest
import torch

from iclgym.harness import OraclePredictor, StrategyPredictor, evaluate
from iclgym.harness.regression import evaluate_regression
from iclgym.tasks import make_family_task
from iclgym.tasks.templates import (
    PRESETS,
    QUERY,
    TOPK_MAX_ALPHABET,
    SymbolTemplateSpec,
    SymbolTemplateTask,
)

SMALL = {"train_alphabet_size": 16, "val_alphabet_size": 8, "test_alphabet_size": 32}


def draw(task, n, split="train", seed=0):
    return task.sample(n, generator=task.generator(seed, split))


# ------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"preset": "custom", "templates": ("AB", "ABA"), "wildcards": "AB", "labels": (1, -1)},
            "equal length",
        ),
        (
            {"preset": "custom", "templates": ("ABA", "BAB"), "wildcards": "AB", "labels": (1, -1)},
            "templates 0 'A B A' and 1 'B A B' are equal up to renaming",
        ),
        (
            {"preset": "custom", "templates": ("AxA", "ABB"), "wildcards": "AB", "labels": (1, -1)},
            r"uses \['x'\], neither a wildcard",
        ),
        (
            {
                "preset": "custom",
                "templates": ("AB",),
                "wildcards": "ABC",
                "labels": ("C",),
                "label_type": "multiclass",
            },
            "wildcard absent from that template",
        ),
        (
            {"preset": "custom", "templates": ("ABA", "ABB"), "wildcards": "AB", "labels": (1,)},
            "one label per template",
        ),
        ({"train_alphabet_size": 1}, "train_alphabet_size=1 is invalid"),
        (
            {
                "preset": "custom",
                "templates": ("xy", "yx"),
                "wildcards": "A",
                "regular": ("x", "y"),
                "labels": (1, -1),
            },
            "at least one wildcard",
        ),
        ({"preset": "majority4", "test_alphabet_size": 1}, "test_alphabet_size=1 is invalid"),
        ({"template_probs": (0.7, 0.7)}, "template_probs"),
        ({"template_probs": (1.0,)}, "template_probs"),
        ({"preset": "nope"}, "preset='nope' is invalid"),
        ({"label_type": "ordinal"}, "label_type='ordinal' is invalid"),
        ({"preset": "copy"}, "'multiclass' for preset='copy'"),
        ({"templates": ("AB", "AA")}, "preset='custom'"),
        ({"data_mode": "replay"}, "data_mode='replay' is invalid"),
        ({"n_train": 0}, "n_train=0 is invalid"),
        (
            {
                "preset": "custom",
                "templates": ("AB", "AA"),
                "wildcards": "AB",
                "regular": ("A",),
                "labels": (1, -1),
            },
            "both wildcards and regular",
        ),
        (
            {
                "preset": "custom",
                "templates": ("AB", "AA"),
                "wildcards": "AB",
                "labels": (1, math.nan),
            },
            "finite reals",
        ),
    ],
)
def test_bad_specs_raise_with_the_reason(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SymbolTemplateSpec(**kwargs)


def test_presets_and_label_types():
    for name in PRESETS:
        kinds = ["multiclass"] if name == "copy" else ["regression", "classification", "multiclass"]
        for kind in kinds:
            task = SymbolTemplateTask(preset=name, label_type=kind, **SMALL)
            batch = draw(task, 64)
            assert batch.tokens.shape == (64, task.seq_len)
            assert (task.match(batch.tokens) == batch.params["template_id"]).all()
    spec = SymbolTemplateSpec(preset="same_different", label_type="classification")
    assert spec.labels == (1, 0)  # AA -> +1 -> class 1, AB -> -1 -> class 0
    assert SymbolTemplateSpec(preset="majority4").templates[-1] == ("A", "B", "B", "B")
    assert len(SymbolTemplateSpec(preset="majority8").templates) == 128


def test_vocabulary_layout_is_wildcards_regular_then_three_alphabets():
    task = SymbolTemplateTask(
        preset="custom",
        templates=("A = B", "A = A"),
        wildcards="AB",
        regular=("=",),
        labels=(-1.0, 2.5),
        **SMALL,
    )
    assert task.token_names == ["A", "B", "=", "<y=-1>", "<y=2.5>", QUERY]
    assert task.alphabets == {"train": (6, 16), "validation": (22, 8), "test": (30, 32)}
    assert task.vocab_size == 6 + 16 + 8 + 32
    assert task.seq_len == 4 and task.first_scored_position == 3
    values = task.label_values
    assert values[3] == -1.0 and values[4] == 2.5 and values.isnan().sum() == task.vocab_size - 2


# ---------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_strings_follow_their_template_injectively_within_the_split_alphabet(split):
    task = SymbolTemplateTask(
        preset="custom",
        templates=("A x B A", "A B x C", "A A x B"),
        wildcards="ABC",
        regular=("x",),
        labels=("A", "C", "x"),
        label_type="multiclass",
        **SMALL,
    )
    batch = draw(task, 500, split)
    start, size = task.alphabets[split]
    for row, z, label in zip(
        batch.tokens.tolist(),
        batch.params["template_id"].tolist(),
        batch.targets[:, -1].tolist(),
        strict=True,
    ):
        template = task.spec.templates[z]
        binding = {}
        for sym, tok in zip(template, row, strict=False):
            if sym in task.spec.wildcards:
                assert start <= tok < start + size
                assert binding.setdefault(sym, tok) == tok
            else:
                assert tok == task.ids[sym]
        assert len(set(binding.values())) == len(binding)  # injective
        assert row[-1] == task.query_id
        y = task.spec.labels[z]
        assert label == (binding[y] if y in binding else task.ids[y])
    assert (batch.targets[:, :-1] == batch.tokens[:, 1:]).all()
    assert batch.loss_mask[:, -1].all() and not batch.loss_mask[:, :-1].any()


def test_same_seed_same_data_and_splits_are_disjoint():
    task = SymbolTemplateTask(**SMALL)
    a, b = draw(task, 256, seed=3), draw(task, 256, seed=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.tokens, draw(task, 256, seed=4).tokens)
    symbols = {
        split: set(draw(task, 512, split).tokens[:, :3].flatten().tolist())
        for split in ("train", "validation", "test")
    }
    assert not symbols["train"] & symbols["validation"]
    assert not symbols["train"] & symbols["test"] and not symbols["validation"] & symbols["test"]
    # a plain torch.Generator draws from the train alphabet
    plain = task.sample(64, generator=torch.Generator().manual_seed(0))
    start, size = task.alphabets["train"]
    assert ((plain.tokens[:, :3] >= start) & (plain.tokens[:, :3] < start + size)).all()


def test_template_frequencies_and_uniform_symbols():
    task = SymbolTemplateTask(template_probs=(0.2, 0.8), **SMALL)
    batch = draw(task, 20000)
    freq = batch.params["template_id"].float().mean().item()
    assert abs(freq - 0.8) < 4 * math.sqrt(0.16 / 20000)
    start, size = task.alphabets["train"]
    counts = torch.bincount(batch.tokens[:, 0] - start, minlength=size).float()
    expected = 20000 / size
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < size + 6 * math.sqrt(2 * size)  # about 6 sd above the chi2 mean


def test_rejection_sampler_for_large_alphabets_draws_distinct_uniform_symbols():
    size = TOPK_MAX_ALPHABET + 1
    task = SymbolTemplateTask(preset="majority4", test_alphabet_size=size)
    batch = draw(task, 4000, "test")
    subs = batch.params["substitution"]
    assert (subs[:, 0] != subs[:, 1]).all()
    start = task.alphabets["test"][0]
    assert ((subs >= start) & (subs < start + size)).all()
    assert abs((subs - start).float().mean().item() - (size - 1) / 2) < 0.05 * size


def test_fixed_mode_resamples_one_training_set_and_leaves_test_fresh():
    task = SymbolTemplateTask(data_mode="fixed", n_train=20, **SMALL)
    fixed = task.train_set()
    assert fixed.batch_size == 20
    assert torch.equal(
        fixed.tokens, SymbolTemplateTask(data_mode="fixed", n_train=20, **SMALL).train_set().tokens
    )
    other = SymbolTemplateTask(data_mode="fixed", n_train=20, train_set_seed=1, **SMALL)
    assert not torch.equal(fixed.tokens, other.train_set().tokens)
    rows = {tuple(r) for r in fixed.tokens.tolist()}
    batch = draw(task, 200)
    assert {tuple(r) for r in batch.tokens.tolist()} <= rows
    assert len({tuple(r) for r in draw(task, 200, "test").tokens.tolist()}) > 20
    assert SymbolTemplateTask(**SMALL).train_set().batch_size == 16  # default n_train = n


# ------------------------------------------------------------------- oracle and laws
def reference_laws(task, tokens, start, size, posterior_of_template):
    """Next-token laws by enumeration, plainly: for each position and template, the template's
    law (fixed id, bound symbol or uniform over unused symbols), mixed with the weights."""
    V, T = task.vocab_size, len(tokens)
    L = task.spec.template_len
    out = torch.zeros(T, V)
    for t in range(T):
        weights = posterior_of_template(t)
        for z, w in enumerate(weights):
            if w == 0:
                continue
            template, binding = task.spec.templates[z], {}
            for sym, tok in zip(template[: t + 1], tokens[: t + 1], strict=False):
                if sym in task.spec.wildcards:
                    binding[sym] = tok
            if t + 1 < L:
                sym = template[t + 1]
                if sym not in task.spec.wildcards:
                    out[t, task.ids[sym]] += w
                elif sym in binding:
                    out[t, binding[sym]] += w
                else:
                    free = [i for i in range(start, start + size) if i not in binding.values()]
                    for i in free:
                        out[t, i] += w / len(free)
            elif t + 1 == L:
                out[t, task.query_id] += w
            else:
                y = task.spec.labels[z]
                out[t, binding[y] if y in binding else task.ids[y]] += w
    return out


def reference_posterior(task, tokens, start, size):
    """P(template | prefix) by checking every template plainly."""
    L, probs = task.spec.template_len, task.spec.template_probs

    def posterior(t):
        t = min(t, L - 1)
        weights = []
        for z, template in enumerate(task.spec.templates):
            binding, w = {}, probs[z]
            for sym, tok in zip(template[: t + 1], tokens[: t + 1], strict=False):
                if sym not in task.spec.wildcards:
                    w *= tok == task.ids[sym]
                elif sym in binding:
                    w *= tok == binding[sym]
                elif tok in binding.values() or tok < task.alphabet_start:
                    w = 0.0
                else:
                    w /= size - len(binding)
                    binding[sym] = tok
            weights.append(float(w))
        total = sum(weights)
        return [w / total for w in weights]

    return posterior


def test_oracle_and_true_probs_match_a_plain_enumeration():
    task = SymbolTemplateTask(
        preset="custom",
        templates=("A x B A", "A B x C", "A A x B", "A B C A"),
        wildcards="ABC",
        regular=("x",),
        labels=("A", "C", "x", "B"),
        label_type="multiclass",
        template_probs=(0.1, 0.2, 0.3, 0.4),
        train_alphabet_size=5,
        val_alphabet_size=4,
        test_alphabet_size=6,
    )
    for split in ("train", "test"):
        batch = draw(task, 40, split)
        start, size = task.alphabets[split]
        oracle, true = task.oracle(batch).exp(), batch.true_probs
        for i in range(batch.batch_size):
            tokens = batch.tokens[i].tolist()
            z = int(batch.params["template_id"][i])
            one_hot = [float(j == z) for j in range(task.spec.num_templates)]
            expected_true = reference_laws(task, tokens, start, size, lambda t, w=one_hot: w)
            posterior = reference_posterior(task, tokens, start, size)
            expected_oracle = reference_laws(task, tokens, start, size, posterior)
            torch.testing.assert_close(true[i], expected_true, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(oracle[i], expected_oracle, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(oracle.sum(-1), torch.ones(40, task.seq_len), atol=1e-5, rtol=0)
        assert (oracle[:, -1].argmax(-1) == batch.targets[:, -1]).all()


@pytest.mark.parametrize("preset", ["same_different", "aba_abb", "aabb_abab", "majority6"])
def test_t2_oracle_scores_mse_0_and_accuracy_1_on_the_unseen_test_alphabet(preset):
    task = SymbolTemplateTask(preset=preset)
    reg = evaluate_regression(OraclePredictor(task), task, num_sequences=1000)
    assert reg["mse"] == 0.0 and reg["accuracy"] == 1.0
    report = evaluate(OraclePredictor(task), task, num_sequences=1000)  # split="test" default
    assert report.split == "test"
    assert report.accuracy == 1.0 and report.oracle_accuracy == 1.0
    assert abs(report.excess_loss) < 1e-6 and report.cross_entropy < 1e-6
    assert report.kl_last < 1e-6
    chance = evaluate_regression(StrategyPredictor(task, "template_prior"), task)
    assert abs(chance["mse"] - 1.0) < 1e-6  # blind to the template: predicts 0 for +-1


def test_copy_oracle_predicts_the_first_symbol_of_unseen_strings():
    task = make_family_task("symbol_template", preset="copy", label_type="multiclass")
    batch = draw(task, 300, "test")
    assert (batch.targets[:, -1] == batch.tokens[:, 0]).all()
    report = evaluate(OraclePredictor(task), task, num_sequences=300)
    assert report.accuracy == 1.0
    uniform = evaluate(StrategyPredictor(task, "uniform"), task, num_sequences=300)
    assert uniform.accuracy < 0.01


def test_match_is_minus_one_for_strings_no_template_explains():
    task = SymbolTemplateTask(**SMALL)
    start = task.alphabets["test"][0]
    tokens = torch.tensor([[start, start, start, task.query_id], [start, start + 1, start, 0]])
    assert task.match(tokens).tolist() == [-1, -1]
    assert torch.isfinite(task.oracle(draw(task, 4))).all()


def test_split_survives_pickle_and_deepcopy_of_the_generator():
    import copy
    import pickle

    task = SymbolTemplateTask(**SMALL)
    gen = task.generator(5, "test")
    draw_state = gen.get_state()
    for clone in (pickle.loads(pickle.dumps(gen)), copy.deepcopy(gen)):
        assert clone.split == "test" and torch.equal(clone.get_state(), draw_state)
        assert torch.equal(
            task.sample(8, generator=clone).tokens,
            task.sample(8, generator=copy.deepcopy(gen)).tokens,
        )
