"""Throughput benchmark behind ``iclgym speed``: sampler, oracle and every env, with targets.

Throughputs are the best of several runs (env benchmarks interleaved round-robin with
CartPole's), the usual way to read throughput on a shared machine. Targets (issue 2, on the
project's 2-core CPU): the sampler at k=3, T=256, B=4096 with stationary init >= 40 M
tokens/s (the public reference generator makes ~6.6 M); the closed-form oracle (the add-alpha
posterior, exact Bayes under ``init="uniform"``) on such a batch >= 20 M tokens/s. The exact
oracle under the stationary start is a Monte-Carlo estimate (``docs/oracles.md``): an info row
with no target (issue 8 made the oracle exact; the issue-2 target was set for add-alpha).
Issue 8 section 5: every registered id, single env ``step`` through ``gym.make`` at least
CartPole-v1's, and its native vector env at ``num_envs`` envs at least CartPole's native vector
env, measured in the same run (one row each). Sampler and oracle rows are measured at 1 and 2 torch
threads side by side (:data:`BATCH_THREADS`), the env rows at 1 (:data:`ENV_THREADS`), and the
previous thread count is restored. Info rows without targets (issues 10 and 11): the
sparse-contextual-bigram sampler at T=128, B=4096 (tokens/s, counting the T + 1 = 129 input
tokens of a sequence), the token-priority-graph planted sampler and its closed-form Oracle C
(``bayes_probs``, the label's law) at the registry default K=8, T=6, B=4096 (sequences/s: one
scored label per sequence). A row whose target is not met prints ``NO``; a budget too short to
measure throughput (``seconds`` < 0.1) is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils.performance import benchmark_step
from tqdm.auto import tqdm

from iclgym.tasks.markov import MarkovChainTask
from iclgym.tasks.multi_concept import MultiConceptTask
from iclgym.tasks.priority_graph import PriorityGraphTask
from iclgym.tasks.sparse_bigram import SparseContextualBigramTask
from iclgym.validation import as_float, as_int, invalid

SAMPLER_TARGET = 40e6  # tokens/s, issue 2
ORACLE_TARGET = 20e6  # tokens/s, issue 2
BATCH_THREADS = (1, 2)
"""Torch threads of the sampler and oracle rows, side by side: large batches gain from the
second core when it is idle (the closed-form oracle 10.8 M vs 21.2 M tok/s on a quiet 2-core
machine), and lose to OpenMP barrier stalls when it is not."""
ENV_THREADS = 1
"""Torch threads of the env rows (every iclgym command's default): the envs step in Python on
one core while a worker thread prepares blocks on the other; a second OpenMP thread spin-waits
on the stepping core (CartPole-v1, which runs no torch, stepped at 78 k vs 120 k steps/s next to
2-thread iclgym envs)."""
MIN_SECONDS = 0.1
"""Shortest env benchmark run (seconds): shorter runs measure start-up and timer noise."""
BASELINE = "CartPole-v1"


@dataclass(frozen=True)
class Row:
    name: str
    value: float
    unit: str
    target: float | None
    target_text: str

    @property
    def ok(self) -> bool | None:
        """None without a target; else whether a positive throughput reached it (a row that
        measured nothing fails)."""
        return None if self.target is None else bool(self.value > 0 and self.value >= self.target)


def _best_rate(fn: Callable[[], object], items: int, repeats: int, budget: float) -> float:
    """items per second of the fastest of up to ``repeats`` calls (after one warm-up call),
    stopping once ``budget`` seconds are spent (at least one timed call: a slow estimator is
    measured once, not ``repeats`` times)."""
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent >= budget:
            break
    return items / best


def vector_steps_per_second(env: gym.vector.VectorEnv, seconds: float) -> float:
    """Steps per second of a vector env under next-step autoreset (reset steps not counted)."""
    env.action_space.seed(0)
    env.reset(seed=0)
    previous_done = np.zeros(env.num_envs, dtype=bool)
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps += env.num_envs - int(previous_done.sum())
        previous_done = terminated | truncated
    return steps / elapsed


def _best_round_robin(measures: dict[str, Callable[[], float]], repeats: int, bar) -> dict:
    """Best of ``repeats`` runs of each benchmark, run round-robin (a, b, c, a, b, c, ...) so
    that all see the same machine; the best run is the one least disturbed by others."""
    best = dict.fromkeys(measures, 0.0)
    for _ in range(repeats):
        for name, measure in measures.items():
            best[name] = max(best[name], measure())
            bar.update(1)
    return best


def run(
    seconds: float = 2.0,
    repeats: int = 3,
    num_envs: int = 4096,
    progress: bool = True,
    env_ids: Sequence[str] | None = None,
) -> list[Row]:
    """Measure every row of the table; each env run lasts ``seconds``, best of ``repeats``.

    ``env_ids`` defaults to every registered id (:func:`iclgym.list_envs`). Raises
    ``ValueError`` for ``seconds`` < :data:`MIN_SECONDS` (or not finite), ``repeats`` < 1,
    ``num_envs`` < 1 and unknown ids, before measuring anything.
    """
    import iclgym

    seconds = as_float("seconds", seconds, MIN_SECONDS)
    repeats = as_int("repeats", repeats, 1)
    num_envs = as_int("num_envs", num_envs, 1)
    ids = list(iclgym.list_envs() if env_ids is None else env_ids)
    for env_id in ids:
        if env_id not in iclgym.list_envs():
            raise invalid("env_ids", env_id, f"registered iclgym ids {iclgym.list_envs()}")

    rows: list[Row] = []
    total = 3 * len(BATCH_THREADS) + 2 * repeats * (1 + len(ids))
    bar = tqdm(total=total, desc="iclgym speed", disable=not progress)
    before = torch.get_num_threads()
    try:
        for threads in BATCH_THREADS:
            torch.set_num_threads(threads)
            rows.extend(_batch_rows(seconds * repeats, repeats, f" [{threads} thr]", bar))
        torch.set_num_threads(ENV_THREADS)
        rows.extend(_env_rows(ids, seconds, repeats, num_envs, bar))
    finally:
        torch.set_num_threads(before)
        bar.close()
    return rows


def _batch_rows(budget: float, repeats: int, suffix: str, bar) -> list[Row]:
    """The sampler and oracle rows at the current torch thread count (names end ``suffix``)."""
    rows = []
    task = MarkovChainTask(num_states=3, seq_len=256, init="stationary")
    gen = task.generator(0)
    batch = task.sample(4096, generator=gen)
    rate = _best_rate(lambda: task.sample(4096, generator=gen), 4096 * 256, 10 * repeats, budget)
    rows.append(Row(f"sampler k=3 T=256 B=4096{suffix}", rate, "tok/s", SAMPLER_TARGET, ">= 40M"))
    small = MarkovChainTask(num_states=3, seq_len=100)
    rate = _best_rate(lambda: small.sample(64, generator=gen), 64 * 100, 50 * repeats, budget)
    rows.append(Row(f"sampler k=3 T=100 B=64{suffix}", rate, "tok/s", None, "ref 0.8M"))
    rate = _best_rate(lambda: task.sample(4096, generator=gen).true_probs, 4096 * 256, 10, budget)
    rows.append(Row(f"sampler + true_probs T=256 B=4096{suffix}", rate, "tok/s", None, "info"))
    bar.update(1)
    closed = MarkovChainTask(num_states=3, seq_len=256, init="uniform")
    uniform_batch = closed.sample(4096, generator=gen)
    rate = _best_rate(lambda: closed.oracle(uniform_batch), 4096 * 256, 10 * repeats, budget)
    name = f"oracle (closed form) k=3 T=256 B=4096{suffix}"
    rows.append(Row(name, rate, "tok/s", ORACLE_TARGET, ">= 20M"))
    rate = _best_rate(lambda: task.oracle(batch), 4096 * 256, 1, budget)
    name = f"oracle (stationary, Monte Carlo) B=4096{suffix}"
    rows.append(Row(name, rate, "tok/s", None, "info"))
    bar.update(1)
    scb = SparseContextualBigramTask(seq_len=128)
    rate = _best_rate(lambda: scb.sample(4096, generator=gen), 4096 * 129, 10 * repeats, budget)
    rows.append(Row(f"SCB sampler B=4096 T=128{suffix}", rate, "tok/s", None, "info"))
    graph = PriorityGraphTask()
    rate = _best_rate(lambda: graph.sample(4096, generator=gen), 4096, 10 * repeats, budget)
    rows.append(Row(f"priority-graph sampler B=4096{suffix}", rate, "seq/s", None, "info"))
    tokens = graph.sample(4096, generator=gen).tokens
    rate = _best_rate(lambda: graph.bayes_probs(tokens), 4096, 10 * repeats, budget)
    rows.append(Row(f"priority-graph Oracle C B=4096{suffix}", rate, "seq/s", None, "info"))
    concepts = MultiConceptTask()  # C0, L = 16
    rate = _best_rate(lambda: concepts.sample(64, generator=gen), 64, 50 * repeats, budget)
    # reference: about 2 ms per 64 prompts (32k prompts/s), one thread
    # (docs/envs/ICL-MultiConcept-v0.md, Speed)
    rows.append(Row(f"multi-concept sampler B=64 L=16{suffix}", rate, "seq/s", None, "ref 32k"))
    rate = _best_rate(lambda: concepts.sample(4096, generator=gen), 4096, 5 * repeats, budget)
    rows.append(Row(f"multi-concept sampler B=4096 L=16{suffix}", rate, "seq/s", None, "info"))
    prompts = concepts.sample(4096, generator=gen)
    rate = _best_rate(lambda: concepts.oracle(prompts), 4096, 5 * repeats, budget)
    rows.append(Row(f"multi-concept exact oracle B=4096{suffix}", rate, "seq/s", None, "info"))
    bar.update(1)
    return rows


def _env_rows(ids: list[str], seconds: float, repeats: int, num_envs: int, bar) -> list[Row]:
    """Every id's single and native vector env against CartPole's, round-robin."""
    rows = []

    def single(env_id: str) -> Callable[[], float]:
        return lambda: benchmark_step(gym.make(env_id), target_duration=seconds, seed=0)

    def vector(env_id: str) -> Callable[[], float]:
        def measure() -> float:
            kwargs = {"vectorization_mode": "vector_entry_point"} if env_id == BASELINE else {}
            env = gym.make_vec(env_id, num_envs=num_envs, **kwargs)
            try:
                return vector_steps_per_second(env, seconds)
            finally:
                env.close()

        return measure

    for measure, label in ((single, "gym.make step"), (vector, f"vector x{num_envs}")):
        best = _best_round_robin({i: measure(i) for i in (BASELINE, *ids)}, repeats, bar)
        cart = best.pop(BASELINE)
        rows.append(Row(f"{BASELINE} {label}", cart, "steps/s", None, "baseline"))
        rows.extend(
            Row(f"{env_id} {label}", value, "steps/s", cart, ">= CartPole")
            for env_id, value in best.items()
        )
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as a text table (``NO`` marks a missed target), with the thread count."""
    width = max(44, *(len(r.name) for r in rows))
    lines = [f"{'benchmark':{width}s} {'value':>16s}  {'target':12s} ok", "-" * (width + 34)]
    for r in rows:
        mark = {True: "yes", False: "NO", None: ""}[r.ok]
        scale, prefix = (1e6, "M") if r.value >= 1e6 else (1e3, "k")
        value = f"{r.value / scale:.2f} {prefix}{r.unit}"
        lines.append(f"{r.name:{width}s} {value:>16s}  {r.target_text:12s} {mark}")
    lines.append(
        f"torch {torch.__version__}, gymnasium {gym.__version__}; [n thr]: torch threads of a "
        f"batch row; env rows at {ENV_THREADS} thread"
    )
    return "\n".join(lines)
