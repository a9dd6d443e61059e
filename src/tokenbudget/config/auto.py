"""Configs of the reducers that choose how a ToMe pair becomes one token (:class:`Auto`, :class:`AutoDrop`)
and of PiToMe, all at ToMe's per-layer counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import BudgetConfig


def _check_fraction(name: str, field: str, value: Any, low: float, high: float) -> None:
    """``ValueError`` unless ``value`` is a real number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}: {field} must be a number in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class PiToMe(BudgetConfig):
    """Spectrum-preserving token merging (PiToMe, Tran et al., NeurIPS 2024): energy-score merging.

    At each block (ToMe's per-layer counts: give exactly one budget, see :class:`BudgetConfig`)
    every non-prefix token gets an energy, the mean over all tokens of a margin-shifted ELU of its
    cosine similarity to them (:func:`tokenbudget.ops.energy.energy_scores`): high inside a large
    cluster of similar tokens, low for a distinctive one. The ``2r`` highest-energy tokens
    alternate into sets A and B by energy rank and each A token merges (size-weighted) into its
    most similar B token; the other tokens are kept as they are.

    Args:
        margin: the energy margin; ``None`` (default) is the paper's schedule, falling with depth
            from 0.9 in the first block (:func:`tokenbudget.ops.energy.pitome_margin`).
        alpha: slope of the ELU below the margin (the paper's 1.0).
        prop_attn: proportional attention (log token size added to the attention logits).
        trace_source: track which input patches each token stands for (``state.token_map``).
    """

    method: ClassVar[str] = "pitome"
    _flags: ClassVar[tuple[str, ...]] = ("prop_attn", "trace_source")

    margin: float | None = None
    alpha: float = 1.0
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.margin is not None:
            _check_fraction("PiToMe", "margin (a cosine similarity)", self.margin, -1.0, 1.0)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"PiToMe: alpha must be a number > 0 (the paper's 1.0), got {self.alpha!r}")


@dataclass(frozen=True)
class AutoDrop(BudgetConfig):
    """Drop, never average: ToMe's budget, pairs and speed, the redundant token of each pair dropped.

    Give exactly one budget (``r``, ``keep`` or ``tokens``, see :class:`BudgetConfig`); every
    block removes exactly as many tokens as :class:`ToMe` would, so FLOPs are ToMe's.

    The default finds ToMe's pairs (bipartite soft matching on the attention keys) but *drops* the
    redundant token of each pair instead of averaging the pair: its size moves to its match, so
    proportional attention and size-weighted pooling still count it. No token is ever an average,
    so the tokens keep their spread (ToMe's averages smooth the token set, which the model reads as
    a softer, lower-contrast texture: the bias this reducer exists to avoid). See
    ``docs/methods/auto.md`` for the measurements behind the choice. Outside textures dropping
    keeps less than averaging (lower cosine to the full features on photos and Fashion-MNIST, and
    lower accuracy where small flaws decide the class): :class:`Auto` chooses per pair between the
    two. The options below are the variants measured on the way (``docs/methods/auto.md``).

    Args:
        matching: ``"greedy"`` (ToMe's: several tokens may merge into one per block) or
            ``"disjoint"`` (one-to-one: a token receives at most one other per block;
            :func:`tokenbudget.ops.disjoint.disjoint_bipartite_matching`).
        max_size: avoid merged groups of more than this many patches (pairs over the cap merge
            only when a block has too few pairs within it); ``None``: no cap. Needs
            ``matching="disjoint"``.
        merge: how a matched pair becomes one token: ``"drop"`` (default: the matched token is
            dropped and its size added to its match), ``"mean"`` (size-weighted average, ToMe),
            ``"mlerp"`` (average rescaled to the longest member's norm, ToFu) or ``"moment"``
            (average moved away from the image's mean token until the group keeps its members'
            second moment: :func:`tokenbudget.ops.moments.merge_moment_preserving`).
        mean_up_to: with ``merge="drop"``: a group that stands for at most this many patches after
            the block is averaged as ToMe does, a larger one drops (``None``: always drop;
            :func:`tokenbudget.ops.small_merge.merge_small_groups`).
        prune_layers: blocks before this one drop the matched token whatever ``merge`` says (its
            size goes to its match, as in ToFu): prune early, merge late; 0: ``merge`` everywhere.
        prop_attn: proportional attention (log token size added to the attention logits).
        trace_source: track which input patches each token stands for (``state.token_map``).
    """

    method: ClassVar[str] = "auto-drop"
    _flags: ClassVar[tuple[str, ...]] = ("prop_attn", "trace_source")
    _matchings: ClassVar[tuple[str, ...]] = ("greedy", "disjoint")
    _merges: ClassVar[tuple[str, ...]] = ("drop", "mean", "mlerp", "moment")

    matching: str = "greedy"
    max_size: int | None = None
    merge: str = "drop"
    mean_up_to: int | None = None
    prune_layers: int = 0
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.matching not in self._matchings:
            raise ValueError(
                f"AutoDrop: matching must be one of {list(self._matchings)}, got {self.matching!r}"
            )
        if self.merge not in self._merges:
            raise ValueError(f"AutoDrop: merge must be one of {list(self._merges)}, got {self.merge!r}")
        if self.max_size is not None:
            if isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or self.max_size < 2:
                raise ValueError(
                    f"AutoDrop: max_size must be an int >= 2 (patches) or None, got {self.max_size!r}"
                )
            if self.matching != "disjoint":
                raise ValueError(
                    "AutoDrop: max_size needs matching='disjoint' (a greedy block can exceed any cap)"
                )
        m = self.mean_up_to
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, int) or m < 2:
                raise ValueError(f"AutoDrop: mean_up_to must be an int >= 2 (patches) or None, got {m!r}")
            if self.merge != "drop":
                raise ValueError(
                    "AutoDrop: mean_up_to applies to merge='drop' (it averages the small groups)"
                )
        p = self.prune_layers
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(f"AutoDrop: prune_layers must be an int >= 0, got {p!r}")


@dataclass(frozen=True)
class Auto(BudgetConfig):
    """ToMe's budget and speed, with each matched pair either averaged or its redundant token dropped,
    chosen per image and per block from the tokens themselves (no labels, no training).

    Give exactly one budget (``r``, ``keep`` or ``tokens``, see :class:`BudgetConfig`); every block
    finds ToMe's pairs (bipartite soft matching on the attention keys) and removes exactly as many
    tokens as :class:`ToMe` would, so FLOPs are ToMe's. Averaging keeps what both members of a pair
    carry, but on a stationary texture the averages of many similar patches are smoother and lower in
    contrast than any real patch, and the model reads them as a softer fabric (the feature shift of
    ``tokenbudget eval --shift``); dropping keeps every token a real one. The choice per pair, from
    the cosine similarity ``s`` of its two keys (:func:`tokenbudget.ops.gated_merge.pair_similarity`):

    * ``rule="dispersion"`` (default): per image and block, average every pair (fused as ``fuse``
      says) when the standard deviation of the pairs' similarities is at least ``threshold``
      (0.014), else drop the redundant token of every pair. A stationary texture matches all its
      pairs about equally well (spread mostly 0.001-0.013 in DINOv2-S's blocks on woven fabrics):
      its averages would smooth it, so Auto drops. An object on a background (clothes, digits) or an
      image with a flaw pairs near-duplicates next to merely similar tokens (spread 0.011-0.06 in
      late blocks): averaging keeps what the merely similar token carries, so Auto averages.
    * ``rule="distinct"``: average the pairs with ``s < threshold``, drop the near-duplicates.
    * ``rule="duplicate"``: average the pairs with ``s >= threshold``, drop the rest.
    * ``rule="outlier"``: per pair, average the pairs whose ``s`` is more than ``threshold``
      standard deviations below the mean of the image's pairs in that block, drop the rest.

    The threshold was chosen on validation sets only (the smallest worst-case gap to the best of
    ToMe, AutoDrop and ToFu over woven fabrics, inspection surfaces and Fashion-MNIST items,
    ``docs/methods/auto.md``); :class:`AutoDrop`
    always drops, :class:`ToMe` always averages.

    Args:
        rule: the criterion above.
        threshold: its threshold (a key cosine for ``distinct``/``duplicate``, a standard deviation
            for ``dispersion``).
        fuse: how an averaged pair becomes one token: ``"mlerp"`` (default: the size-weighted mean
            rescaled to its longest member's norm, ToFu's MLERP) or ``"mean"`` (ToMe's average).
        prop_attn: proportional attention (log token size added to the attention logits).
        trace_source: track which input patches each token stands for (``state.token_map``).
    """

    method: ClassVar[str] = "auto"
    _flags: ClassVar[tuple[str, ...]] = ("prop_attn", "trace_source")
    _rules: ClassVar[tuple[str, ...]] = ("distinct", "duplicate", "dispersion", "outlier")
    _fuses: ClassVar[tuple[str, ...]] = ("mean", "mlerp")

    rule: str = "dispersion"
    threshold: float = 0.014
    fuse: str = "mlerp"
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rule not in self._rules:
            raise ValueError(f"Auto: rule must be one of {list(self._rules)}, got {self.rule!r}")
        if self.fuse not in self._fuses:
            raise ValueError(f"Auto: fuse must be one of {list(self._fuses)}, got {self.fuse!r}")
        low, high = {"dispersion": (0.0, 1.0), "outlier": (-3.0, 3.0)}.get(self.rule, (-1.0, 1.0))
        _check_fraction("Auto", f"threshold (rule {self.rule!r})", self.threshold, low, high)
