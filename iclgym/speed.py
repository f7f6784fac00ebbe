"""Throughput benchmark behind ``iclgym speed``: sampler, oracle and every env, with targets.

Throughputs are the best of several runs (env benchmarks interleaved round-robin with
CartPole's, their spread over the runs printed), the usual way to read throughput on a shared
machine. Targets (issue 15, on the project's 2-core CPU, one torch thread):

* the Markov-chain sampler in every cell of k in {3, 10, 100} x order in {2, 3} at B = 64
  (T = 101) and B = 4,096 (T = 256) at least :data:`OFFICIAL_RATIO` times the official ICL-MC
  generator (``datasets.ngrams.__getitems__`` of EzraEdelman/Evolution-of-Statistical-Induction-
  Heads), measured in the same run when its checkout is passed as ``official`` (never bundled:
  without it the rows print iclgym's rate and no verdict); k = 100, order 3 is left out (its
  10,000 lifted states exceed the stationary start's limit, and the official code's dense
  (B, 10^4, 10^4) power iteration does not fit in memory);
* k = 3, first order, B = 4,096, T = 256 at least :data:`RANDOM_FRACTION` of the rate at which
  torch writes as many random int64 (``torch.empty(B, T).random_``), measured alongside;
* the closed-form oracle (exact Bayes under ``init="uniform"``) at k = 3, B = 4,096, T = 256
  at least :data:`ORACLE_TARGET` positions/s, and its peak memory at most
  :data:`ORACLE_BYTES_TARGET` bytes per position (its (B, T, 3) float32 output is 12);
* every registered id: single env ``step`` through ``gym.make`` and its native vector env at
  ``num_envs`` envs at least CartPole-v1's (issue 15 asks 2x: the ``ratio`` column).

Sampler and oracle rows of the other families are info rows. The Markov grid runs at iclgym's
default (:data:`GRID_THREADS` torch thread), the k = 3 sampler and oracle rows and the other
families' rows at 1 and 2 torch threads side by side with iclgym's per-call thread scoping off
(:data:`BATCH_THREADS`), the env rows at 1 (:data:`ENV_THREADS`); the previous thread count is
restored. The table's footer prints the thread counts and the load average before and after.
A row whose target is not met prints ``NO``; a budget too short to measure throughput
(``seconds`` < 0.1) is refused.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils.performance import benchmark_step
from tqdm.auto import tqdm

from iclgym.tasks import base
from iclgym.tasks.base import torch_threads
from iclgym.tasks.markov import MarkovChainTask
from iclgym.tasks.multi_concept import MultiConceptTask
from iclgym.tasks.priority_graph import PriorityGraphTask
from iclgym.tasks.sparse_bigram import SparseContextualBigramTask
from iclgym.validation import as_float, as_int, invalid

OFFICIAL_RATIO = 10.0  # iclgym / official tokens/s in every grid cell, issue 15
RANDOM_FRACTION = 0.5  # of torch's random_ int64 write rate at k = 3, issue 15
ORACLE_TARGET = 20e6  # positions/s, closed-form oracle at k = 3, B = 4096, T = 256, issue 15
ORACLE_BYTES_TARGET = 16.0  # peak bytes per position at k = 3: the float32 output (12) + 4
GRID = ((3, 2), (3, 3), (10, 2), (10, 3), (100, 2))
"""(num_states, order) cells of the side-by-side sampler table (issue 15)."""
GRID_SHAPES = ((64, 101), (4096, 256))
"""(B, T) of every grid cell: the official code's default batch and length, and a large batch."""
GRID_THREADS = 1
BATCH_THREADS = (1, 2)
"""Torch threads of the k = 3 sampler and oracle rows and the other families' rows, side by
side, with :data:`iclgym.tasks.base.THREADS` off (torch's count as set): a second thread helps
torch's elementwise work when the second core is idle and stalls at OpenMP barriers when it
is not; the compiled kernels run on one thread either way. The grid runs at iclgym's default."""
ENV_THREADS = 1
"""Torch threads of the env rows (every iclgym command's default): the envs step in Python on
one core while worker threads prepare blocks on the other; a second OpenMP thread spin-waits
on the stepping core (CartPole-v1, which runs no torch, stepped at 78 k vs 120 k steps/s next to
2-thread iclgym envs)."""
MIN_SECONDS = 0.1
"""Shortest env benchmark run (seconds): shorter runs measure start-up and timer noise."""
BASELINE = "CartPole-v1"


@dataclass(frozen=True)
class Row:
    """One benchmark: ``value`` (the best run) in ``unit``, the target it must reach (None:
    an info row) and, for repeated runs, the (slowest, fastest) run."""

    name: str
    value: float
    unit: str
    target: float | None
    target_text: str
    spread: tuple[float, float] | None = None
    at_most: bool = False
    """The target is a ceiling (memory), not a floor (throughput)."""

    @property
    def ok(self) -> bool | None:
        """None without a target; else whether a positive value reached it (a row that
        measured nothing fails)."""
        if self.target is None:
            return None
        if self.at_most:
            return bool(0 < self.value <= self.target)
        return bool(self.value > 0 and self.value >= self.target)


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


def _round_robin(measures: dict[str, Callable[[], float]], repeats: int, bar) -> dict:
    """Every run of each benchmark, run round-robin (a, b, c, a, b, c, ...) so that all see
    the same machine; the best run is the one least disturbed by others."""
    runs: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            runs[name].append(measure())
            bar.update(1)
    return runs


@contextmanager
def task_threads(threads: int | None) -> Iterator[None]:
    """:data:`iclgym.tasks.base.THREADS` set to ``threads`` inside the block, then restored."""
    before = base.THREADS
    base.THREADS = threads
    try:
        yield
    finally:
        base.THREADS = before


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages (``os.getloadavg``), or ``n/a``."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not on this platform
        return "n/a"


def run(
    seconds: float = 2.0,
    repeats: int = 3,
    num_envs: int = 4096,
    progress: bool = True,
    env_ids: Sequence[str] | None = None,
    official: str | Path | None = None,
) -> list[Row]:
    """Measure every row of the table; each env run lasts ``seconds``, best of ``repeats``.

    ``env_ids`` defaults to every registered id (:func:`iclgym.list_envs`); ``official`` is a
    checkout of EzraEdelman/Evolution-of-Statistical-Induction-Heads (its ``datasets.py``
    and ``utils.py``), measured side by side with the sampler grid. Raises ``ValueError`` for
    ``seconds`` < :data:`MIN_SECONDS` (or not finite), ``repeats`` < 1, ``num_envs`` < 1,
    unknown ids and an ``official`` folder without ``datasets.py``, before measuring anything.
    """
    import iclgym

    seconds = as_float("seconds", seconds, MIN_SECONDS)
    repeats = as_int("repeats", repeats, 1)
    num_envs = as_int("num_envs", num_envs, 1)
    ids = list(iclgym.list_envs() if env_ids is None else env_ids)
    for env_id in ids:
        if env_id not in iclgym.list_envs():
            raise invalid("env_ids", env_id, f"registered iclgym ids {iclgym.list_envs()}")
    reference = None if official is None else official_generator(official)

    rows: list[Row] = []
    total = len(GRID) * len(GRID_SHAPES) + 2 + 3 * len(BATCH_THREADS) + 2 * repeats * (1 + len(ids))
    bar = tqdm(total=total, desc="iclgym speed", disable=not progress)
    try:
        with torch_threads(GRID_THREADS):
            rows.extend(grid_rows(seconds * repeats, repeats, reference, bar))
            rows.extend(_memory_rows(bar))
        for threads in BATCH_THREADS:  # torch's count unscoped: what iclgym's default avoids
            with torch_threads(threads), task_threads(None):
                rows.extend(_batch_rows(seconds * repeats, repeats, f" [{threads} thr]", bar))
        with torch_threads(ENV_THREADS):
            rows.extend(_env_rows(ids, seconds, repeats, num_envs, bar))
    finally:
        bar.close()
    return rows


def official_generator(path: str | Path) -> Callable[[int, int, int, int], Callable[[], object]]:
    """``make(k, order, batch, seq_len)`` returning a call of the official ICL-MC generator
    (``ngrams("train", order, length=seq_len + 1, num_symbols=k).__getitems__``, which draws
    ``batch`` sequences of ``seq_len`` inputs) from a checkout at ``path``. Raises
    ``ValueError`` when ``path/datasets.py`` is missing; a call raises ``RuntimeError`` where
    the official code calls ``exit()`` (its power iteration unconverged after 100 steps, seen
    at k = 3, order 5)."""
    folder = Path(path)
    if not (folder / "datasets.py").is_file():
        raise invalid("official", str(path), "a checkout holding datasets.py and utils.py")
    saved = sys.modules.pop("utils", None)
    sys.path.insert(0, str(folder))
    try:  # datasets.py imports its sibling utils.py by that generic name
        spec = importlib.util.spec_from_file_location("_iclmc_datasets", folder / "datasets.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("utils", None)
        if saved is not None:
            sys.modules["utils"] = saved

    def make(k: int, order: int, batch: int, seq_len: int) -> Callable[[], object]:
        dataset = module.ngrams("train", order, length=seq_len + 1, num_symbols=k)
        indices = list(range(batch))

        def call() -> object:
            try:
                return dataset.__getitems__(indices)
            except SystemExit as stop:  # its power iteration exits after 100 steps unconverged
                raise RuntimeError(
                    f"the official generator stopped (k={k}, order={order}): its stationary "
                    "power iteration did not converge"
                ) from stop

        return call

    return make


def grid_rows(budget: float, repeats: int, reference, bar) -> list[Row]:
    """The Markov-chain sampler in every :data:`GRID` x :data:`GRID_SHAPES` cell (tokens/s,
    ``B * T`` per call), with the official generator's rate in the same run when ``reference``
    (:func:`official_generator`) is given; then the k = 3 row against ``random_``."""
    rows = []
    for k, order in GRID:
        for batch, seq_len in GRID_SHAPES:
            task = MarkovChainTask(num_states=k, order=order, seq_len=seq_len)
            call = partial(task.sample, batch, generator=task.generator(0))
            items = batch * seq_len
            ours = _best_rate(call, items, repeats, budget)
            name = f"sampler k={k} order={order} B={batch} T={seq_len}"
            if reference is None:
                rows.append(Row(name, ours, "tok/s", None, "pass --official"))
            else:
                theirs = _best_rate(reference(k, order, batch, seq_len), items, repeats, budget)
                rows.append(Row(f"  official {name[8:]}", theirs, "tok/s", None, "reference"))
                text = f">= {OFFICIAL_RATIO:g}x: {ours / theirs:.1f}x"
                rows.append(Row(name, ours, "tok/s", OFFICIAL_RATIO * theirs, text))
            bar.update(1)
    batch, seq_len = 4096, 256
    buffer = torch.empty(batch, seq_len, dtype=torch.int64)
    task = MarkovChainTask(num_states=3, seq_len=seq_len)
    gen = task.generator(0)
    writes = _best_rate(lambda: buffer.random_(generator=gen), batch * seq_len, 10 * repeats, 1)
    rows.append(Row("  torch random_ int64 B=4096 T=256", writes, "tok/s", None, "reference"))
    ours = _best_rate(lambda: task.sample(batch, generator=gen), batch * seq_len, 10 * repeats, 1)
    text = f">= {RANDOM_FRACTION:g} random_"
    rows.append(
        Row("sampler k=3 B=4096 T=256 vs random_", ours, "tok/s", RANDOM_FRACTION * writes, text)
    )
    bar.update(1)
    return rows


def peak_bytes_per_position(kind: str, k: int, batch: int, seq_len: int) -> float:
    """Peak resident memory (bytes per position, above the memory held before the call) of
    one ``kind`` call, ``"oracle"`` (the closed-form oracle on a batch) or ``"sampler"``, on a
    ``MarkovChainTask(num_states=k, seq_len=seq_len, init="uniform")`` batch of ``batch``
    sequences. Measured in a fresh Python process (Linux: ``/proc/self/clear_refs`` resets the
    peak, ``VmHWM`` reads it; glibc maps every allocation above 64 KiB, so freed memory is not
    reused unseen). NaN where ``/proc`` is missing."""
    if not Path("/proc/self/clear_refs").exists():
        return float("nan")
    code = f"import iclgym.speed as s; print(s._peak({kind!r}, {k}, {batch}, {seq_len}))"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def _peak(kind: str, k: int, batch: int, seq_len: int) -> float:
    torch.set_num_threads(1)
    task = MarkovChainTask(num_states=k, seq_len=seq_len, init="uniform")
    gen = task.generator(0)
    data = task.sample(batch, generator=gen)
    task.oracle(task.sample(2, generator=gen))  # compiles the kernels before the measurement
    call = (
        (lambda: task.oracle(data))
        if kind == "oracle"
        else (lambda: task.sample(batch, generator=gen))
    )
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak (VmHWM) starts again from the current resident set
    before = _status_kib("VmRSS")
    result = call()
    peak = _status_kib("VmHWM")
    del result
    return (peak - before) * 1024 / (batch * seq_len)


def _memory_rows(bar) -> list[Row]:
    rows = []
    value = peak_bytes_per_position("oracle", 3, 4096, 256)
    text = f"<= {ORACLE_BYTES_TARGET:g}"
    rows.append(
        Row("oracle peak k=3 B=4096 T=256", value, "B/pos", ORACLE_BYTES_TARGET, text, at_most=True)
    )
    value = peak_bytes_per_position("sampler", 3, 4096, 256)
    rows.append(Row("sampler peak k=3 B=4096 T=256", value, "B/pos", None, "info"))
    bar.update(1)
    return rows


def _batch_rows(budget: float, repeats: int, suffix: str, bar) -> list[Row]:
    """The k = 3 sampler and oracle rows and the other families' info rows at the current
    torch thread count (names end ``suffix``)."""
    rows = []
    task = MarkovChainTask(num_states=3, seq_len=256, init="stationary")
    gen = task.generator(0)
    batch = task.sample(4096, generator=gen)
    rate = _best_rate(lambda: task.sample(4096, generator=gen), 4096 * 256, 10 * repeats, budget)
    rows.append(Row(f"sampler k=3 T=256 B=4096{suffix}", rate, "tok/s", None, "info"))
    rate = _best_rate(lambda: task.sample(4096, generator=gen).true_probs, 4096 * 256, 10, budget)
    rows.append(Row(f"sampler + true_probs T=256 B=4096{suffix}", rate, "tok/s", None, "info"))
    bar.update(1)
    closed = MarkovChainTask(num_states=3, seq_len=256, init="uniform")
    uniform_batch = closed.sample(4096, generator=gen)
    rate = _best_rate(lambda: closed.oracle(uniform_batch), 4096 * 256, 10 * repeats, budget)
    name = f"oracle (closed form) k=3 T=256 B=4096{suffix}"
    rows.append(Row(name, rate, "pos/s", ORACLE_TARGET, f">= {ORACLE_TARGET / 1e6:g}M"))
    rate = _best_rate(lambda: task.oracle(batch), 4096 * 256, 1, budget)
    name = f"oracle (stationary, Monte Carlo) B=4096{suffix}"
    rows.append(Row(name, rate, "pos/s", None, "info"))
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
        runs = _round_robin({i: measure(i) for i in (BASELINE, *ids)}, repeats, bar)
        cart = runs.pop(BASELINE)
        rows.append(Row(f"{BASELINE} {label}", max(cart), "steps/s", None, "baseline", _span(cart)))
        rows.extend(
            Row(
                f"{env_id} {label}",
                max(values),
                "steps/s",
                max(cart),
                f">= CartPole: {max(values) / max(cart):.2f}x",
                _span(values),
            )
            for env_id, values in runs.items()
        )
    return rows


def _span(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def _number(value: float, unit: str) -> str:
    if value != value:  # NaN: not measured here
        return "n/a"
    scale, prefix = next(
        ((f, p) for f, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if value >= f), (1.0, "")
    )
    return f"{value / scale:.2f} {prefix}{unit}"


def format_table(rows: list[Row], load_before: str | None = None) -> str:
    """The rows as a text table (``NO`` marks a missed target; ``spread``: slowest and fastest
    run), with the thread counts and the load average."""
    width = max(44, *(len(r.name) for r in rows))
    lines = [
        f"{'benchmark':{width}s} {'value':>16s}  {'spread (min-max)':21s} {'target':20s} ok",
        "-" * (width + 64),
    ]
    for r in rows:
        mark = {True: "yes", False: "NO", None: ""}[r.ok]
        spread = "" if r.spread is None else "-".join(_number(v, "").strip() for v in r.spread)
        value = _number(r.value, r.unit)
        lines.append(f"{r.name:{width}s} {value:>16s}  {spread:21s} {r.target_text:20s} {mark}")
    lines.append(
        f"torch {torch.__version__}, gymnasium {gym.__version__}; torch threads: grid "
        f"{GRID_THREADS}, [n thr] rows n, env rows {ENV_THREADS} (default now "
        f"{torch.get_num_threads()}); load average "
        + (f"before {load_before}, " if load_before else "")
        + f"after {load_average()} ({os.cpu_count()} cores)"
    )
    return "\n".join(lines)
