"""What the entropy guard does on real images: token entropy per block, and how often the guard fires.

:func:`entropy_profile` runs a patched (timm) model over images and records, in every block, each
image's token entropy (:func:`tokenbudget.token_entropy` of its non-prefix tokens, size-weighted,
padding ignored) where the guard measures it (after the attention and the merge, before the MLP:
the input of ``norm2``) and at the block's output, its real token count and the merges the guard
withheld. :func:`guard_summary`
turns that into the numbers the README reports: the share of (image, block) pairs where the guard
fired (among blocks whose plan merges anything), the tokens each image kept beyond the plan, and
the mean FLOPs-ideal cost of the per-image token counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ReductionConfig
from ..flops import model_flops
from ..ops.entropy import token_entropy
from ..patch import apply, installed, last_state, remove
from ..state import TokenState


@dataclass
class EntropyProfile:
    """Per image and block of one config over a set of images (all [num_images, num_blocks])."""

    config: dict
    entropy: Tensor  # token entropy (fraction of the maximum) after each block's merge, before its MLP
    entropy_out: Tensor  # token entropy at each block's output
    real_tokens: Tensor  # tokens (prefix included, padding excluded) after each block
    planned_tokens: Tensor  # [num_blocks] the plan's token count after each block
    planned_merges: Tensor  # [num_blocks] merges the plan asks of each block
    withheld: Tensor  # merges the guard withheld from the plan (0 without a guard)
    input_tokens: int
    flops_ratio: Tensor  # [num_images] block FLOPs of each image's real counts over full tokens
    features: Tensor  # [num_images, 2C] the harness features: class token | size-weighted mean


def entropy_profile(
    model: nn.Module, images: Tensor, config: ReductionConfig, batch_size: int = 32
) -> EntropyProfile:
    """Run ``model`` patched with ``config`` over ``images`` [N, 3, H, W] and record per block
    the token entropy, the real token counts and the withheld merges (see :class:`EntropyProfile`)."""
    apply(model, config)
    adapter, ctx = installed(model)
    dims = adapter.block_dims()
    prefix = ctx.num_prefix
    current: dict[str, list[Tensor]] = {"merged": [], "out": []}

    def measure(tokens: Tensor, state: TokenState) -> Tensor:
        sizes = state.size[:, prefix:] if state.size is not None else None
        return token_entropy(tokens[:, prefix:], sizes)

    def record_merged(layer: int, tokens: Tensor, state: TokenState) -> None:
        current["merged"].append(measure(tokens, state))  # merged tokens entering the MLP

    def record_out(module: nn.Module, args: tuple, output: Tensor) -> None:
        current["out"].append(measure(output, ctx.local.state))

    ctx.observers.append(record_merged)
    hooks = [block.register_forward_hook(record_out) for block in adapter.blocks]
    entropy, entropy_out, real, withheld, features = [], [], [], [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                current["merged"].clear()
                current["out"].clear()
                tokens = adapter.features(images[start : start + batch_size])  # [b, W, C]
                state = last_state(model)
                sizes = state.sizes[:, prefix:, None].to(tokens.dtype)  # 0 for padding
                mean = (tokens[:, prefix:] * sizes).sum(1) / sizes.sum(1)
                features.append(torch.cat([tokens[:, 0], mean], dim=1))
                entropy.append(torch.stack(current["merged"], dim=1))
                entropy_out.append(torch.stack(current["out"], dim=1))
                real.append(state.real_tokens_per_layer)
                withheld.append(state.withheld_per_layer)
    finally:
        ctx.observers.remove(record_merged)
        for hook in hooks:
            hook.remove()
        remove(model)
    planned_merges = torch.tensor(state.merged_per_layer)
    planned = state.input_tokens - planned_merges.cumsum(0)
    real_tokens = torch.cat(real)
    full = model_flops(state.input_tokens, [state.input_tokens] * len(dims), dims)
    flops = torch.tensor([model_flops(state.input_tokens, row.tolist(), dims) / full for row in real_tokens])
    return EntropyProfile(
        config=config.to_dict(),
        entropy=torch.cat(entropy),
        entropy_out=torch.cat(entropy_out),
        real_tokens=real_tokens,
        planned_tokens=planned,
        planned_merges=planned_merges,
        withheld=torch.cat(withheld),
        input_tokens=state.input_tokens,
        flops_ratio=flops,
        features=torch.cat(features),
    )


def guard_summary(profile: EntropyProfile, floor: float) -> dict:
    """The README's numbers from a profile: fire rate, tokens beyond the plan, FLOPs, entropy."""
    merging = profile.planned_merges > 0  # blocks where the plan merges anything
    fired = (profile.withheld > 0)[:, merging]
    extra = profile.real_tokens - profile.planned_tokens  # [N, L] tokens kept beyond the plan
    return {
        "fired_share": float(fired.float().mean()) if fired.numel() else 0.0,
        "images_fired": float(fired.any(dim=1).float().mean()) if fired.numel() else 0.0,
        "extra_tokens_final_mean": float(extra[:, -1].float().mean()),
        "extra_tokens_final_max": int(extra[:, -1].max()),
        "flops_ratio_mean": float(profile.flops_ratio.mean()),
        "below_floor_share": float((profile.entropy < floor).float().mean()),
    }


def format_profile(
    profile: EntropyProfile, floor: float, quantiles: Sequence[float] = (0.1, 0.5, 0.9)
) -> str:
    """One line per block: planned and mean real tokens, quantiles of the entropy the guard sees
    (after the merge), the share of images below the floor there, the median entropy at the block's
    output, and the share of images where the guard fired."""
    q = torch.tensor(list(quantiles))
    header = (
        f"{'block':>5} {'plan':>5} {'real':>7} "
        + " ".join(f"{'H q' + format(v, 'g'):>7}" for v in quantiles)
        + f" {'<floor':>7} {'H out':>6} {'fired':>6}"
    )
    lines = [header, "-" * len(header)]
    for layer in range(profile.entropy.shape[1]):
        ent = profile.entropy[:, layer].float()
        qs = torch.quantile(ent, q)
        lines.append(
            f"{layer:>5} {int(profile.planned_tokens[layer]):>5} {profile.real_tokens[:, layer].float().mean():>7.1f} "
            + " ".join(f"{v:>7.3f}" for v in qs.tolist())
            + f" {(ent < floor).float().mean():>7.2f} {profile.entropy_out[:, layer].float().median():>6.3f}"
            + f" {(profile.withheld[:, layer] > 0).float().mean():>6.2f}"
        )
    return "\n".join(lines)
