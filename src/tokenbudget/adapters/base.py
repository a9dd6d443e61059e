"""The adapter protocol: everything tokenbudget needs to know about one framework's vision transformer.

An adapter wraps one model and answers, in framework-free terms, what the rest of the library asks:
the blocks and their widths (for the FLOPs model), the prefix tokens never reduced, the patch grid
and input size, the model's own input normalisation, and three ways to run it (the token features,
the tokens entering the first block, the final norm). It also installs and removes a patch.

Everything outside ``adapters/`` (and ``models/``, which builds models) goes through this class and
never reads ``model.blocks``, ``patch_embed`` or attention projections itself, so bench, eval, plan,
visualize and the FLOPs model work on every framework with an adapter.

A new framework is one file in this package: a subclass of :class:`Adapter` decorated with
:func:`register_adapter` (it is found by :func:`~tokenbudget.adapters.find_adapter`), plus its test.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from ..flops import BlockDims

#: adapter classes in the order :func:`~tokenbudget.adapters.find_adapter` tries them
ADAPTERS: list[type[Adapter]] = []

#: config class -> ``prepare(model, config) -> (adapter, context)``, what :func:`tokenbudget.apply`
#: installs for that kind of config (filled by :func:`register_installer`)
INSTALLERS: dict[type, Callable[[nn.Module, Any], tuple[Any, Any]]] = {}

#: ImageNet normalisation (timm's IMAGENET_DEFAULT_MEAN / STD), the default of most ViTs
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` one of the adapters :func:`find_adapter` tries."""
    if cls not in ADAPTERS:
        ADAPTERS.append(cls)
        ADAPTERS.sort(key=lambda adapter: adapter.order)
    return cls


def register_installer(config_class: type) -> Callable:
    """Function decorator: ``prepare(model, config) -> (adapter, context)`` installs configs of
    ``config_class`` (and its subclasses). The per-block reduction is registered for every
    :class:`~tokenbudget.config.ReductionConfig`; configs that act elsewhere (a per-image patch size
    before the blocks) register their own."""

    def decorate(prepare: Callable) -> Callable:
        INSTALLERS[config_class] = prepare
        return prepare

    return decorate


class Adapter(ABC):
    """One patchable vision transformer of one framework.

    Attributes every adapter sets in ``__init__``:
        model: the model given to :func:`tokenbudget.apply` (possibly a wrapper of the backbone).
        blocks: the transformer blocks, in order (the modules a patch wraps).
        num_prefix: leading tokens that are never reduced (class, distillation, register tokens).
        grid: (rows, cols) of the patch grid at the default input size, or ``None`` if unknown.
        patch_size: (height, width) of one patch in px.
    """

    #: short framework name ("timm", "hf", "openclip")
    name: ClassVar[str] = ""
    #: whether the block wrapper can give the class token's attention row (attention pruning)
    supports_class_attention: ClassVar[bool] = False
    #: what this adapter supports, for the error message when no adapter matches a model
    supported: ClassVar[str] = ""
    #: adapters are tried (and listed in errors) in increasing order
    order: ClassVar[int] = 100

    model: nn.Module
    blocks: list[nn.Module]
    num_prefix: int
    grid: tuple[int, int] | None
    patch_size: tuple[int, int]

    # -- recognising a model -----------------------------------------------------------------
    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when ``model`` belongs to this framework (checked by class path, importing nothing)."""

    # -- structure ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Token width C."""

    @property
    @abstractmethod
    def num_heads(self) -> int:
        """Attention heads per block."""

    @property
    def has_class_token(self) -> bool:
        """True when the first token is a class token."""
        return self.num_prefix > 0

    @property
    @abstractmethod
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) of the model's default input in px, or ``None`` if it takes any size."""

    @property
    def default_num_tokens(self) -> int | None:
        """Tokens entering the first block at the default input size (prefix included)."""
        if self.grid is None:
            return None
        return self.grid[0] * self.grid[1] + self.num_prefix

    @abstractmethod
    def block_dims(self) -> list[BlockDims]:
        """Widths of every block (model, attention, MLP hidden), for :mod:`tokenbudget.flops`."""

    @abstractmethod
    def patch_conv(self) -> nn.Conv2d | None:
        """The patch-embedding convolution (its FLOPs are counted by early exit), if there is one."""

    def embedding_flops(self) -> int:
        """FLOPs of the patch embedding of one image at the default size (0 when unknown)."""
        conv = self.patch_conv()
        if conv is None or self.grid is None:
            return 0
        return 2 * self.grid[0] * self.grid[1] * conv.weight.numel()

    @abstractmethod
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel the model expects its [0, 1] RGB input normalised with."""

    # -- running -----------------------------------------------------------------------------
    @abstractmethod
    def features(self, images: Tensor) -> Tensor:
        """Token features [B, N, C] of normalised ``images`` [B, 3, H, W] (prefix first), as the
        model's own feature output gives them (after its final norm). Runs the model as it is:
        reduced when patched, and then ``tb.last_state(model).sizes`` weights the tokens."""

    def embed(self, images: Tensor) -> Tensor:
        """Tokens entering the first block [B, N, C] (prefix first), for running block by block."""
        raise NotImplementedError(
            f"running block by block (early exit, per-layer class tokens) is not supported on "
            f"{self.name} models yet; use a timm VisionTransformer"
        )

    def final_norm(self, x: Tensor) -> Tensor:
        """The norm the model applies after its last block, on tokens ``x`` [B, N, C]."""
        raise NotImplementedError(f"the final norm of {self.name} models is not exposed yet")

    def patch_embeddings(self, images: Tensor) -> Tensor:
        """The patch embeddings [B, P, C] before position embedding and blocks: a cheap glance."""
        raise NotImplementedError(
            f"the patch-embedding glance is not supported on {self.name} models yet; use a timm model"
        )

    def input_transform(self) -> Callable[[Any], Tensor] | None:
        """The framework's own transform from one PIL image to the model's input [3, H, W] at
        :attr:`image_size`, or ``None`` when it has none offline (then resize, centre crop and
        :meth:`normalization` are used: :func:`tokenbudget.data.load_image`)."""
        return None

    # -- patching ----------------------------------------------------------------------------
    @abstractmethod
    def install(self, ctx: Any) -> None:
        """Wrap the blocks (and pooling heads) so that forwards reduce tokens as ``ctx`` says."""

    @abstractmethod
    def uninstall(self) -> None:
        """Undo :meth:`install`; the model is then exactly as before."""
