"""Image complexity scores in [0, 1]: how much of an image lives below a given spatial scale.

The score decides which patch size an image gets (:mod:`.thresholds`): an image whose variance sits
in large smooth regions loses little when cut into coarse patches; one whose variance sits in fine
detail needs small patches. It costs a few passes over the pixels: O(B * C * H * W), nothing next
to a ViT forward.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

#: variance floor of :func:`detail_score`, in the units of the images (for ImageNet-normalised input
#: about (0.007 * 1/0.225)^2: a brightness standard deviation of 0.7 % of the range), so that a
#: near-flat image with faint noise scores near 0 rather than near 1.
DETAIL_EPS = 1e-3

SCORES = ("detail",)


def detail_score(images: Tensor, block: int, eps: float = DETAIL_EPS) -> Tensor:
    """Fraction of each image's variance that lies below the ``block`` px scale, in [0, 1).

    For images ``x`` [B, C, H, W] (any per-channel affine normalisation; computed in the units
    given), cropped to whole ``block`` x ``block`` tiles, with ``m`` the image of tile means and
    ``mu`` the per-channel image means::

        within = mean_{c,h,w} (x - m)^2        # variance inside the tiles
        total  = mean_{c,h,w} (x - mu)^2       # variance of the image
        score  = within / (total + eps)

    Tile means are an orthogonal projection that keeps constants, so ``x - mu`` splits into the
    orthogonal parts ``m - mu`` and ``x - m``: ``within <= total`` and the score lies in [0, 1).
    A flat image scores 0, white noise about ``1 - 1 / block**2``; the score ignores contrast
    (scaling an image does not change it) except through ``eps``, which sends near-flat images to 0.

    Args:
        images: [B, C, H, W] float, H and W at least ``block``.
        block: tile side in px; :class:`tokenbudget.AdaptivePatch` uses the model's native patch size
            ("the detail one native patch's mean cannot hold").
        eps: variance floor (>= 0), see :data:`DETAIL_EPS`.

    Returns:
        [B] float32 scores.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1 (tile side in px), got {block!r}")
    height, width = images.shape[-2:]
    if height < block or width < block:
        raise ValueError(f"images of {height}x{width} px are smaller than one {block} px tile")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    rows, cols = height // block, width // block
    x = images[..., : rows * block, : cols * block].float()
    tile_means = F.avg_pool2d(x, block)  # [B, C, rows, cols]
    local = tile_means.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)  # [B, C, H', W']
    within = (x - local).square().mean(dim=(1, 2, 3))
    total = (x - x.mean(dim=(2, 3), keepdim=True)).square().mean(dim=(1, 2, 3))
    return (within / (total + eps)).clamp(0.0, 1.0)


def complexity_score(images: Tensor, block: int, score: str = "detail") -> Tensor:
    """The complexity score named ``score`` ([B] in [0, 1], higher = more fine detail).

    Only ``"detail"`` (:func:`detail_score`) so far; the name is part of the config so that other
    definitions can be added without changing saved configs.
    """
    if score == "detail":
        return detail_score(images, block)
    raise ValueError(f"unknown complexity score {score!r}; choose from {', '.join(SCORES)}")
