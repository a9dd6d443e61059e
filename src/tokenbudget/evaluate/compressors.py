"""The compressor benchmark: k-NN accuracy, feature fidelity and reconstruction of compressed tokens.

For each method and budget k, on a frozen backbone's tokens (default: the cached DINOv2-S tokens of
Fashion-MNIST, 500 test images against a 1000-image train bank):

* ``knn_same``: cosine k-NN accuracy of the pooled feature of the compressed patch tokens (mean of
  the k outputs, L2-normalised; the class token is left out so it cannot hide the compression),
  against a bank of train images compressed the same way at the same k;
* ``knn_full``: the same test features against the bank of full-token pooled train features (does
  the compressed feature still live where the full one does?);
* ``fidelity``: mean cosine of the pooled compressed feature to the pooled full-token feature;
* ``recon_assign``: the share of the patch tokens' variance the assignment leaves unexplained when
  every input token is replaced by the output it went into (a dropped token by the nearest kept one
  on the grid): sum |x_hat - x|^2 / sum |x - mean_x|^2, 0 is perfect, 1 is as bad as the mean token;
* ``recon_decoder``: the same for a learned decoder's reconstruction (resampler, autoencoder);
* ``scene_item_knn`` (optional): on the multi-object scenes, each item's feature is the mean of the
  outputs weighted by how many of the item's patches each holds, scored by k-NN against the oracle
  item bank of the train scenes (:mod:`tokenbudget.evaluate.scene_metrics`).

Methods: ``avg`` and ``max`` grid pooling, ``random`` selection (the floor: k patch tokens drawn
uniformly, the rest dropped), and any trained :class:`~tokenbudget.vlm.latent.LatentCompressor`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..vlm.base import CompressedTokens, check_budget, check_tokens, infer_grid, pack, prefix_assignment
from ..vlm.latent import LatentCompressor
from ..vlm.pooling import pool
from .scene_metrics import knn_predict, pooled_feature

BASELINES = ("avg", "max", "random")


@dataclass
class CompressorRow:
    """One (method, k) line of the benchmark; NaN where a metric does not apply."""

    method: str
    k: int
    knn_same: float
    knn_full: float
    fidelity: float
    recon_assign: float
    recon_decoder: float = float("nan")
    scene_item_knn: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


def random_select(
    tokens: Tensor, k: int, *, num_prefix: int = 0, generator: torch.Generator | None = None
) -> CompressedTokens:
    """Keep ``k`` patch tokens per image drawn uniformly (in grid order); the rest are dropped (-1)."""
    batch, n, _ = check_tokens(tokens, num_prefix)
    (k,) = set(check_budget(k, batch, n - num_prefix))
    patches = tokens[:, num_prefix:]
    noise = torch.rand(batch, n - num_prefix, generator=generator).to(tokens.device)
    keep = noise.topk(k, dim=1).indices.sort(dim=1).values  # [B, k]
    assignment = torch.full((batch, n - num_prefix), -1, dtype=torch.long, device=tokens.device)
    assignment.scatter_(1, keep, torch.arange(k, device=tokens.device).expand(batch, k) + num_prefix)
    kept = list(patches.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1])).unbind(0))
    full = torch.cat([prefix_assignment(batch, num_prefix, tokens.device), assignment], dim=1)
    return pack(tokens[:, :num_prefix], kept, full)


def assignment_reconstruction(out: CompressedTokens, grid: tuple[int, int]) -> Tensor:
    """[B, P, C]: every patch token replaced by the output it went into; a dropped one (-1) by the
    output of the nearest (Euclidean on the grid) patch that was kept."""
    tokens = out.tokens if isinstance(out.tokens, Tensor) else torch.stack(out.tokens)
    patch_assignment = out.assignment[:, out.num_prefix :]  # [B, P]
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()  # [P, 2]
    filled = []
    for row in patch_assignment:
        kept = (row >= 0).nonzero().flatten()
        nearest = torch.cdist(coords, coords[kept]).argmin(dim=1)  # [P]
        filled.append(torch.where(row >= 0, row, row[kept][nearest]))
    index = torch.stack(filled)  # [B, P]
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def unexplained_variance(estimate: Tensor, target: Tensor) -> float:
    """sum |estimate - target|^2 / sum |target - per-channel mean|^2 over [B, P, C] tokens."""
    centred = target - target.reshape(-1, target.shape[-1]).mean(0)
    return float((estimate.float() - target.float()).pow(2).sum() / centred.pow(2).sum().clamp_min(1e-12))


NestedFn = Callable[[Tensor, Sequence[int], int], dict[int, CompressedTokens]]


def compressor_fn(method: str, compressor: LatentCompressor | None = None, seed: int = 0) -> NestedFn:
    """``fn(tokens, budgets, num_prefix) -> {k: CompressedTokens}`` for a baseline name or a trained
    compressor (one encoder pass for all budgets: they are nested)."""
    if compressor is not None:
        return lambda tokens, ks, num_prefix: compressor.compress_nested(
            tokens, list(ks), num_prefix=num_prefix
        )
    if method in ("avg", "max"):
        return lambda tokens, ks, num_prefix: {
            k: pool(tokens, k, num_prefix=num_prefix, mode=method) for k in ks
        }
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return lambda tokens, ks, num_prefix: {
            k: random_select(tokens, k, num_prefix=num_prefix, generator=generator) for k in ks
        }
    raise ValueError(f"unknown compression method {method!r}; use one of {BASELINES} or a trained compressor")


def _batched(
    fn: NestedFn, tokens: Tensor, budgets: Sequence[int], num_prefix: int, batch_size: int
) -> dict[int, tuple[Tensor, Tensor]]:
    """``{k: (patch outputs [S, k, C], assignment [S, N])}`` of ``tokens`` [S, N, C], in batches."""
    parts: dict[int, tuple[list[Tensor], list[Tensor]]] = {k: ([], []) for k in budgets}
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            for k, out in fn(tokens[start : start + batch_size], budgets, num_prefix).items():
                parts[k][0].append(out.tokens[:, num_prefix:].float())
                parts[k][1].append(out.assignment)
    return {k: (torch.cat(outs), torch.cat(assignments)) for k, (outs, assignments) in parts.items()}


def scene_item_accuracy(
    outputs: Tensor,
    assignment: Tensor,
    patch_owner: Tensor,
    labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_prefix: int,
    knn_k: int = 10,
) -> float:
    """Per-item k-NN accuracy on scenes: item i's feature is the mean of the outputs [S, k, C] weighted
    by how many of its patches (``patch_owner`` [S, P] == i) each output holds (``assignment`` [S, N]).
    An item none of whose patches reached an output counts as a miss."""
    k = outputs.shape[1]
    patch_assignment = assignment[:, num_prefix:] - num_prefix  # [S, P], -1 stays < 0
    correct, total = 0, 0
    for item in range(labels.shape[1]):
        on_item = (patch_owner == item) & (patch_assignment >= 0)  # [S, P]
        index = torch.where(on_item, patch_assignment, torch.full_like(patch_assignment, k))
        weight = torch.zeros(len(outputs), k + 1).scatter_add_(1, index, on_item.float())[:, :k]  # [S, k]
        features = pooled_feature(outputs, weight)
        predicted = knn_predict(bank, bank_labels, features, knn_k)
        reached = weight.sum(1) > 0
        correct += int(((predicted == labels[:, item]) & reached).sum())
        total += len(outputs)
    return correct / max(total, 1)


def evaluate_compressors(
    train_tokens: Tensor,
    train_labels: Tensor,
    test_tokens: Tensor,
    test_labels: Tensor,
    budgets: Sequence[int],
    *,
    methods: Sequence[str] = BASELINES,
    compressors: dict[str, LatentCompressor] | None = None,
    num_prefix: int = 1,
    knn_k: int = 10,
    batch_size: int = 50,
    seed: int = 0,
    scenes: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[CompressorRow]:
    """Benchmark ``methods`` (baselines) and ``compressors`` (name -> trained module) at ``budgets``.

    Tokens are [S, N, C] with ``num_prefix`` prefix tokens first. ``scenes`` (optional) holds
    ``tokens`` [S', N, C], ``patch_owner`` [S', P], ``labels`` [S', I], ``bank`` [M, C] and
    ``bank_labels`` [M] for the per-item scene score. The first row is the full-token reference.
    """
    grid = infer_grid(test_tokens.shape[1] - num_prefix, None)
    compressors = dict(compressors or {})
    for budget in budgets:
        check_budget(int(budget), 1, test_tokens.shape[1] - num_prefix)
    full_train = pooled_feature(train_tokens[:, num_prefix:])
    full_test = pooled_feature(test_tokens[:, num_prefix:])
    full_acc = float((knn_predict(full_train, train_labels, full_test, knn_k) == test_labels).float().mean())
    reference = CompressorRow("full", grid[0] * grid[1], full_acc, full_acc, 1.0, 0.0, 0.0)
    if scenes is not None:
        owner, p = scenes["patch_owner"], scenes["tokens"].shape[1] - num_prefix
        identity = torch.arange(num_prefix, num_prefix + p).expand(len(owner), p)
        full_assignment = torch.cat(
            [prefix_assignment(len(owner), num_prefix, owner.device), identity], dim=1
        )
        reference.scene_item_knn = scene_item_accuracy(
            scenes["tokens"][:, num_prefix:].float(), full_assignment, owner, scenes["labels"],
            scenes["bank"], scenes["bank_labels"], num_prefix, knn_k,
        )  # fmt: skip
    rows = [reference]
    test_patches = test_tokens[:, num_prefix:].float()
    entries = [(m, None) for m in methods] + list(compressors.items())
    for name, compressor in entries:
        if progress is not None:
            progress(name)
        fn = compressor_fn(name, compressor, seed)
        train_all = _batched(fn, train_tokens, budgets, num_prefix, batch_size)
        test_all = _batched(fn, test_tokens, budgets, num_prefix, batch_size)
        scene_all = _batched(fn, scenes["tokens"], budgets, num_prefix, batch_size) if scenes else None
        for k in budgets:
            (train_out, _), (test_out, test_assignment) = train_all[k], test_all[k]
            train_feat, test_feat = pooled_feature(train_out), pooled_feature(test_out)
            same = knn_predict(train_feat, train_labels, test_feat, knn_k)
            full = knn_predict(full_train, train_labels, test_feat, knn_k)
            prefix_out = test_tokens[:, :num_prefix].float()
            packed = CompressedTokens(torch.cat([prefix_out, test_out], dim=1), test_assignment, num_prefix)
            row = CompressorRow(
                name,
                k,
                knn_same=float((same == test_labels).float().mean()),
                knn_full=float((full == test_labels).float().mean()),
                fidelity=float((test_feat * full_test).sum(-1).mean()),
                recon_assign=unexplained_variance(assignment_reconstruction(packed, grid), test_patches),
            )
            if compressor is not None:
                with torch.inference_mode():
                    rebuilt = torch.cat(
                        [
                            compressor.decode_tokens(test_out[s : s + batch_size])
                            for s in range(0, len(test_out), batch_size)
                        ]
                    )
                row.recon_decoder = unexplained_variance(rebuilt, test_patches)
            if scene_all is not None:
                scene_out, scene_assignment = scene_all[k]
                row.scene_item_knn = scene_item_accuracy(
                    scene_out, scene_assignment, scenes["patch_owner"], scenes["labels"],
                    scenes["bank"], scenes["bank_labels"], num_prefix, knn_k,
                )  # fmt: skip
            rows.append(row)
    return rows


def format_rows(rows: Sequence[CompressorRow]) -> str:
    """A fixed-width table of benchmark rows."""
    header = (
        f"{'method':<12} {'k':>4} {'knn_same':>9} {'knn_full':>9} {'fidelity':>9} "
        f"{'recon_assign':>13} {'recon_decoder':>14} {'scene_item_knn':>15}"
    )
    lines = [header]
    for r in rows:

        def fmt(v: float, width: int) -> str:
            return f"{'-':>{width}}" if v != v else f"{v:>{width}.3f}"

        lines.append(
            f"{r.method:<12} {r.k:>4} {fmt(r.knn_same, 9)} {fmt(r.knn_full, 9)} {fmt(r.fidelity, 9)} "
            f"{fmt(r.recon_assign, 13)} {fmt(r.recon_decoder, 14)} {fmt(r.scene_item_knn, 15)}"
        )
    return "\n".join(lines)
