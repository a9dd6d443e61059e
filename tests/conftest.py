"""Tiny timm ViTs covering every block feature the patch must keep (fast on a CPU)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import tokenbudget as tb

# 32 px images, 4 px patches: an 8x8 grid, 64 patch tokens, 4 blocks.
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)

VARIANTS: dict[str, tuple[type, dict]] = {
    "vit": (VisionTransformer, {}),
    "deit_distilled": (VisionTransformerDistilled, {}),
    "dinov2_layerscale": (VisionTransformer, {"init_values": 0.5}),
    "dinov2_registers": (VisionTransformer, {"init_values": 0.5, "reg_tokens": 4, "no_embed_class": True}),
    "qk_norm": (VisionTransformer, {"qk_norm": True}),
    "clip_prenorm": (VisionTransformer, {"pre_norm": True, "global_pool": "token"}),
    "avgpool_cls": (VisionTransformer, {"global_pool": "avg", "fc_norm": True}),
    "avgpool_no_cls": (VisionTransformer, {"class_token": False, "global_pool": "avg", "fc_norm": True}),
}


def make_tiny(variant: str, seed: int = 0) -> torch.nn.Module:
    cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    model = cls(**TINY, **extra).eval()
    # timm zero-initialises some weights (e.g. the head): randomise everything so that every
    # parameter, LayerScale and q/k norm included, changes the output.
    return randomize_parameters(model, lambda name: name.endswith("gamma"))


def randomize_parameters(model: torch.nn.Module, is_layer_scale: Callable[[str], bool]) -> torch.nn.Module:
    """Perturb every parameter (LayerScale factors drawn in [0.5, 1.5]) so each one changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_layer_scale(name):
                p.uniform_(0.5, 1.5)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def matching_shapes(max_tokens: int, max_r: int, min_tokens: int = 1, min_r: int = 0) -> st.SearchStrategy:
    """Hypothesis draws of (batch, tokens, prefix tokens, r, seed) for matching properties."""
    return st.tuples(
        st.integers(1, 3),  # batch
        st.integers(min_tokens, max_tokens),  # tokens
        st.integers(0, 5),  # prefix tokens
        st.integers(min_r, max_r),  # r
        st.integers(0, 2**16),  # seed
    )


@pytest.fixture(params=list(VARIANTS))
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return make_tiny(request.param)


@pytest.fixture
def one_thread():
    """One torch thread for the test: training steps are many small ops, and on a shared 2-core
    machine extra threads only hand work back and forth (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def assert_concurrent_forwards_match(
    model: torch.nn.Module, run: Callable[[torch.Tensor], torch.Tensor], reps: int = 8
) -> None:
    """Four threads, each with its own batch size and inputs, call ``run`` (a forward of the patched
    ``model``) ``reps`` times at once: every output must equal the sequential one, and
    ``tb.last_state`` must report each thread's own forward (any shared state would show)."""
    inputs = [torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)) for b in (1, 2, 3, 4)]
    expected = [run(x) for x in inputs]
    results: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for rep in range(reps):
                out = run(inputs[i])
                results[(i, rep)] = (out, tb.last_state(model).batch_size)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == len(inputs) * reps
    for (i, _), (out, batch) in results.items():
        assert torch.equal(out, expected[i])
        assert batch == len(inputs[i])


def assert_reduced_at_counts(
    model: torch.nn.Module, images: torch.Tensor, out: torch.Tensor, expected: torch.Tensor, counts: list[int]
) -> None:
    """Checks of a patched model's last forward (run with ``trace_source=True``), then of its removal:
    finite outputs that differ from the unpatched ``expected``, the given per-layer token ``counts``,
    prefix tokens kept in place, sizes and sources partitioning the input; ``tb.remove`` restores
    ``expected`` exactly."""
    state = tb.last_state(model)
    assert torch.isfinite(out).all() and (out - expected).abs().max() > 1e-4
    assert state.tokens_per_layer == counts
    p = model.num_prefix_tokens
    assert torch.equal(state.token_map[:, :p], torch.arange(p).expand(len(images), -1))
    assert bool((state.sizes.sum(dim=1) == state.input_tokens).all())
    assert bool((state.source.sum(dim=1) == 1).all())
    tb.remove(model)
    assert torch.equal(model(images), expected)


def write_two_class_folder(root: Path, *, splits: Sequence[str] = ("",), spread: float = 20.0) -> Path:
    """A tiny seeded image folder for CLI tests: six noisy 40x40 RGB images of a dark and a light
    class under ``root/SPLIT/CLASS/`` for each split (``""``: no split level). Returns ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, value in (("dark", 40), ("light", 215)):
        for split in splits:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(6):
                pixels = np.clip(rng.normal(value, spread, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
