"""stable-baselines3 agents on iclgym envs, scored by the harness as predictors
(``docs/envs/clients.md``).

:func:`train_agent` trains ``PPO`` or ``sb3_contrib.RecurrentPPO`` through SB3's own
``make_vec_env`` on any registered id (``gamma = 0`` by default: a prediction never changes the
next token, so each step is a contextual bandit with a history-dependent context) and saves the
agent with a JSON record of how it was trained (``agent.zip``, ``agent.json``: the id, env and
algorithm arguments, and the env steps it saw). :class:`SB3Predictor` loads such a run and
scores it like any other predictor (``iclgym eval ID --predictor sb3:RUN``): for each scored
position t it rebuilds the observation the env would show from the held-out sequence
(:meth:`iclgym.envs.ICLEnv.observation_at`) and reads the policy's action distribution as the
next-token law: the categorical probabilities of a ``token`` action (``class``: spread onto
the class tokens), or the env's reading of the policy's deterministic (mean) action for
``distribution`` and ``logits`` actions (:meth:`~iclgym.envs.ICLEnv.action_probabilities`).
RecurrentPPO carries its LSTM state through the positions of each episode, as in the env.

SB3 agents are floors, not in-context learners: a PPO policy sees a fixed observation (a
W-token window, or the context as one-hot columns) and learns one map from it to actions over
all tasks; report them with the env steps they saw.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from torch import Tensor

import iclgym  # noqa: F401 (registers the ids)
from iclgym.envs import PROB_FLOOR
from iclgym.harness.regret import run_and_mode
from iclgym.tasks.base import Batch, Task
from iclgym.validation import as_float, as_int
from iclgym.wrappers import BanditFeedback

ALGORITHMS: dict[str, tuple[type, str, str]] = {
    "ppo": (PPO, "MlpPolicy", "MultiInputPolicy"),
    "recurrent_ppo": (RecurrentPPO, "MlpLstmPolicy", "MultiInputLstmPolicy"),
}
"""Algorithm name -> (class, policy for flat observations, policy for Dict observations)."""
AGENT_FILE, RECORD_FILE = "agent.zip", "agent.json"


@dataclass(frozen=True)
class AgentConfig:
    """How an SB3 agent is trained (every field is recorded in ``agent.json``).

    Attributes:
        env_id: a registered iclgym id.
        algo: ``"ppo"`` or ``"recurrent_ppo"``.
        steps: env steps of training (SB3's ``total_timesteps``).
        n_envs: envs of ``make_vec_env`` (DummyVecEnv).
        seed: SB3's seed (envs seed + rank, the policy init, the rollouts).
        env_kwargs: ``gym.make`` keyword arguments: spec parameters and the env options
            (``observation``, ``action``, ``window``, ...). Defaults: ``observation="token"``
            for RecurrentPPO (one token per step), ``"window"`` for PPO.
        gamma: discount (0: the stream is exogenous, a contextual bandit).
        n_steps, batch_size, n_epochs, learning_rate: PPO's rollout and update settings.
        feedback: ``"full"`` (every token shown) or ``"bandit"``: trained through
            :class:`iclgym.wrappers.BanditFeedback` (the next token shown only after a correct
            prediction; its observations have the extra id HIDDEN), for ``iclgym regret
            --agent sb3:RUN``.
    Raises ``ValueError`` for an unknown algorithm or out-of-range numbers.
    """

    env_id: str
    algo: str = "ppo"
    steps: int = 20_000
    n_envs: int = 8
    seed: int = 0
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    gamma: float = 0.0
    n_steps: int = 128
    batch_size: int = 256
    n_epochs: int = 4
    learning_rate: float = 3e-4
    feedback: str = "full"

    def __post_init__(self) -> None:
        if self.feedback not in ("full", "bandit"):
            raise ValueError(f"feedback={self.feedback!r} is invalid: expected 'full' or 'bandit'")
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo={self.algo!r} is invalid: expected one of {tuple(ALGORITHMS)}")
        for name in ("steps", "n_envs", "n_steps", "batch_size", "n_epochs"):
            as_int(name, getattr(self, name), 1)
        as_int("seed", self.seed, 0)
        as_float("gamma", self.gamma, 0.0, 1.0)
        as_float("learning_rate", self.learning_rate, 0.0, low_open=True)
        default = "token" if self.algo == "recurrent_ppo" else "window"
        object.__setattr__(self, "env_kwargs", {"observation": default, **self.env_kwargs})


def _policy_name(config: AgentConfig, space: gym.Space) -> str:
    _, flat, multi_input = ALGORITHMS[config.algo]
    return multi_input if isinstance(space, gym.spaces.Dict) else flat


def train_agent(config: AgentConfig, out: str | Path, progress: bool = False) -> dict[str, Any]:
    """Train the agent of ``config`` and save it to the folder ``out`` (``agent.zip`` and the
    record ``agent.json``). Returns the record: the config, ``num_timesteps`` (env steps
    seen), ``wall_s``, the policy name and the SB3 and torch versions."""
    import stable_baselines3

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    algo, *_ = ALGORITHMS[config.algo]
    venv = make_vec_env(
        config.env_id,
        n_envs=config.n_envs,
        seed=config.seed,
        env_kwargs=config.env_kwargs,
        wrapper_class=BanditFeedback if config.feedback == "bandit" else None,
    )
    policy = _policy_name(config, venv.observation_space)
    start = time.perf_counter()
    agent = algo(
        policy,
        venv,
        gamma=config.gamma,
        n_steps=config.n_steps,
        batch_size=config.batch_size,
        n_epochs=config.n_epochs,
        learning_rate=config.learning_rate,
        seed=config.seed,
        device="cpu",
    )
    agent.learn(config.steps, progress_bar=progress)
    venv.close()
    agent.save(out / AGENT_FILE)
    record = {
        "config": asdict(config),
        "policy": policy,
        "num_timesteps": int(agent.num_timesteps),
        "wall_s": time.perf_counter() - start,
        "stable_baselines3": stable_baselines3.__version__,
        "torch": torch.__version__,
    }
    (out / RECORD_FILE).write_text(json.dumps(record, indent=1))
    return record


class SB3Predictor:
    """A trained SB3 agent (a :func:`train_agent` folder) as a harness predictor:
    ``predict(batch) -> (B, T, V)`` log-probabilities (module docstring); uniform before the
    task's first scored position. ``task`` (optional) must have the agent's vocabulary and
    sequence length (``ValueError`` otherwise)."""

    def __init__(self, run: str | Path, task: Task | None = None) -> None:
        run = Path(run)
        if not (run / RECORD_FILE).is_file() or not (run / AGENT_FILE).is_file():
            raise ValueError(
                f"sb3:{run} is not an agent folder (needs {AGENT_FILE} and {RECORD_FILE})"
            )
        self.record = json.loads((run / RECORD_FILE).read_text())
        config = AgentConfig(**self.record["config"])
        self.config = config
        algo, *_ = ALGORITHMS[config.algo]
        self.agent = algo.load(run / AGENT_FILE, device="cpu")
        self.env = gym.make(config.env_id, **config.env_kwargs).unwrapped
        if task is not None and (task.vocab_size, task.seq_len) != (
            self.env.vocab_size,
            self.env.seq_len,
        ):
            raise ValueError(
                f"sb3:{run} was trained on vocab_size={self.env.vocab_size}, seq_len="
                f"{self.env.seq_len}; the task has {task.vocab_size}, {task.seq_len}"
            )
        self.name = f"sb3:{config.algo}"

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        env, policy = self.env, self.agent.policy
        policy.set_training_mode(False)
        tokens = batch.tokens.cpu().numpy()
        features = None if batch.features is None else batch.features.cpu().numpy()
        b, t_len, v = tokens.shape[0], tokens.shape[1], env.vocab_size
        out = np.full((b, t_len, v), -np.log(v))
        recurrent = self.config.algo == "recurrent_ppo"
        if recurrent:
            shape = list(policy.lstm_hidden_state_shape)
            shape[1] = b
            state = (torch.zeros(shape), torch.zeros(shape))
            states = (state, state)  # RecurrentPPO's (actor, critic) states
        for t in range(env.first, t_len):
            obs, _ = policy.obs_to_tensor(env.observation_at(tokens, features, t))
            if recurrent:
                starts = torch.full((b,), 1.0 if t == env.first else 0.0)
                dist, actor = policy.get_distribution(obs, states[0], starts)
                states = (actor, states[1])
            else:
                dist = policy.get_distribution(obs)
            out[:, t] = np.log(self._law(dist))
        return torch.from_numpy(out).float().to(batch.tokens.device)

    def _law(self, dist: Any) -> np.ndarray:
        """(B, V) the next-token law of a policy distribution at one position."""
        env = self.env
        if env.action_mode in ("token", "class"):
            probs = dist.distribution.probs.double().numpy()
            if env.action_mode == "class":
                law = np.zeros((probs.shape[0], env.vocab_size))
                law[:, env.class_tokens] = probs
                probs = law
        else:  # the deterministic action, clipped to the Box as SB3's predict() does
            space = env.single_act_space
            action = np.clip(dist.mode().double().numpy(), space.low, space.high)
            probs = env.action_probabilities(action)
        probs = np.maximum(probs, PROB_FLOOR)
        return probs / probs.sum(-1, keepdims=True)


def from_text(text: str, task: Task) -> SB3Predictor:
    """``RUN`` (the part after ``sb3:`` on the command line): an agent folder."""
    return SB3Predictor(text, task)


ENV_OPTIONS = ("observation", "window", "action", "reward")
"""The ``gym.make`` keywords of an agent's ``env_kwargs`` that are env options, not spec
parameters: what the agent must see and send in ``iclgym regret``."""


class SB3BanditAgent:
    """A PPO or RecurrentPPO agent trained under bandit feedback (``feedback="bandit"``),
    acting in the step loop of ``iclgym regret``: :meth:`act` maps a batch of N observations
    (the env options it was trained with, :attr:`env_options`) to N actions, greedy (the
    policy's mode) or sampled; RecurrentPPO keeps one LSTM state per row, zeroed by
    :meth:`begin_episodes`. Raises ``ValueError`` for an agent trained with full information
    (its observation space has no HIDDEN id) or a task of another vocabulary or length."""

    def __init__(self, run: str | Path, task: Task, mode: str = "greedy") -> None:
        predictor = SB3Predictor(run, task)
        if predictor.config.feedback != "bandit":
            raise ValueError(
                f"sb3:{run} was trained with full information: bandit feedback shows it a "
                "HIDDEN id outside its observation space; train one with python -m "
                "baselines.sb3_agents ID --feedback bandit"
            )
        self.agent, self.recurrent = predictor.agent, predictor.config.algo == "recurrent_ppo"
        self.deterministic = mode == "greedy"
        kwargs = predictor.config.env_kwargs
        self.env_options = {k: kwargs[k] for k in ENV_OPTIONS if k in kwargs}
        self.state: Any = None
        self.starts: np.ndarray | None = None

    def begin_episodes(self, n: int) -> None:
        """A group of ``n`` fresh episodes starts: every row's recurrent state restarts."""
        self.state, self.starts = None, np.ones(n, dtype=bool)

    def act(self, observation: Any) -> np.ndarray:
        if self.recurrent and self.starts is None:
            first = observation
            if isinstance(first, dict):
                first = next(iter(first.values()))
            self.begin_episodes(len(first))
        if not self.recurrent:
            return self.agent.predict(observation, deterministic=self.deterministic)[0]
        action, self.state = self.agent.predict(
            observation,
            state=self.state,
            episode_start=self.starts,
            deterministic=self.deterministic,
        )
        self.starts = np.zeros_like(self.starts)
        return action


def agent_from_text(text: str, task: Task, seed: int = 0) -> SB3BanditAgent:
    """``RUN[:greedy|:sample]`` (the part after ``sb3:`` of ``iclgym regret --agent``): the
    bandit-trained agent in the folder RUN (:class:`SB3BanditAgent`), its policy's mode or a
    sample from it (SB3's sampling uses torch's global random state: seed it before a run, as
    ``iclgym regret`` does; ``seed`` is unused). A RUN that exists as written is read whole.
    Raises ``ValueError`` for another mode and as :class:`SB3BanditAgent`."""
    run, mode = run_and_mode(text, "sb3")
    return SB3BanditAgent(run, task, mode)


def main(argv: list[str] | None = None) -> None:
    """``python -m baselines.sb3_agents ID [--algo ppo|recurrent_ppo] [--steps N] [--seed S]
    [--set KEY=VALUE ...] --out RUN``: train and save an agent (``--set`` takes spec
    parameters and env options, e.g. ``observation=window window=4 action=logits``); score it
    with ``iclgym eval ID --predictor sb3:RUN``."""
    import argparse

    from iclgym.harness.train import parse_assignments

    parser = argparse.ArgumentParser(prog="python -m baselines.sb3_agents", description=__doc__)
    parser.add_argument("env_id")
    parser.add_argument("--algo", default="ppo", choices=tuple(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=AgentConfig.steps)
    parser.add_argument("--n-envs", type=int, default=AgentConfig.n_envs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--feedback", default="full", choices=("full", "bandit"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    config = AgentConfig(
        args.env_id,
        algo=args.algo,
        steps=args.steps,
        n_envs=args.n_envs,
        seed=args.seed,
        env_kwargs=parse_assignments(args.set, "--set"),
        feedback=args.feedback,
    )
    torch.set_num_threads(1)
    record = train_agent(config, args.out, progress=False)
    score = (
        f"iclgym regret {config.env_id} --agent sb3:{args.out}"
        if config.feedback == "bandit"
        else f"iclgym eval {config.env_id} --predictor sb3:{args.out}"
    )
    print(
        f"{config.env_id}: {config.algo} ({record['policy']}), {record['num_timesteps']} env "
        f"steps in {record['wall_s']:.1f} s -> {args.out}; score it with {score}"
    )


if __name__ == "__main__":
    main()
