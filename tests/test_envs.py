"""Envs: both checkers, seeding, single vs native vector semantics, bad actions."""

from __future__ import annotations

import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import iclgym
from iclgym.argmax import first_argmax_rows
from iclgym.cli import main
from iclgym.envs import (
    PROB_FLOOR,
    SINGLE_MIN_STEPS,
    ICLEnv,
    ICLVectorEnv,
    block_sequences,
    first_argmax,
)


@pytest.mark.parametrize("env_id", ["ICL-MarkovChain-v0", "ICL-NGram-v0"])
def test_default_env_passes_both_checkers_without_warnings(env_id):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make(env_id)
        check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)
        check_env(gym.make(env_id, render_mode="ansi").unwrapped)


@pytest.mark.parametrize("observation", ["context", "token", "window"])
@pytest.mark.parametrize("action", ["token", "distribution", "logits"])
def test_every_mode_passes_gymnasium_checker(observation, action):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make("ICL-MarkovChain-v0", observation=observation, action=action, window=4)
        check_env(env.unwrapped)
        if action != "distribution":  # SB3 requires Box actions in [-1, 1]
            sb3_check_env(env.unwrapped)


def _rollout(env, actions):
    obs, _ = env.reset(seed=5)
    out = [obs]
    for a in actions:
        obs, reward, terminated, _truncated, info = env.step(a)
        out.append((obs, reward, terminated, info["regret"]))
        if terminated:
            obs, _ = env.reset()
            out.append(obs)
    return out


def test_same_seed_same_stream():
    actions = np.random.default_rng(0).integers(0, 3, 250)
    a = _rollout(gym.make("ICL-MarkovChain-v0"), actions)
    b = _rollout(gym.make("ICL-MarkovChain-v0"), actions)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_equal(x, y)


def test_episode_semantics():
    env = gym.make("ICL-MarkovChain-v0", num_states=4, seq_len=12)
    obs, info = env.reset(seed=1)
    assert obs.shape == (13,) and (obs[1:] == 4).all() and info["t"] == 0
    total = 0.0
    for t in range(12):
        prev = obs
        obs, reward, terminated, truncated, info = env.step(t % 4)
        revealed = obs[t + 1]
        assert (obs[: t + 1] == prev[: t + 1]).all() and revealed < 4
        assert reward == float(t % 4 == revealed) and info["t"] == t
        assert info["true_probs"].sum() == pytest.approx(1.0, abs=1e-5)
        oracle_reward = float(np.argmax(info["oracle_probs"]) == revealed)
        assert info["regret"] == pytest.approx(oracle_reward - reward)
        assert terminated == (t == 11) and not truncated
        total += reward
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.unwrapped.step(0)


def test_distribution_action_reward_and_kl():
    env = gym.make("ICL-MarkovChain-v0", action="distribution", seq_len=5)
    obs, _ = env.reset(seed=0)
    q = np.array([0.2, 0.0, 0.6], dtype=np.float32)
    obs, reward, *_, info = env.step(q)
    floored = np.maximum(q / q.sum(), PROB_FLOOR)
    floored /= floored.sum()
    assert reward == pytest.approx(np.log(floored[obs[1]]))
    p = info["true_probs"]
    assert info["kl"] == pytest.approx(float((p * (np.log(p) - np.log(floored))).sum()), rel=1e-5)


@pytest.mark.parametrize(
    ("action_mode", "bad"),
    [
        ("token", 3),
        ("token", -1),
        ("token", 1.5),
        ("distribution", np.array([np.nan, 0.5, 0.5], np.float32)),
        ("distribution", np.array([-0.1, 0.5, 0.6], np.float32)),
        ("distribution", np.array([1.5, 0.0, 0.0], np.float32)),
        ("distribution", np.array([np.inf, 0.0, 0.0])),
        ("distribution", np.ones(4, np.float32)),
        ("logits", np.array([2.0, 0.0, 0.0], np.float32)),
        ("logits", np.array([np.nan, 0.0, 0.0], np.float32)),
        ("logits", np.array([-1.0001, 0.0, 0.0])),
    ],
)
def test_bad_actions_raise(action_mode, bad):
    env = ICLEnv("ICL-MarkovChain-v0", action=action_mode)
    env.reset(seed=0)
    with pytest.raises(ValueError):
        env.step(bad)
    venv = ICLVectorEnv(2, "ICL-MarkovChain-v0", action=action_mode)
    venv.reset(seed=0)
    with pytest.raises(ValueError):
        venv.step(np.stack([bad, bad]))


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError):
        ICLEnv("ICL-MarkovChain-v0").step(0)
    with pytest.raises(RuntimeError):
        ICLVectorEnv(2, "ICL-MarkovChain-v0").step(np.zeros(2, np.int64))


@pytest.mark.parametrize(
    ("observation", "action"),
    [("context", "token"), ("window", "distribution"), ("token", "logits")],
)
def test_vector_env_with_one_env_reproduces_single_env(observation, action):
    kwargs = {"observation": observation, "action": action, "seq_len": 20, "window": 5}
    single = gym.make("ICL-MarkovChain-v0", **kwargs)
    vector = gym.make_vec("ICL-MarkovChain-v0", num_envs=1, **kwargs)
    single.action_space.seed(3)
    o1, _ = single.reset(seed=9)
    o2, _ = vector.reset(seed=9)
    np.testing.assert_array_equal(o1, o2[0])
    for _step in range(70):
        a = single.action_space.sample()
        o1, r1, term1, trunc1, i1 = single.step(a)
        o2, r2, term2, trunc2, i2 = vector.step(np.asarray(a)[None])
        np.testing.assert_array_equal(o1, o2[0])
        assert r1 == pytest.approx(r2[0], rel=1e-5) and term1 == term2[0] and trunc1 == trunc2[0]
        np.testing.assert_allclose(i1["true_probs"], i2["true_probs"][0])
        np.testing.assert_allclose(i1["oracle_probs"], i2["oracle_probs"][0], rtol=1e-5)
        assert i1["regret"] == pytest.approx(i2["regret"][0], rel=1e-4, abs=1e-6)
        if term1:
            o1, _ = single.reset()
            o2, r2, term2, trunc2, _ = vector.step(np.asarray(a)[None])  # next-step autoreset
            assert r2[0] == 0.0 and not term2[0] and not trunc2[0]
            np.testing.assert_array_equal(o1, o2[0])


def test_native_vector_env_semantics_and_truncation():
    venv = gym.make_vec("ICL-MarkovChain-v0", num_envs=64, seq_len=10, max_episode_steps=6)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    obs, _ = venv.reset(seed=0)
    assert obs.shape == (64, 11) and (obs[:, 1:] == 3).all()
    for t in range(6):
        actions = np.full(64, t % 3)
        new_obs, reward, terminated, truncated, info = venv.step(actions)
        np.testing.assert_array_equal(reward, (new_obs[:, t + 1] == actions).astype(float))
        np.testing.assert_allclose(info["true_probs"].sum(1), 1.0, rtol=1e-5)
        assert not terminated.any() and truncated.all() == (t == 5)
    obs, reward, terminated, truncated, _ = venv.step(np.zeros(64, np.int64))
    assert (reward == 0).all() and not (terminated | truncated).any() and (obs[:, 1:] == 3).all()
    full = gym.make_vec("ICL-MarkovChain-v0", num_envs=8, seq_len=10)
    full.reset(seed=0)
    flags = [full.step(np.zeros(8, np.int64))[2].all() for _ in range(10)]
    assert flags == [False] * 9 + [True]


def test_vector_env_rejects_bad_construction():
    with pytest.raises(ValueError, match="num_envs"):
        ICLVectorEnv(0, "ICL-MarkovChain-v0")
    with pytest.raises(ValueError, match="observation"):
        ICLEnv("ICL-MarkovChain-v0", observation="image")
    with pytest.raises(ValueError, match="num_states"):
        gym.make("ICL-MarkovChain-v0", num_states=1)


def test_ansi_render():
    env = gym.make("ICL-MarkovChain-v0", render_mode="ansi")
    env.reset(seed=0)
    env.step(1)
    text = env.render()
    assert text.startswith("t=   1") and "reward" in text


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 40).flatmap(
        lambda n: st.lists(st.integers(0, 3), min_size=3 * n, max_size=3 * n).map(
            lambda xs: np.asarray(xs, dtype=np.float32).reshape(-1, 3)
        )
    )
)
def test_first_argmax_matches_numpy_including_ties(p):
    np.testing.assert_array_equal(first_argmax(p), p.argmax(-1))
    np.testing.assert_array_equal(first_argmax(np.asfortranarray(p)), p.argmax(-1))


@pytest.mark.parametrize("v", [2, 3, 8, 16])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_first_argmax_matches_the_column_loop_with_ties_and_nan(v, dtype):
    """The kernel against the numpy column loop it replaced (first index on ties; a NaN stops
    later columns from winning)."""
    rng = np.random.default_rng(v)
    p = rng.integers(0, 4, (3000, v)).astype(dtype)
    p[rng.random(p.shape) < 0.05] = np.nan
    best = (p[..., 1] > p[..., 0]).astype(np.int64)
    top = np.maximum(p[..., 0], p[..., 1])
    for j in range(2, v):
        best[p[..., j] > top] = j
        top = np.maximum(top, p[..., j])
    np.testing.assert_array_equal(first_argmax_rows(p), best)
    np.testing.assert_array_equal(first_argmax(p.reshape(30, 100, v)), best.reshape(30, 100))


TEMPLATE_IDS = ["ICL-SymbolTemplate-v0", "ICL-SameDifferent-v0", "ICL-SymbolCopy-v0"]


@pytest.mark.parametrize("env_id", TEMPLATE_IDS)
@pytest.mark.parametrize("action", ["token", "logits", "value"])
def test_template_envs_pass_both_checkers_without_warnings(env_id, action):
    if action == "value" and env_id == "ICL-SymbolCopy-v0":
        with pytest.raises(ValueError, match="real-valued labels"):
            gym.make(env_id, action=action)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make(env_id, action=action)
        check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)
        check_env(gym.make(env_id, action=action, render_mode="ansi").unwrapped)


@pytest.mark.parametrize("split", ["train", "test"])
def test_template_episode_is_one_scored_step_at_the_label(split):
    env = gym.make("ICL-SymbolTemplate-v0", split=split)
    task = env.unwrapped.task
    start, size = task.alphabets[split]
    for episode in range(20):
        obs, info = env.reset(seed=episode)
        assert (
            info["t"] == 3
            and obs.shape == (5,)
            and obs[3] == task.query_id
            and obs[4] == task.vocab_size
        )
        assert (obs[:3] >= start).all() and (obs[:3] < start + size).all()
        obs2, reward, terminated, truncated, info = env.step(task.ids["<y=1>"])
        label = obs2[4]
        is_aba = obs[0] == obs[2]
        assert label == task.ids["<y=1>" if is_aba else "<y=-1>"]
        assert reward == float(is_aba) and terminated and not truncated
        assert info["regret"] == 1.0 - reward  # the oracle matches the template exactly
        # the laws at the label are point masses, given by their token
        assert info["oracle_token"] == info["true_token"] == label
        assert "oracle_probs" not in info and "true_probs" not in info
        with pytest.raises(RuntimeError, match="after the episode ended"):
            env.unwrapped.step(0)


def test_template_value_action_rewards_negative_squared_error_in_both_envs():
    env = gym.make("ICL-SameDifferent-v0", action="value")
    assert env.action_space.shape == (1,) and env.action_space.low[0] == -1.0
    obs, _ = env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(np.array([0.5], np.float32))
    y = 1.0 if obs[0] == obs[1] else -1.0
    assert info["label"] == y and reward == pytest.approx(-((0.5 - y) ** 2)) and terminated
    assert info["regret"] == pytest.approx(-reward)  # the oracle predicts y exactly
    with pytest.raises(ValueError, match="outside"):
        env.reset(seed=1)
        env.unwrapped.step(np.array([1.5], np.float32))
    venv = gym.make_vec("ICL-SameDifferent-v0", num_envs=16, action="value")
    obs, info = venv.reset(seed=0)
    assert (info["t"] == 2).all()
    _obs2, reward, terminated, truncated, info = venv.step(np.zeros((16, 1), np.float32))
    np.testing.assert_array_equal(reward, -np.ones(16))
    assert terminated.all() and not truncated.any()
    np.testing.assert_array_equal(info["label"], np.where(obs[:, 0] == obs[:, 1], 1.0, -1.0))
    obs3, reward, terminated, _, _ = venv.step(np.zeros((16, 1), np.float32))  # autoreset
    assert (reward == 0).all() and not terminated.any() and (obs3[:, 3] == obs3.max()).all()


def test_template_vector_env_with_one_env_reproduces_single_env():
    single = gym.make("ICL-SymbolCopy-v0")
    vector = gym.make_vec("ICL-SymbolCopy-v0", num_envs=1)
    o1, _ = single.reset(seed=4)
    o2, _ = vector.reset(seed=4)
    for _ in range(10):
        np.testing.assert_array_equal(o1, o2[0])
        a = int(o1[0])  # copy the first symbol: always right
        o1, r1, t1, _, _ = single.step(a)
        o2, r2, t2, _, _ = vector.step(np.array([a]))
        assert r1 == r2[0] == 1.0 and t1 and t2[0]
        np.testing.assert_array_equal(o1, o2[0])
        o1, _ = single.reset()
        o2, *_ = vector.step(np.array([a]))


def test_distribution_kl_is_finite_when_true_probabilities_vanish():
    """With alpha = 0.001 many true transition probabilities are exactly 0 in float32."""
    env = gym.make("ICL-MarkovChain-v0", action="distribution", alpha=0.001, seq_len=50)
    env.reset(seed=0)
    kls, zero_seen = [], False
    for _ in range(50):
        *_, info = env.step(np.full(3, 1 / 3, dtype=np.float32))
        zero_seen |= bool((info["true_probs"] == 0).any())
        kls.append(info["kl"])
    assert zero_seen and np.isfinite(kls).all() and min(kls) >= 0


def _decode_check(task, obs, info, split):
    """The observation is the template of info["template_id"] under info["substitution"]."""
    template = task.spec.templates[info["template_id"]]
    used = {s for s in template if s in task.spec.wildcards}
    assert set(info["substitution"]) == used
    start, size = task.alphabets[split]
    for symbol in info["substitution"].values():
        assert start <= symbol < start + size
    assert len(set(info["substitution"].values())) == len(used)  # injective
    decoded = [
        info["substitution"][s] if s in task.spec.wildcards else task.ids[s] for s in template
    ]
    np.testing.assert_array_equal(obs[: len(template)], decoded)
    assert obs[len(template)] == task.query_id


def _label_token(task, label):
    """The token of a label in label units (real value, class id or token id)."""
    if task.spec.label_type == "regression":
        return task.ids[f"<y={label:g}>"]
    if task.spec.label_type == "classification":
        return task.class_tokens[label]
    return label


@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [
        ("ICL-SymbolTemplate-v0", {}),
        ("ICL-SymbolTemplate-v0", {"preset": "majority4", "label_type": "classification"}),
        ("ICL-SymbolTemplate-v0", {"preset": "aabb_abab", "label_type": "multiclass"}),
        ("ICL-SymbolCopy-v0", {}),
    ],
)
def test_template_episode_info_on_the_test_split(env_id, kwargs):
    env = gym.make(env_id, split="test", **kwargs)
    task = env.unwrapped.task
    templates_seen = set()
    for episode in range(64):
        obs, info = env.reset(seed=0 if episode == 0 else None)  # one block of 64 episodes
        assert info == {"t": task.spec.template_len, "split": "test"}  # no answer before acting
        obs2, reward, terminated, _, step_info = env.step(0)
        assert terminated and step_info["split"] == "test"
        _decode_check(task, obs, step_info, "test")
        label = _label_token(task, step_info["label"])
        assert step_info["oracle_pred"] == step_info["label"]  # the oracle is exact
        assert obs2[-1] == label and reward == float(label == 0)
        assert step_info["regret"] == 1.0 - reward
        templates_seen.add(step_info["template_id"])
    assert templates_seen == set(range(task.spec.num_templates))


def test_markov_env_info_has_split_but_no_template_keys():
    env = gym.make("ICL-MarkovChain-v0", split="val", seq_len=3)
    _, info = env.reset(seed=0)
    assert info == {"t": 0, "split": "validation"}
    for _ in range(3):
        *_, info = env.step(0)
        assert info["split"] == "validation" and "label" not in info
    venv = gym.make_vec("ICL-MarkovChain-v0", num_envs=3, seq_len=2)
    _, info = venv.reset(seed=0)
    assert set(info) == {"t", "split"} and info["split"].tolist() == ["train"] * 3


@pytest.mark.parametrize("split", ["test", "validation", "val"])
def test_reset_split_option_switches_the_split_and_is_seeded(split):
    env = gym.make("ICL-SymbolTemplate-v0")
    task = env.unwrapped.task
    canonical = "validation" if split == "val" else split
    start, size = task.alphabets[canonical]
    first = env.reset(seed=3, options={"split": split})
    again = env.reset(seed=3, options={"split": split})
    other = gym.make("ICL-SymbolTemplate-v0").reset(seed=3, options={"split": split})
    for a, b in ((first, again), (first, other)):
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
    for _ in range(10):  # later episodes stay in the new split
        obs, info = env.reset()
        assert info["split"] == canonical and ((obs[:3] >= start) & (obs[:3] < start + size)).all()
        *_, info = env.step(0)
        assert info["split"] == canonical
    train_start, train_size = task.alphabets["train"]
    obs, info = env.reset(options={"split": "train"})
    assert info["split"] == "train" and (obs[:3] < train_start + train_size).all()
    assert env.unwrapped.split == "train"


def test_vector_env_reset_split_option_and_episode_info_arrays():
    venv = gym.make_vec("ICL-SymbolTemplate-v0", num_envs=8, preset="majority4")
    task = venv.unwrapped.task
    obs, info = venv.reset(seed=1, options={"split": "test"})
    obs_again, _ = venv.reset(seed=1, options={"split": "test"})
    np.testing.assert_array_equal(obs, obs_again)
    assert set(info) == {"t", "split"}  # no answer before acting
    unused_b = False
    start, size = task.alphabets["test"]
    for _round in range(5):
        assert info["split"].tolist() == ["test"] * 8
        _obs, reward, terminated, _, step_info = venv.step(np.zeros(8, np.int64))
        assert terminated.all() and step_info["split"].tolist() == ["test"] * 8
        np.testing.assert_array_equal(step_info["label"], step_info["oracle_pred"])
        assert step_info["template_id"].shape == (8,) and step_info["template_id"].dtype == np.int64
        for i in range(8):
            sub = {k: int(v[i]) for k, v in step_info["substitution"].items() if v[i] >= 0}
            row = {"template_id": int(step_info["template_id"][i]), "substitution": sub}
            _decode_check(task, obs[i], row, "test")
            assert ((obs[i, :4] >= start) & (obs[i, :4] < start + size)).all()
        unused_b |= bool((step_info["substitution"]["B"] == -1).any())  # template AAAA
        labels = np.array([_label_token(task, y) for y in step_info["label"]])
        np.testing.assert_array_equal(reward, (labels == 0).astype(float))
        obs, _, _, _, info = venv.step(np.zeros(8, np.int64))  # next-step autoreset
        assert "label" not in info
    assert unused_b
    with pytest.raises(ValueError, match="validation"):
        venv.reset(options={"split": "dev"})


def test_vector_env_info_matches_single_env_with_one_env():
    single = gym.make("ICL-SymbolTemplate-v0", split="test", label_type="classification")
    vector = gym.make_vec("ICL-SymbolTemplate-v0", num_envs=1, label_type="classification")
    single.reset(seed=2)
    vector.reset(seed=2, options={"split": "test"})
    for _ in range(5):
        *_, i1 = single.step(0)
        *_, i2 = vector.step(np.zeros(1, np.int64))
        assert i1["split"] == i2["split"][0] and i1["template_id"] == i2["template_id"][0]
        assert i1["label"] == i2["label"][0] and i1["oracle_pred"] == i2["oracle_pred"][0]
        assert i1["substitution"] == {k: int(v[0]) for k, v in i2["substitution"].items()}
        single.reset()
        vector.step(np.zeros(1, np.int64))


@pytest.mark.parametrize(
    "options",
    [{"split": "dev"}, {"split": None}, {"split": 1}, {"spilt": "test"}, {"split": "test", "x": 0}],
)
def test_bad_reset_options_raise(options):
    env = ICLEnv("ICL-SymbolTemplate-v0")
    with pytest.raises(ValueError, match=r"split|options") as err:
        env.reset(seed=0, options=options)
    assert "validation" in str(err.value) or "('split',)" in str(err.value)
    venv = ICLVectorEnv(2, "ICL-MarkovChain-v0")
    with pytest.raises(ValueError, match=r"split|options"):
        venv.reset(seed=0, options=options)
    with pytest.raises(ValueError, match="split"):
        ICLEnv("ICL-SymbolTemplate-v0", split="dev")


@pytest.mark.parametrize("preset", ["aba_abb", "majority4"])
def test_class_action_passes_both_checkers_and_scores_the_class(preset):
    kwargs = {"preset": preset, "label_type": "classification", "action": "class"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make("ICL-SymbolTemplate-v0", **kwargs)
        check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)
        check_env(gym.make("ICL-SymbolTemplate-v0", render_mode="ansi", **kwargs).unwrapped)
    task = env.unwrapped.task
    assert env.action_space == gym.spaces.Discrete(len(task.label_set))
    for episode in range(5):
        env.reset(seed=episode)
        _obs, reward, _, _, step_info = env.step(0)
        label = step_info["label"]
        assert task.class_tokens[label] == _obs[-1]
        assert reward == float(label == 0) and step_info["regret"] == 1.0 - reward
        env.reset(seed=episode)  # the same episode again
        _obs, reward, _, _, step_info = env.step(np.int64(label))
        assert reward == 1.0 and step_info["regret"] == 0.0
    with pytest.raises(ValueError, match="class action"):
        env.reset(seed=0)
        env.unwrapped.step(len(task.label_set))
    venv = gym.make_vec("ICL-SymbolTemplate-v0", num_envs=6, **kwargs)
    venv.reset(seed=0)
    _, reward, _, _, step_info = venv.step(np.zeros(6, np.int64))
    np.testing.assert_array_equal(reward, (step_info["label"] == 0).astype(float))
    venv.step(np.zeros(6, np.int64))  # next-step autoreset
    venv.reset(seed=0)  # the same round again, now answered right
    _, reward, _, _, step_info = venv.step(step_info["label"])
    np.testing.assert_array_equal(reward, np.ones(6))
    np.testing.assert_array_equal(step_info["regret"], np.zeros(6))
    venv.step(np.zeros(6, np.int64))  # next-step autoreset (the action is ignored)
    with pytest.raises(ValueError, match="class action"):
        venv.step(np.full(6, len(task.label_set)))


@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [
        ("ICL-SymbolTemplate-v0", {}),
        ("ICL-SymbolCopy-v0", {}),
        ("ICL-MarkovChain-v0", {}),
    ],
)
def test_class_action_needs_a_task_with_classes(env_id, kwargs):
    with pytest.raises(ValueError, match="needs a task with classes"):
        gym.make(env_id, action="class", **kwargs)
    with pytest.raises(ValueError, match="needs a task with classes"):
        gym.make_vec(env_id, num_envs=2, action="class", **kwargs)


@pytest.mark.parametrize("action", ["token", "class", "value"])
def test_template_envs_with_split_options_pass_both_checkers(action):
    label_type = "classification" if action == "class" else "regression"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make("ICL-SymbolTemplate-v0", split="val", action=action, label_type=label_type)
        assert env.unwrapped.split == "validation"
        check_env(env.unwrapped)
        env.reset(seed=0, options={"split": "test"})
        check_env(env.unwrapped)  # now on the test split (seeded resets keep it)
        sb3_check_env(env.unwrapped)
        assert env.unwrapped.split == "test"
        _, info = env.reset(seed=0)
        assert info["split"] == "test"


# ------------------------------------------------------------- issue 8: real clients
ALL_IDS = iclgym.list_envs()
REGRESSION_IDS = ["ICL-SymbolTemplate-v0", "ICL-SameDifferent-v0"]


def _modes(env_id):
    """(action, overrides) pairs every id supports, plus value / class where the task has them."""
    modes = [("token", {}), ("distribution", {}), ("logits", {})]
    if env_id in REGRESSION_IDS:
        modes.append(("value", {}))
    if env_id == "ICL-SymbolTemplate-v0":
        modes.append(("class", {"label_type": "classification"}))
    return modes


@pytest.mark.parametrize("env_id", ALL_IDS)
@pytest.mark.parametrize("observation", ["context", "token", "window"])
def test_space_parameters_are_int64_and_sb3_one_hot_sizes_are_right(env_id, observation):
    from stable_baselines3.common.preprocessing import get_flattened_obs_dim

    env = gym.make(env_id, observation=observation)
    task = env.unwrapped.task
    full = env.observation_space
    # feature tasks observe Dict(tokens, features) (SB3's MultiInputPolicy flattens each key)
    space = full["tokens"] if isinstance(full, gym.spaces.Dict) else full
    v, t = task.vocab_size, task.seq_len
    if observation == "token":
        assert space == gym.spaces.Discrete(v) and space.n.dtype == np.int64
        expected = v
    else:
        width = t + 1 if observation == "context" else min(8, t + 1)
        assert space.nvec.dtype == np.int64 and space.nvec.shape == (width,)
        assert (space.nvec == v + 1).all()
        expected = width * (v + 1)
    dim = get_flattened_obs_dim(space)  # SB3 sums nvec with Python's sum, in nvec's dtype
    assert np.asarray(dim).dtype == np.int64 and dim == expected
    if env_id == "ICL-MarkovChain-v0" and observation == "context":
        assert dim == 404  # 101 positions x 4 ids (issue 8: uint8 made it 148)
    obs, _ = env.reset(seed=0)
    assert obs in full
    venv = gym.make_vec(env_id, num_envs=3, observation=observation)
    assert venv.single_observation_space == full
    vobs, _ = venv.reset(seed=0)
    assert vobs in venv.observation_space
    vspace = venv.observation_space
    vtokens = vspace["tokens"] if isinstance(vspace, gym.spaces.Dict) else vspace
    assert vtokens.dtype == np.int64
    for action, overrides in _modes(env_id):
        act_space = gym.make(env_id, action=action, **overrides).action_space
        if isinstance(act_space, gym.spaces.Discrete):
            assert act_space.n.dtype == np.int64
        else:
            assert all(type(n) is int for n in act_space.shape)


def _boundary_actions(space):
    """Corner points of an action space: the bounds of a Box (and zero), 0 and n - 1 of a
    Discrete."""
    if isinstance(space, gym.spaces.Discrete):
        return [np.int64(0), np.int64(space.n - 1), 0, int(space.n - 1)]
    points = [space.low.copy(), space.high.copy(), np.zeros(space.shape, space.dtype)]
    mixed = space.low.copy()
    mixed[::2] = space.high[::2]
    return [*points, mixed]


def _step_all(env_id, action_mode, overrides, actions):
    """Step a fresh single env and a 2-env vector env with each action (resetting as
    needed); every result must be finite."""
    env = gym.make(env_id, action=action_mode, **overrides)
    venv = gym.make_vec(env_id, num_envs=2, action=action_mode, **overrides)
    env.reset(seed=0)
    venv.reset(seed=0)
    for a in actions:
        assert a in env.action_space
        _, reward, terminated, _, info = env.step(a)
        assert np.isfinite(reward) and np.isfinite(info["regret"])
        if "kl" in info:
            assert np.isfinite(info["kl"]) and info["kl"] >= -1e-6
        if terminated:
            env.reset()
        _, rewards, _, _, vinfo = venv.step(np.stack([np.asarray(a)] * 2))
        assert np.isfinite(rewards).all()  # an autoreset step (no "regret") scores nothing
        assert np.isfinite(vinfo.get("regret", 0.0)).all()


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_every_action_inside_the_space_is_valid(env_id):
    """Issue 8 / DESIGN: sampled actions and the corners of every action space step in both
    envs (SB3 clips Gaussian actions to the bounds, so corners are common)."""
    for action_mode, overrides in _modes(env_id):
        space = gym.make(env_id, action=action_mode, **overrides).action_space
        space.seed(0)
        actions = [space.sample() for _ in range(30)] + _boundary_actions(space)
        _step_all(env_id, action_mode, overrides, actions)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.floats(0.0, 1.0, width=32, allow_subnormal=True) | st.just(0.0),
        min_size=3,
        max_size=3,
    ),
    st.sampled_from(["distribution", "logits"]),
    st.sampled_from([0.5, 5.0, 400.0, 1e6]),
)
def test_any_box_point_is_a_valid_distribution_or_logits_action(values, action_mode, scale):
    """Every point of the Box at any logit_scale (a reviewer's logit_scale=400 scored the
    in-space corner [1, -1, -1] -inf: softmax underflowed to 0 before the floor existed)."""
    a = np.asarray(values, dtype=np.float32)
    overrides = {"seq_len": 4}
    if action_mode == "logits":
        a = 2 * a - 1
        overrides["logit_scale"] = scale
    _step_all(
        "ICL-MarkovChain-v0", action_mode, overrides, [a, -a if action_mode == "logits" else a]
    )


@pytest.mark.parametrize("action", ["distribution", "logits"])
def test_probability_rewards_are_bounded_by_the_floor(action):
    """A probability action puts at least PROB_FLOOR / (1 + V PROB_FLOOR) on every token, so
    the log-prob reward is never below its log (logits at scale 1e6: exp underflows to 0)."""
    from iclgym.envs import PROB_FLOOR

    env = gym.make("ICL-MarkovChain-v0", action=action, logit_scale=1e6)
    env.reset(seed=0)
    v = env.unwrapped.vocab_size
    bound = np.log(PROB_FLOOR / (1 + v * PROB_FLOOR))
    worst = np.inf
    for t in range(30):
        a = np.full(v, -1.0 if action == "logits" else 0.0, np.float32)
        a[t % v] = 1.0
        _, reward, terminated, _, info = env.step(a)
        assert bound - 1e-9 <= reward <= 0 and np.isfinite(info["kl"])
        worst = min(worst, reward)
        if terminated:
            env.reset()
    assert worst < bound + 1e-3  # the floor is reached: a missed token scores its log


@pytest.mark.parametrize("env_id", ["ICL-MarkovChain-v0", "ICL-SymbolCopy-v0"])
def test_zero_distribution_is_the_uniform_distribution(env_id):
    env = gym.make(env_id, action="distribution")
    v = env.unwrapped.vocab_size
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(v, np.float32))
    assert reward == pytest.approx(np.log(1.0 / v))
    same = gym.make(env_id, action="distribution")
    same.reset(seed=0)
    _, reward_uniform, _, _, info_uniform = same.step(np.ones(v, np.float32))
    assert reward == pytest.approx(reward_uniform) and info["kl"] == pytest.approx(
        info_uniform["kl"]
    )
    venv = gym.make_vec(env_id, num_envs=3, action="distribution")
    venv.reset(seed=0)
    _, rewards, *_ = venv.step(np.zeros((3, v), np.float32))
    np.testing.assert_allclose(rewards, np.log(1.0 / v), rtol=1e-6)


@pytest.mark.parametrize(
    ("env_id", "action_mode", "overrides", "bad"),
    [
        ("ICL-SameDifferent-v0", "value", {}, np.array([1.0001], np.float64)),
        ("ICL-SameDifferent-v0", "value", {}, np.array([np.nan], np.float32)),
        ("ICL-SymbolTemplate-v0", "class", {"label_type": "classification"}, 2),
        ("ICL-SymbolTemplate-v0", "class", {"label_type": "classification"}, -1),
        ("ICL-SymbolCopy-v0", "token", {}, 1795),
        ("ICL-SymbolCopy-v0", "distribution", {}, np.full(1795, np.nan, np.float32)),
    ],
)
def test_actions_outside_the_space_raise(env_id, action_mode, overrides, bad):
    env = ICLEnv(env_id, action=action_mode, **overrides)
    assert bad not in env.action_space
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(bad)
    venv = ICLVectorEnv(2, env_id, action=action_mode, **overrides)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        venv.step(np.stack([np.asarray(bad)] * 2))


@pytest.mark.parametrize("env_id", ["ICL-MarkovChain-v0", "ICL-SymbolTemplate-v0"])
def test_window_is_an_int_from_1_to_seq_len_plus_1(env_id):
    task_len = gym.make(env_id).unwrapped.seq_len
    full = gym.make(env_id, observation="window", window=task_len + 1)
    obs, _ = full.reset(seed=0)
    assert obs.shape == (task_len + 1,)
    assert gym.make(env_id, observation="window").observation_space.shape == (min(8, task_len + 1),)
    for bad in (0, task_len + 2, 10**9, True, 2.0):
        with pytest.raises(ValueError, match=r"window=.* is invalid: expected an int"):
            gym.make(env_id, observation="window", window=bad)
        with pytest.raises(ValueError, match="window"):
            ICLVectorEnv(2, env_id, observation="window", window=bad)


def test_impossible_num_envs_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"num_envs=1000000000 is invalid: .* would take .*iB"):
        ICLVectorEnv(10**9, "ICL-MarkovChain-v0")


def test_numpy_numbers_are_accepted_where_python_numbers_are():
    kwargs = {"observation": "window", "action": "logits", "seq_len": 12}
    plain = gym.make_vec(
        "ICL-MarkovChain-v0", num_envs=3, window=4, logit_scale=2.0, max_episode_steps=5, **kwargs
    )
    numpy = gym.make_vec(
        "ICL-MarkovChain-v0",
        num_envs=np.int64(3),
        window=np.int32(4),
        logit_scale=np.float32(2.0),
        max_episode_steps=np.uint8(5),
        **kwargs,
    )
    assert numpy.num_envs == 3 and type(numpy.num_envs) is int
    a, b = plain.reset(seed=1), numpy.reset(seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    action = np.full((3, 3), 0.5, np.float32)
    for _ in range(6):
        ra, rb = plain.step(action), numpy.step(action)
        np.testing.assert_array_equal(ra[0], rb[0])
        np.testing.assert_allclose(ra[1], rb[1])
        np.testing.assert_array_equal(ra[3], rb[3])
    single = gym.make("ICL-MarkovChain-v0", window=np.int64(4), logit_scale=np.float64(2), **kwargs)
    assert single.observation_space.shape == (4,)
    for name, value in (("num_envs", True), ("max_episode_steps", np.bool_(True))):
        with pytest.raises(ValueError, match=name):
            ICLVectorEnv(**{"num_envs": 2, name: value, "env_id": "ICL-MarkovChain-v0"})
    with pytest.raises(ValueError, match="logit_scale"):
        ICLEnv("ICL-MarkovChain-v0", logit_scale=True)


def _trajectory(env, actions, vector):
    """Observations, rewards, flags and comparable info of stepping ``actions``."""
    out = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        kept = {k: v for k, v in info.items() if k != "split"}
        out.append((obs, reward, terminated, truncated, kept))
        if not vector and (terminated or truncated):
            out.append(env.reset())
    return out


@pytest.mark.parametrize("env_id", ALL_IDS)
@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_envs_copy_mid_episode_and_the_copy_continues_the_stream(env_id, copier):
    import copy
    import pickle

    clone = copy.deepcopy if copier == "deepcopy" else lambda e: pickle.loads(pickle.dumps(e))
    venv = ICLVectorEnv(8, env_id)
    venv.reset(seed=0)
    actions = [np.zeros(8, np.int64)] * 240
    _trajectory(venv, actions[:5], True)  # mid-episode (Markov) / between rounds (templates)
    copied = clone(venv)
    np.testing.assert_equal(_trajectory(venv, actions, True), _trajectory(copied, actions, True))
    venv.close()
    copied.close()
    env = ICLEnv(env_id)
    env.reset(seed=0)
    if env.step(0)[2]:  # one-step episodes: copy at the start of the next one
        env.reset()
    copied = clone(env)
    singles = [0] * 150
    np.testing.assert_equal(_trajectory(env, singles, False), _trajectory(copied, singles, False))


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_online_laws_are_the_task_laws_at_the_scored_positions(env_id):
    """The envs' per-step laws (task.online) equal the dense truth and oracle (or, for point
    masses, their one-hot token), and both envs name the online oracle."""
    from iclgym.envs import is_point

    env = gym.make(env_id)
    venv = gym.make_vec(env_id, num_envs=2)
    task = env.unwrapped.task
    assert env.unwrapped.online_oracle == venv.unwrapped.online_oracle == task.online_oracle
    assert isinstance(task.online_oracle, str) and task.online_oracle
    batch = task.sample(16, generator=task.generator(3))
    dense_true = batch.true_probs.numpy()
    dense_oracle = task.oracle(batch).exp().numpy()
    exact = task.online_oracle == task.oracle_name  # else a named approximation (Markov)
    step = task.online(batch)
    for t in range(task.first_scored_position, task.seq_len):
        true, oracle = step(t)
        pairs = [(true, dense_true[:, t])]
        if exact:
            pairs.append((oracle, dense_oracle[:, t]))
        else:
            np.testing.assert_allclose(oracle.sum(-1), 1.0, rtol=1e-5)
        for law, dense in pairs:
            if is_point(law):
                assert law.shape == (16,)
                np.testing.assert_allclose(dense[np.arange(16), law], 1.0, atol=1e-6)
            else:
                np.testing.assert_allclose(law, dense, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("env_id", ["ICL-MarkovChain-v0", "ICL-SymbolTemplate-v0"])
def test_rgb_array_frames_show_the_tokens_and_the_regret_of_each_step(env_id):
    from iclgym.envs import CELL_PIXELS, FRAME_CELLS, PALETTE

    env = gym.make(env_id, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (2 * CELL_PIXELS, FRAME_CELLS * CELL_PIXELS, 3)
    assert frame.dtype == np.uint8
    first = env.unwrapped.first
    last_cell = (FRAME_CELLS - 1) * CELL_PIXELS + CELL_PIXELS // 2
    token = int(obs[first])
    np.testing.assert_array_equal(frame[CELL_PIXELS // 2, last_cell], PALETTE[token % 64])
    assert (frame[CELL_PIXELS + CELL_PIXELS // 2, last_cell] == 0).all()  # no step yet
    *_, info = env.step(0)
    frame = env.render()
    below = frame[CELL_PIXELS + CELL_PIXELS // 2, last_cell]
    green = info["regret"] <= 0
    assert (below[1] > below[0]) == green
    venv = gym.make_vec(env_id, num_envs=3, render_mode="rgb_array")
    venv.reset(seed=0)
    frames = venv.render()
    assert len(frames) == 3 and all(f.shape == frame.shape for f in frames)


# ------------------------------------------------------------------------ benchmark
def test_speed_refuses_a_budget_it_cannot_measure_and_a_row_can_fail():
    from iclgym.speed import MIN_SECONDS, Row, format_table, run

    for seconds in (0, 0.0, MIN_SECONDS / 2, -1.0, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            run(seconds=seconds, progress=False)
    with pytest.raises(ValueError, match="repeats"):
        run(repeats=0, progress=False)
    with pytest.raises(ValueError, match="env_ids"):
        run(env_ids=["CartPole-v1"], progress=False)
    slow = Row("ICL-X-v0 gym.make step", 5.0e4, "steps/s", 1.0e5, ">= CartPole")
    fast = Row("ICL-Y-v0 gym.make step", 2.0e5, "steps/s", 1.0e5, ">= CartPole")
    nothing = Row("ICL-Z-v0 gym.make step", 0.0, "steps/s", 0.0, ">= CartPole")
    assert (slow.ok, fast.ok, nothing.ok) == (False, True, False)
    table = format_table([slow, fast, nothing]).splitlines()
    assert table[2].endswith("NO") and table[3].endswith("yes") and table[4].endswith("NO")


@pytest.mark.parametrize("env_id", ALL_IDS)
@pytest.mark.parametrize("observation", ["context", "token", "window"])
def test_both_checkers_pass_on_every_id_mode_and_render_mode(env_id, observation):
    """Gymnasium's check_env (which also makes every declared render mode) and the passive
    checker that gym.make wraps around the env, warnings as errors; SB3's checker where its
    conventions apply (it wants Box actions in [-1, 1])."""
    for action, overrides in _modes(env_id):
        kwargs = {"observation": observation, "action": action, **overrides}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            env = gym.make(env_id, **kwargs)  # PassiveEnvChecker is the outer wrapper
            env.action_space.seed(0)
            env.reset(seed=0)
            for _ in range(3):
                *_, terminated, truncated, _ = env.step(env.action_space.sample())
                if terminated or truncated:
                    env.reset()
            check_env(env.unwrapped)
            space = env.unwrapped.action_space
            box = isinstance(space, gym.spaces.Box)
            if not box or ((space.low == -1).all() and (space.high == 1).all()):
                # SB3 only recommends flattening the (T, F) feature Box of feature tasks;
                # its MultiInput policies flatten it (tests/test_clients.py trains on it)
                warnings.filterwarnings("ignore", "Your observation features has an unconv")
                sb3_check_env(env.unwrapped)


@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [
        ("ICL-SparseContextualBigram-v0", {}),  # the family's default reward
        ("ICL-MarkovChain-v0", {"reward": "squared", "seq_len": 12}),
        ("ICL-SymbolTemplate-v0", {"reward": "squared"}),  # point-mass laws at the label
    ],
)
def test_squared_reward_is_the_negated_brier_score_of_the_raw_action(env_id, kwargs):
    """reward = -||e_y - f||^2 with f the action as given (here unnormalised, distinct
    entries, so y is read back from the reward), the regret is the oracle's squared reward
    minus it, and the mean reward over steps is its expectation 2<f, p> - 1 - ||f||^2 under
    the true law p (within 4 standard errors)."""
    env = ICLVectorEnv(64, env_id, action="distribution", **kwargs)
    assert env.reward_mode == "squared"
    v = env.vocab_size
    f = np.linspace(0.05, 0.9, v)[np.random.default_rng(0).permutation(v)]
    f = f.astype(np.float32).astype(np.float64)  # the values the env reads from a float32 box
    env.reset(seed=1)
    deviations, live = [], np.ones(64, dtype=bool)  # next-step autoreset: skip reset steps
    for _ in range(60):
        _, reward, terminated, _, info = env.step(np.tile(f, (64, 1)).astype(np.float32))
        scored, live = live, ~terminated
        if not scored.any():
            continue
        info = {k: info[k][scored] for k in ("regret", *law_keys_of(info))}
        reward = reward[scored]
        y = np.abs(2 * f[None, :] - 1 - (f * f).sum() - reward[:, None]).argmin(1)
        np.testing.assert_allclose(reward, 2 * f[y] - 1 - (f * f).sum(), atol=1e-12)
        assert (-v <= reward).all() and (reward <= 0).all()  # [-2, 0] once f sums to 1
        if "oracle_probs" in info:
            o = info["oracle_probs"].astype(np.float64)
            oracle_reward = 2 * o[np.arange(len(y)), y] - 1 - (o * o).sum(1)
        else:
            oracle_reward = np.where(info["oracle_token"] == y, 0.0, -2.0)
        np.testing.assert_allclose(info["regret"], oracle_reward - reward, atol=1e-6)
        p = (
            info["true_probs"].astype(np.float64)
            if "true_probs" in info
            else np.eye(v)[info["true_token"]]
        )
        deviations.append(reward - (2 * p @ f - 1 - (f * f).sum()))
    d = np.concatenate(deviations)
    assert abs(d.mean()) <= 4 * d.std() / np.sqrt(d.size) + 1e-12


def law_keys_of(info: dict) -> list[str]:
    keys = ("true_probs", "oracle_probs", "true_token", "oracle_token")
    return [k for k in keys if k in info]


def test_reward_option_is_validated():
    with pytest.raises(ValueError, match="probability actions only"):
        gym.make("ICL-MarkovChain-v0", reward="squared")
    with pytest.raises(ValueError, match="reward='brier' is invalid"):
        gym.make("ICL-MarkovChain-v0", action="logits", reward="brier")
    env = gym.make("ICL-SparseContextualBigram-v0", action="logits", reward="logprob")
    env.reset(seed=0)
    _, reward, *_ = env.step(np.zeros(env.action_space.shape, np.float32))
    assert reward == pytest.approx(np.log(1 / 8))


@pytest.mark.parametrize(
    "env_id", ["ICL-MarkovChain-v0", "ICL-SymbolTemplate-v0", "ICL-MultiConcept-v0"]
)
@pytest.mark.parametrize("observation", ["context", "window", "token"])
def test_observation_at_rebuilds_what_the_env_shows(env_id, observation):
    """env.observation_at(tokens, features, t) equals the vector env's observation before its
    action at every scored t, from the sequences alone (read back from a context env on the
    same seed, whose terminal observation reveals every token and feature row)."""
    kwargs = {"seq_len": 12} if env_id == "ICL-MarkovChain-v0" else {}
    full = ICLVectorEnv(3, env_id, observation="context", **kwargs)
    env = ICLVectorEnv(3, env_id, observation=observation, window=4, **kwargs)
    shown, _ = env.reset(seed=5)
    last, _ = full.reset(seed=5)
    seen = []
    for _t in range(env.first, env.seq_len):
        seen.append(shown)
        action = np.zeros(3, dtype=np.int64)
        shown, *_ = env.step(action)
        last, *_ = full.step(action)
    tokens = last["tokens"] if isinstance(last, dict) else last
    features = last["features"] if isinstance(last, dict) else None
    for t, obs in zip(range(env.first, env.seq_len), seen, strict=True):
        rebuilt = env.observation_at(tokens[:, : env.seq_len], features, t)
        if isinstance(obs, dict):
            assert set(rebuilt) == set(obs)
            for key in obs:
                np.testing.assert_array_equal(rebuilt[key], obs[key])
        else:
            np.testing.assert_array_equal(rebuilt, obs)
        assert rebuilt in env.observation_space
    with pytest.raises(ValueError, match="scored positions"):
        env.observation_at(tokens[:, : env.seq_len], features, env.seq_len)


def test_action_probabilities_read_actions_as_the_env_scores_them():
    env = ICLVectorEnv(2, "ICL-MarkovChain-v0", action="logits", logit_scale=2.0)
    a = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]], dtype=np.float32)
    z = np.exp(2.0 * a.astype(np.float64))
    np.testing.assert_allclose(env.action_probabilities(a), z / z.sum(-1, keepdims=True))
    dist = ICLVectorEnv(2, "ICL-MarkovChain-v0", action="distribution")
    q = dist.action_probabilities(np.array([[0.0, 0.0, 0.0], [2e-7, 0.5, 0.5]]))
    np.testing.assert_allclose(q[0], 1 / 3)
    assert q[1, 0] > 2e-7 and np.isclose(q.sum(-1), 1).all()  # floored at 1e-6
    with pytest.raises(ValueError, match="action_probabilities"):
        ICLVectorEnv(2, "ICL-MarkovChain-v0").action_probabilities(a)


def test_val_alias_is_accepted_wherever_a_split_is():
    """'val' names the validation split at every entry point (reported: the env took it, the
    task's generator, evaluate and `iclgym eval --split val` refused it)."""
    from iclgym.harness import HeldOut
    from iclgym.harness.train import TrainConfig

    task = iclgym.make_task("ICL-SparseContextualBigram-v0")
    a = task.sample(8, generator=task.generator(0, "val"))
    b = task.sample(8, generator=task.generator(0, "validation"))
    assert torch.equal(a.tokens, b.tokens) and task.generator(0, "val").split == "validation"
    held = [HeldOut(task, split=s, seed=1, num_sequences=8) for s in ("val", "validation")]
    assert torch.equal(held[0].parts[0].batch.tokens, held[1].parts[0].batch.tokens)
    assert TrainConfig(eval_splits=("val", "test")).eval_splits == ("validation", "test")
    assert main(["eval", "ICL-SparseContextualBigram-v0", "--split", "val", "--json",
                 "--num-sequences", "8"]) == 0  # fmt: skip


@pytest.mark.parametrize("order", [4, 5])
def test_ngram_envs_of_high_order_pass_the_checker(order):
    """A reviewer's case: positions inside the first context got one shared uniform array as
    info["oracle_probs"], so writing into one step's info changed the next step's and
    check_env failed ("infos ... share an object") from order 4 on."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make("ICL-NGram-v0", order=order, seq_len=order + 2).unwrapped)


def test_step_infos_never_share_arrays_whatever_online_returns(monkeypatch):
    """The envs guard Gymnasium's contract for any task: an online function that returns one
    array for every position and for both laws still gives every step writable arrays of its
    own (the vector env's info["split"] is one read-only broadcast view by design: nothing
    can write through it)."""
    from iclgym.tasks.markov import MarkovChainTask

    def shared_online(self, batch):
        law = np.full((batch.batch_size, self.vocab_size), 1.0 / self.vocab_size, np.float32)
        return lambda t: (law, law)

    monkeypatch.setattr(MarkovChainTask, "online", shared_online)

    def arrays(info):
        return [
            v
            for v in info.values()
            if isinstance(v, np.ndarray) and v.ndim >= 1 and v.flags.writeable
        ]

    for make in (
        lambda: gym.make("ICL-MarkovChain-v0", seq_len=6),
        lambda: gym.make_vec("ICL-MarkovChain-v0", num_envs=3, seq_len=6),
    ):
        env = make()
        env.reset(seed=0)
        kept = []
        for _ in range(5):
            *_, info = env.step(env.action_space.sample())
            step = arrays(info)
            assert len(step) >= 2
            kept.append(step)
        flat = [a for step in kept for a in step]
        for i, a in enumerate(flat):
            for b in flat[i + 1 :]:
                assert not np.shares_memory(a, b)


@pytest.mark.parametrize(
    ("env_id", "action", "bad", "shape"),
    [
        ("ICL-MarkovChain-v0", "distribution", np.full((1, 3), 1 / 3), "(1, 3)"),
        ("ICL-MarkovChain-v0", "logits", np.zeros(4), "(4,)"),
        ("ICL-SameDifferent-v0", "value", 0.5, "()"),
        ("ICL-SameDifferent-v0", "value", np.array([[0.5]]), "(1, 1)"),
    ],
)
def test_single_env_shape_errors_name_the_action_and_its_space(env_id, action, bad, shape):
    """A reviewer's case: the single env scores a batch of one, and its errors named that
    internal shape ("action shape (1, 1, 3) is not (1, 3)" for a (1, 3) action)."""
    env = gym.make(env_id, action=action).unwrapped
    env.reset(seed=0)
    want = re.escape(f"action shape {shape} is not {env.action_space.shape}")
    with pytest.raises(ValueError, match=want):
        env.step(bad)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: gym.make("ICL-MarkovChain-v0", num_state=4), "num_state"),
        (lambda: gym.make("ICL-SymbolTemplate-v0", obsevation="token"), "obsevation"),
        (lambda: gym.make_vec("ICL-PriorityGraph-v0", num_envs=2, num_token=4), "num_token"),
        (
            lambda: gym.make_vec(
                "ICL-MarkovChain-v0", num_envs=2, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
            ),
            "autoreset_mode",
        ),
    ],
)
def test_misspelt_env_keywords_raise_value_errors_listing_the_valid_ones(make, name):
    """A reviewer's case: gym.make with a misspelt keyword raised a TypeError naming the spec
    dataclass; make_task's ValueError lists the valid keys, and the env path now does too,
    with the env's own arguments (and the native env's one autoreset mode)."""
    with pytest.raises(ValueError, match=f"spec key '{name}' is invalid") as err:
        make()
    message = str(err.value)
    assert "expected one of " in message and "or an env argument: " in message
    assert "observation" in message and "logit_scale" in message
    if name == "autoreset_mode":
        assert "next-step only" in message


def test_multi_concept_with_several_queries_steps_once_per_query():
    """num_queries = 3 (the same demonstrations for three queries): both checkers' contract,
    three scored steps per episode in the single and the native vector env, each step's
    oracle law the task's exact posterior at that query."""
    env = gym.make("ICL-MultiConcept-v0", num_queries=3, sigma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    task = env.unwrapped.task
    first = task.first_scored_position
    env.reset(seed=3)
    steps, done = 0, False
    while not done:
        _, reward, done, truncated, info = env.step(env.action_space.sample())
        assert info["t"] == first + steps and reward in (0.0, 1.0) and not truncated
        steps += 1
    assert steps == 3 and info["query_y"] in (-1, 1)
    venv = gym.make_vec("ICL-MultiConcept-v0", num_envs=4, num_queries=3, sigma=0.5)
    venv.reset(seed=3)
    flags = [venv.step(venv.action_space.sample())[2] for _ in range(3)]
    assert [bool(f.all()) for f in flags] == [False, False, True]
    # A reviewer's cases: the single env scored queries 0 .. Q - 2 against the next query's
    # placeholder (a constant action scored 1.0), and the native vector env's context
    # observation showed each query's label once scored. Each step scores its own query's
    # label (without label noise the true law is one-hot on it) and no label is shown
    # before the episode ends, in both envs.
    L = task.spec.num_demos
    for env in (gym.make("ICL-MultiConcept-v0", num_queries=3),
                gym.make_vec("ICL-MultiConcept-v0", num_envs=64, num_queries=3)):  # fmt: skip
        vector = hasattr(env, "num_envs")
        for episode in range(1 if vector else 40):  # 64 vector envs, or 40 single episodes
            obs, _ = env.reset(seed=episode)
            for j in range(3):
                action = np.zeros(64, np.int64) if vector else 0
                obs, reward, *_, info = env.step(action)
                label = np.asarray(info["true_probs"]).argmax(-1)
                np.testing.assert_array_equal(reward, (label == 0).astype(float))
                if j < 2:  # revealed query slots hold the placeholder 0, the rest PAD (2)
                    assert (obs["tokens"][..., L : L + j + 2] == 0).all()
                    assert (obs["tokens"][..., L + j + 2 :] == 2).all()
        if vector:
            env.close()
    batch = task.sample(64, generator=task.generator(0, "test"))
    online, oracle = task.online(batch), task.oracle(batch).exp().numpy()
    for t in range(first, first + 3):
        np.testing.assert_allclose(online(t)[1], oracle[:, t], atol=1e-6)


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_vector_env_with_one_env_reproduces_single_env_for_every_id(env_id):
    # Each block of episodes has its own seed, so the block size is part of the stream: with
    # one sub-env the vector env draws the single env's blocks (episodes across a block edge).
    single, vector = ICLEnv(env_id), ICLVectorEnv(1, env_id)
    per_block = block_sequences(single.task, 1, SINGLE_MIN_STEPS)
    steps = single.seq_len - single.first
    if per_block * steps > 3000:  # long blocks: compare the first episodes only
        per_block = 0
    o1, _ = single.reset(seed=5)
    o2, _ = vector.reset(seed=5)
    np.testing.assert_equal(o1, _first_row(o2))
    for _episode in range(per_block + 2):
        for _ in range(steps):
            o1, r1, term1, _, _ = single.step(0)
            o2, r2, term2, _, _ = vector.step(np.zeros(1, np.int64))
            np.testing.assert_equal(o1, _first_row(o2))
            assert r1 == pytest.approx(r2[0], rel=1e-6) and term1 == term2[0]
        o1, _ = single.reset()
        o2 = vector.step(np.zeros(1, np.int64))[0]  # next-step autoreset
        np.testing.assert_equal(o1, _first_row(o2))
    vector.close()


def _first_row(obs):
    return {k: v[0] for k, v in obs.items()} if isinstance(obs, dict) else obs[0]


@pytest.mark.parametrize(
    "env_id", ["ICL-PriorityGraph-v0", "ICL-SparseContextualBigram-v0", "ICL-MarkovChain-v0"]
)
def test_vector_env_rounds_do_not_depend_on_the_workers(env_id, monkeypatch):
    # blocks are seeded in order and prepared by WORKERS threads: whichever finishes first,
    # the rounds are the same as with one worker preparing one block ahead (LOOKAHEAD 1)
    import iclgym.envs as envs

    runs = []
    for workers, lookahead in ((1, 1), (2, 3), (3, 2)):
        monkeypatch.setattr(envs, "WORKERS", workers)
        monkeypatch.setattr(envs, "LOOKAHEAD", lookahead)
        kwargs = {"seq_len": 5} if "Markov" in env_id else {}
        venv = ICLVectorEnv(64, env_id, **kwargs)
        venv.block = 128  # two rounds a block: many blocks in a short run
        venv.reset(seed=1)
        runs.append(_trajectory(venv, [np.zeros(64, np.int64)] * 40, True))
        venv.close()
    np.testing.assert_equal(runs[0], runs[1])
    np.testing.assert_equal(runs[0], runs[2])


class _FailingTask(iclgym.tasks.priority_graph.PriorityGraphTask):
    """A planted priority-graph task whose ``fail_at``-th sampler call raises."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(num_tokens=8, context_len=6)
        self.fail_at, self.calls = fail_at, 0

    def sample(self, batch_size, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("sampler failed")
        return super().sample(batch_size, **kwargs)


@pytest.mark.parametrize("waited_by", ["step", "pickle", "fork"])
def test_a_block_workers_error_is_raised_at_every_step_and_never_skipped(waited_by):
    # A reviewer's cases: the error of a failed block was dropped when a fork or a pickle
    # waited for the workers (the blocks after it too), and a step after the error went on
    # with the next block, skipping one seed's episodes without a sign.
    import pickle

    import iclgym.envs as envs

    venv = ICLVectorEnv(64, task=_FailingTask(fail_at=3))
    venv.block = 128
    venv.reset(seed=0)
    if waited_by == "pickle":
        with pytest.raises(RuntimeError, match="sampler failed"):
            pickle.dumps(venv)
    elif waited_by == "fork":
        envs._before_fork()  # what os.fork runs first; it never raises
    for _ in range(2):  # two steps past the failure point: the same error both times
        with pytest.raises(RuntimeError, match="sampler failed"):
            for _step in range(20):
                venv.step(np.zeros(64, np.int64))
    venv.close()


def test_a_closed_vector_env_refuses_to_step_and_leaves_no_worker_threads():
    import time

    venv = ICLVectorEnv(16, "ICL-PriorityGraph-v0")
    venv.reset(seed=0)
    venv.step(np.zeros(16, np.int64))
    workers = list(venv._rounds._pool._threads)  # this env's (other tests' envs may live on)
    assert workers
    venv.close()
    with pytest.raises(RuntimeError, match="closed"):
        venv.step(np.zeros(16, np.int64))
    with pytest.raises(RuntimeError, match="closed"):
        venv.reset(seed=1)
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in workers):
        assert time.monotonic() < deadline, "block workers still running after close()"
        time.sleep(0.05)


def test_vector_env_truncates_at_the_limit_as_gym_make_does():
    # Gymnasium's TimeLimit (gym.make) sets truncated at the limit even on the terminating
    # step; the native vector env flagged only terminated there
    single = gym.make("ICL-PriorityGraph-v0", max_episode_steps=1)
    vector = gym.make_vec("ICL-PriorityGraph-v0", num_envs=1, max_episode_steps=1)
    single.reset(seed=0)
    vector.reset(seed=0)
    _, _, term1, trunc1, _ = single.step(0)
    _, _, term2, trunc2, _ = vector.step(np.zeros(1, np.int64))
    assert (term1, trunc1) == (term2[0], trunc2[0]) == (True, True)
    vector.close()
