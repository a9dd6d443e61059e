"""timm adapter for :class:`tokenbudget.PerImage`: a timm ViT that gives each image its own budget.

Nothing of timm's forward is copied. The blocks are wrapped as by the ordinary timm adapter
(:class:`~tokenbudget.adapters.timm.TimmAdapter`), whose strategy follows the level of the sub-batch
being run; on top of it three entry points are shadowed by instance attributes:

* ``forward`` / ``forward_features``: glance (the patch embedding, scored by the policy), group the
  batch by level, run each group through the model's own method (never padded), put the outputs
  back in input order (:func:`tokenbudget.strategies.per_image.run_per_image`);
* ``patch_embed.forward``: inside a group, hands back the glance's patch embeddings of that group's
  images instead of computing them again, so the glance costs only its score.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from ..config import PerImage
from ..strategies.per_image import PerImageContext, config_levels, mean_flops_target, run_per_image
from . import timm as timm_adapter
from .base import register_installer

_GUARDED = ("forward_intermediates", "get_intermediate_layers", "forward_head_intermediates")


class _Guard:
    """Entry points that do not go through the grouping (they would run every image at all tokens)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{self.name} does not run per-image budgets under tb.PerImage; use model(images) or "
            "model.forward_features(images), or tb.remove(model) first"
        )


class TimmPerImageAdapter(timm_adapter.TimmAdapter):
    """The timm adapter plus grouped entry points and a reused patch embedding."""

    name = "timm-per-image"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._shadowed: list[tuple[nn.Module, str]] = []

    def install(self, ctx: PerImageContext) -> None:
        model = self.model
        super().install(ctx)
        self._set(model.patch_embed, "forward", functools.partial(self._patch_embed_forward, ctx))
        for name in ("forward", "forward_features"):
            self._set(model, name, functools.partial(self._grouped, ctx, name))
        for name in _GUARDED:
            if hasattr(type(model), name):
                self._set(model, name, _Guard(name))

    def _set(self, module: nn.Module, name: str, value: Any) -> None:
        module.__dict__[name] = value  # instance attribute: shadows the class method, not in state_dict
        self._shadowed.append((module, name))

    def uninstall(self) -> None:
        for module, name in self._shadowed:
            module.__dict__.pop(name, None)
        self._shadowed.clear()
        super().uninstall()

    def upstream(self, name: str) -> Any:
        """The model's own (class) method ``name``, bound to the model."""
        return getattr(type(self.model), name).__get__(self.model)

    def _patch_embed_forward(self, ctx: PerImageContext, x: Tensor) -> Tensor:
        patch_embed = self.model.patch_embed
        group = ctx.group
        local = ctx.local
        if (
            group is not None
            and getattr(local, "embed_pending", False)
            and len(x) == len(group.patch_embed_out)
        ):
            local.embed_pending = False  # once per group: a second call computes as usual
            return group.patch_embed_out
        return type(patch_embed).forward(patch_embed, x)

    def _grouped(self, ctx: PerImageContext, name: str, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        upstream = self.upstream(name)
        if ctx.group is not None:  # inside a sub-batch (timm's forward calls forward_features): upstream
            return upstream(x, *args, **kwargs)
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"tb.PerImage needs images [B, C, H, W], got {shape}")
        if not ctx.gate.enter():
            # The patch was replaced or removed while this call waited: run what is installed now.
            return getattr(self.model, name)(x, *args, **kwargs)
        try:
            patch_embed = self.model.patch_embed
            raw = type(patch_embed).forward(patch_embed, x)
            tokens = raw.flatten(1, 2) if raw.ndim == 4 else raw  # dynamic_img_size keeps the grid
            return run_per_image(
                ctx,
                upstream,
                x,
                raw,
                tokens,
                self.patch_size[0],
                tokens_out=name == "forward_features",
                args=args,
                kwargs=kwargs,
            )
        finally:
            ctx.gate.leave()


@register_installer(PerImage)
def prepare(model: nn.Module, config: PerImage) -> tuple[TimmPerImageAdapter, PerImageContext]:
    """(adapter, context) that :func:`tokenbudget.apply` installs for a ``PerImage`` config."""
    if not timm_adapter.matches(model):
        raise ValueError(
            f"tb.PerImage runs on timm VisionTransformer models (it regroups their forward by budget "
            f"level), not {type(model).__module__}.{type(model).__name__}; use a fixed budget such as "
            "tb.ToMe(keep=...) on this model"
        )
    if config.thresholds is None:
        target = f"keep={config.keep}" if config.keep is not None else f"flops_speedup={config.flops_speedup}"
        raise ValueError(
            "tb.PerImage needs thresholds calibrated on training images (which images need tokens is "
            f"learnt from images): cfg = tb.adaptive.calibrate_per_image(model, train_images, {target}, "
            f"policy={config.policy!r}), then tb.apply(model, cfg)"
        )
    if config.policy == "predictor":
        raise ValueError(
            "tb.apply cannot load a budget predictor; load it and pass it: "
            "tb.adaptive.apply_per_image(model, config) loads config.predictor"
        )
    return build(model, config)


def build(
    model: nn.Module, config: PerImage, predictor: Any = None
) -> tuple[TimmPerImageAdapter, PerImageContext]:
    """(adapter, context) of ``config`` with an already loaded need ``predictor`` (policy ``"predictor"``)."""
    adapter = TimmPerImageAdapter(model)
    dims = adapter.block_dims()
    plan = config_levels(config, adapter.default_num_tokens, adapter.num_prefix, dims)
    ctx = PerImageContext(config, plan, adapter.num_prefix, adapter.num_layers, adapter.grid, dims, predictor)
    ctx.target_flops = mean_flops_target(config, adapter.default_num_tokens, adapter.num_prefix, dims)
    return adapter, ctx


__all__ = ["TimmPerImageAdapter", "build", "prepare"]
