"""Template tasks: validation, vocabulary layout, sampler properties, oracle (T2)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iclgym.harness import OraclePredictor, StrategyPredictor, evaluate
from iclgym.harness.regression import evaluate_regression
from iclgym.tasks import make_family_task
from iclgym.tasks.templates import (
    PRESETS,
    QUERY,
    RANDOM_REGULAR,
    WILDCARDS,
    SymbolTemplateSpec,
    SymbolTemplateTask,
    canonical,
    num_patterns,
    random_preset,
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
        ({"preset": "var_binding", "labels": (1.0,)}, r"one label per template \(2\)"),
        ({"preset": "random", "random_num_templates": 1}, r"random_num_templates=1 .* 2 \.\. 15"),
        ({"preset": "random", "random_num_templates": 16}, r"random_num_templates=16 .* 2 \.\. 15"),
        ({"preset": "random", "random_length": 21}, r"random_length=21 .* 2 \.\. 20"),
        ({"preset": "random", "random_length": 1}, r"random_length=1 .* 2 \.\. 20"),
        ({"preset": "random", "random_wildcards": 8}, r"random_wildcards=8 .* 2 \.\. 7"),
        ({"preset": "random", "random_regular": 3}, r"random_regular=3 .* 0 \.\. 2"),
        ({"preset": "random", "random_regular": 1.0}, r"random_regular=1\.0 .* 0 \.\. 2"),
        (
            {"preset": "random", "random_seed": -1},
            "random_seed=-1 is invalid: expected an int >= 0",
        ),
        (
            {"preset": "random", "random_num_templates": 3, "random_length": 2},
            "random_num_templates=3 is invalid: expected at most 2, .* random_length=2",
        ),
        ({"random_num_templates": 3}, "random_num_templates=3 is given with preset='aba_abb'"),
        ({"preset": "counting5", "train_alphabet_size": 4}, "train_alphabet_size=4 is invalid"),
        ({"alphabet_offsets": (0, 512)}, r"alphabet_offsets=\(0, 512\) is invalid: expected"),
        ({"alphabet_offsets": (0, 512, -1)}, "alphabet_offsets=.* is invalid: expected"),
        ({"alphabet_offsets": (0, 512, 1.5)}, "alphabet_offsets=.* is invalid: expected"),
        (
            {"alphabet_offsets": (0, 500, 800)},
            r"the train alphabet \[0, 512\) and the validation alphabet \[500, 756\) overlap",
        ),
        (
            {"alphabet_offsets": (2000, 0, 100)},
            r"the validation alphabet \[0, 256\) and the test alphabet \[100, 1124\) overlap",
        ),
    ],
)
def test_bad_specs_raise_with_the_reason(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SymbolTemplateSpec(**kwargs)


def test_presets_and_label_types():
    for name in [*PRESETS, "random"]:
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


def test_large_alphabets_draw_distinct_uniform_symbols():
    size = 10**6
    task = SymbolTemplateTask(preset="majority4", test_alphabet_size=size)
    batch = draw(task, 4000, "test")
    subs = batch.params["substitution"]
    assert (subs[:, 0] != subs[:, 1]).all()
    start = task.alphabets["test"][0]
    assert ((subs >= start) & (subs < start + size)).all()
    assert abs((subs - start).float().mean().item() - (size - 1) / 2) < 0.05 * size


@pytest.mark.parametrize(("preset", "m"), [("aba_abb", 2), ("counting5", 5)])
def test_substitutions_are_uniform_over_injective_maps(preset, m):
    """Every ordered m-tuple of distinct symbols of a 6-symbol alphabet is equally likely
    (chi-square over the 6! / (6 - m)! tuples, about 5 sd above its mean)."""
    task = SymbolTemplateTask(
        preset=preset,
        train_alphabet_size=6,
        **{k: v for k, v in SMALL.items() if k != "train_alphabet_size"},
    )
    n = 60000
    subs = (draw(task, n).params["substitution"] - task.alphabets["train"][0]).tolist()
    assert all(len(set(row)) == m for row in subs)
    cells = math.perm(6, m)
    counts = {}
    for row in subs:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == cells
    expected = n / cells
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < cells + 5 * math.sqrt(2 * cells)


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


# ------------------------------------------------------ counting, random, var_binding
NEW_PRESETS = [
    {"preset": "counting5"},
    {"preset": "counting7"},
    {"preset": "var_binding"},
    {"preset": "random"},
    {"preset": "random", "random_num_templates": 15, "random_length": 6, "random_wildcards": 4},
    {"preset": "random", "random_regular": 2, "random_length": 3, "random_seed": 7},
]


@pytest.mark.parametrize("kwargs", NEW_PRESETS)
@pytest.mark.parametrize("label_type", ["regression", "classification", "multiclass"])
def test_new_presets_oracle_matches_every_test_string(kwargs, label_type):
    task = SymbolTemplateTask(label_type=label_type, **kwargs, **SMALL)
    keys = [canonical(t, task.spec.wildcards) for t in task.spec.templates]
    assert len(set(keys)) == len(keys)  # pairwise non-equivalent
    batch = draw(task, 600, "test")
    z = batch.params["template_id"]
    assert (task.match(batch.tokens) == z).all()
    post = task.posterior(batch)[:, :, -1]
    assert torch.equal(post, torch.nn.functional.one_hot(z, task.spec.num_templates).double())
    assert (task.oracle(batch)[:, -1].argmax(-1) == batch.targets[:, -1]).all()
    if label_type == "regression":
        reg = evaluate_regression(OraclePredictor(task), task, num_sequences=500)
        assert reg["mse"] == 0.0 and reg["accuracy"] == 1.0
    else:
        assert evaluate(OraclePredictor(task), task, num_sequences=500).accuracy == 1.0


@pytest.mark.parametrize("k", [5, 7])
def test_counting_label_is_the_count_of_the_first_symbol_and_classes_are_uniform(k):
    task = SymbolTemplateTask(preset=f"counting{k}", label_type="classification")
    assert task.spec.num_templates == k and task.spec.template_len == k
    n = 20000
    batch = draw(task, n, "test")
    body = batch.tokens[:, :k]
    count = (body == body[:, :1]).sum(1)
    distinct = torch.tensor([len(set(row)) for row in body.tolist()])
    label = batch.targets[:, -1] - task.ids["<class 0>"]  # class c - 1 stands for count c
    assert torch.equal(label + 1, count) and torch.equal(distinct, k - count + 1)
    freq = torch.bincount(label, minlength=k).double()
    p = 1 / k
    assert ((freq - n * p).abs() < 4 * math.sqrt(n * p * (1 - p))).all()
    # blind to the pattern, the best guess is one class: chance error 1 - 1/k (0.80, 0.86)
    head = draw(task, 4000, "test", seed=1)
    blind = task.strategies["template_prior"](head)[:, -1].argmax(-1) == head.targets[:, -1]
    assert abs((1 - blind.double().mean()) - (1 - p)) < 4 * math.sqrt(p * (1 - p) / 4000)
    names = SymbolTemplateTask(preset=f"counting{k}", label_type="multiclass").spec.regular
    assert names == tuple(f"count{c}" for c in range(1, k + 1))


def test_var_binding_strings_read_as_assignments_and_print_the_bound_value():
    reg = SymbolTemplateTask(preset="var_binding", **SMALL)
    # the regular tokens "+1" / "-1" and the regression label tokens are distinct ids
    assert {"+1", "-1", "<y=1>", "<y=-1>"} <= set(reg.ids) and len(reg.ids) == len(reg.token_names)
    batch = draw(reg, 200, "test")
    start = reg.alphabets["test"][0]
    for row, z, a, y in zip(
        batch.tokens.tolist(),
        batch.params["template_id"].tolist(),
        batch.params["substitution"][:, 0].tolist(),
        batch.params["label_value"].tolist(),
        strict=True,
    ):
        value = ("+1", "-1")[z]
        a = f"test:{a - start}"
        assert reg.describe_string(row) == f"{a} = {value} ; print ( {a} ) {QUERY}"
        assert y == float(value)
    sym = SymbolTemplateTask(preset="var_binding", label_type="multiclass", **SMALL)
    assert sym.spec.num_templates == 3 and sym.spec.labels == ("+1", "-1", "q")
    batch = draw(sym, 300, "test")
    z = batch.params["template_id"]
    assert set(z.tolist()) == {0, 1, 2}
    q = batch.tokens[:, 2]  # "a = q ; ...": the value printed is the token bound to q
    expected = torch.where(z == 2, q, torch.tensor([sym.ids["+1"], sym.ids["-1"], -1])[z])
    assert torch.equal(batch.targets[:, -1], expected)
    row, start = batch.tokens[z == 2][0].tolist(), sym.alphabets["test"][0]
    a, q = (f"test:{row[i] - start}" for i in (0, 2))
    assert sym.describe_string(row) == f"{a} = {q} ; print ( {a} ) {QUERY}"


@settings(max_examples=30, deadline=None)
@given(
    r=st.integers(2, 15),
    length=st.integers(2, 20),
    wildcards=st.integers(2, 7),
    regular=st.integers(0, 2),
    seed=st.integers(0, 2**31),
)
def test_random_templates_are_a_valid_pure_function_of_the_seed(
    r, length, wildcards, regular, seed
):
    kwargs = {
        "preset": "random",
        "random_num_templates": r,
        "random_length": length,
        "random_wildcards": wildcards,
        "random_regular": regular,
        "random_seed": seed,
        **SMALL,
    }
    if num_patterns(length, wildcards, regular) < r:
        with pytest.raises(ValueError, match=f"random_num_templates={r} is invalid"):
            SymbolTemplateSpec(**kwargs)
        return
    spec = SymbolTemplateSpec(**kwargs)
    assert spec.num_templates == r and spec.template_len == length
    keys = {canonical(t, spec.wildcards) for t in spec.templates}
    assert len(keys) == r  # pairwise non-equivalent
    for t in spec.templates:
        assert set(t) & set(WILDCARDS[:wildcards])  # at least one wildcard
        assert set(t) <= set(WILDCARDS[:wildcards]) | set(RANDOM_REGULAR[:regular])
    assert sorted(spec.labels) == [-1.0] * (r // 2) + [1.0] * ((r + 1) // 2)  # balanced
    random_preset.cache_clear()
    again = SymbolTemplateSpec(**kwargs)
    assert again.templates == spec.templates and again.labels == spec.labels
    task = SymbolTemplateTask(spec)
    batch = draw(task, 64, "test")
    assert (task.match(batch.tokens) == batch.params["template_id"]).all()


def test_random_templates_differ_between_seeds():
    def templates(seed, **kwargs):
        return SymbolTemplateSpec(preset="random", random_seed=seed, **kwargs).templates

    assert templates(0, random_length=10, random_wildcards=4) != templates(
        1, random_length=10, random_wildcards=4
    )
    assert len({templates(seed) for seed in range(10)}) > 1  # also at the defaults
    assert templates(3) == templates(3)


# ------------------------------------------------------------------ alphabet offsets
def test_offsets_place_each_alphabet_and_leave_gaps_unused():
    task = SymbolTemplateTask(preset="counting5", alphabet_offsets=(40, 0, 100), **SMALL)
    pool = task.alphabet_start
    assert task.alphabets == {
        "train": (pool + 40, 16),
        "validation": (pool, 8),
        "test": (pool + 100, 32),
    }
    assert task.vocab_size == pool + 132
    for split in ("train", "validation", "test"):
        start, size = task.alphabets[split]
        batch = draw(task, 400, split)
        body = batch.tokens[:, :-1]
        assert ((body >= start) & (body < start + size)).all()
        assert set(body.flatten().tolist()) == set(range(start, start + size))
        laws = batch.true_probs[:, 0]  # the law of the second symbol: within the range only
        assert laws[:, :start].sum() == 0 and laws[:, start + size :].sum() == 0
        assert (task.match(batch.tokens) == batch.params["template_id"]).all()
    fixed = SymbolTemplateTask(
        preset="counting5", alphabet_offsets=(40, 0, 100), data_mode="fixed", **SMALL
    )
    train = fixed.train_set().tokens[:, :-1]
    assert ((train >= pool + 40) & (train < pool + 56)).all()
    assert evaluate(OraclePredictor(task), task, num_sequences=300).accuracy == 1.0
    assert (
        task.describe_string([pool + 20, pool + 3, pool + 101]) == "unused:20 validation:3 test:1"
    )


def test_contiguous_offsets_reproduce_the_default_layout_and_data():
    default = SymbolTemplateTask(**SMALL)
    explicit = SymbolTemplateTask(alphabet_offsets=(0, 16, 24), **SMALL)
    assert explicit.alphabets == default.alphabets
    assert explicit.vocab_size == default.vocab_size
    for split in ("train", "test"):
        assert torch.equal(draw(default, 64, split).tokens, draw(explicit, 64, split).tokens)


@settings(max_examples=25, deadline=None)
@given(
    offsets=st.tuples(*[st.integers(0, 60)] * 3),
    sizes=st.tuples(*[st.integers(2, 20)] * 3),
)
def test_offsets_are_accepted_iff_the_alphabets_are_disjoint(offsets, sizes):
    kwargs = dict(
        zip(("train_alphabet_size", "val_alphabet_size", "test_alphabet_size"), sizes, strict=True)
    )
    ranges = [range(o, o + n) for o, n in zip(offsets, sizes, strict=True)]
    overlap = any(set(a) & set(b) for i, a in enumerate(ranges) for b in ranges[i + 1 :])
    if overlap:
        with pytest.raises(ValueError, match=r"alphabet_offsets=.* the \w+ alphabet .* overlap"):
            SymbolTemplateSpec(alphabet_offsets=offsets, **kwargs)
        return
    task = SymbolTemplateTask(alphabet_offsets=offsets, **kwargs)
    assert task.vocab_size == task.alphabet_start + max(r.stop for r in ranges)
    for split, r in zip(("train", "validation", "test"), ranges, strict=True):
        start, size = task.alphabets[split]
        assert range(start - task.alphabet_start, start - task.alphabet_start + size) == r
        batch = draw(task, 32, split)
        body = batch.tokens[:, :-1]
        assert ((body >= start) & (body < start + size)).all()
        assert (task.oracle(batch)[:, -1].argmax(-1) == batch.targets[:, -1]).all()


# ----------------------------------------------------------- issue 8: numbers and sizes
def test_numpy_numbers_are_accepted_where_python_numbers_are():
    plain = SymbolTemplateTask(
        preset="random",
        random_num_templates=3,
        random_length=4,
        random_wildcards=3,
        random_seed=2,
        data_mode="fixed",
        n_train=9,
        train_set_seed=1,
        alphabet_offsets=(0, 20, 40),
        **SMALL,
    )
    numpy = SymbolTemplateTask(
        preset="random",
        random_num_templates=np.int64(3),
        random_length=np.int32(4),
        random_wildcards=np.uint8(3),
        random_seed=np.int64(2),
        data_mode="fixed",
        n_train=np.int64(9),
        train_set_seed=np.int16(1),
        alphabet_offsets=np.array([0, 20, 40]),
        **{k: np.int64(v) for k, v in SMALL.items()},
    )
    assert numpy.spec == plain.spec
    assert all(type(v) is int for v in numpy.spec.alphabet_offsets)
    assert type(numpy.spec.train_alphabet_size) is int and type(numpy.spec.n_train) is int
    assert torch.equal(draw(numpy, 50).tokens, draw(plain, 50).tokens)
    custom = {"preset": "custom", "templates": ("AA", "AB"), "wildcards": "AB"}
    classes = SymbolTemplateTask(
        labels=(np.int64(1), np.int32(0)), label_type="classification", **custom
    )
    assert classes.spec.labels == (1, 0) and all(type(y) is int for y in classes.spec.labels)
    values = SymbolTemplateTask(labels=(np.float32(0.5), np.int64(-2)), **custom)
    assert values.spec.labels == (0.5, -2.0)
    probs = SymbolTemplateTask(template_probs=np.array([0.25, 0.75]), **SMALL)
    assert probs.spec.template_probs == (0.25, 0.75)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"train_alphabet_size": True}, "train_alphabet_size"),
        ({"val_alphabet_size": np.bool_(True)}, "val_alphabet_size"),
        ({"n_train": True}, "n_train"),
        ({"random_seed": True, "preset": "random"}, "random_seed"),
        ({"template_probs": (True, False)}, "template_probs"),
        ({"alphabet_offsets": (0, True, 600)}, "alphabet_offsets"),
    ],
)
def test_bools_are_not_numbers(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}=.* is invalid"):
        SymbolTemplateSpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"train_alphabet_size": 10**7}, "train_alphabet_size"),
        ({"val_alphabet_size": 10**8}, "val_alphabet_size"),
        ({"test_alphabet_size": 10**12}, "test_alphabet_size"),
        ({"alphabet_offsets": (0, 600, 10**9)}, "alphabet_offsets"),
        (
            {
                "preset": "custom",
                "templates": ("AA", "AB"),
                "wildcards": "AB",
                "labels": (0, 10**9),
                "label_type": "classification",
            },
            "labels",
        ),
        ({"data_mode": "fixed", "n_train": 10**10}, "n_train"),
    ],
)
def test_impossible_sizes_are_refused_before_allocating(kwargs, name):
    """Issue 8: train_alphabet_size=10**7 died in the allocator; now the spec names the
    parameter and the memory its 64 sequences (or the fixed training set) would take."""
    with pytest.raises(ValueError, match=rf"{name}=.* is invalid: .* would take [\d.]+ [GTP]iB"):
        SymbolTemplateSpec(**kwargs)


def test_largest_accepted_alphabet_still_samples_and_scores():
    task = SymbolTemplateTask(train_alphabet_size=10**6)
    batch = draw(task, 8)
    label = task.online(batch)(task.first_scored_position)[1]
    assert (torch.from_numpy(label) == batch.targets[:, -1]).all()


# ------------------------------------------------- issue 8: composable sampler, online
@pytest.mark.parametrize("data_mode", ["online", "fixed"])
@pytest.mark.parametrize("preset", ["aba_abb", "counting5", "var_binding"])
def test_two_draws_equal_one_draw_of_both(preset, data_mode):
    """The data do not depend on batch sizes (Task.sample_composes): B1 then B2 sequences
    from one generator are the first B1 + B2 of one draw."""
    label_type = "multiclass" if preset == "var_binding" else "regression"
    task = SymbolTemplateTask(preset=preset, label_type=label_type, data_mode=data_mode, **SMALL)
    assert task.sample_composes
    gen = task.generator(5)
    parts = [task.sample(n, generator=gen) for n in (1, 37, 100)]
    whole = task.sample(138, generator=task.generator(5))
    for field in ("tokens", "targets", "loss_mask"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field))
    for key in whole.params:
        assert torch.equal(torch.cat([p.params[key] for p in parts]), whole.params[key])


def test_template_probabilities_of_zero_are_never_drawn_and_others_follow_the_law():
    task = SymbolTemplateTask(preset="majority4", template_probs=(0.5, 0, 0, 0.25, 0, 0, 0.25, 0))
    z = draw(task, 20000).params["template_id"]
    counts = torch.bincount(z, minlength=8).float() / 20000
    assert (counts[[1, 2, 4, 5, 7]] == 0).all()
    for i, p in ((0, 0.5), (3, 0.25), (6, 0.25)):
        assert abs(counts[i].item() - p) < 5 * math.sqrt(p * (1 - p) / 20000)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(
        [
            {"preset": "aba_abb"},
            {"preset": "majority6"},
            {"preset": "counting5", "label_type": "multiclass"},
            {"preset": "var_binding", "label_type": "multiclass"},
            {
                "preset": "random",
                "random_num_templates": 6,
                "random_length": 12,
                "random_wildcards": 4,
                "random_regular": 2,
            },
        ]
    ),
    st.integers(0, 2**31),
)
def test_pattern_matcher_agrees_with_plain_template_matching(kwargs, seed):
    """On sampled strings and on strings with random equalities, symbols, regular tokens and
    QUERY corruption, the online bit-pattern matcher finds the template of the exact matcher
    (:meth:`match`), or none."""
    task = SymbolTemplateTask(**kwargs, **SMALL)
    gen = torch.Generator().manual_seed(seed)
    tokens = draw(task, 300, seed=seed % 1000).tokens.clone()
    low = torch.randint(0, 3, (300, task.seq_len), generator=gen)  # few distinct symbols
    noise = torch.where(
        torch.rand(300, task.seq_len, generator=gen) < 0.5,
        task.alphabet_start + low,
        torch.randint(0, task.vocab_size, (300, task.seq_len), generator=gen),
    )
    corrupt = torch.rand(300, task.seq_len, generator=gen) < 0.15
    tokens = torch.where(corrupt, noise, tokens)
    expected = task.match(tokens).numpy()
    found = task._matcher.match(tokens.numpy().T)
    assert (found == expected).all()


def test_online_labels_are_the_oracle_and_unexplained_strings_raise():
    task = SymbolTemplateTask(preset="var_binding", label_type="multiclass", **SMALL)
    batch = draw(task, 500, "test")
    true, oracle = task.online(batch)(task.first_scored_position)
    assert true.dtype == oracle.dtype == np.int64
    dense = task.oracle(batch)[:, -1].argmax(-1).numpy()
    assert (oracle == dense).all() and (true == batch.targets[:, -1].numpy()).all()
    with pytest.raises(ValueError, match="score position"):
        task.online(batch)(0)
    broken = replace(batch, tokens=batch.tokens.clone())
    broken.tokens[3, 1] = task.query_id  # no template has QUERY inside the string
    with pytest.raises(ValueError, match=r"rows \[3\] match no template"):
        task.online(broken)
