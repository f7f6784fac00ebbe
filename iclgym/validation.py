"""Argument checks shared by specs, envs, the harness and baselines.

Every check raises ``ValueError`` naming the parameter, the value it got and the valid range
(DESIGN.md, "bad input fails loudly and early"). Integers may be Python ints or numpy integers
(never bools) and come back as Python ints, so a value read from a numpy array is as good as a
literal and the spaces built from it hold plain ints.
"""

from __future__ import annotations

import ast
import math
from numbers import Real

import numpy as np

MEMORY_LIMIT_BYTES = 8 * 2**30
"""Largest single allocation (bytes) a spec or env may imply for one sequence or one buffer;
larger sizes are refused before anything is allocated (issue 8, "impossible sizes"). The
machines this project targets have 24 GiB; one sequence's tensors must leave room for a batch."""


def invalid(name: str, value: object, valid: str) -> ValueError:
    """The standard error: ``name=value is invalid: expected valid``."""
    return ValueError(f"{name}={value!r} is invalid: expected {valid}")


def is_int(value: object) -> bool:
    """True for Python and numpy integers, False for bools (which are ints to Python)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int in ``[low, high]`` (either bound may be None)."""
    too_low = low is not None and is_int(value) and value < low
    too_high = high is not None and is_int(value) and value > high
    if not is_int(value) or too_low or too_high:
        if low is not None and high is not None:
            valid = f"an int in [{low}, {high}]"
        elif low is not None:
            valid = f"an int >= {low}"
        elif high is not None:
            valid = f"an int <= {high}"
        else:
            valid = "an int"
        raise invalid(name, value, valid)
    return int(value)


def as_bool(name: str, value: object) -> bool:
    """``value`` as a Python bool: a Python or numpy bool only (never the truthiness of a
    string such as ``"false"``, or of an int)."""
    if not isinstance(value, (bool, np.bool_)):
        raise invalid(name, value, "a bool")
    return bool(value)


def parse_value(raw: str) -> object:
    """A command-line ``KEY=VALUE`` value: a bool for ``true`` / ``false`` in any case (the
    shell spelling), else the Python literal when ``raw`` parses as one (``5``, ``0.5``,
    ``(1, 2)``, ``False``), else the string itself."""
    if raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def is_real(value: object) -> bool:
    """True for Python/numpy reals (ints and floats), False for bools."""
    return isinstance(value, (Real, np.floating, np.integer)) and not isinstance(
        value, (bool, np.bool_)
    )


def as_float(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite Python float in the interval from ``low`` to ``high``
    (closed unless ``low_open`` / ``high_open``)."""
    ok = is_real(value) and math.isfinite(float(value))  # type: ignore[arg-type]
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        # an infinite bound is open: "a finite float in (0, inf)", never "(0, inf]"
        left = "(" if low_open or math.isinf(low) else "["
        right = ")" if high_open or math.isinf(high) else "]"
        raise invalid(name, value, f"a finite float in {left}{low:g}, {high:g}{right}")
    return float(value)  # type: ignore[arg-type]


def format_bytes(nbytes: float) -> str:
    """``1.5 GiB``-style size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def check_memory(name: str, value: object, nbytes: float, what: str) -> None:
    """Refuse a size whose ``what`` would take ``nbytes`` (> :data:`MEMORY_LIMIT_BYTES`)."""
    if nbytes > MEMORY_LIMIT_BYTES:
        raise ValueError(
            f"{name}={value!r} is invalid: {what} would take {format_bytes(nbytes)}, over the "
            f"{format_bytes(MEMORY_LIMIT_BYTES)} limit per allocation"
        )


BLOCK_SEQUENCES = 64
"""Sequences a size check must fit at once: the envs draw blocks of 64 and evaluation batches
are larger, so a spec whose 64 sequences cannot fit is refused (:func:`check_sequence_memory`)."""


def check_sequence_memory(name: str, value: object, seq_len: int, vocab_size: int) -> None:
    """Refuse sizes for which :data:`BLOCK_SEQUENCES` sequences of ``seq_len`` positions (int64
    tokens and targets, and two (T, V) float32 next-token laws: the truth and the oracle) would
    exceed :data:`MEMORY_LIMIT_BYTES`; ``name=value`` is the parameter reported."""
    nbytes = BLOCK_SEQUENCES * seq_len * (16 + 8 * vocab_size)
    check_memory(
        name,
        value,
        nbytes,
        f"{BLOCK_SEQUENCES} sequences of {seq_len} positions "
        f"over {vocab_size} tokens (tokens and two float32 next-token laws)",
    )
