"""Plots of a training run (matplotlib, Agg backend: no display needed).

:func:`plot_run`, the phase diagram. Top panel: last-token KL(true || model) against training
sequences seen, one horizontal line per reference strategy (its own KL(true || strategy) at the
last position), and the background shaded by the nearest strategy (the phase label). Bottom
panel: the attention probes. This is the Fig. 1 layout of Edelman et al. 2024 (arXiv 2402.11004;
``docs/results/markov-chain.md``).

:func:`plot_metrics`, the learning curves of a task's model metrics (``task.model_metrics``,
e.g. excess/initial, dist_P and dist_Q of sparse contextual bigrams): one panel per metric
against training sequences seen (samples, not steps, as in Ren, Wang, Lee 2024).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from iclgym.harness.phases import phases

PROBES = {"prev_token_score": "previous-token (layer 1)", "induction_score": "induction (layer 2)"}


def plot_run(
    records: Sequence[Mapping[str, Any]],
    references: Mapping[str, float],
    path: str | Path,
    title: str = "",
) -> Path:
    """Write the phase diagram of evaluation ``records`` to ``path`` (PNG) and return it.

    ``references`` maps strategy name -> KL_last of that strategy against the truth.
    """
    x = [r["sequences"] for r in records]
    names = list(references)
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(2, 1))
    # Shade each phase from the midpoint before its first checkpoint to the one after its last.
    edges = [x[0]] + [(a + b) / 2 for a, b in pairwise(x)] + [x[-1]]
    index = {r["step"]: i for i, r in enumerate(records)}
    for phase in phases(records):
        left, right = edges[index[phase["start_step"]]], edges[index[phase["end_step"]] + 1]
        for ax in (top, bottom):
            ax.axvspan(left, right, color=colors.get(phase["label"], "grey"), alpha=0.12, lw=0)
    top.plot(x, [r["kl_last"] for r in records], color="black", lw=1.5, label="model")
    for name, value in references.items():
        top.axhline(
            value, color=colors[name], ls="--", lw=1, label=f"{name} strategy ({value:.3f})"
        )
    top.set_ylabel("KL(true || model), last token")
    top.set_ylim(bottom=0)
    top.legend(title="background = nearest strategy", fontsize=8, title_fontsize=8)
    if title:
        top.set_title(title)
    probes = [(key, label) for key, label in PROBES.items() if key in records[0]]
    for key, label in probes:
        bottom.plot(x, [r[key] for r in records], label=label)
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("attention probe score" if probes else "(no attention maps exposed)")
    bottom.set_xlabel("training sequences seen")
    if probes:
        bottom.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_metrics(
    records: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Write the learning curves of ``keys`` in evaluation ``records`` (one panel per key,
    against ``records[i]["sequences"]``, the training sequences seen) to ``path`` (PNG) and
    return it. A panel has a log scale when its finite values are all positive and span more
    than a factor of 20; NaN values are left out. ``ValueError`` for no keys or no records."""
    if not keys or not records:
        raise ValueError(f"plot_metrics needs keys and records, got {len(keys)} and {len(records)}")
    x = [r["sequences"] for r in records]
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        y = [r.get(key, math.nan) for r in records]
        y = [math.nan if v is None else float(v) for v in y]
        ax.plot(x, y, marker=".", ms=3, lw=1.2)
        finite = [v for v in y if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) > 20 * min(finite):
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.set_xlabel("training sequences seen", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
