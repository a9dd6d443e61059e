"""Per-image visual token budgets of a VLM: how many of each image's visual tokens reach the LLM.

A budget is a count (``64``: every image keeps 64), a fraction (``0.25``: every image keeps a quarter
of its own tokens, rounded, at least one) or, with ``allocation="adaptive"``, the same total spread
over the images of a call in proportion to a per-image score (images with more varied tokens get
more), the mean held exactly. Pure integer arithmetic on lists; no model knowledge.
"""

from __future__ import annotations

from collections.abc import Sequence

ALLOCATIONS = ("fixed", "adaptive")


def check_visual_budget(owner: str, tokens: object, allocation: object) -> None:
    """``ValueError`` unless ``tokens`` is an int >= 1 or a fraction in (0, 1] and ``allocation``
    is one of :data:`ALLOCATIONS`."""
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)):
        raise ValueError(
            f"{owner}: tokens is a count of visual tokens per image (e.g. 64) or a fraction of each "
            f"image's visual tokens (e.g. 0.25); got {tokens!r}"
        )
    if isinstance(tokens, int) and tokens < 1:
        raise ValueError(f"{owner}: a token count must be >= 1, got {tokens}")
    if isinstance(tokens, float) and not 0.0 < tokens <= 1.0:
        raise ValueError(
            f"{owner}: a fractional budget must be in (0, 1] (1.0 keeps every token); got {tokens}; "
            "give an int for a count"
        )
    if allocation not in ALLOCATIONS:
        raise ValueError(f"{owner}: allocation must be one of {ALLOCATIONS}, got {allocation!r}")


def visual_token_counts(
    tokens: int | float,
    available: Sequence[int],
    *,
    allocation: str = "fixed",
    scores: Sequence[float] | None = None,
) -> list[int]:
    """Tokens to keep per image, given each image's ``available`` visual tokens.

    ``tokens``: a count (every image keeps it; ``ValueError`` naming the image when an image has
    fewer) or a fraction of each image's own tokens (``round(f * n)``, at least 1).
    ``allocation="adaptive"`` spreads the same total over the images in proportion to ``scores``
    (one non-negative number per image), each image between 1 and its own count: the mean is held
    exactly, and equal scores give the fixed counts' total split as evenly as the bounds allow.
    """
    available = [int(n) for n in available]
    if any(n < 1 for n in available):
        raise ValueError(f"every image needs at least one visual token, got counts {available}")
    if isinstance(tokens, float):
        fixed = [min(n, max(1, round(tokens * n))) for n in available]
    else:
        short = [(i, n) for i, n in enumerate(available) if n < tokens]
        if short:
            i, n = short[0]
            raise ValueError(
                f"a budget of {tokens} visual tokens per image is larger than image {i}'s {n} tokens; "
                f"give at most {min(available)} or a fraction such as 0.25"
            )
        fixed = [int(tokens)] * len(available)
    if allocation == "fixed" or len(available) == 1:
        return fixed
    if allocation != "adaptive":
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if scores is None or len(scores) != len(available):
        raise ValueError(f"adaptive allocation needs one score per image ({len(available)}), got {scores!r}")
    import torch  # here, not at module level: configs import this module and must not load torch

    from .apportion import apportion

    weights = torch.tensor([[max(0.0, float(s)) for s in scores]], dtype=torch.float64)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"adaptive allocation needs finite scores, got {list(scores)}")
    lo = torch.ones_like(weights, dtype=torch.long)
    hi = torch.tensor([available], dtype=torch.long)
    total = torch.tensor([sum(fixed)], dtype=torch.long)
    return [int(v) for v in apportion(weights, total, lo, hi)[0]]
