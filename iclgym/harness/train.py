"""Train a model on any registered task and watch its in-context-learning phases.

``train(model, task, config)`` runs the reference recipe of Edelman et al. 2024
(``shared/specs/markov-chain.md`` section 5): a fresh batch from the task's train seed stream
every step, AdamW (lr 5e-4, betas (0.9, 0.95), weight decay 0.1 on Linear weights only, constant
lr, no clipping), next-token cross-entropy on every scored position. Every ``eval_every`` steps
it scores the model in eval mode on a fixed held-out set (validation split): loss, per-token
and last-token KL to the true next-token law, KL(strategy || model) at the last position for
every reference strategy, the nearest strategy (the phase label) and the attention probes.
Each evaluation is one line of ``metrics.jsonl`` in the run folder; the run ends with the
phase report (:mod:`iclgym.harness.phases`), ``summary.json`` and ``phases.png``.

Checkpoints (``checkpoint.pt``: model, optimizer, both random-number streams and the step)
are written every ``checkpoint_every`` steps, at the end and on Ctrl-C; ``resume=True`` continues
a run bit for bit as if it had never stopped. The first Ctrl-C finishes the current step, saves
and then raises ``KeyboardInterrupt``; a second one interrupts at once.

:class:`TrainConfig` doubles as the command line: :func:`add_train_arguments` turns its
fields, and the model's, into ``--flags`` and :func:`run_from_args` runs them
(``python -m iclgym.harness.train ICL-MarkovChain-v0 --steps 2000``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import resource
import signal
import threading
import time
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from baselines.transformer import Transformer, TransformerConfig, load_checkpoint
from iclgym.harness.metrics import cross_entropy, kl_divergence
from iclgym.harness.phases import phase_report
from iclgym.harness.plots import plot_run
from iclgym.harness.probes import induction_score, previous_token_score
from iclgym.tasks.base import SPLITS, Task, stream_seed

CHECKPOINT, LOG, SUMMARY, PLOT = "checkpoint.pt", "metrics.jsonl", "summary.json", "phases.png"
# Fields that may change when resuming: they do not alter the weights or the logged curve.
RESUMABLE_CHANGES = ("steps", "resume", "progress", "plot", "run_dir", "checkpoint_every")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every field is also a ``--flag`` of ``iclgym train``.

    Attributes:
        steps: optimisation steps (each sees batch_size fresh sequences).
        batch_size: sequences per step.
        lr: AdamW learning rate (constant, no warm-up).
        betas: AdamW betas.
        weight_decay: AdamW weight decay on Linear weights (embeddings, LayerNorm and
            positional tables are not decayed).
        seed: seeds the model init, the train data stream and dropout.
        eval_every: steps between evaluations on the held-out set.
        eval_sequences: size of the fixed held-out set (validation split).
        eval_batch_size: sequences per evaluation forward pass; the probes use the first batch.
        eval_seed: seed of the held-out set (the same set for every training seed).
        checkpoint_every: steps between checkpoints (also written at the end and on Ctrl-C).
        run_dir: run folder for the checkpoint, log, summary and plot
            (default runs/ENV_ID-seedSEED).
        resume: continue the run in run_dir from its checkpoint.
        progress: show a progress bar.
        plot: write the phase diagram at the end of the run.
        device: torch device to train on.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 25
    eval_sequences: int = 1024
    eval_batch_size: int = 256
    eval_seed: int = 0
    checkpoint_every: int = 250
    run_dir: str = ""
    resume: bool = False
    progress: bool = True
    plot: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in (
            "steps",
            "batch_size",
            "eval_every",
            "eval_sequences",
            "eval_batch_size",
            "checkpoint_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
        for name in ("seed", "eval_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} is invalid: expected a finite float > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas!r} is invalid: expected two floats in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay!r} is invalid: expected >= 0")


# ------------------------------------------------------------------------- evaluation
class HeldOut:
    """The fixed evaluation set with everything about it that does not depend on the model:
    true next-token laws, the reference strategies' last-token predictions and their KL to the
    truth (the horizontal reference lines of the phase diagram)."""

    def __init__(self, task: Task, config: TrainConfig) -> None:
        gen = task.generator(config.eval_seed, "validation", config.device)
        total, size = config.eval_sequences, config.eval_batch_size
        sizes = [min(size, total - done) for done in range(0, total, size)]
        self.batches = [task.sample(b, generator=gen, device=config.device) for b in sizes]
        self.true = [b.true_probs for b in self.batches]
        self.true_last = torch.cat([p[:, -1] for p in self.true])
        # ``true`` reads the latent parameters: a privileged oracle, not a phase a model can be in.
        strategies = {n: s for n, s in task.strategies.items() if n != "true"}
        self.strategy_last = {
            name: torch.cat([s(b)[:, -1] for b in self.batches]).exp()
            for name, s in strategies.items()
        }
        self.references = {
            name: kl_divergence(self.true_last, p.clamp_min(1e-30).log()).mean().item()
            for name, p in self.strategy_last.items()
        }

    @torch.no_grad()
    def evaluate(self, model: Transformer) -> dict[str, Any]:
        """Metrics of ``model`` in eval mode; the probes read the first batch's attention."""
        was_training = model.training
        model.eval()
        ce = kl = count = 0.0
        last = []
        for i, batch in enumerate(self.batches):
            if i == 0:
                logits, attention = model(batch.tokens, return_attention=True)
            else:
                logits = model(batch.tokens)
            log_q = F.log_softmax(logits.float(), dim=-1)
            mask = batch.loss_mask
            ce += cross_entropy(log_q, batch.targets)[mask].sum().item()
            kl += kl_divergence(self.true[i], log_q)[mask].sum().item()
            count += mask.sum().item()
            last.append(log_q[:, -1])
        model.train(was_training)
        log_q_last = torch.cat(last)
        kl_last = kl_divergence(self.true_last, log_q_last)
        strategy_kl = {
            name: kl_divergence(p, log_q_last).mean().item()
            for name, p in self.strategy_last.items()
        }
        record = {
            "loss": ce / count,
            "kl": kl / count,
            "kl_last": kl_last.mean().item(),
            "kl_last_se": kl_last.std().item() / math.sqrt(kl_last.numel()),
            "strategy_kl_last": strategy_kl,
            "nearest": min(strategy_kl, key=strategy_kl.__getitem__),
            "prev_token_score": previous_token_score(attention[0]),
        }
        if len(attention) > 1:
            record["induction_score"] = induction_score(attention[1], self.batches[0].tokens)
        return record


# ------------------------------------------------------------------------ checkpoints
def _normalise(obj: Any) -> Any:
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(obj))


def _describe(task: Task, model: Transformer, config: TrainConfig, env_id: str | None) -> dict:
    """What a checkpoint must match to be resumed: task, model and trajectory settings."""
    trajectory = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return _normalise(
        {
            "task": {"env_id": env_id, "family": task.name, "spec": task.spec.to_dict()},
            "model_config": asdict(model.config),
            "train_config": trajectory,
        }
    )


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for section in ("task", "model_config", "train_config"):
        a, b = old[section], new[section]
        for key in sorted(set(a) | set(b)):
            if key != "env_id" and a.get(key) != b.get(key):
                out.append(f"{section}.{key}: checkpoint {a.get(key)!r} != now {b.get(key)!r}")
    return out


def _save(path: Path, state: dict) -> None:
    """Write atomically, so an interrupted save never leaves a broken checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_log(path: Path, records: list[dict], mode: str = "a") -> None:
    with path.open(mode) as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


class _DeferredInterrupt:
    """While active, the first SIGINT only sets ``requested`` (the loop stops at the next step
    boundary); a second one raises ``KeyboardInterrupt`` at once. Only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_model(model: Transformer, task: Task) -> None:
    if not isinstance(getattr(model, "config", None), TransformerConfig):
        raise ValueError(
            f"train() needs a baselines.transformer.Transformer, got {type(model).__name__}"
        )
    if model.config.vocab_size != task.vocab_size:
        raise ValueError(
            f"model vocab_size={model.config.vocab_size} does not match the task's "
            f"vocab_size={task.vocab_size}"
        )
    if model.config.positional == "learned" and task.seq_len > model.config.max_len:
        raise ValueError(
            f"the task's seq_len={task.seq_len} exceeds the model's learned positions "
            f"(max_len={model.config.max_len})"
        )


# --------------------------------------------------------------------------- training
def train(
    model: Transformer, task: Task, config: TrainConfig, *, env_id: str | None = None
) -> dict[str, Any]:
    """Train ``model`` on ``task`` and return the run summary (also in ``summary.json``).

    A fresh run seeds the global torch random state (the dropout stream) from ``config.seed``;
    a resumed one restores it. Raises ``ValueError`` before any training for a model that does
    not fit the task, a fresh run whose folder already holds a checkpoint, or a resume whose
    checkpoint is missing or was made with a different task, model or training configuration.
    """
    start = time.perf_counter()
    _check_model(model, task)
    run_dir = Path(config.run_dir or f"runs/{env_id or task.name}-seed{config.seed}")
    ckpt_path, log_path = run_dir / CHECKPOINT, run_dir / LOG
    meta = _describe(task, model, config, env_id)
    model.to(config.device)
    decay, no_decay = model.decay_parameters()
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=config.betas,
        fused=True,
    )
    data_gen = task.generator(config.seed, "train", config.device)
    on_cuda = torch.device(config.device).type == "cuda"  # dropout then draws from the CUDA stream
    if config.resume:
        state = load_checkpoint(ckpt_path)
        differences = _differences(state["meta"], meta)
        if differences:
            raise ValueError(
                f"cannot resume {str(run_dir)!r} with a different configuration:\n  "
                + "\n  ".join(differences)
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], config.device)
        step = state["step"]
        # Drop log lines written after the checkpoint (a hard kill between the two).
        kept = [r for r in _read_log(log_path) if r["step"] <= step]
        _write_log(log_path, [*kept, {"type": "resume", "step": step}], mode="w")
        held_out = HeldOut(task, config)
        records = [r for r in kept if r["type"] == "eval"]
    else:
        if ckpt_path.exists():
            raise ValueError(
                f"{str(ckpt_path)!r} exists: pass resume=True (--resume) to continue that run, "
                "or choose another run_dir"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(
            stream_seed(config.seed, len(SPLITS))
        )  # the dropout stream (CPU and CUDA)
        step = 0
        held_out = HeldOut(task, config)
        header = {"type": "start", "step": 0, "num_parameters": model.num_parameters()}
        _write_log(log_path, [{**header, "references": held_out.references, **meta}], mode="w")
        records = []

    def checkpoint() -> None:
        state = {
            "meta": meta,
            "model_config": meta["model_config"],
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "data_rng": data_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(config.device) if on_cuda else None,
        }
        _save(ckpt_path, state)

    def evaluate() -> None:
        rec = {
            "type": "eval",
            "step": step,
            "sequences": step * config.batch_size,
            "train_loss": sum(losses) / len(losses) if losses else None,
            **held_out.evaluate(model),
            "elapsed_s": time.perf_counter() - start,
        }
        losses.clear()
        records.append(rec)
        _write_log(log_path, [rec])
        bar.set_postfix(kl_last=f"{rec['kl_last']:.4f}", phase=rec["nearest"])

    losses: list[float] = []  # training losses since the last evaluation
    first_step = step
    model.train()
    with (
        tqdm(total=config.steps, initial=step, disable=not config.progress, unit="step") as bar,
        _DeferredInterrupt() as interrupt,
    ):
        if not records:
            evaluate()
        while step < config.steps and not interrupt.requested:
            batch = task.sample(config.batch_size, generator=data_gen, device=config.device)
            logits = model(batch.tokens)
            per_token = F.cross_entropy(
                logits.flatten(0, 1), batch.targets.flatten(), reduction="none"
            )
            mask = batch.loss_mask.flatten().to(per_token.dtype)
            loss = (per_token * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            bar.update()
            if step % config.eval_every == 0 or step == config.steps:
                evaluate()
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint()
        if interrupt.requested:
            if records[-1]["step"] != step:
                evaluate()
            checkpoint()
    wall = time.perf_counter() - start
    summary = {
        "type": "summary",
        "step": step,
        "sequences": step * config.batch_size,
        "interrupted": interrupt.requested,
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt_path),
        "num_parameters": model.num_parameters(),
        "final": records[-1],
        "references": held_out.references,
        **phase_report(records, order=list(held_out.references)),
        "wall_s": wall,
        "steps_per_s": (step - first_step) / wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if config.plot:
        title = (
            f"{env_id or task.name}: vocabulary {task.vocab_size}, T={task.seq_len}, "
            f"seed {config.seed}"
        )
        summary["plot"] = str(plot_run(records, held_out.references, run_dir / PLOT, title=title))
    _write_log(log_path, [summary])
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    if interrupt.requested:
        raise KeyboardInterrupt(
            f"interrupted at step {step}; checkpoint saved to {ckpt_path}, continue with --resume"
        )
    return summary


# ------------------------------------------------------------------------ command line
def _attribute_docs(cls: type) -> dict[str, str]:
    """Field help texts from the ``Attributes:`` section of a dataclass docstring."""
    docs: dict[str, str] = {}
    doc = inspect.getdoc(cls) or ""
    section = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    name = None
    for line in section.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            name, docs[match[1]] = match[1], match[2]
        elif name and line.startswith("        "):
            docs[name] += " " + line.strip()
    return docs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip=()) -> None:
    """One ``--flag`` per field of dataclass ``cls`` (type, default and help from the class):
    bools become ``--x/--no-x``, tuples take several values, ``X | None`` accepts an X."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, default = hints[f.name], f.default
        assert default is not MISSING, f"{cls.__name__}.{f.name} needs a default for the CLI"
        kwargs: dict[str, Any] = {
            "default": default,
            "help": f"{docs.get(f.name, '')} (default: {default})",
        }
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            args = typing.get_args(kind)
            kwargs.update(type=args[0], nargs="+" if args[-1] is Ellipsis else len(args))
        else:
            kwargs["type"] = kind
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def dataclass_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values of the flags that :func:`add_dataclass_arguments` added for ``cls``."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``iclgym train``: the env id (positional), ``--model``, ``--set KEY=VALUE``
    spec overrides (as in ``iclgym eval``), the model's settings and :class:`TrainConfig`."""
    parser.add_argument("env_id", help="registered env id, e.g. ICL-MarkovChain-v0")
    parser.add_argument(
        "--model",
        default="transformer",
        choices=["transformer"],
        help="model to train: baselines.transformer (default: transformer)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task spec override, repeatable (e.g. --set num_states=2)",
    )
    add_dataclass_arguments(parser, TransformerConfig, skip=("vocab_size", "max_len"))
    add_dataclass_arguments(parser, TrainConfig)


def build_model(task: Task, seed: int, **settings: Any) -> Transformer:
    """A freshly initialised transformer sized for ``task``; the init depends only on ``seed``
    (the global torch random state is left untouched)."""
    config = TransformerConfig(vocab_size=task.vocab_size, max_len=task.seq_len, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(config)


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``iclgym train`` from parsed :func:`add_train_arguments` flags; print the summary."""
    from iclgym.registry import make_task, parse_overrides

    task = make_task(args.env_id, **parse_overrides(args.overrides))
    config = TrainConfig(**dataclass_values(TrainConfig, args))
    model = build_model(task, config.seed, **dataclass_values(TransformerConfig, args))
    summary = train(model, task, config, env_id=args.env_id)
    final = summary["final"]
    print(
        f"{args.env_id}: {summary['step']} steps in {summary['wall_s']:.1f} s, "
        f"{summary['num_parameters']} parameters\n"
        f"  final KL_last {final['kl_last']:.4f} (loss {final['loss']:.4f}), "
        f"nearest strategy {final['nearest']}; references "
        + ", ".join(f"{k} {v:.4f}" for k, v in summary["references"].items())
        + f"\n  switch step {summary['switch_step']}; phases "
        + ", ".join(f"{p['label']} {p['start_step']}-{p['end_step']}" for p in summary["phases"])
        + f"\n  run folder {summary['run_dir']}"
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m iclgym.harness.train ENV_ID [flags]``."""
    parser = argparse.ArgumentParser(prog="iclgym train", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
