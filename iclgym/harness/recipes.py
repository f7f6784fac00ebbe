"""Paper protocols as data: named presets of the trainer's configuration.

A :class:`Recipe` is an env id with spec overrides, a model (a name the command line resolves,
or an import path) with its arguments, and a :class:`~iclgym.harness.train.TrainConfig`. It is
a value, not code: every recipe trains through the one :func:`~iclgym.harness.train.train`, and
``iclgym train --recipe NAME`` fills the defaults that flags then override. Each docstring cites
where its numbers come from. ``docs/recipes.md`` lists them with their commands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from iclgym.harness.train import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """A named training protocol."""

    name: str
    env_id: str
    """Registered env id the protocol trains on."""
    spec: Mapping[str, Any]
    """Spec overrides (``--set``)."""
    model: str
    """Model name (``transformer``, ``mlp``, ``lstm``, ``transformer+kq``, ...) or import path."""
    model_args: Mapping[str, Any]
    """Keyword arguments of the recipe's model factory (``--model-arg``)."""
    train: TrainConfig
    common_args: Mapping[str, Any] = field(default_factory=dict)
    """Model arguments the protocol needs whatever the model (e.g. ``n_outputs=1``, a value
    head for real labels): given to the recipe's model and to any other model whose factory
    names them in its signature."""
    source: str = field(default="", repr=False)
    """Where the numbers come from."""


EDELMAN2024 = Recipe(
    name="edelman2024",
    env_id="ICL-MarkovChain-v0",
    spec={"num_states": 3, "seq_len": 100, "alpha": 1.0, "init": "stationary"},
    model="transformer",
    model_args={
        "n_layers": 2,
        "n_heads": 1,
        "d_model": 16,
        "mlp": False,
        "positional": "relative",
        "dropout": 0.1,
    },
    train=TrainConfig(
        data="stream",
        steps=2000,
        batch_size=64,
        optimizer="adamw",
        lr=5e-4,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        schedule="constant",
        eval_every=25,
        eval_sequences=1024,
        eval_batch_size=256,
        eval_splits=("validation",),
    ),
    source=(
        "Edelman et al. 2024 (arXiv 2402.11004), the statistical induction head, with the "
        "official code's model and optimiser: k=3, T=100, Dirichlet(1) rows, stationary "
        "start; 2-layer attention-only "
        "transformer, width 16, 1 head, Shaw relative positions, dropout 0.1 (5,472 "
        "parameters); AdamW lr 5e-4, betas (0.9, 0.95), weight decay 0.1 on Linear weights, "
        "constant lr, no clipping; a fresh batch of 64 every step, 2000 steps; evaluation in "
        "eval mode on 1024 held-out sequences every 25 steps (targets T2-T5 of "
        "docs/results/markov-chain.md)."
    ),
)
"""Edelman et al. 2024: the unigram plateau, then the switch to the in-context bigram."""

_BOIX_TRANSFORMER = {
    "d_model": 128,
    "n_layers": 2,
    "head_dim": 32,
    "mlp": True,
    "mlp_ratio": 2,
    "activation": "gelu",
    "dropout": 0.0,
    "positional": "learned",
    "causal": False,
    "init": "default",
}
_BOIX_TRAIN = TrainConfig(
    data="finite",
    epochs=1000,
    train_sequences=0,
    batch_size=1024,
    optimizer="adam",
    lr=1e-3,
    betas=(0.9, 0.999),
    weight_decay=0.0,
    schedule="constant",
    eval_every=0,
    eval_sequences=1000,
    eval_batch_size=1000,
    eval_splits=("validation", "test"),
)

BOIX2023 = Recipe(
    name="boix2023",
    env_id="ICL-SymbolTemplate-v0",
    spec={"preset": "aba_abb", "label_type": "regression", "train_alphabet_size": 512},
    model="transformer",
    model_args=_BOIX_TRANSFORMER,
    common_args={"n_outputs": 1},
    train=_BOIX_TRAIN,
    source=(
        "Boix-Adserà et al. 2024 (arXiv 2310.09753) and its reference code "
        "(eboix/relational-reasoning), target T3-fast of docs/results/symbol-templates.md: "
        "ABA vs ABB regression with +-1 labels; a fixed training set of n = 512 strings "
        "over n symbols (the task's train_set()), Adam lr 1e-3 without weight decay, batch "
        "min(n, 1024), 1000 epochs; the reference model read at the final QUERY token: pre-LN, "
        "no causal mask, learned N(0, 1) token and position embeddings, GELU MLP of 2D, a "
        "value head (n_outputs=1, MSE on the label value); the T3-fast size D = 128, 2 layers, "
        "4 heads x 32. Scored once at the end on the training set and on 1000 strings of the "
        "validation and unseen test alphabets. Add --model transformer+kq for the a_h identity "
        "scalar."
    ),
)
"""Boix-Adserà et al. 2024: transformers on abstract-symbol templates (regression)."""

BOIX2023_MLP = Recipe(
    name="boix2023-mlp",
    env_id="ICL-SymbolTemplate-v0",
    spec={"preset": "aba_abb", "label_type": "regression", "train_alphabet_size": 64},
    model="mlp",
    model_args={"width": 256, "depth": 2},
    common_args={"n_outputs": 1},
    train=_BOIX_TRAIN,
    source=(
        "Boix-Adserà et al. 2024, target T1 of docs/results/symbol-templates.md: a "
        "one-hot MLP with two ReLU layers of width 256 and a value head fits the n training "
        "strings (MSE < 0.01) and stays at chance on unseen symbols (MSE >= 0.8, accuracy "
        "about 0.5); the protocol of boix2023 (n = 64 here)."
    ),
)
"""The T1 negative control: an MLP cannot generalise to unseen symbols."""

BOIX2023_COPY = Recipe(
    name="boix2023-copy",
    env_id="ICL-SymbolCopy-v0",
    spec={"train_alphabet_size": 64},
    model="transformer",
    model_args={**_BOIX_TRANSFORMER, "d_model": 64, "head_dim": 64, "tied": True},
    train=_BOIX_TRAIN,
    source=(
        "Boix-Adserà et al. 2024, the next-token copy task and its inverse scaling "
        "(target T5 of docs/results/symbol-templates.md): "
        "A B -> A over all V ids, logits tied to the input embedding, heads of width 64, GELU "
        "MLP of 2D, the boix2023 protocol with n = 64. The b_h identity scalar needs the "
        "factor c_VO = 100: --model transformer+vo --model-arg vo_identity_mult=100."
    ),
)
"""Boix-Adserà et al. 2024: copy an unseen symbol (next-token label, tied unembedding)."""

REN2024 = Recipe(
    name="ren2024",
    env_id="ICL-SparseContextualBigram-v0",
    spec={
        "vocab_size": 8,
        "seq_len": 128,
        "n_support": 2,
        "p_family": "perm_mixture",
        "n_perms": 3,
        "q_weights": "uniform",
        "task_seed": 0,
    },
    model="linear_transformer",
    model_args={},
    train=TrainConfig(
        data="stream",
        steps=1500,
        batch_size=256,
        optimizer="iclgym.harness.optimizers:ppg",
        optimizer_args=("lam=0.01",),
        lr=0.3,
        weight_decay=0.0,
        schedule="constant",
        seed=100,
        eval_every=100,
        eval_sequences=4096,
        eval_batch_size=1024,
        eval_splits=("validation",),
    ),
    source=(
        "Ren, Wang, Lee 2024 (arXiv 2410.23438), target A of "
        "docs/results/sparse-contextual-bigram.md: N=8, T=128, Q=2, perm_mixture P (M=3), "
        "uniform weights, task "
        "seed 0 and data seed 100 + task seed (--seed); the one-layer linear transformer "
        "f(X) = V X a_k from V = mu 1^T, A = 1/T; scb_ppg (the preconditioned proximal "
        "gradient of iclgym.harness.optimizers: eta 0.3, lambda 0.01, renormalised columns, no "
        "decay), a fresh batch of 256 every step, 1500 steps (384k samples). The model declares "
        "a probability output, so the trainer trains the paper's squared loss "
        "1/2 ||e_{x_o} - f||^2 (batch means); every evaluation logs the task's exact model "
        "metrics (excess_mse, excess_mse_rel, dist_P, dist_Q, alpha_V, alpha_A, corr_V, "
        "support_recall) and model_metrics.png plots them against samples. Target A's "
        "reference: excess 3.7e-4, dist_P 0.037, dist_Q 0.020 at step 1500 on the instance of "
        "a numpy reference implementation (iclgym's instance of task seed 0 differs; its "
        "numbers are in "
        "docs/results/sparse-contextual-bigram.md). The SGD baseline: --optimizer sgd --lr 0.1 "
        "--optimizer-args with nothing (lambda = 0, no constraints)."
    ),
)
"""Ren, Wang, Lee 2024: sparse contextual bigrams, the proximal method on the linear transformer."""

LI2024 = Recipe(
    name="li2024",
    env_id="ICL-PriorityGraph-v0",
    spec={
        "mode": "paper",
        "n": 6,
        "context_len": 4,
        "num_tokens": 6,
        "d": 8,
        "embedding": "random",
        "cyclic": True,
        "instance_seed": 0,
    },
    model="priority_attention",
    model_args={"d": 8, "embedding": "random", "embedding_seed": 0, "head": "iden"},
    train=TrainConfig(
        data="finite",
        epochs=4000,
        train_sequences=0,
        batch_size=6,
        optimizer="iclgym.harness.optimizers:normalized_gd",
        lr=0.01,
        weight_decay=0.0,
        schedule="constant",
        dtype="float64",
        eval_every=100,
        eval_sequences=256,
        eval_batch_size=256,
        eval_splits=("validation",),
    ),
    source=(
        "Li, Huang, Ildiz, Rawat, Oymak 2024 (arXiv 2403.08081) and its reference code "
        "(yixiao-huang/next-token-prediction), the cyclic main experiment: the paper-mode "
        "dataset of n = 6 samples, T = "
        "4, K = 6, d = 8, random unit embeddings, redrawn until a TPG is cyclic (the task's "
        "train_set(), full batch: batch 6 = n, so one epoch is one step); the one-layer "
        "attention model with combined W (bias-free Linear, PyTorch's default init), the iden "
        "head and the log-loss -log(p_hat_y + eps) (the model's logits log(p_hat + eps)); "
        "normalised GD (iclgym.harness.optimizers:normalized_gd) lr 0.01, no momentum, no "
        "decay, 4000 iterations, float64. The model's embeddings must be the dataset's: "
        "embedding_seed = instance_seed and the same d and embedding (--set instance_seed=S "
        "--model-arg embedding_seed=S). Targets: corr(W, W^svm) >= 0.97 (reference notebooks "
        "0.976-0.993), top-SCC mass >= 0.995, norm diff <= 0.02, loss within 1e-3 of the "
        "reduced optimum (docs/results/priority-graph.md). The acyclic run: --set n=4 "
        "context_len=6 num_tokens=8 cyclic=False --train-sequences 0 --batch-size 4."
    ),
)
"""Li et al. 2024: W converges in direction to the Graph-SVM plus a finite component."""

BU2024 = Recipe(
    name="bu2024",
    env_id="ICL-MultiConcept-v0",
    spec={},
    model="concept_attention",
    model_args={"width": 32},
    train=TrainConfig(
        data="stream",
        steps=2000,
        batch_size=64,
        optimizer="sgd",
        lr=0.5,
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        loss="cross_entropy",
        eval_every=200,
        eval_sequences=4000,
        eval_batch_size=1000,
        eval_splits=("validation",),
    ),
    source=(
        "After Bu et al. 2024 (arXiv 2411.02199), iclgym's reconstruction "
        "(docs/envs/ICL-MultiConcept-v0.md): not the paper's formulas or numbers. The task's "
        "defaults (config C0: "
        "d = 64, d_y = 32, K = 8, s_extra = 2, L = 16, fixed mapping); the reference "
        "transformer (baselines.concept_attention): one softmax attention of the query over the "
        "L demonstrations (no 1/sqrt(D)) and a ReLU MLP of m = 32 neurons with fixed +-1 output "
        "signs, W_Q, W_K, W_V, w from N(0, 1/D); the logistic loss log(1 + e^{-y f}) as the "
        "cross-entropy of the logits [-f/2, f/2]; plain SGD lr 0.5, no momentum, no weight "
        "decay, constant lr, a fresh batch of 64 every step, 2000 steps; evaluation on 4000 "
        "held-out prompts every 200 steps. Targets (docs/results/multi-concept.md): test 0-1 "
        "error <= 0.01 after "
        "1000 steps (fixed mapping), <= 0.03 after 2000 steps with --set mapping=random, loss "
        "after 1000 steps < 0.05 x the initial loss (ln 2)."
    ),
)
"""After Bu et al. 2024: the two-layer transformer learns multi-concept prompts by SGD."""

STEPS_BANDIT = 1000
"""Steps of ``lee2023-bandit``: feedback hides most tokens, so it needs more than lee2023's 300
(measured: docs/results/baselines.md, Bandit feedback)."""

LEE2023 = Recipe(
    name="lee2023",
    env_id="ICL-MarkovChain-v0",
    spec={"num_states": 3, "seq_len": 100, "alpha": 1.0, "init": "stationary"},
    model="dpt",
    model_args={"d_model": 32, "n_layers": 3, "n_heads": 1, "state_len": 1},
    train=TrainConfig(
        data="stream",
        steps=300,
        batch_size=64,
        optimizer="adamw",
        lr=1e-3,
        betas=(0.9, 0.999),
        weight_decay=1e-4,
        schedule="constant",
        labels="soft",
        eval_every=50,
        eval_sequences=1024,
        eval_batch_size=256,
        eval_splits=("validation",),
    ),
    source=(
        "Lee et al. 2023 (DPT, arXiv 2306.14892, code jon--lee/decision-pretrained-transformer) "
        "mapped onto iclgym (docs/recipes.md): the streaming DPT (baselines.dpt) over the "
        "transitions of ICL-MarkovChain-v0 at the Edelman et al. setting (k=3, T=100, "
        "Dirichlet(1), stationary start), soft labels (the true next-token law, the "
        "default); the original code's --embd 32 --layer 3 and its one real head, AdamW lr 1e-3 "
        "(its Dark Room value), weight decay 1e-4, batch 64; 300 steps (the DPT sanity target: "
        "KL_last < 0.169, the unigram reference, and <= 0.065, the next-token transformer's)."
    ),
)
"""Lee et al. 2023: streaming DPT with soft labels on in-context Markov chains."""

LEE2023_FAITHFUL = Recipe(
    name="lee2023-faithful",
    env_id=LEE2023.env_id,
    spec=LEE2023.spec,
    model="dpt_faithful",
    model_args=LEE2023.model_args,
    train=replace(LEE2023.train, steps=1000, eval_every=250, eval_sequences=256),
    source=(
        "Lee et al. 2023's own input format on the lee2023 setting: the faithful DPT "
        "(baselines.dpt.DPTModel): the query state first, then the context transitions, one "
        "query per sequence with its label (soft: the true law of the next token) at every "
        "prefix, as the original repeats a* at positions 1..H; the same model sizes and "
        "optimiser as lee2023, 1000 steps (one label per sequence instead of T: it needs more "
        "steps than the streaming DPT to reach the sanity target), evaluation every 250 steps "
        "on 256 validation sequences (scoring reads every query after its whole context, about "
        "T/2 streaming passes)."
    ),
)
"""Lee et al. 2023: the faithful (query-first) DPT with soft labels on the same chains."""

LEE2023_BANDIT = Recipe(
    name="lee2023-bandit",
    env_id=LEE2023.env_id,
    spec=LEE2023.spec,
    model="dpt_bandit",
    model_args=LEE2023.model_args,
    train=replace(LEE2023.train, steps=STEPS_BANDIT, eval_every=250),
    source=(
        "Lee et al. 2023's bandit setting on the lee2023 chains: the streaming DPT trained on "
        "bandit feedback (baselines.dpt.BanditDPT: each sequence's tokens hidden after the "
        "misses of a random behaviour policy, a Dirichlet(1) action law mixed with a point "
        "mass on one token), soft labels (the true law of the next token), the lee2023 sizes "
        "and optimiser; deployed online under iclgym.wrappers.BanditFeedback and scored by "
        "cumulative pseudo-regret (iclgym regret, docs/results/baselines.md)."
    ),
)
"""Lee et al. 2023's bandit setting: the streaming DPT pretrained on bandit feedback."""

RECIPES: Mapping[str, Recipe] = MappingProxyType(
    {
        r.name: r
        for r in (
            EDELMAN2024,
            BOIX2023,
            BOIX2023_MLP,
            BOIX2023_COPY,
            REN2024,
            LI2024,
            BU2024,
            LEE2023,
            LEE2023_FAITHFUL,
            LEE2023_BANDIT,
        )
    }
)
"""Every named recipe."""


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(
            f"recipe={name!r} is invalid: expected one of {', '.join(RECIPES)}"
        ) from None
