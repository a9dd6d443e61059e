"""timm adapter for :class:`tokenbudget.PerImage`: a timm ViT that gives each image its own budget.

Nothing of timm's forward is copied. The blocks are wrapped by the ordinary timm adapter
(:class:`~tokenbudget.adapters.timm.TimmAdapter`), whose strategy follows the level of the sub-batch
being run; on top of it three entry points are shadowed by instance attributes:

* ``forward`` / ``forward_features``: glance (the patch embedding, scored by the policy), group the
  batch by level, run each group through the model's own method (never padded), put the outputs
  back in input order (:func:`tokenbudget.adaptive.patching.run_groups`);
* ``patch_embed.forward``: inside a group, hands back the glance's patch embeddings of that group's
  images instead of computing them again, so the glance costs only its score.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from ..adaptive.patching import gather_rows, run_groups
from ..adaptive.per_image import (
    LevelGroup,
    PerImageContext,
    combined_state,
    level_groups,
    model_level_plan,
    pad_tokens,
    per_image_plan,
)
from ..config import PerImage
from . import timm as timm_adapter


class TimmPerImageAdapter:
    """Installs level-following block wrappers and grouped entry points on a timm ViT."""

    name = "timm-per-image"

    def __init__(self, model: nn.Module) -> None:
        if not timm_adapter.matches(model):
            raise ValueError(
                f"tb.PerImage supports timm VisionTransformer models, not "
                f"{type(model).__module__}.{type(model).__name__}"
            )
        if not hasattr(model, "patch_embed") or not hasattr(model.patch_embed, "patch_size"):
            raise ValueError(f"{type(model).__name__} has no patch_embed to glance at")
        self.model = model
        self.blocks = timm_adapter.TimmAdapter(model)
        self._installed: list[tuple[nn.Module, str]] = []

    def install(self, ctx: PerImageContext) -> None:
        model = self.model
        self.blocks.install(ctx)
        self._set(model.patch_embed, "forward", functools.partial(self._patch_embed_forward, ctx))
        for name in ("forward", "forward_features"):
            self._set(model, name, functools.partial(self._grouped, ctx, name))

    def _set(self, module: nn.Module, name: str, value: Any) -> None:
        module.__dict__[name] = value  # instance attribute: shadows the class method, not in state_dict
        self._installed.append((module, name))

    def uninstall(self) -> None:
        for module, name in self._installed:
            module.__dict__.pop(name, None)
        self._installed.clear()
        self.blocks.uninstall()

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
        raw, scores, levels = per_image_plan(ctx, self.model, x)
        groups = level_groups(levels, raw, len(ctx.plan.rates))
        states = []

        def prepare(group: LevelGroup, batch: Tensor) -> Tensor:
            ctx.local.embed_pending = True
            return batch

        def after(group: LevelGroup, members: Tensor) -> None:
            ctx.local.embed_pending = False
            states.append((members, ctx.last_state()))

        outputs = run_groups(
            upstream, x, groups, ctx.local, args=args, kwargs=kwargs, prepare=prepare, after=after
        )
        input_tokens = states[0][1].input_tokens
        ctx.finish(combined_state(ctx, states, levels, scores, len(x), input_tokens))
        if name == "forward_features":
            return pad_tokens(outputs, len(x))
        return gather_rows(
            outputs,
            len(x),
            "images at different budget levels gave outputs of different shapes, which cannot be put "
            "back in one batch; call model.forward_features(images) for padded tokens",
        )


def prepare(model: nn.Module, config: PerImage) -> tuple[TimmPerImageAdapter, PerImageContext]:
    """(adapter, context) that :func:`tokenbudget.patch.install_strategy` installs for ``config``."""
    if config.thresholds is None:
        target = f"keep={config.keep}" if config.keep is not None else f"flops_speedup={config.flops_speedup}"
        raise ValueError(
            "tb.PerImage needs thresholds calibrated on training images (which images need tokens is "
            f"learnt from images): cfg = tb.PerImage.calibrate(model, train_images, {target}, "
            f"policy={config.policy!r}), then tb.apply(model, cfg)"
        )
    adapter = TimmPerImageAdapter(model)
    from ..bench.flops import block_dims

    plan = model_level_plan(model, config.levels)
    blocks = adapter.blocks
    ctx = PerImageContext(
        config,
        plan,
        blocks.num_prefix,
        blocks.num_layers,
        blocks.grid,
        [block_dims(b) for b in blocks.blocks],
    )
    return adapter, ctx


__all__ = ["TimmPerImageAdapter", "prepare"]
