"""The task contract every iclgym task family implements.

A task is a frozen, validated spec plus three things computed from it: a vectorised,
seeded sampler of :class:`Batch` es, a Bayes-optimal ``oracle`` and named reference
``strategies``. Envs, baselines and the harness only ever talk to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from functools import cached_property, wraps
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "validation", "test")
"""Named data splits; each draws from its own seed stream (see :func:`make_generator`)."""
SPLIT_ALIASES = {"val": "validation"}
"""Other names of a split, accepted wherever a split is (:func:`canonical_split`)."""


def canonical_split(split: object) -> object:
    """``split`` with its alias resolved (``"val"`` is ``"validation"``); anything else as
    given, for the caller to validate."""
    return SPLIT_ALIASES.get(split, split) if isinstance(split, str) else split


Strategy = Callable[["Batch"], Tensor]
"""A reference predictor: maps a batch to next-token log-probabilities (B, T, V)."""


@dataclass(frozen=True)
class Batch:
    """A batch of sequences with everything needed to score a next-token predictor.

    Position ``t`` of a sequence has seen ``tokens[:, : t + 1]`` and must predict
    ``targets[:, t]`` (which equals ``tokens[:, t + 1]`` for ``t < T - 1``).
    ``true_probs`` is computed from the latent parameters on first access, so training
    loops that never read it do not pay for it.
    """

    tokens: Tensor
    """(B, T) int64 model input."""
    targets: Tensor
    """(B, T) int64 next token at every position."""
    loss_mask: Tensor
    """(B, T) bool, the positions that are scored."""
    params: Mapping[str, Tensor]
    """Latent task parameters, one leading batch dimension each (never shown to a model)."""
    vocab_size: int
    true_probs_fn: Callable[[Batch], Tensor] = field(repr=False, compare=False)
    """Computes :attr:`true_probs` from this batch (usually a bound task method)."""
    features: Tensor | None = None
    """(B, T, F) float32 continuous inputs aligned with ``tokens`` (position t's features sit
    beside token t), or None for token-only tasks; F = ``task.feature_dim``. A model of a task
    with features is called ``model(tokens, features)`` (see :func:`model_inputs`)."""

    @cached_property
    def true_probs(self) -> Tensor:
        """(B, T, V) float32, the law each target was drawn from."""
        return self.true_probs_fn(self)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return replace(
            self,
            tokens=self.tokens.to(device),
            targets=self.targets.to(device),
            loss_mask=self.loss_mask.to(device),
            params={k: v.to(device) for k, v in self.params.items()},
            features=None if self.features is None else self.features.to(device),
        )

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        """What a model is called with: ``(tokens,)`` or ``(tokens, features)``."""
        return model_inputs(self.tokens, self.features)


def model_inputs(tokens: Tensor, features: Tensor | None) -> tuple[Tensor, ...]:
    """The positional arguments of a model's ``forward`` (the model contract of
    :mod:`iclgym.harness.model`): ``(tokens,)`` for token-only tasks, ``(tokens, features)``
    for tasks whose batches carry continuous features."""
    return (tokens,) if features is None else (tokens, features)


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for random stream ``stream`` of ``seed``, independent of every other stream.

    Drawn from ``numpy.random.SeedSequence(seed, spawn_key=(stream,))``. Streams
    ``0 .. len(SPLITS) - 1`` are the data splits; later ones are free for other uses (dropout).
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid: expected an int >= 0")
    state = np.random.SeedSequence(int(seed), spawn_key=(stream,)).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class SplitGenerator(torch.Generator):
    """A ``torch.Generator`` that knows its split, for tasks whose splits differ in more than
    the seed stream (e.g. disjoint symbol alphabets): their ``sample`` reads
    :func:`generator_split`."""

    split: str = "train"

    def __reduce__(self):  # keep the split through pickle and deepcopy
        return (_restore_split_generator, (str(self.device), self.split, self.get_state()))

    def __deepcopy__(self, memo: dict) -> SplitGenerator:
        return _restore_split_generator(str(self.device), self.split, self.get_state())


def _restore_split_generator(device: str, split: str, state: torch.Tensor) -> SplitGenerator:
    generator = SplitGenerator(device=device)
    generator.split = split
    generator.set_state(state)
    return generator


def generator_split(generator: torch.Generator) -> str:
    """The split of a generator made by :func:`make_generator`; ``"train"`` for a plain one."""
    return getattr(generator, "split", "train")


def make_generator(seed: int, split: str = "train", device: torch.device | str = "cpu"):
    """A ``torch.Generator`` for ``(seed, split)``; splits get independent streams, so the
    train, validation and test data of one seed never coincide (see :func:`stream_seed`).
    It is a :class:`SplitGenerator` that carries ``split`` (``"val"`` is ``"validation"``)."""
    split = canonical_split(split)
    if split not in SPLITS:
        raise ValueError(
            f"split={split!r} is invalid: expected one of {SPLITS} (or 'val' for 'validation')"
        )
    generator = SplitGenerator(device=device)
    generator.split = split
    return generator.manual_seed(stream_seed(seed, SPLITS.index(split)))


@dataclass(frozen=True)
class OracleEstimate:
    """The Bayes oracle's prediction on a batch, and its Monte-Carlo replicates when it is an
    estimate rather than a closed form (DESIGN.md: "every task has an exact oracle ... where no
    closed form exists, an exact estimator with its error reported").

    ``replicates`` are R >= 2 independent estimates (each from its own share of the samples)
    whose pool is ``log_probs``; their spread gives :meth:`mc_error`.
    """

    log_probs: Tensor
    """(B, T, V) float32 Bayes log-probabilities (natural log)."""
    replicates: Tensor | None = None
    """(R, B, T, V) float32 log-probabilities of the R replicates, or None (closed form)."""

    def mc_error(self, targets: Tensor, mask: Tensor) -> tuple[float, float]:
        """Monte-Carlo error of the oracle's mean cross-entropy on ``targets`` (B, T) over the
        scored positions ``mask`` (B, T) bool: ``(bias, se)`` in nats/token, both 0 for a
        closed form.

        The pool of R replicates has about 1/R of one replicate's noise-induced bias (the
        bias of an average of S samples scales as 1/S), so ``bias = (mean_r CE_r - CE_pool)
        / (R - 1)``; it is >= 0 in expectation (a noisy predictive loses log-loss, Jensen).
        ``se`` is the random part: per sequence the spread of the replicates' CE over
        sqrt(R), averaged over sequences. ``bias + 3 se`` bounds, with high probability, how
        far the oracle's CE is above the exact Bayes CE.
        """
        if self.replicates is None:
            return 0.0, 0.0
        r = self.replicates.shape[0]
        index = targets.unsqueeze(-1)
        pool = -self.log_probs.gather(-1, index).squeeze(-1).double()
        reps = -self.replicates.gather(-1, index.expand(r, -1, -1, -1)).squeeze(-1).double()
        weight = mask.double()
        count = weight.sum()
        per_seq_pool = (pool * weight).sum(-1)  # (B,)
        per_seq_reps = (reps * weight).sum(-1)  # (R, B)
        bias = (per_seq_reps.mean(0) - per_seq_pool).sum() / count / (r - 1)
        var = per_seq_reps.var(0) / r  # (B,) variance of the pooled per-sequence total
        se = var.sum().sqrt() / count
        return bias.item(), se.item()


class TaskSpec:
    """Base of the frozen spec dataclasses; each validates itself in ``__post_init__``."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


THREADS: int | None = 1
"""Torch intra-op threads of every task's ``sample``, ``oracle`` and ``oracle_estimate`` call on
the calling thread (torch's previous count restored after; None: torch's own setting). One by
default: the samplers and oracles are compiled kernels and elementwise work on batches, and on a
busy 2-core machine torch's default of one thread per core stalls at every OpenMP barrier (the
Markov sampler at k = 3, B = 4,096, T = 256: 113 M tokens/s at one thread, 35 M at two next to
one busy core, 7 M next to two; ``docs/speed.md``)."""


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (0 = unchanged), restored after
    (OpenMP's count is per calling thread: concurrent callers do not see each other's)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _scoped_threads(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run with :data:`THREADS` torch threads (:func:`torch_threads`)."""

    @wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch_threads(THREADS or 0):
            return method(*args, **kwargs)

    run.__scoped_threads__ = True  # type: ignore[attr-defined]
    return run


class Task(ABC):
    """A task family instance: spec, sampler, oracle and reference strategies.

    Every subclass's ``sample``, ``oracle`` and ``oracle_estimate`` run with :data:`THREADS`
    torch threads (wrapped when the subclass is defined)."""

    name: ClassVar[str]
    """Short family name used by the registry (e.g. ``"markov_chain"``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("sample", "oracle", "oracle_estimate"):
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "__scoped_threads__", False):
                setattr(cls, name, _scoped_threads(method))

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids V a predictor must score."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Number of scored positions T per sequence."""

    @property
    def feature_dim(self) -> int:
        """F, the width of ``Batch.features`` (B, T, F); 0 for token-only tasks (the default),
        whose batches carry ``features=None``."""
        return 0

    @property
    def named_splits(self) -> Mapping[str, str]:
        """Held-out data distributions beyond the seed-stream splits ``SPLITS``: name ->
        one-line description (e.g. longer contexts, unseen concepts). Each is a variant task
        (:meth:`split_task`) drawn from the ``"test"`` seed stream, selectable wherever a split
        is (``evaluate``, the envs' ``split=`` and ``reset(options=...)``, the CLI). Default:
        none."""
        return {}

    def split_task(self, name: str) -> Task:
        """The task whose data are the named split ``name`` (one of :attr:`named_splits`, or
        a parametrised name the family documents, e.g. ``ood_length_12``). Raises
        ``ValueError`` naming the valid splits for any other name."""
        raise ValueError(
            f"split={name!r} is invalid for {type(self).__name__}: expected one of "
            f"{SPLITS + tuple(self.named_splits)}"
        )

    @property
    def first_scored_position(self) -> int:
        """Positions before this one are context only (never scored); env episodes start
        here. 0 for next-token tasks; the last position for single-label tasks."""
        return 0

    @abstractmethod
    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> Batch:
        """Draw ``batch_size`` fresh sequences, each from its own freshly drawn task instance."""

    @abstractmethod
    def oracle(self, batch: Batch) -> Tensor:
        """Bayes-optimal next-token log-probabilities (B, T, V) given only the tokens."""

    def oracle_estimate(self, batch: Batch) -> OracleEstimate:
        """:meth:`oracle` with its Monte-Carlo replicates; tasks whose oracle is a closed form
        keep this default (no replicates, zero Monte-Carlo error)."""
        return OracleEstimate(self.oracle(batch))

    @property
    def oracle_name(self) -> str:
        """How the oracle is computed for this spec (reported by ``evaluate``)."""
        return "bayes (closed form)"

    @property
    @abstractmethod
    def strategies(self) -> Mapping[str, Strategy]:
        """Named reference predictors, ordered from least to most informed."""

    privileged_strategies: ClassVar[frozenset[str]] = frozenset()
    """Strategies that read a sequence's hidden parameters (e.g. its true transition table), not
    only its context: references below the oracle, whose excess loss over it is negative
    (``iclgym eval`` marks them)."""

    @property
    def notes(self) -> tuple[str, ...]:
        """Lines a reader needs beside this spec, where a parameter's convention is not the one
        its name suggests (printed under the spec by ``iclgym eval``). Default none."""
        return ()

    probability_reward: ClassVar[str] = "logprob"
    """The envs' default reward for probability actions (``reward=`` of
    :class:`iclgym.envs.ICLEnv`): ``"logprob"`` (log q of the next token) or ``"squared"``
    (``-||e_y - f||^2``, for families whose paper loss it is)."""

    @property
    def sample_composes(self) -> bool:
        """True when, on one CPU generator, drawing B1 then B2 sequences gives the same
        sequences as drawing B1 + B2 at once (each row from its own share of the stream), so
        the data do not depend on batch sizes and the envs may draw larger blocks without
        changing any episode (:func:`iclgym.envs.block_sequences`). Default False."""
        return False

    @property
    def online_oracle(self) -> str:
        """What the second output of :meth:`online` is (the envs' ``info["oracle_probs"]``):
        by default the oracle of :meth:`oracle` (:attr:`oracle_name`); tasks whose online
        predictor is something else (e.g. a fast approximation of an estimated oracle) say so
        here."""
        return self.oracle_name

    def online(self, batch: Batch) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        """Per-position laws at the scored positions, the envs' per-step info and scores.

        Returns ``step``; ``step(t)`` is called once for each scored position t =
        :attr:`first_scored_position`, ..., ``seq_len - 1`` in turn (no other position is
        ever asked for) and returns ``(true, oracle)``: the law ``targets[:, t]`` was drawn
        from and the oracle's prediction (:attr:`online_oracle`), each either a (B, V)
        float32 numpy array of probabilities or, for a law that is a point mass, a (B,) int64
        numpy array of the token holding all the mass (cheaper when V is large).

        This default computes the dense ``true_probs`` and :meth:`oracle` of the whole batch
        up front; tasks override it to compute only the scored positions (template tasks:
        the label, as point masses) or to update the oracle incrementally (Markov chains).
        """
        true = batch.true_probs.cpu().numpy()
        oracle = self.oracle(batch).exp().cpu().numpy()
        return lambda t: (true[:, t], oracle[:, t])

    def model_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """Optional hook: metrics of a model that need the task's ground truth and the model's
        parameters, computed without data (e.g. sparse contextual bigrams: the exact population
        excess MSE of a linear transformer and the distances of its value and attention
        matrices to the true P and attn). A name -> float dict (JSON-ready, NaN allowed); ``{}``
        when the task has none or the model does not expose what they need, so any model may
        be passed. This default returns ``{}``."""
        return {}

    def generator(
        self, seed: int, split: str = "train", device: torch.device | str = "cpu"
    ) -> torch.Generator:
        """The seeded generator of ``split`` (see :func:`make_generator`)."""
        return make_generator(seed, split, device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def resolve_split(task: Task, split: str) -> tuple[Task, str]:
    """``(task, seed-stream split)`` for ``split``: a seed-stream split of ``SPLITS`` keeps
    ``task``; a named split of ``task.named_splits`` gives its variant task on the ``"test"``
    stream (``"val"`` is ``"validation"``). Raises ``ValueError`` naming the valid splits for
    anything else."""
    split = canonical_split(split)
    if split in SPLITS:
        return task, split
    if not isinstance(split, str):
        raise ValueError(
            f"split={split!r} is invalid: expected one of {SPLITS + tuple(task.named_splits)}"
        )
    return task.split_task(split), "test"


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool):
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
