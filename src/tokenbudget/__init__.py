"""tokenbudget: spend a vision transformer's tokens where they matter.

import timm, tokenbudget as tb
model = timm.create_model("vit_base_patch16_224", pretrained=True)
tb.apply(model, tb.ToMe(r=16))
logits = model(images)
print(tb.last_state(model).tokens_per_layer)
tb.remove(model)
"""

from . import adaptive, models, vlm
from .adaptive import BudgetPredictor, EarlyExit, ExitHeads, forward_with_budgets
from .config import (
    DEFAULT_ENTROPY_FLOOR,
    AdaptivePatch,
    Auto,
    BudgetConfig,
    DynamicViT,
    GridPool,
    PiToMe,
    Prune,
    RandomDrop,
    ReductionConfig,
    ToFu,
    ToMe,
    ToMeGuard,
    ToMeOptimal,
    config_from_dict,
    config_from_json,
)
from .ops.entropy import token_entropy
from .patch import apply, is_patched, last_state, patched_config, remove
from .state import TokenState

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ENTROPY_FLOOR",
    "AdaptivePatch",
    "Auto",
    "BudgetConfig",
    "BudgetPredictor",
    "EarlyExit",
    "ExitHeads",
    "forward_with_budgets",
    "DynamicViT",
    "GridPool",
    "PiToMe",
    "Prune",
    "RandomDrop",
    "ReductionConfig",
    "ToFu",
    "ToMe",
    "ToMeGuard",
    "ToMeOptimal",
    "TokenState",
    "adaptive",
    "apply",
    "config_from_dict",
    "config_from_json",
    "is_patched",
    "last_state",
    "models",
    "patched_config",
    "remove",
    "token_entropy",
    "vlm",
]
