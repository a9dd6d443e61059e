"""Running a model one block at a time, through its adapter (the model's own modules, in order).

Early exit needs the class token after every block and needs to drop samples between blocks, so it
cannot call the model's feature forward in one go. The adapter gives the tokens entering the first
block (:meth:`~tokenbudget.adapters.Adapter.embed`), the blocks, and the final norm; no upstream
forward is copied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..adapters import Adapter, find_adapter
from ..patch import is_patched


def blockwise_adapter(model: nn.Module, *, need_class_token: bool = True) -> Adapter:
    """The adapter of an unpatched ``model`` to run block by block; ``ValueError`` when it is patched
    or (if asked) has no class token."""
    adapter = find_adapter(model)
    if is_patched(model):
        raise ValueError("the model is patched by tokenbudget; call tb.remove(model) first")
    if need_class_token and not adapter.has_class_token:
        raise ValueError(
            "exit heads read the class token, and this model has none (class_token=False); "
            "use a model with a class token"
        )
    return adapter


def layer_class_tokens(
    model: nn.Module,
    images: Tensor,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """[N, depth + 2, C]: the class token after each block (rows 0..depth-1, before the final
    norm), then the harness feature of the full-token output, split in two rows: the normed class
    token (row depth) and the mean of the normed non-prefix tokens (row depth + 1)."""
    adapter = blockwise_adapter(model)
    prefix = adapter.num_prefix
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = adapter.embed(images[start : start + batch_size])  # [b, N, C]
            rows = []
            for block in adapter.blocks:
                x = block(x)
                rows.append(x[:, 0])
            x = adapter.final_norm(x)
            rows += [x[:, 0], x[:, prefix:].mean(dim=1)]
            out.append(torch.stack(rows, dim=1).float())
            if progress is not None:
                progress(len(rows[0]))
    return torch.cat(out)
