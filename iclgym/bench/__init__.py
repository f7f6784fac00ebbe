"""Benchmarking: the versioned task suite (:mod:`iclgym.bench.suite`) and the results store
(:mod:`iclgym.bench.store`)."""

from iclgym.bench.store import ResultRow, ResultsStore
from iclgym.bench.suite import SUITE, SUITE_VERSION, SuiteEntry, fingerprint

__all__ = ["SUITE", "SUITE_VERSION", "ResultRow", "ResultsStore", "SuiteEntry", "fingerprint"]
