"""Ceilings of the one-step-episode envs against CartPole's native vector env, in one run.

A step of ``ICL-SparseContextualBigram-v0``, ``ICL-PriorityGraph-v0`` or ``ICL-MultiConcept-v0``
is a whole episode: a fresh context drawn from the task's law. However fast the env's own
code, a step cannot cost less than drawing that context's random numbers the way the spec
draws them, nor than writing its observation to memory. This script measures both rates on
this machine, divides by what one episode needs at the env's default spec, multiplies by the
threads that draw in parallel (the vector env's :data:`iclgym.envs.WORKERS` block workers, each
block from its own generator, at most the machine's cores), and prints the ceiling next to
CartPole's native vector env (``gym.make_vec("CartPole-v1",
vectorization_mode="vector_entry_point")``), measured in the same run, and next to the env's
measured rate. A ceiling below CartPole's rate means the target "every env at least as fast
as CartPole" (issues 8, 10, 11, 12; 2x in issue 15) cannot be met on this machine with the
spec's sampling; the env is then judged against its ceiling.

Random numbers per episode at the defaults (each from the task's spec and sampler):

- sparse contextual bigram (N = 8, T = 128; the task's sampler draws the T + 1 tokens, the
  source position and the target as ``torch.multinomial`` does, one uniform each): T + 3 =
  131 uniforms;
- priority graph, planted (K = 8, T = 6; a uniform token per context position): T + 1 = 7
  random 64-bit words (the context and the label's uniform);
- multi-concept (L = 16, d = 64, d_y = 32): (L + 1) d + L d_y = 1,600 Gaussians (the noise
  of every word and label token), besides the concept, support and sign draws.

Rates: torch's ``uniform_`` (float32), ``random_`` (int64) and ``normal_`` (float32) on 16 M
entries, and the write bandwidth ``Tensor.copy_`` reaches on a 256 MB buffer, each at one torch
thread (the library's default), best of 3. The ceilings are generous: the stepping thread
shares the cores with the workers.

Usage (about a minute on a 2-core CPU; run it on a quiet machine):

    PYTHONPATH=. python docs/scripts/env_bounds.py [--seconds 2] [--num-envs 4096]
"""

from __future__ import annotations

import argparse
import math
import os

import gymnasium as gym
import numpy as np
import torch

import iclgym  # noqa: F401  (registers the ids)
from iclgym.envs import WORKERS
from iclgym.speed import _best_rate, load_average, vector_steps_per_second

ENTRIES = 1 << 24
"""Entries per random-number timing (64 MB of float32)."""
COPY_BYTES = 1 << 28
"""Bytes of the write-bandwidth timing (larger than any cache)."""


def machine_rates() -> dict[str, float]:
    """Random numbers per second of each kind, and bytes per second written by a copy."""
    f32 = torch.empty(ENTRIES)
    i64 = torch.empty(ENTRIES, dtype=torch.int64)
    src = torch.ones(COPY_BYTES, dtype=torch.uint8)
    dst = torch.zeros_like(src)  # touched: no page faults in the timing
    return {  # best of 3 (after a warm-up call), as iclgym speed measures
        "uniform": _best_rate(f32.uniform_, ENTRIES, 3, math.inf),
        "word": _best_rate(i64.random_, ENTRIES, 3, math.inf),
        "gaussian": _best_rate(f32.normal_, ENTRIES, 3, math.inf),
        "bytes": _best_rate(lambda: dst.copy_(src), COPY_BYTES, 3, math.inf),
    }


def observation_bytes(space: gym.Space) -> int:
    """Bytes of one observation of ``space`` (Box, MultiDiscrete, Discrete or a Dict of them)."""
    if isinstance(space, gym.spaces.Dict):
        return sum(observation_bytes(s) for s in space.spaces.values())
    shape = space.shape or (1,)
    return int(np.prod(shape)) * np.dtype(space.dtype).itemsize


def episode_draws(env_id: str, spec) -> tuple[str, int]:
    """(kind, count) of the random numbers one episode of ``spec`` needs (module docstring)."""
    if env_id.startswith("ICL-SparseContextualBigram"):
        return "uniform", spec.seq_len + 3
    if env_id.startswith("ICL-PriorityGraph"):
        return "word", spec.context_len + 1
    if env_id.startswith("ICL-MultiConcept"):
        return "gaussian", (spec.num_demos + 1) * spec.d + spec.num_demos * spec.d_y
    raise ValueError(f"no episode count for {env_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--num-envs", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    before = load_average()
    rates = machine_rates()
    print(
        f"torch {torch.__version__}, 1 thread: uniform_ {rates['uniform'] / 1e6:.0f} M/s, "
        f"random_ int64 {rates['word'] / 1e6:.0f} M/s, normal_ {rates['gaussian'] / 1e6:.0f} M/s, "
        f"copy {rates['bytes'] / 1e9:.1f} GB/s"
    )
    ids = ("ICL-SparseContextualBigram-v0", "ICL-PriorityGraph-v0", "ICL-MultiConcept-v0")

    def vector_rate(env_id: str, **kwargs) -> float:
        env = gym.make_vec(env_id, num_envs=args.num_envs, **kwargs)
        try:
            return vector_steps_per_second(env, args.seconds)
        finally:
            env.close()

    threads = min(WORKERS, os.cpu_count() or 1)
    print(f"draws in parallel on {threads} threads (the vector env's block workers)")
    cart = vector_rate("CartPole-v1", vectorization_mode="vector_entry_point")
    print(f"CartPole-v1 vector x{args.num_envs}: {cart / 1e6:.2f} M steps/s\n")
    header = (
        "| env | draws per episode | random-number ceiling | observation bytes | "
        "write ceiling | env measured | ceiling / CartPole |"
    )
    print(header)
    print("|" + "---|" * 7)
    for env_id in ids:
        env = gym.make(env_id)
        spec = env.unwrapped.task.spec
        kind, count = episode_draws(env_id, spec)
        nbytes = observation_bytes(env.observation_space)
        env.close()
        draw_cap = threads * rates[kind] / count
        write_cap = rates["bytes"] / nbytes
        measured = vector_rate(env_id)
        cap = min(draw_cap, write_cap)
        print(
            f"| {env_id} | {count} {kind}s | {draw_cap / 1e6:.3g} M/s | {nbytes} | "
            f"{write_cap / 1e6:.3g} M/s | {measured / 1e6:.3g} M/s | {cap / cart:.3g}x |"
        )
    print(f"\nload average before {before}, after {load_average()}")


if __name__ == "__main__":
    main()
