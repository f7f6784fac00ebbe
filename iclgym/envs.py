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
    left-padded with ``V``, ``window`` an int in ``[1, seq_len + 1]`` (a longer window would
    only add PAD; default ``min(8, seq_len + 1)``). Space parameters are int64 (``nvec``,
    ``n``: SB3 sums ``nvec`` in its dtype); observation arrays are the smallest unsigned
    dtype holding ``V + 1`` ids (uint8 / uint16 / uint32), which cast safely to the space's
    int64, so ``obs in observation_space`` holds.
Continuous features: for a task whose batches carry features (``task.feature_dim`` = F > 0,
e.g. the multi-concept prompts' word and label vectors), the token observation above becomes
the ``"tokens"`` entry of a ``Dict`` whose ``"features"`` entry is a float32 ``Box`` of the
same positions bounded by the float32 range (every finite value; infinite bounds make both
checkers warn): ``(seq_len, F)`` for ``"context"``, unrevealed rows
zero; ``(W, F)`` for ``"window"``, left-padded with zero rows; ``(F,)`` for ``"token"``.
``observation="features"`` gives the ``(seq_len, F)`` context features alone, a plain ``Box``
(SB3's ``MlpPolicy``).
Actions (``action=``): every action inside the declared action space is valid; anything else
raises ``ValueError``.
    ``"token"`` (default): ``Discrete(V)``, reward ``1[a = x_{t+1}]``;
    ``"distribution"``: a vector in ``Box(0, 1, (V,))`` read as the distribution ``a / sum(a)``
    (a vector summing to 0, e.g. all zeros, is the uniform distribution), floored at
    ``PROB_FLOOR`` (so rewards stay bounded) and renormalised; reward ``log q(x_{t+1})``;
    ``"logits"``: ``Box(-1, 1, (V,))`` read as ``softmax(logit_scale * a)`` (SB3-friendly),
    floored at ``PROB_FLOOR`` and renormalised as well; reward ``log q(x_{t+1})``.
    ``reward="squared"`` (probability actions only; default: the task's
    :attr:`~iclgym.tasks.Task.probability_reward`, ``"logprob"`` except for sparse contextual
    bigrams, whose paper loss it is) gives instead ``-||e_{x_{t+1}} - f||^2`` with ``f`` the
    distribution action as given (not renormalised: its expectation is maximal at the true
    law) or the floored ``softmax(logit_scale * a)``, in [-V, 0] ([-2, 0] for a normalised
    ``f``);
    ``"value"``: for tasks with real-valued labels
    (``task.label_values``, the value of each label token), a real prediction in
    ``Box(lo, hi, (1,))`` with ``[lo, hi]`` the label range widened to contain ``[-1, 1]``,
    reward ``-(a - y)^2`` with ``y`` the value of ``x_{t+1}`` (the oracle predicts the
    expected value under its law); ``"class"``: for tasks with classes (``task.class_tokens``,
    the label token of each class), ``Discrete(C)``, action c standing for the token of class
    c, reward ``1[class_tokens[a] = x_{t+1}]``.
Splits: ``split=`` (``"train"``, ``"validation"`` or its alias ``"val"``, ``"test"``, or one of
the task's ``named_splits``: held-out distributions such as longer contexts, drawn from the
test seed stream) picks the data split; ``reset(options={"split": ...})`` switches it for this
and later episodes (a new episode stream seeded from the env's ``np_random``, so seeded resets
stay deterministic); a named split whose spaces differ (e.g. another context length) can only
be chosen at construction. Other option keys and unknown splits raise ``ValueError``.
Info (every step): ``t`` (the position scored), ``split``, the law ``x_{t+1}`` was drawn from
and the oracle's prediction, as given by ``task.online`` (the oracle named by
:attr:`ICLEnv.online_oracle`, e.g. ``"bayes (closed form)"``): ``true_probs`` and
``oracle_probs`` (float32 (V,) laws), or, where the task gives point masses (template tasks at
the label), ``true_token`` and ``oracle_token`` (the token holding all the mass); ``regret``
(the oracle's reward minus the agent's on this step) and, for probability actions, ``kl`` =
KL(true || q); ``reset`` gives ``t`` and ``split``. Tasks with per-episode info
(``task.episode_info(batch)``, columns of per-sequence values, e.g. template tasks'
``template_id`` and ``substitution`` {wildcard: token id}) add it, with ``label`` (the last
token ``x_T`` in label units: its real value where the task has ``label_values``, its class id
where it has ``class_tokens``, else the token id) and ``oracle_pred`` (the oracle's prediction
in those units: expected value, or the class / token of its argmax), to the info of the last
step, which scores the label: they reveal the answer, so they come only after the prediction.
The vector env gives every key as an array over sub-envs (``split`` a read-only str array;
``substitution`` a dict of arrays, -1 where a sub-env's template lacks the wildcard).
Rendering (``render_mode=``): ``"ansi"`` (recent tokens, last action and reward as text) or
``"rgb_array"`` (a (16, 256, 3) uint8 frame: the last 32 revealed tokens as coloured cells,
and under each token revealed by a step a green cell if that step's reward matched the
oracle's (regret <= 0), red otherwise); the vector env returns one per sub-env.
Copies and processes: both envs pickle and deep-copy mid-episode, the copy continuing the
same stream. The native vector env prepares its next blocks of episodes in worker threads;
forking waits for them. OpenMP is not fork-safe (a child of a process that ran torch hangs in
its first parallel torch op), so torch runs on one intra-op thread in a process forked from
one that imported this module, and in a multiprocessing worker started by fork that imports
it first: ``gym.make_vec(..., vectorization_mode="async")`` and SB3's ``SubprocVecEnv`` work
with the fork start method. Workers started by spawn or forkserver (SB3's default) import
only what the id names: use ``"iclgym:<id>"`` there, as for any third-party Gymnasium env.
"""

from __future__ import annotations

import colorsys
import inspect
import multiprocessing
import os
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from iclgym.argmax import first_argmax_rows
from iclgym.registry import check_overrides, make_task
from iclgym.tasks import SPLITS, Batch, Task
from iclgym.tasks.base import canonical_split, resolve_split
from iclgym.validation import as_float, as_int, check_memory, format_bytes, invalid

OBSERVATIONS = ("context", "token", "window", "features")
ACTIONS = ("token", "distribution", "logits", "value", "class")
REWARDS = ("logprob", "squared")
"""Rewards of probability actions (``reward=``): the log-probability of the next token, or the
negated squared error ``-||e_y - q||^2`` (the Brier score; the paper loss of sparse contextual
bigrams, Ren, Wang, Lee 2024)."""
RENDER_MODES = ("ansi", "rgb_array")
RESET_OPTIONS = ("split",)
PROB_FLOOR = 1e-6
DEFAULT_WINDOW = 8
BLOCK = 64
"""A sampler call draws at least this many sequences' worth of scored steps (64 sequences
when every position is scored), amortising the torch call over episodes."""
SINGLE_MIN_STEPS, VECTOR_MIN_STEPS = 1024, 2**16
"""Scored steps per sampler call of the single and vector env for tasks whose data do not
depend on batch sizes (see :func:`block_sequences`)."""
MAX_BLOCK_TOKENS = 2**21
"""Tokens up to which ``min_steps`` may grow a block: a sampler's (B, T) int64 arrays stay
within 16 MiB, below glibc's largest mmap threshold (32 MiB), so freed blocks are reused from
the heap rather than mapped and page-faulted afresh at every call (sparse contextual bigrams,
65536 x 129 tokens: 2.3 us per sequence vs 0.6 us at 16384 sequences, measured)."""
LOOKAHEAD, WORKERS = 3, 2
"""Blocks the native vector env prepares ahead, and the threads preparing them (see
:class:`RoundQueue`)."""
FRAME_CELLS, CELL_PIXELS = 32, 8
"""rgb_array frames show the last 32 tokens as 8x8-pixel cells."""
PALETTE = (
    np.array([colorsys.hsv_to_rgb((i * 0.6180339887) % 1.0, 0.65, 0.95) for i in range(64)]) * 255
).astype(np.uint8)
"""Token colours (token id mod 64), golden-ratio hues."""


def check_split(split: Any, name: str = "split", task: Task | None = None) -> str:
    """The canonical name of a split: one of ``SPLITS`` (``"val"`` is ``"validation"``) or,
    given ``task``, one of its named splits (validated by ``task.split_task``)."""
    canonical = canonical_split(split)
    if canonical in SPLITS:
        return canonical
    if task is not None and isinstance(canonical, str) and task.named_splits:
        try:
            task.split_task(canonical)
        except ValueError as err:
            raise ValueError(f"{name}={split!r} is invalid: {err}") from None
        return canonical
    raise ValueError(
        f"{name}={split!r} is invalid: expected one of "
        f"{SPLITS + tuple(task.named_splits if task else ())}"
        " (or 'val' for 'validation')"
    )


def reset_split(options: dict[str, Any] | None, task: Task | None = None) -> str | None:
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
    if "split" not in options:
        return None
    return check_split(options["split"], "options['split']", task)


def build_task(
    env_id: str | None,
    task: Task | None,
    spec_kwargs: dict[str, Any],
    env_class: type | None = None,
) -> Task:
    """The task an env runs: an explicit ``task``, or ``env_id``'s family with overrides.
    Raises ``ValueError`` for a keyword that is neither a spec key of ``env_id`` nor an
    argument of ``env_class`` (a misspelling), listing both."""
    if task is not None:
        if spec_kwargs or env_id is not None:
            raise ValueError("pass either task= or env_id/spec keyword arguments, not both")
        return task
    if env_id is None:
        raise ValueError("an iclgym env needs env_id= (a registered id) or task= (a Task)")
    note = (
        "; the native vector env autoresets next-step only (for another mode use "
        "gym.make_vec(..., vectorization_mode='sync', vector_kwargs={'autoreset_mode': ...}))"
        if "autoreset_mode" in spec_kwargs
        else ""
    )
    own = [] if env_class is None else keyword_names(env_class)
    check_overrides(env_id, spec_kwargs, own, note)
    return make_task(env_id, **spec_kwargs)


def keyword_names(cls: type) -> list[str]:
    """The named keyword arguments of ``cls.__init__`` (not ``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters.values()
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.name != "self"]


def token_dtype(count: int) -> type[np.unsignedinteger]:
    """The smallest unsigned dtype holding the ids ``0 .. count - 1``."""
    return np.uint8 if count <= 2**8 else np.uint16 if count <= 2**16 else np.uint32


def block_sequences(task: Task, num_envs: int, min_steps: int = 0) -> int:
    """Sequences per sampler call (:class:`EpisodeStream` block) for ``num_envs`` sub-envs:
    the least multiple of ``num_envs`` holding :data:`BLOCK` sequences' worth of scored steps
    (``64 * seq_len`` steps: 64 sequences when every position is scored, ``64 * seq_len /
    steps`` when an episode scores fewer steps) and, for tasks whose data do not depend on
    batch sizes (:attr:`~iclgym.tasks.Task.sample_composes`), at least ``min_steps`` scored
    steps or :data:`MAX_BLOCK_TOKENS` tokens, whichever is fewer (larger blocks amortise the
    sampler call). A function of the task and its arguments only, so a seed gives the same
    episodes on every run (each block has its own seed, so the block size is part of the
    stream: the vector env with one sub-env uses the single env's)."""
    steps = task.seq_len - task.first_scored_position
    want = -(-BLOCK * task.seq_len // steps)
    if task.sample_composes:
        want = max(want, min(-(-min_steps // steps), MAX_BLOCK_TOKENS // task.seq_len))
    return num_envs * -(-want // num_envs)


def first_argmax(p: np.ndarray) -> np.ndarray:
    """argmax over the last axis, first index winning ties.

    For the small vocabularies of these tasks (2 <= V <= 16) a compiled scan of the rows
    (:func:`iclgym.argmax.first_argmax_rows`) is ~3x faster than ``np.argmax`` on (N, V)
    arrays (and than the loop over the V columns it replaces, whose ties and NaNs it keeps).
    """
    if p.shape[-1] > 16 or p.shape[-1] < 2:
        return p.argmax(-1)
    return first_argmax_rows(p)


def fresh_copy(a: np.ndarray) -> np.ndarray:
    """A copy of ``a``; for (N, L) uint8 buffers ~8x faster than ``ndarray.copy`` (measured)."""
    out = np.empty(a.shape, dtype=a.dtype)
    np.copyto(out, a)
    return out


def unshared_laws(true: Any, oracle: Any, handed: set[int]) -> tuple[Any, Any]:
    """``(true, oracle)`` of one position, each law array that is an array already handed out
    in this episode (``handed``: their ids, updated) or the other one of the pair replaced by
    a copy: every step's info holds its own arrays (Gymnasium's contract: users keep what a
    step returns), whatever a task's ``online`` returns (e.g. one uniform array for several
    positions). An array returned again is alive, so its id is the recorded one; a recorded
    id reused by a new array only costs a copy. Point masses (token-id lists) pass through."""
    out: list[Any] = []
    for law in (true, oracle):
        if isinstance(law, np.ndarray):
            if id(law) in handed or (out and np.may_share_memory(law, out[0])):
                law = law.copy()
            handed.add(id(law))
        out.append(law)
    return out[0], out[1]


def select_rows(batch: Batch, rows: slice) -> Batch:
    """The sequences ``rows`` of ``batch`` (views; ``params`` have a leading batch dim)."""
    return replace(
        batch,
        tokens=batch.tokens[rows],
        targets=batch.targets[rows],
        loss_mask=batch.loss_mask[rows],
        params={k: v[rows] for k, v in batch.params.items()},
        features=None if batch.features is None else batch.features[rows],
    )


def episode_rows(columns: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-episode info dicts (Python scalars) of a block's info ``columns`` (arrays over
    episodes, or dicts of them: the substitution, whose negative entries mean absent and are
    left out), built once per block so a step only looks its row up. The rows' own zips are
    not ``strict`` (their lengths match by construction; a keyword argument to ``zip`` made
    the row dicts ~1.5x slower to build)."""
    keys = list(columns)
    rows = len(next(v for v in columns.values() if not isinstance(v, dict)))
    flat = [
        [
            {k: x for k, x in zip(col, row) if x >= 0}  # noqa: B905
            for row in zip(*(v.tolist() for v in col.values()), strict=True)
        ]
        if isinstance(col, dict) and col
        else [{}] * rows
        if isinstance(col, dict)
        else col.tolist()
        for col in columns.values()
    ]
    return [dict(zip(keys, row)) for row in zip(*flat, strict=True)]  # noqa: B905


def is_point(law: np.ndarray) -> bool:
    """True for point-mass laws given as token ids (int arrays), False for dense laws."""
    return law.dtype.kind in "iu"


def law_keys(true: np.ndarray, oracle: np.ndarray) -> tuple[str, str]:
    """The info keys of a step's laws: ``*_probs`` for dense laws, ``*_token`` for points."""
    return (
        "true_token" if is_point(true) else "true_probs",
        "oracle_token" if is_point(oracle) else "oracle_probs",
    )


# ------------------------------------------------------------------------ episode sources
class EpisodeStream:
    """Seeded source of blocks of ``block`` sequences. Block i is one sampler call on a
    generator of its own, seeded by the i-th draw of a private ``numpy`` generator (itself
    seeded by one draw of ``seed_source``, the env's ``np_random``, at reset): blocks are
    independent, so :class:`RoundQueue` samples several at once and a seed gives the same
    episodes in any order of completion. :meth:`next_seed` (in order, on the stepping thread)
    and :meth:`sample` (anywhere) split :meth:`next_block`."""

    def __init__(self, task: Task, split: str, seed_source: np.random.Generator, block: int):
        self.task, self.split, self.block = task, split, block
        self.seeds = np.random.default_rng(int(seed_source.integers(2**63)))

    def next_seed(self) -> int:
        """The seed of the next block."""
        return int(self.seeds.integers(2**63))

    def sample(self, seed: int) -> Batch:
        """The block of ``seed`` (:meth:`next_seed`)."""
        return self.task.sample(self.block, generator=self.task.generator(seed, self.split))

    def next_block(self) -> Batch:
        return self.sample(self.next_seed())


class Block:
    """One sampler call's sequences with what the vector env needs per round precomputed
    over the whole block (in a worker thread), so that rounds are row slices: the tokens
    (``tokens`` (B, T) and ``last`` (B,), the final target x_T), the targets of the scored
    positions token-major (``targets`` (S, B), one row per step), the initial observation
    buffers, the per-episode info columns and the task's online laws: computed once over the
    block when an episode scores one position (with the oracle's hits and the label
    columns), else one online function per round (stepped by the env as the episode goes).
    Pickles without the online functions and rebuilds them. (Work moved from here to the
    stepping thread measured slower: that thread also pays for the GIL.)
    """

    def __init__(self, space: _Spaces, batch: Batch, num_envs: int) -> None:
        task = space.task
        first = task.first_scored_position
        self.task, self.first = task, first
        self.tokens = batch.tokens.cpu().numpy()
        targets = batch.targets.cpu().numpy()
        self.last = targets[:, -1].copy()
        if space.obs_dtype == np.uint8:  # transpose bytes, not int64 (4x less traffic)
            narrow = batch.targets[:, first:].to(torch.uint8).T.contiguous()
            self.targets = narrow.cpu().numpy()
        else:
            self.targets = np.ascontiguousarray(targets[:, first:].T, dtype=space.obs_dtype)
        # what the context observation reveals after each step: the next input token (the
        # label at the end), the target itself except where a task's next input is not its
        # target (a multi-concept query's placeholder)
        if torch.equal(batch.targets[:, first:-1], batch.tokens[:, first + 1 :]):
            self.reveals = self.targets
        else:
            nxt = torch.cat([batch.tokens[:, first + 1 :], batch.targets[:, -1:]], 1)
            self.reveals = np.ascontiguousarray(nxt.cpu().numpy().T, dtype=space.obs_dtype)
        self.obs = space.initial_buffer(self.tokens, self.last)
        self.features = None if batch.features is None else batch.features.cpu().numpy()
        self.feature_obs = space.initial_features(self.features)
        self.episode = None if space.episode_fn is None else space.episode_fn(batch)
        size = batch.batch_size
        self.rows = [slice(i, i + num_envs) for i in range(0, size, num_envs)]
        self.laws = self.hits = None
        self.batches: list[Batch] | None = None
        if task.seq_len - first == 1:  # the one scored step: laws, hits and labels now
            self.laws = unshared_laws(*task.online(batch)(first), set())
            oracle = self.laws[1]
            best = oracle if is_point(oracle) else first_argmax(oracle)  # once for both
            self.hits = space.oracle_hits(self.targets[0], best)
            if self.episode is not None:
                self.episode = space.episode_columns(self.episode, self.targets[0], oracle, best)
        else:
            self.batches = [
                batch if size == num_envs else select_rows(batch, rows) for rows in self.rows
            ]
        self._build_onlines()

    def _build_onlines(self) -> None:
        self.onlines = None if self.batches is None else [self.task.online(b) for b in self.batches]

    def round(self, index: int) -> Round:
        """Round ``index`` of the block (views of the block's arrays)."""
        return Round(self, index)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["onlines"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build_onlines()


class Round:
    """One round of the vector env: ``num_envs`` episodes stepped in lockstep, rows of a
    :class:`Block` (the round owns its rows of the observation buffer). :meth:`laws` reads
    the block's laws or steps the round's online function. Pickles without the online
    function and rebuilds it by replaying the positions already visited."""

    def __init__(self, block: Block, index: int) -> None:
        rows = block.rows[index]
        self.task, self.first = block.task, block.first
        self.tokens, self.last = block.tokens[rows], block.last[rows]
        self.targets = block.targets[:, rows]
        self.reveals = block.reveals[:, rows]
        self.obs = None if block.obs is None else block.obs[rows]
        self.features = None if block.features is None else block.features[rows]
        self.feature_obs = None if block.feature_obs is None else block.feature_obs[rows]
        self.episode = None
        if block.episode is not None:
            self.episode = {
                key: {k: v[rows] for k, v in col.items()} if isinstance(col, dict) else col[rows]
                for key, col in block.episode.items()
            }
        self._laws = None if block.laws is None else (block.laws[0][rows], block.laws[1][rows])
        self.hits = None if block.hits is None else block.hits[rows]
        self.batch = None if block.batches is None else block.batches[index]
        self._online = None if block.onlines is None else block.onlines[index]
        self._handed: set[int] = set()  # ids of the law arrays the round's steps gave out
        self._visited = self.first

    def token(self, t: int) -> np.ndarray:
        """(N,) int64 the token at position t = 0 .. T of every sequence."""
        return (self.tokens[:, t] if t < self.tokens.shape[1] else self.last).astype(np.int64)

    def laws(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """``(true, oracle)`` at position ``t`` (the next unvisited one); arrays of their own
        (:func:`unshared_laws`) when the online function steps the round."""
        if self._laws is not None:
            out = self._laws
        else:
            out = unshared_laws(*self._online(t), self._handed)
        self._visited = t + 1
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_online"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handed = set()  # the rebuilt function's arrays are new objects
        if self._laws is None:
            self._online = self.task.online(self.batch)
            for t in range(self.first, self._visited):
                self._online(t)


_LIVE_QUEUES: weakref.WeakSet[RoundQueue] = weakref.WeakSet()


class RoundQueue:
    """Rounds of ``num_envs`` episodes cut in order from the blocks of an
    :class:`EpisodeStream`. While the current block is stepped, :data:`WORKERS` worker
    threads prepare the next :data:`LOOKAHEAD` blocks (sampling, online laws, info columns,
    buffers; torch, numba and numpy release the GIL in their kernels), each from its own seed
    drawn in order here, so rounds are identical however many workers run and whichever
    finishes first. Each worker runs torch on one intra-op thread (a per-thread setting).
    Two workers, not one: the stepping thread leaves most of the second core idle while one
    worker prepares blocks (ICL-PriorityGraph-v0 at 4096 envs: 5.6 vs 8.3 M steps/s,
    ICL-SparseContextualBigram-v0 0.65 vs 1.27 M, side by side on the 2-core machine).

    Pickles and deep-copies (blocks being prepared are waited for and kept); forking waits
    for the workers and the child starts new ones (see the module docstring).
    """

    def __init__(self, stream: EpisodeStream, make_block: Callable[[Batch], Block]):
        self.stream, self.make_block = stream, make_block
        self._block: Block | None = None
        self._index = 0
        self._ready: list[Block] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[Block]] = []
        _LIVE_QUEUES.add(self)

    def _produce(self, seed: int) -> Block:
        return self.make_block(self.stream.sample(seed))

    def _submit(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                WORKERS,
                thread_name_prefix="iclgym-blocks",
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
        self._pending.append(self._pool.submit(self._produce, self.stream.next_seed()))

    def next(self) -> Round:
        """The next round; keeps :data:`LOOKAHEAD` blocks in preparation."""
        if self._block is None or self._index == len(self._block.rows):
            if self._ready:
                block = self._ready.pop(0)
            elif self._pending:  # a worker's error is raised again at every call
                block = self._pending[0].result()
                self._pending.pop(0)
            else:
                block = self._produce(self.stream.next_seed())
            self._block, self._index = block, 0
            while len(self._ready) + len(self._pending) < LOOKAHEAD:
                self._submit()
        self._index += 1
        return self._block.round(self._index - 1)

    def settle(self) -> None:
        """Wait for the blocks being prepared and keep them in order; a block whose worker
        failed stays pending (with those after it), so :meth:`next` raises its error."""
        wait(self._pending)
        while self._pending and self._pending[0].exception() is None:
            self._ready.append(self._pending.pop(0).result())

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        self.settle()
        if self._pending:  # a worker failed: pickling raises its error, the queue keeps it
            self._pending[0].result()
        state = dict(self.__dict__)
        state["_pool"], state["_pending"] = None, []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _LIVE_QUEUES.add(self)


def _before_fork() -> None:
    for queue in list(_LIVE_QUEUES):
        queue.settle()


def _after_fork_in_child() -> None:
    torch.set_num_threads(1)
    for queue in list(_LIVE_QUEUES):  # the worker threads do not exist in the child; the
        queue._pool = None  # pending futures, settled before the fork, are failed ones: kept


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
if multiprocessing.parent_process() is not None and multiprocessing.get_start_method(
    allow_none=True
) in (None, "fork"):
    # imported first in a forked worker (e.g. SB3's SubprocVecEnv with start_method="fork"),
    # whose parent may have run torch's OpenMP pool without importing this module
    torch.set_num_threads(1)


def _frame(tokens: list[int], regrets: list[float]) -> np.ndarray:
    """(16, 256, 3) uint8: ``tokens`` (the last <= 32 revealed) as cells on the top row, and
    below each a cell for the step that revealed it (NaN: none; green: regret <= 0; red)."""
    frame = np.zeros((2 * CELL_PIXELS, FRAME_CELLS * CELL_PIXELS, 3), dtype=np.uint8)
    offset = FRAME_CELLS - len(tokens)
    for i, (token, regret) in enumerate(zip(tokens, regrets, strict=True)):
        x = (offset + i) * CELL_PIXELS
        frame[1 : CELL_PIXELS - 1, x + 1 : x + CELL_PIXELS - 1] = PALETTE[token % len(PALETTE)]
        if not np.isnan(regret):
            colour = (40, 200, 60) if regret <= 0 else (220, 50, 40)
            frame[CELL_PIXELS + 1 : -1, x + 1 : x + CELL_PIXELS - 1] = colour
    return frame


# ------------------------------------------------------------------------------ spaces
class _Spaces:
    """Observation/action spaces and action scoring shared by the single and vector env."""

    def _setup(
        self,
        task: Task,
        observation: str,
        window: Any,
        action: str,
        logit_scale: Any,
        split: str,
        render_mode: Any,
        reward: Any = None,
    ) -> None:
        if observation not in OBSERVATIONS:
            raise ValueError(
                f"observation={observation!r} is invalid: expected one of {OBSERVATIONS}"
            )
        if action not in ACTIONS:
            raise ValueError(f"action={action!r} is invalid: expected one of {ACTIONS}")
        if render_mode is not None and render_mode not in RENDER_MODES:
            raise invalid("render_mode", render_mode, f"None or one of {RENDER_MODES}")
        split = check_split(split, task=task)
        self.base_task = task  # named splits are variants of it (reset may switch among them)
        task, self.stream_split = resolve_split(task, split)
        if observation == "features" and not task.feature_dim:
            raise ValueError(
                f"observation='features' needs a task with continuous features "
                f"(task.feature_dim > 0); {type(task).__name__} has none"
            )
        v, t = task.vocab_size, task.seq_len
        window = min(DEFAULT_WINDOW, t + 1) if window is None else as_int("window", window, 1)
        if window > t + 1:
            raise invalid(
                "window",
                window,
                f"an int in [1, {t + 1}] (seq_len + 1: a longer window only adds PAD)",
            )
        logit_scale = as_float("logit_scale", logit_scale, 0.0, low_open=True)
        if reward is not None and action not in ("distribution", "logits"):
            raise ValueError(
                f"reward={reward!r} applies to probability actions only (action='distribution' "
                f"or 'logits'); action={action!r} has its own reward"
            )
        reward = task.probability_reward if reward is None else reward
        if reward not in REWARDS:
            raise invalid("reward", reward, f"one of {REWARDS}")
        self.reward_mode = reward
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
        # for the others (Markov).
        self.episode_fn = getattr(task, "episode_info", None)
        # Label units for info["label"] / info["oracle_pred"]: values, class ids or tokens.
        self.values = None if values is None else np.nan_to_num(np.asarray(values, np.float64))
        self.class_tokens = class_of = None
        if class_tokens:
            self.class_tokens = np.asarray(class_tokens, dtype=np.int64)
            class_of = np.full(v, -1, dtype=np.int64)
            class_of[self.class_tokens] = np.arange(len(class_tokens))
        self.class_of = class_of
        self.first = task.first_scored_position
        self.obs_mode, self.action_mode = observation, action
        self.logit_scale = logit_scale
        self.vocab_size, self.seq_len, self.pad = v, t, v
        self.obs_dtype = token_dtype(v + 1)
        width = {"context": t + 1, "window": window, "features": t + 1}.get(observation)
        self.window = width
        self.single_obs_space: spaces.Space = (
            spaces.Discrete(v)
            if width is None
            else spaces.MultiDiscrete(np.full(width, v + 1, dtype=np.int64), dtype=np.int64)
        )
        self.feature_dim = f = task.feature_dim
        if f:
            rows = {"context": (t,), "features": (t,), "window": (window,), "token": ()}
            big = np.finfo(np.float32).max  # every finite float32 (checkers warn on inf)
            box = spaces.Box(-big, big, (*rows[observation], f), np.float32)
            self.single_obs_space = (
                box
                if observation == "features"
                else spaces.Dict({"tokens": self.single_obs_space, "features": box})
            )
        self.single_act_space: spaces.Space = {
            "token": spaces.Discrete(v),
            "distribution": spaces.Box(0.0, 1.0, (v,), np.float32),
            "logits": spaces.Box(-1.0, 1.0, (v,), np.float32),
            "value": None,
            "class": None if class_tokens is None else spaces.Discrete(len(class_tokens)),
        }[action]
        if action == "value":
            finite = self.values[np.isfinite(np.asarray(values, np.float64))]
            low, high = min(-1.0, finite.min()), max(1.0, finite.max())
            self.single_act_space = spaces.Box(low, high, (1,), np.float32)

    def _switch_split(self, split: str) -> None:
        """Use split ``split`` (canonical) from now on: its variant of the construction task,
        which must have the same spaces (``ValueError`` naming the difference otherwise)."""
        task, stream = resolve_split(self.base_task, split)
        shape = (task.vocab_size, task.seq_len, task.feature_dim, task.first_scored_position)
        mine = (self.vocab_size, self.seq_len, self.feature_dim, self.first)
        if shape != mine:
            raise ValueError(
                f"options['split']={split!r} changes the spaces (vocab_size, seq_len, "
                f"feature_dim, first scored position) {mine} -> {shape}: make an env with "
                f"split={split!r} instead"
            )
        self.task, self.split, self.stream_split = task, split, stream
        self.episode_fn = getattr(task, "episode_info", None)

    @property
    def online_oracle(self) -> str:
        """What ``info["oracle_probs"]`` / ``info["oracle_token"]`` is: the task's
        :attr:`~iclgym.tasks.Task.online_oracle` (e.g. ``"bayes (closed form)"``)."""
        return self.task.online_oracle

    def observation_at(self, tokens: np.ndarray, features: np.ndarray | None, t: int) -> Any:
        """The observations of N episodes at scored position t (what ``reset``/``step`` show
        just before the action that predicts x_{t+1}), from their sequences: ``tokens`` (N, T)
        = x_0 .. x_{T-1} and, for a task with features, ``features`` (N, T, F) float32.
        Batched as the vector env's observations: context (N, T + 1) with x_0 .. x_t and PAD
        after, window (N, W), token (N,), plus the feature rows revealed at t. For clients
        that score a policy on given sequences (e.g. :mod:`baselines.sb3_agents`). Raises
        ``ValueError`` for t outside the scored positions ``first_scored_position .. T - 1``."""
        if not self.first <= t < self.seq_len:
            raise ValueError(
                f"t={t} is outside the scored positions {self.first}..{self.seq_len - 1}"
            )
        tokens = np.asarray(tokens)
        n = tokens.shape[0]
        token_obs: Any = None
        if self.obs_mode == "token":
            token_obs = tokens[:, t].astype(np.int64)
        elif self.obs_mode != "features":
            buffer = self.initial_buffer(tokens, np.full(n, self.pad))
            if self.obs_mode == "context":
                buffer[:, self.first + 1 : t + 1] = tokens[:, self.first + 1 : t + 1]
                token_obs = buffer
            else:
                token_obs = buffer[:, t : t + self.window].copy()
        if features is None:
            return token_obs
        feats = self.initial_features(np.asarray(features, dtype=np.float32))
        if self.obs_mode in ("context", "features"):
            feats[:, self.first + 1 : t + 1] = features[:, self.first + 1 : t + 1]
        elif self.obs_mode == "window":
            feats = feats[:, t : t + self.window].copy()
        else:
            feats = feats[:, t].copy()
        return self.compose(token_obs, feats)

    def action_probabilities(self, action: Any) -> np.ndarray:
        """(N, V) float64 the next-token law the env reads from N probability actions
        (``action="distribution"``: normalised, floored at 1e-6; ``"logits"``:
        ``softmax(logit_scale a)``), as it scores them. Raises ``ValueError`` for other
        action modes and for actions outside the space."""
        if self.action_mode not in ("distribution", "logits"):
            raise ValueError(
                f"action_probabilities needs action='distribution' or 'logits', not "
                f"{self.action_mode!r}"
            )
        a = np.asarray(action)
        return self._probabilities(a, a.shape[:-1])

    def initial_buffer(self, tokens: np.ndarray, last: np.ndarray) -> np.ndarray | None:
        """The observation buffer at the episode start from ``tokens`` (N, T) and ``last``
        (N,), the final token x_T: context (N, T + 1) with ``x_0 .. x_s`` revealed, window
        (N, W + T) holding every token after W - 1 PADs (the window at t is columns
        t .. t + W - 1); None for the token observation."""
        n, first = tokens.shape[0], self.first
        if self.obs_mode == "context":
            buffer = np.empty((n, self.seq_len + 1), dtype=self.obs_dtype)
            if first < 16:  # column by column is ~2x faster for short rows
                for j in range(first + 1):
                    buffer[:, j] = tokens[:, j]
            else:
                buffer[:, : first + 1] = tokens[:, : first + 1]
            buffer[:, first + 1 :] = self.pad
            return buffer
        if self.obs_mode == "window":
            buffer = np.empty((n, self.window + self.seq_len), dtype=self.obs_dtype)
            buffer[:, : self.window - 1] = self.pad
            buffer[:, self.window - 1 : -1] = tokens
            buffer[:, -1] = last
            return buffer
        return None

    def initial_features(self, features: np.ndarray | None) -> np.ndarray | None:
        """The feature observation buffer at the episode start from ``features`` (N, T, F)
        float32 (None for token-only tasks): context (N, T, F) with rows ``0 .. s`` revealed
        and the rest zero; window (N, W - 1 + T, F) with W - 1 zero rows in front (the window
        at t is rows t .. t + W - 1); the features themselves for the token observation."""
        if features is None:
            return None
        n, t, f = features.shape
        first = self.first
        if self.obs_mode in ("context", "features"):  # every entry written once (no zero fill)
            buffer = np.empty((n, t, f), dtype=np.float32)
            buffer[:, : first + 1] = features[:, : first + 1]
            buffer[:, first + 1 :] = 0.0
            return buffer
        if self.obs_mode == "window":
            buffer = np.empty((n, self.window - 1 + t, f), dtype=np.float32)
            buffer[:, : self.window - 1] = 0.0
            buffer[:, self.window - 1 :] = features
            return buffer
        return features

    def compose(self, tokens: Any, features: np.ndarray | None) -> Any:
        """The observation from its token part and its feature part (None: token-only)."""
        if features is None:
            return tokens
        if self.obs_mode == "features":
            return features
        return {"tokens": tokens, "features": features}

    def _probabilities(self, action: Any, shape: tuple[int, ...]) -> np.ndarray:
        """Validated probability vectors of ``shape + (V,)`` from distribution/logits actions;
        a distribution summing to 0 is uniform."""
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
            q = np.maximum(e / e.sum(-1, keepdims=True), PROB_FLOOR)  # bounded rewards at any
            return q / q.sum(-1, keepdims=True)  # logit_scale (exp underflows to 0 past ~745)
        if (a < 0).any() or (a > 1).any():
            raise ValueError(f"distribution action has entries outside [0, 1]: {action}")
        total = a.sum(-1, keepdims=True)
        zero = total <= 0.0
        q = np.where(zero, 1.0 / self.vocab_size, a / np.where(zero, 1.0, total))
        q = np.maximum(q, PROB_FLOOR)
        return q / q.sum(-1, keepdims=True)

    def _raw_distribution(self, action: Any, q: np.ndarray) -> np.ndarray:
        """The squared reward's prediction: the distribution action as given (validated by
        :meth:`_probabilities`), or ``q`` for logits actions."""
        if self.action_mode == "logits":
            return q
        return np.asarray(action, dtype=np.float64)

    def _point_law(self, tokens: np.ndarray) -> np.ndarray:
        """One-hot (N, V) float64 rows of point masses (N,) token ids."""
        law = np.zeros((tokens.shape[0], self.vocab_size))
        law[np.arange(tokens.shape[0]), tokens] = 1.0
        return law

    def _check_tokens(
        self, action: Any, shape: tuple[int, ...], n: int | None = None, kind: str = "token"
    ) -> np.ndarray:
        n = self.vocab_size if n is None else n
        a = np.asarray(action)
        ok = a.dtype.kind in "iub" and a.shape == shape
        if ok and a.dtype == np.int64:  # one pass: negatives are huge as uint64
            ok = a.view(np.uint64).max() < n
        elif ok:
            ok = a.min() >= 0 and a.max() < n
        if not ok:
            raise ValueError(f"{kind} action {action!r} is outside Discrete({n})^{shape}")
        return a.astype(np.int64) if a.dtype.kind == "b" else a

    def oracle_hits(self, target: np.ndarray, oracle: np.ndarray) -> np.ndarray:
        """1.0 where the oracle's most likely token (first on ties) is the target."""
        best = oracle if is_point(oracle) else first_argmax(oracle)
        return (best == target).astype(np.float64)

    def _labels(
        self, target: np.ndarray, oracle: np.ndarray, best: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Labels (N,) and the oracle's predictions (N,) in label units: the real value
        (regression; the oracle predicts its expected value), the class id, or the token;
        ``best`` the oracle's most likely tokens when already computed."""
        point = is_point(oracle)
        if self.values is not None:
            return self.values[target], self.values[oracle] if point else oracle @ self.values
        if best is None:
            best = oracle if point else first_argmax(oracle)
        if self.class_of is not None:
            return self.class_of[target], self.class_of[best]
        return target.astype(np.int64), best.astype(np.int64)

    def episode_columns(
        self,
        columns: dict[str, Any],
        target: np.ndarray,
        oracle: np.ndarray,
        best: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Per-episode info columns: the task's ``episode_info`` columns plus ``label`` and
        ``oracle_pred``; ``target`` (N,) is the last token x_T of each row and ``oracle`` the
        oracle's law of it ((N, V), or (N,) point masses; ``best`` its most likely tokens
        when already computed)."""
        out = dict(columns)
        out["label"], out["oracle_pred"] = self._labels(target, oracle, best)
        return out

    def _score(
        self,
        action: Any,
        target: np.ndarray,
        true: np.ndarray,
        oracle: np.ndarray,
        hits: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rewards (N,) and per-step info for actions on N envs at one position; ``true`` and
        ``oracle`` are (N, V) laws or (N,) point masses (token ids); ``hits`` the oracle's
        hits (:meth:`oracle_hits`) when already computed."""
        if self.action_mode in ("token", "class"):
            if self.action_mode == "token":
                a = self._check_tokens(action, target.shape)
            else:
                a = self._check_tokens(action, target.shape, len(self.class_tokens), "class")
                a = self.class_tokens[a]
            reward = (a == target).astype(np.float64)
            hits = self.oracle_hits(target, oracle) if hits is None else hits
            return reward, {"regret": hits - reward}
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
            expected = self.values[oracle] if is_point(oracle) else oracle @ self.values
            oracle_reward = -((expected - y) ** 2)
            return reward, {"regret": oracle_reward - reward, "label": y}
        rows = np.arange(target.shape[0])
        q = self._probabilities(action, target.shape)
        with np.errstate(divide="ignore"):
            if self.reward_mode == "squared":
                # -||e_y - f||^2 of the raw distribution action f (E over y is minimised at
                # the true law, normalised or not), of softmax(logit_scale a) for logits.
                f = self._raw_distribution(action, q)
                reward = 2.0 * f[rows, target] - 1.0 - (f * f).sum(-1)
                o = self._point_law(oracle) if is_point(oracle) else oracle.astype(np.float64)
                oracle_reward = 2.0 * o[rows, target] - 1.0 - (o * o).sum(-1)
            else:
                reward = np.log(q[rows, target])
                if is_point(oracle):
                    oracle_reward = np.where(oracle == target, 0.0, -np.inf)
                else:
                    oracle_reward = np.log(oracle[rows, target])
            if is_point(true):
                kl = -np.log(q[rows, true])
            else:
                tiny = np.finfo(true.dtype).tiny  # 0 log 0 = 0 (1e-300 underflows in float32)
                kl = (true * (np.log(np.maximum(true, tiny)) - np.log(q))).sum(-1)
        return reward, {"regret": oracle_reward - reward, "kl": kl}


# -------------------------------------------------------------------------- single env
class ICLEnv(_Spaces, gym.Env):
    """One in-context sequence per episode; see the module docstring for the spaces."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": list(RENDER_MODES), "render_fps": 4}

    def __init__(
        self,
        env_id: str | None = None,
        *,
        task: Task | None = None,
        observation: str = "context",
        window: int | None = None,
        action: str = "token",
        logit_scale: float = 5.0,
        split: str = "train",
        render_mode: str | None = None,
        reward: str | None = None,
        **spec_kwargs: Any,
    ) -> None:
        self._setup(
            build_task(env_id, task, spec_kwargs, ICLEnv),
            observation,
            window,
            action,
            logit_scale,
            split,
            render_mode,
            reward,
        )
        self.observation_space = self.single_obs_space
        self.action_space = self.single_act_space
        self.render_mode = render_mode
        self._stream: EpisodeStream | None = None
        self._row = 0
        self._rows = 0
        self._t: int | None = None
        self._last: tuple[Any, float] | None = None

    def _load_block(self, batch: Batch) -> None:
        """Score a block of sequences once: its tokens, the online laws at every scored
        position, the oracle's hits, the initial observation buffers and the per-episode
        info. Per-episode scalars are kept as flat lists, one per position or info column
        (Python ints and floats; few long-lived containers keep the garbage collector cheap),
        dense laws and buffers as arrays."""
        first, last = self.first, self.seq_len
        seqs = torch.cat([batch.tokens, batch.targets[:, -1:]], 1).cpu().numpy()
        targets = batch.targets.cpu().numpy()
        online = self.task.online(batch)
        handed: set[int] = set()
        laws = [unshared_laws(*online(t), handed) for t in range(first, last)]
        self._keys = law_keys(*laws[0])
        # the step loop reads positions >= first only (targets and token observations) as
        # Python ints; render reads the rows of the array
        self._block_seqs = seqs
        self._block_tokens = [[]] * first + [seqs[:, j].tolist() for j in range(first, last + 1)]
        # what step t scores: targets[:, t], the next token x_{t+1} except where a task's
        # next input is not the target (a multi-concept query's placeholder): revealed, the
        # next token; scored, the target
        self._block_targets = [
            self._block_tokens[t + 1]
            if np.array_equal(targets[:, t], seqs[:, t + 1])
            else targets[:, t].tolist()
            for t in range(first, last)
        ]
        # per scored step k: a list of token ids (point masses) or a (B, V) array of laws
        self._block_true, self._block_oracle = (
            [law[j].tolist() if is_point(law[j]) else law[j] for law in laws] for j in (0, 1)
        )
        self._block_hits = [
            self.oracle_hits(targets[:, t], law[1]).tolist()
            for t, law in zip(range(first, last), laws, strict=True)
        ]
        self._block_obs = self.initial_buffer(seqs[:, :-1], seqs[:, -1])
        self._block_features = None if batch.features is None else batch.features.cpu().numpy()
        self._block_fobs = self.initial_features(self._block_features)
        self._block_episodes = None
        if self.episode_fn is not None:
            columns = self.episode_columns(self.episode_fn(batch), seqs[:, -1], laws[-1][1])
            self._block_episodes = episode_rows(columns)
        self._row, self._rows = 0, batch.batch_size

    def _observation(self) -> Any:
        t = self._t
        if self._block_fobs is not None:
            return self.compose(self._token_observation(t), self._feature_observation(t))
        return self._token_observation(t)

    def _token_observation(self, t: int) -> Any:
        if self.obs_mode == "token":
            return self._block_tokens[t][self._i]
        if self.obs_mode == "window":
            return self._obs_buffer[t : t + self.window].copy()
        if self.obs_mode == "features":
            return None
        return self._obs_buffer.copy()

    def _feature_observation(self, t: int) -> np.ndarray:
        if self.obs_mode == "token":  # the features of position t (the last one at the end)
            return self._block_features[self._i, min(t, self.seq_len - 1)].copy()
        if self.obs_mode == "window":  # positions t - W + 1 .. t (the last at the end)
            t = min(t, self.seq_len - 1)
            return self._fobs_buffer[t : t + self.window].copy()
        return self._fobs_buffer.copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        split = None if options is None else reset_split(options, self.base_task)
        super().reset(seed=seed)
        if seed is not None or self._stream is None or split not in (None, self.split):
            if split not in (None, self.split):
                self._switch_split(split)
            self._stream = EpisodeStream(
                self.task,
                self.stream_split,
                self.np_random,
                block_sequences(self.task, 1, SINGLE_MIN_STEPS),
            )
            self._row = self._rows = 0
        if self._row == self._rows:
            self._load_block(self._stream.next_block())
        self._i = i = self._row
        self._row = i + 1
        if self._block_obs is not None:  # each row serves one episode: steps write into it
            self._obs_buffer = self._block_obs[i]
        if self._block_fobs is not None:
            self._fobs_buffer = self._block_fobs[i]
        self._t = self.first
        self._last = None
        if self.render_mode is not None:
            self._regrets = [np.nan] * self.seq_len
        return self._observation(), {"t": self.first, "split": self.split}

    def step(self, action: Any):
        t = self._t
        if t is None:
            raise RuntimeError("step() called before reset()")
        if t >= self.seq_len:
            raise RuntimeError("step() called after the episode ended; call reset() first")
        k = t - self.first
        target = self._block_targets[k][self._i]
        true, oracle = self._block_true[k][self._i], self._block_oracle[k][self._i]
        key_true, key_oracle = self._keys
        info = {"t": t, key_true: true, key_oracle: oracle, "split": self.split}
        if self.action_mode == "token":  # scalar fast path: this is the per-step hot loop
            reward = 1.0 if self._token(action) == target else 0.0
            info["regret"] = self._block_hits[k][self._i] - reward
        else:
            a = np.asarray(action)
            if a.shape != self.action_space.shape:  # checked here: the scoring is batched
                raise ValueError(
                    f"action shape {a.shape} is not {self.action_space.shape}, the shape of "
                    f"the action space {self.action_space}"
                )
            rewards, extra = self._score(
                a[None], np.array([target]), np.array([true]), np.array([oracle])
            )
            reward = float(rewards[0])
            info.update((key, float(value[0])) for key, value in extra.items())
        self._t = t + 1
        if self.obs_mode == "context":  # reveal the next input token (the label at the end)
            self._obs_buffer[t + 1] = self._block_tokens[t + 1][self._i]
        reveal = self.obs_mode in ("context", "features") and t + 1 < self.seq_len
        if self._block_fobs is not None and reveal:  # reveal position t + 1's features
            self._fobs_buffer[t + 1] = self._block_features[self._i, t + 1]
        self._last = (action, reward)
        if self.render_mode is not None:
            self._regrets[t] = info["regret"]
        terminated = self._t == self.seq_len
        if terminated and self._block_episodes is not None:  # the label step of a template
            info.update(self._block_episodes[self._i])
        return self._observation(), reward, terminated, False, info

    def _token(self, action: Any) -> int:
        """A validated token id from an int, a numpy integer or a one-element int array."""
        if isinstance(action, (int, np.integer)):
            a = int(action)
        else:
            arr = np.asarray(action)
            if arr.size != 1 or arr.dtype.kind not in "iu":
                raise ValueError(f"token action {action!r} is outside Discrete({self.vocab_size})")
            a = int(arr.reshape(()))
        if not 0 <= a < self.vocab_size:
            raise ValueError(f"token action {action!r} is outside Discrete({self.vocab_size})")
        return a

    def render(self) -> str | np.ndarray | None:
        if self.render_mode is None or self._t is None:
            return None
        lo = max(0, self._t + 1 - FRAME_CELLS)
        tokens = self._block_seqs[self._i, : self._t + 1].tolist()
        if self.render_mode == "rgb_array":
            regrets = [np.nan, *self._regrets][lo : self._t + 1]
            return _frame(tokens[lo:], regrets)
        shown = " ".join(str(x) for x in tokens[max(0, self._t - 15) :])
        line = f"t={self._t:4d} | ... {shown}"
        if self._last is not None:
            action, reward = np.round(np.asarray(self._last[0]), 3), self._last[1]
            line += f" | last action {action} reward {reward:+.3f}"
        return line + "\n"


# -------------------------------------------------------------------------- vector env
class ICLVectorEnv(_Spaces, VectorEnv):
    """Native batched env: ``num_envs`` sequences stepped in lockstep with no per-env loop.

    Every episode of a task has the same length, so all sub-envs reset together; autoreset is
    next-step (the step after the last one returns the new first observation, reward 0 and
    both flags false). Data come from batched sampler calls (:func:`block_sequences`), so the
    stream of a sub-env is not that of ``gym.make`` seeded ``seed + i``; with ``num_envs=1``
    it is exactly ``gym.make``'s stream for the same seed.
    """

    metadata: ClassVar[dict[str, Any]] = {
        "render_modes": list(RENDER_MODES),
        "render_fps": 4,
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }

    def __init__(
        self,
        num_envs: int = 1,
        env_id: str | None = None,
        *,
        task: Task | None = None,
        observation: str = "context",
        window: int | None = None,
        action: str = "token",
        logit_scale: float = 5.0,
        split: str = "train",
        render_mode: str | None = None,
        max_episode_steps: int | None = None,
        reward: str | None = None,
        **spec_kwargs: Any,
    ) -> None:
        num_envs = as_int("num_envs", num_envs, 1)
        if max_episode_steps is not None:
            max_episode_steps = as_int("max_episode_steps", max_episode_steps, 1)
        self._setup(
            build_task(env_id, task, spec_kwargs, ICLVectorEnv),
            observation,
            window,
            action,
            logit_scale,
            split,
            render_mode,
            reward,
        )
        min_steps = SINGLE_MIN_STEPS if num_envs == 1 else VECTOR_MIN_STEPS  # gym.make's stream
        self.block = block_sequences(self.task, num_envs, min_steps)
        per_round = num_envs * (self.seq_len + 1) * (16 + (self.window or 1))
        per_block = self.block * (self.seq_len + 1) * 24
        per_block += self.block * self.seq_len * self.feature_dim * 8  # features and their buffer
        # the block being stepped and the LOOKAHEAD being prepared
        nbytes = (LOOKAHEAD + 1) * per_block + per_round + num_envs * self.vocab_size * 8
        check_memory(
            "num_envs",
            num_envs,
            nbytes,
            f"a round of {num_envs} episodes (tokens, observations and one step's float32 "
            f"laws over {self.vocab_size} tokens; at least {format_bytes(nbytes)})",
        )
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.max_episode_steps = max_episode_steps
        self.single_observation_space = self.single_obs_space
        self.single_action_space = self.single_act_space
        self.observation_space = batch_space(self.single_obs_space, num_envs)
        self.action_space = batch_space(self.single_act_space, num_envs)
        self._rounds: RoundQueue | None = None
        self._round: Round | None = None
        self._t: int | None = None
        self._autoreset = False

    def _make_block(self, batch: Batch) -> Block:
        return Block(self, batch, self.num_envs)

    def _start_round(self) -> tuple[Any, dict[str, Any]]:
        self._round = self._rounds.next()
        self._obs_buffer = self._round.obs  # the round owns its rows of the block's buffer
        self._fobs_buffer = self._round.feature_obs
        self._t = self.first
        self._autoreset = False
        if self.render_mode is not None:
            self._regrets = np.full((self.num_envs, self.seq_len), np.nan)
        info = {"t": np.full(self.num_envs, self.first, dtype=np.int64), "split": self._split_info}
        return self._observation(), info

    def _observation(self) -> Any:
        t = self._t
        if self._fobs_buffer is None:
            return self._token_observation(t)
        if self.obs_mode == "token":
            features = self._round.features[:, min(t, self.seq_len - 1)]
        elif self.obs_mode == "window":  # positions t - W + 1 .. t (the last at the end)
            t_last = min(t, self.seq_len - 1)
            features = self._fobs_buffer[:, t_last : t_last + self.window]
        else:
            features = self._fobs_buffer
        tokens = None if self.obs_mode == "features" else self._token_observation(t)
        return self.compose(tokens, fresh_copy(features))

    def _token_observation(self, t: int) -> np.ndarray:
        if self.obs_mode == "token":
            return self._round.token(t)
        view = self._obs_buffer[:, t : t + self.window] if self.obs_mode == "window" else None
        return fresh_copy(self._obs_buffer if view is None else view)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(
                "this vector env is closed (close() stopped its block workers): make a new one"
            )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._check_open()
        split = reset_split(options, self.base_task)
        super().reset(seed=seed)
        if seed is not None or self._rounds is None or split not in (None, self.split):
            if split not in (None, self.split):
                self._switch_split(split)
            # info["split"]: a read-only broadcast view, made once per stream and shared by
            # the infos (a fresh array per step cost ~4 us at 4096 envs)
            self._split_info = np.broadcast_to(np.array(self.split), (self.num_envs,))
            if self._rounds is not None:
                self._rounds.close()
            stream = EpisodeStream(self.task, self.stream_split, self.np_random, self.block)
            self._rounds = RoundQueue(stream, self._make_block)
        return self._start_round()

    def step(self, actions: Any):
        self._check_open()
        if self._t is None:
            raise RuntimeError("step() called before reset()")
        if self._autoreset:
            obs, info = self._start_round()
            flags = np.zeros(self.num_envs, dtype=np.bool_)
            return obs, np.zeros(self.num_envs), flags, flags.copy(), info
        t = self._t
        target = self._round.targets[t - self.first]
        true, oracle = self._round.laws(t)
        reward, extra = self._score(actions, target, true, oracle, self._round.hits)
        self._t = t + 1
        if self.obs_mode == "context":
            self._obs_buffer[:, t + 1] = self._round.reveals[t - self.first]
        reveal = self.obs_mode in ("context", "features") and t + 1 < self.seq_len
        if self._fobs_buffer is not None and reveal:  # reveal position t + 1's features
            self._fobs_buffer[:, t + 1] = self._round.features[:, t + 1]
        if self.render_mode is not None:
            self._regrets[:, t] = extra["regret"]
        terminated = self._t == self.seq_len
        truncated = (  # as Gymnasium's TimeLimit (gym.make): set at the limit, ended or not
            self.max_episode_steps is not None and self._t - self.first >= self.max_episode_steps
        )
        self._autoreset = terminated or truncated
        key_true, key_oracle = law_keys(true, oracle)
        info = {
            "t": np.full(self.num_envs, t),
            key_true: true,
            key_oracle: oracle,
            "split": self._split_info,
            **extra,
        }
        episode = self._round.episode
        if terminated and episode is not None:  # the label step of a template task
            info.update(
                episode if "label" in episode else self.episode_columns(episode, target, oracle)
            )
        return (
            self._observation(),
            reward,
            np.full(self.num_envs, terminated),
            np.full(self.num_envs, truncated),
            info,
        )

    def close_extras(self, **kwargs: Any) -> None:
        """Stop the worker threads that prepare rounds."""
        if self._rounds is not None:
            self._rounds.close()

    def render(self) -> tuple[str, ...] | tuple[np.ndarray, ...] | None:
        if self.render_mode is None or self._t is None:
            return None
        seqs = np.concatenate([self._round.tokens, self._round.last[:, None]], 1)
        if self.render_mode == "rgb_array":
            lo = max(0, self._t + 1 - FRAME_CELLS)
            return tuple(
                _frame(
                    seqs[i, lo : self._t + 1].tolist(),
                    [np.nan, *self._regrets[i].tolist()][lo : self._t + 1],
                )
                for i in range(self.num_envs)
            )
        lo = max(0, self._t - 15)
        return tuple(
            f"t={self._t:4d} | ... {' '.join(map(str, seqs[i, lo : self._t + 1]))}\n"
            for i in range(self.num_envs)
        )
