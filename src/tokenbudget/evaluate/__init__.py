"""Quality evaluation: feature metrics and the harness comparing reduced and full backbones."""

from .harness import (
    EvalData,
    EvalRow,
    evaluate,
    extract_features,
    format_eval_table,
    load_eval_data,
    pareto_plot,
)
from .metrics import accuracy_drop, cosine_fidelity, knn_accuracy, linear_probe_accuracy

__all__ = [
    "EvalData",
    "EvalRow",
    "accuracy_drop",
    "cosine_fidelity",
    "evaluate",
    "extract_features",
    "format_eval_table",
    "knn_accuracy",
    "linear_probe_accuracy",
    "load_eval_data",
    "pareto_plot",
]
