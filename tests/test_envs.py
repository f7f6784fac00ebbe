"""Envs: both checkers, seeding, single vs native vector semantics, bad actions."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import iclgym  # noqa: F401
from iclgym.envs import PROB_FLOOR, ICLEnv, ICLVectorEnv, first_argmax


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
        ("distribution", np.zeros(3, np.float32)),
        ("distribution", np.ones(4, np.float32)),
        ("logits", np.array([2.0, 0.0, 0.0], np.float32)),
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
        assert info["oracle_probs"][label] == pytest.approx(1.0)
        assert info["true_probs"][label] == 1.0
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
