"""Gymnasium views of any iclgym task: one sequence per episode, one prediction per step.

At step ``t`` the agent has seen ``x_0 .. x_t`` and predicts ``x_{t+1}``; it is scored, then
``x_{t+1}`` is revealed. After ``seq_len`` steps the episode terminates (the length is part of
the task, so this is termination, not truncation). Tasks whose leading positions are context
only (``task.first_scored_position`` = s > 0, e.g. single-label template tasks) start the
episode at ``t = s`` with ``x_0 .. x_s`` revealed, so they take ``seq_len - s`` steps.

Observations (``observation=``):
    ``"context"`` (default): the tokens so far as ``MultiDiscrete([V + 1] * (seq_len + 1))``,
    unrevealed positions holding the PAD id ``V``; ``"token"``: the current token,
    ``Discrete(V)``; ``"window"``: the last ``window`` tokens, ``MultiDiscrete([V + 1] * W)``,
    left-padded with ``V``.
Actions (``action=``):
    ``"token"`` (default): ``Discrete(V)``, reward ``1[a = x_{t+1}]``;
    ``"distribution"``: a probability vector in ``Box(0, 1, (V,))``, normalised by its sum,
    floored at ``PROB_FLOOR`` (so rewards stay bounded) and renormalised; reward
    ``log q(x_{t+1})``; ``"logits"``: ``Box(-1, 1, (V,))`` read as ``softmax(logit_scale * a)``
    (SB3-friendly), reward ``log q(x_{t+1})``; ``"value"``: for tasks with real-valued labels
    (``task.label_values``, the value of each label token), a real prediction in
    ``Box(lo, hi, (1,))`` with ``[lo, hi]`` the label range widened to contain ``[-1, 1]``,
    reward ``-(a - y)^2`` with ``y`` the value of ``x_{t+1}`` (the oracle predicts the
    expected value under its law); ``"class"``: for tasks with classes (``task.class_tokens``,
    the label token of each class), ``Discrete(C)``, action c standing for the token of class
    c, reward ``1[class_tokens[a] = x_{t+1}]``.
Splits: ``split=`` (``"train"``, ``"validation"`` or its alias ``"val"``, ``"test"``) picks the
data split; ``reset(options={"split": ...})`` switches it for this and later episodes (a new
episode stream seeded from the env's ``np_random``, so seeded resets stay deterministic).
Other option keys and unknown splits raise ``ValueError``.
Info (every step): ``t`` (the position scored), ``split``, ``true_probs`` (the law ``x_{t+1}``
was drawn from), ``oracle_probs`` (the Bayes-optimal prediction), ``regret`` (the oracle's
reward minus the agent's on this step) and, for probability actions, ``kl`` = KL(true || q);
``reset`` gives ``t`` and ``split``. Tasks with per-episode info (``task.episode_info(batch)``,
columns of per-sequence values, e.g. template tasks' ``template_id`` and ``substitution``
{wildcard: token id}) add it, with ``label`` (the last token ``x_T`` in label units: its real
value where the task has ``label_values``, its class id where it has ``class_tokens``, else the
token id) and ``oracle_pred`` (the oracle's prediction in those units: expected value, or the
class / token of its argmax), to the info of the last step, which scores the label: they
reveal the answer, so they come only after the prediction.
The vector env gives every key as an array over sub-envs (``split`` a read-only str array;
``substitution`` a dict of arrays, -1 where a sub-env's template lacks the wildcard).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from iclgym.registry import get_entry
from iclgym.tasks import SPLITS, Batch, Task, make_family_task

OBSERVATIONS = ("context", "token", "window")
ACTIONS = ("token", "distribution", "logits", "value", "class")
SPLIT_ALIASES = {"val": "validation"}
"""Other names accepted for a split (spec ``symbol-templates.md`` section 8 says ``"val"``)."""
RESET_OPTIONS = ("split",)
PROB_FLOOR = 1e-6
BLOCK = 64
"""Sequences the single env draws per sampler call (amortises the torch call over episodes)."""


def check_split(split: Any, name: str = "split") -> str:
    """The canonical name of a split (one of ``SPLITS``; ``"val"`` is ``"validation"``)."""
    canonical = SPLIT_ALIASES.get(split, split) if isinstance(split, str) else split
    if canonical not in SPLITS:
        raise ValueError(
            f"{name}={split!r} is invalid: expected one of {SPLITS} (or 'val' for 'validation')"
        )
    return canonical


def reset_split(options: dict[str, Any] | None) -> str | None:
    """The split asked for by ``reset(options=...)``, or None; unknown keys raise."""
    if not options:
        return None
    if not isinstance(options, dict):
        raise ValueError(f"options={options!r} is invalid: expected a dict or None")
    unknown = sorted(set(options) - set(RESET_OPTIONS), key=str)
    if unknown:
        raise ValueError(
            f"reset options {unknown} are invalid: expected keys among {RESET_OPTIONS}"
        )
    return check_split(options["split"], "options['split']") if "split" in options else None


def build_task(env_id: str | None, task: Task | None, spec_kwargs: dict[str, Any]) -> Task:
    """The task an env runs: an explicit ``task``, or ``env_id``'s family with overrides."""
    if task is not None:
        if spec_kwargs or env_id is not None:
            raise ValueError("pass either task= or env_id/spec keyword arguments, not both")
        return task
    if env_id is None:
        raise ValueError("an iclgym env needs env_id= (a registered id) or task= (a Task)")
    entry = get_entry(env_id)
    return make_family_task(entry.family, **entry.spec_kwargs(spec_kwargs))


def _token_dtype(vocab_size: int) -> type[np.integer]:
    return np.uint8 if vocab_size < 255 else np.uint16 if vocab_size < 65535 else np.int32


class EpisodeStream:
    """Seeded source of episodes: draws blocks of ``block`` sequences, hands them out in order.

    With ``prefetch`` one worker thread draws every block, the next one while the current one
    is in use (torch releases the GIL). The worker runs torch on one intra-op thread (a
    per-thread setting): beside the stepping thread that fills two cores without
    oversubscription, whose OpenMP barrier stalls made a busy machine ~10x slower. Blocks come
    from the same generator in the same order, so the data are identical with or without it.
    """

    def __init__(
        self,
        task: Task,
        split: str,
        seed_source: np.random.Generator,
        block: int,
        prefetch: bool = False,
    ):
        self.task = task
        self.block = block
        self.generator = task.generator(int(seed_source.integers(2**63)), split)
        self._offset = block
        self._pool: ThreadPoolExecutor | None = None
        self._next: Future[Batch] | None = None
        if prefetch:
            self._pool = ThreadPoolExecutor(
                1,
                thread_name_prefix="iclgym-sampler",
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
            self._next = self._pool.submit(self._draw)

    def _draw(self) -> Batch:
        return self.task.sample(self.block, generator=self.generator)

    def take(self, count: int) -> tuple[Batch, slice]:
        """The block holding the next ``count`` episodes and their rows; ``count | block``."""
        if self._offset == self.block:
            if self._pool is None:
                self._batch = self._draw()
            else:
                self._batch = self._next.result()
                self._next = self._pool.submit(self._draw)
            self._offset = 0
        rows = slice(self._offset, self._offset + count)
        self._offset += count
        return self._batch, rows

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def first_argmax(p: np.ndarray) -> np.ndarray:
    """argmax over the last axis, first index winning ties.

    For the small vocabularies of these tasks a loop over the V columns is several times
    faster than ``np.argmax`` on (N, V) arrays.
    """
    if p.shape[-1] > 16:
        return p.argmax(-1)
    best = np.zeros(p.shape[:-1], dtype=np.int64)
    top = p[..., 0]
    for j in range(1, p.shape[-1]):
        better = p[..., j] > top
        best[better] = j
        top = np.maximum(top, p[..., j])
    return best


def fresh_copy(a: np.ndarray) -> np.ndarray:
    """A copy of ``a``; for (N, L) uint8 buffers ~8x faster than ``ndarray.copy`` (measured)."""
    out = np.empty(a.shape, dtype=a.dtype)
    np.copyto(out, a)
    return out


def full_sequences(batch: Batch) -> np.ndarray:
    """(B, T + 1) tokens ``x_0 .. x_T`` of a batch, as numpy."""
    return torch.cat([batch.tokens, batch.targets[:, -1:]], 1).cpu().numpy()


class _Spaces:
    """Observation/action spaces and action scoring shared by the single and vector env."""

    def _setup(
        self,
        task: Task,
        observation: str,
        window: int,
        action: str,
        logit_scale: float,
        split: str,
    ) -> None:
        if observation not in OBSERVATIONS:
            raise ValueError(
                f"observation={observation!r} is invalid: expected one of {OBSERVATIONS}"
            )
        if action not in ACTIONS:
            raise ValueError(f"action={action!r} is invalid: expected one of {ACTIONS}")
        split = check_split(split)
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} is invalid: expected an int >= 1")
        if not np.isfinite(logit_scale) or logit_scale <= 0:
            raise ValueError(f"logit_scale={logit_scale!r} is invalid: expected a float > 0")
        values = getattr(task, "label_values", None)
        if action == "value" and values is None:
            raise ValueError(
                f"action='value' needs a task with real-valued labels (label_values); "
                f"{type(task).__name__} has none"
            )
        class_tokens = getattr(task, "class_tokens", None)
        if action == "class" and not class_tokens:
            raise ValueError(
                f"action='class' needs a task with classes (task.class_tokens, e.g. a template "
                f"task with label_type='classification'); this {type(task).__name__} has none"
            )
        self.task, self.split = task, split
        # Tasks with per-episode info (template tasks) give it as columns of a batch; None
        # for the others (Markov), whose step path then stays as it was.
        self._episode_fn = getattr(task, "episode_info", None)
        self._episode: dict[str, Any] | None = None
        # Label units for info["label"] / info["oracle_pred"]: values, class ids or tokens.
        self.values = None if values is None else np.nan_to_num(np.asarray(values, np.float64))
        self.class_tokens = class_of = None
        if class_tokens:
            self.class_tokens = np.asarray(class_tokens, dtype=np.int64)
            class_of = np.full(task.vocab_size, -1, dtype=np.int64)
            class_of[self.class_tokens] = np.arange(len(class_tokens))
        self.class_of = class_of
        self.first = task.first_scored_position
        self.obs_mode, self.action_mode = observation, action
        self.logit_scale = float(logit_scale)
        v, t = task.vocab_size, task.seq_len
        self.vocab_size, self.seq_len, self.pad = v, t, v
        dtype = _token_dtype(v + 1)
        width = {"context": t + 1, "window": window}.get(observation)
        self.window = width
        self.single_obs_space: spaces.Space = (
            spaces.Discrete(v)
            if width is None
            else spaces.MultiDiscrete([v + 1] * width, dtype=dtype)
        )
        self.single_act_space: spaces.Space = {
            "token": spaces.Discrete(v),
            "distribution": spaces.Box(0.0, 1.0, (v,), np.float32),
            "logits": spaces.Box(-1.0, 1.0, (v,), np.float32),
            "value": None,
            "class": None if class_tokens is None else spaces.Discrete(len(class_tokens)),
        }[action]
        if action == "value":
            values = np.asarray(values, dtype=np.float64)
            finite = values[np.isfinite(values)]
            low, high = min(-1.0, finite.min()), max(1.0, finite.max())
            self.single_act_space = spaces.Box(low, high, (1,), np.float32)

    def _probabilities(self, action: Any, shape: tuple[int, ...]) -> np.ndarray:
        """Validated probability vectors of ``shape + (V,)`` from distribution/logits actions."""
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (*shape, self.vocab_size):
            raise ValueError(f"action shape {a.shape} is not {(*shape, self.vocab_size)}")
        if not np.isfinite(a).all():
            raise ValueError(f"action contains NaN or inf: {action}")
        if self.action_mode == "logits":
            if (np.abs(a) > 1.0).any():
                raise ValueError(f"logits action outside Box(-1, 1): {action}")
            z = self.logit_scale * a
            z -= z.max(-1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(-1, keepdims=True)
        if (a < 0).any() or (a > 1).any():
            raise ValueError(f"distribution action has entries outside [0, 1]: {action}")
        total = a.sum(-1, keepdims=True)
        if (total <= 0).any():
            raise ValueError(f"distribution action sums to zero: {action}")
        q = np.maximum(a / total, PROB_FLOOR)
        return q / q.sum(-1, keepdims=True)

    def _check_tokens(
        self, action: Any, shape: tuple[int, ...], n: int | None = None, kind: str = "token"
    ) -> np.ndarray:
        n = self.vocab_size if n is None else n
        a = np.asarray(action)
        if a.dtype.kind not in "iu" or a.shape != shape or a.min() < 0 or a.max() >= n:
            raise ValueError(f"{kind} action {action!r} is outside Discrete({n})^{shape}")
        return a

    def _labels(self, target: np.ndarray, oracle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels (N,) and the oracle's predictions (N,) in label units: the real value
        (regression; the oracle predicts its expected value), the class id, or the token."""
        if self.values is not None:
            return self.values[target], oracle @ self.values
        if self.class_of is not None:
            return self.class_of[target], self.class_of[first_argmax(oracle)]
        return target.astype(np.int64), first_argmax(oracle).astype(np.int64)

    def _episode_columns(
        self, batch: Batch, rows: slice, target: np.ndarray, oracle: np.ndarray
    ) -> dict[str, Any]:
        """Per-episode info columns of ``batch[rows]``: the task's ``episode_info`` plus
        ``label`` and ``oracle_pred``; ``target`` (N,) is the last token x_T of each row and
        ``oracle`` (N, V) the oracle's law of it."""
        columns = {
            key: {k: v[rows] for k, v in col.items()} if isinstance(col, dict) else col[rows]
            for key, col in self._episode_fn(batch).items()
        }
        columns["label"], columns["oracle_pred"] = self._labels(target, oracle)
        return columns

    def _score(
        self, action: Any, target: np.ndarray, true: np.ndarray, oracle: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rewards (N,) and per-step info for actions on N envs at one position."""
        if self.action_mode == "token":
            reward = (self._check_tokens(action, target.shape) == target).astype(np.float64)
            return reward, {"regret": (first_argmax(oracle) == target) - reward}
        if self.action_mode == "class":
            a = self._check_tokens(action, target.shape, len(self.class_tokens), "class")
            reward = (self.class_tokens[a] == target).astype(np.float64)
            return reward, {"regret": (first_argmax(oracle) == target) - reward}
        if self.action_mode == "value":
            a = np.asarray(action, dtype=np.float64)
            box = self.single_act_space
            if a.shape != (*target.shape, 1) or not np.isfinite(a).all():
                raise ValueError(f"value action {action!r} is not a finite {(*target.shape, 1)}")
            if (a < box.low[0]).any() or (a > box.high[0]).any():
                raise ValueError(
                    f"value action {action!r} is outside [{box.low[0]}, {box.high[0]}]"
                )
            y = self.values[target]
            reward = -((a[..., 0] - y) ** 2)
            oracle_reward = -((oracle @ self.values - y) ** 2)
            return reward, {"regret": oracle_reward - reward, "label": y}
        rows = np.arange(target.shape[0])
        q = self._probabilities(action, target.shape)
        reward = np.log(q[rows, target])
        oracle_reward = np.log(oracle[rows, target])
        tiny = np.finfo(true.dtype).tiny  # 0 log 0 = 0 (1e-300 underflows in float32)
        kl = (true * (np.log(np.maximum(true, tiny)) - np.log(q))).sum(-1)
        return reward, {"regret": oracle_reward - reward, "kl": kl}


class ICLEnv(_Spaces, gym.Env):
    """One in-context sequence per episode; see the module docstring for the spaces."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        env_id: str | None = None,
        *,
        task: Task | None = None,
        observation: str = "context",
        window: int = 8,
        action: str = "token",
        logit_scale: float = 5.0,
        split: str = "train",
        render_mode: str | None = None,
        **spec_kwargs: Any,
    ) -> None:
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode={render_mode!r} is invalid: expected None or 'ansi'")
        self._setup(
            build_task(env_id, task, spec_kwargs), observation, window, action, logit_scale, split
        )
        self.observation_space = self.single_obs_space
        self.action_space = self.single_act_space
        self.render_mode = render_mode
        self._stream: EpisodeStream | None = None
        self._block_batch: Batch | None = None
        self._t: int | None = None
        self._last: tuple[Any, float] | None = None

    def _observation(self) -> Any:
        t = self._t
        if self.obs_mode == "token":
            return self._token_list[t]
        return (
            self._obs_buffer[t : t + self.window].copy()
            if self.obs_mode == "window"
            else self._obs_buffer.copy()
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        split = reset_split(options)
        super().reset(seed=seed)
        if seed is not None or self._stream is None or split not in (None, self.split):
            self.split = split or self.split
            self._stream = EpisodeStream(self.task, self.split, self.np_random, BLOCK)
        batch, rows = self._stream.take(1)
        if batch is not self._block_batch:  # score the whole block once
            self._block_batch = batch
            self._block = (
                full_sequences(batch),
                batch.true_probs.cpu().numpy(),
                self.task.oracle(batch).exp().cpu().numpy(),
            )
            if self._episode_fn is not None:
                seqs, oracle = self._block[0], self._block[2]
                self._block_info = self._episode_columns(
                    batch, slice(None), seqs[:, -1], oracle[:, -1]
                )
        self._tokens, self._true, self._oracle = (a[rows][0] for a in self._block)
        self._token_list = self._tokens.tolist()
        self._oracle_hits = (self._oracle.argmax(-1) == self._tokens[1:]).astype(float).tolist()
        self._t = self.first
        self._last = None
        dtype = self.single_obs_space.dtype if self.obs_mode != "token" else np.int64
        if self.obs_mode == "context":
            self._obs_buffer = np.full(self.seq_len + 1, self.pad, dtype=dtype)
            self._obs_buffer[: self.first + 1] = self._tokens[: self.first + 1]
        elif self.obs_mode == "window":
            self._obs_buffer = np.full(self.window + self.seq_len, self.pad, dtype=dtype)
            self._obs_buffer[self.window - 1 :] = self._tokens
        if self._episode_fn is not None:
            self._episode = self._episode_row(self._block_info, rows.start)
        return self._observation(), {"t": self.first, "split": self.split}

    @staticmethod
    def _episode_row(columns: dict[str, Any], i: int) -> dict[str, Any]:
        """Row ``i`` of episode info columns as Python scalars; in nested dicts (the
        substitution) negative entries mean absent and are left out."""
        return {
            key: {k: int(v[i]) for k, v in col.items() if v[i] >= 0}
            if isinstance(col, dict)
            else col[i].item()
            for key, col in columns.items()
        }

    def _episode_info(self) -> dict[str, Any]:
        """A fresh copy of this episode's info (no object shared between two infos)."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self._episode.items()}

    def step(self, action: Any):
        t = self._t
        if t is None:
            raise RuntimeError("step() called before reset()")
        if t >= self.seq_len:
            raise RuntimeError("step() called after the episode ended; call reset() first")
        target = self._token_list[t + 1]
        true, oracle = self._true[t], self._oracle[t]
        info = {"t": t, "true_probs": true, "oracle_probs": oracle, "split": self.split}
        if self.action_mode == "token":  # scalar fast path: this is the per-step hot loop
            reward = 1.0 if self._token(action) == target else 0.0
            info["regret"] = self._oracle_hits[t] - reward
        else:
            rewards, extra = self._score(
                np.asarray(action)[None], np.array([target]), true[None], oracle[None]
            )
            reward = float(rewards[0])
            info.update((k, float(v[0])) for k, v in extra.items())
        self._t = t + 1
        if self.obs_mode == "context":
            self._obs_buffer[t + 1] = target
        self._last = (action, reward)
        terminated = self._t == self.seq_len
        if terminated and self._episode is not None:  # the label step of a template task
            info.update(self._episode_info())
        return self._observation(), reward, terminated, False, info

    def _token(self, action: Any) -> int:
        """A validated token id from an int, a numpy integer or a one-element int array."""
        if isinstance(action, (int, np.integer)) and not isinstance(action, (bool, np.bool_)):
            a = int(action)
        else:
            arr = np.asarray(action)
            if arr.size != 1 or arr.dtype.kind not in "iu":
                raise ValueError(f"token action {action!r} is outside Discrete({self.vocab_size})")
            a = int(arr.reshape(()))
        if not 0 <= a < self.vocab_size:
            raise ValueError(f"token action {action!r} is outside Discrete({self.vocab_size})")
        return a

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._t is None:
            return None
        shown = " ".join(str(x) for x in self._tokens[max(0, self._t - 15) : self._t + 1])
        line = f"t={self._t:4d} | ... {shown}"
        if self._last is not None:
            action, reward = np.round(np.asarray(self._last[0]), 3), self._last[1]
            line += f" | last action {action} reward {reward:+.3f}"
        return line + "\n"


class ICLVectorEnv(_Spaces, VectorEnv):
    """Native batched env: ``num_envs`` sequences stepped in lockstep with no per-env loop.

    Every episode of a task has the same length, so all sub-envs reset together; autoreset is
    next-step (the step after the last one returns the new first observation, reward 0 and
    both flags false). Data come from one batched sampler call per episode round, so the
    stream of a sub-env is not that of ``gym.make`` seeded ``seed + i``; with ``num_envs=1``
    it is exactly ``gym.make``'s stream for the same seed.
    """

    metadata: ClassVar[dict[str, Any]] = {
        "render_modes": ["ansi"],
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }

    def __init__(
        self,
        num_envs: int = 1,
        env_id: str | None = None,
        *,
        task: Task | None = None,
        observation: str = "context",
        window: int = 8,
        action: str = "token",
        logit_scale: float = 5.0,
        split: str = "train",
        render_mode: str | None = None,
        max_episode_steps: int | None = None,
        **spec_kwargs: Any,
    ) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r} is invalid: expected an int >= 1")
        if max_episode_steps is not None and (
            not isinstance(max_episode_steps, int) or max_episode_steps < 1
        ):
            raise ValueError(
                f"max_episode_steps={max_episode_steps!r} is invalid: expected an int >= 1"
            )
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode={render_mode!r} is invalid: expected None or 'ansi'")
        self._setup(
            build_task(env_id, task, spec_kwargs), observation, window, action, logit_scale, split
        )
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.max_episode_steps = max_episode_steps
        self.single_observation_space = self.single_obs_space
        self.single_action_space = self.single_act_space
        self.observation_space = batch_space(self.single_obs_space, num_envs)
        self.action_space = batch_space(self.single_act_space, num_envs)
        self._stream: EpisodeStream | None = None
        self._t: int | None = None
        self._autoreset = False

    def _start_round(self) -> tuple[Any, dict[str, Any]]:
        batch, rows = self._stream.take(self.num_envs)
        tokens = batch.tokens[rows].numpy()
        self._tokens_tm = np.empty((self.seq_len + 1, self.num_envs), dtype=tokens.dtype)
        self._tokens_tm[:-1] = tokens.T  # (T + 1, N): one row per step
        self._tokens_tm[-1] = batch.targets[rows, -1].numpy()
        online = self.task.online(batch)
        whole = rows == slice(0, self.block)
        self._online = online if whole else lambda t: tuple(a[rows] for a in online(t))
        info = {"t": np.full(self.num_envs, self.first, dtype=np.int64), "split": self._split_info}
        if self._episode_fn is not None:  # label info needs the law of x_T now: keep it
            last, fetch = self.seq_len - 1, self._online
            laws = fetch(last)
            self._online = lambda t: laws if t == last else fetch(t)
            self._episode = self._episode_columns(batch, rows, self._tokens_tm[-1], laws[1])
        self._t = self.first
        self._autoreset = False
        dtype = self.single_obs_space.dtype if self.obs_mode != "token" else np.int64
        if self.obs_mode == "context":
            self._obs_buffer = np.full((self.num_envs, self.seq_len + 1), self.pad, dtype=dtype)
            self._obs_buffer[:, : self.first + 1] = tokens[:, : self.first + 1]
        elif self.obs_mode == "window":
            self._obs_buffer = np.full(
                (self.num_envs, self.window + self.seq_len), self.pad, dtype=dtype
            )
            self._obs_buffer[:, self.window - 1 :] = self._tokens_tm.T
        else:
            self._obs_buffer = None
        return self._observation(), info

    def _episode_info(self) -> dict[str, Any]:
        """Fresh copies of this round's episode info arrays."""
        return {
            key: {k: v.copy() for k, v in col.items()} if isinstance(col, dict) else col.copy()
            for key, col in self._episode.items()
        }

    def _observation(self) -> np.ndarray:
        t = self._t
        if self.obs_mode == "token":
            return self._tokens_tm[t].astype(np.int64)
        view = self._obs_buffer[:, t : t + self.window] if self.obs_mode == "window" else None
        return fresh_copy(self._obs_buffer if view is None else view)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        split = reset_split(options)
        super().reset(seed=seed)
        if seed is not None or self._stream is None or split not in (None, self.split):
            self.split = split or self.split
            # info["split"]: a read-only broadcast view, made once per stream and shared by
            # the infos (a fresh array per step cost ~4 us at 4096 envs)
            self._split_info = np.broadcast_to(np.array(self.split), (self.num_envs,))
            block = max(BLOCK, self.num_envs)
            if block % self.num_envs:
                block = self.num_envs * (block // self.num_envs + 1)
            if self._stream is not None:
                self._stream.close()
            self._stream = EpisodeStream(
                self.task, self.split, self.np_random, block, prefetch=True
            )
            self.block = block
        return self._start_round()

    def step(self, actions: Any):
        if self._t is None:
            raise RuntimeError("step() called before reset()")
        if self._autoreset:
            obs, info = self._start_round()
            flags = np.zeros(self.num_envs, dtype=np.bool_)
            return obs, np.zeros(self.num_envs), flags, flags.copy(), info
        t = self._t
        target = self._tokens_tm[t + 1]
        true, oracle = self._online(t)
        reward, extra = self._score(actions, target, true, oracle)
        self._t = t + 1
        if self.obs_mode == "context":
            self._obs_buffer[:, t + 1] = target
        terminated = self._t == self.seq_len
        truncated = (
            not terminated
            and self.max_episode_steps is not None
            and self._t - self.first >= self.max_episode_steps
        )
        self._autoreset = terminated or truncated
        info = {
            "t": np.full(self.num_envs, t),
            "true_probs": true,
            "oracle_probs": oracle,
            "split": self._split_info,
            **extra,
        }
        if terminated and self._episode is not None:  # the label step of a template task
            info.update(self._episode_info())
        return (
            self._observation(),
            reward,
            np.full(self.num_envs, terminated),
            np.full(self.num_envs, truncated),
            info,
        )

    def close_extras(self, **kwargs: Any) -> None:
        """Stop the prefetching sampler thread."""
        if self._stream is not None:
            self._stream.close()

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode != "ansi" or self._t is None:
            return None
        lo = max(0, self._t - 15)
        return tuple(
            f"t={self._t:4d} | ... {' '.join(map(str, self._tokens_tm[lo : self._t + 1, i]))}\n"
            for i in range(self.num_envs)
        )
