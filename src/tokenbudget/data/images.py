"""Images for demos and pictures: files, or scikit-image's bundled samples (offline)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

# Natural colour images bundled with scikit-image (no download needed).
SAMPLE_IMAGES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _require(module: str, extra: str = "demo"):  # noqa: ANN202 - returns a module
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(
            f"this needs {module}; install it with: pip install 'tokenbudget[{extra}]'"
        ) from None


def load_image(source: str | os.PathLike, model: torch.nn.Module | None = None):  # noqa: ANN201
    """An image from a file path, or ``skimage:NAME`` for a scikit-image sample.

    Without ``model``: an RGB ``PIL.Image``. With ``model`` (any model tokenbudget can patch): the
    model's input, a batch of one [1, 3, H, W], made with the model's own preprocessing: timm's eval
    transform (resize, centre crop at the model's ``crop_pct``, normalise) for timm models, else a
    resize and centre crop to the model's input size and the family's normalisation::

        x = tb.data.load_image("cat.jpg", model)
        features = model(x)
    """
    image = _open_rgb(source)
    if model is None:
        return image
    from ..adapters import find_adapter

    adapter = find_adapter(model)
    transform = adapter.input_transform()
    if transform is None:
        if adapter.image_size is None:
            raise ValueError("the model has no default input size to preprocess the image for")
        return preprocess(image, adapter.image_size[0], *adapter.normalization()).unsqueeze(0)
    return transform(image).unsqueeze(0)


def _open_rgb(source: str | os.PathLike):  # noqa: ANN202 - PIL.Image.Image
    _require("PIL")
    from PIL import Image

    text = os.fspath(source)
    if text.startswith("skimage:"):
        name = text.split(":", 1)[1]
        if name not in SAMPLE_IMAGES:
            raise ValueError(f"unknown scikit-image sample {name!r}; choose from {', '.join(SAMPLE_IMAGES)}")
        _require("skimage")
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    if not os.path.exists(text):
        raise FileNotFoundError(
            f"no image at {text!r}; give an image file or skimage:NAME ({', '.join(SAMPLE_IMAGES)})"
        )
    if os.path.isdir(text):
        raise ValueError(
            f"{text!r} is a folder, not an image file; give one image file (folders of images: "
            "tokenbudget.data.load_image_folder)"
        )
    try:
        with Image.open(text) as image:
            return image.convert("RGB")  # decodes the whole file: a truncated one fails here
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated data
        raise ValueError(
            f"{text!r} is not a readable image ({type(err).__name__}: {err}); it may be truncated or not an "
            "image at all (check the file, e.g. open it in an image viewer)"
        ) from None


def center_crop_resize(image, size: int):  # noqa: ANN001, ANN201 - PIL in, PIL out
    """Resize the shorter side to ``size`` (bicubic) and crop the centre square."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def model_normalization(model: torch.nn.Module) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) the model's pretrained config asks for; ImageNet's when it names none."""
    from ..adapters import find_adapter

    return find_adapter(model).normalization()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for images ``x`` [..., 3, H, W] with values in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - mean_t) / std_t


def rgb_uint8_to_model_input(images, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:  # noqa: ANN001
    """uint8 RGB images (numpy) [N, H, W, 3] -> normalized float tensor [N, 3, H, W]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return normalize(x, mean, std)


def preprocess(
    image, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:  # noqa: ANN001
    """PIL image -> normalized tensor [3, size, size] (centre crop)."""
    import numpy as np

    array = np.asarray(center_crop_resize(image, size), dtype=np.float32) / 255.0  # [H, W, 3]
    return normalize(torch.from_numpy(array).permute(2, 0, 1), mean, std)


def sample_images(size: int, names: Sequence[str] = SAMPLE_IMAGES) -> torch.Tensor:
    """scikit-image's bundled natural images as a normalized batch [len(names), 3, size, size]."""
    return torch.stack([preprocess(load_image(f"skimage:{n}"), size) for n in names])
