"""tb.PerImage as users reach it: eval, bench, plan, visualize, the explorer, --data mix, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import tokenbudget as tb
from conftest import make_tiny, write_two_class_folder
from tokenbudget.adaptive import calibrate_per_image
from tokenbudget.cli import main

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--threads", "1"]


@pytest.fixture
def folder(tmp_path) -> str:
    return str(write_two_class_folder(tmp_path / "data"))


def test_eval_calibrates_per_image_on_train_and_reports_its_flops(folder, capsys) -> None:
    argv = ["eval", *TINY, "--data", folder, "--methods", "tome,per-image", "--flops-speedup", "1.5"]
    assert main([*argv, "--speed-samples", "1", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    per_image, tome = rows["per-image"], rows["tome"]
    cfg = per_image["config"]
    assert cfg["method"] == "per-image" and cfg["thresholds"] is not None  # calibrated inside the run
    assert len(cfg["thresholds"]) == len(cfg["levels"]) - 1 and max(cfg["levels"]) > 1
    # the mean budget is ToMe's at the same keep, so the targets agree
    assert per_image["keep"] == tome["keep"]
    assert cfg["target_flops"] == pytest.approx(tome["flops_ratio"], abs=1e-6)
    assert 0 < per_image["flops_ratio"] <= 1
    assert main([*argv, "--speed-samples", "1", "--policy", "spread"]) == 0
    out = capsys.readouterr().out
    assert "per-image keep=" in out and "(spread;" in out
    assert "target mean FLOPs" in out and "achieved on test" in out


def test_bench_times_per_image_on_real_images_at_its_mean_flops(folder, capsys) -> None:
    argv = ["bench", *TINY, "--data", folder, "--methods", "tome,per-image", "--keep", "0.5"]
    assert main([*argv, "--batch-size", "4", "--samples", "1", "--warmup", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    per_image = next(r for r in rows if r["config"]["method"] == "per-image")
    assert per_image["config"]["thresholds"] is not None
    assert per_image["ceiling_speedup"] is None  # one token schedule per level: no free-reduction twin
    assert per_image["ideal_speedup"] == pytest.approx(1.0 / per_image["flops_ratio"])


def test_bench_refuses_per_image_on_noise() -> None:
    model = make_tiny("dinov2_layerscale")
    g = torch.Generator().manual_seed(0)
    config = calibrate_per_image(
        model, torch.randn(8, 3, 32, 32, generator=g), flops_speedup=1.5, rule="spread"
    )
    with pytest.raises(ValueError, match="real images"):
        tb.bench.bench(model, [config], batch_sizes=(2,), samples=1, warmup=0)


def test_plan_can_choose_a_calibrated_per_image_config(folder, capsys) -> None:
    argv = ["plan", *TINY, "--data", folder, "--methods", "per-image", "--keep", "0.5", "--max-drop", "100"]
    assert main([*argv, "--speed-samples", "1", "--json"]) == 0
    config = tb.config_from_json(capsys.readouterr().out.strip())
    assert isinstance(config, tb.PerImage) and config.thresholds is not None


def test_visualize_and_last_state_report_each_image_budget(tmp_path, capsys) -> None:
    model = tb.models.load_model("vit_tiny_patch16_224", img_size=64).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 64, 64, generator=g)
    images[:6] *= 0.01  # near-flat images: redundant tokens, the cheap levels
    config = calibrate_per_image(model, images, flops_speedup=1.5)
    tb.apply(model, config)
    with torch.inference_mode():
        model(images)
    state = tb.last_state(model)
    tb.remove(model)
    assert state.speedups.shape == (12,) and set(state.speedups.tolist()) <= set(config.levels)
    assert float(state.speedups[:6].min()) >= float(state.speedups[6:].max())
    assert state.summary()["speedups"] == state.speedups.tolist()
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    out = tmp_path / "merges.png"
    argv = ["visualize", "skimage:coffee", "--model", "vit_tiny_patch16_224", "--img-size", "64"]
    assert main([*argv, "--config", str(path), "--out", str(out)]) == 0
    assert "per-image budget: FLOPs-ideal" in capsys.readouterr().out and out.exists()


def test_explorer_shows_the_per_image_budget() -> None:
    from tokenbudget.explore import Explorer

    explorer = Explorer(tb.models.load_model("vit_tiny_patch16_224", img_size=64))
    assert "per-image" in explorer.methods
    image = explorer.images.sample_ids()[0]
    result = explorer.run(image, "per-image", "speedup", 1.5)
    budget = result["per_image"]
    assert budget["per_image_speedup"] in explorer._per_image_config(round(result["keep"], 3)).levels
    # the drawn merges are those of the image's own level
    assert result["ideal_speedup"] == pytest.approx(1.0 / budget["per_image_flops"], rel=1e-6)
    assert "per_image" not in explorer.run(image, "tome", "speedup", 1.5)


def test_data_mix_loads_every_source_with_disjoint_classes(tmp_path, monkeypatch) -> None:
    from tokenbudget.data.eval_sets import load_eval_data
    from tokenbudget.data.mix import SOURCES

    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path))
    data = load_eval_data("mix", 64, (0.5,) * 3, (0.5,) * 3, n_train=50, n_test=0)
    assert data.name == "mix" and data.train_images.shape == (50, 3, 64, 64) and len(data.test_labels) == 0
    labels = data.train_labels
    # every source's own class ids: 10 images per source in source order, no id shared across sources
    per_source = [set(labels[10 * i : 10 * (i + 1)].tolist()) for i in range(len(SOURCES))]
    assert all(per_source) and sum(map(len, per_source)) == len(set(labels.tolist()))
    with pytest.raises(ValueError, match="10 of each"):
        load_eval_data("mix", 64, (0.5,) * 3, (0.5,) * 3, n_train=20, n_test=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "per-image", "--keep", "1.5"], "keep must be in"),
        (["--methods", "per-image", "--keep", "0.5", "--policy", "nope"], "invalid choice"),
        (["--methods", "per-image", "--keep", "0.5", "--data", "/no/such/dir"], "no dataset at"),
    ],
)
def test_eval_refuses_bad_per_image_input(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) if "--policy" in argv else _no_exit():
        code = main(["eval", *TINY, *argv])
        assert code == 2
    assert message in capsys.readouterr().err


class _no_exit:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_config_refuses_bad_budgets_and_policies() -> None:
    for kwargs, message in [
        ({"keep": 1.5}, "keep must be a fraction"),
        ({"keep": 0}, "positive number"),
        ({"flops_speedup": 0.5}, "flops_speedup must be >= 1"),
        ({"keep": 0.5, "flops_speedup": 2}, "exactly one mean budget"),
        ({"keep": 0.5, "policy": "nope"}, "unknown policy"),
        ({"keep": 0.5, "levels": (2.0, 1.0)}, "increase strictly"),
        ({"keep": 0.5, "thresholds": (0.1,)}, "need 5 thresholds"),
    ]:
        with pytest.raises(ValueError, match=message):
            tb.PerImage(**kwargs)
