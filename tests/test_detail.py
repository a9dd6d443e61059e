"""Detail-preserving ToMe and the anomaly development set that motivates it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenbudget as tb
from conftest import VARIANTS, make_tiny
from tokenbudget.cli import main
from tokenbudget.config import config_from_json
from tokenbudget.data.anomaly import ANOMALY_CLASSES, anomaly_set, generate_anomaly_set
from tokenbudget.data.eval_sets import anomaly_data
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.ops.match import (
    bipartite_soft_matching,
    detail_preserving_matching,
    nearest_neighbour_similarity,
)
from tokenbudget.ops.merge import merge_weighted


def _bland_with_outliers(batch: int, num_tokens: int, outliers: list[int], seed: int = 0) -> torch.Tensor:
    """[B, N, 8] near-identical tokens, except ``outliers`` that point in their own direction."""
    g = torch.Generator().manual_seed(seed)
    metric = torch.ones(batch, num_tokens, 8) + 0.01 * torch.randn(batch, num_tokens, 8, generator=g)
    for k, pos in enumerate(outliers):
        metric[:, pos] = 0.0
        metric[:, pos, k % 8] = 1.0 + k  # orthogonal to the bland ones and to each other
        metric[:, pos, (k + 1) % 8] = -5.0
    return metric


def test_nearest_neighbour_similarity_flags_outliers() -> None:
    metric = _bland_with_outliers(2, 17, outliers=[3, 10])
    nn_sim = nearest_neighbour_similarity(metric, num_prefix=1)  # [2, 16], patch positions - 1
    lowest = nn_sim.argsort(dim=-1)[:, :2].sort(dim=-1).values
    assert lowest.tolist() == [[2, 9], [2, 9]]
    assert (nn_sim.max(dim=-1).values > 0.99).all()


@pytest.mark.parametrize("outliers", [[3, 10], [4, 11], [3, 4]])  # in A, in B, one of each
def test_protected_tokens_are_never_merged(outliers: list[int]) -> None:
    num_tokens, prefix = 33, 1
    metric = _bland_with_outliers(2, num_tokens, outliers)
    # The most ToMe can merge: every token of set A (ToMe would merge the A outliers too).
    r = (num_tokens - prefix) // 2 - 2  # room left for exactly 2 protected tokens
    m = detail_preserving_matching(metric, r, prefix, protect=2)
    assert m.r == r
    kept = m.kept_idx.tolist()
    for b in range(2):
        assert sorted(kept[b] + m.src_idx[b].tolist()) == list(range(num_tokens))  # a partition
        for pos in outliers:
            assert pos in kept[b] and pos not in m.src_idx[b].tolist()
            assert kept[b].index(pos) not in m.dst_idx[b].tolist()  # nothing merged into it
    # Merging keeps the outliers exactly, at size 1.
    x = torch.randn(2, num_tokens, 5)
    merged, size = merge_weighted(x, None, m)
    for b in range(2):
        for pos in outliers:
            out = kept[b].index(pos)
            assert torch.equal(merged[b, out], x[b, pos]) and size[b, out, 0] == 1


def test_plain_tome_merges_into_a_distinctive_token_that_detail_protects() -> None:
    # Token 3 (set B) is an outlier; tokens 4 and 6 (set A) partly resemble it, more than anything
    # else. All but one A token must merge, so ToMe averages one of them into the lone detail.
    metric = _bland_with_outliers(1, 33, outliers=[3])
    detail_dir, bland_dir = metric[0, 3] / metric[0, 3].norm(), metric[0, 5] / metric[0, 5].norm()
    metric[0, 4] = 0.6 * detail_dir + 0.4 * bland_dir
    metric[0, 6] = 0.55 * detail_dir + 0.45 * bland_dir
    r = 15
    plain = bipartite_soft_matching(metric, r, 1)
    into = {plain.kept_idx[0, d].item() for d in plain.dst_idx[0]}
    assert 3 in into
    detail = detail_preserving_matching(metric, r, 1, protect=1)
    assert detail.r == r
    assert detail.kept_idx[0].tolist().index(3) not in detail.dst_idx[0].tolist()


def test_protection_is_capped_so_the_budget_is_met() -> None:
    metric = _bland_with_outliers(1, 33, outliers=[3, 10, 17])
    m = detail_preserving_matching(metric, 16, 1, protect=3)  # r = N_A: no room to protect
    assert m.r == 16
    reference = bipartite_soft_matching(metric, 16, 1)
    assert torch.equal(m.kept_idx, reference.kept_idx) and torch.equal(m.src_idx, reference.src_idx)
    m0 = detail_preserving_matching(metric, 5, 1, protect=0)
    ref0 = bipartite_soft_matching(metric, 5, 1)
    assert torch.equal(m0.kept_idx, ref0.kept_idx) and torch.equal(m0.dst_idx, ref0.dst_idx)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tome_detail_keeps_the_contracts(variant: str, images: torch.Tensor) -> None:
    model = make_tiny(variant)
    with torch.no_grad():
        expected = model(images)
        tb.apply(model, tb.ToMe(r=0, preserve_detail=True))
        assert torch.allclose(model(images), expected, atol=1e-5)
        tb.apply(model, tb.ToMe(r=8))
        model(images)
        plain_counts = tb.last_state(model).tokens_per_layer
        tb.apply(model, tb.ToMe(r=8, preserve_detail=True, trace_source=True))
        out = model(images)
        state = tb.last_state(model)
        assert state.tokens_per_layer == plain_counts  # the same budget, hence the same FLOPs
        assert torch.isfinite(out).all()
        # Every input patch is in exactly one token and sizes count them.
        assert torch.equal(state.source.sum(dim=1), torch.ones_like(state.source.sum(dim=1)))
        assert torch.allclose(state.sizes, state.source.sum(dim=2).float())
        prefix = model.num_prefix_tokens
        assert (state.token_map[:, :prefix] == torch.arange(prefix)).all()  # prefix stays in front
        tb.remove(model)
        assert torch.allclose(model(images), expected, atol=1e-6)


def test_tome_detail_config() -> None:
    cfg = config_from_json('{"method": "tome-detail", "keep": 0.25}')
    assert isinstance(cfg, tb.ToMe) and cfg.preserve_detail and cfg.detail_fraction == 0.05
    assert config_from_json(cfg.to_json()) == cfg
    assert config_from_json(tb.ToMe(r=4, preserve_detail=True).to_json()).preserve_detail
    with pytest.raises(ValueError, match="detail_fraction"):
        tb.ToMe(r=4, preserve_detail=True, detail_fraction=1.5)
    with pytest.raises(ValueError, match="preserve_detail must be True or False"):
        tb.ToMe(r=4, preserve_detail="yes")


def test_anomaly_set_is_seeded_balanced_and_local(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path))
    data = anomaly_set(6, size=64, seed=3)
    assert data.images.shape == (24, 64, 64, 3) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [6] * len(ANOMALY_CLASSES)
    assert list(tmp_path.glob("anomaly-*.npz"))  # cached
    again = anomaly_set(6, size=64, seed=3)  # from the cache
    fresh = generate_anomaly_set(6, size=64, seed=3)  # regenerated
    assert np.array_equal(again.images, data.images) and np.array_equal(fresh.images, data.images)
    assert not np.array_equal(generate_anomaly_set(6, size=64, seed=4).images, data.images)
    for base in range(6):
        versions = data.images[data.base_ids == base].astype(int)  # clean, spot, scratch, flaw
        assert data.labels[data.base_ids == base].tolist() == [0, 1, 2, 3]
        for flawed in versions[1:]:
            changed = np.abs(flawed - versions[0]).max(axis=-1) > 0
            assert 0 < changed.mean() < 0.05  # a small local change, on a shared background


def test_anomaly_eval_data_splits_by_base_crop(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path))
    data = anomaly_data(64, (0.5,) * 3, (0.25,) * 3, n_train=16, n_test=8)
    assert data.train_images.shape == (16, 3, 64, 64) and data.test_images.shape == (8, 3, 64, 64)
    assert data.train_labels.tolist() == [0, 1, 2, 3] * 4
    # Disjoint base crops: no test image equals a training image.
    assert torch.cdist(data.test_images.flatten(1), data.train_images.flatten(1)).min() > 0
    with pytest.raises(ValueError, match="at least 4"):
        anomaly_data(64, (0.5,) * 3, (0.25,) * 3, n_train=2, n_test=8)


def test_keep_for_flops_speedup_reaches_the_target() -> None:
    from tokenbudget.adapters import find_adapter
    from tokenbudget.flops import ideal_speedup

    model = make_tiny("vit")
    dims = find_adapter(model).block_dims()

    def speedup(config: tb.ReductionConfig) -> tuple[float, int]:
        tb.apply(model, config)
        model(torch.randn(1, 3, 32, 32))
        state = tb.last_state(model)
        return ideal_speedup(state.input_tokens, state.tokens_per_layer, dims), state.tokens_per_layer[-1]

    for target in (1.3, 1.6):
        reached, tokens = speedup(tb.ToMe(keep=keep_for_flops_speedup(model, target)))
        # the slowest schedule that reaches the target: one token more left misses it
        assert reached >= target
        assert speedup(tb.ToMe(tokens=tokens + 1))[0] < target
    with pytest.raises(ValueError, match="out of reach"):
        keep_for_flops_speedup(model, 50.0)


def test_make_anomaly_command(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path / "cache"))
    out, preview = tmp_path / "set", tmp_path / "preview.png"
    code = main(
        ["make-anomaly", "--n-base", "2", "--size", "64", "--out", str(out), "--preview", str(preview)]
    )
    assert code == 0 and "8 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(ANOMALY_CLASSES)
    assert len(list(out.glob("train/*/*.png"))) == 4 and len(list(out.glob("test/*/*.png"))) == 4
    assert preview.stat().st_size > 0


def test_eval_takes_keep_or_flops_speedup_not_both(capsys) -> None:
    assert main(["eval", "--keep", "1.0,0.5", "--flops-speedup", "1.5"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.slow
def test_tome_detail_on_the_embedded_model(tmp_path, monkeypatch) -> None:
    """Real DINOv2 weights on anomaly images at 2x FLOPs-ideal: ToMe's budget, features near full."""
    from tokenbudget.data.images import model_normalization
    from tokenbudget.evaluate.features import extract_features
    from tokenbudget.evaluate.metrics import cosine_fidelity

    model = tb.models.dinov2_small()
    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path))  # the anomaly set only; weights loaded above
    data = anomaly_data(224, *model_normalization(model), n_train=4, n_test=8)
    keep = keep_for_flops_speedup(model, 2.0)
    full = extract_features(model, data.test_images)
    tb.apply(model, tb.ToMe(keep=keep))
    model(data.test_images[:1])
    plain_counts = tb.last_state(model).tokens_per_layer
    tb.apply(model, tb.ToMe(keep=keep, preserve_detail=True))
    reduced = extract_features(model, data.test_images)
    assert tb.last_state(model).tokens_per_layer == plain_counts
    assert cosine_fidelity(reduced, full) > 0.9  # measured 0.95 on 200 test images
