"""Env ids -> task families and default spec kwargs; registration with Gymnasium.

This module imports neither torch nor the envs, so ``import iclgym`` stays cheap: Gymnasium
gets string entry points and loads ``iclgym.envs`` on the first ``gym.make``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import gymnasium as gym

from iclgym.validation import is_int, parse_value

ENTRY_POINT = "iclgym.envs:ICLEnv"
VECTOR_ENTRY_POINT = "iclgym.envs:ICLVectorEnv"


@dataclass(frozen=True)
class EnvEntry:
    """One registered env id: its task family, default spec and allowed overrides."""

    env_id: str
    family: str
    summary: str
    defaults: Mapping[str, Any]
    check: Callable[[Mapping[str, Any]], None] = field(repr=False)
    """Raises ValueError when merged spec kwargs are outside what this id means."""

    def spec_kwargs(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**self.defaults, **overrides}
        self.check(merged)
        return merged


def _first_order(kwargs: Mapping[str, Any]) -> None:
    if kwargs.get("order", 2) != 2:
        raise ValueError(
            f"order={kwargs['order']!r} is invalid for ICL-MarkovChain-v0: it is the first-order "
            "chain (order=2); use ICL-NGram-v0 for order >= 3"
        )


def _higher_order(kwargs: Mapping[str, Any]) -> None:
    order = kwargs.get("order")
    if not is_int(order) or order < 3:
        raise ValueError(
            f"order={order!r} is invalid for ICL-NGram-v0: expected an int >= 3 "
            "(use ICL-MarkovChain-v0 for order=2)"
        )


def _mapping(mapping: str, env_id: str) -> Callable[[Mapping[str, Any]], None]:
    def check(kwargs: Mapping[str, Any]) -> None:
        if kwargs.get("mapping") != mapping:
            raise ValueError(
                f"mapping={kwargs.get('mapping')!r} is invalid for {env_id}: it is the "
                f"mapping={mapping!r} variant (use ICL-MultiConcept-v0 with mapping=... instead)"
            )

    return check


def _any(kwargs: Mapping[str, Any]) -> None:
    """Every spec is allowed (the spec validates itself)."""


def _preset(preset: str, env_id: str) -> Callable[[Mapping[str, Any]], None]:
    def check(kwargs: Mapping[str, Any]) -> None:
        if kwargs.get("preset") != preset:
            raise ValueError(
                f"preset={kwargs.get('preset')!r} is invalid for {env_id}: it is the "
                f"{preset!r} task; use ICL-SymbolTemplate-v0 for other template sets"
            )

    return check


_TEMPLATE_DEFAULTS = {
    "train_alphabet_size": 512,
    "val_alphabet_size": 256,
    "test_alphabet_size": 1024,
}

ENVS: Mapping[str, EnvEntry] = MappingProxyType(
    {
        e.env_id: e
        for e in (
            EnvEntry(
                "ICL-MarkovChain-v0",
                "markov_chain",
                "In-context first-order Markov chains, Dirichlet rows (Edelman et al. 2024)",
                MappingProxyType({"num_states": 3, "order": 2, "seq_len": 100, "alpha": 1.0}),
                _first_order,
            ),
            EnvEntry(
                "ICL-NGram-v0",
                "markov_chain",
                "In-context order-n chains (n-grams, n >= 3), Dirichlet rows",
                MappingProxyType({"num_states": 3, "order": 3, "seq_len": 100, "alpha": 1.0}),
                _higher_order,
            ),
            EnvEntry(
                "ICL-SymbolTemplate-v0",
                "symbol_template",
                "Template tasks over abstract symbols, unseen-symbol test split (Boix-Adsera 2024)",
                MappingProxyType(
                    {"preset": "aba_abb", "label_type": "regression", **_TEMPLATE_DEFAULTS}
                ),
                _any,
            ),
            EnvEntry(
                "ICL-SameDifferent-v0",
                "symbol_template",
                "Same/different: AA -> +1, AB -> -1 over abstract symbols",
                MappingProxyType(
                    {"preset": "same_different", "label_type": "regression", **_TEMPLATE_DEFAULTS}
                ),
                _preset("same_different", "ICL-SameDifferent-v0"),
            ),
            EnvEntry(
                "ICL-SymbolCopy-v0",
                "symbol_template",
                "Copy the first of two abstract symbols (next-token label), unseen-symbol test",
                MappingProxyType(
                    {"preset": "copy", "label_type": "multiclass", **_TEMPLATE_DEFAULTS}
                ),
                _preset("copy", "ICL-SymbolCopy-v0"),
            ),
            EnvEntry(
                "ICL-SparseContextualBigram-v0",
                "sparse_contextual_bigram",
                "Sparse contextual bigrams: x_o ~ P[:, x_s], s from the query's sparse attention "
                "(Ren, Wang, Lee 2024)",
                MappingProxyType(
                    {"vocab_size": 8, "seq_len": 128, "n_support": 2, "p_family": "perm_mixture"}
                ),
                _any,
            ),
            EnvEntry(
                "ICL-PriorityGraph-v0",
                "priority_graph",
                "Token-priority graphs: hard retrieval of the top-priority context tokens, then "
                "soft composition (Li et al. 2024); planted mode, paper mode by kwarg",
                MappingProxyType({"mode": "planted", "num_tokens": 8, "context_len": 6}),
                _any,
            ),
            EnvEntry(
                "ICL-MultiConcept-v0",
                "multi_concept",
                "Multi-concept sparse-coding prompts: continuous word and label vectors, predict "
                "the polysemous query's +-1 label (after Bu et al. 2024); fixed mapping",
                MappingProxyType({"mapping": "fixed"}),
                _any,
            ),
            EnvEntry(
                "ICL-MultiConcept-Random-v0",
                "multi_concept",
                "Multi-concept prompts with a random label mapping per prompt: the sign "
                "convention must be read from the demonstrations (true ICL, after Bu et al. 2024)",
                MappingProxyType({"mapping": "random"}),
                _mapping("random", "ICL-MultiConcept-Random-v0"),
            ),
        )
    }
)


def register_iclgym_envs() -> None:
    """Register every iclgym id with Gymnasium; calling it again does nothing."""
    for entry in ENVS.values():
        if entry.env_id in gym.registry:
            continue
        gym.register(
            id=entry.env_id,
            entry_point=ENTRY_POINT,
            vector_entry_point=VECTOR_ENTRY_POINT,
            kwargs={"env_id": entry.env_id, **entry.defaults},
        )


def get_entry(env_id: str) -> EnvEntry:
    """The registry entry of ``env_id`` (the ``iclgym:`` module prefix is accepted)."""
    key = env_id.split(":", 1)[1] if env_id.startswith("iclgym:") else env_id
    try:
        return ENVS[key]
    except KeyError:
        raise ValueError(
            f"unknown iclgym env id {env_id!r}; `iclgym list` or iclgym.list_envs() "
            f"shows the ids: {', '.join(ENVS)}"
        ) from None


def spec_keys(env_id: str) -> tuple[str, ...]:
    """The spec keys ``env_id`` accepts as overrides (the fields of its family's spec)."""
    import typing
    from dataclasses import fields

    from iclgym.tasks import TASK_FAMILIES

    task_class = TASK_FAMILIES[get_entry(env_id).family]
    return tuple(f.name for f in fields(typing.get_type_hints(task_class)["spec"]))


def check_overrides(
    env_id: str, overrides: Iterable[str], also: Iterable[str] = (), note: str = ""
) -> None:
    """Raise ``ValueError`` for the first key of ``overrides`` that is not a spec key of
    ``env_id``, listing the spec keys (and ``also``, e.g. an env's own arguments, then
    ``note``)."""
    keys = spec_keys(env_id)
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        others = list(also)
        raise ValueError(
            f"spec key {unknown[0]!r} is invalid for {get_entry(env_id).env_id}: expected one "
            f"of {', '.join(keys)}"
            + (f"; or an env argument: {', '.join(others)}" if others else "")
            + note
        )


def make_task(env_id: str, **overrides: Any):
    """The task behind ``env_id`` with spec overrides (e.g. ``num_states=5``).

    Raises ``ValueError`` for an unknown id, an override key the spec does not have (listing
    the valid keys, :func:`check_overrides`), or a value the spec or the id refuses."""
    from iclgym.tasks import make_family_task

    check_overrides(env_id, overrides)
    entry = get_entry(env_id)
    return make_family_task(entry.family, **entry.spec_kwargs(overrides))


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Spec overrides from ``KEY=VALUE`` strings (``--set`` on the command line), each value
    read by :func:`iclgym.validation.parse_value`."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (e.g. num_states=2), got {item!r}")
        out[key] = parse_value(raw)
    return out


def list_envs() -> list[str]:
    """All iclgym env ids."""
    return list(ENVS)


def describe(env_id: str, **spec_kwargs: Any) -> str:
    """A human-readable description of ``env_id`` with the spec overrides ``spec_kwargs``:
    summary, spec, vocabulary, strategies and the named splits (some exist only for some
    specs, e.g. ``ood_heldout_concepts`` with ``heldout_concepts > 0``). Raises ``ValueError``
    for an unknown id or invalid overrides."""
    entry = get_entry(env_id)
    task = make_task(env_id, **spec_kwargs)
    lines = [
        f"{entry.env_id}: {entry.summary}",
        f"  family:      {entry.family}",
        f"  spec:        {task.spec}",
        f"  vocabulary:  {task.vocab_size} tokens, "
        f"{task.seq_len - task.first_scored_position} scored positions",
        f"  strategies:  {', '.join(task.strategies)}",
        *(
            [f"  splits:      {', '.join(('train', 'validation', 'test', *task.named_splits))}"]
            if task.named_splits
            else []
        ),
        f"  docs:        docs/envs/{entry.env_id}.md",
    ]
    return "\n".join(lines)
