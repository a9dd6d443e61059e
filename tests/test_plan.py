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
