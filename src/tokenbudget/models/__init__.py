"""Models: the embedded offline DINOv2 (timm and Hugging Face forms), loading any model by name, and
loading a saved transformers vision-language model (:func:`load_vlm`)."""

from .dinov2 import dinov2_small, onnx_reference_features
from .dinov2_hf import dinov2_small_hf, timm_dinov2_to_hf
from .registry import load_model, model_names, register_model
from .vlm import load_vlm

__all__ = [
    "dinov2_small",
    "dinov2_small_hf",
    "load_model",
    "load_vlm",
    "model_names",
    "onnx_reference_features",
    "register_model",
    "timm_dinov2_to_hf",
]
