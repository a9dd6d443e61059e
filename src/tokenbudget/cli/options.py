"""Options and helpers that the command groups share; each shared option is declared here, once.

Adders put options on a command's parser with one spelling and one help text:
:func:`add_model_options` (``--model``, ``--pretrained``, ``--img-size``), :func:`add_data_options`
(``--data``, ``--n-train``, ``--n-test``, ``--test-fraction``, ``--seed``), :func:`add_run_options`
(``--threads``, ``--quiet``, ``--json``), :func:`add_seed`, :func:`add_out`,
:func:`add_trainer_output` (a trainer's ``--out`` STEM), :func:`add_training_options` (``--steps``,
``--batch-size``, ``--lr``, ``--max-minutes``), the scene and token options of the VLM commands
(:func:`add_n_scenes`, :func:`add_tokens`, :func:`add_prompt`); the method/budget group is in
:mod:`.methods`. Helpers turn parsed options into what the library takes: :func:`model_and_data`,
:func:`load_model`, :func:`max_seconds`, :func:`set_threads`, :func:`progress`.

Nothing here imports torch, timm or the model and data modules at module level, so ``tokenbudget
--help`` builds every parser without them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

MODEL_HELP = (
    "the model: a timm name (random weights unless --pretrained), dinov2_small (the embedded offline "
    "DINOv2 ViT-S/14, real weights), dinov2_small_hf (the same weights as a Hugging Face Dinov2Model), "
    "hf:REPO (transformers.AutoModel), openclip:ARCH[:TAG] (an OpenCLIP image tower), or a name added "
    "with tokenbudget.models.register_model"
)
DATA_HELP = (
    "labelled images: fashion-mnist (the offline copy), skimage (crops of the bundled photos, labelled by "
    "photo), mix (the heterogeneous dev mix: clothing, textures, photo crops, scenes, inspection), anomaly / "
    "anomaly-small (textures labelled by a small flaw: tokenbudget make-anomaly), textures "
    "(woven fabrics: nominal, a tiny local defect, a subtle global change: tokenbudget make-textures), or a "
    "directory: Fashion-MNIST IDX files, or CLASS/ image folders (split by --test-fraction unless it has "
    "train/ and test/)"
)
_COUNT_HELP = (
    "{split} images (default: {default} of fashion-mnist, anomaly or textures, a class-balanced subset; all of skimage "
    "or a folder, where a number takes a seeded subset and more than the set holds is an error)"
)


def add_command(
    sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int], help: str
) -> argparse.ArgumentParser:
    """A command's parser: ``help`` in the command list and atop its own ``--help``; options must be
    spelled out (no abbreviations, so that adding an option never changes what an old one means)."""
    parser = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
    parser.set_defaults(func=func)
    return parser


# -- parsing helpers ---------------------------------------------------------------------------------


def _numbers(text: str, kind: type, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """``"8,16"`` -> ``[8, 16]``: a comma list of non-negative integers."""
    values = _numbers(text, int, "integers")
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    """``"0.5,0.25"`` -> ``[0.5, 0.25]``: a comma list of numbers."""
    return _numbers(text, float, "numbers")


def name_list(text: str) -> list[str]:
    """``"avg, max"`` -> ``["avg", "max"]``: a comma list of names (checked by the command)."""
    return [v.strip() for v in text.split(",") if v.strip()]


# -- shared options ----------------------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser, *, default: str = "dinov2_small") -> None:
    """``--model``, ``--pretrained``, ``--img-size``; :func:`load_model` reads them."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default, help=f"{MODEL_HELP} (default: {default})")
    group.add_argument(
        "--pretrained",
        action="store_true",
        help="timm names: load timm's pretrained weights (needs a network or timm's download cache)",
    )
    group.add_argument(
        "--img-size", type=int, default=None, help="input side in px (default: the model's own)"
    )


def add_data_options(
    parser: argparse.ArgumentParser,
    *,
    n_train: int | None,
    n_test: int | None,
    data_note: str = "",
) -> None:
    """``--data``, ``--n-train`` / ``--n-test`` (left out where ``None``: the command does not use that
    split), ``--test-fraction`` and ``--seed``; :func:`model_and_data` reads them."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", default="fashion-mnist", help=f"{DATA_HELP}{data_note} (default: fashion-mnist)"
    )
    for split, default in (("train", n_train), ("test", n_test)):
        if default is not None:
            add_n_images(group, split, _COUNT_HELP.format(split=split, default=default))
    group.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="image folders without train/ and test/: the share of each class held out for test (0.2)",
    )
    add_seed(parser, group, "seed of the data subsets and of everything random in the command (default 0)")
    parser.set_defaults(default_sizes=(n_train or 0, n_test or 0))


def add_n_images(parser: Any, split: str, help: str) -> None:
    """``--n-train`` or ``--n-test`` (``split``): how many images (or scenes) of that split to use;
    ``None`` when not given."""
    parser.add_argument(f"--n-{split}", type=_count, default=None, help=help)


def add_seed(parser: argparse.ArgumentParser, group: Any = None, help: str | None = None) -> None:
    """``--seed`` (on ``group`` when given)."""
    (group or parser).add_argument(
        "--seed", type=int, default=0, help=help or "seed of everything random in the command (default 0)"
    )


def add_run_options(
    parser: argparse.ArgumentParser,
    *,
    threads: int | None = None,
    quiet: str | None = "no progress bar",
    json: str | None = "print JSON instead of a table",
) -> None:
    """``--threads`` and, unless their help is ``None``, ``--quiet`` and ``--json``."""
    group = parser.add_argument_group("run")
    group.add_argument(
        "--threads",
        type=int,
        default=threads,
        help=f"torch CPU threads (default: {threads or 'torch decides'}; 1 is fastest on a busy machine)",
    )
    if quiet is not None:
        group.add_argument("--quiet", action="store_true", help=quiet)
    if json is not None:
        group.add_argument("--json", action="store_true", help=json)


def add_out(
    parser: argparse.ArgumentParser, default: str | None, help: str, *flags: str, shown: str | None = None
) -> None:
    """``--out`` (and short ``flags``): where the command writes its result; ``shown`` is the default
    the help names where ``default`` is ``None`` (the command then chooses)."""
    shown = default if default is not None else shown
    parser.add_argument(
        *flags, "--out", default=default, help=help + (f" (default: {shown})" if shown else "")
    )


def add_trainer_output(
    parser: argparse.ArgumentParser, stem: str | None, *, threads: int | None = None, shown: str | None = None
) -> None:
    """A trainer's ``--out`` STEM (it writes STEM.safetensors and STEM.json; ``shown`` is the default
    the help names where ``stem`` is ``None``) and its run options (``--threads``, ``--quiet``)."""
    add_out(parser, stem, "output stem: writes STEM.safetensors and STEM.json", shown=shown)
    add_run_options(parser, threads=threads, json=None)


def add_training_options(
    parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float, batch_help: str = ""
) -> None:
    """``--steps``, ``--batch-size``, ``--lr``, ``--max-minutes`` of a trainer; see :func:`max_seconds`."""
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    group.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"{batch_help or 'items'} per step (default {batch_size})",
    )
    group.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr:g})")
    group.add_argument("--max-minutes", type=float, default=30.0, help="stop after this long (default 30)")


# -- from options to library arguments ----------------------------------------------------------------


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when ``--threads`` was given (:func:`~tokenbudget.cli.main` calls it
    before every command)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def max_seconds(args: argparse.Namespace) -> float:
    """``--max-minutes`` in seconds, checked."""
    if args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    return 60 * args.max_minutes


def load_model(args: argparse.Namespace):  # noqa: ANN201 - nn.Module
    """The model ``--model`` / ``--pretrained`` / ``--img-size`` name."""
    from ..models import load_model as load

    model = load(args.model, pretrained=args.pretrained, img_size=args.img_size)
    _remember_geometry(args, model)
    return model


def _geometry_file(args: argparse.Namespace):  # noqa: ANN202 - pathlib.Path
    import os
    import re
    from pathlib import Path

    env = os.environ.get("TOKENBUDGET_CACHE")  # the cache folder of tokenbudget.data.cache
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "tokenbudget"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{args.model}-{args.img_size or 'default'}")
    return root / "geometry" / f"{name}.json"


def _remember_geometry(args: argparse.Namespace, model) -> None:  # noqa: ANN001
    """Write the loaded model's geometry (:class:`~tokenbudget.bench.reach.Geometry`) to the cache,
    so that a later command can check a budget against it before loading the model."""
    import json

    from ..bench.reach import geometry_of

    try:
        data = {"model": args.model, "img_size": args.img_size, **geometry_of(model).to_dict()}
        path = _geometry_file(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except (ValueError, OSError):
        pass  # no default input, or an unwritable cache: the check then loads the model


def cached_geometry(args: argparse.Namespace):  # noqa: ANN201 - Geometry | None
    """The geometry of the model ``--model`` / ``--img-size`` name, as the last command that loaded
    it recorded (``None`` when none did): enough to compute a schedule's FLOPs without the model."""
    import json

    from ..bench.reach import Geometry

    try:
        data = json.loads(_geometry_file(args).read_text())
        return Geometry.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def image_side(model) -> int:  # noqa: ANN001
    """The side of the model's default input in px."""
    from ..adapters import find_adapter

    size = find_adapter(model).image_size
    if size is None:
        raise ValueError("the model has no default input size; give --img-size")
    return size[0]


def model_and_data(args: argparse.Namespace, model=None):  # noqa: ANN001, ANN201 - (nn.Module, EvalData)
    """The model the command line names (``model`` when already loaded) and its data, preprocessed for it.

    A split the command has no ``--n-*`` option for is not loaded (0 images). When the set gives
    another number of images than ``--n-train`` / ``--n-test`` asked for (balanced subsets round
    down to a multiple of the classes), a note on stderr says what was used.
    """
    from ..data.eval_sets import load_eval_data

    model = load_model(args) if model is None else model
    asked = {split: getattr(args, f"n_{split}", 0) for split in ("train", "test")}
    data = load_eval_data(
        args.data,
        image_side(model),
        *_normalization(model),
        n_train=asked["train"],
        n_test=asked["test"],
        test_fraction=args.test_fraction,
        seed=args.seed,
        default_sizes=args.default_sizes,
    )
    for split, images in (("train", data.train_images), ("test", data.test_images)):
        if asked[split] and asked[split] != len(images):
            print(
                f"tokenbudget {args.command}: note: --n-{split} {asked[split]} gives {len(images)} {data.name} "
                f"{split} images (the subset is balanced across classes)",
                file=sys.stderr,
            )
    return model, data


def _normalization(model) -> tuple[Sequence[float], Sequence[float]]:  # noqa: ANN001
    from ..data.images import model_normalization

    return model_normalization(model)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images, got {text!r}")
    return value


# -- progress -------------------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, disable: bool):  # noqa: ANN201 - a tqdm bar or a silent stand-in
    """A progress bar on stderr (tqdm, when installed), or one that shows nothing."""
    if disable:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def step_progress(bar, keys: Sequence[str] = ("loss",)) -> Callable[[int, float | dict], None]:  # noqa: ANN001
    """The ``progress(step, losses)`` callback of a trainer: one tick of ``bar`` per step, with the loss
    (a float, or the ``keys`` of a dict of them) as the bar's postfix (floats to 4 decimals)."""

    def on_step(step: int, losses: float | dict) -> None:
        bar.update(1)
        if hasattr(bar, "set_postfix"):
            values = {k: losses[k] for k in keys} if isinstance(losses, dict) else {"loss": losses}
            bar.set_postfix({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in values.items()})

    return on_step


# -- options of the commands on cached scene and token sets ----------------------------------------------


#: the cached multi-object test scenes the VLM commands score
TEST_SCENES = 300


def check_n_scenes(n_scenes: int, minimum: int = 1) -> int:
    """``--n-scenes``, checked against the cached test scenes."""
    if not minimum <= n_scenes <= TEST_SCENES:
        raise ValueError(
            f"--n-scenes must be in [{minimum}, {TEST_SCENES}] (the cached test scenes), got {n_scenes}"
        )
    return n_scenes


def add_n_scenes(parser: argparse.ArgumentParser, default: int, note: str = "") -> None:
    """``--n-scenes``: how many of the 300 cached multi-object test scenes to score (the first N)."""
    parser.add_argument(
        "--n-scenes",
        type=int,
        default=default,
        help=f"score the first N of the 300 cached test scenes{note} (default {default})",
    )


def add_tokens(parser: Any, default: Sequence[int] | None, what: str = "tokens kept") -> None:
    """``--tokens``: a comma list of token budgets."""
    shown = f" (default {','.join(str(t) for t in default)})" if default else ""
    parser.add_argument(
        "--tokens",
        type=int_list,
        default=list(default) if default else None,
        help=f"{what}; comma list{shown}",
    )


def add_prompt(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--prompt``: the template of a class's text query."""
    parser.add_argument(
        "--prompt",
        default="a photo of a {}",
        help=f"text query template, {{}} the class name{note} (default 'a photo of a {{}}')",
    )
