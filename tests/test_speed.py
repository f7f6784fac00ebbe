"""The speed benchmark's pieces: the official generator's loader, memory rows, the table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from iclgym import speed
from iclgym.speed import Row, format_table, official_generator, peak_bytes_per_position

FAKE_DATASETS = """
from utils import draw

class ngrams:
    def __init__(self, split, n, length=101, num_symbols=2, size=1000):
        self.shape = (n, length, num_symbols)

    def __getitems__(self, indices):
        return draw(len(indices), self.shape)
"""
FAKE_UTILS = "def draw(batch, shape):\n    return (batch, *shape)\n"


def test_official_generator_loads_a_checkout_and_leaves_no_module_behind(tmp_path: Path):
    (tmp_path / "datasets.py").write_text(FAKE_DATASETS)
    (tmp_path / "utils.py").write_text(FAKE_UTILS)
    before = sys.modules.get("utils")
    make = official_generator(tmp_path)
    assert make(3, 2, 64, 100)() == (64, 2, 101, 3)  # ngrams(order, T + 1, k), B sequences
    assert sys.modules.get("utils") is before and str(tmp_path) not in sys.path
    with pytest.raises(ValueError, match="official"):
        official_generator(tmp_path / "missing")
    with pytest.raises(ValueError, match="official"):
        speed.run(official=tmp_path / "missing", progress=False)


def test_a_memory_row_is_a_ceiling():
    assert Row("m", 12.0, "B/pos", 16.0, "<= 16", at_most=True).ok
    assert not Row("m", 17.0, "B/pos", 16.0, "<= 16", at_most=True).ok
    assert not Row("m", float("nan"), "B/pos", 16.0, "<= 16", at_most=True).ok


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_the_oracle_holds_little_more_than_its_output():
    """O(B T k) memory: the (B, T, 3) float32 log-probabilities are 12 bytes per position."""
    value = peak_bytes_per_position("oracle", 3, 1024, 256)
    assert 11.0 <= value <= speed.ORACLE_BYTES_TARGET


def test_the_table_prints_spread_threads_and_load():
    rows = [Row("ICL-X-v0 vector x8", 2.0e6, "steps/s", 1.0e6, ">= CartPole", (1.5e6, 2.0e6))]
    text = format_table(rows, load_before="0.10 0.20 0.30")
    assert "2.00 Msteps/s  1.50 M-2.00 M" in text and text.splitlines()[2].endswith("yes")
    assert "load average before 0.10 0.20 0.30" in text and "torch threads" in text


def test_an_official_exit_becomes_an_error_not_the_end_of_the_benchmark(tmp_path: Path):
    """The official code calls exit() when its power iteration does not converge."""
    (tmp_path / "datasets.py").write_text(
        "class ngrams:\n    def __init__(self, *a, **k):\n        pass\n"
        "    def __getitems__(self, indices):\n        exit()\n"
    )
    with pytest.raises(RuntimeError, match="did not converge"):
        official_generator(tmp_path)(3, 5, 8, 10)()
