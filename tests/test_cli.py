"""The tokenbudget command, run as users run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokenbudget.cli import main


def test_bench_json(capsys) -> None:
    code = main(
        [
            "bench",
            "--model",
            "vit_tiny_patch16_224",
            "--r",
            "8,16",
            "--batch-size",
            "1",
            "--samples",
            "2",
            "--warmup",
            "1",
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["config"]["r"] for r in rows] == [8, 16]
    assert rows[1]["tokens_per_layer"][-1] == 11  # the last block merges the 10 it can
    for key in (
        "baseline_img_s",
        "patched_img_s",
        "speedup",
        "ideal_speedup",
        "efficiency",
        "patched_peak_mb",
    ):
        assert rows[0][key] > 0


def test_bench_table_and_config_json(capsys) -> None:
    code = main(
        ["bench", "--model", "vit_tiny_patch16_224", "--config", '{"method": "tome", "keep": 0.5}', "--batch-size", "1",
         "--samples", "1", "--warmup", "1", "--no-memory", "--no-ceiling", "--quiet"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "tome(keep=0.5)" in out and "197->99" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--model", "no_such_model", "--samples", "1"], "unknown model 'no_such_model'"),
        (["bench", "--r", "500", "--samples", "1"], "larger than the 196 mergeable tokens"),
        (["bench", "--r", "8", "--keep", "0.5"], "give one budget option"),
        (["bench", "--config", '{"method": "tome", "rr": 1}'], "unknown option"),
        (["visualize", "/no/such/image.png", "--model", "vit_tiny_patch16_224"], "no image at"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_visualize_writes_a_picture(tmp_path) -> None:
    from PIL import Image

    out = tmp_path / "merges.png"
    assert (
        main(["visualize", "skimage:coffee", "-o", str(out), "--model", "vit_tiny_patch16_224", "--r", "12"])
        == 0
    )
    picture = Image.open(out)
    assert picture.size == (224 * 2 + 8, 224)


def test_console_script_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokenbudget", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("bench", "visualize", "demo"):
        assert command in done.stdout


def test_bench_takes_a_comma_list_of_methods(capsys) -> None:
    code = main(
        ["bench", "--model", "vit_tiny_patch16_224", "--method", "tome,tome-detail,random", "--r", "8",
         "--batch-size", "1", "--samples", "1", "--warmup", "0", "--no-memory", "--no-ceiling", "--json",
         "--quiet"]
    )  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["config"]["method"] for r in rows] == ["tome", "tome-detail", "random"]
    assert len({r["tokens_per_layer"][-1] for r in rows}) == 1  # one budget, three methods
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--method", "tome,nope"])
    assert exit_info.value.code == 2 and "unknown method 'nope'" in capsys.readouterr().err
