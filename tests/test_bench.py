"""FLOPs model and the bench harness (no timing assertions: speed is measured, not tested)."""

from __future__ import annotations

import timm
import torch

import tokenbudget as tb
from conftest import make_tiny
from tokenbudget.adapters import find_adapter
from tokenbudget.bench import bench, format_table
from tokenbudget.bench.ceiling import free_reduction_copy
from tokenbudget.bench.memory import peak_forward_memory
from tokenbudget.flops import BlockDims, ideal_speedup, model_flops


def test_ideal_speedup_vit_small_r16_is_2_03() -> None:
    """design.md: ViT-S/16 at r=16 has a FLOPs-ideal speedup of 2.03x."""
    dims = [BlockDims(384, 384, 1536)] * 12
    tokens = [197 - 16 * (i + 1) for i in range(11)] + [11]  # the last block can merge only 10 of 21
    assert round(ideal_speedup(197, tokens, dims), 2) == 2.03
    c = 384
    assert model_flops(197, [197] * 12, dims) == 12 * (8 * 197 * c * c + 4 * 197 * 197 * c + 16 * 197 * c * c)


def test_block_dims_read_from_timm() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    assert find_adapter(model).block_dims()[0] == BlockDims(192, 192, 768)


def test_bench_rows_are_consistent() -> None:
    model = make_tiny("dinov2_registers")
    rows = bench(model, [tb.ToMe(r=8), tb.ToMe(keep=0.5)], batch_sizes=(2,), samples=2, warmup=1)
    assert len(rows) == 2
    r8 = rows[0]
    assert r8.tokens_per_layer == [69 - 8 * (i + 1) for i in range(4)]
    assert r8.final_tokens == 37 and rows[1].final_tokens == 5 + 32
    assert r8.ideal_speedup > 1 and 0 < r8.flops_ratio < 1
    assert abs(r8.ideal_speedup * r8.flops_ratio - 1) < 1e-9
    assert r8.speedup > 0 and abs(r8.efficiency - r8.speedup / r8.ideal_speedup) < 1e-9
    assert r8.ceiling_speedup is not None and r8.baseline_peak_mb > 0
    table = format_table(rows)
    assert "tome(r=8)" in table and "tome(keep=0.5)" in table


def test_free_reduction_runs_the_same_token_counts(images) -> None:
    model = make_tiny("vit")
    patched = tb.apply(make_tiny("vit"), tb.ToMe(r=(6, -1.0)))
    free = free_reduction_copy(model, patched)
    with torch.no_grad():
        patched(images)
        out = free(images)
    assert out.shape == (3, 10)
    assert tb.last_state(free).tokens_per_layer == tb.last_state(patched).tokens_per_layer
    assert not tb.is_patched(model)


def test_peak_memory_grows_with_batch() -> None:
    model = make_tiny("vit")
    x1, x8 = torch.randn(1, 3, 32, 32), torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        small = peak_forward_memory(lambda: model(x1), torch.device("cpu"))
        large = peak_forward_memory(lambda: model(x8), torch.device("cpu"))
    assert 0 < small < large
