"""Growth curves of the Markov-chain sampler and oracle (``docs/speed.md``), side by side with
the official ICL-MC generator when its checkout is given.

Measures, at one torch thread, tokens/s of ``MarkovChainTask.sample`` over the batch size B,
the length T, the vocabulary k and the order, the closed-form oracle's positions/s over B, the
peak memory per position of both (``iclgym.speed.peak_bytes_per_position``), and the k = 3
sampler and oracle at 1 and 2 torch threads on a quiet machine and next to two busy-looping
processes (a busy 2-core machine). Prints every number and writes
``docs/images/sampler_speed.png``.

Usage (about 5 minutes on a 2-core CPU; the official code lives outside the repository,
fetched from github.com/EzraEdelman/Evolution-of-Statistical-Induction-Heads):

    python docs/scripts/sampler_speed.py [--official /path/to/checkout] [--out docs/images]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from iclgym.speed import _best_rate, official_generator, peak_bytes_per_position
from iclgym.tasks import base
from iclgym.tasks.markov import MarkovChainTask

BUDGET = 2.0  # seconds per measured point (after a warm-up call)


def sampler_rate(k: int, order: int, batch: int, seq_len: int) -> float:
    task = MarkovChainTask(num_states=k, order=order, seq_len=seq_len)
    gen = task.generator(0)
    return _best_rate(lambda: task.sample(batch, generator=gen), batch * seq_len, 5, BUDGET)


def oracle_rate(batch: int, seq_len: int = 256) -> float:
    task = MarkovChainTask(num_states=3, seq_len=seq_len, init="uniform")
    data = task.sample(batch, generator=task.generator(0))
    return _best_rate(lambda: task.oracle(data), batch * seq_len, 5, BUDGET)


def curve(
    name: str, xs: list[int], ours: Callable[[int], float], theirs: Callable[[int], float] | None
) -> dict:
    points = {"x": xs, "iclgym": [], "official": []}
    for x in xs:
        points["iclgym"].append(ours(x))
        points["official"].append(theirs(x) if theirs else float("nan"))
        print(
            f"{name} = {x:6d}: iclgym {points['iclgym'][-1] / 1e6:8.3f} M/s   official "
            f"{points['official'][-1] / 1e6:8.3f} M/s",
            flush=True,
        )
    return points


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def threads_under_load() -> list[tuple[str, str, float, float, float]]:
    """(machine, setting, sampler k=3 and k=10 order 3 tok/s, oracle pos/s), B = 4096,
    T = 256, on a quiet machine and next to two busy-looping processes, at one torch thread,
    at torch's two threads (iclgym.tasks.base.THREADS off) and at two torch threads with
    iclgym's default scoping (one thread inside sample and oracle)."""
    settings = {"1 torch thread": (1, 1), "2 torch threads": (2, None), "2 + default": (2, 1)}
    rows = []
    for machine in ("quiet", "busy"):
        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(2)]
        if machine == "busy":
            for p in spinners:
                p.start()
            time.sleep(0.5)
        try:
            for setting, (threads, scoped) in settings.items():
                torch.set_num_threads(threads)
                base.THREADS = scoped
                sampled = sampler_rate(3, 2, 4096, 256), sampler_rate(10, 3, 4096, 256)
                rows.append((machine, setting, *sampled, oracle_rate(4096)))
                print(
                    f"{machine} machine, {setting}: sampler k=3 {sampled[0] / 1e6:.1f} M "
                    f"tok/s, k=10 order 3 {sampled[1] / 1e6:.2f} M tok/s, oracle "
                    f"{rows[-1][4] / 1e6:.1f} M pos/s",
                    flush=True,
                )
        finally:
            stop.set()
            for p in spinners:
                if p.is_alive() or p.exitcode is not None:
                    p.join()
            torch.set_num_threads(1)
            base.THREADS = 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", default=None, help="checkout of the official code")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    make = official_generator(args.official) if args.official else None

    def official(k: int, order: int, batch: int, seq_len: int) -> float:
        call = make(k, order, batch, seq_len)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints the failing chains
                return _best_rate(call, batch * seq_len, 3, BUDGET)
        except RuntimeError as err:  # it exits where its power iteration does not converge
            print(f"official: {err}")
            return float("nan")

    def theirs(fn: Callable[[int], tuple[int, int, int, int]]) -> Callable[[int], float] | None:
        return None if make is None else (lambda x: official(*fn(x)))

    panels = {
        "batch size B (k=3, first order, T=256)": curve(
            "B",
            [16, 64, 256, 1024, 4096, 16384],
            lambda b: sampler_rate(3, 2, b, 256),
            theirs(lambda b: (3, 2, b, 256)),
        ),
        "length T (k=3, first order, B=1024)": curve(
            "T",
            [32, 128, 512, 2048],
            lambda t: sampler_rate(3, 2, 1024, t),
            theirs(lambda t: (3, 2, 1024, t)),
        ),
        "vocabulary k (first order, B=1024, T=256)": curve(
            "k",
            [2, 3, 5, 10, 20, 50, 100],
            lambda k: sampler_rate(k, 2, 1024, 256),
            theirs(lambda k: (k, 2, 1024, 256)),
        ),
        "n-gram order (k=3, B=1024, T=256)": curve(
            "order",
            [2, 3, 4, 5, 6],
            lambda n: sampler_rate(3, n, 1024, 256),
            theirs(lambda n: (3, n, 1024, 256)),
        ),
    }
    threads_under_load()
    oracle = curve("oracle B", [64, 256, 1024, 4096, 16384], oracle_rate, None)
    sizes = [(256, 256), (1024, 256), (4096, 256), (16384, 256)]
    memory = {"x": [b * t for b, t in sizes], "oracle": [], "sampler": []}
    for b, t in sizes:
        memory["oracle"].append(peak_bytes_per_position("oracle", 3, b, t))
        memory["sampler"].append(peak_bytes_per_position("sampler", 3, b, t))
        print(
            f"peak memory B={b} T={t}: oracle {memory['oracle'][-1]:.1f} B/pos, sampler "
            f"{memory['sampler'][-1]:.1f} B/pos",
            flush=True,
        )

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (title, points) in zip(axes.flat, panels.items(), strict=False):
        ax.plot(points["x"], [v / 1e6 for v in points["iclgym"]], "o-", label="iclgym")
        if make is not None:
            ax.plot(points["x"], [v / 1e6 for v in points["official"]], "s--", label="official")
        ax.set(xscale="log", yscale="log", title=title, ylabel="M tokens/s")
        ax.legend()
    ax = axes.flat[4]
    ax.plot(oracle["x"], [v / 1e6 for v in oracle["iclgym"]], "o-", label="closed-form oracle")
    ax.axhline(20, color="grey", ls=":", label="target 20 M")
    ax.set(xscale="log", title="oracle (k=3, T=256) over B", ylabel="M positions/s")
    ax.legend()
    ax = axes.flat[5]
    ax.plot(memory["x"], memory["oracle"], "o-", label="oracle")
    ax.plot(memory["x"], memory["sampler"], "s-", label="sampler")
    ax.axhline(12, color="grey", ls=":", label="(B, T, 3) float32 output")
    ax.set(xscale="log", title="peak memory (k=3)", xlabel="positions B*T", ylabel="bytes/position")
    ax.set_ylim(0, max(24, *memory["oracle"], *memory["sampler"]) * 1.1)
    ax.legend()
    fig.suptitle("Markov-chain sampler and oracle, one torch thread, 2-core CPU")
    fig.tight_layout()
    out = Path(args.out) / "sampler_speed.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
