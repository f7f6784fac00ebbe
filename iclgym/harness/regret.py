"""Online scoring under bandit feedback: the cumulative pseudo-regret of an agent acting in an
env wrapped by :class:`iclgym.wrappers.BanditFeedback` (DPT's bandit metric, Lee et al. 2023,
arXiv 2306.14892, section 4.1; ``docs/envs/clients.md``, Bandit feedback).

Step t's pseudo-regret is ``max_v p(v) - p(a_t)`` under the true law p of the next token (the
wrapper's ``info["regret"]``); an episode's regret is its sum over the steps (probability units:
expected misses beyond the clairvoyant predictor's). Every agent is scored on the same episodes
(:func:`episode_seeds`: episode i of ``seed`` is a function of (seed, i) only), so differences
between agents are paired, and two seeds give independent episode sets. Two references come with
it: ``uniform`` (a uniformly random token; its regret is the no-information level) and
:func:`full_information_regret`, the env's online oracle acting greedily on the *whole*
history. Every bandit agent acts on a function of that history and its own randomness, so with
an exact Bayes oracle no agent's expected regret is below it (a lower bound, not a bandit
agent); where the env's online oracle approximates Bayes (its ``online_oracle`` says so: e.g.
``ICL-MarkovChain-v0``'s default stationary start, add-alpha without the first context's
stationary likelihood, within 0.5% of the KL; Monte-Carlo oracles of other priors) it is a
near-bound. Exact per-step laws, not sampling, decide the
regret, so its only noise is the episodes' (and a sampling agent's draws: a :data:`Policy`
acts on a batch of ``num_envs`` episodes at a time, so which of its random numbers go to
which episode depends on ``num_envs``; deterministic agents do not depend on it).

On tasks with large vocabularies (templates, ~1,800 tokens) a uniform guess almost always
misses, and the revealed bigram reads a first-order chain's structure only (on tasks with one
scored step it reads the shown context's bigrams, not the task's rule): there the informative
comparison is between trained agents and the full-information oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from iclgym.envs import first_argmax
from iclgym.validation import as_int
from iclgym.wrappers import BanditFeedback

Policy = Callable[[Any], np.ndarray]
"""A batch of N observations (stacked: an (N, ...) array, or a dict of them) -> N actions.
The runner always passes every episode of a group of N (a finished one shows its last
observation; its action is ignored), so a stateful agent keeps one state per row; if the
policy is a bound method whose object has ``begin_episodes(n)``, that is called when a group
of n fresh episodes starts (e.g. to zero a recurrent state)."""


@dataclass(frozen=True)
class RegretReport:
    """One agent's bandit score over ``episodes`` episodes: ``regret`` the mean cumulative
    pseudo-regret per episode and ``regret_se`` its standard error (over episodes);
    ``accuracy`` the mean reward per step (realised; the full-information reference's is
    expected, ``p(a)``) and ``accuracy_se`` (standard errors are NaN for one episode; None in
    :meth:`to_dict`, so JSON stays strict); ``curve`` the mean cumulative regret after each
    step (length: the longest episode's steps); ``episode_regrets`` each episode's cumulative
    regret and ``episode_accuracies`` its mean reward per step, in seed order (for paired
    comparisons: every agent sees the same episodes)."""

    agent: str
    episodes: int
    regret: float
    regret_se: float
    accuracy: float
    accuracy_se: float
    curve: tuple[float, ...]
    episode_regrets: tuple[float, ...]
    episode_accuracies: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        row = {**self.__dict__, "curve": list(self.curve)}
        row["episode_regrets"] = list(self.episode_regrets)
        row["episode_accuracies"] = list(self.episode_accuracies)
        for key in ("regret_se", "accuracy_se"):
            if np.isnan(row[key]):
                row[key] = None
        return row


def run_and_mode(text: str, kind: str) -> tuple[str, str]:
    """``(RUN, mode)`` of an agent argument ``RUN[:greedy|:sample]`` (the part after
    ``KIND:`` of ``iclgym regret --agent``); greedy by default, and a RUN that exists as
    written is read whole (a folder named ``x:sample`` too). Raises ``ValueError`` for another
    mode."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).exists():
        return text, "greedy"
    if tail not in ("greedy", "sample"):
        raise ValueError(
            f"mode={tail!r} of {kind}:{text} is invalid: expected greedy or sample (the env's "
            "action is a token)"
        )
    return head, tail


def episode_seeds(seed: int, num_episodes: int) -> list[int]:
    """The env seed of each episode: episode i's is drawn from ``SeedSequence([seed, i])``,
    a function of (seed, i) alone, so a longer run extends a shorter one and different seeds
    give independent episodes. Raises ``ValueError`` for a seed < 0 or a count < 1."""
    seed = as_int("seed", seed, 0)
    num_episodes = as_int("num_episodes", num_episodes, 1)
    return [
        int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> np.uint64(1))
        for i in range(num_episodes)
    ]


def _stack(observations: list[Any]) -> Any:
    if isinstance(observations[0], Mapping):
        return {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)


def _make(env_id: str, spec: Mapping[str, Any], split: str, bandit: bool) -> gym.Env:
    env = gym.make(env_id, **{"observation": "context", **spec, "split": split})
    return BanditFeedback(env) if bandit else env


def _report(name: str, regrets: list[list[float]], rewards: list[list[float]]) -> RegretReport:
    totals = np.array([sum(r) for r in regrets])
    per_step = np.array([np.mean(r) for r in rewards])
    longest = max(map(len, regrets))
    curve = np.cumsum([np.mean([r[t] for r in regrets if len(r) > t]) for t in range(longest)])
    n = len(totals)
    se = lambda x: float(x.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    return RegretReport(
        agent=name,
        episodes=n,
        regret=float(totals.mean()),
        regret_se=se(totals),
        accuracy=float(per_step.mean()),
        accuracy_se=se(per_step),
        curve=tuple(float(c) for c in curve),
        episode_regrets=tuple(float(x) for x in totals),
        episode_accuracies=tuple(float(x) for x in per_step),
    )


def _episodes(
    env_id: str,
    spec: Mapping[str, Any],
    split: str,
    num_episodes: int,
    num_envs: int,
    seed: int,
    bandit: bool,
    step: Callable[[list[gym.Env], Any], list[tuple]],
    act: Policy,
) -> tuple[list[list[float]], list[list[float]]]:
    """Run ``num_episodes`` episodes of ``split``, ``num_envs`` at a time, seeded by
    :func:`episode_seeds`; ``step(envs, actions)`` steps the rows still running with their
    actions and returns their ``(obs, regret, reward, done)``."""
    seeds = episode_seeds(seed, num_episodes)
    num_envs = as_int("num_envs", num_envs, 1)
    begin = getattr(getattr(act, "__self__", None), "begin_episodes", None)
    envs = [_make(env_id, spec, split, bandit) for _ in range(min(num_envs, num_episodes))]
    regrets: list[list[float]] = []
    rewards: list[list[float]] = []
    try:
        for start in range(0, num_episodes, len(envs)):
            group = envs[: min(len(envs), num_episodes - start)]
            obs = [env.reset(seed=seeds[start + i])[0] for i, env in enumerate(group)]
            if begin is not None:
                begin(len(group))
            running = list(range(len(group)))
            r_regret = [[] for _ in group]
            r_reward = [[] for _ in group]
            while running:
                actions = act(_stack(obs))  # every row: a stateful agent keeps its rows
                if actions is not None:
                    actions = np.asarray(actions)[running]
                out = step([group[i] for i in running], actions)
                still = []
                for i, (o, regret, reward, done) in zip(running, out, strict=True):
                    obs[i] = o
                    r_regret[i].append(regret)
                    r_reward[i].append(reward)
                    if not done:
                        still.append(i)
                running = still
            regrets += r_regret
            rewards += r_reward
    finally:
        for env in envs:
            env.close()
    return regrets, rewards


def bandit_regret(
    env_id: str,
    act: Policy,
    *,
    name: str = "agent",
    spec: Mapping[str, Any] | None = None,
    split: str = "test",
    num_episodes: int = 256,
    num_envs: int = 64,
    seed: int = 0,
) -> RegretReport:
    """Score ``act`` (a :data:`Policy` over the observations of ``BanditFeedback(gym.make(
    env_id, split=split, **spec))``, ``observation="context"`` unless ``spec`` names another
    env option, e.g. ``baselines.dpt.DPTAgent.act``) by its cumulative pseudo-regret (module
    docstring) over ``num_episodes`` episodes of ``split`` (default test, as ``iclgym
    eval``), ``num_envs`` stepped together; ``spec`` holds spec parameters and env options.
    Raises ``ValueError`` for counts < 1, a seed < 0 and what the env or the wrapper raise
    (an unknown split, an action mode other than ``"token"``)."""

    def step(envs: list[gym.Env], actions: np.ndarray) -> list[tuple]:
        out = []
        for env, action in zip(envs, actions, strict=True):
            o, reward, terminated, truncated, info = env.step(action)
            out.append((o, info["regret"], reward, terminated or truncated))
        return out

    regrets, rewards = _episodes(
        env_id, spec or {}, split, num_episodes, num_envs, seed, True, step, act
    )
    return _report(name, regrets, rewards)


def uniform_policy(vocab_size: int, seed: int = 0) -> Policy:
    """Uniformly random tokens in [0, ``vocab_size``), seeded (``seed`` >= 0, else
    ``ValueError``): the no-information agent."""
    rng = np.random.default_rng(as_int("seed", seed, 0))
    return lambda obs: rng.integers(
        vocab_size, size=len(obs["tokens"] if isinstance(obs, Mapping) else obs)
    )


def revealed_bigram_policy(vocab_size: int) -> Policy:
    """The in-context bigram of what bandit feedback revealed, acting greedily: at position t
    with x_t shown, the most frequent successor of x_t among the revealed pairs (x_j, x_{j+1})
    (both shown); otherwise, or with no such pair, the most frequent revealed token (first
    token on ties). A hand-made in-context bandit reference for a first-order chain; it never
    explores, so its own hits decide what it learns."""
    v = vocab_size

    def act(obs: Any) -> np.ndarray:
        tokens = np.asarray(obs["tokens"] if isinstance(obs, Mapping) else obs, dtype=np.int64)
        t = (tokens != v).sum(1) - 1  # PAD = V after the revealed prefix
        rows = np.arange(len(tokens))
        upto = np.arange(tokens.shape[1])[None] <= t[:, None]
        shown = np.where((tokens < v) & upto, tokens, v)  # hidden and PAD -> V
        unigram = (np.eye(v + 1)[shown][:, :, :v]).sum(1)
        last = shown[rows, t]
        pairs = (shown[:, :-1] == last[:, None]) & (shown[:, 1:] < v)
        bigram = (np.eye(v + 1)[shown[:, 1:]][:, :, :v] * pairs[:, :, None]).sum(1)
        use = (last < v) & (bigram.sum(1) > 0)
        return np.where(use, bigram.argmax(1), unigram.argmax(1))

    return act


def full_information_regret(
    env_id: str,
    *,
    spec: Mapping[str, Any] | None = None,
    split: str = "test",
    num_episodes: int = 256,
    num_envs: int = 64,
    seed: int = 0,
) -> RegretReport:
    """The lower reference on the same episodes as :func:`bandit_regret`: the env's Bayes
    oracle (``info["oracle_probs"]`` or ``"oracle_token"``) acting greedily (first argmax) with
    every token revealed; step t's regret ``max p - p(a*)`` and expected reward ``p(a*)`` under
    the true law p. Its action never changes what it sees, so the law is read after the step
    (the env's action is ignored for it)."""

    def step(envs: list[gym.Env], actions: None) -> list[tuple]:
        out = []
        for env in envs:
            o, _, terminated, truncated, info = env.step(0)
            p = _law(info.get("true_probs", info.get("true_token")), env)
            q = _law(info.get("oracle_probs", info.get("oracle_token")), env)
            best = int(first_argmax(q[None])[0])
            out.append((o, float(p.max() - p[best]), float(p[best]), terminated or truncated))
        return out

    regrets, rewards = _episodes(
        env_id, spec or {}, split, num_episodes, num_envs, seed, False, step, lambda obs: None
    )
    return _report("oracle (full information)", regrets, rewards)


def _law(law: Any, env: gym.Env) -> np.ndarray:
    p = np.asarray(law, dtype=np.float64)
    if p.ndim == 0:  # a point mass on one token
        return np.eye(env.unwrapped.vocab_size)[int(p)]
    return p
