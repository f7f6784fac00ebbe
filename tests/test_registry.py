"""Registration: ids, idempotence, overrides, import-free make, errors."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import pytest

import iclgym
from iclgym.registry import make_task, register_iclgym_envs


def test_ids_registered_with_entry_points():
    ids = [
        "ICL-MarkovChain-v0",
        "ICL-NGram-v0",
        "ICL-SymbolTemplate-v0",
        "ICL-SameDifferent-v0",
        "ICL-SymbolCopy-v0",
        "ICL-SparseContextualBigram-v0",
        "ICL-PriorityGraph-v0",
        "ICL-MultiConcept-v0",
        "ICL-MultiConcept-Random-v0",
    ]
    for env_id in ids:
        spec = gym.spec(env_id)
        assert spec.entry_point == "iclgym.envs:ICLEnv"
        assert spec.vector_entry_point == "iclgym.envs:ICLVectorEnv"
    assert iclgym.list_envs() == ids


def test_registration_is_idempotent():
    before = len(gym.registry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_iclgym_envs()
        register_iclgym_envs()
    assert len(gym.registry) == before


def test_make_with_module_prefix_needs_no_import_and_import_skips_torch():
    code = (
        "import sys, gymnasium as gym\n"
        "import iclgym\n"
        "assert 'torch' not in sys.modules\n"
        "env = gym.make('iclgym:ICL-MarkovChain-v0', num_states=5)\n"
        "assert env.action_space.n == 5\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code2 = "import gymnasium as gym\nenv = gym.make('iclgym:ICL-NGram-v0')\nenv.reset(seed=0)\n"
    subprocess.run([sys.executable, "-c", code2], check=True)


def test_overrides_and_id_constraints():
    assert gym.make("ICL-NGram-v0", order=4).unwrapped.task.spec.order == 4
    with pytest.raises(ValueError, match="ICL-NGram-v0"):
        gym.make("ICL-MarkovChain-v0", order=3)
    with pytest.raises(ValueError, match="ICL-MarkovChain-v0"):
        gym.make("ICL-NGram-v0", order=2)
    with pytest.raises(ValueError, match="iclgym list"):
        iclgym.make_task("ICL-Nope-v0")


def test_template_ids_fix_their_preset_and_accept_kwargs():
    task = iclgym.make_task(
        "ICL-SymbolTemplate-v0", preset="aabb_abab", label_type="classification"
    )
    assert task.spec.templates == (("A", "A", "B", "B"), ("A", "B", "A", "B"))
    assert iclgym.make_task("ICL-SameDifferent-v0").spec.preset == "same_different"
    copy = gym.make("ICL-SymbolCopy-v0", train_alphabet_size=32).unwrapped.task
    assert copy.spec.label_type == "multiclass" and copy.spec.train_alphabet_size == 32
    with pytest.raises(ValueError, match="ICL-SameDifferent-v0"):
        gym.make("ICL-SameDifferent-v0", preset="aba_abb")
    with pytest.raises(ValueError, match="ICL-SymbolCopy-v0"):
        iclgym.make_task("ICL-SymbolCopy-v0", preset="aba_abb")


def test_unknown_spec_keys_are_refused_with_the_valid_keys():
    with pytest.raises(
        ValueError,
        match=r"spec key 'bogus' is invalid for ICL-MarkovChain-v0: "
        r"expected one of num_states, order, seq_len, alpha",
    ):
        iclgym.make_task("ICL-MarkovChain-v0", bogus=1)
    with pytest.raises(ValueError, match=r"spec key 'num_states' is invalid for ICL-SymbolCopy-v0"):
        iclgym.make_task("ICL-SymbolCopy-v0", num_states=3)
    from iclgym.registry import spec_keys

    assert "train_alphabet_size" in spec_keys("ICL-SymbolTemplate-v0")


def test_command_line_values_read_true_and_false_as_bools_and_specs_refuse_strings():
    """``--set`` and ``--model-arg`` share one value reader: the shell's ``true`` / ``false``
    (any case) are bools, literals parse, anything else stays a string; a bool field given a
    string is refused, never read by its truthiness (``bool("false")`` is True)."""
    from iclgym.harness.train import parse_assignments
    from iclgym.registry import parse_overrides

    raw = ["a=false", "b=TRUE", "c=False", "d=3", "e=(1, 2)", "f=dirichlet", "g=0.5"]
    expected = {"a": False, "b": True, "c": False, "d": 3, "e": (1, 2), "f": "dirichlet", "g": 0.5}
    for parsed in (parse_overrides(raw), parse_assignments(raw, "--model-arg")):
        assert parsed == expected and all(type(parsed[k]) is type(v) for k, v in expected.items())
    task = make_task("ICL-PriorityGraph-v0", **parse_overrides(["deterministic=false"]))
    assert task.spec.deterministic is False
    for env_id, field in [
        ("ICL-PriorityGraph-v0", "deterministic"),
        ("ICL-MarkovChain-v0", "approx_sinkhorn"),
        ("ICL-MultiConcept-v0", "cross_pairing"),
    ]:
        with pytest.raises(ValueError, match=f"{field}='false' is invalid: expected a bool"):
            make_task(env_id, **{field: "false"})
