"""Throughput benchmark behind ``iclgym speed``: sampler, oracle and envs, with targets.

Throughputs are the best of several runs (env benchmarks interleaved with CartPole's), the
usual way to read throughput on a shared machine. Targets (issue 2, on the project's 2-core
CPU): the sampler at k=3, T=256, B=4096 with stationary init >= 40 M tokens/s (the public
reference generator makes ~6.6 M); the oracle on the same batch >= 20 M tokens/s; single-env
``step`` through ``gym.make`` at least CartPole-v1's, and the native vector env at 4096 envs at
least CartPole's native vector env, measured side by side in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import torch
from gymnasium.utils.performance import benchmark_step
from tqdm.auto import tqdm

from iclgym.tasks.markov import MarkovChainTask

SAMPLER_TARGET = 40e6  # tokens/s, issue 2
ORACLE_TARGET = 20e6  # tokens/s, issue 2


@dataclass(frozen=True)
class Row:
    name: str
    value: float
    unit: str
    target: float | None
    target_text: str

    @property
    def ok(self) -> bool | None:
        return None if self.target is None else self.value >= self.target


def _best_rate(fn: Callable[[], object], items: int, repeats: int) -> float:
    """items per second of the fastest of ``repeats`` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def vector_steps_per_second(env: gym.vector.VectorEnv, seconds: float) -> float:
    """Steps per second of a vector env under next-step autoreset (reset steps not counted)."""
    import numpy as np

    env.action_space.seed(0)
    env.reset(seed=0)
    previous_done = np.zeros(env.num_envs, dtype=bool)
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps += env.num_envs - int(previous_done.sum())
        previous_done = terminated | truncated
    return steps / elapsed


def _best_pair(measure_a: Callable[[], float], measure_b: Callable[[], float], repeats: int):
    """Best of ``repeats`` interleaved measurements of two benchmarks (a, b, a, b, ...), so
    both see the same machine; the best run is the one least disturbed by other processes."""
    a = b = 0.0
    for _ in range(repeats):
        a, b = max(a, measure_a()), max(b, measure_b())
    return a, b


def run(
    seconds: float = 2.0, repeats: int = 3, num_envs: int = 4096, progress: bool = True
) -> list[Row]:
    """Measure every row of the table; each env run lasts ``seconds``, best of ``repeats``."""
    import iclgym  # noqa: F401  (registers the ids)

    rows: list[Row] = []
    bar = tqdm(total=4, desc="iclgym speed", disable=not progress)
    task = MarkovChainTask(num_states=3, seq_len=256, init="stationary")
    gen = task.generator(0)
    batch = task.sample(4096, generator=gen)
    rate = _best_rate(lambda: task.sample(4096, generator=gen), 4096 * 256, 10 * repeats)
    rows.append(Row("sampler k=3 T=256 B=4096 (tokens)", rate, "tok/s", SAMPLER_TARGET, ">= 40M"))
    small = MarkovChainTask(num_states=3, seq_len=100)
    rate = _best_rate(lambda: small.sample(64, generator=gen), 64 * 100, 50 * repeats)
    rows.append(Row("sampler k=3 T=100 B=64 (tokens)", rate, "tok/s", None, "ref 0.8M"))
    rate = _best_rate(lambda: task.sample(4096, generator=gen).true_probs, 4096 * 256, 10)
    rows.append(Row("sampler + true_probs T=256 B=4096", rate, "tok/s", None, "info"))
    bar.update(1)
    rate = _best_rate(lambda: task.oracle(batch), 4096 * 256, 10 * repeats)
    rows.append(Row("oracle k=3 T=256 B=4096", rate, "tok/s", ORACLE_TARGET, ">= 20M"))
    bar.update(1)

    cart, ours = _best_pair(
        lambda: benchmark_step(gym.make("CartPole-v1"), target_duration=seconds, seed=0),
        lambda: benchmark_step(gym.make("ICL-MarkovChain-v0"), target_duration=seconds, seed=0),
        repeats,
    )
    rows.append(Row("CartPole-v1 gym.make step", cart, "steps/s", None, "baseline"))
    rows.append(Row("ICL-MarkovChain-v0 gym.make step", ours, "steps/s", cart, ">= CartPole"))
    bar.update(1)

    def vector(env_id: str, **kwargs: object) -> float:
        env = gym.make_vec(env_id, num_envs=num_envs, **kwargs)
        try:
            return vector_steps_per_second(env, seconds)
        finally:
            env.close()

    cart, ours = _best_pair(
        lambda: vector("CartPole-v1", vectorization_mode="vector_entry_point"),
        lambda: vector("ICL-MarkovChain-v0"),
        repeats,
    )
    rows.append(Row(f"CartPole-v1 native vector x{num_envs}", cart, "steps/s", None, "baseline"))
    rows.append(Row(f"ICL-MarkovChain-v0 vector x{num_envs}", ours, "steps/s", cart, ">= CartPole"))
    bar.update(1)
    bar.close()
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'benchmark':44s} {'value':>16s}  {'target':12s} ok", "-" * 78]
    for r in rows:
        mark = {True: "yes", False: "NO", None: ""}[r.ok]
        scale, prefix = (1e6, "M") if r.value >= 1e6 else (1e3, "k")
        value = f"{r.value / scale:.2f} {prefix}{r.unit}"
        lines.append(f"{r.name:44s} {value:>16s}  {r.target_text:12s} {mark}")
    lines.append(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, gymnasium {gym.__version__}"
    )
    return "\n".join(lines)
