"""Scoring and training: evaluate, predictors, the model contract, the one trainer, recipes,
and online scoring under bandit feedback (regret).

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
from iclgym.harness.regret import RegretReport, bandit_regret, full_information_regret
from iclgym.harness.train import RunOptions, TrainConfig, train

__all__ = [
    "RECIPES",
    "HeldOut",
    "MarginalPredictor",
    "ModelPredictor",
    "OraclePredictor",
    "Predictor",
    "Recipe",
    "RegretReport",
    "Report",
    "RunOptions",
    "StrategyPredictor",
    "TrainConfig",
    "bandit_regret",
    "build_model",
    "check_model",
    "check_training",
    "evaluate",
    "full_information_regret",
    "get_recipe",
    "load_model",
    "load_predictor",
    "resolve_predictor",
    "train",
]
