"""Quality evaluation: the harness comparing reduced and full backbones, and one module per protocol.

* :mod:`.quality`: :func:`evaluate` (accuracy, fidelity and speed per method and budget);
* :mod:`.features`, :mod:`.metrics`, :mod:`.budgets`, :mod:`.tables`: its parts;
* :mod:`.shift`: the bias diagnostic (:func:`feature_shift`);
* :mod:`.plan`: choose a config for a target; :mod:`.adaptive_eval`, :mod:`.exits`,
  :mod:`.budget_predictor`, :mod:`.guard_report`, :mod:`.compressors`, :mod:`.select_scenes`,
  :mod:`.slot_benchmark`: the protocols of adaptive patching, early exit, learned budgets, the entropy
  guard, VLM compressors, query-aware selection and object slots;
* :mod:`.vlm_answers`: answers of a transformers VLM under visual-token cuts (:func:`evaluate_vlm`).
"""

from .budgets import (
    ScheduledKeep,
    budget_for_flops_speedup,
    fastest_keep,
    keep_for_flops_speedup,
    method_config,
)
from .features import extract_features
from .metrics import accuracy_drop, cosine_fidelity, knn_accuracy, linear_probe_accuracy
from .quality import EvalRow, evaluate
from .shift import ShiftReport, feature_shift
from .tables import format_eval_table, pareto_plot, rows_to_csv
from .vlm_answer_table import format_answer_table
from .vlm_answers import AnswerRow, VQAItem, evaluate_vlm, load_vqa, normalise_answer

__all__ = [
    "AnswerRow",
    "EvalRow",
    "ShiftReport",
    "VQAItem",
    "accuracy_drop",
    "cosine_fidelity",
    "evaluate",
    "evaluate_vlm",
    "extract_features",
    "feature_shift",
    "fastest_keep",
    "format_answer_table",
    "format_eval_table",
    "keep_for_flops_speedup",
    "budget_for_flops_speedup",
    "ScheduledKeep",
    "knn_accuracy",
    "linear_probe_accuracy",
    "load_vqa",
    "method_config",
    "normalise_answer",
    "pareto_plot",
    "rows_to_csv",
]
