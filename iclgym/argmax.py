"""Compiled row-wise argmax of small laws (numba), the envs' oracle hits and predictions.

``numpy.argmax`` over the last axis of an (N, V) array of a few columns pays a per-row
reduction setup (1.5 ms at N = 65536, V = 8); one compiled pass takes a third of that. Rows are
scanned in column order, the first index winning ties, as the numpy column loop this replaces
(also for NaN: a NaN entry stops later columns from winning, as ``np.maximum`` propagates it).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _first_argmax(p, out):  # pragma: no cover - compiled
    rows, v = p.shape
    for r in range(rows):
        best, top = 0, p[r, 0]
        for j in range(1, v):  # selects, not branches: a random winner mispredicts them
            x = p[r, j]
            best = j if x > top else best
            top = np.maximum(top, x)  # NaN propagates: nothing later beats it
        out[r] = best


def first_argmax_rows(p: np.ndarray) -> np.ndarray:
    """(...,) int64 argmax over the last axis of float ``p`` (..., V), V >= 1, the first
    index winning ties (a numpy scalar for a single law (V,), as ``np.argmax``)."""
    flat = np.ascontiguousarray(p).reshape(-1, p.shape[-1])
    out = np.empty(flat.shape[0], dtype=np.int64)
    _first_argmax(flat, out)
    return out.reshape(p.shape[:-1])[()]
