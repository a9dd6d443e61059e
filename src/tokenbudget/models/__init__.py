"""Pretrained backbones available offline."""

from tokenbudget.models.dinov2 import dinov2_small, onnx_reference_features

__all__ = ["dinov2_small", "onnx_reference_features"]
