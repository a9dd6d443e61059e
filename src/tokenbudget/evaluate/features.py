"""The harness feature of a (possibly patched) model: class token and size-weighted token mean."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..adapters import find_adapter
from ..patch import is_patched, last_state
from . import distributed as dist_utils


def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[N, 2C] features: class token and size-weighted mean of the non-prefix tokens (normed output).

    Under ``torchrun`` each rank embeds a contiguous run of whole batches (the batches a single
    process would form, so batch-dependent reductions such as random drop match it exactly) and
    every rank receives the full [N, 2C] in the original order.
    """
    adapter = find_adapter(model)
    prefix = adapter.num_prefix
    patched = is_patched(model)
    lo, hi = 0, len(images)
    distributed = dist_utils.is_active()
    if distributed:
        n_batches = -(-len(images) // batch_size)
        b_lo, b_hi = dist_utils.shard_bounds(n_batches, dist_utils.rank(), dist_utils.world_size())
        lo, hi = min(b_lo * batch_size, len(images)), min(b_hi * batch_size, len(images))
    out = []
    with torch.inference_mode():
        for start in range(lo, hi, batch_size):
            tokens = adapter.features(images[start : start + batch_size])  # [b, N', C]
            if patched:
                sizes = last_state(model).sizes[:, prefix:, None].to(tokens.dtype)
            else:
                sizes = torch.ones_like(tokens[:, prefix:, :1])
            mean = (tokens[:, prefix:] * sizes).sum(1) / sizes.sum(1)
            out.append(torch.cat([tokens[:, 0], mean], dim=1))
            if progress is not None:
                progress(1)
    if not distributed:
        return torch.cat(out)
    if out:
        local = torch.cat(out)
    else:  # more ranks than batches: this rank holds an empty block of the right width and dtype
        param = next(model.parameters())
        local = torch.empty(0, 2 * adapter.embed_dim, dtype=param.dtype, device=param.device)
    return dist_utils.gather_rows(local, len(images))
