"""Model factories for the Ray backend tests (imported by Ray workers by module name): an LSTM
whose first construction kills its worker process, and one whose first construction raises."""

from __future__ import annotations

import os
import signal

from baselines.lstm import make_model


def _first(marker: str) -> bool:
    """True for exactly one caller across processes: the one that creates ``marker``."""
    try:
        with open(marker, "x"):
            return True
    except FileExistsError:
        return False


def dying_lstm(vocab_size: int, seq_len: int, marker: str, **kwargs):
    """The LSTM, after SIGKILLing the calling process the first time (``marker`` absent)."""
    if _first(marker):
        os.kill(os.getpid(), signal.SIGKILL)
    return make_model(vocab_size, seq_len, **kwargs)


def failing_lstm(vocab_size: int, seq_len: int, marker: str, fail_width: int, **kwargs):
    """The LSTM; raises the first time it is built with ``hidden_size == fail_width``."""
    if kwargs.get("hidden_size") == fail_width and _first(marker):
        raise RuntimeError("injected trial failure")
    return make_model(vocab_size, seq_len, **kwargs)
