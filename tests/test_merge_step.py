"""The fused ToMe step equals bipartite matching followed by the size-weighted merge, bit for bit,
and both equal the plain size-weighted average of each group."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings

import tokenbudget as tb
from conftest import make_tiny, matching_shapes
from tokenbudget.ops.match import bipartite_soft_matching
from tokenbudget.ops.merge import merge_weighted
from tokenbudget.ops.merge_step import greedy_matching, greedy_merge_step
from tokenbudget.ops.serial import SmallWork

shapes = matching_shapes(max_tokens=40, max_r=30)


@settings(max_examples=200, deadline=None)
@given(shapes)
def test_fused_step_matches_the_two_step_merge(shape) -> None:
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, 8, generator=g)
    x = torch.randn(batch, n, 6, generator=g)
    size = None if seed % 2 else torch.randint(1, 5, (batch, n, 1), generator=g).float()
    reference = bipartite_soft_matching(metric, r, prefix)
    merged, new_size, matching = greedy_merge_step(x, size, metric, r, prefix)
    # the same pairs, the same output layout
    assert torch.equal(matching.kept_idx, reference.kept_idx)
    assert torch.equal(matching.src_idx, reference.src_idx)
    assert torch.equal(matching.dst_idx, reference.dst_idx)
    if reference.r == 0:
        assert merged is x and new_size is size
        return
    expected, expected_size = merge_weighted(x, size, reference)
    assert torch.equal(new_size, expected_size) and torch.equal(merged, expected)
    # the size-weighted average of each group, summed the plain way
    torch.testing.assert_close(merged, _plain_average(x, size, reference), atol=1e-6, rtol=1e-6)
    # tokens that receive no merge are copied exactly
    received = torch.zeros(batch, n - reference.r, dtype=torch.bool)
    received.scatter_(1, reference.dst_idx, True)
    kept_x = x.gather(1, reference.kept_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    assert torch.equal(merged[~received], kept_x[~received])


def _plain_average(x: torch.Tensor, size: torch.Tensor | None, matching) -> torch.Tensor:  # noqa: ANN001
    """sum(s_i x_i) / sum(s_i) over the input tokens of each output token, [B, N - r, C]."""
    batch, n, channels = x.shape
    size = torch.ones(batch, n, 1, dtype=x.dtype) if size is None else size.to(x.dtype)
    pos = matching.position_map().unsqueeze(-1)  # [B, N, 1]
    total = torch.zeros(batch, n - matching.r, 1, dtype=x.dtype).scatter_add_(1, pos, size)
    summed = torch.zeros(batch, n - matching.r, channels, dtype=x.dtype)
    summed.scatter_add_(1, pos.expand(-1, -1, channels), x * size)
    return summed / total


def test_greedy_matching_alone_is_bipartite_matching() -> None:
    metric = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(3))
    for r in (0, 1, 12, 24, 40):
        fast, slow = greedy_matching(metric, r, 2), bipartite_soft_matching(metric, r, 2)
        assert fast.r == slow.r
        assert torch.equal(fast.kept_idx, slow.kept_idx) and torch.equal(fast.dst_idx, slow.dst_idx)


def test_float64_merge_stays_float64_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 7, (2, 30, 1), generator=g).float()
    metric = torch.randn(2, 30, 8, generator=g)
    merged, _, matching = greedy_merge_step(x, size, metric, 10, 1)
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, _plain_average(x, size, matching), atol=1e-12, rtol=1e-12)


def test_gradients_equal_those_of_the_plain_average() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 25, 6, generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (2, 25, 1), generator=g).float()
    metric = torch.randn(2, 25, 8, generator=g, requires_grad=True)
    weights = torch.randn(2, 17, 6, generator=g, dtype=torch.float64)
    merged, _, matching = greedy_merge_step(x, size, metric, 8, 1)
    (grad_fast,) = torch.autograd.grad((merged * weights).sum(), x)
    expected = _plain_average(x, size, matching)
    (grad_plain,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad_fast, grad_plain)


def test_patched_model_uses_the_fused_step_and_trains() -> None:
    """ToMe's reduce goes through the fused step; a backward pass reaches the first block."""
    model = make_tiny("vit")
    tb.apply(model, tb.ToMe(r=8, trace_source=True))
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    state = tb.last_state(model)
    assert state.tokens_per_layer == [57, 49, 41, 33]
    # the source map stays a partition of the input patches
    assert torch.equal(state.source.sum(dim=1), torch.ones(2, 65, dtype=torch.long))


def test_small_work_runs_on_one_thread_and_restores() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with SmallWork(torch.empty(1000)):
            inside = torch.get_num_threads()
        assert (inside, torch.get_num_threads()) == (1, 2)
        with SmallWork(torch.empty(1).expand(10**9)):  # large work keeps the pool
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_small_work_leaves_other_threads_alone() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    entered, release, seen = threading.Event(), threading.Event(), []

    def hold() -> None:
        with SmallWork(torch.empty(10)):
            entered.set()
            release.wait(5)

    worker = threading.Thread(target=hold)
    try:
        worker.start()
        assert entered.wait(5)
        seen.append(torch.get_num_threads())  # this thread's count while the other is serial
        release.set()
        worker.join()
    finally:
        torch.set_num_threads(threads)
    assert seen == [2]


@pytest.mark.parametrize("variant", ["dinov2_registers", "deit_distilled"])
def test_prefix_tokens_pass_through_the_fused_step(variant: str) -> None:
    model = make_tiny(variant)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    prefix = model.num_prefix_tokens
    metric = torch.randn(2, tokens.shape[1], 8)
    merged, size, _ = greedy_merge_step(tokens, None, metric, 10, prefix)
    assert torch.equal(merged[:, :prefix], tokens[:, :prefix])
    assert torch.equal(size[:, :prefix], torch.ones(2, prefix, 1))
