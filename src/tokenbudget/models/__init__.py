"""Pretrained backbones available offline."""

from tokenbudget.models.dinov2 import dinov2_small, onnx_reference_features
from tokenbudget.models.dinov2_hf import dinov2_small_hf, timm_dinov2_to_hf

__all__ = ["dinov2_small", "dinov2_small_hf", "onnx_reference_features", "timm_dinov2_to_hf"]
