"""Gymnasium wrappers over any iclgym env.

:class:`BanditFeedback` is the ``feedback="bandit"`` variant (``docs/envs/clients.md``, Bandit
feedback), which recreates the bandit setting of Lee et al. 2023 (DPT, arXiv 2306.14892): the reward
is 1[the predicted token is the next token], and the next token is revealed only when the prediction
was right; a wrong prediction reveals only that it was wrong. iclgym's streams are exogenous and
full-information by default, where exploration has nothing to act on; under bandit feedback what the
agent predicts decides what it sees, so greedy and sampling policies genuinely differ (DPT's bandit
setting). It wraps the env rather than adding a code path to it: it works on every id, through
``gym.make`` and Gymnasium's
sync/async vector envs (``gym.make_vec(id, vectorization_mode="sync",
wrappers=[BanditFeedback])``) and SB3's ``make_vec_env(id, wrapper_class=BanditFeedback)``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from iclgym.envs import token_dtype

KEPT_INFO = ("t", "split")
"""Info keys passed through under bandit feedback; every other key of the wrapped env's info
(the true and oracle laws, labels, per-episode latents) can reveal a hidden token and is
dropped."""


class BanditFeedback(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Bandit feedback over an iclgym env with ``action="token"`` (module docstring).

    Observations: as the wrapped env's, with every token revealed after a wrong prediction
    replaced by the id ``HIDDEN = V + 1`` (PAD stays ``V``) in the context, window and token
    observations (token spaces grow to ``V + 2`` ids; features, where the task has them, are
    the words and pass unchanged: only the next token is the feedback). Reward: 1 if the
    action is the next token, else 0 (the wrapped env's token reward). Info: ``t``,
    ``split``, ``correct`` (bool) and ``regret``, the pseudo-regret ``max_v p(v) - p(a)``
    under the true law p of the next token (its sum over an episode is the cumulative regret
    of the bandit metric; computed from the law, never from the realised token, so it
    reveals nothing the reward does not; for evaluation, not an agent input). Raises
    ``ValueError`` for an env whose action is not ``"token"`` or that is not an iclgym env."""

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)  # so env.spec can rebuild it
        gym.Wrapper.__init__(self, env)
        base = env.unwrapped
        if getattr(base, "action_mode", None) != "token":
            raise ValueError(
                "BanditFeedback needs an iclgym env with action='token' (reward 1[correct]); "
                f"got action={getattr(base, 'action_mode', None)!r}"
            )
        v = base.vocab_size
        self.hidden, self.pad = v + 1, v
        self._base = base
        self.observation_space = self._grow(env.observation_space, v)
        self._hidden: list[int] = []  # positions whose token stays hidden

    @staticmethod
    def _grow(space: spaces.Space, v: int) -> spaces.Space:
        if isinstance(space, spaces.Dict):
            return spaces.Dict(
                {k: BanditFeedback._grow(s, v) if k == "tokens" else s for k, s in space.items()}
            )
        if isinstance(space, spaces.MultiDiscrete):
            return spaces.MultiDiscrete(np.full(space.shape, v + 2, dtype=np.int64))
        if isinstance(space, spaces.Discrete):
            return spaces.Discrete(v + 2)
        return space  # the features Box

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._hidden = []
        self._t = int(info["t"])
        return self._mask(obs), self._info(info)

    def step(self, action: Any):
        t = self._t
        obs, reward, terminated, truncated, info = self.env.step(action)
        law = info.get("true_probs", info.get("true_token"))
        out = self._info(info)
        correct = reward == 1.0
        out["correct"] = bool(correct)
        out["regret"] = _pseudo_regret(law, int(action), self._base.vocab_size)
        if not correct:
            self._hidden.append(t + 1)
        self._t = t + 1
        return self._mask(obs), float(reward), terminated, truncated, out

    def _info(self, info: dict[str, Any]) -> dict[str, Any]:
        return {k: info[k] for k in KEPT_INFO if k in info}

    def _mask(self, obs: Any) -> Any:
        if isinstance(obs, dict):
            return {**obs, "tokens": self._mask(obs["tokens"])}
        if self._base.obs_mode == "features":  # the features Box alone: no token to hide
            return obs
        if not self._hidden:
            return self._retype(obs)
        mode, t = self._base.obs_mode, self._t
        if mode == "token":
            return self.hidden if t in self._hidden else obs
        out = self._retype(obs)
        hidden = np.array(self._hidden)
        if mode == "context":
            out[hidden[hidden < out.shape[0]]] = self.hidden
        else:  # window: column j shows position last - W + 1 + j
            last = min(t, self._base.seq_len)
            cols = hidden - (last - out.shape[0] + 1)
            out[cols[(cols >= 0) & (cols < out.shape[0])]] = self.hidden
        return out

    def _retype(self, obs: Any) -> Any:
        if isinstance(obs, np.ndarray):
            return obs.astype(token_dtype(self._base.vocab_size + 2), copy=True)
        return obs


def _pseudo_regret(law: Any, action: int, vocab_size: int) -> float:
    """max_v p(v) - p(action) for a law given as (V,) probabilities or a point mass (token)."""
    p = np.asarray(law, dtype=np.float64)
    if p.ndim == 0:  # a point mass on one token
        point = np.zeros(vocab_size)
        point[int(p)] = 1.0
        p = point
    return float(p.max() - p[action])
