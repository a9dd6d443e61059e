"""tb.AdaptivePatch: per-image patch size from a complexity score (issue 5, adaptive patching)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed
from torch import nn

import tokenbudget as tb
from conftest import VARIANTS, assert_concurrent_forwards_match, make_tiny
from tokenbudget.adapters.timm_adaptive import TimmAdaptiveAdapter
from tokenbudget.adaptive import calibrate_thresholds, detail_score, size_index
from tokenbudget.cli import main

# Tiny models: 32 px, 4 px patches (8x8 grid); default adaptive sizes 8 / 4 / 2 px = 16 / 64 / 256 tokens.


def _smooth(batch: int, seed: int = 0, side: int = 32) -> torch.Tensor:
    """Images with structure only at a coarse scale (bilinear upsampling of 4x4 noise)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(
        torch.randn(batch, 3, 4, 4, generator=g), size=side, mode="bilinear", align_corners=False
    )


def _mixed_images() -> torch.Tensor:
    """Six images from flat to noisy: their detail scores are spread over [0, 1)."""
    g = torch.Generator().manual_seed(3)
    flat = torch.zeros(1, 3, 32, 32)
    ramp = torch.linspace(-1, 1, 32).expand(1, 3, 32, 32).clone()
    noise = torch.randn(2, 3, 32, 32, generator=g)
    return torch.cat([noise[:1], flat, _smooth(2, seed=1), ramp, noise[1:]])


def _mixed_config(model: nn.Module) -> tb.AdaptivePatch:
    """Thresholds that put two of :func:`_mixed_images` at each size."""
    scores = detail_score(_mixed_images(), 4).sort().values
    low, high = float(scores[1] + scores[2]) / 2, float(scores[3] + scores[4]) / 2
    return tb.AdaptivePatch(thresholds=(low, high))


# -- complexity score ------------------------------------------------------------------------


def test_detail_score_is_in_unit_interval_and_orders_flat_smooth_textured() -> None:
    x = _mixed_images()
    scores = detail_score(x, 4)
    assert scores.shape == (6,)
    assert ((scores >= 0) & (scores < 1)).all()
    flat, smooth, noise = scores[1], scores[2], scores[0]
    assert flat == 0.0
    assert flat < smooth < noise
    assert noise > 0.9  # white noise: about 1 - 1/16 of its variance is inside 4 px tiles
    # Contrast does not change the score (above the variance floor); a near-flat image scores ~0.
    assert torch.allclose(detail_score(3 * x[[0, 2]], 4), scores[[0, 2]], atol=1e-2)
    assert detail_score(1e-3 * x[:1], 4) < 0.01


def test_detail_score_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        detail_score(torch.zeros(3, 32, 32), 4)
    with pytest.raises(ValueError, match="smaller than one 64 px tile"):
        detail_score(torch.zeros(1, 3, 32, 32), 64)


# -- thresholds and calibration --------------------------------------------------------------


@pytest.mark.parametrize("target", [16, 30.5, 64, 100, 200, 256])
def test_calibration_hits_the_target_mean(target: float) -> None:
    scores = torch.rand(200, generator=torch.Generator().manual_seed(0))
    counts = [16, 64, 256]
    thresholds = calibrate_thresholds(scores, counts, target)
    mean = torch.tensor(counts, dtype=torch.float)[size_index(scores, thresholds)].mean()
    step = (256 - 64) / len(scores)  # one image moving to the next size
    assert abs(float(mean) - target) <= step
    # The finer size goes to the more complex images.
    index = size_index(scores, thresholds)
    assert all(
        scores[index == i].max() < scores[index == i + 1].min()
        for i in range(2)
        if (index == i).any() and (index == i + 1).any()
    )


def test_calibration_rejects_unreachable_targets() -> None:
    with pytest.raises(ValueError, match=r"out of reach.*\[16, 256\]"):
        calibrate_thresholds(torch.rand(10), [16, 64, 256], 300)


def test_calibrate_on_a_model_gives_a_config_meeting_the_target() -> None:
    model = make_tiny("vit")
    images = torch.cat([_smooth(20, seed=4), torch.randn(20, 3, 32, 32)])
    cfg = tb.adaptive.calibrate(model, images, target_tokens=40)
    assert cfg.patch_sizes == (8, 4, 2) and cfg.target_tokens == 40
    tb.apply(model, cfg)
    with torch.no_grad():
        model(images)
    assert tb.last_state(model).mean_tokens - 1 == pytest.approx(40, abs=(64 - 16) / 40)
    assert tb.adaptive.calibrate(model, images, keep=0.5).target_tokens == 32  # half of 64
    assert tb.patched_config(model) == cfg


# -- running at other patch sizes ------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_native_patch_size_is_the_unpatched_model_exactly(variant: str) -> None:
    model = make_tiny(variant)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert TimmAdaptiveAdapter(model).kernel(4) is model.patch_embed.proj.weight
        for mode in ("patch", "resolution"):
            tb.apply(model, tb.AdaptivePatch(patch_sizes=(4,), mode=mode))
            assert torch.equal(model(x), ref)


def _patchwise_upsample(x: torch.Tensor, patch: int, factor: int) -> torch.Tensor:
    """Resize every patch on its own (the resize FlexiViT's pseudo-inverse inverts)."""
    b, c, h, w = x.shape
    tiles = x.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, C, h/p, w/p, p, p]
    big = F.interpolate(
        tiles.reshape(-1, 1, patch, patch),
        size=(patch * factor,) * 2,
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    big = big.reshape(b, c, h // patch, w // patch, patch * factor, patch * factor)
    return big.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h * factor, w * factor)


def test_flexivit_pseudo_inverse_keeps_tokens_of_a_resized_image() -> None:
    model = make_tiny("dinov2_layerscale")
    x = _smooth(3, seed=5)
    with torch.no_grad():
        ref = model.forward_features(x)  # 32 px at 4 px patches: an 8x8 grid
        tb.apply(model, tb.AdaptivePatch(patch_sizes=(8,)))
        # The same image at twice the size through 8 px patches: the same 8x8 grid.
        exact = model.forward_features(_patchwise_upsample(x, 4, 2))
        whole = model.forward_features(F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False))
        # A naive kernel resize (interpolate the kernel, divide by the area ratio) is not inverse to it.
        weight = model.patch_embed.proj.weight
        naive = F.interpolate(weight, size=(8, 8), mode="bicubic", align_corners=False) / 4
        pinv = resample_patch_embed(weight, [8, 8])
    rel = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
    assert rel(exact) < 1e-5
    assert rel(whole) < 0.1
    big = _patchwise_upsample(x, 4, 2)
    tokens = lambda w: F.conv2d(big, w, stride=8)  # noqa: E731
    small = F.conv2d(x, weight, stride=4)
    assert (tokens(pinv) - small).norm() < 1e-3 * (tokens(naive) - small).norm()


def test_mixed_batch_equals_each_image_alone_in_input_order() -> None:
    model = make_tiny("dinov2_registers")
    x = _mixed_images()
    tb.apply(model, _mixed_config(model))
    with torch.no_grad():
        out = model(x)
        state = tb.last_state(model)
        sizes = state.patch_sizes.tolist()
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        seqs = tb.adaptive.forward_features_list(model, x)
    assert set(sizes) == {8, 4, 2}  # all three sizes in one batch
    assert sizes[1] == 8 and sizes[0] == sizes[5] == 2  # flat image coarsest, noise finest, in input order
    assert torch.allclose(out, alone, atol=1e-5)
    prefix = model.num_prefix_tokens
    assert [len(s) for s in seqs] == [prefix + (32 // p) ** 2 for p in sizes]
    assert state.tokens == [len(s) for s in seqs]
    assert state.summary()["patch_sizes"] == sizes


def test_forward_features_stacks_one_size_and_refuses_a_mixed_batch() -> None:
    model = make_tiny("vit")
    x = _mixed_images()
    tb.apply(model, _mixed_config(model))
    with torch.no_grad():
        with pytest.raises(ValueError, match="forward_features_list"):
            model.forward_features(x)
        noisy = x[[0, 5]]  # both at 2 px patches
        tokens = model.forward_features(noisy)
        assert tokens.shape == (2, 1 + 16 * 16, 48)
        assert torch.allclose(tokens, torch.stack(tb.adaptive.forward_features_list(model, noisy)), atol=1e-6)
        assert torch.allclose(model.forward_head(tokens), model(noisy), atol=1e-6)


def test_resolution_mode_reaches_the_same_token_counts() -> None:
    model = make_tiny("vit")
    x = _mixed_images()
    cfg = _mixed_config(model)
    tb.apply(model, cfg)
    with torch.no_grad():
        model(x)
        by_patch = tb.last_state(model).tokens
        tb.apply(model, tb.AdaptivePatch(thresholds=cfg.thresholds, mode="resolution"))
        out = model(x)
    assert tb.last_state(model).tokens == by_patch
    assert tb.last_state(model).mode == "resolution"
    assert out.shape == (6, 10) and torch.isfinite(out).all()


def test_remove_restores_outputs_state_dict_and_apply_twice_is_safe() -> None:
    model = make_tiny("avgpool_no_cls")
    x = _mixed_images()
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        tb.apply(model, _mixed_config(model))
        once = model(x)
        assert list(model.state_dict()) == keys
        tb.apply(model, _mixed_config(model))
        assert torch.equal(model(x), once)
        assert not torch.allclose(once, ref)
        tb.remove(model)
        assert torch.equal(model(x), ref)
    assert list(model.state_dict()) == keys
    assert not tb.is_patched(model)
    assert "forward" not in model.__dict__ and "forward" not in model.patch_embed.__dict__
    tb.apply(model, tb.ToMe(r=2))  # another method after it
    tb.remove(model)


def test_concurrent_forwards_keep_their_own_sizes() -> None:
    model = make_tiny("vit")
    cfg = tb.adaptive.calibrate(model, torch.randn(40, 3, 32, 32), target_tokens=100)
    tb.apply(model, cfg)
    assert_concurrent_forwards_match(model, lambda x: model(x).detach())


def test_gradients_reach_the_patch_embedding() -> None:
    model = make_tiny("vit")
    tb.apply(model, _mixed_config(model))
    model(_mixed_images()).sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.pos_embed.grad.abs().sum() > 0


def test_intermediates_are_guarded() -> None:
    model = make_tiny("vit")
    tb.apply(model, _mixed_config(model))
    with pytest.raises(NotImplementedError, match="per-image patch sizes"):
        model.forward_intermediates(_mixed_images())


# -- bad input -------------------------------------------------------------------------------


def test_patch_size_not_dividing_the_image_is_a_clear_error() -> None:
    model = make_tiny("vit")
    tb.apply(model, tb.AdaptivePatch(patch_sizes=(8, 4, 3), thresholds=(0.0, 0.0)))
    with pytest.raises(
        ValueError, match=r"patch size 3 does not divide the 32x32 input.*\[1, 2, 4, 8, 16, 32\]"
    ):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="does not divide"):
        tb.adaptive.calibrate(model, torch.randn(4, 3, 32, 32), target_tokens=20, patch_sizes=(8, 5))


def test_models_without_a_patch_embedding_are_refused() -> None:
    model = make_tiny("vit")
    model.patch_embed = nn.Identity()
    with pytest.raises(ValueError, match="no patch_embed with a Conv2d proj"):
        tb.apply(model, tb.AdaptivePatch(patch_sizes=(4,)))
    assert not tb.is_patched(model)
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        tb.apply(nn.Sequential(nn.Conv2d(3, 8, 4, 4)), tb.AdaptivePatch(patch_sizes=(4,)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs 2 thresholds"),
        ({"keep": 0.5}, r"calibrate\(model, images, keep=0.5\)"),
        ({"patch_sizes": (8, 4), "thresholds": (0.2, 0.5)}, "2 patch sizes need 1 thresholds"),
        ({"thresholds": (0.6, 0.2)}, "must not decrease"),
        ({"thresholds": (0.2, 1.5)}, r"in \[0, 1\]"),
        ({"patch_sizes": (4, 8), "thresholds": (0.5,)}, "coarse to fine"),
        ({"patch_sizes": (4,), "mode": "zoom"}, "mode must be"),
        ({"patch_sizes": (4,), "score": "entropy"}, "unknown complexity score"),
    ],
)
def test_bad_configs_say_what_would_work(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tb.AdaptivePatch(**kwargs)


def test_odd_native_patch_needs_explicit_sizes() -> None:
    model = VARIANTS["vit"][0](img_size=35, patch_size=7, embed_dim=48, depth=1, num_heads=3, num_classes=0)
    with pytest.raises(ValueError, match="odd"):
        tb.apply(model, tb.AdaptivePatch(thresholds=(0.3, 0.6)))


# -- public API and CLI ----------------------------------------------------------------------


def test_public_api_and_json_round_trip() -> None:
    assert "AdaptivePatch" in tb.__all__ and "adaptive" in tb.__all__
    cfg = tb.AdaptivePatch(
        patch_sizes=(28, 14, 7), thresholds=(0.25, 0.75), mode="resolution", target_tokens=128.0
    )
    data = json.loads(cfg.to_json())
    assert data["method"] == "adaptive-patch" and data["patch_sizes"] == [28, 14, 7]
    assert tb.config_from_json(cfg.to_json()) == cfg


def test_cli_eval_of_adaptive_patch_points_to_calibration(capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--methods", "adaptive-patch", "--keep", "1.0,0.5"]) == 2
    assert "tb.adaptive.calibrate" in capsys.readouterr().err


def test_cli_adaptive_eval_is_reachable_and_checks_its_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["adaptive-eval", "--help"])
    assert "--targets" in capsys.readouterr().out
    assert main(["adaptive-eval", "--modes", "zoom"]) == 2  # refused before any model or data loads
    assert "patch and/or resolution" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_adaptive_eval_runs(capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "adaptive-eval",
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "64",
            "--data",
            "skimage",
            "--targets",
            "10",
            "--fixed",
            "32",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for method in ("full", "fixed", "adaptive", "fixed-res", "adaptive-res"):
        assert f"\n{method} " in out


# -- the embedded DINOv2 (real weights) ------------------------------------------------------


@pytest.mark.slow
def test_embedded_dinov2_runs_each_photo_at_its_own_patch_size() -> None:
    pytest.importorskip("onnx", reason="the embedded model needs: pip install 'tokenbudget[demo]'")
    from tokenbudget.data import sample_images

    model = tb.models.dinov2_small()
    photos = sample_images(224)  # 8 scikit-image photos, from a flat-ish sky to a dense star field
    with torch.inference_mode():
        full = model(photos)
        cfg = tb.adaptive.calibrate(model, photos, target_tokens=256)  # the native count: 14 px for all
        assert cfg.patch_sizes == (28, 14, 7) and cfg.thresholds == (0.0, 1.0)
        tb.apply(model, cfg)
        assert torch.equal(model(photos), full)  # the native size is the model itself
        cfg = tb.adaptive.calibrate(model, photos, target_tokens=160)
        tb.apply(model, cfg)
        out = model(photos)
        state = tb.last_state(model)
        alone = torch.cat([model(photos[i : i + 1]) for i in range(len(photos))])
    assert set(state.patch_sizes.tolist()) == {28, 14}
    assert sum(state.patch_tokens) / len(photos) == 160  # 4 photos at 28 px (64), 4 at 14 px (256)
    assert torch.allclose(out, alone, atol=1e-4)
    # Coarse patches keep the features recognisable: every photo's class token stays nearest to its own.
    sim = F.normalize(out, dim=1) @ F.normalize(full, dim=1).T
    assert torch.equal(sim.argmax(dim=1), torch.arange(len(photos)))


def test_bench_points_to_adaptive_eval() -> None:
    from tokenbudget.bench import bench

    with pytest.raises(ValueError, match="adaptive-eval"):
        bench(make_tiny("vit"), [tb.AdaptivePatch(patch_sizes=(4,))], batch_sizes=(1,))


@pytest.mark.slow
def test_adaptive_eval_rows_and_the_random_mix_control() -> None:
    from tokenbudget.data.eval_sets import EvalData
    from tokenbudget.evaluate.adaptive_eval import adaptive_features, evaluate_adaptive, format_adaptive_table

    model = make_tiny("vit")
    g = torch.Generator().manual_seed(0)
    images = torch.cat([_smooth(12, seed=7), torch.randn(12, 3, 32, 32, generator=g)])
    labels = torch.arange(24) % 3
    data = EvalData("tiny", images[::2], labels[::2], images[1::2], labels[1::2])
    rows = evaluate_adaptive(model, data, targets=(40.0,), fixed_sizes=(8,), modes=("patch",))
    assert [r.method for r in rows] == ["full", "fixed", "adaptive", "random-mix"]
    full, fixed, adaptive, control = rows
    assert (full.mean_tokens, fixed.mean_tokens) == (64, 16) and full.cosine == pytest.approx(1.0)
    assert adaptive.size_shares == control.size_shares and adaptive.mean_tokens == control.mean_tokens
    assert 0.25 < adaptive.flops_ratio < 1 and "random-mix" in format_adaptive_table(rows)
    # What the control relies on: an image's features depend only on its own patch size.
    cfg = tb.adaptive.calibrate(model, data.train_images, target_tokens=40.0)
    tb.apply(model, cfg)
    feats, _, sizes = adaptive_features(model, data.test_images, batch_size=5)
    tb.apply(model, tb.AdaptivePatch(patch_sizes=(8,)))
    coarse, _, _ = adaptive_features(model, data.test_images)
    tb.remove(model)
    native, _, _ = adaptive_features(tb.apply(model, tb.AdaptivePatch(patch_sizes=(4,))), data.test_images)
    expected = torch.stack([(coarse if p == 8 else native)[i] for i, p in enumerate(sizes)])
    assert set(sizes) == {8, 4}
    assert torch.allclose(feats, expected, atol=1e-5)
