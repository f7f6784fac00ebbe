"""BanditFeedback (``iclgym.wrappers``; ``docs/envs/clients.md``): reward 1[correct], the
next token revealed only after a correct prediction, nothing leaked through info; both
checkers; SB3 through make_vec_env."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.env_util import make_vec_env

import iclgym  # noqa: F401
from iclgym.wrappers import KEPT_INFO, BanditFeedback

CASES = [
    ("ICL-MarkovChain-v0", {"seq_len": 12}),
    ("ICL-SymbolCopy-v0", {}),
    ("ICL-MultiConcept-v0", {"num_demos": 6}),
]


@pytest.mark.parametrize(("env_id", "kwargs"), CASES)
@pytest.mark.parametrize("observation", ["context", "window", "token"])
def test_hidden_exactly_after_wrong_predictions(env_id, kwargs, observation):
    """Next to the plain env on the same seed: the same rewards; each observation equals the
    plain one except the positions after a wrong prediction, which show HIDDEN = V + 1; info
    keeps t and split and adds correct and the pseudo-regret max p - p(a)."""
    make = lambda: gym.make(env_id, observation=observation, window=3, **kwargs)  # noqa: E731
    plain, bandit = make(), BanditFeedback(make())
    v = plain.unwrapped.vocab_size
    rng = np.random.default_rng(0)
    for episode in range(3):
        a, info_a = plain.reset(seed=episode)
        b, _ = bandit.reset(seed=episode)
        hidden, t, done = set(), plain.unwrapped.first, False
        while True:
            _compare(a, b, hidden, t, observation, v, plain.unwrapped)
            assert b in bandit.observation_space
            if done:
                break
            action = int(rng.integers(v))
            a, r_a, done, _, info_a = plain.step(action)
            b, r_b, done_b, _, info_b = bandit.step(action)
            assert r_a == r_b and done == done_b and info_b["correct"] == (r_b == 1.0)
            law = info_a.get("true_probs", info_a.get("true_token"))
            p = np.eye(v)[law] if np.ndim(law) == 0 else np.asarray(law, np.float64)
            assert info_b["regret"] == pytest.approx(p.max() - p[action])
            assert set(info_b) == {*KEPT_INFO, "correct", "regret"}
            if r_b != 1.0:
                hidden.add(t + 1)
            t += 1


def _compare(a, b, hidden, t, observation, v, env):
    if isinstance(a, dict):
        np.testing.assert_array_equal(a["features"], b["features"])
        a, b = a["tokens"], b["tokens"]
    if observation == "token":
        assert b == (v + 1 if t in hidden else a)
        return
    a, b = np.asarray(a), np.asarray(b)
    positions = np.arange(a.shape[0])
    if observation == "window":
        positions = positions + min(t, env.seq_len) - a.shape[0] + 1
    mask = np.isin(positions, list(hidden))
    assert (b[mask] == v + 1).all()
    np.testing.assert_array_equal(b[~mask], a[~mask])


@pytest.mark.parametrize(("env_id", "kwargs"), CASES)
def test_both_checkers_and_sb3(env_id, kwargs):
    env = BanditFeedback(gym.make(env_id, observation="window", **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", ".*is different from the unwrapped version")
        warnings.filterwarnings("ignore", "Your observation features has an unconv")
        check_env(env, skip_render_check=True)
        sb3_check_env(env)
    venv = make_vec_env(env_id, n_envs=2, seed=0, env_kwargs={"observation": "window", **kwargs},
                        wrapper_class=BanditFeedback)  # fmt: skip
    policy = (
        "MultiInputPolicy" if isinstance(venv.observation_space, gym.spaces.Dict) else "MlpPolicy"
    )
    model = PPO(policy, venv, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(256)
    assert model.num_timesteps >= 256
    venv.close()


def test_refuses_probability_actions():
    with pytest.raises(ValueError, match="action='token'"):
        BanditFeedback(gym.make("ICL-MarkovChain-v0", action="distribution"))


def test_features_observation_passes_unchanged():
    """``observation="features"`` (the float features Box alone): nothing to hide, and the
    features keep their values and dtype (they were once cast to token ids, all zeros)."""
    make = lambda: gym.make("ICL-MultiConcept-v0", observation="features")  # noqa: E731
    plain, bandit = make(), BanditFeedback(make())
    a, _ = plain.reset(seed=3)
    b, _ = bandit.reset(seed=3)
    for _ in range(3):
        assert b.dtype == np.float32 and np.array_equal(a, b) and np.abs(b).sum() > 0
        assert b in bandit.observation_space
        action = plain.action_space.sample()
        a, _, done, _, _ = plain.step(action)
        b, _, done_b, _, _ = bandit.step(action)
        assert done == done_b
        if done:
            a, _ = plain.reset()
            b, _ = bandit.reset()
