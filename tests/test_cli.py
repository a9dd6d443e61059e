"""The tokenbudget command, run as users run it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import tokenbudget
from conftest import write_two_class_folder
from tokenbudget.cli import build_parser, main
from tokenbudget.cli.options import model_and_data


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
        main(
            ["visualize", "skimage:coffee", "--out", str(out), "--model", "vit_tiny_patch16_224", "--r", "12"]
        )
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
        ["bench", "--model", "vit_tiny_patch16_224", "--methods", "tome,tome-detail,random", "--r", "8",
         "--batch-size", "1", "--samples", "1", "--warmup", "0", "--no-memory", "--no-ceiling", "--json",
         "--quiet"]
    )  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["config"]["method"] for r in rows] == ["tome", "tome-detail", "random"]
    assert len({r["tokens_per_layer"][-1] for r in rows}) == 1  # one budget, three methods
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--methods", "tome,nope"])
    assert exit_info.value.code == 2 and "unknown method 'nope'" in capsys.readouterr().err


def _commands() -> dict:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _parse(argv: list[str]):  # noqa: ANN202 - argparse.Namespace
    return build_parser().parse_args(argv)


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"tokenbudget {tokenbudget.__version__}\n"


def test_help_imports_neither_torch_nor_the_library() -> None:
    """``tokenbudget --help`` and every command's help build without torch, timm, the models or data."""
    code = """
import runpy, sys
sys.argv = ["tokenbudget", "--help"]
try:
    runpy.run_module("tokenbudget", run_name="__main__")
except SystemExit as done:
    assert done.code == 0, done.code
import argparse
from tokenbudget.cli import build_parser
parser = build_parser()
(sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
for command in sub.choices.values():
    command.format_help()
heavy = ("torch", "timm", "tokenbudget.models", "tokenbudget.data", "tokenbudget.evaluate", "tokenbudget.bench")
loaded = [name for name in heavy if name in sys.modules]
print("loaded:", loaded)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: tokenbudget" in done.stdout and "vlm-slots-eval" in done.stdout
    assert done.stdout.strip().endswith("loaded: []"), done.stdout[-300:]


def test_every_option_has_help() -> None:
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, command in _commands().items()
        for action in command._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert not missing, missing


#: commands whose --model is a saved vision-language model folder, not a vision transformer's name
VLM_COMMANDS = {"eval-vlm"}


def test_model_option_names_every_accepted_form() -> None:
    for name, command in _commands().items():
        for action in command._actions:
            if "--model" in action.option_strings and name in VLM_COMMANDS:
                assert "save_pretrained" in action.help, name
            elif "--model" in action.option_strings:
                for form in ("timm", "dinov2_small", "dinov2_small_hf", "hf:", "openclip:", "register_model"):
                    assert form in action.help, (name, form)


@pytest.mark.parametrize(
    "argv, attribute, value",
    [
        (["bench", "--methods", "tome,pool"], "methods", ["tome", "pool"]),
        (["bench", "--method", "tofu"], "methods", ["tofu"]),  # the old spelling, a hidden alias
        (["visualize", "skimage:coffee", "--out", "m.png"], "out", "m.png"),
        (["visualize", "skimage:coffee", "-o", "m.png"], "out", "m.png"),
        (["plan", "--speed-batch-size", "4"], "speed_batch_size", 4),
        (["vlm-select-eval", "--tokens", "8,16"], "tokens", [8, 16]),
        (["vlm-select-eval", "--n-scenes", "20"], "n_scenes", 20),
        (["vlm-compress-eval", "--tokens", "2,8"], "tokens", [2, 8]),
        (["vlm-compress-eval", "--token-file", "t.pt"], "token_file", "t.pt"),
        (["vlm-compress-eval", "--n-scenes", "12"], "n_scenes", 12),
        (["vlm-compress-eval"], "n_scenes", 0),
        (["train-compressor", "--kind", "resampler", "--token-file", "t.pt"], "token_file", "t.pt"),
        (["vlm-slots-eval", "--n-scenes", "4"], "n_scenes", 4),
        (["vlm-slots-eval", "--tokens", "16"], "tokens", [16]),
        (["vlm-slots-eval", "--saccade-tokens", "12,16"], "saccade_tokens", [12, 16]),
        (["eval-budget-predictor", "--n-test", "8"], "n_test", 8),
        (["eval", "--methods", "tome"], "methods", ["tome"]),
    ],
)
def test_one_spelling_per_idea(argv, attribute, value) -> None:
    assert getattr(_parse(argv), attribute) == value


@pytest.mark.parametrize(
    "argv",
    [
        ["vlm-select-eval", "--ks", "8"],
        ["vlm-select-eval", "--scenes", "20"],
        ["vlm-compress-eval", "--k", "16"],  # would have been read as --knn had abbreviations been allowed
        ["vlm-compress-eval", "--scenes"],
        ["train-compressor", "--kind", "resampler", "--tokens", "train.pt"],
        ["vlm-slots-eval", "--num-scenes", "4"],
        ["vlm-slots-eval", "--totals", "16"],
        ["eval-budget-predictor", "--max-test", "8"],
        ["visualize", "skimage:coffee", "--output", "m.png"],
        ["bench", "--warm", "1"],  # no abbreviations
        # commands that use no test (or no train) images take no option for them
        ["train-exits", "--n-test", "10"],
        ["train-budget-predictor", "--n-test", "10"],
        ["train-predictor", "--n-test", "10"],
        ["entropy", "--n-train", "10"],
    ],
)
def test_old_spellings_and_unused_options_are_refused(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_a_token_file_given_as_token_budgets_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(["vlm-compress-eval", "--tokens", "eval.pt"])
    assert exit_info.value.code == 2
    assert "argument --tokens: expected comma-separated integers, got 'eval.pt'" in capsys.readouterr().err


def test_errors_are_one_line_on_stderr(capsys) -> None:
    from tokenbudget.models import register_model

    def broken(**_):  # noqa: ANN003, ANN202
        raise TypeError("this factory takes no img_size")

    register_model("cli_test_broken_factory", broken)
    assert main(["bench", "--model", "cli_test_broken_factory"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "tokenbudget bench: error: this factory takes no img_size\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "skimage", "--n-train", "5000"], "skimage-crops holds"),
        (["--data", "skimage", "--n-test", "5000"], "skimage-crops holds"),
        (["--data", "FOLDER", "--n-train", "13"], "holds 10 train and 2 test images"),
    ],
)
def test_a_set_holding_fewer_images_than_asked_is_refused(argv, message, tmp_path, capsys) -> None:
    folder = str(write_two_class_folder(tmp_path / "data"))
    argv = [folder if a == "FOLDER" else a for a in argv]
    common = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--methods", "tome", "--keep", "0.5"]
    assert main(["eval", *common, *argv]) == 2
    assert message in capsys.readouterr().err


def test_n_train_and_n_test_subsample_and_say_so(tmp_path, capsys) -> None:
    folder = str(write_two_class_folder(tmp_path / "data"))
    args = _parse(["eval", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--data", folder,
                   "--n-train", "7", "--n-test", "1"])  # fmt: skip
    _, data = model_and_data(args)
    assert (len(data.train_images), len(data.test_images)) == (7, 1)
    assert capsys.readouterr().err == ""  # got what was asked: nothing to say
    args = _parse(
        ["eval", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--n-train", "15", "--n-test", "10"]
    )
    _, data = model_and_data(args)
    assert (len(data.train_images), len(data.test_images)) == (10, 10)
    err = capsys.readouterr().err
    assert "--n-train 15 gives 10 fashion-mnist train images" in err and "--n-test" not in err


def test_commands_load_only_the_splits_they_use(tmp_path) -> None:
    folder = str(write_two_class_folder(tmp_path / "data"))
    common = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--data", folder]
    _, data = model_and_data(_parse(["train-predictor", *common]))
    assert (len(data.train_images), len(data.test_images)) == (10, 0)
    _, data = model_and_data(_parse(["entropy", *common]))
    assert (len(data.train_images), len(data.test_images)) == (0, 2)


def test_visualize_help_speaks_of_one_picture(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["visualize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one method and one budget per picture" in text and "interleaved" not in text
