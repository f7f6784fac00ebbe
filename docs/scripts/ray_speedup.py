"""Measured speed-up of a sweep on a local Ray cluster: the same 8-cell grid (a 2-layer
transformer on ICL-MarkovChain-v0, 2 widths x 4 seeds, 600 steps each) run by the local backend,
then by Ray with 1 and 2 workers (one CPU and one torch thread per trial), with the wall time,
the speed-up over the local backend and the ideal (the worker count), side by side in one run.

Run::

    python docs/scripts/ray_speedup.py

(about 5 minutes on the project's 2-core CPU; it prints the machine's load average, since a
busy machine lowers the speed-up.) Needs ``pip install 'iclgym[ray]'``.
"""

from __future__ import annotations

import os
import tempfile
import time

from iclgym.harness.backends import Backend
from iclgym.harness.sweep import ModelChoice, run_sweep
from iclgym.harness.train import TrainConfig

CONFIG = TrainConfig(steps=600, batch_size=32, eval_every=0, eval_sequences=128)
MODEL = ModelChoice("transformer", "baselines.transformer:make_model",
                    {"n_layers": 2, "n_heads": 2}, "d_model")  # fmt: skip


def timed(backend: Backend | None, out: str) -> float:
    start = time.perf_counter()
    run_sweep("ICL-MarkovChain-v0", models=[MODEL], widths=(16, 32), seeds=(0, 1, 2, 3),
              spec={"seq_len": 64}, config=CONFIG, out=out, backend=backend)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    import contextlib
    import io

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, backend, ideal in (
            ("local (this process)", None, 1.0),
            ("ray, 1 worker", Backend("ray", workers=1), 1.0),
            ("ray, 2 workers", Backend("ray", workers=2), 2.0),
        ):
            with contextlib.redirect_stdout(io.StringIO()):
                seconds = timed(backend, os.path.join(tmp, label.split()[0] + str(ideal)))
            rows.append((label, seconds, ideal))
    base = rows[0][1]
    print(f"8-cell sweep, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"{'backend':24s} {'wall s':>8s} {'speed-up':>9s} {'ideal':>6s}")
    for label, seconds, ideal in rows:
        print(f"{label:24s} {seconds:8.1f} {base / seconds:8.2f}x {ideal:5.1f}x")


if __name__ == "__main__":
    main()
