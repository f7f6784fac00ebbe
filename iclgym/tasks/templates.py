"""Template tasks over abstract symbols (Boix-Adserà et al. 2024, arXiv 2310.09753).

A task is a list of templates over wildcards (variables) and fixed regular tokens, e.g. ABA
and ABB. A string is made by picking a template and substituting the wildcards injectively
(distinct wildcards get distinct tokens) with symbols of the split's alphabet; its label is a
deterministic function of the template: a real number (regression), a class id
(classification) or a token (``"multiclass"``: a wildcard, whose substituted symbol is the
label, or a regular token). Train, validation and test use disjoint alphabets, so the test
split measures generalisation to symbols never seen in training
(``docs/envs/ICL-SymbolTemplate-v0.md``).

**Vocabulary** (after the reference code's, ``eboix/relational-reasoning``): wildcards | regular
tokens (the declared ones, then one token per regression value or class, then the QUERY token) | the
symbol pool: train alphabet | validation alphabet | test alphabet, contiguous by default or placed
by ``alphabet_offsets`` (disjoint, gaps allowed). Wildcard ids are reserved and never appear in
data.

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
(:meth:`SymbolTemplateTask.train_set`, a function of ``train_set_seed`` only); the laws and the
oracle stay those of the template law (fresh substitutions), not of that finite set, at the
context positions: they are never scored (the label position, the only scored one, is
one-hot under both).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from itertools import accumulate, combinations, product

import numpy as np
import torch
from numba import njit
from torch import Tensor

from iclgym.tasks import kernels
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
from iclgym.validation import check_memory, check_sequence_memory, is_int, is_real

LABEL_TYPES = ("regression", "classification", "multiclass")
DATA_MODES = ("online", "fixed")
QUERY = "<query>"
FIXED_SET_STREAM = len(SPLITS) + 1
"""Seed stream of the fixed training set (stream len(SPLITS) is the trainer's dropout)."""
LOG_FLOOR = 1e-30


def _invalid(name: str, value: object, valid: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: expected {valid}")


def _is_int(value: object) -> bool:
    """A Python or numpy integer, not a bool (:func:`iclgym.validation.is_int`)."""
    return is_int(value)


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
class Preset:
    """A built-in task set.

    Attributes:
        templates: the templates (one symbol per character, or whitespace-separated).
        wildcards: the wildcard symbols.
        values: each template's real label, or ``None`` for a template without one (it is
            left out of ``"regression"`` and ``"classification"``).
        symbols: each template's next-token label (a wildcard of it or a regular token);
            ``None``: the real label as a regular token (``"+1"`` / ``"-1"``).
        regular: the regular tokens of the templates.
    """

    templates: tuple[str, ...]
    wildcards: tuple[str, ...]
    values: tuple[float | None, ...]
    symbols: tuple[str, ...] | None = None
    regular: tuple[str, ...] = ()


WILDCARDS = "ABCDEFG"
"""Wildcard names of the generated presets (counting, random)."""
RANDOM_REGULAR = ("x", "y")
"""Regular-token names of the ``random`` preset."""


def _majority(k: int) -> Preset:
    """Every length-k string over {A, B} that starts with A; +1 iff A fills more than half."""
    templates = tuple("A" + "".join(rest) for rest in product("AB", repeat=k - 1))
    values = tuple(1.0 if t.count("A") > k / 2 else -1.0 for t in templates)
    return Preset(templates, ("A", "B"), values)


def _counting(k: int) -> Preset:
    """Counting-k (reconstructed): template c = 1 .. k is the first symbol A repeated c times,
    then k - c distinct other wildcards (k=5: ABCDE, AABCD, ..., AAAAA); the label is c, the
    number of occurrences of the first symbol (equivalently k - c + 1 distinct symbols). One
    template per count, so uniform ``template_probs`` make the k classes uniform (chance error
    1 - 1/k: 0.80 for k=5, 0.86 for k=7). Regression labels are c, class ids c - 1, next-token
    labels the regular tokens ``count1 .. countk``. ABCDE.. needs alphabets of >= k symbols."""
    counts = range(1, k + 1)
    templates = tuple("A" * c + WILDCARDS[1 : k - c + 1] for c in counts)
    return Preset(
        templates,
        tuple(WILDCARDS[:k]),
        tuple(float(c) for c in counts),
        tuple(f"count{c}" for c in counts),
    )


PRESETS: Mapping[str, Preset] = {
    "same_different": Preset(("AA", "AB"), ("A", "B"), (1.0, -1.0)),
    "aba_abb": Preset(("ABA", "ABB"), ("A", "B"), (1.0, -1.0)),
    "aabb_abab": Preset(("AABB", "ABAB"), ("A", "B"), (1.0, -1.0)),
    **{f"majority{k}": _majority(k) for k in (2, 4, 6, 8)},
    **{f"counting{k}": _counting(k) for k in (5, 7)},
    # Copy: "A B" -> A, the first of two distinct symbols (iclgym's choice; the paper's is
    # not published).
    "copy": Preset(("AB",), ("A", "B"), (None,), ("A",)),
    # Variable binding (Boix-Adserà et al. 2024): "a = +1 ; print ( a )" -> +1 (real) and
    # "a = q ; print ( a )" -> q (symbolic). Regression and classification use the two
    # real-valued templates; "multiclass" adds the symbolic one, whose label is the symbol q
    # (the real ones are labelled by their regular tokens "+1" / "-1").
    "var_binding": Preset(
        ("a = +1 ; print ( a )", "a = -1 ; print ( a )", "a = q ; print ( a )"),
        ("a", "q"),
        (1.0, -1.0, None),
        ("+1", "-1", "q"),
        ("=", ";", "print", "(", ")", "+1", "-1"),
    ),
}
"""Built-in task sets (the generated ``"random"`` preset is :func:`random_preset`)."""

RANDOM_RANGES: Mapping[str, tuple[int, int]] = {
    "random_num_templates": (2, 15),
    "random_length": (2, 20),
    "random_wildcards": (2, 7),
    "random_regular": (0, 2),
}
"""Valid ranges (inclusive) of the ``random`` preset's parameters (Boix-Adserà et al. 2024)."""


def num_patterns(length: int, wildcards: int, regular: int) -> int:
    """The number of templates of ``length`` over ``wildcards`` wildcards and ``regular``
    regular tokens that differ up to renaming wildcards and hold at least one wildcard: sum
    over m wildcard positions of C(L, m) |R|^(L - m) times the partitions of the m positions
    into at most |W| blocks (Stirling numbers of the second kind)."""
    stirling = [[1]]  # stirling[m][j]: partitions of m items into j blocks
    for m in range(1, length + 1):
        prev = stirling[-1] + [0]
        stirling.append([0] + [j * prev[j] + prev[j - 1] for j in range(1, m + 1)])
    return sum(
        math.comb(length, m) * regular ** (length - m) * sum(stirling[m][1 : wildcards + 1])
        for m in range(1, length + 1)
    )


@lru_cache(maxsize=64)
def random_preset(
    num_templates: int, length: int, num_wildcards: int, num_regular: int, seed: int
) -> Preset:
    """The ``random`` preset, a pure function of its arguments (an explicit generator seeded
    with ``seed``): templates of ``length`` symbols drawn uniformly from the wildcards
    A, B, ... and the regular tokens x, y, redrawing those without a wildcard or equal up to
    renaming to an earlier one (wildcards renamed by first appearance), then balanced random
    +1 / -1 labels (ceil(r / 2) templates +1 in a random order), so the task is never
    constant and predicting 0 has MSE 1 for even r."""
    available = num_patterns(length, num_wildcards, num_regular)
    if num_templates > available:
        raise ValueError(
            f"random_num_templates={num_templates} is invalid: expected at most {available}, "
            f"the number of templates of random_length={length} over "
            f"random_wildcards={num_wildcards} wildcards and random_regular={num_regular} "
            "regular tokens that differ up to renaming wildcards"
        )
    wildcards = WILDCARDS[:num_wildcards]
    symbols = wildcards + "".join(RANDOM_REGULAR[:num_regular])
    gen = torch.Generator().manual_seed(seed)
    found: dict[tuple, str] = {}
    while len(found) < num_templates:
        draw = [symbols[i] for i in torch.randint(len(symbols), (length,), generator=gen).tolist()]
        key = canonical(draw, wildcards)
        if any(s in wildcards for s in draw) and key not in found:
            found[key] = "".join(WILDCARDS[s] if _is_int(s) else s[1] for s in key)
    positive = torch.randperm(num_templates, generator=gen) < (num_templates + 1) // 2
    return Preset(
        tuple(found.values()),
        tuple(wildcards),
        tuple(1.0 if p else -1.0 for p in positive.tolist()),
        regular=RANDOM_REGULAR[:num_regular],
    )


@dataclass(frozen=True)
class SymbolTemplateSpec(TaskSpec):
    """Parameters of a template task (``docs/envs/ICL-SymbolTemplate-v0.md``, Arguments).

    Attributes:
        preset: a key of :data:`PRESETS` (``same_different``, ``aba_abb``, ``aabb_abab``,
            ``majority2/4/6/8``, ``counting5/7``, ``copy``, ``var_binding``), ``"random"``
            (templates drawn by :func:`random_preset` from the ``random_*`` parameters) or
            ``"custom"`` (then ``templates``, ``wildcards`` and ``labels`` are required).
        templates: templates of equal length L, pairwise not equal up to renaming wildcards;
            each a string (one symbol per character, or whitespace-separated) or a sequence
            of symbol names.
        wildcards: the wildcard symbols; every other template symbol must be in ``regular``.
        regular: fixed regular tokens (in templates, or as multiclass labels); a preset puts
            its own first and adds its next-token labels.
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
        alphabet_offsets: start of the train, validation and test alphabets inside the symbol
            pool (ids from :attr:`SymbolTemplateTask.alphabet_start`), ints >= 0 whose ranges
            must not overlap (gaps are unused ids). ``None``: contiguous blocks in that order.
            Fixed offsets keep the vocabulary and the test ids unchanged while n is swept.
        random_num_templates: r, templates of the ``random`` preset (2 .. 15).
        random_length: L, their length (2 .. 20; default 5, the shortest for which every r
            is possible with 2 wildcards and no regular token).
        random_wildcards: |W|, wildcards they draw from (2 .. 7).
        random_regular: |R|, regular tokens they draw from (0 .. 2).
        random_seed: seed of the template and label draw (>= 0).
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
    alphabet_offsets: tuple[int, int, int] | None = None
    random_num_templates: int = 2
    random_length: int = 5
    random_wildcards: int = 2
    random_regular: int = 0
    random_seed: int = 0

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if self.label_type not in LABEL_TYPES:
            raise _invalid("label_type", self.label_type, f"one of {LABEL_TYPES}")
        self._check_random()
        if self.preset == "custom":
            for name in ("templates", "wildcards", "labels"):
                if getattr(self, name) is None:
                    raise _invalid(name, None, "a value when preset='custom'")
        elif self.preset in PRESETS or self.preset == "random":
            if self.templates is not None or self.wildcards is not None:
                raise ValueError(
                    f"templates/wildcards are given with preset={self.preset!r}: pass "
                    "preset='custom' to define your own task set"
                )
            self._use_preset(self._preset())
        else:
            raise _invalid("preset", self.preset, f"one of {[*PRESETS, 'random', 'custom']}")

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
            listed = isinstance(self.template_probs, (Sequence, np.ndarray))
            given = tuple(self.template_probs) if listed else ()
            probs = tuple(float(p) if is_real(p) else math.nan for p in given)
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
            put(name, int(size))
        if self.data_mode not in DATA_MODES:
            raise _invalid("data_mode", self.data_mode, f"one of {DATA_MODES}")
        if self.n_train is not None and (not _is_int(self.n_train) or self.n_train < 1):
            raise _invalid("n_train", self.n_train, "None (= train_alphabet_size) or an int >= 1")
        if self.n_train is not None:
            put("n_train", int(self.n_train))
        if not _is_int(self.train_set_seed) or self.train_set_seed < 0:
            raise _invalid("train_set_seed", self.train_set_seed, "an int >= 0")
        put("train_set_seed", int(self.train_set_seed))
        if self.alphabet_offsets is not None:
            self._check_offsets()
        self._check_memory()

    def _check_memory(self) -> None:
        """Refuse, before anything is allocated, a vocabulary or fixed training set too large
        for memory (:func:`iclgym.validation.check_sequence_memory`: 64 sequences with their
        two float32 next-token laws over the whole vocabulary), naming the parameter that
        makes it large: an alphabet size, ``alphabet_offsets`` or the class ids in ``labels``."""
        classes = max(self.labels) + 1 if self.label_type == "classification" else 0
        values = len(set(self.labels)) if self.label_type == "regression" else 0
        names = len(self.wildcards) + len(self.regular) + values + classes + 1
        ranges = self.alphabet_ranges
        vocab = names + max(hi for _, hi in ranges)
        sizes = ("train_alphabet_size", "val_alphabet_size", "test_alphabet_size")
        split = max(range(len(SPLITS)), key=lambda i: ranges[i][1] - ranges[i][0])
        name = sizes[split]  # the largest alphabet, or the offsets that place one far out
        if self.alphabet_offsets is not None:
            split = max(range(len(SPLITS)), key=lambda i: ranges[i][1])
            lo, hi = ranges[split]
            name = "alphabet_offsets" if lo > hi - lo else sizes[split]
        if classes > max(hi for _, hi in ranges):
            name = "labels"
        check_sequence_memory(name, getattr(self, name), self.template_len + 1, vocab)
        n = self.n_train if self.n_train is not None else self.train_alphabet_size
        check_memory(
            "n_train" if self.n_train is not None else "train_alphabet_size",
            n,
            n * (self.template_len + 2) * 8 * 3,
            f"the fixed training set of {n} strings (int64 tokens, targets and draws)",
        )

    def _check_random(self) -> None:
        """The ``random_*`` parameters: ints in :data:`RANDOM_RANGES`, used by preset='random'
        only (a non-default value with another preset would be silently ignored)."""
        checks = {**RANDOM_RANGES, "random_seed": (0, None)}
        for name, (lo, hi) in checks.items():
            value = getattr(self, name)
            if not _is_int(value) or value < lo or (hi is not None and value > hi):
                valid = f"an int in {lo} .. {hi}" if hi is not None else f"an int >= {lo}"
                raise _invalid(name, value, valid)
            object.__setattr__(self, name, int(value))
            if self.preset != "random" and value != type(self).__dataclass_fields__[name].default:
                raise ValueError(
                    f"{name}={value!r} is given with preset={self.preset!r}: the random_* "
                    "parameters apply to preset='random' only"
                )

    def _preset(self) -> Preset:
        if self.preset != "random":
            return PRESETS[self.preset]
        return random_preset(
            self.random_num_templates,
            self.random_length,
            self.random_wildcards,
            self.random_regular,
            self.random_seed,
        )

    def _use_preset(self, preset: Preset) -> None:
        """Take the preset's templates, wildcards and regular tokens, and its labels for
        ``label_type`` unless ``labels`` is given. Templates without a real label are left out
        of regression and classification; classes are the sorted distinct real labels."""
        multiclass = self.label_type == "multiclass"
        keep = [i for i, v in enumerate(preset.values) if multiclass or v is not None]
        if not keep:
            raise _invalid(
                "label_type",
                self.label_type,
                f"'multiclass' for preset={self.preset!r} (its labels are symbols)",
            )
        values = [preset.values[i] for i in keep]
        if multiclass:
            symbols = preset.symbols or tuple(f"{v:+g}" for v in preset.values)  # "+1", "-1"
            labels = tuple(symbols[i] for i in keep)
        elif self.label_type == "regression":
            labels = tuple(values)
        else:
            classes = sorted(set(values))
            labels = tuple(classes.index(v) for v in values)
        labels = labels if self.labels is None else self.labels
        label_tokens = [y for y in labels if isinstance(y, str) and y not in preset.wildcards]
        regular = (*preset.regular, *self.regular, *(label_tokens if multiclass else ()))
        object.__setattr__(self, "templates", tuple(preset.templates[i] for i in keep))
        object.__setattr__(self, "wildcards", preset.wildcards)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "regular", tuple(dict.fromkeys(regular)))

    def _check_offsets(self) -> None:
        offsets = self.alphabet_offsets
        if (
            not isinstance(offsets, (Sequence, np.ndarray))
            or np.ndim(offsets) != 1
            or len(offsets) != len(SPLITS)
            or not all(_is_int(o) and o >= 0 for o in offsets)
        ):
            raise _invalid("alphabet_offsets", offsets, "None or 3 ints >= 0 (train, val, test)")
        object.__setattr__(self, "alphabet_offsets", tuple(int(o) for o in offsets))
        for (a, (lo_a, hi_a)), (b, (lo_b, hi_b)) in combinations(
            zip(SPLITS, self.alphabet_ranges, strict=True), 2
        ):
            if lo_a < hi_b and lo_b < hi_a:
                raise ValueError(
                    f"alphabet_offsets={offsets!r} is invalid: the {a} alphabet [{lo_a}, {hi_a}) "
                    f"and the {b} alphabet [{lo_b}, {hi_b}) overlap; splits must be disjoint"
                )

    def _check_labels(self, templates, wildcards, regular) -> None:
        labels = tuple(self.labels)  # type: ignore[arg-type]
        if len(labels) != len(templates):
            raise _invalid("labels", self.labels, f"one label per template ({len(templates)})")
        if self.label_type == "regression":
            if not all(is_real(y) and math.isfinite(y) for y in labels):
                raise _invalid("labels", self.labels, "finite reals for label_type='regression'")
            labels = tuple(float(y) for y in labels)
        elif self.label_type == "classification":
            if not all(_is_int(y) and y >= 0 for y in labels):
                raise _invalid("labels", self.labels, "class ids >= 0 for 'classification'")
            labels = tuple(int(y) for y in labels)
        else:
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

    @property
    def alphabet_ranges(self) -> tuple[tuple[int, int], ...]:
        """[start, stop) of the train, validation and test alphabets inside the symbol pool:
        from ``alphabet_offsets``, or contiguous blocks in that order."""
        sizes = (self.train_alphabet_size, self.val_alphabet_size, self.test_alphabet_size)
        offsets = self.alphabet_offsets or tuple(accumulate(sizes[:-1], initial=0))
        return tuple((o, o + n) for o, n in zip(offsets, sizes, strict=True))


@njit(cache=True, nogil=True)
def _template_draw(  # pragma: no cover - compiled
    words, digit_word, digit_what, digit_range, cdf, start, sources, tokens, targets, z, slots_out
):
    """:meth:`SymbolTemplateTask._draw` one row at a time: the same digits of the same words,
    the same slot fixed points and column sources, so the same integers."""
    num_slots = slots_out.shape[1]
    width = tokens.shape[1]
    slots = np.empty(max(num_slots, 1), dtype=np.int64)
    for r in range(words.shape[0]):
        template = 0
        value = np.uint64(0)
        previous = -1
        for i in range(digit_word.shape[0]):
            if digit_word[i] != previous:
                previous = digit_word[i]
                value = words[r, previous]
            what = digit_what[i]
            if what == -2:  # searchsorted(cdf, u, side="right"): the entries <= u
                u = np.float64(value >> np.uint64(10)) * 2.0**-53
                template = 0
                for m in range(cdf.shape[0]):
                    template += cdf[m] <= u
                continue
            quotient = value // digit_range[i]
            digit = np.int64(value - quotient * digit_range[i])
            value = quotient
            if what == -1:
                template = digit
            else:
                slots[what] = digit
        for j in range(1, num_slots):  # the least fixed point of x = d + #{earlier <= x}
            d = slots[j]
            x = d
            for _ in range(j):
                below = 0
                for e in range(j):
                    below += slots[e] <= x
                x = d + below
            slots[j] = x
        z[r] = template
        for j in range(num_slots):
            slots_out[r, j] = slots[j] + start
        for j in range(sources.shape[0]):
            source = sources[j, template]
            column = source if source >= 0 else slots[-1 - source] + start
            if j < width:
                tokens[r, j] = column
            if j > 0:
                targets[r, j - 1] = column


class PatternMatcher:
    """Exact template matching of strings by bit patterns, in a few (B,) numpy ops.

    A string ``x_0 .. x_L`` (L template symbols, then QUERY) is summarised by yes/no tests:
    ``x_p`` is a symbol (id >= ``alphabet_start``) for every position where some template has
    a wildcard; ``x_p`` is regular id i for every (position, id) that some template has;
    ``x_p = x_q`` for every pair where some template has wildcards at both; ``x_L`` is QUERY.
    A string can come from template z (every wildcard a symbol, distinct wildcards distinct
    symbols, regular tokens in place) iff its tests equal z's, whose answers follow from the
    template (equal slots, or equal regular ids). The answers are packed into 64-bit keys;
    strings are matched by a lookup table (<= 16 tests) or by comparing keys.
    """

    def __init__(
        self,
        slot: np.ndarray,
        fixed: np.ndarray,
        templates: Sequence[int],
        query_id: int,
        alphabet_start: int,
    ) -> None:
        L = slot.shape[1]
        wild = slot >= 0
        tests: list[tuple] = [("symbol", p) for p in range(L) if wild[:, p].any()]
        tests += [
            ("id", p, i)
            for p, i in sorted(
                {(p, int(fixed[z, p])) for z, p in zip(*np.nonzero(~wild), strict=True)}
            )
        ]
        tests += [
            ("equal", p, q)
            for p in range(L)
            for q in range(p + 1, L)
            if (wild[:, p] & wild[:, q]).any()
        ]
        tests.append(("id", L, query_id))
        self.tests, self.alphabet_start = tests, alphabet_start

        def answer(z: int, test: tuple) -> bool:
            kind, p = test[0], test[1]
            if kind == "symbol":
                return bool(wild[z, p])
            if kind == "id":
                return p == L or (not wild[z, p] and int(fixed[z, p]) == test[2])
            q = test[2]
            if wild[z, p] and wild[z, q]:
                return bool(slot[z, p] == slot[z, q])
            return not wild[z, p] and not wild[z, q] and fixed[z, p] == fixed[z, q]

        answers = np.array([[answer(z, test) for z in templates] for test in tests])
        self.templates = np.asarray(templates, dtype=np.int64)
        self.keys = self._pack(answers.reshape(len(tests), len(templates)))  # (chunks, r')
        self.table = None
        if len(tests) <= 16:
            self.table = np.full(2 ** len(tests), -1, dtype=np.int64)
            self.table[self.keys[0]] = self.templates
        order = np.argsort(self.keys[0])
        self.sorted_keys = self.keys[0][order].astype(np.uint64)
        self.sorted_templates = self.templates[order]

    @staticmethod
    def _pack(answers: np.ndarray) -> np.ndarray:
        """(ceil(tests / 64), n) keys from (tests, n) bool answers, bit k of chunk c being
        test 64 c + k: uint8 for <= 8 tests, uint16 for <= 16, else uint64 (bytes by an
        or-reduction of shifted uint8 rows, fast along the long axis)."""
        shifts = np.arange(8, dtype=np.uint8)[:, None]
        data = answers.view(np.uint8)
        nbytes = -(-answers.shape[0] // 8)
        dtype = np.uint8 if nbytes == 1 else np.uint16 if nbytes == 2 else np.uint64
        words = []
        for c in range(0, answers.shape[0], 64):
            word = None
            for k, b in enumerate(range(c, min(c + 64, answers.shape[0]), 8)):
                chunk = data[b : b + 8]
                byte = np.bitwise_or.reduce(chunk << shifts[: len(chunk)], 0).astype(dtype)
                word = byte if word is None else word | (byte << dtype(8 * k))
            words.append(word)
        return np.stack(words)

    def match(self, x: np.ndarray) -> np.ndarray:
        """(B,) int64 the template each string of ``x`` (L + 1, B) token-major matches, -1
        for none."""
        answers = np.empty((len(self.tests), x.shape[1]), dtype=np.bool_)
        for row, test in zip(answers, self.tests, strict=True):
            kind, p = test[0], test[1]
            if kind == "symbol":
                np.greater_equal(x[p], self.alphabet_start, out=row)
            elif kind == "id":
                np.equal(x[p], test[2], out=row)
            else:
                np.equal(x[p], x[test[2]], out=row)
        keys = self._pack(answers)
        if self.table is not None:
            return self.table.take(keys[0])
        if keys.shape[0] == 1:  # keys are unique: a sorted search
            key = keys[0].astype(np.uint64)
            i = np.minimum(np.searchsorted(self.sorted_keys, key), len(self.sorted_keys) - 1)
            return np.where(self.sorted_keys[i] == key, self.sorted_templates[i], -1)
        z = np.full(x.shape[1], -1, dtype=np.int64)
        for j, template in enumerate(self.templates.tolist()):
            hit = keys[0] == self.keys[0, j]
            for c in range(1, keys.shape[0]):
                hit &= keys[c] == self.keys[c, j]
            z[hit] = template
        return z


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
        self.alphabet_start = len(names)
        """First id of the symbol pool that holds the three alphabets."""
        ranges = s.alphabet_ranges
        self.alphabets: Mapping[str, tuple[int, int]] = {
            split: (self.alphabet_start + lo, hi - lo)
            for split, (lo, hi) in zip(SPLITS, ranges, strict=True)
        }
        """split -> (first id, size) of its alphabet."""
        self._vocab_size = self.alphabet_start + max(hi for _, hi in ranges)
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
        wildcard_slot = torch.full((r, len(w)), -1, dtype=torch.long)  # per wildcard name
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
            for k, name in enumerate(w):
                wildcard_slot[z, k] = order.get(name, -1)
        self.num_slots = max(len(set(t) & set(w)) for t in s.templates)
        self._slot, self._fixed, self._first, self._new = slot, fixed, first, new
        self._bound_before = bound_before
        self._label_slot, self._label_fixed = label_slot, label_fixed
        self._wildcard_slot = wildcard_slot.numpy()
        probs = s.template_probs or (1.0 / r,) * r
        self._probs = torch.tensor(probs, dtype=torch.float64)
        # ---- sampler (see _draw): each column of x_0 .. x_L (QUERY), y is, per template, a
        # substituted slot ("slot", j) or a fixed id ("id", i); _columns lists the distinct
        # sources of each column and, per template, the index of its source.
        self._uniform_templates = len(set(probs)) == 1
        cdf = np.cumsum(np.asarray(probs, dtype=np.float64))
        cdf[max(i for i, p in enumerate(probs) if p > 0) :] = 1.0  # u < 1 never picks p = 0
        self._cdf = cdf
        self._columns: list[tuple[list[tuple[str, int]], np.ndarray]] = []
        for j in range(L + 2):
            per_template = []
            for z in range(r):
                if j < L:
                    slot_id = int(slot[z, j])
                    source = ("slot", slot_id) if slot_id >= 0 else ("id", int(fixed[z, j]))
                elif j == L:
                    source = ("id", self.query_id)
                else:
                    lw = int(label_slot[z])
                    source = ("slot", lw) if lw >= 0 else ("id", int(label_fixed[z]))
                per_template.append(source)
            sources = list(dict.fromkeys(per_template))
            self._columns.append(
                (sources, np.asarray([sources.index(x) for x in per_template], dtype=np.int64))
            )
        self._layouts: dict[int, list[list[tuple[str, int]]]] = {}
        # the same sources as one (L + 2, r) table for the compiled draw: an id >= 0 or a
        # slot j as -1 - j
        self._sources = np.asarray(
            [
                [i if kind == "id" else -1 - i for kind, i in (sources[x] for x in index)]
                for sources, index in self._columns
            ],
            dtype=np.int64,
        ).reshape(L + 2, r)
        self._digit_tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        # ---- online oracle (numpy): exact template matching by bit patterns (PatternMatcher);
        # templates of probability 0 are left out (the posterior gives them no weight)
        self._matcher = PatternMatcher(
            slot.numpy(),
            fixed.numpy(),
            [z for z in range(r) if probs[z] > 0],
            self.query_id,
            self.alphabet_start,
        )
        label_pos = (slot == label_slot[:, None]).long().argmax(1)
        self._label_pos = torch.where(label_slot >= 0, label_pos, -1).numpy()
        self._label_positions = sorted(set(self._label_pos[self._label_pos >= 0].tolist()))
        self._label_fixed_np = label_fixed.numpy()
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

    @property
    def sample_composes(self) -> bool:
        """True: every random number of a row comes from that row's share of the stream
        (:meth:`_draw`; the fixed training set is resampled by ``randint``, row by row)."""
        return True

    @cached_property
    def _label_values_np(self) -> np.ndarray:
        return self.label_values.numpy()

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

    def _layout(self, size: int) -> list[list[tuple[str, int]]]:
        """How one row's random 63-bit words encode a draw for an alphabet of ``size``: per
        word, its digits ``(what, range)``, packed while their product stays <= 2**32 (so each
        digit is uniform on its range up to a relative error < 2**-31, below torch.randint's
        own 32-bit modulo bias); ``what`` is ``"template"`` (uniform templates), ``"u"`` (a
        53-bit uniform float for the template cdf, a word of its own) or a slot index."""
        if size not in self._layouts:
            digits = [("template", self.spec.num_templates)] if self._uniform_templates else []
            digits += [(str(j), size - j) for j in range(self.num_slots)]
            words = [] if self._uniform_templates else [[("u", 2**53)]]
            for digit in digits:
                if (
                    words
                    and words[-1][0][0] != "u"
                    and math.prod(r for _, r in words[-1]) * (digit[1]) <= 2**32
                ):
                    words[-1].append(digit)
                else:
                    words.append([digit])
            self._layouts[size] = words
        return self._layouts[size]

    def _digits(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_layout` as arrays for the compiled draw: per digit in order, its word
        (int64), what it encodes (int64: -2 the uniform ``"u"``, -1 the template, j >= 0 slot
        j) and its range (uint64)."""
        if size not in self._digit_tables:
            flat = [
                (w, -2 if what == "u" else -1 if what == "template" else int(what), n)
                for w, word in enumerate(self._layout(size))
                for what, n in word
            ]
            word, what, n = zip(*flat, strict=True)
            self._digit_tables[size] = (
                np.asarray(word, dtype=np.int64),
                np.asarray(what, dtype=np.int64),
                np.asarray(n, dtype=np.uint64),
            )
        return self._digit_tables[size]

    def _draw(self, batch_size: int, split: str, gen: torch.Generator, device) -> Batch:
        """``batch_size`` strings of ``split``'s alphabet. Every random number of row i comes
        from row i of one (B, words) tensor of 63-bit integers (``random_``), so on a given
        generator two draws of B1 and B2 rows equal one draw of B1 + B2 rows: the data do not
        depend on how a stream is cut into batches. Template z: a uniform digit, or the cdf of
        ``template_probs`` at a 53-bit uniform. Slot j (order of first appearance): the d-th
        symbol not drawn yet in its row, d uniform on {0, ..., A - j - 1}, i.e. the least
        fixed point of x = d + #{earlier slots <= x}, which j iterations from x = d reach;
        so the substitution is uniform over injective maps. The rest is table lookups in
        numpy on (B,) columns; on CPU tensors (:func:`iclgym.tasks.kernels.available`) the
        compiled :func:`_template_draw` does the same integer arithmetic row by row in one
        pass (the same batch, ``tests/tasks/test_kernels.py``; 1.6x fewer worker seconds per
        vector-env block, measured)."""
        start, size = self.alphabets[split]
        layout = self._layout(size)
        words = torch.empty((batch_size, len(layout)), dtype=torch.int64, device=gen.device)
        words = words.random_(generator=gen).cpu().numpy().view(np.uint64)
        if kernels.available(gen.device):
            tokens = np.empty((batch_size, len(self._columns) - 1), dtype=np.int64)
            targets = np.empty_like(tokens)
            z = np.empty(batch_size, dtype=np.int64)
            substitution = np.empty((batch_size, self.num_slots), dtype=np.int64)
            _template_draw(
                words, *self._digits(size), self._cdf, start, self._sources,
                tokens, targets, z, substitution,
            )  # fmt: skip
            return self._drawn(tokens, targets, z, substitution, start, size, device)
        digits: dict[str, np.ndarray] = {}
        for w, word in enumerate(layout):
            value = words[:, w]
            for what, n in word:
                if what == "u":
                    digits[what] = (value >> np.uint64(10)) * 2.0**-53
                    continue
                quotient = value // np.uint64(n)
                digits[what] = (value - quotient * np.uint64(n)).view(np.int64)
                value = quotient
        if self._uniform_templates:
            z = digits["template"]
        else:
            z = np.searchsorted(self._cdf, digits["u"], side="right")
        slots: list[np.ndarray] = []
        for j in range(self.num_slots):
            d = digits[str(j)]
            if j == 1:
                d = d + (slots[0] <= d)
            elif j > 1:
                x = d
                for _ in range(j):
                    x = d + sum((earlier <= x) for earlier in slots)
                d = x
            slots.append(d)
        for d in slots:
            d += start
        # x_0 .. x_L, y column by column into tokens (B, L + 1) and targets (B, L + 1)
        tokens = np.empty((batch_size, len(self._columns) - 1), dtype=np.int64)
        targets = np.empty_like(tokens)
        chosen: dict[bytes, np.ndarray] = {}  # per template -> source map: each row's source
        for j, (sources, index) in enumerate(self._columns):
            values = [slots[i] if kind == "slot" else i for kind, i in sources]
            column = values[0]
            if len(values) > 1 and all(kind == "id" for kind, _ in sources):
                column = np.asarray(values)[index].take(z)  # fixed ids: one table lookup
            elif len(values) > 1:
                key = index.tobytes()
                if key not in chosen:
                    identity = np.array_equal(index, np.arange(len(index)))
                    chosen[key] = z if identity else index.take(z)
                for k in range(1, len(values)):  # column += (values[k] - column) where chosen
                    pick = chosen[key] == k
                    column = column + pick * (values[k] - column)
            if j < tokens.shape[1]:
                tokens[:, j] = column
            if j > 0:
                targets[:, j - 1] = column
        substitution = np.empty((batch_size, len(slots)), dtype=np.int64)
        for j, d in enumerate(slots):
            substitution[:, j] = d
        z = np.asarray(z, dtype=np.int64)
        return self._drawn(tokens, targets, z, substitution, start, size, device)

    def _drawn(
        self,
        tokens: np.ndarray,
        targets: np.ndarray,
        z: np.ndarray,
        substitution: np.ndarray,
        start: int,
        size: int,
        device,
    ) -> Batch:
        """The batch of drawn strings (B, L + 1) int64 (labels last in ``targets``), their
        templates z (B,) and substitutions (B, slots) int64."""
        batch_size = tokens.shape[0]
        mask = np.zeros(tokens.shape, dtype=np.bool_)
        mask[:, -1] = True
        params = {
            "template_id": z,
            "substitution": substitution,
            "alphabet_start": np.full(batch_size, start, dtype=np.int64),
            "alphabet_size": np.full(batch_size, size, dtype=np.int64),
        }
        if self.label_values is not None:
            params["label_value"] = self._label_values_np.take(targets[:, -1])
        return Batch(
            tokens=torch.from_numpy(tokens).to(device),
            targets=torch.from_numpy(targets).to(device),
            loss_mask=torch.from_numpy(mask).to(device),
            params={k: torch.from_numpy(v).to(device) for k, v in params.items()},
            vocab_size=self.vocab_size,
            true_probs_fn=self.true_probs,
        )

    def _batch(self, tokens: Tensor, targets: Tensor, params: dict[str, Tensor]) -> Batch:
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
                fixed.tokens[rows].to(device), fixed.targets[rows].to(device), params
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
        """Law (B, T, V) of each next token given the sampled template under the template law
        (fresh substitutions; with ``data_mode="fixed"`` not the finite training set's law at
        the unscored context positions, module docstring)."""
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
        """Token ids as names (alphabet symbols as ``split:index``, ids in a gap between
        alphabets as ``unused:offset``)."""
        out = []
        for i in tokens:
            i = int(i)
            if i < self.alphabet_start:
                out.append(self.token_names[i])
                continue
            name = f"unused:{i - self.alphabet_start}"  # a gap between alphabet_offsets
            for split, (start, size) in self.alphabets.items():
                if start <= i < start + size:
                    name = f"{split}:{i - start}"
            out.append(name)
        return " ".join(out)

    # ------------------------------------------------------------------ env info
    @property
    def class_tokens(self) -> tuple[int, ...] | None:
        """The label token of each class 0 .. C - 1 for ``label_type="classification"``
        (None otherwise): the envs' ``action="class"`` maps action c to ``class_tokens[c]``."""
        if self.spec.label_type != "classification":
            return None
        return tuple(self.ids[f"<class {c}>"] for c in self.label_set)

    def episode_info(self, batch: Batch) -> dict[str, object]:
        """Per-sequence env info read from ``batch.params``, as fresh numpy int64 columns:
        ``template_id`` (B,) and ``substitution``, a dict wildcard name -> (B,) token id put
        in for it, -1 in rows whose template does not use that wildcard. The envs add
        ``label`` and ``oracle_pred`` and show one row per episode (:mod:`iclgym.envs`)."""
        z = batch.params["template_id"].cpu().numpy().copy()
        draws = batch.params["substitution"].cpu().numpy()
        substitution = {}
        for k, w in enumerate(self.spec.wildcards):
            slots = sorted(set(self._wildcard_slot[:, k].tolist()))  # this wildcard's slots
            if len(slots) == 1:
                column = draws[:, slots[0]].copy() if slots[0] >= 0 else np.full(len(z), -1)
            else:
                column = np.full(len(z), -1)
                per_row = self._wildcard_slot[z, k]
                for slot in slots[slots[0] < 0 :]:
                    column = np.where(per_row == slot, draws[:, slot], column)
            substitution[w] = column
        return {"template_id": z, "substitution": substitution}

    def online(self, batch: Batch) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        """The laws at the one scored position (the label, t = L) as point masses: ``(true,
        oracle)``, (B,) int64 token ids. The true law is the label ``targets[:, -1]``; the Bayes
        oracle's, given the tokens only, is the label of the one template of positive
        probability that the string matches (templates are disjoint, so at the QUERY position
        the posterior over templates is a point mass; :meth:`match` finds the same template).
        O(B * r * L) numpy work, nothing over the vocabulary.

        Raises ``ValueError`` when a string matches no such template (never for sampled
        batches) and when called at a position other than L."""
        tokens = batch.tokens.cpu().numpy()
        true = batch.targets[:, -1].cpu().numpy()
        oracle = self._oracle_labels(tokens)
        last = self.spec.template_len

        def step(t: int) -> tuple[np.ndarray, np.ndarray]:
            if t != last:
                raise ValueError(f"online: template tasks score position {last} only, got t={t}")
            return true, oracle

        return step

    def _oracle_labels(self, tokens: np.ndarray) -> np.ndarray:
        """(B,) int64 the label token of the template each string of ``tokens`` (B, L + 1)
        matches (:class:`PatternMatcher`); raises ``ValueError`` where none does."""
        x = tokens.T  # (L + 1, B) view: row p is position p (strided reads beat a transpose)
        z = self._matcher.match(x)
        if (z < 0).any():
            bad = np.flatnonzero(z < 0)[:5].tolist()
            raise ValueError(
                f"online: strings in rows {bad} match no template of positive probability"
            )
        label = self._label_fixed_np[z]
        if self._label_positions:
            positions = self._label_pos[z]
            for p in self._label_positions:
                label = np.where(positions == p, x[p], label)
        return label
