"""Batched k-means (k-means++ seeding, Lloyd iterations) and merging of clusters with similar means.

Pure tensor functions: every image of a batch is clustered on its own, in parallel, with a seeded
``torch.Generator`` so the result is the same on every run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .group import group_mean
from .select import unit_vectors


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeds for points ``x`` [B, N, D]: [B, k, D], each next seed drawn with probability
    proportional to its squared distance to the nearest seed so far."""
    batch, n, _ = x.shape
    rows = torch.arange(batch, device=x.device)
    first = torch.randint(n, (batch,), generator=generator, device=x.device)
    centers = [x[rows, first]]  # [B, D] each
    nearest = (x - centers[0][:, None]).square().sum(-1)  # [B, N]
    for _ in range(1, k):
        # Where every point coincides with a seed, fall back to a uniform draw.
        weight = torch.where(nearest.sum(1, keepdim=True) > 0, nearest, torch.ones_like(nearest))
        pick = torch.multinomial(weight, 1, generator=generator).squeeze(1)  # [B]
        centers.append(x[rows, pick])
        nearest = torch.minimum(nearest, (x - centers[-1][:, None]).square().sum(-1))
    return torch.stack(centers, dim=1)


def kmeans(x: Tensor, k: int, *, iters: int = 20, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Cluster the points ``x`` [B, N, D] of each image into ``k`` clusters.

    Returns ``(assignment [B, N] int64 in 0..k-1, centers [B, k, D])``. A cluster that loses all its
    points keeps its previous center (it may stay empty). Deterministic for a given ``seed``.
    """
    if x.ndim != 3:
        raise ValueError(f"expected points [B, N, D], got shape {tuple(x.shape)}")
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"k must be in [1, N] = [1, {x.shape[1]}], got {k}")
    x = x.float()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    centers = kmeans_plus_plus(x, k, generator)
    assignment = torch.cdist(x, centers).argmin(-1)
    for _ in range(iters):
        means = group_mean(x, assignment, k)
        filled = torch.zeros(x.shape[0], k, dtype=torch.bool, device=x.device)
        filled.scatter_(1, assignment, True)
        centers = torch.where(filled[..., None], means, centers)
        new = torch.cdist(x, centers).argmin(-1)  # [B, N]
        if torch.equal(new, assignment):
            break
        assignment = new
    return assignment, centers


def group_adjacency(labels: Tensor, grid: tuple[int, int], k: int) -> Tensor:
    """[k, k] bool: groups i and j touch (some pair of 4-neighbour cells on ``grid`` has labels i, j)."""
    cells = labels.view(grid)
    adjacent = torch.zeros(k, k, dtype=torch.bool, device=labels.device)
    for a, b in ((cells[:, :-1], cells[:, 1:]), (cells[:-1], cells[1:])):
        adjacent[a.flatten(), b.flatten()] = True
    return adjacent | adjacent.T


def merge_similar_groups(
    features: Tensor, assignment: Tensor, k: int, threshold: float, grid: tuple[int, int] | None = None
) -> Tensor:
    """Join groups whose mean features are cosine-similar, one image at a time.

    ``features`` [B, N, C], ``assignment`` [B, N] in 0..k-1. Repeatedly joins the two groups with
    the most similar means (cosine of the L2-normalised means) while that similarity is at least
    ``threshold``; with ``grid`` (the tokens' (h, w) layout) only groups that touch on the grid are
    joined, so two similar but separate objects stay apart. Then renumbers the groups 0..m-1 by
    first appearance in token order. Returns the new assignment [B, N].
    """
    normed = unit_vectors(features).float()
    out = torch.empty_like(assignment)
    for b in range(features.shape[0]):
        labels = assignment[b].clone()
        while True:
            ids = labels.unique()
            if len(ids) < 2:
                break
            remap = torch.full((k,), -1, dtype=torch.long, device=labels.device)
            remap[ids] = torch.arange(len(ids), device=labels.device)
            means = group_mean(normed[b : b + 1], remap[labels][None], len(ids))[0]  # [G, C]
            means = torch.nn.functional.normalize(means, dim=-1)
            sim = means @ means.T
            sim.fill_diagonal_(float("-inf"))
            if grid is not None:
                touching = group_adjacency(remap[labels], grid, len(ids))
                sim = torch.where(touching, sim, torch.full_like(sim, float("-inf")))
            best = int(sim.argmax())
            i, j = divmod(best, len(ids))
            if float(sim[i, j]) < threshold:
                break
            labels[labels == ids[j]] = ids[i]
        out[b] = renumber_by_appearance(labels)
    return out


def renumber_by_appearance(labels: Tensor) -> Tensor:
    """Relabel ``labels`` [N] to 0..m-1 in order of first appearance (stable slot ids)."""
    ids, first = [], {}
    for value in labels.tolist():
        if value not in first:
            first[value] = len(ids)
            ids.append(value)
    table = torch.full((max(ids) + 1,), -1, dtype=torch.long, device=labels.device)
    table[torch.tensor(ids, device=labels.device)] = torch.arange(len(ids), device=labels.device)
    return table[labels]
