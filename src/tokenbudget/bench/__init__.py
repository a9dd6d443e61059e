"""Benchmarks: throughput, memory and FLOPs of patched vs unpatched models."""

from ..flops import BlockDims, block_dims, block_flops, ideal_speedup, model_flops
from .run import BenchRow, bench, format_table, load_model

__all__ = [
    "BenchRow",
    "BlockDims",
    "bench",
    "block_dims",
    "block_flops",
    "format_table",
    "ideal_speedup",
    "load_model",
    "model_flops",
]
