"""The texture set, the bias diagnostic and the auto / pitome methods on the command line, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

import tokenbudget as tb
from conftest import write_two_class_folder
from tokenbudget.cli import main
from tokenbudget.data.textures import TEXTURE_CLASSES

TINY = ["--model", "vit_tiny_patch16_224"]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """Generated sets go to a fresh cache folder, never the user's."""
    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_make_textures_command(tmp_path, own_cache, capsys) -> None:
    out, preview = tmp_path / "set", tmp_path / "preview.png"
    code = main(
        ["make-textures", "--n-base", "3", "--size", "64", "--out", str(out), "--preview", str(preview)]
    )
    text = capsys.readouterr().out
    assert code == 0 and "9 images" in text and "'local': 3" in text
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(TEXTURE_CLASSES)
    assert len(list(out.glob("*/*/*.png"))) == 9
    assert preview.stat().st_size > 0
    assert list(own_cache.glob("textures-*.npz"))  # cached, so eval --data textures reuses it


@pytest.mark.parametrize(
    "argv, message",
    [
        (["make-textures", "--size", "32"], "size must be >= 64"),
        (["make-textures", "--n-base", "0"], "num_base must be >= 1"),
        (["make-textures", "--global-strength", "0"], "must be > 0"),
    ],
)
def test_make_textures_bad_input(argv, message, own_cache, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_on_textures_with_shift_and_the_new_methods(own_cache, capsys) -> None:
    argv = ["eval", *TINY, "--img-size", "64", "--data", "textures", "--n-train", "9", "--n-test", "6",
            "--methods", "auto,pitome,tome", "--keep", "1.0,0.5", "--shift", "--speed-batch-size", "1",
            "--speed-samples", "1", "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["full", "auto", "pitome", "tome"]
    assert rows[0]["shift"] == 0.0
    for row in rows[1:]:
        assert row["shift"] >= 0.0 and row["final_tokens"] == rows[3]["final_tokens"]  # ToMe's counts
    assert rows[1]["config"]["method"] == "auto" and rows[1]["config"]["rule"] == "dispersion"
    # a reduced backbone moves the features: auto's shift is measured, not a placeholder
    assert rows[1]["cosine"] < 1.0 and rows[1]["shift"] > 0.0


def test_eval_table_shows_the_shift_column(own_cache, capsys) -> None:
    argv = ["eval", *TINY, "--img-size", "64", "--data", "textures", "--n-train", "6", "--n-test", "3",
            "--methods", "auto", "--flops-speedup", "1.5", "--shift", "--speed-batch-size", "1",
            "--speed-samples", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert header.split().index("shift") == header.split().index("cosine") + 1
    assert "shift: largest fraction of a class gap" in out


def test_eval_without_shift_has_no_shift_column(tmp_path, capsys) -> None:
    write_two_class_folder(tmp_path / "data")
    argv = ["eval", *TINY, "--data", str(tmp_path / "data"), "--methods", "auto", "--keep", "1.0,0.5",
            "--speed-batch-size", "1", "--speed-samples", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "shift" not in capsys.readouterr().out.split("\n")[1]


def test_shift_with_one_class_is_an_error(tmp_path, capsys) -> None:
    write_two_class_folder(tmp_path / "data")
    argv = [
        "eval",
        *TINY,
        "--data",
        str(tmp_path / "data"),
        "--methods",
        "tome",
        "--keep",
        "1.0,0.5",
        "--shift",
        "--n-train",
        "1",
        "--n-test",
        "2",
    ]  # fmt: skip  (one train image: one class)
    assert main(argv) == 2
    assert "needs two or more classes" in capsys.readouterr().err


def test_evaluate_refuses_shift_with_one_class() -> None:
    import torch

    from tokenbudget.data.eval_sets import EvalData
    from tokenbudget.evaluate import evaluate

    images = torch.zeros(2, 3, 32, 32)
    data = EvalData(
        "one-class", images, torch.zeros(2, dtype=torch.long), images, torch.zeros(2, dtype=torch.long)
    )
    with pytest.raises(ValueError, match="at least two classes"):
        evaluate(torch.nn.Identity(), data, ("tome",), (1.0, 0.5), shift=True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n-train", "9", "--n-test", "2"], "at least 3 train and 3 test images"),
        (["--n-train", "1", "--n-test", "6"], "at least 3 train and 3 test images"),
    ],
)
def test_textures_data_bad_sizes(argv, message, own_cache, capsys) -> None:
    assert main(["eval", *TINY, "--img-size", "64", "--data", "textures", *argv, "--methods", "auto"]) == 2
    assert message in capsys.readouterr().err


def test_bench_times_auto_and_pitome_against_tome(capsys) -> None:
    argv = ["bench", *TINY, "--methods", "tome,auto,pitome", "--keep", "0.5", "--batch-size", "1",
            "--samples", "1", "--warmup", "0", "--no-memory", "--no-ceiling", "--json"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["config"]["method"] for r in rows] == ["tome", "auto", "pitome"]
    assert rows[1]["tokens_per_layer"] == rows[0]["tokens_per_layer"] == rows[2]["tokens_per_layer"]


def test_plan_chooses_among_the_methods_it_is_given(tmp_path, capsys) -> None:
    write_two_class_folder(tmp_path / "data")
    argv = ["plan", *TINY, "--data", str(tmp_path / "data"), "--methods", "auto", "--target-flops", "0.75",
            "--keep", "0.8,0.5,0.3", "--speed-batch-size", "1", "--speed-samples", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    config = tb.config_from_json(capsys.readouterr().out)
    assert isinstance(config, tb.Auto) and config.keep in (0.5, 0.3)


def test_visualize_draws_auto_groups(tmp_path, capsys) -> None:
    out = tmp_path / "auto.png"
    argv = ["visualize", "skimage:coffee", "--out", str(out), *TINY, "--methods", "auto", "--r", "12"]
    assert main(argv) == 0
    assert out.stat().st_size > 0 and "197 ->" in capsys.readouterr().out


@pytest.mark.parametrize("framework", ["hf", "openclip"])
@pytest.mark.parametrize(
    "config", [tb.Auto(r=4), tb.AutoDrop(r=4, mean_up_to=3), tb.AutoDrop(r=4), tb.PiToMe(r=4)], ids=repr
)
def test_auto_and_pitome_on_the_other_frameworks(framework, config, images) -> None:
    """Every framework's adapter runs them at ToMe's counts; zero budget and remove restore the model."""
    from hf_models import make_hf
    from openclip_models import make_openclip
    from tokenbudget.adapters import find_adapter

    model = make_hf("dinov2") if framework == "hf" else make_openclip("tok", 0.5)
    adapter = find_adapter(model)
    with torch.no_grad():
        before = adapter.features(images)
        tb.apply(model, type(config)(r=0))
        assert torch.equal(adapter.features(images), before)
        tb.apply(model, tb.ToMe(r=4))
        tome = adapter.features(images)
        tb.apply(model, config)
        reduced = adapter.features(images)
        state = tb.last_state(model)
        assert reduced.shape == tome.shape and not torch.allclose(reduced, tome)
        assert bool((state.sizes.sum(dim=1) == state.input_tokens).all())
        tb.remove(model)
        assert torch.equal(adapter.features(images), before)
