"""Scoring and training: evaluate, metrics, predictors (and the training loop)."""

from iclgym.harness.evaluate import Report, evaluate
from iclgym.harness.predictors import (
    OraclePredictor,
    Predictor,
    StrategyPredictor,
    resolve_predictor,
)

__all__ = [
    "OraclePredictor",
    "Predictor",
    "Report",
    "StrategyPredictor",
    "evaluate",
    "resolve_predictor",
]
