"""Phase diagram of a training run (matplotlib, Agg backend: no display needed).

Top panel: last-token KL(true || model) against training sequences seen, one horizontal line
per reference strategy (its own KL(true || strategy) at the last position), and the background
shaded by the nearest strategy (the phase label). Bottom panel: the attention probes.
This is the paper's Fig. 1 layout (``shared/specs/markov-chain.md`` section 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

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
