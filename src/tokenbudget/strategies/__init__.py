"""One strategy per method; each turns a config into per-forward token reduction.

A strategy module registers the config classes it runs with :func:`register`; every module of this
package is imported here, so a new strategy is one new file (plus its config).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import STRATEGIES, ScheduledStrategy, make_strategy, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["STRATEGIES", "ScheduledStrategy", "make_strategy", "register"]
