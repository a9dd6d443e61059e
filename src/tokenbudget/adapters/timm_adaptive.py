"""timm adapter for :class:`tokenbudget.AdaptivePatch`: a timm ViT at a per-image patch size.

Nothing of timm's forward is copied. The model's own ``forward`` / ``forward_features`` run once per
sub-batch of equal patch size (:mod:`tokenbudget.strategies.adaptive_patch` groups them), and two of its
steps follow the sub-batch's :class:`~tokenbudget.strategies.adaptive_patch.GroupSpec`:

* ``patch_embed``: timm's ``PatchEmbed.forward`` runs on a view of the module whose ``proj`` is the
  convolution with the kernel resampled to the group's patch size by FlexiViT's pseudo-inverse
  resize (``timm.layers.resample_patch_embed``: for a patch ``x`` and its resize ``R x`` to the new
  size, ``<R x, pinv(R)^T w> = <x, w>``, so a resized image gives the tokens the model was trained on);
* ``_pos_embed``: timm's ``VisionTransformer._pos_embed`` runs on a view of the model whose
  ``pos_embed`` is resampled to the group's grid (``timm.layers.resample_abs_pos_embed``).

A view overrides a few attributes for one call and reads the rest from the module, so concurrent
forwards never see each other's sizes and the shared modules are never modified. Resampled kernels
and position embeddings are cached per size and recomputed when the weights change (in place or
replaced); with gradients enabled they are recomputed every call so gradients reach the weights.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdaptivePatch
from ..strategies.adaptive_patch import AdaptivePatchContext, AdaptivePatchPlanner, GroupedRunner
from . import timm as timm_adapter
from .base import register_installer

# Position grids are resampled as the embedded DINOv2 resamples its 37x37 grid (bicubic, no
# antialias; see tokenbudget.models.dinov2), so the native grid of that model is reproduced exactly.
POS_EMBED_RESAMPLE: dict[str, Any] = {"interpolation": "bicubic", "antialias": False}

_GUARDED = ("forward_intermediates", "get_intermediate_layers", "forward_head_intermediates")


class _View:
    """Reads every attribute from ``base`` except the ``overrides``: lets an upstream method run
    with a few attributes swapped for one call, without touching the shared module."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        self.__dict__.update(overrides)
        self.__dict__["_base"] = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_base"], name)


class _Guard:
    """Entry points that do not go through the grouping (they would silently run at the native size)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{self.name} does not run per-image patch sizes under tb.AdaptivePatch; use model(images), "
            "model.forward_features(images) or tb.adaptive.forward_features_list(model, images), "
            "or tb.remove(model) first"
        )


def check_model(model: nn.Module) -> None:
    """``ValueError`` unless ``model`` is a timm ViT with a plain convolutional patch embedding."""
    if not timm_adapter.matches(model):
        raise ValueError(
            f"tb.AdaptivePatch supports timm VisionTransformer models (a patch_embed with a strided "
            f"convolution and absolute position embeddings), not {type(model).__module__}.{type(model).__name__}"
        )
    patch_embed = getattr(model, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    if patch_embed is None or not isinstance(proj, nn.Conv2d):
        raise ValueError(
            f"{type(model).__name__} has no patch_embed with a Conv2d proj, whose kernel tb.AdaptivePatch "
            "resamples to other patch sizes"
        )
    if (
        tuple(proj.kernel_size) != tuple(proj.stride)
        or proj.kernel_size[0] != proj.kernel_size[1]
        or any(proj.padding)
        or proj.groups != 1
    ):
        raise ValueError(
            f"the patch embedding {proj} is not a square non-overlapping patchify (kernel == stride, no "
            "padding), so its kernel cannot be resized to another patch size"
        )
    if getattr(patch_embed, "dynamic_img_pad", False):
        raise ValueError(
            "patch_embed pads images (dynamic_img_pad=True); tb.AdaptivePatch needs whole patches"
        )
    if not hasattr(type(model), "_pos_embed"):
        raise ValueError(f"{type(model).__name__} has no _pos_embed step to resample position embeddings in")


def native_patch_size(model: nn.Module) -> int:
    """The patch side of ``model``'s patch embedding (``ValueError`` for models it cannot adapt)."""
    check_model(model)
    return int(model.patch_embed.proj.kernel_size[0])


class TimmAdaptiveAdapter:
    """Installs per-group patch and position embeddings and grouped entry points on a timm ViT."""

    name = "timm-adaptive"

    def __init__(self, model: nn.Module) -> None:
        check_model(model)
        self.model = model
        self.native_patch = int(model.patch_embed.proj.kernel_size[0])
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.num_layers = len(model.blocks)
        self._kernels: dict[int, tuple[Any, Tensor]] = {}
        self._pos: dict[tuple[int, int], tuple[Any, Tensor]] = {}
        self._installed: list[tuple[nn.Module, str]] = []

    # -- resampled weights -------------------------------------------------------------------
    def kernel(self, patch: int) -> Tensor:
        """The patch-embedding kernel [C, 3, patch, patch] (the module's own at the native size)."""
        weight = self.model.patch_embed.proj.weight
        if patch == self.native_patch:
            return weight
        from timm.layers import resample_patch_embed

        return self._cached(
            self._kernels, patch, weight, lambda: resample_patch_embed(weight, [patch, patch])
        )

    def pos_embed(self, grid: tuple[int, int]) -> Tensor | None:
        """``model.pos_embed`` resampled to ``grid`` (the parameter itself at the model's grid)."""
        model = self.model
        pos = getattr(model, "pos_embed", None)
        native_grid = tuple(int(g) for g in model.patch_embed.grid_size)
        if pos is None or tuple(grid) == native_grid:
            return pos
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else self.num_prefix
        return self._cached(
            self._pos,
            tuple(grid),
            pos,
            lambda: resample_abs_pos_embed(
                pos,
                new_size=list(grid),
                old_size=list(native_grid),
                num_prefix_tokens=prefix,
                **POS_EMBED_RESAMPLE,
            ),
        )

    @staticmethod
    def _cached(cache: dict, key: Any, source: Tensor, compute: Any) -> Tensor:
        if torch.is_grad_enabled() and source.requires_grad:
            return compute()  # training: keep the graph to the weights
        stamp = (source.data_ptr(), source._version, source.device, source.dtype)
        hit = cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        # Normal tensors even inside inference_mode, so a later grad-free forward may use them too.
        with torch.inference_mode(False), torch.no_grad():
            value = compute()
        cache[key] = (stamp, value)
        return value

    # -- installed entry points --------------------------------------------------------------
    def install(self, ctx: AdaptivePatchContext) -> None:
        model = self.model
        runner = GroupedRunner(ctx)
        patch_embed = model.patch_embed
        self._set(patch_embed, "forward", functools.partial(self._patch_embed_forward, ctx))
        self._set(model, "_pos_embed", functools.partial(self._pos_embed_forward, ctx))
        self._set(model, "forward", functools.partial(self._grouped, ctx, runner, "forward"))
        self._set(
            model, "forward_features", functools.partial(self._grouped, ctx, runner, "forward_features")
        )
        for name in _GUARDED:
            if hasattr(type(model), name):
                self._set(model, name, _Guard(name))

    def _set(self, module: nn.Module, name: str, value: Any) -> None:
        module.__dict__[name] = value  # instance attribute: shadows the class method, not in state_dict
        self._installed.append((module, name))

    def uninstall(self) -> None:
        for module, name in self._installed:
            module.__dict__.pop(name, None)
        self._installed.clear()
        self._kernels.clear()
        self._pos.clear()

    def __getstate__(self) -> dict:
        # Resampled kernels and position embeddings are a cache keyed by storage addresses, which
        # do not survive pickling: a copied or loaded model recomputes them.
        return {**self.__dict__, "_kernels": {}, "_pos": {}}

    def upstream(self, name: str) -> Any:
        """The model's own (class) method ``name``, bound to the model."""
        return getattr(type(self.model), name).__get__(self.model)

    def _grouped(
        self, ctx: AdaptivePatchContext, runner: GroupedRunner, name: str, x: Tensor, *args: Any, **kw: Any
    ) -> Any:
        if ctx.group is not None:  # inside a sub-batch (timm's forward calls forward_features): upstream
            return self.upstream(name)(x, *args, **kw)
        if not ctx.gate.enter():
            # The patch was replaced or removed while this call waited: run what is installed now.
            return getattr(self.model, name)(x, *args, **kw)
        try:
            return getattr(runner, name)(self.upstream(name), x, *args, **kw)
        finally:
            ctx.gate.leave()

    def _patch_embed_forward(self, ctx: AdaptivePatchContext, x: Tensor) -> Tensor:
        patch_embed = self.model.patch_embed
        spec = ctx.group
        if spec is None:  # called directly, outside a grouped forward: the module as it is
            return type(patch_embed).forward(patch_embed, x)
        weight, bias = self.kernel(spec.embed_patch), patch_embed.proj.bias
        view = _View(
            patch_embed,
            proj=functools.partial(F.conv2d, weight=weight, bias=bias, stride=spec.embed_patch),
            patch_size=(spec.embed_patch, spec.embed_patch),
            img_size=tuple(x.shape[-2:]),
            grid_size=spec.grid,
            num_patches=spec.grid[0] * spec.grid[1],
            flatten=True,  # tokens [B, N, C]; the model view below adds position embeddings to them
        )
        return type(patch_embed).forward(view, x)

    def _pos_embed_forward(self, ctx: AdaptivePatchContext, x: Tensor) -> Tensor:
        model = self.model
        spec = ctx.group
        if spec is None:
            return type(model)._pos_embed(model, x)
        view = _View(model, pos_embed=self.pos_embed(spec.grid), dynamic_img_size=False)
        return type(model)._pos_embed(view, x)


@register_installer(AdaptivePatch)
def prepare(model: nn.Module, config: AdaptivePatch) -> tuple[TimmAdaptiveAdapter, AdaptivePatchContext]:
    """(adapter, context) that :func:`tokenbudget.apply` installs for an ``AdaptivePatch`` config."""
    adapter = TimmAdaptiveAdapter(model)
    planner = AdaptivePatchPlanner(config, adapter.native_patch)
    ctx = AdaptivePatchContext(planner, adapter.num_prefix, adapter.num_layers)
    return adapter, ctx
