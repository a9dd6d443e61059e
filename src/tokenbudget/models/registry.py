"""Models by name: what ``--model`` on the command line (and :func:`load_model`) accepts.

* ``dinov2_small``: the embedded DINOv2 ViT-S/14 (real weights, offline), a timm model;
* ``dinov2_small_hf``: the same weights as a Hugging Face ``Dinov2Model`` (needs transformers);
* ``hf:<repo or path>``: ``transformers.AutoModel.from_pretrained`` (downloads unless cached);
* ``openclip:<architecture>[:<pretrained tag>]``: ``open_clip.create_model`` (downloads a tag);
* any other name: ``timm.create_model`` (random weights unless ``pretrained=True``);
* names added with :func:`register_model` (your own models, tiny test models).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

#: name -> factory(pretrained: bool, img_size: int | None) -> nn.Module
_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``name`` loadable by :func:`load_model` (and ``--model name``): ``factory(pretrained=...,
    img_size=...)`` returns the model (eval mode is set for it)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a model name must be a non-empty string without ':', got {name!r}")
    _FACTORIES[name] = factory


def model_names() -> list[str]:
    """The names registered besides timm's own (``dinov2_small``, ``dinov2_small_hf``, ...)."""
    return list(_FACTORIES)


def load_model(name: str, *, pretrained: bool = False, img_size: int | None = None) -> nn.Module:
    """The model called ``name`` (see the module docstring), in eval mode.

    ``img_size`` builds the model for that input size where the family allows it (timm and the
    embedded models); ``ValueError`` for an unknown name or an impossible size, ``ImportError``
    naming the extra to install for a missing framework.
    """
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise ValueError(f"img_size must be a positive number of pixels, got {img_size!r}")
    if name in _FACTORIES:
        model = _FACTORIES[name](pretrained=pretrained, img_size=img_size)
    elif name.startswith("hf:"):
        model = _hf_model(name[3:], img_size)
    elif name.startswith("openclip:"):
        model = _openclip_model(name[9:], img_size)
    else:
        model = _timm_model(name, pretrained, img_size)
    if img_size is not None:
        _check_whole_patches(model, name, img_size)
    return model.eval()


def _check_whole_patches(model: nn.Module, name: str, img_size: int) -> None:
    """``ValueError`` when ``img_size`` is not a whole number of patches: the model would silently
    crop the image to the largest multiple of its patch size."""
    from ..adapters import find_adapter

    try:
        patch = find_adapter(model).patch_size[0]
    except ValueError:
        return  # not a model tokenbudget patches; its own checks apply
    if img_size % patch:
        lower, upper = img_size - img_size % patch, img_size - img_size % patch + patch
        raise ValueError(
            f"--img-size {img_size} is not a multiple of {name}'s {patch} px patches: the model would see "
            f"only {lower} px of it; give {lower} or {upper}"
        )


def _timm_model(name: str, pretrained: bool, img_size: int | None) -> nn.Module:
    import timm

    kwargs = {"img_size": img_size} if img_size else {}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"unknown model {name!r}: give a timm name (see timm.list_models('vit_*')), one of "
                f"{', '.join(_FACTORIES)}, hf:<repo> or openclip:<architecture>[:<tag>]"
            ) from None
        raise
    except OSError as err:
        raise ValueError(
            f"could not fetch pretrained weights for {name!r} ({err}); without a network leave out "
            "--pretrained (random weights) or use the embedded model 'dinov2_small'"
        ) from None


def _hf_model(repo: str, img_size: int | None) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ImportError("hf: models need transformers: pip install 'tokenbudget[hf]'") from None
    if img_size is not None:
        raise ValueError("--img-size is not supported for hf: models; they run at their configured size")
    try:
        return transformers.AutoModel.from_pretrained(repo)
    except OSError as err:
        raise ValueError(f"could not load the Hugging Face model {repo!r} ({err})") from None


def _openclip_model(spec: str, img_size: int | None) -> nn.Module:
    try:
        import open_clip
    except ImportError:
        raise ImportError("openclip: models need open_clip: pip install 'tokenbudget[openclip]'") from None
    architecture, _, tag = spec.partition(":")
    kwargs: dict[str, Any] = {"pretrained": tag} if tag else {}
    if img_size is not None:
        kwargs["force_image_size"] = img_size
    try:
        return open_clip.create_model(architecture, **kwargs)
    except (RuntimeError, OSError) as err:
        raise ValueError(f"could not create the OpenCLIP model {spec!r} ({err})") from None


def _dinov2_small(pretrained: bool = True, img_size: int | None = None) -> nn.Module:
    from .dinov2 import dinov2_small

    return dinov2_small(img_size=img_size or 224, pretrained=True)


def _dinov2_small_hf(pretrained: bool = True, img_size: int | None = None) -> nn.Module:
    from .dinov2_hf import dinov2_small_hf

    return dinov2_small_hf(img_size=img_size or 224)


register_model("dinov2_small", _dinov2_small)
register_model("embedded", _dinov2_small)
register_model("dinov2_small_hf", _dinov2_small_hf)
