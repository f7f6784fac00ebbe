"""The sequence-model contract: what a ``torch.nn.Module`` must do to be trained by
:func:`iclgym.harness.train` and scored by :func:`iclgym.harness.evaluate`.

This docstring is the one place the contract is written down.

**Required.** ``forward(tokens)`` maps token ids ``tokens`` (B, T) int64 in [0, V) to

- logits (B, T, V), float: next-token scores at every position (the harness applies
  ``log_softmax``; V = ``task.vocab_size``), trained with the cross-entropy; or
- probabilities (B, T, V), float, for a model that declares them with the class (or instance)
  attribute ``iclgym_output = "probabilities"``: a prediction ``f`` of the next-token
  distribution, not necessarily normalised nor non-negative (e.g. the linear transformer of
  sparse contextual bigrams, ``f(X) = V X a_k``). It is trained with the squared loss against
  the one-hot target, ``1/2 ||f - e_y||^2`` summed over the V entries and averaged over the
  scored positions (Ren, Wang, Lee 2024, arXiv 2410.23438: the loss ``1/2 E||e_{x_o} - f(X)||^2``,
  whose gradients are batch means),
  and scored as the distribution ``clip(f, eps) / sum_v clip(f, eps)_v`` with ``eps =``
  :data:`PROBABILITY_FLOOR` = 1e-6 (entries below eps, negative ones
  included, count as eps before renormalising, so every token keeps a finite log-probability);
  or
- values (B, T, 1), float, allowed only for tasks with real-valued labels
  (``task.label_values is not None``, e.g. template regression): a "value model", trained with
  the mean squared error against ``task.label_values[targets]`` at the scored positions and
  scored by MSE and nearest-label accuracy.

``iclgym_output`` is ``"logits"`` when absent; any other value than ``"logits"`` or
``"probabilities"`` is refused by :func:`check_model`.

**Continuous features.** For a task whose batches carry features (``task.feature_dim`` = F > 0,
``batch.features`` (B, T, F) float32, e.g. the multi-concept prompts' word and label vectors),
the model is called ``forward(tokens, features)`` with the same outputs; position t's features
sit beside token t, so the causality rule below covers both. Every call site (trainer,
``evaluate``, probes, checks) goes through ``batch.inputs``
(:func:`iclgym.tasks.base.model_inputs`), so token-only tasks keep calling ``forward(tokens)``.
Factories of such tasks also get ``feature_dim=F``.

Only the positions of ``batch.loss_mask`` are trained and scored (by selection: the outputs at
the other positions are never read, so they may be anything, ``-inf`` included).

**Causality.** Where a task scores several positions per sequence (next-token tasks), the
output at position t may depend only on ``tokens[:, : t + 1]``. :func:`check_model` probes it
before training: changing the tokens from position s on must leave the outputs before s
unchanged, for up to 16 cut points s. Tasks that score one position per sequence (template
labels, read at the final QUERY token) may use bidirectional models, as the templates paper
does.

**Optional hooks** (discovered, never required):

- ``forward(tokens, return_attention=True) -> (logits, [(B, H, T, T) per layer])``: attention
  weights (rows are queries) for the previous-token and induction probes
  (:mod:`iclgym.harness.probes`);
- ``num_parameters() -> int`` (default: the number of parameter elements);
- ``decay_parameters() -> (decayed, not_decayed)``: the weight-decay split (default: the
  weights of ``nn.Linear`` layers are decayed, everything else, embeddings included, is not);
- ``training_loss(inputs, targets) -> Tensor``: the scalar the trainer minimises instead of
  the loss of ``forward(*inputs)`` at the scored positions (``inputs`` = ``batch.inputs``,
  ``targets`` the :class:`~iclgym.harness.train.Targets` of the label switch), for a model
  whose training examples are not its predictions (the faithful DPT: one query per
  sequence, its label at every prefix, :class:`baselines.dpt.DPTModel`); ``forward`` still
  defines what is scored. Not with ``--seeds`` (the vectorised copies train ``forward``'s
  loss: refused);
- ``check_task(task)``: raise ``ValueError`` when the model cannot train on ``task`` (run by
  :func:`check_training`, before any training, never when a trained model is scored; e.g. a
  DPT that shuffles an ordered context);
- ``input_embedding() -> Tensor | None``: the input table with the token axis first (V, ...);
  in the finite data regime the rows of tokens absent from the training set must come out of
  training bit-identical (Boix-Adserà et al. 2024's unseen-symbol test; decoupled weight decay
  would shrink them). ``None`` opts out
  (e.g. a tied unembedding, whose softmax trains every row).

**Building by name.** A model factory is any callable ``factory(vocab_size=V, seq_len=T,
**model_args) -> nn.Module`` (plus ``feature_dim=F`` where the task has features), given as
an object or as an import path ``"package.module:name"``.
:func:`build_model` seeds the init from the training seed (stream :data:`INIT_STREAM`) and
records the factory path and arguments on the module, so checkpoints can rebuild it
(:func:`load_model`, ``--predictor checkpoint:PATH``).

**Many seeds in one process** (``iclgym train --seeds 0-15``, :mod:`iclgym.harness.multiseed`)
run stacked copies of a model built by :func:`build_model` through ``torch.func.vmap``: its
``forward`` must then be vmappable (no in-place buffer updates such as batch-norm statistics,
no ``.item()`` or data-dependent Python branches); a dry run checks it before training.

Every function here raises ``ValueError`` naming the bad thing (import path, output shape,
position that reads the future, unreadable checkpoint) before any training starts.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iclgym.tasks.base import Batch, Task, model_inputs, stream_seed

INIT_STREAM = 5
"""Seed stream of a model's initial weights (:func:`iclgym.tasks.base.stream_seed`): streams
0-2 are the data splits, 3 the dropout stream, 4 the templates' fixed training set, 5 the init
and 6 the batch order of the finite data regime."""
CHECKPOINT_FORMAT = "iclgym-checkpoint-2"
SEEDS_CHECKPOINT_FORMAT = "iclgym-seeds-checkpoint-1"
"""The joint checkpoint of a multi-seed run (stacked copies, :mod:`iclgym.harness.multiseed`);
each seed's own checkpoint, in its ``seedS`` folder, has :data:`CHECKPOINT_FORMAT`."""
PROBE_SEQUENCES = 2
PROBE_CUTS = 16
PROBE_TOLERANCE = 1e-3
"""Largest change (nats) of a log-softmax prediction before the edited positions that the
causality probe allows for float32/64 outputs (batch-shape-dependent kernels move them by
~1e-6); a leak of the next token moves them by nats."""
PROBE_TOLERANCE_HALF = 5e-2
"""The same for 16-bit outputs (their rounding is ~1e-2 nats at logits of order 10)."""
FACTORY_ATTRIBUTE = "iclgym_factory"
OUTPUT_ATTRIBUTE = "iclgym_output"
"""The attribute by which a model declares what its (B, T, V) output is (see the contract)."""
OUTPUT_KINDS = ("logits", "probabilities")
"""The valid values of ``iclgym_output``; ``"values"`` is told by the (B, T, 1) shape."""
PROBABILITY_FLOOR = 1e-6
"""eps of a probability output read as a distribution: ``clip(f, eps) / sum`` (clip at 1e-6
and renormalise)."""


def check_device(device: object) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` for an unparsable name or a CUDA device
    on a machine without CUDA."""
    try:
        parsed = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is invalid: expected a torch device such as 'cpu' or 'cuda'"
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} is invalid: CUDA is not available on this machine")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r} is invalid: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return parsed


def import_object(path: str, what: str = "object") -> Any:
    """The object at import path ``"package.module:name"`` (``name`` may be dotted).

    Raises ``ValueError`` naming the path when it has no ``:``, the module cannot be imported
    or the name is missing.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} import path {path!r} is invalid: expected 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{what} import path {path!r} does not resolve: cannot import {module_name!r} ({err})"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"{what} import path {path!r} does not resolve: {module_name!r} has no "
                f"attribute {attr!r}"
            ) from None
    return obj


def object_path(obj: Callable) -> str | None:
    """The import path of a module-level callable, or None when it cannot be imported back
    (a lambda, a closure, a function defined in ``__main__``)."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        return None
    path = f"{module}:{name}"
    try:
        return path if import_object(path) is obj else None
    except ValueError:
        return None


def build_model(
    factory: str | Callable[..., nn.Module],
    task: Task,
    *,
    seed: int = 0,
    **model_args: Any,
) -> nn.Module:
    """A fresh model for ``task``: ``factory(vocab_size=V, seq_len=T, **model_args)``, with
    ``feature_dim=F`` added for a task with continuous features (``task.feature_dim`` > 0).

    The initial weights depend only on ``seed`` (stream :data:`INIT_STREAM`; the global torch
    random state is left untouched). The factory's import path and ``model_args`` are recorded
    on the module (attribute ``iclgym_factory``) so that a checkpoint can rebuild it. Raises
    ``ValueError`` for an import path that does not resolve, arguments the factory does not
    take, or a factory that does not return an ``nn.Module``.
    """
    path = factory if isinstance(factory, str) else object_path(factory)
    fn = import_object(factory, "model") if isinstance(factory, str) else factory
    if not callable(fn):
        raise ValueError(f"model factory {factory!r} is not callable")
    name = factory if isinstance(factory, str) else getattr(fn, "__qualname__", repr(fn))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, INIT_STREAM))
        try:
            model = fn(**shape_args(task), **model_args)
        except TypeError as err:
            try:
                signature = f"{getattr(fn, '__name__', name)}{inspect.signature(fn)}"
            except (TypeError, ValueError):
                signature = name
            raise ValueError(
                f"model {name!r} does not take the arguments {sorted(model_args)} "
                f"({err}); its signature is {signature}"
            ) from None
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model factory {name!r} returned {type(model).__name__}, expected a torch.nn.Module"
        )
    setattr(
        model,
        FACTORY_ATTRIBUTE,
        {
            "factory": path,
            "args": dict(model_args),
            **shape_args(task),
        },
    )
    return model


def shape_args(task: Task) -> dict[str, int]:
    """The task-shape arguments a model factory gets: ``vocab_size``, ``seq_len`` and, for a
    task with continuous features, ``feature_dim``."""
    args = {"vocab_size": task.vocab_size, "seq_len": task.seq_len}
    if task.feature_dim:
        args["feature_dim"] = task.feature_dim
    return args


# ------------------------------------------------------------------ optional hooks
def num_parameters(model: nn.Module) -> int:
    """``model.num_parameters()`` if it has one, else the number of parameter elements."""
    hook = getattr(model, "num_parameters", None)
    return int(hook()) if callable(hook) else sum(p.numel() for p in model.parameters())


def decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed): ``model.decay_parameters()`` if it has one, else the weights of
    ``nn.Linear`` layers against everything else."""
    hook = getattr(model, "decay_parameters", None)
    if callable(hook):
        decay, rest = hook()
        return list(decay), list(rest)
    linear = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    return list(linear.values()), [p for p in model.parameters() if id(p) not in linear]


def input_embedding(model: nn.Module) -> Tensor | None:
    """``model.input_embedding()`` (token axis first) if the model has the hook, else None."""
    hook = getattr(model, "input_embedding", None)
    return hook() if callable(hook) else None


def declared_output(model: nn.Module) -> str:
    """What the model's (B, T, V) output is: its ``iclgym_output`` attribute (``"logits"``
    when absent). ``ValueError`` naming the value for anything but :data:`OUTPUT_KINDS`."""
    kind = getattr(model, OUTPUT_ATTRIBUTE, "logits")
    if kind not in OUTPUT_KINDS:
        raise ValueError(
            f"{OUTPUT_ATTRIBUTE}={kind!r} of {type(model).__name__} is invalid: expected one of "
            f"{OUTPUT_KINDS} (see iclgym.harness.model)"
        )
    return kind


def exposes_attention(model: nn.Module) -> bool:
    """True when ``model.forward`` takes ``return_attention`` (the probes' hook)."""
    try:
        return "return_attention" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------- contract checks
@dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_model` found out about a model on a task."""

    output: str
    """``"logits"`` (B, T, V), ``"probabilities"`` (B, T, V, declared by ``iclgym_output``)
    or ``"values"`` (B, T, 1)."""
    causality_checked: bool
    """True when the task scores several positions and the causality probe ran."""
    attention: bool
    """The model exposes attention maps (``return_attention=True``)."""


def scores_several_positions(task: Task, device: torch.device | str = "cpu") -> bool:
    """True when some sequence of ``task`` has more than one scored position (then models
    must be causal)."""
    batch = task.sample(8, generator=task.generator(0, "validation", device), device=device)
    return bool((batch.loss_mask.sum(1) > 1).any())


def check_training(model: nn.Module, task: Task) -> None:
    """Run the model's optional ``check_task(task)`` hook (the contract above), which raises
    ``ValueError`` when the model cannot be trained on ``task``; the trainer calls it before
    any training, scoring never does."""
    check_task = getattr(model, "check_task", None)
    if check_task is not None:
        check_task(task)


@torch.no_grad()
def check_model(model: nn.Module, task: Task, device: torch.device | str = "cpu") -> ModelCheck:
    """Check ``model`` (already on ``device``) against the contract on ``task`` and return what
    it is; ``ValueError`` naming the problem otherwise: an ``iclgym_output`` other than
    ``"logits"`` or ``"probabilities"``, forward fails on a (2, T) batch, the output is not a
    tensor of shape (B, T, V) (or (B, T, 1) where the task has real labels and the model does
    not declare probabilities), or the model reads future tokens where the task scores several
    positions.

    Runs in eval mode under a forked random state, so it changes neither the model's mode nor
    any random stream. A model's ``check_task`` hook is a training check
    (:func:`check_training`), not run here: a trained model may be scored on any task its
    outputs fit.
    """
    gen = task.generator(0, "validation", device)
    batch = task.sample(PROBE_SEQUENCES, generator=gen, device=device)
    tokens, features = batch.tokens, batch.features
    B, T = tokens.shape
    V = task.vocab_size
    declared = declared_output(model)
    values_ok = declared == "logits" and getattr(task, "label_values", None) is not None
    expected = f"(B, T, V) = ({B}, {T}, {V}) {declared}" + (
        f" or (B, T, 1) = ({B}, {T}, 1) values (the task has real-valued labels)"
        if values_ok
        else ""
    )
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            try:
                out = model(*batch.inputs)
            except Exception as err:  # a user's module: report whatever it raised, in one line
                what = "token ids" if features is None else "token ids and (B, T, F) features"
                raise ValueError(
                    f"model forward failed on a ({B}, {T}) batch of {what} of this task: "
                    f"{type(err).__name__}: {_first_line(err)}"
                ) from None
            if not isinstance(out, Tensor):
                raise ValueError(
                    f"model output is a {type(out).__name__}, expected a tensor of shape {expected}"
                )
            if not out.is_floating_point():
                raise ValueError(
                    f"model output dtype {out.dtype} is invalid: expected a floating-point "
                    f"tensor of shape {expected}"
                )
            if out.shape == (B, T, V):
                kind = declared
            elif values_ok and out.shape == (B, T, 1):
                kind = "values"
            else:
                raise ValueError(
                    f"model output shape {tuple(out.shape)} is invalid: expected {expected}"
                )
            several = bool((batch.loss_mask.sum(1) > 1).any())
            if several:
                _causality_probe(model, tokens, features, out, V, kind)
    finally:
        model.train(was_training)
    return ModelCheck(kind, several, exposes_attention(model))


def _causality_probe(
    model: nn.Module,
    tokens: Tensor,
    features: Tensor | None,
    out: Tensor,
    vocab_size: int,
    kind: str = "logits",
) -> None:
    """Change every token (and every feature vector) from position s on, for up to
    :data:`PROBE_CUTS` cut points s, and require the predictions before s to stay the same:
    for logits their log-softmax (a constant offset moves no prediction, and must not widen
    the tolerance either: an offset of 1e6 once hid a 20-nat leak of the next token), to
    :data:`PROBE_TOLERANCE` nats (:data:`PROBE_TOLERANCE_HALF` for 16-bit outputs);
    probabilities and values as given, relative to their largest entry."""
    B, T = tokens.shape
    cuts = torch.linspace(1, T - 1, min(PROBE_CUTS, T - 1)).round().long().unique().tolist()
    edited = tokens.repeat(len(cuts), 1)
    positions = torch.arange(T, device=tokens.device)
    for i, s in enumerate(cuts):
        rows = slice(i * B, (i + 1) * B)
        later = positions >= s
        edited[rows, later] = (edited[rows, later] + 1) % vocab_size
    edited_features = None
    if features is not None:
        edited_features = features.repeat(len(cuts), 1, 1)
        for i, s in enumerate(cuts):
            edited_features[i * B : (i + 1) * B, s:] += 1.0
    edited_out = model(*model_inputs(edited, edited_features)).view(len(cuts), B, T, -1)
    if kind == "logits":
        half = out.dtype not in (torch.float32, torch.float64)
        tolerance = PROBE_TOLERANCE_HALF if half else PROBE_TOLERANCE
        out, edited_out = out.double().log_softmax(-1), edited_out.double().log_softmax(-1)
    else:
        tolerance = 1e-4 * max(1.0, out.abs().max().item())
    for i, s in enumerate(cuts):
        change = (edited_out[i, :, :s] - out[:, :s]).abs().amax(dim=(0, 2))  # (s,)
        if (change > tolerance).any():
            t = int((change > tolerance).nonzero()[0, 0])
            raise ValueError(
                f"model reads future tokens: its output at position {t} changed when only the "
                f"tokens from position {s} on changed; this task scores several positions per "
                "sequence, so position t may see only tokens[:, : t + 1] (use a causal model)"
            )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 160 else line[:157] + "..."


# --------------------------------------------------------------------- predictor
class ModelPredictor:
    """A module as a :class:`~iclgym.harness.predictors.Predictor` (:func:`output_scores`):
    log-softmax of its logits (B, T, V), ``log(clip(f, 1e-6) / sum)`` of a declared
    probability output (B, T, V), or its (B, T, 1) values unchanged for a value model; eval
    mode, no gradient, the module's mode restored afterwards. ``ValueError`` for an invalid
    ``iclgym_output``."""

    def __init__(self, model: nn.Module, name: str | None = None) -> None:
        self.model = model
        self.name = name or type(model).__name__
        self.output = declared_output(model)
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(*batch.to(self.device).inputs)
        finally:
            self.model.train(was_training)
        return output_scores(out, batch.vocab_size, self.output)


def output_scores(out: Tensor, vocab_size: int, output: str = "logits") -> Tensor:
    """A model output (..., V) as predictor scores (log-probabilities over the last axis):
    log-softmax of logits (``output="logits"``), or for a probability output ``f``
    (``output="probabilities"``) ``log(c / sum_v c_v)`` with ``c = clamp(f, min=eps)``, eps =
    :data:`PROBABILITY_FLOOR` (1e-6). A (..., 1) output on a task with V > 1
    is a value model's: returned unchanged. Half precision is computed in float32."""
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    if out.shape[-1] == 1 and vocab_size != 1:
        return out  # a value model: real predictions
    if output == "probabilities":
        clipped = out.clamp_min(PROBABILITY_FLOOR)
        return (clipped / clipped.sum(-1, keepdim=True)).log()
    return F.log_softmax(out, dim=-1)


# -------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path, fmt: str = CHECKPOINT_FORMAT) -> dict:
    """Read a checkpoint written by :func:`iclgym.harness.train` (a file or a run folder) of
    format ``fmt`` (one model; :data:`SEEDS_CHECKPOINT_FORMAT` for the joint state of a
    multi-seed run).

    Raises ``ValueError`` naming the path for a missing file, a file torch cannot read
    (garbage, text, empty), a readable file that is not an iclgym checkpoint, and a checkpoint
    of the other kind (a multi-seed folder where one model is expected names its seed folders).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds on foreign bytes
        raise ValueError(
            f"checkpoint {str(path)!r} is not a readable torch checkpoint "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from None
    found = state.get("format") if isinstance(state, dict) else None
    if found == SEEDS_CHECKPOINT_FORMAT and fmt == CHECKPOINT_FORMAT:
        folders = ", ".join(f"{path.parent / f'seed{s}'}" for s in state["seeds"][:3])
        raise ValueError(
            f"checkpoint {str(path)!r} holds the stacked copies of a multi-seed run (seeds "
            f"{state['seeds']}): use one seed's folder, e.g. {folders}"
        )
    if found == CHECKPOINT_FORMAT and fmt == SEEDS_CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {str(path)!r} is a single run's: resume it without seeds (--seed)"
        )
    if found != fmt:
        raise ValueError(
            f"checkpoint {str(path)!r} is not an iclgym training checkpoint "
            f"(format {fmt!r}, written by `iclgym train`)"
        )
    return state


def load_model(path: str | Path, task: Task, device: torch.device | str = "cpu") -> nn.Module:
    """The trained module of a checkpoint, rebuilt from its recorded factory and arguments, with
    its weights, in eval mode on ``device``, checked against ``task`` (:func:`check_model`).

    Raises ``ValueError`` when the checkpoint is unreadable, was saved from a module built
    without an importable factory, or its vocabulary or output does not fit ``task``.
    """
    state = load_checkpoint(path)
    info = state.get("model_factory")
    if not info or not info.get("factory"):
        raise ValueError(
            f"checkpoint {str(path)!r} holds weights of a module built without an importable "
            "factory: rebuild the module and call load_state_dict(state['model'])"
        )
    if info.get("feature_dim", 0) != task.feature_dim:
        raise ValueError(
            f"checkpoint {str(path)!r} was trained with feature_dim={info.get('feature_dim', 0)},"
            f" but the task has feature_dim={task.feature_dim}"
        )
    if info["vocab_size"] != task.vocab_size:
        raise ValueError(
            f"checkpoint {str(path)!r} was trained with vocab_size={info['vocab_size']}, but "
            f"the task has vocab_size={task.vocab_size}"
        )
    fn = import_object(info["factory"], "model")
    shape = {k: info[k] for k in ("vocab_size", "seq_len", "feature_dim") if k in info}
    model = fn(**shape, **info["args"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {str(path)!r} weights do not fit {info['factory']}: {_first_line(err)}"
        ) from None
    setattr(model, FACTORY_ATTRIBUTE, dict(info))
    model.to(check_device(device)).eval()
    try:
        check_model(model, task, device)
    except ValueError as err:
        raise ValueError(f"checkpoint {str(path)!r} cannot score this task: {err}") from None
    return model


def load_predictor(
    path: str | Path, task: Task, device: torch.device | str = "cpu"
) -> ModelPredictor:
    """:func:`load_model` as a predictor named ``checkpoint:PATH``."""
    return ModelPredictor(load_model(path, task, device), name=f"checkpoint:{path}")


def factory_info(model: nn.Module) -> Mapping[str, Any] | None:
    """The factory record :func:`build_model` put on ``model`` (None for other modules)."""
    return getattr(model, FACTORY_ATTRIBUTE, None)
