"""Benchmarks: throughput, memory and FLOPs of patched vs unpatched models, same process."""

from .run import BenchRow, bench, format_table

__all__ = ["BenchRow", "bench", "format_table"]
