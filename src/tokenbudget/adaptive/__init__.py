"""Variable-length tokens: adaptive patching, early exit and a learned per-image budget.

Adaptive patching: a per-image patch size chosen by image complexity (``tb.AdaptivePatch``).

    cfg = tb.adaptive.calibrate(model, calibration_images, target_tokens=128)   # thresholds
    tb.apply(model, cfg)
    out = model(images)                      # each image at 28, 14 or 7 px patches (DINOv2)
    tb.last_state(model).patch_sizes         # [B] what each image ran at
    tokens = tb.adaptive.forward_features_list(model, images)   # per-image token sequences

* :mod:`.complexity`: the score in [0, 1] (fraction of an image's variance below the patch scale);
* :mod:`.thresholds`: score -> patch size, and quantile calibration to a target mean token count;
* :mod:`.patching`: grouping a batch by size and running each group (framework-free);
* ``tokenbudget.adapters.timm_adaptive``: the resampled patch and position embeddings of timm ViTs.

Early exit (:class:`EarlyExit`, :class:`ExitHeads`, :mod:`.early_exit`) and the budget predictor
(:class:`BudgetPredictor`, :func:`forward_with_budgets`, :mod:`.budget_predictor`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..config import AdaptivePatch
from ..ops.complexity import DETAIL_EPS, SCORES, complexity_score, detail_score
from ..ops.thresholds import calibrate_thresholds, check_thresholds, size_index
from ..state import AdaptivePatchState
from ..strategies.adaptive_patch import (
    AdaptivePatchContext,
    GroupedRunner,
    GroupSpec,
    default_patch_sizes,
    group_spec,
    resize_images,
)
from .budget_predictor import (
    BudgetPredictor,
    forward_with_budgets,
    load_budget_predictor,
    save_budget_predictor,
    train_budget_predictor,
)
from .early_exit import EarlyExit, ExitOutput
from .exit_heads import ExitHeads, load_exit_heads, save_exit_heads, train_exit_heads


def native_patch_size(model: nn.Module) -> int:
    """The patch side of ``model``'s patch embedding (``ValueError`` for models it cannot adapt)."""
    from ..adapters.timm_adaptive import native_patch_size as native

    return native(model)


def patch_token_counts(
    patch_sizes: Sequence[int], image_size: tuple[int, int], native_patch: int, mode: str = "patch"
) -> list[int]:
    """Patch tokens per image at each patch size (``ValueError`` for a size not dividing the image)."""
    counts = []
    for patch in patch_sizes:
        rows, cols = group_spec(patch, image_size, native_patch, mode).grid
        counts.append(rows * cols)
    return counts


def calibrate(
    model: nn.Module,
    images: Tensor,
    *,
    target_tokens: float | None = None,
    keep: float | None = None,
    patch_sizes: Sequence[int] | None = None,
    score: str = "detail",
    score_block: int | None = None,
    mode: str = "patch",
) -> AdaptivePatch:
    """An :class:`~tokenbudget.AdaptivePatch` whose thresholds give ``images`` a mean of
    ``target_tokens`` patch tokens per image (or ``keep`` times the native patch count).

    The thresholds are score quantiles of ``images`` (:func:`calibrate_thresholds`): the two patch
    sizes whose token counts bracket the target are mixed, the highest-scoring images at the finer
    one. Images of the same size as the ones the model will see, normalised for the model.
    """
    if (target_tokens is None) == (keep is None):
        raise ValueError(
            "give exactly one of target_tokens (mean patch tokens per image) or keep (fraction of native)"
        )
    native = native_patch_size(model)
    if not isinstance(images, Tensor) or images.dim() != 4 or len(images) == 0:
        raise ValueError("images must be a non-empty batch [N, C, H, W] of calibration images")
    image_size = (int(images.shape[-2]), int(images.shape[-1]))
    sizes = tuple(patch_sizes) if patch_sizes is not None else default_patch_sizes(native)
    counts = patch_token_counts(sizes, image_size, native, mode)
    if keep is not None:
        native_count = patch_token_counts((native,), image_size, native)[0]
        target_tokens = keep * native_count
    block = score_block or native
    scores = complexity_score(images, block, score)
    thresholds = calibrate_thresholds(scores, counts, float(target_tokens))
    return AdaptivePatch(
        patch_sizes=sizes,
        thresholds=thresholds if len(sizes) > 1 else None,
        score=score,
        score_block=score_block,
        mode=mode,
        target_tokens=float(target_tokens),
        keep=keep,
    )


def forward_features_list(model: nn.Module, images: Tensor) -> list[Tensor]:
    """Per-image tokens [T_i, C] of a model patched with ``tb.AdaptivePatch``, in input order
    (``T_i`` = prefix tokens + that image's patch tokens): what ``forward_features`` cannot stack."""
    from ..patch import installed

    patch = installed(model)
    if patch is None or not isinstance(patch[1], AdaptivePatchContext):
        raise ValueError("the model is not patched with tb.AdaptivePatch; call tb.apply(model, config) first")
    adapter, ctx = patch
    return GroupedRunner(ctx).forward_features_list(adapter.upstream("forward_features"), images)


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
    "DETAIL_EPS",
    "SCORES",
    "AdaptivePatchState",
    "GroupSpec",
    "calibrate",
    "calibrate_thresholds",
    "check_thresholds",
    "complexity_score",
    "default_patch_sizes",
    "detail_score",
    "forward_features_list",
    "group_spec",
    "native_patch_size",
    "patch_token_counts",
    "resize_images",
    "size_index",
]
