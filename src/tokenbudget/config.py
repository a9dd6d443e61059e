"""Configurations: one frozen dataclass per strategy, validated on creation, round-tripping JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from .schedule import RSpec, layer_schedule

_REGISTRY: dict[str, type[ReductionConfig]] = {}

#: the entropy guard's default floor (``ToMe(entropy_floor=DEFAULT_ENTROPY_FLOOR)``, method ``tome-guard``):
#: a block may not take an image's token entropy below 27.34 % of its maximum
DEFAULT_ENTROPY_FLOOR = 0.2734


def _check_entropy_floor(name: str, floor: Any) -> None:
    """``ValueError`` unless ``floor`` is ``None`` (no guard) or a fraction in [0, 1]."""
    if floor is None:
        return
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
        raise ValueError(
            f"{name}: entropy_floor is a fraction of the maximum token entropy in [0, 1] (e.g. "
            f"{DEFAULT_ENTROPY_FLOOR}), or None for no guard; got {floor!r}"
        )


@dataclass(frozen=True)
class ReductionConfig:
    """Base of every strategy config. ``method`` names the strategy in JSON and on the CLI."""

    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _REGISTRY[cls.method] = cls

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with a ``"method"`` key; tuples become lists (JSON has no tuples)."""
        return {"method": self.method, **asdict(self)}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def method_names() -> list[str]:
    """Names of every registered method (``"tome"``, ``"random"``, ``"pool"``, ...)."""
    return list(_REGISTRY)


def config_class(method: str) -> type[ReductionConfig]:
    """The config class registered under ``method``; ``ValueError`` listing the known ones."""
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[method]


def config_from_dict(data: dict[str, Any]) -> ReductionConfig:
    """Build a config from :meth:`ReductionConfig.to_dict` output (or hand-written JSON)."""
    data = dict(data)
    method = data.pop("method", None)
    cls = config_class(method)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(names)}")
    return cls(**data)


def config_from_json(text: str) -> ReductionConfig:
    """Parse a JSON config, e.g. ``'{"method": "tome", "r": 16}'``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f'config is not valid JSON ({err}); expected e.g. \'{{"method": "tome", "r": 16}}\''
        ) from None
    if not isinstance(data, dict):
        raise ValueError("a JSON config must be an object with a 'method' key")
    return config_from_dict(data)


@dataclass(frozen=True)
class BudgetConfig(ReductionConfig):
    """A per-layer token budget shared by every method: exactly one of ``r``, ``keep``, ``tokens``.

    Args:
        r: tokens removed per block: an int, ``(r, inflection)`` (ToMe's linear schedule, inflection
            in [-1, 1], -1 = the paper's decreasing schedule) or a list with one count per block.
            ``r=0`` leaves the model unchanged. A block that cannot remove ``r`` (at most half of its
            non-prefix tokens) removes what it can; ``last_state(model).merged_per_layer`` says so.
        keep: fraction of the non-prefix tokens left after the last block (0 < keep <= 1), turned
            into a per-layer schedule for the actual input length.
        tokens: total tokens (prefix included) left after the last block.
    """

    r: RSpec | None = None
    keep: float | None = None
    tokens: int | None = None

    #: boolean options of the subclass, validated as such
    _flags: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        name = type(self).__name__
        given = [field for field in ("r", "keep", "tokens") if getattr(self, field) is not None]
        if len(given) != 1:
            raise ValueError(
                f"{name} needs exactly one budget: r (tokens removed per block, e.g. {name}(r=16)), keep "
                f"(fraction of tokens left, e.g. {name}(keep=0.25)) or tokens (tokens left); got {given or 'none'}"
            )
        r = self.r
        if isinstance(r, list) and len(r) == 2 and isinstance(r[1], float):
            # JSON has no tuples: a list whose second entry is a float is the (r, inflection) form.
            r = (r[0], r[1])
        elif isinstance(r, (list, tuple)) and not (len(r) == 2 and isinstance(r[1], float)):
            r = list(r)  # per-layer counts
        object.__setattr__(self, "r", r)
        if r is not None:
            # The block count is unknown until apply(); check the form of the spec now.
            layer_schedule(r, len(r) if isinstance(r, list) else 2)
        if self.keep is not None:
            if (
                isinstance(self.keep, bool)
                or not isinstance(self.keep, (int, float))
                or not 0.0 < self.keep <= 1.0
            ):
                raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.tokens is not None:
            if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
                raise ValueError(f"tokens must be an int >= 1, got {self.tokens!r}")
        for flag in self._flags:
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        data = {"method": self.method}
        for f in fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @property
    def is_identity(self) -> bool:
        """True when the budget is certainly zero (r=0 in every block, or keep=1)."""
        if self.r is not None:
            if isinstance(self.r, int):
                return self.r == 0
            if isinstance(self.r, tuple):
                return self.r[0] == 0
            return all(c == 0 for c in self.r)
        return self.keep == 1.0


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
    ``tokenbudget eval --methods tome,tome-optimal`` and ``bench --method tome-optimal`` reach it."""

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
    ``tokenbudget eval --methods tome,tome-guard`` and ``bench --method tome-guard`` reach it."""

    method: ClassVar[str] = "tome-guard"

    entropy_floor: float | None = DEFAULT_ENTROPY_FLOOR

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.entropy_floor is None:
            raise ValueError("ToMeGuard needs an entropy_floor; for ToMe without the guard use tb.ToMe(...)")


def _check_stages(name: str, keep: Any, layers: Any) -> tuple[int, ...]:
    """Validate a per-stage keep ratio and stage layers; returns the layers as a sorted tuple."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(
            f"{name}: keep is the fraction of tokens kept at each pruning layer, in (0, 1], got {keep!r}"
        )
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if not isinstance(layers, (list, tuple)) or any(
        isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers
    ):
        raise ValueError(f"{name}: layers must be block indices (ints >= 0), e.g. (3, 6, 9); got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name}: layers must not repeat, got {list(layers)}")
    return tuple(sorted(layers))


@dataclass(frozen=True)
class Prune(ReductionConfig):
    """Training-free attention pruning (EViT, Liang et al., ICLR 2022).

    After the attention of each block in ``layers`` the non-prefix tokens are ranked by the class
    token's attention to them (head average; only the class query's row is computed, so the fused
    attention kernel stays on) and the best ``ceil(keep * M)`` of the ``M`` that entered are kept.

    ``keep`` is EViT's per-stage keep ratio, not the final fraction of ``ToMe(keep=...)``: stages
    compound, so ``Prune(keep=0.7)`` with three stages leaves about 0.7**3 = 34 % of the tokens after
    the last stage (and all of them before the first). Compare methods at equal FLOPs, which
    ``tokenbudget bench`` and ``tokenbudget eval`` report for every condition.

    Args:
        keep: fraction of the non-prefix tokens kept at each pruning layer, in (0, 1].
        layers: 0-based indices of the blocks after whose attention tokens are pruned.
        fuse: the pruned tokens become one extra token, their class-attention-weighted average,
            whose size is the sum of theirs (size-weighted pooling and proportional attention then
            count it as every patch it stands for); it competes like any token at later stages.
        prop_attn: add log(token size) to the attention logits once a fused token exists.

    Prefix tokens (class, distillation, registers) are always kept. Models without a class token
    are refused with a ``ValueError`` (there is no class attention to rank by).
    """

    method: ClassVar[str] = "prune"

    keep: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    fuse: bool = True
    prop_attn: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_stages("Prune", self.keep, self.layers))
        for flag in ("fuse", "prop_attn"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"Prune: {flag} must be True or False, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "layers": list(self.layers)}

    @property
    def is_identity(self) -> bool:
        """True when nothing is ever pruned (keep=1 or no layers)."""
        return self.keep == 1.0 or not self.layers


@dataclass(frozen=True)
class DynamicViT(ReductionConfig):
    """Learned token pruning (DynamicViT, Rao et al., NeurIPS 2021) with trained predictors.

    At each block in ``layers`` a small predictor (an MLP over each token's feature joined with
    the mean of the kept tokens) scores the tokens after the block's attention; the best
    ``ceil(keep * M)`` of the ``M`` non-prefix tokens that entered are kept and the rest removed
    before the MLP. ``keep`` is per stage and compounds, as in :class:`Prune` without fusion, so
    both leave the same token counts. Prefix tokens are always kept.

    Args:
        keep: fraction of the non-prefix tokens kept at each pruning layer, in (0, 1].
        layers: 0-based indices of the blocks after whose attention tokens are pruned; must be the
            layers the predictor was trained for.
        predictor: path of trained predictors (``tokenbudget train-predictor`` writes
            ``NAME.safetensors`` and ``NAME.json``; either path, or the stem, works). Required to
            patch a model; a predictor trained for another model width, depth or layer set is refused.
    """

    method: ClassVar[str] = "dynamicvit"

    keep: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    predictor: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_stages("DynamicViT", self.keep, self.layers))
        if self.predictor is not None and not isinstance(self.predictor, str):
            object.__setattr__(self, "predictor", str(self.predictor))  # pathlib.Path

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "layers": list(self.layers)}

    @property
    def is_identity(self) -> bool:
        """True when nothing is ever pruned (keep=1 or no layers)."""
        return self.keep == 1.0 or not self.layers


@dataclass(frozen=True)
class AdaptivePatch(ReductionConfig):
    """Adaptive patching: each image runs at its own patch size, chosen by its complexity score.

    Simple images get coarse patches (few tokens), detailed ones fine patches (many tokens). The
    patch embedding is resampled to each size by FlexiViT's pseudo-inverse resize and the position
    embeddings to each grid; a batch runs as one sub-batch per size (never padded) through the
    model's unchanged blocks, and outputs come back in input order (:mod:`tokenbudget.adaptive`).

    Args:
        patch_sizes: patch sides in px, coarse to fine; ``None``: twice, once and half the model's
            native patch (32 / 16 / 8 for a /16 model: 49 / 196 / 784 patch tokens at 224 px;
            28 / 14 / 7 for DINOv2 /14: 64 / 256 / 1024). Each must divide the input size.
        thresholds: one fewer than ``patch_sizes``, non-decreasing, in [0, 1]: an image with score
            ``s`` gets ``patch_sizes[i]``, ``i`` the number of thresholds ``<= s``. Calibrate them to
            a mean token count with ``tb.adaptive.calibrate``. Not needed with one patch size.
        score: the complexity score (``"detail"``: :func:`tokenbudget.adaptive.detail_score`).
        score_block: tile side of the score in px; ``None``: the model's native patch size.
        mode: ``"patch"`` (resample the patch embedding) or ``"resolution"``: the same token counts
            by resizing each image to ``grid * native_patch`` px and keeping the native patch size.
        target_tokens: the mean patch tokens per image the thresholds were calibrated to (a record
            written by ``tb.adaptive.calibrate``; not used at run time).
        keep: refused without thresholds: ``AdaptivePatch(keep=0.5)`` cannot know which images are
            complex; calibrate with ``tb.adaptive.calibrate(model, images, keep=0.5)``.
    """

    method: ClassVar[str] = "adaptive-patch"
    _modes: ClassVar[tuple[str, ...]] = ("patch", "resolution")

    patch_sizes: tuple[int, ...] | None = None
    thresholds: tuple[float, ...] | None = None
    score: str = "detail"
    score_block: int | None = None
    mode: str = "patch"
    target_tokens: float | None = None
    keep: float | None = None

    def __post_init__(self) -> None:
        from .adaptive.complexity import SCORES
        from .adaptive.thresholds import check_thresholds

        sizes = self.patch_sizes
        if sizes is not None:
            if isinstance(sizes, int) and not isinstance(sizes, bool):
                sizes = (sizes,)
            if (
                not isinstance(sizes, (list, tuple))
                or not sizes
                or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in sizes)
            ):
                raise ValueError(
                    f"patch_sizes must be patch sides in px (ints >= 1), e.g. (28, 14, 7); got {sizes!r}"
                )
            if any(b >= a for a, b in zip(sizes, sizes[1:], strict=False)):
                raise ValueError(
                    f"patch_sizes must run coarse to fine (strictly decreasing), got {list(sizes)}"
                )
            object.__setattr__(self, "patch_sizes", tuple(sizes))
        num_sizes = len(self.patch_sizes) if self.patch_sizes is not None else 3
        if self.thresholds is None:
            if num_sizes > 1:
                target = "" if self.keep is None else f", keep={self.keep}"
                raise ValueError(
                    f"AdaptivePatch needs {num_sizes - 1} thresholds for {num_sizes} patch sizes (which images "
                    f"are complex is learnt from images): calibrate them with tb.adaptive.calibrate(model, "
                    f"images{target or ', target_tokens=...'}), or measure with `tokenbudget adaptive-eval`"
                )
        else:
            object.__setattr__(self, "thresholds", check_thresholds(self.thresholds, num_sizes))
        if self.score not in SCORES:
            raise ValueError(f"unknown complexity score {self.score!r}; choose from {', '.join(SCORES)}")
        block = self.score_block
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ValueError(
                f"score_block must be an int >= 1 (px) or None (the native patch), got {block!r}"
            )
        if self.mode not in self._modes:
            raise ValueError(
                f"mode must be 'patch' (resample the patch embedding) or 'resolution' (resize the image), "
                f"got {self.mode!r}"
            )
        if self.keep is not None and (
            isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep
        ):
            raise ValueError(
                f"keep must be a positive fraction of the native patch tokens, got {self.keep!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in ("patch_sizes", "thresholds"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @property
    def is_identity(self) -> bool:
        """Never certain: even one patch size may differ from the model's native one."""
        return False


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
class Auto(BudgetConfig):
    """The recommended default reducer: ToMe's budget and speed without ToMe's bias on textures.

    Give exactly one budget (``r``, ``keep`` or ``tokens``, see :class:`BudgetConfig`); every
    block removes exactly as many tokens as :class:`ToMe` would, so FLOPs are ToMe's.

    Args:
        matching: ``"greedy"`` (ToMe's: several tokens may merge into one per block) or
            ``"disjoint"`` (one-to-one: a token receives at most one other per block;
            :func:`tokenbudget.ops.disjoint.disjoint_bipartite_matching`).
        max_size: avoid merged groups of more than this many patches (pairs over the cap merge
            only when a block has too few pairs within it); ``None``: no cap. Needs
            ``matching="disjoint"``.
        merge: how a group becomes one token: ``"mean"`` (size-weighted average, ToMe),
            ``"mlerp"`` (average rescaled to the longest member's norm, ToFu) or ``"moment"``
            (average moved away from the image's mean token until the group keeps its members'
            second moment: :func:`tokenbudget.ops.moments.merge_moment_preserving`).
        prune_layers: blocks before this one drop the matched token instead of merging it (its
            size goes to its match, as in ToFu); 0 merges everywhere.
        prop_attn: proportional attention (log token size added to the attention logits).
        trace_source: track which input patches each token stands for (``state.token_map``).
    """

    method: ClassVar[str] = "auto"
    _flags: ClassVar[tuple[str, ...]] = ("prop_attn", "trace_source")
    _matchings: ClassVar[tuple[str, ...]] = ("greedy", "disjoint")
    _merges: ClassVar[tuple[str, ...]] = ("mean", "mlerp", "moment")

    matching: str = "greedy"
    max_size: int | None = None
    merge: str = "mean"
    prune_layers: int = 0
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.matching not in self._matchings:
            raise ValueError(f"Auto: matching must be one of {list(self._matchings)}, got {self.matching!r}")
        if self.merge not in self._merges:
            raise ValueError(f"Auto: merge must be one of {list(self._merges)}, got {self.merge!r}")
        if self.max_size is not None:
            if isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or self.max_size < 2:
                raise ValueError(
                    f"Auto: max_size must be an int >= 2 (patches) or None, got {self.max_size!r}"
                )
            if self.matching != "disjoint":
                raise ValueError(
                    "Auto: max_size needs matching='disjoint' (a greedy block can exceed any cap)"
                )
        p = self.prune_layers
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(f"Auto: prune_layers must be an int >= 0, got {p!r}")
