"""Variable-length tokens (issue 5): early exit and a learned per-image token budget."""

from .budget_predictor import (
    BudgetPredictor,
    forward_with_budgets,
    load_budget_predictor,
    save_budget_predictor,
    train_budget_predictor,
)
from .early_exit import EarlyExit, ExitOutput
from .exit_heads import ExitHeads, load_exit_heads, save_exit_heads, train_exit_heads

__all__ = [
    "BudgetPredictor",
    "EarlyExit",
    "ExitHeads",
    "ExitOutput",
    "forward_with_budgets",
    "load_budget_predictor",
    "load_exit_heads",
    "save_budget_predictor",
    "save_exit_heads",
    "train_budget_predictor",
    "train_exit_heads",
]
