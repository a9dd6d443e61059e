"""Merge pictures: the tokens ToMe merged, drawn over the image as in the ToMe paper's figures."""

from __future__ import annotations

import numpy as np
import torch


def merge_groups(token_map: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """Group id of every patch on the grid: [rows, cols] ints, from one image's ``token_map`` [N0]."""
    groups = token_map[num_prefix:].cpu().numpy()
    if groups.size != grid[0] * grid[1]:
        raise ValueError(f"token map has {groups.size} patch tokens, the grid {grid} has {grid[0] * grid[1]}")
    return groups.reshape(grid)


def draw_merge_groups(image: np.ndarray, groups: np.ndarray, border: bool = True) -> np.ndarray:
    """Paint every merge group with the mean colour of its pixels and outline it.

    Args:
        image: [H, W, 3] uint8, H and W multiples of the grid.
        groups: [rows, cols] group id per patch (:func:`merge_groups`).

    Returns:
        [H, W, 3] uint8 picture.
    """
    height, width, _ = image.shape
    rows, cols = groups.shape
    if height % rows or width % cols:
        raise ValueError(f"image {height}x{width} is not a multiple of the {rows}x{cols} patch grid")
    per_pixel = np.kron(groups, np.ones((height // rows, width // cols), dtype=groups.dtype))  # [H, W]
    flat_ids = per_pixel.reshape(-1)
    ids, inverse = np.unique(flat_ids, return_inverse=True)
    pixels = image.reshape(-1, 3).astype(np.float64)
    sums = np.zeros((len(ids), 3))
    np.add.at(sums, inverse, pixels)
    counts = np.bincount(inverse, minlength=len(ids))[:, None]
    out = (sums / counts)[inverse].reshape(height, width, 3)
    if border:
        edge = np.zeros((height, width), dtype=bool)
        edge[:, 1:] |= per_pixel[:, 1:] != per_pixel[:, :-1]
        edge[1:, :] |= per_pixel[1:, :] != per_pixel[:-1, :]
        out[edge] = out[edge] * 0.35 + 255 * 0.65
    return out.clip(0, 255).astype(np.uint8)


def side_by_side(*pictures: np.ndarray, gap: int = 8) -> np.ndarray:
    """Pictures of equal height next to each other on white."""
    height = pictures[0].shape[0]
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    parts = []
    for i, picture in enumerate(pictures):
        if i:
            parts.append(spacer)
        parts.append(picture)
    return np.concatenate(parts, axis=1)


def render_merges(model: torch.nn.Module, image, config) -> tuple[np.ndarray, dict]:  # noqa: ANN001
    """Run ``model`` patched with ``config`` (source tracing on) on a PIL ``image``; return the
    picture (original | merge groups) and the state summary. The model is left unpatched."""
    import dataclasses

    from .adapters import find_adapter
    from .data.images import center_crop_resize, preprocess
    from .patch import apply, last_state, remove

    if not hasattr(config, "trace_source"):
        raise ValueError(
            f"{type(config).__name__} drops tokens instead of merging them; visualize a merging method (tome, pool)"
        )
    adapter = find_adapter(model)
    if adapter.image_size is None:
        raise ValueError("the model has no default input size; cannot place tokens on the image")
    size = adapter.image_size[0]
    x = preprocess(image, size, *adapter.normalization()).unsqueeze(0)
    apply(model, dataclasses.replace(config, trace_source=True))
    try:
        with torch.inference_mode():
            adapter.features(x)
        state = last_state(model)
    finally:
        remove(model)
    if state.grid is None:
        raise ValueError("the model's patch grid is unknown; cannot place tokens on the image")
    crop = np.asarray(center_crop_resize(image, size))
    groups = merge_groups(state.token_map[0], state.num_prefix, state.grid)
    return side_by_side(crop, draw_merge_groups(crop, groups)), state.summary()
