"""Learned token pruning (DynamicViT): predictor modules, their files, and their training."""

from ..strategies.keep_predictor import PredictorSet, TokenKeepPredictor, load_predictors, save_predictors

__all__ = ["PredictorSet", "TokenKeepPredictor", "load_predictors", "save_predictors"]
