"""Scoring and training: evaluate, predictors, the model contract, the one trainer, recipes.

Importing this package imports torch (``iclgym`` itself does not).
"""

from iclgym.harness.evaluate import HeldOut, Report, evaluate
from iclgym.harness.model import (
    ModelPredictor,
    build_model,
    check_model,
    check_training,
    load_model,
    load_predictor,
)
from iclgym.harness.predictors import (
    MarginalPredictor,
    OraclePredictor,
    Predictor,
    StrategyPredictor,
    resolve_predictor,
)
from iclgym.harness.recipes import RECIPES, Recipe, get_recipe
from iclgym.harness.train import RunOptions, TrainConfig, train

__all__ = [
    "RECIPES",
    "HeldOut",
    "MarginalPredictor",
    "ModelPredictor",
    "OraclePredictor",
    "Predictor",
    "Recipe",
    "Report",
    "RunOptions",
    "StrategyPredictor",
    "TrainConfig",
    "build_model",
    "check_model",
    "check_training",
    "evaluate",
    "get_recipe",
    "load_model",
    "load_predictor",
    "resolve_predictor",
    "train",
]
