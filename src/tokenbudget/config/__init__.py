"""Configurations: one frozen dataclass per method, validated on creation, round-tripping JSON.

Every config class with a ``method`` name registers itself (:func:`config_class`), so JSON and the
command line reach it by that name; its strategy registers in :mod:`tokenbudget.strategies`. Every
module of this package is imported here, so a new method's config is one new file.
"""

import importlib
import pkgutil

from .adaptive import AdaptivePatch
from .auto import Auto, AutoDrop, PiToMe
from .base import (
    DEFAULT_ENTROPY_FLOOR,
    BudgetConfig,
    ReductionConfig,
    config_class,
    config_from_dict,
    config_from_json,
    method_names,
)
from .merging import GridPool, RandomDrop, ToFu, ToMe, ToMeDetail, ToMeGuard, ToMeOptimal
from .per_image import PerImage
from .pruning import DynamicViT, Prune

__all__ = [
    "DEFAULT_ENTROPY_FLOOR",
    "AdaptivePatch",
    "Auto",
    "AutoDrop",
    "BudgetConfig",
    "DynamicViT",
    "GridPool",
    "PerImage",
    "PiToMe",
    "Prune",
    "RandomDrop",
    "ReductionConfig",
    "ToFu",
    "ToMe",
    "ToMeDetail",
    "ToMeGuard",
    "ToMeOptimal",
    "config_class",
    "config_from_dict",
    "config_from_json",
    "method_names",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
