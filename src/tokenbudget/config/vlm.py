"""Configs that cut the visual tokens of a vision-language model: what every such config shares.

A VLM config says how many of each image's visual tokens reach the language model (``tokens``: a
count, a fraction of that image's tokens, or with ``allocation="adaptive"`` a per-image spread that
holds the mean) and where they are cut. ``tb.apply(vlm, config)`` installs it on a transformers VLM
(see ``tokenbudget.adapters.hf_vlm``); the method-specific configs subclass :class:`VisualTokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .base import ReductionConfig


@dataclass(frozen=True)
class VisualTokens(ReductionConfig):
    """Base of every VLM visual-token config (not a method itself).

    Args:
        tokens: visual tokens per image that reach the language model: an int (a count, e.g. 64)
            or a float in (0, 1] (a fraction of each image's own visual tokens, e.g. 0.25; 1.0 keeps
            them all and leaves the model's outputs unchanged).
        allocation: ``"fixed"`` (every image gets ``tokens``) or ``"adaptive"`` (the same total
            spread over the images of a call by how varied each image's tokens are; mean held).
    """

    method: ClassVar[str] = ""

    tokens: int | float = 0.25
    allocation: str = "fixed"

    def __post_init__(self) -> None:
        # imported here: configs load without torch (ops.visual_budget imports it)
        from ..ops.visual_budget import check_visual_budget

        check_visual_budget(type(self).__name__, self.tokens, self.allocation)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @property
    def is_identity(self) -> bool:
        """True when every visual token is kept (``tokens=1.0``)."""
        return isinstance(self.tokens, float) and self.tokens == 1.0


@dataclass(frozen=True)
class VisualPool(VisualTokens):
    """Average-pool each image's projected visual tokens over their 2-D grid down to ``tokens``.

    The grid is cut into ``tokens`` cells (row bands, each split into near-equal column runs) and each
    cell becomes the mean of its tokens, so exactly ``tokens`` reach the language model. LLaVA-NeXT /
    OneVision anyres images: the base view's grid is pooled in 2-D, the high-resolution tiles (laid
    out with their newline tokens) as one row-major sequence, the budget split in proportion.
    """

    method: ClassVar[str] = "vlm-pool"


@dataclass(frozen=True)
class VisualRandom(VisualTokens):
    """Keep a seeded random subset of each image's projected visual tokens, in their order (the baseline).

    Args:
        seed: seed of the generator; the same seed and inputs keep the same tokens.
    """

    method: ClassVar[str] = "vlm-random"

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"VisualRandom: seed must be an int, got {self.seed!r}")


@dataclass(frozen=True)
class VisionZip(VisualTokens):
    """VisionZip (Yang et al., 2024): dominant tokens plus a few merged contextual tokens per image.

    The dominant tokens are those the class token attends to most in the vision layer the projector
    reads (towers without a class token, e.g. SigLIP or Qwen's: the attention each token receives,
    averaged over queries and heads). The other tokens are merged onto ``contextual`` centres (spread
    evenly over them) by key similarity and averaged; dominant + contextual == ``tokens`` per image.

    Args:
        contextual: contextual tokens per image: an int count or a fraction of each image's budget
            (VisionZip's 10 of 64 is about 0.15; a positive fraction gives at least one). Always
            fewer than the budget; 0 keeps only the dominant tokens.
    """

    method: ClassVar[str] = "visionzip"

    contextual: int | float = 0.15

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.contextual
        if (
            isinstance(c, bool)
            or not isinstance(c, (int, float))
            or c < 0
            or (isinstance(c, float) and c >= 1)
        ):
            raise ValueError(
                f"VisionZip: contextual is a count of merged tokens per image (e.g. 10) or a fraction of the "
                f"budget in [0, 1) (e.g. 0.15); got {c!r}"
            )


#: where :class:`VisualSelect` takes its query from
SELECT_QUERIES = ("embeddings", "attention")


@dataclass(frozen=True)
class VisualSelect(VisualTokens):
    """Question-aware selection: keep the visual tokens most similar to the prompt's own question.

    The query is the language model's own input embeddings of the text tokens that follow the image in
    the prompt (the question), averaged after normalising; each projected visual token is scored by
    its cosine similarity to it and the ``tokens`` best are kept in their order. The projector maps
    visual tokens into the space of those input embeddings (that is what the LLM reads them as), so the
    comparison needs no extra text encoder and works with any tokenizer or vocabulary.

    With ``query="attention"`` the score is instead the attention the question tokens pay each
    visual token in the language model's second decoder layer (after one layer has mixed image and
    text), recomputed from that layer's own queries and keys with its rope; this costs one decoder
    layer over the full prompt before the cut.

    Args:
        query: ``"embeddings"`` (the LLM's input embeddings of the question tokens) or
            ``"attention"`` (their attention in the LLM's layer 1).
    """

    method: ClassVar[str] = "vlm-select"

    query: str = "embeddings"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query not in SELECT_QUERIES:
            raise ValueError(f"VisualSelect: query must be one of {SELECT_QUERIES}, got {self.query!r}")


@dataclass(frozen=True)
class TowerReduce(VisualTokens):
    """One of tokenbudget's ViT reducers inside the VLM's own vision tower.

    The reducer's schedule is chosen so that the layer the projector reads (the model's
    ``vision_feature_layer``, e.g. -2) holds exactly ``tokens`` visual tokens per image; the layers
    after it do not reduce. The tower then also runs faster, unlike cuts after the projector.

    Args:
        reducer: a ViT method name of ``tb.method_names()`` with a per-layer budget (``"tome"``,
            ``"auto"``, ``"pitome"``, ``"tofu"``, ``"random"``, ``"pool"``, ...). Class-attention
            pruning (``"prune"``) is not offered: the transformers towers do not expose that attention.
        options: extra options of the reducer's config (e.g. ``{"prop_attn": False}``).
    """

    method: ClassVar[str] = "tower"

    reducer: str = "tome"
    options: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation != "fixed":
            raise ValueError("TowerReduce: the tower reduces every image alike; use allocation='fixed'")
        names = tower_reducer_names()
        if self.reducer not in names:
            raise ValueError(f"TowerReduce: reducer must be one of {names}, got {self.reducer!r}")
        if self.options is not None and not isinstance(self.options, dict):
            raise ValueError(f"TowerReduce: options must be a dict of reducer options, got {self.options!r}")

    def __hash__(self) -> int:  # options is a dict
        return hash((self.tokens, self.allocation, self.reducer, tuple(sorted((self.options or {}).items()))))


def tower_reducer_names() -> list[str]:
    """ViT methods :class:`TowerReduce` can run in a vision tower: those with a per-layer budget (the
    schedule is what makes the read layer hold exactly the budget)."""
    from .base import _REGISTRY, BudgetConfig

    return [n for n, c in _REGISTRY.items() if issubclass(c, BudgetConfig)]


#: short CLI names of the cuts this module defines -> their config classes' registry names
_SHORT = {"random": "vlm-random", "pool": "vlm-pool", "visionzip": "visionzip", "select": "vlm-select"}


def vlm_method_names() -> list[str]:
    """Every name :func:`vlm_config` takes: ``full``, the cuts, ``fastv`` and the tower reducers."""
    return ["full", *_SHORT, "fastv", *[n for n in tower_reducer_names() if n not in _SHORT]]


def vlm_config(method: str, tokens: int | float, **options: Any) -> VisualTokens | None:
    """The VLM config of a CLI method name: ``"full"`` -> ``None`` (unpatched), ``"random"``,
    ``"pool"``, ``"visionzip"``, ``"select"``, ``"fastv"``, or a ViT reducer name (``"tome"``, ...) ->
    :class:`TowerReduce`. ``options`` go to the config (e.g. ``seed=1``, ``layer=2``)."""
    from .base import config_class

    if method == "full":
        return None
    if method in _SHORT:
        return config_class(_SHORT[method])(tokens=tokens, **options)
    if method == "fastv":
        try:
            cls = config_class("fastv")
        except ValueError:
            raise NotImplementedError(
                "FastV's config is not available in this build of tokenbudget"
            ) from None
        return cls(tokens=tokens, **options)
    if method in tower_reducer_names():
        return TowerReduce(tokens=tokens, reducer=method, options=options or None)
    raise ValueError(f"unknown VLM method {method!r}; choose from {', '.join(vlm_method_names())}")
