"""Template tasks over abstract symbols (Boix-Adserà et al. 2024, arXiv 2310.09753).

A task is a list of templates over wildcards (variables) and fixed regular tokens, e.g. ABA
and ABB. A string is made by picking a template and substituting the wildcards injectively
(distinct wildcards get distinct tokens) with symbols of the split's alphabet; its label is a
deterministic function of the template: a real number (regression), a class id
(classification) or a token (``"multiclass"``: a wildcard, whose substituted symbol is the
label, or a regular token). Train, validation and test use disjoint alphabets, so the test
split measures generalisation to symbols never seen in training
(``shared/specs/symbol-templates.md``).

**Vocabulary** (contiguous blocks, spec section 2): wildcards | regular tokens (the declared
ones, then one token per regression value or class, then the QUERY token) | train alphabet |
validation alphabet | test alphabet. Wildcard ids are reserved and never appear in data.

**Batch mapping.** A sequence is the template string followed by QUERY, ``T = L + 1`` tokens;
position ``t < T - 1`` predicts the next template token (context, ``loss_mask`` False) and the
QUERY position ``T - 1`` predicts the label token (the only scored position). For regression
the label token stands for its value: :attr:`SymbolTemplateTask.label_values` maps token ids to
values and ``params["label_value"]`` holds the real label; :mod:`iclgym.harness.regression`
scores MSE and sign accuracy. ``true_probs`` is the law of each next token given the template
(one-hot at regular, repeated-wildcard, QUERY and label positions; uniform over the unused
symbols of the split's alphabet at a new wildcard); the oracle is the Bayes mixture of these
laws over the templates consistent with the prefix (exact template matching), one-hot at the
label position because templates are disjoint. Log-probabilities are floored at 1e-30.

**Splits.** The sampler reads the split from the generator (:func:`generator_split`): ``train``
draws from the train alphabet, ``validation`` and ``test`` from theirs. In
``data_mode="fixed"`` the train split resamples a fixed set of ``n_train`` strings
(:meth:`SymbolTemplateTask.train_set`, a function of ``train_set_seed`` only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import product

import torch
from torch import Tensor

from iclgym.tasks.base import (
    SPLITS,
    Batch,
    Strategy,
    Task,
    TaskSpec,
    check_batch_size,
    generator_split,
    stream_seed,
)

LABEL_TYPES = ("regression", "classification", "multiclass")
DATA_MODES = ("online", "fixed")
QUERY = "<query>"
TOPK_MAX_ALPHABET = 4096
"""Up to this alphabet size distinct symbols are the top-m of uniform keys (exact, O(B * A));
above it collisions among m uniform draws are redrawn (rejection)."""
FIXED_SET_STREAM = len(SPLITS) + 1
"""Seed stream of the fixed training set (stream len(SPLITS) is the trainer's dropout)."""
LOG_FLOOR = 1e-30


def _majority(k: int) -> tuple[tuple[str, ...], ...]:
    return tuple(("A", *rest) for rest in product("AB", repeat=k - 1))


# name -> (templates, wildcards, regression labels or None, multiclass labels or None)
PRESETS: Mapping[str, tuple] = {
    "same_different": (("AA", "AB"), "AB", (1.0, -1.0), None),
    "aba_abb": (("ABA", "ABB"), "AB", (1.0, -1.0), None),
    "aabb_abab": (("AABB", "ABAB"), "AB", (1.0, -1.0), None),
    **{
        f"majority{k}": (
            _majority(k),
            "AB",
            tuple(1.0 if t.count("A") > k / 2 else -1.0 for t in _majority(k)),
            None,
        )
        for k in (2, 4, 6, 8)
    },
    # Copy: "A B" -> A, the first of two distinct symbols (a design choice, spec section 2).
    "copy": (("AB",), "AB", None, ("A",)),
}
"""Built-in task sets. Wildcards are the letters A, B; regression labels are +1 / -1."""


def _invalid(name: str, value: object, valid: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: expected {valid}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _symbols(template: object) -> tuple[str, ...]:
    """A template as a tuple of symbol names: a sequence of names, or a string (split on
    whitespace when it has any, else one symbol per character)."""
    if isinstance(template, str):
        return tuple(template.split()) if any(c.isspace() for c in template) else tuple(template)
    if isinstance(template, Sequence) and all(isinstance(s, str) for s in template):
        return tuple(template)
    raise _invalid("templates", template, "strings or sequences of symbol names")


def canonical(template: Sequence[str], wildcards: Sequence[str]) -> tuple[object, ...]:
    """The template up to renaming wildcards: wildcards by order of first appearance."""
    names: dict[str, int] = {}
    return tuple(
        names.setdefault(s, len(names)) if s in wildcards else ("regular", s) for s in template
    )


@dataclass(frozen=True)
class SymbolTemplateSpec(TaskSpec):
    """Parameters of a template task (``symbol-templates.md`` section 2).

    Attributes:
        preset: a key of :data:`PRESETS` (``same_different``, ``aba_abb``, ``aabb_abab``,
            ``majority2/4/6/8``, ``copy``) or ``"custom"`` (then ``templates``,
            ``wildcards`` and ``labels`` are required).
        templates: templates of equal length L, pairwise not equal up to renaming wildcards;
            each a string (one symbol per character, or whitespace-separated) or a sequence
            of symbol names.
        wildcards: the wildcard symbols; every other template symbol must be in ``regular``.
        regular: fixed regular tokens (in templates, or as multiclass labels).
        labels: one per template: a real (regression), a class id >= 0 (classification) or
            a symbol (multiclass: a wildcard of that template, or a regular token). ``None``
            takes the preset's labels for ``label_type``.
        label_type: ``"regression"``, ``"classification"`` or ``"multiclass"``.
        template_probs: probability of each template (default uniform).
        train_alphabet_size: n, the number of distinct training symbols.
        val_alphabet_size: symbols of the validation alphabet.
        test_alphabet_size: symbols of the test alphabet (the unseen-symbol split).
        data_mode: ``"online"`` (fresh strings every draw) or ``"fixed"`` (the train split
            resamples ``n_train`` strings drawn once).
        n_train: size of the fixed training set (default n = train_alphabet_size).
        train_set_seed: seed of the fixed training set.
    """

    preset: str = "aba_abb"
    templates: tuple | None = None
    wildcards: tuple | None = None
    regular: tuple = ()
    labels: tuple | None = None
    label_type: str = "regression"
    template_probs: tuple | None = None
    train_alphabet_size: int = 512
    val_alphabet_size: int = 256
    test_alphabet_size: int = 1024
    data_mode: str = "online"
    n_train: int | None = None
    train_set_seed: int = 0

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if self.label_type not in LABEL_TYPES:
            raise _invalid("label_type", self.label_type, f"one of {LABEL_TYPES}")
        if self.preset == "custom":
            for name in ("templates", "wildcards", "labels"):
                if getattr(self, name) is None:
                    raise _invalid(name, None, "a value when preset='custom'")
        elif self.preset in PRESETS:
            if self.templates is not None or self.wildcards is not None:
                raise ValueError(
                    f"templates/wildcards are given with preset={self.preset!r}: pass "
                    "preset='custom' to define your own task set"
                )
            templates, wildcards, values, symbolic = PRESETS[self.preset]
            put("templates", templates)
            put("wildcards", tuple(wildcards))
            if self.labels is None:
                put("labels", self._preset_labels(values, symbolic))
        else:
            raise _invalid("preset", self.preset, f"one of {[*PRESETS, 'custom']}")

        templates = tuple(_symbols(t) for t in self.templates)  # type: ignore[union-attr]
        wildcards = _symbols(self.wildcards) if isinstance(self.wildcards, str) else None
        wildcards = wildcards or tuple(self.wildcards)  # type: ignore[arg-type]
        regular = tuple(self.regular)
        put("templates", templates)
        put("wildcards", wildcards)
        put("regular", regular)
        if not templates:
            raise _invalid("templates", templates, "at least one template")
        for name, names in (("wildcards", wildcards), ("regular", regular)):
            if len(set(names)) != len(names) or not all(isinstance(s, str) for s in names):
                raise _invalid(name, names, "distinct symbol names (str)")
        if QUERY in regular or QUERY in wildcards:
            raise _invalid("regular", regular, f"symbols other than the reserved {QUERY!r}")
        both = set(wildcards) & set(regular)
        if both:
            raise ValueError(f"symbols {sorted(both)} are both wildcards and regular tokens")
        lengths = [len(t) for t in templates]
        if min(lengths) == 0 or len(set(lengths)) > 1:
            raise ValueError(
                f"templates={templates!r} is invalid: templates must be non-empty and of equal "
                f"length, got lengths {lengths}"
            )
        for i, t in enumerate(templates):
            unknown = sorted(set(t) - set(wildcards) - set(regular))
            if unknown:
                raise ValueError(
                    f"template {i} {' '.join(t)!r} uses {unknown}, neither a wildcard "
                    f"{wildcards} nor a regular token {regular}"
                )
        seen: dict[tuple, int] = {}
        for i, t in enumerate(templates):
            j = seen.setdefault(canonical(t, wildcards), i)
            if j != i:
                raise ValueError(
                    f"templates {j} {' '.join(templates[j])!r} and {i} {' '.join(t)!r} are "
                    "equal up to renaming wildcards: no string could tell them apart"
                )
        self._check_labels(templates, wildcards, regular)
        r = len(templates)
        if self.template_probs is not None:
            probs = tuple(float(p) for p in self.template_probs)
            if (
                len(probs) != r
                or not all(math.isfinite(p) and p >= 0 for p in probs)
                or abs(sum(probs) - 1.0) > 1e-6
            ):
                raise _invalid(
                    "template_probs", self.template_probs, f"{r} floats >= 0 summing to 1"
                )
            put("template_probs", probs)
        need = max(len(set(t) & set(wildcards)) for t in templates)
        if need == 0:
            raise _invalid("templates", templates, "at least one wildcard in some template")
        for name in ("train_alphabet_size", "val_alphabet_size", "test_alphabet_size"):
            size = getattr(self, name)
            if not _is_int(size) or size < need:
                raise _invalid(
                    name,
                    size,
                    f"an int >= {need} (a template has {need} wildcards and "
                    "substitution draws distinct symbols)",
                )
        if self.data_mode not in DATA_MODES:
            raise _invalid("data_mode", self.data_mode, f"one of {DATA_MODES}")
        if self.n_train is not None and (not _is_int(self.n_train) or self.n_train < 1):
            raise _invalid("n_train", self.n_train, "None (= train_alphabet_size) or an int >= 1")
        if not _is_int(self.train_set_seed) or self.train_set_seed < 0:
            raise _invalid("train_set_seed", self.train_set_seed, "an int >= 0")

    def _preset_labels(self, values: tuple | None, symbolic: tuple | None) -> tuple:
        if self.label_type == "multiclass":
            if symbolic is not None:
                return symbolic
            return tuple(f"{v:+g}" for v in values)  # regular label tokens "+1" / "-1"
        if values is None:
            raise _invalid(
                "label_type",
                self.label_type,
                f"'multiclass' for preset={self.preset!r} (its labels are symbols)",
            )
        if self.label_type == "regression":
            return values
        classes = sorted(set(values))
        return tuple(classes.index(v) for v in values)

    def _check_labels(self, templates, wildcards, regular) -> None:
        labels = tuple(self.labels)  # type: ignore[arg-type]
        if len(labels) != len(templates):
            raise _invalid("labels", self.labels, f"one label per template ({len(templates)})")
        if self.label_type == "regression":
            if not all(
                isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y)
                for y in labels
            ):
                raise _invalid("labels", self.labels, "finite reals for label_type='regression'")
            labels = tuple(float(y) for y in labels)
        elif self.label_type == "classification":
            if not all(_is_int(y) and y >= 0 for y in labels):
                raise _invalid("labels", self.labels, "class ids >= 0 for 'classification'")
        else:
            if self.preset in PRESETS and self.preset != "copy" and not regular:
                regular = tuple(dict.fromkeys(labels))  # the preset's "+1" / "-1" tokens
                object.__setattr__(self, "regular", regular)
            for i, (y, t) in enumerate(zip(labels, templates, strict=True)):
                if y in wildcards and y not in t:
                    raise ValueError(
                        f"label {y!r} of template {i} {' '.join(t)!r} is a wildcard absent "
                        "from that template"
                    )
                if y not in wildcards and y not in regular:
                    raise ValueError(
                        f"label {y!r} of template {i} is neither a wildcard nor a regular "
                        f"token {regular}"
                    )
        object.__setattr__(self, "labels", labels)

    @property
    def num_templates(self) -> int:
        return len(self.templates)  # type: ignore[arg-type]

    @property
    def template_len(self) -> int:
        """L, symbols per template (sequences are L + 1 tokens with QUERY)."""
        return len(self.templates[0])  # type: ignore[index]


class SymbolTemplateTask(Task):
    """Sampler, exact template-matching oracle and strategies for :class:`SymbolTemplateSpec`."""

    name = "symbol_template"
    spec: SymbolTemplateSpec

    def __init__(self, spec: SymbolTemplateSpec | None = None, **kwargs: object) -> None:
        if spec is not None and kwargs:
            raise ValueError("pass either a spec or keyword arguments, not both")
        super().__init__(spec if spec is not None else SymbolTemplateSpec(**kwargs))  # type: ignore[arg-type]
        s = self.spec
        w, L = s.wildcards, s.template_len
        # ---- vocabulary
        label_tokens: list[str] = []
        if s.label_type == "regression":
            self.label_set = tuple(sorted(set(s.labels)))
            label_tokens = [f"<y={v:g}>" for v in self.label_set]
        elif s.label_type == "classification":
            self.label_set = tuple(range(max(s.labels) + 1))
            label_tokens = [f"<class {c}>" for c in self.label_set]
        names = [*w, *s.regular, *label_tokens, QUERY]
        self.token_names = names
        self.ids = {name: i for i, name in enumerate(names)}
        self.query_id = self.ids[QUERY]
        starts, size = {}, len(names)
        for split, n in zip(
            SPLITS, (s.train_alphabet_size, s.val_alphabet_size, s.test_alphabet_size), strict=True
        ):
            starts[split] = (size, n)
            size += n
        self.alphabets: Mapping[str, tuple[int, int]] = starts
        """split -> (first id, size) of its alphabet."""
        self.alphabet_start = len(names)
        self._vocab_size = size
        # ---- per-template tables (r, L): wildcard slot (order of first appearance) or -1,
        # fixed id of regular positions, first position of the same wildcard
        r = s.num_templates
        slot = torch.full((r, L), -1, dtype=torch.long)
        fixed = torch.zeros((r, L), dtype=torch.long)
        first = torch.arange(L).repeat(r, 1)
        new = torch.zeros((r, L), dtype=torch.bool)
        bound_before = torch.zeros((r, L), dtype=torch.long)  # distinct wildcards before s
        label_slot = torch.full((r,), -1, dtype=torch.long)
        label_fixed = torch.zeros((r,), dtype=torch.long)
        for z, t in enumerate(s.templates):
            order: dict[str, int] = {}
            where: dict[str, int] = {}
            for p, sym in enumerate(t):
                bound_before[z, p] = len(order)
                if sym in w:
                    new[z, p] = sym not in order
                    slot[z, p] = order.setdefault(sym, len(order))
                    first[z, p] = where.setdefault(sym, p)
                else:
                    fixed[z, p] = self.ids[sym]
            y = s.labels[z]
            if s.label_type == "multiclass" and y in w:
                label_slot[z] = order[y]
            elif s.label_type == "multiclass":
                label_fixed[z] = self.ids[y]
            else:
                label_fixed[z] = self.ids[label_tokens[self.label_set.index(y)]]
        self.num_slots = max(len(set(t) & set(w)) for t in s.templates)
        self._slot, self._fixed, self._first, self._new = slot, fixed, first, new
        self._bound_before = bound_before
        self._label_slot, self._label_fixed = label_slot, label_fixed
        probs = s.template_probs or (1.0 / r,) * r
        self._probs = torch.tensor(probs, dtype=torch.float64)
        # Next-token source at position t (predicting token t + 1), t = 0 .. L:
        # kind 0 = a fixed id, 1 = a copy of the token at position src, 2 = a new wildcard.
        kind = torch.zeros((r, L + 1), dtype=torch.long)
        src = torch.zeros((r, L + 1), dtype=torch.long)
        nxt = torch.zeros((r, L + 1), dtype=torch.long)
        for t in range(L + 1):
            u = t + 1
            if u < L:
                is_w = slot[:, u] >= 0
                kind[:, t] = torch.where(is_w, torch.where(new[:, u], 2, 1), 0)
                src[:, t], nxt[:, t] = first[:, u], fixed[:, u]
            elif u == L:
                nxt[:, t] = self.query_id
            else:  # the label
                lw = label_slot >= 0
                kind[:, t] = lw.long()
                label_pos = (slot == label_slot[:, None]).long().argmax(1)
                src[:, t] = torch.where(lw, label_pos, 0)
                nxt[:, t] = label_fixed
        self._next_kind, self._next_src, self._next_fixed = kind, src, nxt
        # Equality pattern of wildcard pairs (s' < s) that a consistent string must show.
        is_w = slot >= 0
        pair = is_w[:, :, None] & is_w[:, None, :] & torch.ones(L, L, dtype=torch.bool).tril(-1)
        self._pair = pair
        self._same = slot[:, :, None] == slot[:, None, :]

    # ------------------------------------------------------------------ the contract
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def seq_len(self) -> int:
        return self.spec.template_len + 1

    @property
    def first_scored_position(self) -> int:
        return self.spec.template_len

    @cached_property
    def label_values(self) -> Tensor | None:
        """(V,) float32: the value of each regression label token, NaN elsewhere (None
        unless ``label_type="regression"``)."""
        if self.spec.label_type != "regression":
            return None
        values = torch.full((self.vocab_size,), math.nan)
        for v in self.label_set:
            values[self.ids[f"<y={v:g}>"]] = v
        return values

    def _draw_distinct(self, batch: int, size: int, gen: torch.Generator, device) -> Tensor:
        """(batch, m) distinct ids in [0, size) per row, uniformly (m = :attr:`num_slots`)."""
        m = self.num_slots  # >= 1: the spec requires a wildcard
        if size <= TOPK_MAX_ALPHABET:
            keys = torch.rand(batch, size, generator=gen, device=device)
            return keys.topk(m, dim=1).indices
        draws = torch.randint(size, (batch, m), generator=gen, device=device)
        while True:
            eq = draws[:, :, None] == draws[:, None, :]
            bad = eq.triu(1).any(-1).any(-1)
            count = int(bad.sum())
            if count == 0:
                return draws
            draws[bad] = torch.randint(size, (count, m), generator=gen, device=device)

    def _draw(self, batch_size: int, split: str, gen: torch.Generator, device) -> Batch:
        start, size = self.alphabets[split]
        z = torch.multinomial(self._probs.to(device), batch_size, replacement=True, generator=gen)
        draws = self._draw_distinct(batch_size, size, gen, device) + start
        slot, fixed = self._slot.to(device)[z], self._fixed.to(device)[z]
        body = torch.where(slot >= 0, draws.gather(1, slot.clamp_min(0)), fixed)
        query = torch.full((batch_size, 1), self.query_id, dtype=torch.long, device=device)
        tokens = torch.cat([body, query], 1)
        lslot = self._label_slot.to(device)[z]
        label = torch.where(
            lslot >= 0,
            draws.gather(1, lslot.clamp_min(0)[:, None])[:, 0],
            self._label_fixed.to(device)[z],
        )
        params = {
            "template_id": z,
            "substitution": draws,
            "alphabet_start": torch.full((batch_size,), start, device=device),
            "alphabet_size": torch.full((batch_size,), size, device=device),
        }
        if self.label_values is not None:
            params["label_value"] = self.label_values.to(device)[label]
        return self._batch(tokens, label, params)

    def _batch(self, tokens: Tensor, label: Tensor, params: dict[str, Tensor]) -> Batch:
        targets = torch.cat([tokens[:, 1:], label[:, None]], 1)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[:, -1] = True
        return Batch(
            tokens=tokens,
            targets=targets,
            loss_mask=mask,
            params=params,
            vocab_size=self.vocab_size,
            true_probs_fn=self.true_probs,
        )

    def train_set(self, device: torch.device | str = "cpu") -> Batch:
        """The fixed training set: ``n_train`` (default n) strings of the train alphabet, a
        function of ``train_set_seed`` only (its own seed stream)."""
        n = self.spec.n_train or self.spec.train_alphabet_size
        gen = torch.Generator(device=device).manual_seed(
            stream_seed(self.spec.train_set_seed, FIXED_SET_STREAM)
        )
        return self._draw(n, "train", gen, torch.device(device))

    @cached_property
    def _cached_train_set(self) -> Batch:
        return self.train_set()

    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> Batch:
        """``batch_size`` strings of the generator's split (see :func:`generator_split`); in
        ``data_mode="fixed"`` the train split draws rows of :meth:`train_set` uniformly."""
        check_batch_size(batch_size)
        device = torch.device(device) if device is not None else generator.device
        split = generator_split(generator)
        if split == "train" and self.spec.data_mode == "fixed":
            fixed = self._cached_train_set
            rows = torch.randint(
                fixed.batch_size, (batch_size,), generator=generator, device=generator.device
            ).cpu()
            params = {k: v[rows].to(device) for k, v in fixed.params.items()}
            return self._batch(
                fixed.tokens[rows].to(device), fixed.targets[rows, -1].to(device), params
            )
        return self._draw(batch_size, split, generator, device)

    # ------------------------------------------------------------ laws and the oracle
    def _consistent(self, tokens: Tensor) -> Tensor:
        """(B, r, T) bool: prefix ``tokens[:, : t + 1]`` can come from template z."""
        L = self.spec.template_len
        x = tokens[:, :L]
        dev = x.device
        slot, fixed = self._slot.to(dev), self._fixed.to(dev)
        eq = x[:, None, :, None] == x[:, None, None, :]  # (B, 1, L, L)
        pattern_ok = (~self._pair.to(dev) | (eq == self._same.to(dev))).all(-1)  # (B, r, L)
        is_symbol = (x >= self.alphabet_start)[:, None, :]
        ok = torch.where(slot >= 0, is_symbol & pattern_ok, x[:, None, :] == fixed)
        prefix = ok.long().cumprod(-1).bool()
        query_ok = prefix[:, :, -1:] & (tokens[:, None, L:] == self.query_id)
        return torch.cat([prefix, query_ok], -1)

    def _log_weights(self, batch: Batch) -> Tensor:
        """(B, r, T) log P(template, prefix): the prior times 1 / (A - k) per new wildcard."""
        size = batch.params["alphabet_size"].to(torch.float64)[:, None, None]
        dev = batch.tokens.device
        new, k = self._new.to(dev), self._bound_before.to(dev).to(torch.float64)
        step = torch.where(new, -(size - k).log(), torch.zeros((), dtype=torch.float64))
        logw = self._probs.to(dev).log()[None, :, None] + step.cumsum(-1)
        return torch.cat([logw, logw[:, :, -1:]], -1)

    def _laws(self, batch: Batch, post: Tensor) -> Tensor:
        """(B, T, V) next-token laws: the mixture over templates with weights post (B, r, T)."""
        tokens = batch.tokens
        B, T = tokens.shape
        dev = tokens.device
        post = post.to(torch.float32)
        start, size = batch.params["alphabet_start"], batch.params["alphabet_size"]
        ids = torch.arange(self.vocab_size, device=dev)
        alphabet = (ids >= start[:, None]) & (ids < (start + size)[:, None])  # (B, V)
        seen = torch.zeros(B, self.vocab_size, dtype=torch.bool, device=dev)
        kind, src = self._next_kind.to(dev), self._next_src.to(dev)
        nxt = self._next_fixed.to(dev)
        out = torch.zeros(B, T, self.vocab_size, device=dev)
        for t in range(T):
            x = tokens[:, t]
            seen[torch.arange(B, device=dev), x] |= x >= self.alphabet_start
            p = post[:, :, t]  # (B, r)
            point = torch.where(kind[:, t] == 1, tokens[:, src[:, t]], nxt[:, t])  # (B, r)
            out[:, t].scatter_add_(1, point, p * (kind[:, t] != 2))
            p_new = (p * (kind[:, t] == 2)).sum(1, keepdim=True)
            free = alphabet & ~seen
            out[:, t] += p_new * free / free.sum(1, keepdim=True).clamp_min(1)
        return out

    def true_probs(self, batch: Batch) -> Tensor:
        """Law of each next token given the sampled template (B, T, V)."""
        z = batch.params["template_id"]
        post = torch.nn.functional.one_hot(z, self.spec.num_templates)
        return self._laws(batch, post[:, :, None].expand(-1, -1, batch.seq_len))

    def posterior(self, batch: Batch) -> Tensor:
        """(B, r, T) P(template | tokens[:, : t + 1]): exact template matching."""
        logw = self._log_weights(batch).masked_fill(~self._consistent(batch.tokens), -math.inf)
        post = torch.softmax(logw, 1)
        return post.nan_to_num(0.0)  # a string no template explains gets no point mass

    def oracle(self, batch: Batch) -> Tensor:
        """Bayes next-token log-probs; at the label position the matched template's label."""
        return self._laws(batch, self.posterior(batch)).clamp_min(LOG_FLOOR).log()

    def match(self, tokens: Tensor) -> Tensor:
        """(B,) the template each string matches (-1 if none): the exact template matcher."""
        ok = self._consistent(tokens)[:, :, -1]
        return torch.where(ok.any(1), ok.long().argmax(1), -1)

    @property
    def strategies(self) -> Mapping[str, Strategy]:
        """``uniform`` over the vocabulary, and ``template_prior``: the next-token laws mixed
        with the prior template weights, i.e. blind to which template the string matches (the
        chance level at the label position: MSE 1 / error 0.5 for the +-1 presets)."""

        def template_prior(batch: Batch) -> Tensor:
            post = self._probs.to(batch.tokens.device)[None, :, None]
            post = post.expand(batch.batch_size, -1, batch.seq_len)
            return self._laws(batch, post).clamp_min(LOG_FLOOR).log()

        def uniform(batch: Batch) -> Tensor:
            shape = (*batch.tokens.shape, self.vocab_size)
            return torch.full(shape, -math.log(self.vocab_size), device=batch.tokens.device)

        return {"uniform": uniform, "template_prior": template_prior}

    def describe_string(self, tokens: Sequence[int]) -> str:
        """Token ids as names (alphabet symbols as ``split:index``)."""
        out = []
        for i in tokens:
            i = int(i)
            if i < self.alphabet_start:
                out.append(self.token_names[i])
                continue
            for split, (start, size) in self.alphabets.items():
                if start <= i < start + size:
                    out.append(f"{split}:{i - start}")
        return " ".join(out)
