"""torch.compile on patched models: no graph breaks for ToMe, and compiled = eager outputs."""

from __future__ import annotations

import pytest
import torch

import tokenbudget as tb
from conftest import make_tiny


def _graph_breaks(fn: object, *args: torch.Tensor) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, [b.reason for b in explanation.break_reasons]


@pytest.mark.slow
def test_tome_on_timm_has_no_graph_breaks() -> None:
    model = make_tiny("dinov2_registers")
    tb.apply(model, tb.ToMe(r=8))
    breaks, reasons = _graph_breaks(model, torch.randn(2, 3, 32, 32))
    assert breaks == 0, reasons


@pytest.mark.slow
@pytest.mark.parametrize("family", ["hf_vit", "hf_siglip", "openclip"])
def test_tome_on_hf_and_openclip_has_no_graph_breaks(family: str) -> None:
    if family.startswith("hf"):
        pytest.importorskip("transformers")
        from hf_models import make_hf

        model = make_hf("vit" if family == "hf_vit" else "siglip_vision")
        fn = model
    else:
        pytest.importorskip("open_clip")
        from openclip_models import make_openclip

        model = make_openclip("avg")
        fn = model.encode_image
    tb.apply(model, tb.ToMe(r=8))
    breaks, reasons = _graph_breaks(fn, torch.randn(2, 3, 32, 32))
    assert breaks == 0, reasons


@pytest.mark.slow
def test_compiled_patched_model_matches_eager_and_reports_its_state() -> None:
    """Inductor on CPU: a static schedule compiles once and gives the eager patched output."""
    model = make_tiny("vit")
    tb.apply(model, tb.ToMe(r=8))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        first = compiled(x)
        second = compiled(x)  # no recompile needed for the same shape
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, expected, atol=1e-4, rtol=1e-4)
    assert tb.last_state(model).tokens_per_layer == [57, 49, 41, 33]


@pytest.mark.slow
def test_bench_compares_compiled_models() -> None:
    from tokenbudget.bench import bench

    def run(**options: bool):  # noqa: ANN202 - the one BenchRow
        (row,) = bench(
            make_tiny("vit"), [tb.ToMe(r=8)], batch_sizes=(2,), samples=2, warmup=1,
            measure_memory=False, ceiling=False, **options,
        )  # fmt: skip
        return row

    torch._dynamo.reset()
    assert run().compiled is False  # the default stays eager
    row = run(compile=True)
    assert row.compiled and row.baseline_compile_s > 0 and row.patched_compile_s > 0
    assert row.tokens_per_layer == [57, 49, 41, 33] and row.speedup > 0
