"""Configs of the merging methods and their baselines at the same per-layer token counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import DEFAULT_ENTROPY_FLOOR, BudgetConfig, _check_entropy_floor


@dataclass(frozen=True)
class ToMe(BudgetConfig):
    """Token Merging (Bolya et al., ICLR 2023): bipartite soft matching between attention and MLP.

    Give exactly one budget (``r``, ``keep`` or ``tokens``, see :class:`BudgetConfig`); ``r`` is the
    number of tokens merged per block.

    Args:
        prop_attn: proportional attention: add log(token size) to the attention logits so a merged
            token counts as the tokens it stands for.
        trace_source: track which input patches each token contains (``state.source``,
            ``state.token_map``), for visualization.
        matching: ``"greedy"`` (ToMe: each A token takes its most similar B token and the ``r``
            best edges merge; several A tokens may merge into one B token) or ``"optimal"`` (the
            ``r`` disjoint A->B pairs of maximum total similarity, an exact assignment solved
            with scipy: ``pip install 'tokenbudget[optimal]'``; see
            :mod:`tokenbudget.ops.assignment`).
        entropy_floor: the entropy guard (opt-in; ``None``, the default, is the paper's ToMe): a
            block merges fewer tokens in an image whose token entropy
            (:func:`tokenbudget.token_entropy`) would otherwise fall below this fraction of its
            maximum, as few fewer as needed; :data:`DEFAULT_ENTROPY_FLOOR` = 0.2734 is the
            default floor (method ``tome-guard``). See :mod:`tokenbudget.strategies.guard`.
    """

    method: ClassVar[str] = "tome"
    _flags: ClassVar[tuple[str, ...]] = ("prop_attn", "trace_source", "preserve_detail")
    _matchings: ClassVar[tuple[str, ...]] = ("greedy", "optimal")

    prop_attn: bool = True
    trace_source: bool = False
    matching: str = "greedy"
    preserve_detail: bool = False
    detail_fraction: float = 0.05
    entropy_floor: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_entropy_floor(type(self).__name__, self.entropy_floor)
        if self.matching not in self._matchings:
            raise ValueError(
                f"matching must be one of {', '.join(map(repr, self._matchings))} "
                f"(greedy: ToMe's r best edges; optimal: exact one-to-one assignment), got {self.matching!r}"
            )
        f = self.detail_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ValueError(f"detail_fraction must be a fraction in [0, 1), e.g. 0.05; got {f!r}")


@dataclass(frozen=True)
class ToMeDetail(ToMe):
    """ToMe that never merges the most distinctive tokens: :class:`ToMe` with ``preserve_detail=True``.

    At each block, the ``detail_fraction`` of non-prefix tokens whose nearest neighbour is least
    similar are set aside (neither merged away nor merged into); bipartite matching merges the same
    number of tokens as ToMe among the rest, so speed and budgets are ToMe's.
    """

    method: ClassVar[str] = "tome-detail"

    preserve_detail: bool = True


@dataclass(frozen=True)
class RandomDrop(BudgetConfig):
    """Baseline: drop ``r`` random non-prefix tokens per block (same place and counts as ToMe).

    The choice is random per image and per block but reproducible: block ``i`` of every forward
    draws from a generator seeded with ``seed + i``.
    """

    method: ClassVar[str] = "random"

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


@dataclass(frozen=True)
class GridPool(BudgetConfig):
    """Baseline: spatial average pooling at ToMe's per-layer counts.

    Each block merges tokens with their spatially nearest partner (distance between the centroids
    of the patches they cover), size-weighted, with ToMe's alternating split; the result is 2-D
    average pooling of the patch grid spread over the blocks, blind to content.
    """

    method: ClassVar[str] = "pool"
    _flags: ClassVar[tuple[str, ...]] = ("prop_attn", "trace_source")

    prop_attn: bool = True
    trace_source: bool = False
    entropy_floor: float | None = None  # the entropy guard, as in ToMe (None: off)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_entropy_floor(type(self).__name__, self.entropy_floor)


@dataclass(frozen=True)
class ToMeOptimal(ToMe):
    """ToMe with ``matching="optimal"``, registered as ``"tome-optimal"`` so that
    ``tokenbudget eval --methods tome,tome-optimal`` and ``bench --methods tome-optimal`` reach it."""

    method: ClassVar[str] = "tome-optimal"

    matching: str = "optimal"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.matching != "optimal":
            raise ValueError(
                f"ToMeOptimal always uses matching='optimal'; for {self.matching!r} use tb.ToMe(matching=...)"
            )


@dataclass(frozen=True)
class ToFu(BudgetConfig):
    """Token Fusion (Kim et al., WACV 2024): prune early, merge late with a norm-preserving average.

    The same bipartite matching as ToMe picks the ``r`` most similar A->B pairs in every block
    (give exactly one budget, see :class:`BudgetConfig`). In blocks ``< switch_layer`` the
    matched A token is dropped (pruning: its match is kept unchanged, and absorbs its size so
    sizes still count input patches); from block ``switch_layer`` on, groups are merged by MLERP:
    the size-weighted mean direction rescaled to the largest norm in the group
    (:func:`tokenbudget.ops.merge.merge_mlerp`).

    Args:
        switch_layer: first block that merges instead of pruning. 0 merges in every block;
            a value >= the model's depth prunes in every block.
        prop_attn: proportional attention (log token size added to the attention logits).
        trace_source: track which input patches each token stands for (``state.token_map``);
            a dropped patch is attributed to the token it was matched to.
    """

    method: ClassVar[str] = "tofu"
    _flags: ClassVar[tuple[str, ...]] = ("prop_attn", "trace_source")

    switch_layer: int = 3
    prop_attn: bool = True
    trace_source: bool = False
    entropy_floor: float | None = None  # the entropy guard, as in ToMe (None: off)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_entropy_floor(type(self).__name__, self.entropy_floor)
        if (
            isinstance(self.switch_layer, bool)
            or not isinstance(self.switch_layer, int)
            or self.switch_layer < 0
        ):
            raise ValueError(
                f"switch_layer must be an int >= 0 (the first block that merges; earlier blocks prune), "
                f"got {self.switch_layer!r}"
            )


@dataclass(frozen=True)
class ToMeGuard(ToMe):
    """ToMe with the entropy guard at the default floor: :class:`ToMe` with
    ``entropy_floor=DEFAULT_ENTROPY_FLOOR``, registered as ``"tome-guard"`` so that
    ``tokenbudget eval --methods tome,tome-guard`` and ``bench --methods tome-guard`` reach it."""

    method: ClassVar[str] = "tome-guard"

    entropy_floor: float | None = DEFAULT_ENTROPY_FLOOR

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.entropy_floor is None:
            raise ValueError("ToMeGuard needs an entropy_floor; for ToMe without the guard use tb.ToMe(...)")
