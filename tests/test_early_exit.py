"""Early exit: exit heads on the class token, batch shrinking, calibration, files, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tokenbudget as tb
from conftest import make_tiny, write_two_class_folder
from tokenbudget.adapters import find_adapter
from tokenbudget.adaptive.blockwise import layer_class_tokens
from tokenbudget.adaptive.early_exit import (
    calibrate_thresholds,
    geometric_exit_fractions,
    simulate_exits,
)
from tokenbudget.adaptive.exit_heads import ExitHeads, load_exit_heads, save_exit_heads, train_exit_heads

CLASS_TOKEN_VARIANTS = ["vit", "deit_distilled", "dinov2_registers", "qk_norm", "clip_prenorm"]


def random_heads(model: torch.nn.Module, layers=(0, 1, 2, 3), seed: int = 0) -> ExitHeads:
    torch.manual_seed(seed)
    heads = ExitHeads(model.embed_dim, len(model.blocks), layers, num_classes=10)
    with torch.no_grad():  # sharpen the random heads so confidences spread over (0.1, 1)
        for head in heads.heads:
            head[1].weight.mul_(8)
    return heads.eval()


def reference_class_token(model: torch.nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """Class token after block ``layer`` read by a hook during the model's own forward_features."""
    seen = {}

    def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["x"] = output[:, 0]

    handle = model.blocks[layer].register_forward_hook(keep)
    with torch.no_grad():
        model.forward_features(images)
    handle.remove()
    return seen["x"]


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("variant", CLASS_TOKEN_VARIANTS)
def test_threshold_inf_is_the_full_model_and_zero_the_first_exit(variant: str, batch: torch.Tensor) -> None:
    model = make_tiny(variant)
    heads = random_heads(model, layers=(1, 3))
    with torch.no_grad():
        full = tb.adaptive.EarlyExit(model, heads, thresholds=math.inf)(batch)
        assert full.exit_layer.tolist() == [3] * len(batch) and full.batch_per_block == [12] * 4
        assert torch.equal(full.logits, heads.head(3)(reference_class_token(model, batch, 3)))
        first = tb.adaptive.EarlyExit(model, heads, thresholds=0.0)(batch)
        assert first.exit_layer.tolist() == [1] * len(batch)
        assert first.batch_per_block == [12, 12]  # blocks 2 and 3 never ran
        assert torch.equal(first.logits, heads.head(1)(reference_class_token(model, batch, 1)))


def test_exited_samples_leave_the_batch_and_order_is_kept(batch: torch.Tensor) -> None:
    model = make_tiny("dinov2_registers")
    heads = random_heads(model)
    early_exit = tb.adaptive.EarlyExit(model, heads, thresholds=[0.5, 0.45, 0.4])
    seen = []

    def count(module: torch.nn.Module, args: tuple) -> None:
        seen.append(args[0].shape[0])

    hooks = [b.register_forward_pre_hook(count) for b in model.blocks]
    with torch.no_grad():
        out = early_exit(batch)
    for h in hooks:
        h.remove()
    assert seen == out.batch_per_block
    exits = out.exit_index.tolist()
    assert 0 < len(set(exits)) > 1, "the thresholds should spread the samples over several exits"
    # Each block ran on exactly the samples that had not left before it.
    assert seen == [sum(1 for e in exits if early_exit.exits[e] >= layer) for layer in range(len(seen))]
    with torch.no_grad():
        # Each sample alone gives the same exit and logits: outputs are in input order.
        for i in range(len(batch)):
            alone = early_exit(batch[i : i + 1])
            assert alone.exit_index.item() == exits[i]
            torch.testing.assert_close(alone.logits[0], out.logits[i], atol=1e-5, rtol=1e-5)
        flipped = early_exit(batch.flip(0))
    assert flipped.exit_index.tolist() == exits[::-1]
    torch.testing.assert_close(flipped.logits, out.logits.flip(0), atol=1e-5, rtol=1e-5)
    # The forward takes the exits the cached simulation predicts.
    confidences, _ = early_exit.confidences(layer_class_tokens(model, batch))
    assert simulate_exits(confidences, early_exit.thresholds).tolist() == exits


def test_calibration_hits_the_target_mean_depth_and_flops() -> None:
    model = make_tiny("vit")
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = layer_class_tokens(model, images)
    early_exit = tb.adaptive.EarlyExit(model, random_heads(model))
    depths = torch.tensor(early_exit.costs("depth"))
    confidences, _ = early_exit.confidences(tokens)
    for target in (1.0, 1.7, 2.5, 3.2, 4.0):
        thresholds = early_exit.calibrate(tokens, target_depth=target)
        achieved = float(depths[simulate_exits(confidences, thresholds)].mean())
        assert abs(achieved - target) <= 3 / len(images) + 1e-6, (target, achieved)
    flops = torch.tensor(early_exit.costs("flops"))
    early_exit.calibrate(images, target_flops=0.6)  # images: captured on the fly
    achieved = float(flops[simulate_exits(confidences, early_exit.thresholds)].mean())
    assert abs(achieved - 0.6) <= float(flops[-1] - flops[0]) / len(images) + 1e-6
    with pytest.raises(ValueError, match="out of reach"):
        early_exit.calibrate(tokens, target_depth=5.0)
    with pytest.raises(ValueError, match="give one calibration target"):
        early_exit.calibrate(tokens)


def test_calibration_protocol_parts() -> None:
    shares = geometric_exit_fractions(0.3, 4)
    assert torch.allclose(shares, torch.tensor([0.3, 0.21, 0.147, 0.343], dtype=torch.float64))
    assert geometric_exit_fractions(1.0, 3).tolist() == [1.0, 0.0, 0.0]
    assert geometric_exit_fractions(0.0, 3).tolist() == [0.0, 0.0, 1.0]
    confidences = torch.rand(200, 3, generator=torch.Generator().manual_seed(0))
    loose = calibrate_thresholds(confidences, [1, 2, 3], 1.5)
    tight = calibrate_thresholds(confidences, [1, 2, 3], 2.5)
    assert loose[0] < tight[0]  # a bigger budget asks for more confidence to leave early
    assert calibrate_thresholds(confidences, [1, 2, 3], 3.0) == [math.inf, math.inf]
    with pytest.raises(ValueError, match="must increase"):
        calibrate_thresholds(confidences, [1, 1, 3], 2.0)


def test_flops_costs_are_cumulative_blocks() -> None:
    model = make_tiny("vit")
    early_exit = tb.adaptive.EarlyExit(model, random_heads(model))
    costs = early_exit.costs("flops")
    steps = [b - a for a, b in zip(costs, costs[1:], strict=False)]
    assert all(s > 0 for s in steps) and max(steps) - min(steps) < 1e-9  # equal blocks, equal steps
    assert 1.0 < costs[-1] < 1.01  # all blocks plus the (tiny) heads


def test_heads_train_and_round_trip(tmp_path, batch: torch.Tensor, one_thread) -> None:
    model = make_tiny("vit")
    images = torch.randn(60, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokens = layer_class_tokens(model, images)
    score = torch.nn.functional.layer_norm(tokens[:, 3], (48,)) @ torch.randn(48, generator=torch.Generator())
    labels = (score > score.median()).long()  # linearly separable for the head after block 3
    heads = train_exit_heads(
        tokens, labels, [1, 3], depth=4, epochs=25, lr=3e-2, batch_size=16, info={"model": "tiny"}
    )
    assert heads.info["train_accuracy"][-1] > 0.9
    weights, config = save_exit_heads(heads, tmp_path / "heads")
    loaded = load_exit_heads(config)
    assert loaded.layers == (1, 3) and loaded.info["model"] == "tiny"
    with torch.no_grad():
        a = tb.adaptive.EarlyExit(model, heads, thresholds=0.7)(batch)
        b = tb.adaptive.EarlyExit(model, str(weights), thresholds=0.7)(batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_index, b.exit_index)
    deeper = make_tiny("vit")
    deeper.blocks.append(deeper.blocks[-1])
    with pytest.raises(ValueError, match="trained for a model with 4 blocks"):
        tb.adaptive.EarlyExit(deeper, loaded)
    with pytest.raises(FileNotFoundError, match="train-exits"):
        load_exit_heads(tmp_path / "missing")
    config.write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ValueError, match="not a tokenbudget exit heads config"):
        load_exit_heads(config)


def test_bad_input_is_refused(batch: torch.Tensor) -> None:
    model = make_tiny("vit")
    heads = random_heads(model)
    with pytest.raises(ValueError, match="has none"):
        tb.adaptive.EarlyExit(make_tiny("avgpool_no_cls"), heads)
    with pytest.raises(ValueError, match="take 3 thresholds"):
        tb.adaptive.EarlyExit(model, heads, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="subset"):
        tb.adaptive.EarlyExit(model, random_heads(model, layers=(1, 3)), exits=(0, 3))
    with pytest.raises(ValueError, match="NaN"):
        tb.adaptive.EarlyExit(model, heads, thresholds=math.nan)
    with pytest.raises(ValueError, match="distinct block indices"):
        ExitHeads(48, 4, (1, 4), 10)
    with pytest.raises(ValueError, match=r"images \[B, 3, H, W\]"):
        tb.adaptive.EarlyExit(model, heads)(batch[0])
    tb.apply(model, tb.ToMe(r=2))
    with pytest.raises(ValueError, match="tb.remove"):
        tb.adaptive.EarlyExit(model, heads)
    tb.remove(model)


def test_embed_tokens_matches_the_models_own_first_block_input(batch: torch.Tensor) -> None:
    model = make_tiny("dinov2_registers")
    seen = {}

    def keep(module: torch.nn.Module, args: tuple) -> None:
        seen["x"] = args[0]

    handle = model.blocks[0].register_forward_pre_hook(keep)
    with torch.no_grad():
        model.forward_features(batch)
        handle.remove()
        assert torch.equal(find_adapter(model).embed(batch), seen["x"])


def test_train_and_eval_exits_cli(tmp_path, capsys) -> None:

    from tokenbudget.cli import main

    write_two_class_folder(tmp_path / "data", splits=("train", "test"), spread=30)
    common = [
        "--model",
        "test_vit",
        "--img-size",
        "64",
        "--data",
        str(tmp_path / "data"),
        "--quiet",
        "--threads",
        "1",
    ]
    out = str(tmp_path / "heads")
    argv = ["train-exits", *common, "--layers", "0,2", "--epochs", "5", "--calib-fraction", "0.25",
            "--target-flops", "0.5", "--out", out]  # fmt: skip
    assert main(argv) == 0
    assert "trained 2 exit heads" in capsys.readouterr().out
    heads = load_exit_heads(out)
    assert heads.layers == (0, 2) and len(heads.info["thresholds"]) == 1
    argv = ["eval-exits", *common, "--heads", out, "--target-flops", "0.35,0.5", "--timed-target", "0.5",
            "--timed-images", "4", "--batch-size", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    kinds = [r["kind"] for r in result["rows"]]
    assert kinds == ["fixed, own head", "fixed, final head"] * 2 + ["early exit"] * 2
    assert result["timing"]["same_exit"] == 1.0
    assert main(["eval-exits", *common, "--heads", out, "--target-flops", "0.01"]) == 2
    assert "out of reach" in capsys.readouterr().err


@pytest.mark.slow
def test_exits_on_the_embedded_dinov2(tmp_path, capsys, one_thread) -> None:
    """train-exits and eval-exits end to end on the real DINOv2-S weights and offline Fashion-MNIST."""
    from tokenbudget.cli import main

    common = [
        "--model",
        "dinov2_small",
        "--data",
        "fashion-mnist",
        "--n-train",
        "60",
        "--quiet",
    ]
    out = str(tmp_path / "heads")
    argv = ["train-exits", *common, "--layers", "3,7,11", "--epochs", "40", "--calib-fraction", "0.25",
            "--target-flops", "0.6", "--out", out]  # fmt: skip
    assert main(argv) == 0
    heads = load_exit_heads(out)
    assert heads.layers == (3, 7, 11) and heads.info["thresholds"]
    argv = ["eval-exits", *common, "--n-test", "20", "--heads", out, "--target-flops", "0.6", "--timed-target", "0.6",
            "--timed-images", "8", "--batch-size", "4", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    early = [r for r in result["rows"] if r["kind"] == "early exit"]
    assert len(early) == 1 and early[0]["flops"] < 1.0
    # Real features of 10 classes: the last exit's head is far above chance (0.1).
    full = [r for r in result["rows"] if r["kind"] == "fixed, own head"]
    assert max(r["accuracy"] for r in full) > 0.4
    assert result["timing"]["same_exit"] == 1.0  # the real forward takes the exits the cache predicted
