"""Offline image loading and preprocessing: sample images, Fashion-MNIST (IDX), image folders."""

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    fashion_mnist_subset,
    load_fashion_mnist,
    read_idx,
    to_model_input,
)
from .folder import IMAGE_EXTENSIONS, ImageFolderData, load_image_folder, load_images
from .images import SAMPLE_IMAGES, load_image, preprocess, sample_images

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "SAMPLE_IMAGES",
    "ImageFolderData",
    "fashion_mnist_subset",
    "load_fashion_mnist",
    "load_image",
    "load_image_folder",
    "load_images",
    "preprocess",
    "read_idx",
    "sample_images",
    "to_model_input",
]
