"""Where independent trials run: one after another in this process (``local``) or as Ray tasks
on a local or remote Ray cluster (``ray``), for ``iclgym sweep`` and ``iclgym bench``.

A trial is a module-level function and its arguments; its result comes back to the calling
process, which records it (a sweep's ``sweep.json``, the bench's results store) as local runs
do, so both backends write the same rows for the same seeds. On Ray each trial is a task with
its CPU/GPU request; a worker that dies mid-trial (killed, out of memory) is retried up to
``max_retries`` times (Ray's task retries). On either backend a trial that raises is not
retried: the others finish and are recorded, then :func:`run_trials` raises naming the failed
trials, so a rerun
with ``--resume`` trains only what is missing. Ray is the optional extra ``iclgym[ray]``;
we use it rather than a process pool of our own for its scheduling, retries and clusters.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class Backend:
    """How trials run.

    Attributes:
        kind: ``"local"`` (this process, in order) or ``"ray"``.
        address: a Ray cluster's address (``"auto"``, ``"ray://host:10001"``, ...); empty:
            a local Ray started for the run and shut down after it.
        workers: CPUs of that local Ray (default: every core).
        num_cpus: CPUs requested per trial (Ray also sets the trial's OMP threads to it).
        num_gpus: GPUs requested per trial.
        max_retries: retries of a trial whose worker died.
    """

    kind: str = "local"
    address: str = ""
    workers: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend={self.kind!r} is invalid: expected one of {BACKENDS}")
        if self.kind != "ray" and (self.address or self.workers is not None):
            raise ValueError("an address or a worker count needs the ray backend (--backend ray)")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise ValueError(f"workers={self.workers!r} is invalid: expected an int >= 1")
        if self.address and self.workers is not None:
            raise ValueError("workers sets the size of a local Ray: not with an address")


class TrialsFailed(RuntimeError):
    """Raised after every other trial finished when some trials raised; ``failures`` maps the
    trial index to its error text."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = failures
        first = next(iter(failures.values())).strip().splitlines()[-1]
        super().__init__(f"{len(failures)} trial(s) failed ({sorted(failures)}); first: {first}")


def run_trials(
    fn: Callable[..., Any],
    trials: Sequence[tuple],
    on_result: Callable[[int, Any], None],
    backend: Backend | None = None,
    *,
    desc: str = "trials",
    progress: bool = True,
) -> None:
    """Run ``fn(*trials[i])`` for every ``i`` and call ``on_result(i, result)`` in this process
    as each finishes (in order locally, in completion order on Ray), with one progress bar of
    trials done / running / failed. Raises :class:`TrialsFailed` at the end when trials raised,
    ``ImportError`` for the ray backend without Ray installed."""
    backend = backend or Backend()
    bar = tqdm(total=len(trials), desc=desc, unit="trial", disable=not progress)
    with bar:
        if backend.kind == "local":
            failures: dict[int, str] = {}
            for i, args in enumerate(trials):
                bar.set_postfix(running=1, failed=len(failures))
                try:
                    result = fn(*args)
                except Exception as err:  # recorded; KeyboardInterrupt still stops the run
                    failures[i] = f"{type(err).__name__}: {err}"
                else:
                    on_result(i, result)
                bar.update()
            if failures:
                raise TrialsFailed(failures)
            return
        _run_on_ray(fn, trials, on_result, backend, bar)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ``ValueError`` when a ``HOST:PORT`` or ``ray://HOST:PORT`` address does not accept
    a TCP connection within ``timeout`` seconds (Ray itself retries for minutes);
    ``auto`` and other forms are left to Ray."""
    import socket

    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as err:
        raise ValueError(f"no Ray cluster answers at {address!r}: {err}") from None


def _run_on_ray(fn, trials, on_result, backend: Backend, bar) -> None:
    try:
        import ray
    except ImportError:
        raise ImportError(
            "the ray backend needs Ray: pip install 'iclgym[ray]' (or use --backend local)"
        ) from None
    started = not ray.is_initialized()
    if started:
        if backend.address:
            _check_reachable(backend.address)
            ray.init(address=backend.address, log_to_driver=False)
        else:  # workers import this checkout (and test modules) as the caller does
            path = os.pathsep.join([os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH")])])
            ray.init(
                num_cpus=backend.workers or os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": path}},
            )
    try:
        remote = ray.remote(
            num_cpus=backend.num_cpus, num_gpus=backend.num_gpus, max_retries=backend.max_retries
        )(fn)
        index = {remote.remote(*args): i for i, args in enumerate(trials)}
        capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // max(backend.num_cpus, 1e-9)))
        failures: dict[int, str] = {}
        pending = list(index)
        while pending:
            bar.set_postfix(running=min(len(pending), capacity), failed=len(failures))
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    result = ray.get(ref)
                except Exception as err:  # the trial raised (or its worker died too often)
                    failures[index[ref]] = f"{type(err).__name__}: {err}"
                else:
                    on_result(index[ref], result)
                bar.update()
        bar.set_postfix(running=0, failed=len(failures))
        if failures:
            raise TrialsFailed(dict(sorted(failures.items())))
    finally:
        if started:
            ray.shutdown()
        sys.stdout.flush()
