"""Decision-pretrained transformer (DPT; Lee et al. 2023, *Supervised Pretraining Can Learn
In-Context Reinforcement Learning*, arXiv 2306.14892), in its streaming form for iclgym's
exogenous-token tasks (the ``lee2023`` recipe, ``docs/recipes.md``).

**Mapping** (iclgym's). One task is one draw of the generator's parameters (a Markov
table, ...); the stream x_0, x_1, ... is exogenous, so a prediction never changes the next
token and DPT reduces to an in-context predictor trained with privileged labels. A transition
is (s_i, a_i, r_i, s'_i) with the state s_i the last ``state_len`` tokens up to x_i (n - 1 for
an order-n chain) and s'_i = x_{i+1}. With every token shown, the behaviour action and
reward carry no information about the task beyond s'_i, so this model drops their slots (a
zero ablation: legitimate, and cheaper). Under bandit feedback they do (a miss says x_{i+1} is
not a_i), and :class:`BanditDPT` keeps the missed action.

**Streaming DPT** (an iclgym design): a causal GPT-2-style transformer over the
transition stream. Element t embeds the transition that ends at x_t, i.e. the one-hot codes of
[s_{t-1}; s'_{t-1} = x_t] = x_{t - state_len} .. x_t (PAD before the sequence start) through
one Linear, as the original embeds [s, a, s', r]; learned absolute positions are added (as
GPT-2's ``inputs_embeds`` path does). Position t predicts the label for the query state s_t
from the transitions up to t, so every position trains at once and the model plugs into the
env's step loop. The label is the trainer's switch (:attr:`iclgym.harness.TrainConfig.labels`):
``soft`` (the true law p_phi(. | s_t), the default of the ``lee2023`` recipe: its population
minimiser is the posterior predictive, the Bayes log-loss predictor), ``hard`` (argmax of the
true law, faithful DPT's optimal action a*; its argmax is posterior sampling's mode, not the
Bayes 0-1 prediction) or ``sampled`` (the realised token, plain next-token training in DPT's
input format).

**Differences from the original code** (``jon--lee/decision-pretrained-transformer`` @
15172df): plain torch blocks (:mod:`baselines.transformer`) instead of Hugging Face GPT-2 (no
``transformers`` dependency); the head count is a real parameter (the original hard-codes 1
and ignores ``--head``); the faithful variant (query first, one query per sequence, the label
repeated at every prefix) is :class:`DPTModel` below.

**Faithful DPT** (:class:`DPTModel`, ``iclgym train --model dpt_faithful``): the original's
input, one query first and then the context transitions. For the query state s_q (the last
``state_len`` tokens up to x_q) the model reads [query; E_0, ..., E_H], the query element
embedding s_q through the state slots of the same Linear (its s' slot zero, as the original
zeroes the query's action, next-state and reward slots) and E_i the transition that ends at
x_i; the output after E_0 .. E_j is its law of x_{q+1} from the prefix D_j. Training
(:meth:`DPTModel.training_loss`, the trainer's optional hook): one query per sequence, drawn
uniformly among the scored positions, and the query's label (the trainer's switch: soft, hard
or sampled) at every prefix j = 0 .. q, as the original repeats a* at positions 1 .. H.
Prediction (the model contract, ``forward``): for every position q, the query s_q after its
whole context D_q (test time reads the last position only), one pass per query, so
scoring costs about T / 2 times the streaming model's. ``shuffle=True`` permutes each
training context before its prefixes are read (the original's ``--shuffle``), allowed only
where the transitions are exchangeable given the task (:func:`check_shuffle`): never for
ordered windows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from baselines.transformer import Transformer, TransformerConfig
from iclgym.harness.model import ModelPredictor, load_predictor
from iclgym.harness.regret import run_and_mode
from iclgym.harness.train import Targets, loss_of_output
from iclgym.tasks.base import Task
from iclgym.tasks.markov import MarkovChainTask
from iclgym.validation import as_bool, as_int

QUERY_CHUNK_ELEMENTS = 2**22
"""Elements x d_model a scoring pass of :class:`DPTModel` holds per chunk of queries."""


class TransitionEmbedding(nn.Module):
    """(B, T) token ids -> (B, T, d_model): element t is ``Linear([onehot(x_{t-m}); ...;
    onehot(x_t)])`` with m = ``state_len`` (the transition s_{t-1} -> x_t), computed as a sum
    of m + 1 embedding lookups (one table per slot, PAD id V before the sequence start) plus a
    bias: the same map as the Linear on the concatenated one-hot codes, without building
    them. Init: PyTorch's Linear init for fan-in (m + 1) (V + 1)."""

    def __init__(self, vocab_size: int, state_len: int, d_model: int) -> None:
        super().__init__()
        self.vocab_size = as_int("vocab_size", vocab_size, 1)
        self.state_len = as_int("state_len", state_len, 1)
        slots, width = self.state_len + 1, self.vocab_size + 1
        self.table = nn.Embedding(slots * width, d_model)
        self.bias = nn.Parameter(torch.zeros(d_model))
        bound = (slots * width) ** -0.5
        nn.init.uniform_(self.table.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)
        self.register_buffer("offsets", torch.arange(slots) * width, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, T) int64 -> (B, T, d_model)."""
        m = self.state_len
        pad = tokens.new_full((tokens.shape[0], m), self.vocab_size)
        padded = torch.cat([pad, tokens], 1)
        window = padded.unfold(1, m + 1, 1)  # (B, T, m + 1): x_{t-m} .. x_t
        return self.table(window + self.offsets).sum(2) + self.bias


class StreamingDPT(Transformer):
    """The streaming DPT (module docstring): :class:`TransitionEmbedding` -> pre-LN GPT-2-style
    blocks (learned positions, GELU MLP) -> a head of V logits at every position, causal. The
    model contract's ``forward(tokens[, features]) -> (B, T, V)``."""

    def __init__(self, config: TransformerConfig, state_len: int = 1) -> None:
        super().__init__(config, TransitionEmbedding(config.vocab_size, state_len, config.d_model))
        self.state_len = state_len


class BanditDPT(StreamingDPT):
    """The streaming DPT trained for bandit feedback (:class:`iclgym.wrappers.BanditFeedback`:
    the next token is shown only after a correct prediction). A miss still tells something:
    x_{j+1} is not the action a_j. So, as the original's bandit contexts hold each pull's
    action and reward, its input keeps the missed action: ``forward(tokens)`` takes (B, T)
    int64 ids, x_j in [0, V) where shown and ``V + 1 + a_{j-1}`` where hidden after the miss
    of action a_{j-1} (:data:`MISS_OFFSET`; PAD = V, after the revealed prefix, is never read by
    a causal position), and returns (B, T, V) logits; every transition slot has 2V + 1 ids.
    :class:`DPTAgent` builds these ids from the wrapper's observation (HIDDEN = V + 1) and its
    own past actions.

    Training (:meth:`training_loss`, the trainer's optional hook): each sequence gets a
    behaviour policy, a Dirichlet(1) action law mixed with a point mass on one uniformly drawn
    token at a weight uniform on [0, 1] (after the original's bandit contexts,
    ``collect_data.py`` of jon--lee/decision-pretrained-transformer: i.i.d. pulls from a
    Dirichlet(1) policy mixed with a point mass on a random arm, its weight from {0, 0.1, ...,
    1}; reveal rates then range from rare to nearly every token). Its actions a_j pick which
    tokens stay hidden: x_{j+1} is shown iff a_j = x_{j+1}, for the positions the env asks
    about (j + 1 > s, the task's first scored position; x_0 .. x_s are the context every
    episode shows). Every scored position t is trained on the trainer's label (soft: the true
    law of x_{t+1}). With the actions in the input, the behaviour policy (independent of the
    task) factors out of the posterior, so the soft label's population minimiser is the Bayes
    posterior predictive of the bandit view given tokens, actions and hits, whatever policy
    produced them; what remains between pretraining and deployment is coverage (how often the
    greedy agent's histories occur under the behaviour policies), as in DPT. Draws use the
    global torch random state (seeded and checkpointed by the trainer)."""

    def __init__(self, config: TransformerConfig, state_len: int = 1) -> None:
        with_misses = TransitionEmbedding(2 * config.vocab_size + 1, state_len, config.d_model)
        Transformer.__init__(self, config, with_misses)  # ids: tokens, PAD, V + 1 + a
        self.state_len = state_len

    def forward(self, tokens: Tensor, features: Tensor | None = None, **kwargs: Any) -> Any:
        if features is not None:
            raise ValueError("the bandit DPT reads tokens only (no feature tasks)")
        return super().forward(tokens, **kwargs)

    def feedback(self, tokens: Tensor, first: int = 0) -> Tensor:
        """(B, T) int64: ``tokens`` as a behaviour policy (class docstring) sees them under
        bandit feedback, x_j for j > ``first`` replaced by ``V + 1 + a_{j-1}`` where the action
        a_{j-1} missed it."""
        b, t = tokens.shape
        v = self.config.vocab_size
        device = tokens.device
        law = torch._standard_gamma(torch.ones(b, v, device=device))
        law = law / law.sum(1, keepdim=True)
        weight = torch.rand(b, 1, device=device)
        point = torch.randint(v, (b,), device=device)
        law = (1 - weight) * law + weight * nn.functional.one_hot(point, v)
        actions = torch.multinomial(law, max(t - 1, 1), replacement=True)[:, : t - 1]
        shown = tokens.clone()
        missed = (actions != tokens[:, 1:]) & (torch.arange(1, t, device=device) > first)
        shown[:, 1:] = torch.where(missed, MISS_OFFSET + v + actions, tokens[:, 1:])
        return shown

    def training_loss(self, inputs: tuple[Tensor, ...], targets: Targets) -> Tensor:
        """The loss of ``forward`` on the behaviour policy's feedback (class docstring) at the
        scored positions, against the trainer's labels; the first scored position is the
        smallest scored column."""
        if len(inputs) > 1:
            raise ValueError("the bandit DPT reads tokens only (no feature tasks)")
        first = int(targets.cols.min()) if targets.cols.numel() else 0
        return loss_of_output(self(self.feedback(inputs[0], first)), targets)


MISS_OFFSET = 1
"""A hidden token after the missed action a is the input id ``V + MISS_OFFSET + a`` of
:class:`BanditDPT` (the wrapper shows every hidden token as ``V + 1``)."""


def check_shuffle(task: Task, state_len: int) -> None:
    """Raise ``ValueError`` unless shuffling the transitions (state of ``state_len`` tokens ->
    next token) of ``task``'s sequences keeps every label's Bayes law: the task must be a
    Markov chain (any prior: its likelihood, so the posterior of the table, depends on the
    transitions through their counts only) whose state holds the chain's whole memory
    (``state_len >= order - 1``). Truncated windows, and every family whose context is ordered
    (templates, bigram and priority contexts, prompts), keep their order (Lee et al. 2023
    refuse to shuffle adaptively collected data for the same reason)."""
    if not isinstance(task, MarkovChainTask):
        raise ValueError(
            f"shuffle=True is invalid for a {task.name} task: its context is ordered, so "
            "permuting transitions changes what they tell (only Markov-chain transitions are "
            "exchangeable given the task)"
        )
    memory = task.spec.order - 1
    if state_len < memory:
        raise ValueError(
            f"shuffle=True is invalid with state_len={state_len}: an order-{task.spec.order} "
            f"chain's state is its last {memory} tokens, so a shorter state is a truncated "
            "window whose transitions are not exchangeable"
        )


class DPTModel(Transformer):
    """The faithful DPT (module docstring): query first, then the context transitions, the
    label at every prefix. ``forward(tokens)`` (B, T) int64 -> (B, T, V) logits, position q
    the query s_q after its whole context (causal: it reads ``tokens[:, : q + 1]`` only);
    :meth:`training_loss` is the one-query-per-sequence objective the trainer calls instead
    of the loss of ``forward``. ``shuffle``: permute each training context (check the task
    with :func:`check_shuffle`, which :meth:`check_task` runs before training)."""

    def __init__(self, config: TransformerConfig, state_len: int = 1, shuffle: bool = False):
        super().__init__(config, TransitionEmbedding(config.vocab_size, state_len, config.d_model))
        self.state_len, self.shuffle = state_len, as_bool("shuffle", shuffle)

    def check_task(self, task: Task) -> None:
        """The trainer's optional pre-training check: :func:`check_shuffle` when shuffling."""
        if self.shuffle:
            check_shuffle(task, self.state_len)

    def elements(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(queries, context)``, both (B, T, d_model): the query element of every state s_q
        and the context element E_t of every transition (PAD states before the start)."""
        embed, m = self.embed, self.state_len
        pad = tokens.new_full((tokens.shape[0], m), self.config.vocab_size)
        padded = torch.cat([pad, tokens], 1)
        window = padded.unfold(1, m + 1, 1) + embed.offsets  # (B, T, m + 1)
        lookups = embed.table(window)  # (B, T, m + 1, d)
        context = lookups.sum(2) + embed.bias
        # s_q = x_{q-m+1} .. x_q sits in the state slots of transition q + 1's window
        state = padded.unfold(1, m, 1)[:, 1:] + embed.offsets[:m]  # (B, T, m)
        queries = embed.table(state).sum(2) + embed.bias
        return queries, context

    def hidden(self, x: Tensor) -> Tensor:
        """The last block's output (N, L, d_model) for element sequences ``x`` (N, L,
        d_model): learned positions, then the causal blocks. Raises ``ValueError`` for L >
        ``max_len``."""
        if x.shape[1] > self.config.max_len:
            raise ValueError(
                f"{x.shape[1]} elements exceed max_len={self.config.max_len} (seq_len + 1)"
            )
        x = self.drop(x + self.pos_embed.weight[: x.shape[1]])
        for block in self.blocks:
            x, _ = block(x, False)
        return x

    def decode(self, x: Tensor) -> Tensor:
        """Logits (N, L, V) of element sequences ``x`` (N, L, d_model): :meth:`hidden`, the
        final LayerNorm and the head."""
        return self.lm_head(self.ln_f(self.hidden(x)))

    def query_logits(self, tokens: Tensor, query: Tensor) -> Tensor:
        """(B, V) logits of one query per row, ``query`` (B,) int64 positions: row b's
        s_q read after E_0 .. E_q, q = ``query[b]``; one pass of max(query) + 2 elements (the
        causal mask keeps each row's later elements out of its answer). What an agent acting
        at one position needs, at ~T / 2 times less work than :meth:`forward`."""
        queries, context = self.elements(tokens)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        length = int(query.max()) + 1
        x = torch.cat([queries[rows, query][:, None], context[:, :length]], 1)
        return self.lm_head(self.ln_f(self.hidden(x)[rows, query + 1]))

    def forward(self, tokens: Tensor, features: Tensor | None = None) -> Tensor:
        """(B, T, V) logits: position q is the query s_q read after [s_q; E_0 .. E_q], one
        pass per query, in chunks of queries of about :data:`QUERY_CHUNK_ELEMENTS` elements x
        d_model."""
        if features is not None:
            raise ValueError("the faithful DPT reads tokens only (no feature tasks)")
        queries, context = self.elements(tokens)
        b, t, d = context.shape
        out = []
        chunk = max(1, QUERY_CHUNK_ELEMENTS // max(1, b * (t + 1) * d))
        for lo in range(0, t, chunk):
            hi = min(t, lo + chunk)  # queries lo .. hi - 1 need elements up to hi
            x = torch.cat(
                [
                    queries[:, lo:hi, None],
                    context[:, None, :hi].expand(b, hi - lo, hi, d),
                ],
                2,
            ).reshape(b * (hi - lo), hi + 1, d)
            h = self.hidden(x).view(b, hi - lo, hi + 1, d)
            q = torch.arange(lo, hi, device=tokens.device)
            out.append(self.lm_head(self.ln_f(h[:, q - lo, q + 1])))  # after E_0 .. E_q
        return torch.cat(out, 1)

    def training_loss(self, inputs: tuple[Tensor, ...], targets: Targets) -> Tensor:
        """The faithful objective (the trainer's optional hook, :mod:`iclgym.harness.model`):
        per sequence one query q, uniform over its scored positions (the global torch random
        state, which the trainer seeds and checkpoints), and the label of q at every prefix
        j = 0 .. q, the loss the mean over all (sequence, prefix) pairs; with ``shuffle`` the
        context E_0 .. E_q is permuted first (uniformly, per sequence)."""
        tokens = inputs[0]
        if len(inputs) > 1:
            raise ValueError("the faithful DPT reads tokens only (no feature tasks)")
        b, t = tokens.shape
        device = tokens.device
        index = torch.full((b, t), -1, dtype=torch.long, device=device)
        index[targets.rows, targets.cols] = torch.arange(targets.rows.numel(), device=device)
        keys = torch.rand(b, t, device=device).masked_fill(index < 0, -1.0)
        query = keys.argmax(1)  # uniform among each row's scored positions
        rows = torch.arange(b, device=device)[index[torch.arange(b, device=device), query] >= 0]
        query = query[rows]
        label = index[rows, query]  # each query's label in the scored list
        queries, context = self.elements(tokens[rows])
        length = int(query.max()) + 1
        context = context[:, :length]
        if self.shuffle:  # a random order of E_0 .. E_q; later elements stay after them
            position = torch.arange(length, device=device, dtype=torch.float32)
            keys = torch.rand(len(rows), length, device=device)
            keys = torch.where(position[None] > query[:, None], 2.0 + position[None], keys)
            order = keys.argsort(1)
            context = context.gather(1, order[:, :, None].expand_as(context))
        own = queries[torch.arange(len(rows), device=device), query]
        x = torch.cat([own[:, None], context], 1)
        logits = self.decode(x)  # (R, length + 1, V)
        prefix = torch.arange(length, device=device)[None] <= query[:, None]
        r, j = prefix.nonzero(as_tuple=True)
        repeated = label[r]
        selected = Targets(
            rows=r,
            cols=j + 1,
            tokens=targets.tokens[repeated],
            output=targets.output,
            loss=targets.loss,
            probs=None if targets.probs is None else targets.probs[repeated],
        )
        return loss_of_output(logits, selected)


def gpt2_config(
    vocab_size: int,
    max_len: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    dropout: float,
    feature_dim: int = 0,
) -> TransformerConfig:
    """Both DPTs' blocks: GPT-2's (GELU MLP 4x, learned positions over ``max_len``)."""
    return TransformerConfig(
        vocab_size=vocab_size,
        max_len=max_len,
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        mlp=True,
        activation="gelu",
        dropout=dropout,
        positional="learned",
        feature_dim=feature_dim,
    )


def make_faithful_model(
    vocab_size: int,
    seq_len: int,
    state_len: int = 1,
    d_model: int = 32,
    n_layers: int = 3,
    n_heads: int = 1,
    dropout: float = 0.0,
    shuffle: bool = False,
    feature_dim: int = 0,
) -> DPTModel:
    """The faithful DPT's factory (``iclgym train --model dpt_faithful``): the streaming
    model's defaults (the original's ``--embd 32 --layer 3``, one real head, dropout 0, GELU
    MLP, learned positions over ``seq_len + 1`` elements); ``state_len`` tokens per state;
    ``shuffle`` the original's ``--shuffle``. Raises ``ValueError`` for invalid sizes, a
    ``shuffle`` that is not a bool, and a feature task (``feature_dim`` > 0: its transitions
    are tokens only)."""
    if as_int("feature_dim", feature_dim, 0):
        raise ValueError(
            f"feature_dim={feature_dim} is invalid: the faithful DPT reads tokens only "
            "(a feature task needs --model dpt)"
        )
    config = gpt2_config(vocab_size, seq_len + 1, d_model, n_layers, n_heads, dropout)
    return DPTModel(config, as_int("state_len", state_len, 1), shuffle)


def make_bandit_model(
    vocab_size: int,
    seq_len: int,
    state_len: int = 1,
    d_model: int = 32,
    n_layers: int = 3,
    n_heads: int = 1,
    dropout: float = 0.0,
    feature_dim: int = 0,
) -> BanditDPT:
    """The bandit DPT's factory (``iclgym train --model dpt_bandit``, the ``lee2023-bandit``
    recipe): the streaming model's defaults and blocks, 2V + 1 input ids per transition slot
    (a token, PAD, or ``V + 1 + a``: hidden after the miss of action a). Raises
    ``ValueError`` for invalid sizes and for a feature task (its feedback is tokens only)."""
    if as_int("feature_dim", feature_dim, 0):
        raise ValueError(f"feature_dim={feature_dim} is invalid: the bandit DPT reads tokens only")
    config = gpt2_config(vocab_size, seq_len, d_model, n_layers, n_heads, dropout)
    return BanditDPT(config, as_int("state_len", state_len, 1))


def make_model(
    vocab_size: int,
    seq_len: int,
    state_len: int = 1,
    d_model: int = 32,
    n_layers: int = 3,
    n_heads: int = 1,
    dropout: float = 0.0,
    feature_dim: int = 0,
) -> StreamingDPT:
    """The factory of the model contract (``iclgym train --model dpt``). Defaults: the
    original's ``--embd 32 --layer 3``, one head (what it really runs; ``n_heads`` is a real
    parameter here), dropout 0, GPT-2 blocks (GELU MLP 4x, learned positions over
    ``seq_len``). ``state_len``: tokens per state (n - 1 for an order-n chain). Raises
    ``ValueError`` for invalid sizes."""
    config = gpt2_config(vocab_size, seq_len, d_model, n_layers, n_heads, dropout, feature_dim)
    return StreamingDPT(config, state_len)


def from_text(text: str, task: Task) -> ModelPredictor:
    """``RUN`` (the part after ``dpt:`` on the command line): the checkpoint of a run folder
    of ``iclgym train --model dpt`` or ``dpt_faithful`` (or ``--recipe lee2023``), named
    ``dpt:RUN``. Raises
    ``ValueError`` when the checkpoint holds another model."""
    predictor = load_predictor(text, task)
    if not isinstance(predictor.model, StreamingDPT | DPTModel):
        raise ValueError(
            f"dpt:{text} holds a {type(predictor.model).__name__}, not a DPT: use "
            f"--predictor checkpoint:{text}"
        )
    predictor.name = f"dpt:{text}"
    return predictor


class DPTAgent:
    """A trained DPT (:class:`StreamingDPT` or the faithful :class:`DPTModel`) acting in an
    iclgym env's step loop (DPT's online deployment): from the ``observation="context"``
    observation (tokens x_0 .. x_t then PAD, as an array (T + 1,) or a batch (N, T + 1) of a
    vector env; a Dict with ``"tokens"`` and ``"features"`` for a feature task) it reads the
    model's law at t and returns the action of ``mode``: ``"greedy"`` (argmax, the first
    token on ties), ``"sample"`` (a draw from softmax(logits / temperature), seeded by
    ``seed``) or ``"distribution"`` (that law, for ``action="distribution"`` envs). The
    faithful model answers only each row's query (:meth:`DPTModel.query_logits`). A final
    observation (all T + 1 tokens revealed; under next-step autoreset the env ignores its
    action) is read up to x_{T-1}, the last position the model predicts from. With
    full-information feedback the revealed prefix is the same offline and online, so this is
    both deployments. Under bandit feedback (:class:`iclgym.wrappers.BanditFeedback`) the
    observation shows HIDDEN = V + 1 after each miss and the prefix depends on the agent's own
    actions (online deployment proper): with a :class:`BanditDPT` the agent remembers its
    actions per row (a row's episode restarts when its position goes back, or at
    :meth:`begin_episodes`) and gives the model each miss with the action that missed. Raises
    ``ValueError`` for another mode, a temperature <= 0, an observation without revealed
    tokens, or hidden tokens shown to a DPT trained with full information."""

    MODES = ("greedy", "sample", "distribution")

    def __init__(
        self, model: nn.Module, mode: str = "greedy", temperature: float = 1.0, seed: int = 0
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode={mode!r} is invalid: expected one of {self.MODES}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected a float > 0")
        self.model, self.mode, self.temperature = model, mode, float(temperature)
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab_size = model.config.vocab_size
        self._actions: Tensor | None = None  # (rows, max_len + 1) this agent's past actions
        self._last: Tensor | None = None

    @torch.no_grad()
    def act(self, observation: Any) -> Any:
        features = None
        if isinstance(observation, dict):
            observation, features = observation["tokens"], observation["features"]
        tokens = torch.as_tensor(np.asarray(observation), dtype=torch.long)
        single = tokens.dim() == 1
        tokens = tokens[None] if single else tokens
        revealed = (tokens != self.vocab_size).sum(1)  # PAD = V after the revealed prefix
        if (revealed == 0).any():
            raise ValueError("the observation reveals no token: use observation='context'")
        faithful = isinstance(self.model, DPTModel)
        position = (revealed - 1).clamp_max(self.model.config.max_len - 1 - faithful)
        t = int(position.max())
        window = tokens[:, : t + 1]
        bandit = isinstance(self.model, BanditDPT)
        if bandit:
            inputs = [self._with_misses(window, position)]
        elif (window == self.vocab_size + 1).any():
            raise ValueError(
                f"the observation shows HIDDEN = {self.vocab_size + 1} (bandit feedback): a DPT "
                "trained with full information cannot read hidden tokens; train one with "
                "--model dpt_bandit"
            )
        else:
            inputs = [window.clamp_max(self.vocab_size - 1)]
        if features is not None:
            f = torch.as_tensor(np.asarray(features), dtype=torch.float32)
            inputs.append((f[None] if single else f)[:, : t + 1])
        was_training = self.model.training
        self.model.eval()
        try:
            if faithful:
                logits = self.model.query_logits(inputs[0], position).float()
            else:  # each row's last revealed position
                logits = self.model(*inputs).float()[torch.arange(len(position)), position]
        finally:
            self.model.train(was_training)
        if self.mode == "greedy":
            action = logits.argmax(-1).numpy()
        elif self.mode == "sample":
            probs = (logits / self.temperature).softmax(-1)
            action = torch.multinomial(probs, 1, generator=self.generator)[:, 0].numpy()
        else:
            action = (logits / self.temperature).softmax(-1).numpy().astype(np.float32)
        if bandit:  # remembered: the id of a token this action misses
            self._actions[torch.arange(len(position)), position] = torch.as_tensor(action)
            self._last = position
        return action[0] if single else action

    def begin_episodes(self, n: int) -> None:
        """``n`` fresh episodes start (one per row): forget the actions remembered for the
        bandit DPT. Optional: a row whose position goes back starts a new episode anyway."""
        self._actions = torch.full((n, self.model.config.max_len + 1), -1, dtype=torch.long)
        self._last = torch.full((n,), -1, dtype=torch.long)

    def _with_misses(self, window: Tensor, position: Tensor) -> Tensor:
        """The bandit DPT's input ids: each HIDDEN = V + 1 at position j becomes
        ``V + 1 + a_{j-1}``, this agent's action at j - 1 in the row's episode."""
        n, v = window.shape[0], self.vocab_size
        if self._actions is None or self._actions.shape[0] != n:
            self.begin_episodes(n)
        restart = position < self._last  # the row's position went back: a new episode
        self._actions[restart] = -1
        rows, cols = (window == v + 1).nonzero(as_tuple=True)
        missed = self._actions[rows, cols - 1]
        if (missed < 0).any():
            raise ValueError(
                "the observation hides a token after a step this agent did not act on: under "
                "bandit feedback the bandit DPT reads its own missed actions, so it must act at "
                "every step of its episodes (call begin_episodes(n) before a new batch)"
            )
        window = window.clone()
        window[rows, cols] = MISS_OFFSET + v + missed
        return window


def agent_from_text(text: str, task: Task, seed: int = 0) -> DPTAgent:
    """``RUN[:greedy|:sample]`` (the part after ``dpt:`` of ``iclgym regret --agent``): a
    :class:`DPTAgent` of the bandit DPT checkpoint in the run folder RUN (``iclgym train
    --recipe lee2023-bandit``), acting greedily (the default) or by sampling its law (seeded
    by ``seed``). A RUN that exists as written is read whole (a folder named ``x:sample``
    too). Raises ``ValueError`` for another mode, a missing checkpoint, and a checkpoint that
    holds anything but a :class:`BanditDPT` (a DPT trained with full information cannot read
    the hidden tokens of bandit feedback)."""
    run, mode = run_and_mode(text, "dpt")
    model = load_predictor(run, task).model
    if not isinstance(model, BanditDPT):
        raise ValueError(
            f"dpt:{run} holds a {type(model).__name__}, not a bandit DPT: under bandit feedback "
            "the agent must read hidden tokens; train one with iclgym train --recipe "
            "lee2023-bandit"
        )
    return DPTAgent(model, mode=mode, seed=seed)
