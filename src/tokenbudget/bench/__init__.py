"""Benchmarks: throughput, memory and FLOPs of patched vs unpatched models, same process.

The names load on first use, so that :mod:`.reach` (what a budget can reach, from a model's
geometry) answers without importing torch's benchmark machinery.
"""

import importlib as _importlib

__all__ = ["BenchRow", "bench", "format_table"]


def __getattr__(name: str) -> object:
    if name in __all__:
        return getattr(_importlib.import_module(".run", __name__), name)
    raise AttributeError(f"module 'tokenbudget.bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
