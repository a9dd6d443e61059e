"""A slow, literal ToMe written from the paper's description, to check the fast one against.

Everything is per image and per token in plain Python loops: attention is computed by hand
(softmax of q.k / sqrt(d) + log(size) over keys), matching walks the token lists. It shares only the
model's weights with the library; none of the library's code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _attention(block: torch.nn.Module, x: Tensor, size: Tensor, prop_attn: bool) -> tuple[Tensor, Tensor]:
    """x [N, C] (already normed) -> (attention output [N, C], keys [H, N, d])."""
    attn = block.attn
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(x.shape[0], 3, heads, head_dim).permute(1, 2, 0, 3)  # [3, H, N, d]
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # [H, N, N]
    if prop_attn:
        logits = logits + size.log()[None, None, :]
    out = logits.softmax(dim=-1) @ v  # [H, N, d]
    out = out.transpose(0, 1).reshape(x.shape[0], heads * head_dim)
    return attn.proj(attn.norm(out)), k


def _merge(
    x: Tensor, size: Tensor, keys: Tensor, r: int, prefix: int
) -> tuple[Tensor, Tensor, list[list[int]]]:
    """One ToMe step on one image: x [N, C], size [N], keys [H, N, d]."""
    n = x.shape[0]
    metric = keys.mean(dim=0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    set_a = [i for i in range(0, n, 2) if i >= prefix]
    set_b = [j for j in range(1, n, 2) if j >= prefix]
    r = min(r, (n - prefix) // 2)
    sims = (metric[set_a] @ metric[set_b].T).tolist()  # cosine similarity of every A-B pair
    best = {}
    for row, i in enumerate(set_a):
        best[i] = max(
            zip(sims[row], set_b, strict=True)
        )  # (similarity, partner); ties impossible with random floats
    ranked = sorted(set_a, key=lambda i: -best[i][0])
    merged_away = set(ranked[:r])
    kept_a = [i for i in set_a if i not in merged_away]
    order = list(range(prefix)) + kept_a + set_b
    members = {t: [t] for t in order}
    for i in merged_away:
        members[best[i][1]].append(i)
    new_x = torch.stack(
        [(x[members[t]] * size[members[t], None]).sum(0) / size[members[t]].sum() for t in order]
    )
    new_size = torch.stack([size[members[t]].sum() for t in order])
    return new_x, new_size, [members[t] for t in order]


def reference_tome_tokens(
    model: torch.nn.Module, images: Tensor, r_per_layer: list[int], prop_attn: bool = True
) -> list[tuple[Tensor, Tensor]]:
    """Per image: (final normed tokens [N', C], token sizes [N']) of ``model`` with ToMe, the slow way."""
    prefix = model.num_prefix_tokens
    results = []
    with torch.no_grad():
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for x in tokens:
            size = torch.ones(x.shape[0])
            for block, r in zip(model.blocks, r_per_layer, strict=True):
                attn_out, keys = _attention(block, block.norm1(x), size, prop_attn)
                x = x + block.ls1(attn_out)
                if r > 0:
                    x, size, _ = _merge(x, size, keys, r, prefix)
                x = x + block.ls2(block.mlp(block.norm2(x)))
            results.append((model.norm(x), size))
    return results


def reference_tome_logits(model: torch.nn.Module, images: Tensor, r_per_layer: list[int]) -> Tensor:
    """Logits of a class-token or average-pooled ``model`` with ToMe (pooling weighted by size)."""
    prefix = model.num_prefix_tokens
    pooled = []
    for x, size in reference_tome_tokens(model, images, r_per_layer):
        if model.global_pool == "avg":
            w = size[prefix:, None]
            pooled.append((x[prefix:] * w).sum(0) / w.sum())
        else:
            pooled.append(x[0])
    with torch.no_grad():
        return model.head(model.fc_norm(torch.stack(pooled)))
