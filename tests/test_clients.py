"""Real clients on every registered id (issue 8 section 3): SB3's ``make_vec_env`` with both
vector env classes, PPO and RecurrentPPO learning through it, and Gymnasium's async vector env
forked from a process that already ran torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector.utils import batch_space
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import iclgym

IDS = iclgym.list_envs()
REGRESSION = {"ICL-SymbolTemplate-v0", "ICL-SameDifferent-v0"}


def _modes(env_id: str) -> list[dict]:
    """Every observation and every SB3-usable action of an id (each at least once)."""
    modes = [
        {"observation": "context", "action": "token"},
        {"observation": "token", "action": "token"},
        {"observation": "window", "action": "token"},
        {"observation": "context", "action": "distribution"},
        {"observation": "window", "action": "logits"},
    ]
    if env_id in REGRESSION:
        modes.append({"observation": "context", "action": "value"})
    if env_id == "ICL-SymbolTemplate-v0":
        modes.append({"action": "class", "label_type": "classification"})
    return modes


def _policy(venv, flat: str, multi_input: str) -> str:
    """SB3's policy name for the observation: feature tasks observe Dict(tokens, features),
    which SB3 reads with its MultiInput policies (each key flattened, then concatenated)."""
    return multi_input if isinstance(venv.observation_space, gym.spaces.Dict) else flat


@pytest.mark.parametrize("env_id", IDS)
@pytest.mark.parametrize("vec_env_cls", [DummyVecEnv, SubprocVecEnv])
def test_make_vec_env_returns_a_working_vec_env(env_id, vec_env_cls):
    """make_vec_env passes render_mode="rgb_array" and retried only on TypeError; iclgym now
    renders rgb_array frames, as Gymnasium's own envs do. SubprocVecEnv starts its workers by
    forkserver, which import only what the id names: "iclgym:<id>" (Gymnasium's form for
    third-party ids; the fork start method with plain ids is tested below)."""
    name = env_id if vec_env_cls is DummyVecEnv else f"iclgym:{env_id}"
    venv = make_vec_env(name, n_envs=2, seed=0, vec_env_cls=vec_env_cls)
    try:
        obs = venv.reset()
        space = venv.observation_space
        parts = space.spaces if isinstance(space, gym.spaces.Dict) else {None: space}
        for key, part in parts.items():  # feature tasks: Dict(tokens, features)
            assert (obs if key is None else obs[key]).shape == (2, *part.shape)
        assert obs in batch_space(space, 2)
        for _ in range(5):
            actions = np.array([venv.action_space.sample() for _ in range(2)])
            obs, rewards, _, infos = venv.step(actions)
            assert rewards.shape == (2,) and np.isfinite(rewards).all()
            assert all("regret" in info for info in infos)
        frames = venv.get_images()
        assert len(frames) == 2 and all(f.dtype == np.uint8 and f.ndim == 3 for f in frames)
    finally:
        venv.close()


@pytest.mark.parametrize("env_id", IDS)
def test_ppo_learns_2048_steps_on_every_mode(env_id):
    for mode in _modes(env_id):
        venv = make_vec_env(env_id, n_envs=2, seed=0, env_kwargs=mode)
        model = PPO(
            _policy(venv, "MlpPolicy", "MultiInputPolicy"),
            venv,
            n_steps=256,
            batch_size=256,
            n_epochs=1,
            seed=0,
            device="cpu",
        )
        model.learn(2048)
        assert model.num_timesteps >= 2048, mode
        action, _ = model.predict(venv.reset(), deterministic=True)
        assert all(a in venv.action_space for a in action)
        venv.close()


@pytest.mark.parametrize("env_id", IDS)
def test_recurrent_ppo_learns_2048_steps_on_the_token_observation(env_id):
    """RecurrentPPO reads one token per step (docs/envs/clients.md). On MultiDiscrete
    observations SB3 sizes the LSTM with sum(nvec), a numpy integer that torch's LSTM
    refuses whatever its dtype, so the token observation is the recurrent one."""
    venv = make_vec_env(env_id, n_envs=2, seed=0, env_kwargs={"observation": "token"})
    model = RecurrentPPO(
        _policy(venv, "MlpLstmPolicy", "MultiInputLstmPolicy"),
        venv,
        n_steps=128,
        batch_size=128,
        n_epochs=1,
        seed=0,
        device="cpu",
    )
    model.learn(2048)
    assert model.num_timesteps >= 2048
    obs = venv.reset()
    state, starts = None, np.ones(2, dtype=bool)
    for _ in range(3):
        action, state = model.predict(obs, state=state, episode_start=starts)
        obs, _, starts, _ = venv.step(action)
    venv.close()


@pytest.mark.parametrize("env_id", IDS)
def test_recurrent_ppo_learns_on_multidiscrete_observations_through_flatten(env_id):
    """The MultiDiscrete observations (window here; context alike) with RecurrentPPO: sb3's
    ``get_flattened_obs_dim`` returns ``sum(nvec)``, a numpy integer, which torch's LSTM
    refuses as ``input_size`` whatever the space's dtype (upstream); Gymnasium's
    ``FlattenObservation`` (one-hot Box, ``flatdim`` a Python int) is the documented route
    (docs/envs/clients.md), with a probability action."""
    mode = {"observation": "window", "window": 2, "action": "distribution"}  # small one-hot
    venv = make_vec_env(
        env_id, n_envs=2, seed=0, env_kwargs=mode, wrapper_class=gym.wrappers.FlattenObservation
    )
    model = RecurrentPPO(
        "MlpLstmPolicy", venv, n_steps=128, batch_size=128, n_epochs=1, seed=0, device="cpu"
    )
    model.learn(2048)
    assert model.num_timesteps >= 2048
    action, _ = model.predict(venv.reset(), episode_start=np.ones(2, dtype=bool))
    assert all(a in venv.action_space for a in action)
    venv.close()


FORK_SCRIPT = textwrap.dedent(
    """
    import gymnasium as gym, numpy as np, torch, iclgym
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv
    # use torch's OpenMP pool first, as a training script would; iclgym.envs not imported
    a = torch.rand(400, 400) + 400 * torch.eye(400)
    torch.linalg.solve(a, torch.rand(400, 8)).sum()
    torch.rand(10**6).exp().sum()
    for env_id in iclgym.list_envs():
        sb3 = make_vec_env(
            env_id, n_envs=2, vec_env_cls=SubprocVecEnv, vec_env_kwargs={"start_method": "fork"}
        )
        sb3.reset()
        sb3.step(np.zeros(2, dtype=np.int64))
        sb3.close()
        for kwargs in ({}, {"action": "distribution"}):
            env = gym.make_vec(env_id, num_envs=2, vectorization_mode="async", **kwargs)
            obs, _ = env.reset(seed=0)
            env.action_space.seed(0)
            for _ in range(8):
                obs, reward, *_ = env.step(env.action_space.sample())
                assert np.isfinite(reward).all()
            env.close()
        print("ok", env_id, flush=True)
    """
)


def test_forked_workers_run_after_torch_use_for_every_id():
    """Gymnasium's async vector env (default start method: fork) and SB3's SubprocVecEnv
    with start_method="fork": a child of a process whose torch already ran an OpenMP region
    used to hang in its first parallel torch op. Run in a subprocess with a timeout so that a
    regression fails instead of hanging."""
    result = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [w for env_id in IDS for w in ("ok", env_id)]


def test_sync_vector_env_of_single_envs_matches_their_spaces():
    for env_id in IDS:
        env = gym.make_vec(env_id, num_envs=2, vectorization_mode="sync")
        obs, _ = env.reset(seed=0)
        assert obs in env.observation_space
        env.step(env.action_space.sample())
        env.close()
