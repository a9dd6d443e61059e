"""Running a patched model at a per-image patch size: score, group by size, run, restore order.

Framework-independent: an adapter (``tokenbudget.adapters.timm_adaptive``) supplies the model's own
entry points (``call_upstream``) and makes its patch embedding and position embedding follow the
group being run (``ctx.local.group``, a :class:`GroupSpec`). This module decides the groups:

* every image gets a complexity score and, through the thresholds, a patch size;
* images of one size run together as one sub-batch (never padded to a common length), each
  sub-batch through the model's unchanged blocks; outputs return in the input order;
* ``mode="resolution"`` reaches the same token counts by resizing the images to
  ``grid * native_patch`` px instead and keeping the native patch embedding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..context import ForwardGate
from ..ops.complexity import complexity_score
from ..ops.thresholds import check_thresholds, size_index
from ..state import AdaptivePatchState


@dataclass(frozen=True)
class GroupSpec:
    """How one sub-batch runs.

    Attributes:
        patch: the patch size the group stands for (px on the input image).
        grid: (rows, cols) of its patch grid.
        embed_patch: kernel size and stride the patch embedding runs with: ``patch`` in patch mode,
            the model's native patch size in resolution mode.
        input_size: (H, W) of the images entering the patch embedding.
    """

    patch: int
    grid: tuple[int, int]
    embed_patch: int
    input_size: tuple[int, int]


def default_patch_sizes(native_patch: int) -> tuple[int, int, int]:
    """Twice, once and half the native patch size: (32, 16, 8) for a /16 model, (28, 14, 7) for /14."""
    if native_patch % 2:
        raise ValueError(
            f"the model's patch size {native_patch} is odd, so it has no default half size; "
            "give AdaptivePatch(patch_sizes=...) explicitly"
        )
    return (2 * native_patch, native_patch, native_patch // 2)


def group_spec(patch: int, image_size: tuple[int, int], native_patch: int, mode: str) -> GroupSpec:
    """The :class:`GroupSpec` of images of ``image_size`` (H, W) at ``patch``; ``ValueError`` when
    the patch size does not divide the image."""
    height, width = image_size
    if height % patch or width % patch:
        divisors = [d for d in range(1, min(height, width) + 1) if height % d == 0 and width % d == 0]
        raise ValueError(
            f"patch size {patch} does not divide the {height}x{width} input; choose patch sizes among "
            f"its common divisors {divisors}, or resize the images"
        )
    grid = (height // patch, width // patch)
    if mode == "patch":
        return GroupSpec(patch, grid, patch, (height, width))
    return GroupSpec(patch, grid, native_patch, (grid[0] * native_patch, grid[1] * native_patch))


def resize_images(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of [B, C, H, W] to ``size`` (antialiased when shrinking): the input-resolution
    alternative to a coarser or finer patch size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


class AdaptivePatchPlanner:
    """Config -> patch size per image. ``ctx.strategy`` of an adaptively patched model."""

    def __init__(self, config: Any, native_patch: int) -> None:
        self.config = config
        self.native_patch = native_patch
        self.patch_sizes = tuple(config.patch_sizes or default_patch_sizes(native_patch))
        if config.thresholds is None and len(self.patch_sizes) > 1:
            raise ValueError(
                f"AdaptivePatch with {len(self.patch_sizes)} patch sizes needs {len(self.patch_sizes) - 1} "
                "thresholds; calibrate them with tb.adaptive.calibrate(model, images, target_tokens=...)"
            )
        self.thresholds = check_thresholds(config.thresholds or (), len(self.patch_sizes))
        self.score_block = config.score_block or native_patch

    def scores(self, images: Tensor) -> Tensor:
        """[B] complexity scores of model-ready ``images`` [B, 3, H, W]."""
        return complexity_score(images, self.score_block, self.config.score)

    def assign(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(scores [B], patch sizes [B] in px) of ``images``."""
        scores = self.scores(images)
        if len(self.patch_sizes) == 1:  # one size for every image: the score does not decide anything
            index = torch.zeros(len(images), dtype=torch.long)
        else:
            index = size_index(scores, self.thresholds).cpu()
        sizes = torch.tensor(self.patch_sizes, dtype=torch.long)[index]
        return scores, sizes


class AdaptivePatchContext:
    """What an adaptively patched model carries: the planner and per-thread slots.

    ``local.group`` is the :class:`GroupSpec` of the sub-batch this thread is running (``None``
    outside one), read by the adapter's patch- and position-embedding hooks; ``local.last`` is this
    thread's latest :class:`AdaptivePatchState`.
    """

    def __init__(self, planner: AdaptivePatchPlanner, num_prefix: int, num_layers: int) -> None:
        self.strategy = planner  # patch.patched_config reads ctx.strategy.config
        self.num_prefix = num_prefix
        self.num_layers = num_layers
        self._local = threading.local()
        self.latest: AdaptivePatchState | None = None
        self.gate = ForwardGate()  # forwards running through this patch (tb.apply / tb.remove wait)

    @property
    def local(self) -> threading.local:
        return self._local

    @property
    def group(self) -> GroupSpec | None:
        return getattr(self._local, "group", None)

    def finish(self, state: AdaptivePatchState) -> None:
        self._local.last = state
        self.latest = state

    def last_state(self) -> AdaptivePatchState | None:
        return getattr(self._local, "last", None) or self.latest

    def __getstate__(self) -> dict:
        # threading.local cannot be copied or pickled: a copied or loaded model starts with fresh slots.
        return {key: value for key, value in self.__dict__.items() if key not in ("_local", "latest")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local, self.latest = threading.local(), None


Upstream = Callable[..., Any]  # the model's own (unpatched) entry point: upstream(x, *args, **kwargs)


class GroupedRunner:
    """Runs a batch as one sub-batch per patch size through an upstream entry point."""

    def __init__(self, ctx: AdaptivePatchContext) -> None:
        self.ctx = ctx

    def plan(self, images: Tensor) -> tuple[Tensor, Tensor, list[tuple[GroupSpec, Tensor]]]:
        """(scores [B], patch sizes [B], [(spec, member indices)] coarse to fine) of ``images``."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"AdaptivePatch needs images [B, C, H, W], got {shape}")
        planner = self.ctx.strategy
        scores, sizes = planner.assign(images)
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        mode = planner.config.mode
        groups = []
        for patch in planner.patch_sizes:  # coarse to fine: a fixed, documented run order
            members = (sizes == patch).nonzero().flatten()
            if len(members):
                groups.append((group_spec(patch, image_size, planner.native_patch, mode), members))
        return scores, sizes, groups

    def run(self, upstream: Upstream, images: Tensor, *args: Any, **kwargs: Any) -> list[tuple[Tensor, Any]]:
        """[(member indices, upstream output)] per group; publishes the :class:`AdaptivePatchState`."""
        scores, sizes, groups = self.plan(images)
        return self._run_groups(upstream, images, scores, sizes, groups, args, kwargs)

    def _run_groups(
        self,
        upstream: Upstream,
        images: Tensor,
        scores: Tensor,
        sizes: Tensor,
        groups: list[tuple[GroupSpec, Tensor]],
        args: tuple,
        kwargs: dict,
    ) -> list[tuple[Tensor, Any]]:
        local = self.ctx.local
        outputs = []
        grids: list[tuple[int, int]] = [(0, 0)] * len(images)
        for spec, members in groups:
            batch = images if len(groups) == 1 else images[members.to(images.device)]
            batch = resize_images(batch, spec.input_size)
            local.group = spec
            try:
                outputs.append((members, upstream(batch, *args, **kwargs)))
            finally:
                local.group = None
            for i in members.tolist():
                grids[i] = spec.grid
        self.ctx.finish(
            AdaptivePatchState(
                scores=scores.detach().cpu(),
                patch_sizes=sizes,
                grids=grids,
                num_prefix=self.ctx.num_prefix,
                num_layers=self.ctx.num_layers,
                mode=self.ctx.strategy.config.mode,
            )
        )
        return outputs

    def forward(self, upstream: Upstream, images: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The model's output for every image, in input order (same-shape outputs per image)."""
        outputs = self.run(upstream, images, *args, **kwargs)
        if len(outputs) == 1:
            return outputs[0][1]
        first = outputs[0][1]
        if not isinstance(first, Tensor) or any(
            not isinstance(out, Tensor) or out.shape[1:] != first.shape[1:] for _, out in outputs
        ):
            raise ValueError(
                "images at different patch sizes gave outputs of different shapes, which cannot be put "
                "back in one batch; use tb.adaptive.forward_features_list(model, images) for per-image tokens"
            )
        result = first.new_empty((len(images), *first.shape[1:]))
        for members, out in outputs:
            result[members.to(result.device)] = out
        return result

    def forward_features(self, upstream: Upstream, images: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Tokens [B, T, C] when every image gets the same patch size; a mixed batch has no common
        token count, so it raises ``ValueError`` before running anything."""
        scores, sizes, groups = self.plan(images)
        if len(groups) > 1:
            counts = {spec.patch: len(members) for spec, members in groups}
            raise ValueError(
                f"this batch mixes patch sizes {counts} (size: images), so its token sequences have different "
                "lengths and cannot be stacked; call tb.adaptive.forward_features_list(model, images) for a "
                "list of per-image tokens in input order, or model(images) for pooled outputs"
            )
        return self._run_groups(upstream, images, scores, sizes, groups, args, kwargs)[0][1]

    def forward_features_list(self, upstream: Upstream, images: Tensor) -> list[Tensor]:
        """Per-image tokens [T_i, C] in input order (T_i = prefix + that image's patch tokens)."""
        result: list[Tensor | None] = [None] * len(images)
        for members, out in self.run(upstream, images):
            for row, i in enumerate(members.tolist()):
                result[i] = out[row]
        return result  # type: ignore[return-value]
