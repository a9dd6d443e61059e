"""tokenbudget plan: targets -> a config chosen from measured candidates."""

from __future__ import annotations

import json

import pytest

import tokenbudget as tb
from conftest import write_two_class_folder
from tokenbudget.cli import main
from tokenbudget.evaluate import EvalRow
from tokenbudget.evaluate.plan import choose, pareto_front


def _row(keep: float, speedup: float, flops: float, knn: float) -> EvalRow:
    method = "full" if keep == 1.0 else "tome"
    return EvalRow(method, keep, {"method": "tome", "keep": keep}, knn, 100 * (0.80 - knn), 0.0, 0.0, 1.0,
                   10.0, speedup, flops, None, 100, 20)  # fmt: skip


ROWS = [
    _row(1.0, 1.0, 1.0, 0.80),
    _row(0.8, 1.2, 0.85, 0.80),
    _row(0.5, 1.5, 0.70, 0.795),
    _row(0.3, 1.9, 0.55, 0.78),
    _row(0.2, 2.2, 0.45, 0.70),
    _row(0.25, 1.8, 0.50, 0.77),  # dominated by keep=0.3
]


def test_choose_for_each_kind_of_target() -> None:
    assert choose(ROWS, target_speedup=1.8)[0].keep == 0.3  # most accurate at >= 1.8x
    assert choose(ROWS, target_flops=0.5)[0].keep == 0.25  # most accurate at <= half the FLOPs
    assert choose(ROWS, max_drop=0.5)[0].keep == 0.5  # fastest within 0.5 points
    assert choose(ROWS, target_speedup=1.3, max_drop=0.5)[0].keep == 0.5
    choice, reason = choose(ROWS, target_speedup=3.0)
    assert choice is None and "fastest is 2.20x" in reason


def test_pareto_front() -> None:
    assert [r.keep for r in pareto_front(ROWS)] == [0.8, 0.5, 0.3, 0.2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan"], "give a target"),
        (["plan", "--target-speedup", "0.5"], "must be above 1.0"),
        (["plan", "--target-flops", "1.5"], "fraction of the full FLOPs"),
    ],
)
def test_bad_targets(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_plan_cli_gives_a_config_apply_takes(tmp_path, capsys) -> None:

    write_two_class_folder(tmp_path / "data")
    out = tmp_path / "config.json"
    argv = ["plan", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path / "data"), "--target-flops", "0.75",
            "--keep", "0.8,0.5,0.3", "--speed-batch-size", "1", "--speed-samples", "1", "--json", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    config = tb.config_from_json(capsys.readouterr().out)
    assert config == tb.config_from_json(out.read_text())
    assert isinstance(config, tb.ToMe) and config.keep in (0.5, 0.3)
    assert json.loads(out.read_text())["method"] == "tome"


def test_plan_shows_progress_per_candidate(tmp_path, capsys) -> None:
    write_two_class_folder(tmp_path / "data")
    argv = ["plan", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path / "data"), "--target-flops", "0.75",
            "--keep", "0.8,0.5", "--speed-batch-size", "1", "--speed-samples", "1"]  # fmt: skip
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("plan: [")]
    # the full-token features, the timing, then one line per candidate, each with the time left
    assert [line.split("]")[0] for line in lines] == [f"plan: [{i}/4" for i in range(1, 5)]
    assert "tome keep=0.8" in lines[2] and "tome keep=0.5" in lines[3]
    assert all("left" in line for line in lines[:-1]) and "finished" in lines[-1]


@pytest.mark.parametrize(
    "target, range_text",
    [
        (["--target-speedup", "3.0"], "--target-speedup up to"),
        (["--target-flops", "0.3"], "--target-flops from"),
    ],
)
def test_unreachable_target_fails_before_measuring(target, range_text, tmp_path, monkeypatch, capsys) -> None:
    import time

    from tokenbudget.cli import options

    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path / "cache"))

    def no_data(*args, **kwargs):
        raise AssertionError("an unreachable target must fail before the data is loaded")

    monkeypatch.setattr(options, "model_and_data", no_data)
    argv = ["plan", "--model", "vit_tiny_patch16_224", "--keep", "0.8,0.5,0.3", *target]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "out of reach" in err and range_text in err and "keep=0.3" in err
    # Once a command has loaded the model, its recorded geometry answers without loading it again
    # (what keeps the command line's refusal of the embedded model under 5 s: timm alone takes 3).
    monkeypatch.setattr(options, "load_model", no_data)
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 5.0
    assert capsys.readouterr().err == err


def test_plan_api_refuses_an_unreachable_target() -> None:
    from tokenbudget.evaluate.plan import plan

    model = tb.models.load_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="out of reach"):
        plan(model, None, target_speedup=1.5, keeps=(0.9, 0.8))  # fails before reading the data


def test_the_refusal_from_a_recorded_geometry_needs_no_torch(tmp_path) -> None:
    """What keeps an unreachable target's refusal at about a second: no torch, no model, no data."""
    import os
    import subprocess
    import sys

    geometry = tmp_path / "geometry" / "dinov2_small-default.json"
    geometry.parent.mkdir()
    dims = [{"dim": 384, "attn_dim": 384, "mlp_hidden": 1536}] * 12
    geometry.write_text(json.dumps({"model": "dinov2_small", "img_size": None, "tokens": 257, "prefix": 1,
                                    "layers": 12, "dims": dims}))  # fmt: skip
    code = (
        "import sys; from tokenbudget.cli import main; rc = main(['plan', '--target-speedup', '2.0']); "
        "print(rc, 'torch' in sys.modules)"
    )
    env = dict(os.environ, TOKENBUDGET_CACHE=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "out of reach" in run.stderr and "1.91x" in run.stderr
    assert run.stdout.split() == ["2", "False"]
