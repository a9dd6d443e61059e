"""Offline image loading and preprocessing."""

from .images import SAMPLE_IMAGES, load_image, preprocess, sample_images

__all__ = ["SAMPLE_IMAGES", "load_image", "preprocess", "sample_images"]
