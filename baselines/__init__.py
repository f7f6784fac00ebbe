"""Baseline models and predictors scored by the iclgym harness, and the names the command line
resolves to them (the harness itself imports no baseline).

``MODELS`` maps ``iclgym train --model NAME`` to a factory import path, default model
arguments and the argument a width sweep sets (``None``: the model has no width axis).
``PREDICTOR_KINDS`` maps ``iclgym eval --predictor KIND:ARGS`` prefixes to their parsers.
Both are plain data, so importing this package imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple


class ModelEntry(NamedTuple):
    """A named model: factory import path, default arguments, and the width argument."""

    factory: str
    args: Mapping[str, object]
    width_arg: str | None


_TRANSFORMER = "baselines.transformer:make_model"
MODELS: Mapping[str, ModelEntry] = MappingProxyType(
    {
        "transformer": ModelEntry(_TRANSFORMER, {}, "d_model"),
        "transformer+kq": ModelEntry(_TRANSFORMER, {"kq_identity": True}, "d_model"),
        "transformer+vo": ModelEntry(_TRANSFORMER, {"vo_identity": True}, "d_model"),
        "transformer+kq+vo": ModelEntry(
            _TRANSFORMER, {"kq_identity": True, "vo_identity": True}, "d_model"
        ),
        "mlp": ModelEntry("baselines.mlp:make_model", {}, "width"),
        "lstm": ModelEntry("baselines.lstm:make_model", {}, "hidden_size"),
        "linear_transformer": ModelEntry("baselines.linear_transformer:make_model", {}, None),
        "softmax_transformer": ModelEntry(
            "baselines.linear_transformer:make_model", {"softmax": True}, None
        ),
        "priority_attention": ModelEntry("baselines.priority_attention:make_model", {}, None),
        "concept_attention": ModelEntry("baselines.concept_attention:make_model", {}, "width"),
        "dpt": ModelEntry("baselines.dpt:make_model", {}, "d_model"),
        "dpt_faithful": ModelEntry("baselines.dpt:make_faithful_model", {}, "d_model"),
        "dpt_bandit": ModelEntry("baselines.dpt:make_bandit_model", {}, "d_model"),
    }
)
"""``transformer+kq`` / ``+vo``: the identity scalars of Boix-Adserà et al. 2024.
``linear_transformer`` / ``softmax_transformer``: the one-layer (V, A) models of sparse
contextual bigrams (Ren, Wang, Lee 2024), linear or softmax attention over the context.
``priority_attention``: the one-layer attention of token-priority graphs (Li et al. 2024), one
combined W over fixed embeddings, ``iden`` or ``gen`` head.
``concept_attention``: the reference transformer of multi-concept prompts (after Bu et al. 2024),
one softmax attention read at the query and a ReLU MLP of width m with fixed output signs; it
needs a task with continuous features.
``dpt``: the streaming decision-pretrained transformer (Lee et al. 2023) over transitions
(s_{t-1} -> x_t), trained with the label switch ``--labels soft|hard|sampled``.
``dpt_faithful``: the original's input, the query first, one query per sequence and its label
at every prefix (``--model-arg shuffle=true`` permutes Markov-chain contexts).
``dpt_bandit``: the streaming DPT trained on bandit feedback (random behaviour policies hide
every mispredicted token), for ``iclgym regret`` under :class:`iclgym.wrappers.BanditFeedback`."""

PREDICTOR_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "ngram": "baselines.ngram:from_text",
        "dpt": "baselines.dpt:from_text",
        "sb3": "baselines.sb3_agents:from_text",
    }
)
"""``ngram:ORDER[:ALPHA]``: the in-context n-gram (order 0 = uniform). ``dpt:RUN``: a streaming
DPT run folder of ``iclgym train --model dpt`` (its checkpoint). ``sb3:RUN``: an SB3 agent
folder of ``python -m baselines.sb3_agents`` (:func:`baselines.sb3_agents.train_agent`)."""

AGENT_KINDS: Mapping[str, str] = MappingProxyType(
    {"dpt": "baselines.dpt:agent_from_text", "sb3": "baselines.sb3_agents:agent_from_text"}
)
"""``iclgym regret --agent KIND:ARGS`` prefixes, agents acting in the env's step loop under
bandit feedback: ``dpt:RUN[:greedy|:sample]``, a bandit DPT run folder
(:class:`baselines.dpt.DPTAgent`); ``sb3:RUN[:greedy|:sample]``, a PPO or RecurrentPPO folder
trained with ``--feedback bandit`` (:class:`baselines.sb3_agents.SB3BanditAgent`), acting on
the observations it was trained on."""
