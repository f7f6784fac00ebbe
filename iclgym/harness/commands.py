"""The options of ``iclgym train`` and ``iclgym sweep``: dataclasses that ``tyro`` turns into
flags (``iclgym.cli`` parses them). They live here, beside the trainer, because they nest
:class:`~iclgym.harness.train.TrainConfig` (which imports torch): ``iclgym list`` never
imports this module. Field docstrings are the ``--help`` texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import tyro

from iclgym.harness.train import RunOptions, TrainConfig

EnvId = tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="ENV_ID")]]
Repeated = tyro.conf.UseAppendAction[tuple[str, ...]]


@dataclass(frozen=True)
class TrainArgs:
    """Train a model on an env id with the one trainer and plot its phases."""

    env_id: EnvId = ""
    """Registered env id (default: the recipe's)."""
    recipe: str = ""
    """Named protocol that fills the defaults (edelman2024, boix2023, ...); flags override."""
    model: str = "transformer"
    """transformer | transformer+kq | transformer+vo | transformer+kq+vo | mlp | lstm, or an
    import path package.module:factory called as factory(vocab_size, seq_len, **args)."""
    model_arg: Repeated = ()
    """Model factory argument KEY=VALUE (a Python literal), repeatable."""
    set: Repeated = ()
    """Spec override KEY=VALUE, repeatable."""
    train: tyro.conf.OmitArgPrefixes[TrainConfig] = field(default_factory=TrainConfig)
    run: tyro.conf.OmitArgPrefixes[RunOptions] = field(default_factory=RunOptions)


@dataclass(frozen=True)
class SweepArgs:
    """Train every model x width x n x seed with the one trainer; write sweep.json, sweep.txt
    (median error per cell) and sweep.png into --out."""

    env_id: EnvId = ""
    """Registered env id (default: the recipe's)."""
    recipe: str = ""
    """Named protocol that fills the defaults; flags override."""
    models: tuple[str, ...] = ()
    """Model names or import paths (default: the recipe's model, else transformer)."""
    model_arg: Repeated = ()
    """Model argument KEY=VALUE for every model of the grid, repeatable."""
    widths: tuple[int, ...] = ()
    """Values of each model's width argument (d_model, width, hidden_size); empty: none."""
    width_arg: str = ""
    """Model argument the width sets, for import-path models."""
    ns: tuple[int, ...] = ()
    """Values of --n-key (empty: no n axis)."""
    n_key: str = "train_alphabet_size"
    """Spec key (or TrainConfig field, e.g. train_sequences) that n sets."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds; where the spec has train_set_seed, it follows the seed."""
    set: Repeated = ()
    """Spec override KEY=VALUE, repeatable."""
    out: str = "runs/sweep"
    """Sweep folder: sweep.json, sweep.txt, sweep.png and one run folder per cell."""
    resume: bool = False
    """Keep the cells already in OUT/sweep.json (matched on model, width, n and seed: keep the
    other flags unchanged) and train the missing ones."""
    keep_checkpoints: bool = False
    """Keep each run's checkpoint.pt (default: deleted once its cell is recorded)."""
    train: tyro.conf.OmitArgPrefixes[TrainConfig] = field(default_factory=TrainConfig)
