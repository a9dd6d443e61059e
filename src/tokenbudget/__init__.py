"""tokenbudget: spend a vision transformer's tokens where they matter.

    import timm, tokenbudget as tb
    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    tb.apply(model, tb.ToMe(r=16))
    logits = model(images)
    print(tb.last_state(model).tokens_per_layer)
    tb.remove(model)

The names below are the whole top-level API; each is imported on first use, so ``import tokenbudget``
(and the command line's ``--help``) stays fast. Domain APIs live in subpackages: ``tb.adaptive``
(early exit, learned budgets, adaptive patching), ``tb.vlm`` (VLM token compression, slots,
saccades), ``tb.models`` (the embedded model, :func:`~tokenbudget.models.load_model`), ``tb.data``,
``tb.bench``, ``tb.evaluate``, ``tb.adapters``, ``tb.learned``, ``tb.ops``, ``tb.flops``.
"""

import importlib as _importlib

from .version import __version__

# name -> module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    # patching
    "apply": ".patch",
    "remove": ".patch",
    "is_patched": ".patch",
    "last_state": ".patch",
    "patched_config": ".patch",
    "TokenState": ".state",
    # the cost model (cost_model="auto")
    "CostTable": ".cost",
    "cost_model": ".patch",
    "set_cost_table": ".patch",
    # configs, one per method
    "ReductionConfig": ".config.base",
    "BudgetConfig": ".config.base",
    "ToMe": ".config.merging",
    "ToMeDetail": ".config.merging",
    "ToMeOptimal": ".config.merging",
    "ToMeGuard": ".config.merging",
    "ToFu": ".config.merging",
    "RandomDrop": ".config.merging",
    "GridPool": ".config.merging",
    "PiToMe": ".config.auto",
    "Auto": ".config.auto",
    "AutoDrop": ".config.auto",
    "Prune": ".config.pruning",
    "DynamicViT": ".config.pruning",
    "AdaptivePatch": ".config.adaptive",
    "PerImage": ".config.per_image",
    # VLM visual-token cuts (tb.apply on a transformers VLM)
    "VisualTokens": ".config.vlm",
    "VisualPool": ".config.vlm",
    "VisualRandom": ".config.vlm",
    "VisionZip": ".config.vlm",
    "VisualSelect": ".config.vlm",
    "TowerReduce": ".config.vlm",
    "vlm_config": ".config.vlm",
    "vlm_method_names": ".config.vlm",
    "DEFAULT_ENTROPY_FLOOR": ".config.base",
    "FastV": ".config.vlm_llm",
    "config_from_dict": ".config.base",
    "config_from_json": ".config.base",
    "method_names": ".config.base",
    # measurements
    "token_entropy": ".ops.entropy",
}

_SUBPACKAGES = (
    "adapters",
    "adaptive",
    "bench",
    "data",
    "evaluate",
    "explore",
    "flops",
    "learned",
    "models",
    "ops",
    "vlm",
)

__all__ = ["__version__", *_EXPORTS, *_SUBPACKAGES]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBPACKAGES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tokenbudget' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The API only: not the helpers above, nor the submodules that imports add to the namespace.
    return sorted(__all__)
