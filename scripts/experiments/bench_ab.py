"""This checkout's ToMe against another version of tokenbudget, in one process, interleaved.

The other version is imported under another package name from a copy of its ``src/tokenbudget``
(e.g. ``git archive <commit> src/tokenbudget | tar x -C /tmp/old``). Models: the unpatched model,
ToMe of the other version, ToMe of this one (cost model off and on), and the free-reduction
ceiling of this one. On one thread the clock is the thread's CPU time, which other processes on a
busy machine inflate far less than wall time. ``--parts`` adds the ceiling with the
proportional-attention bias and with the key capture, to split what a merge costs. Usage:

    git archive 1944647 src/tokenbudget | tar x -C /tmp/old
    PYTHONPATH=src python scripts/experiments/bench_ab.py --other /tmp/old/src/tokenbudget --threads 1 --r 16
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import tokenbudget as tb
from tokenbudget.bench.ceiling import FreeReduction, free_reduction_copy
from tokenbudget.models import load_model
from tokenbudget.patch import _context


def import_other(path: Path, name: str = "tokenbudget_other") -> object:
    """The package at ``path`` (a ``tokenbudget`` source directory) imported as ``name``."""
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py", submodule_search_locations=[str(path)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class BiasedFreeReduction(FreeReduction):
    """The free slice, with sizes of 1 so every later block runs the proportional-attention bias."""

    prop_attn = True

    def reduce(self, x: torch.Tensor, keys: object, state: object, layer: int) -> torch.Tensor:
        x = super().reduce(x, keys, state, layer)
        state.size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device)
        return x


class KeyedFreeReduction(FreeReduction):
    """The free slice, with the attention keys captured and summed over heads as ToMe's are."""

    needs_keys = True


def _with_strategy(model: torch.nn.Module, cls: type) -> torch.nn.Module:
    """``model`` (a free-reduction copy) with its strategy's class swapped for ``cls``."""
    _context(model).strategy.__class__ = cls
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--other", type=Path, required=True, help="another version's src/tokenbudget directory"
    )
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also the ceiling with the proportional-attention bias, and with the key capture on",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    other = import_other(args.other)
    model = load_model(args.model)
    this = tb.apply(copy.deepcopy(model), tb.ToMe(r=args.r))
    models = {
        "unpatched": model,
        "other ToMe": other.apply(copy.deepcopy(model), other.ToMe(r=args.r)),
        "this ToMe": this,
        "this cost=auto": tb.apply(copy.deepcopy(model), tb.ToMe(r=args.r, cost_model="auto")),
        "ceiling": free_reduction_copy(model, this),
    }
    if args.parts:
        models["ceiling+bias"] = _with_strategy(free_reduction_copy(model, this), BiasedFreeReduction)
        models["ceiling+keys"] = _with_strategy(free_reduction_copy(model, this), KeyedFreeReduction)
    height, width = model.patch_embed.img_size
    x = torch.randn(args.batch_size, 3, height, width)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in models.values():
            for _ in range(3):
                m(x)
        names = list(models)
        for i in range(args.samples):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                start = clock()
                models[name](x)
                times[name].append(clock() - start)
    merged = tb.last_state(models["this cost=auto"]).merged_per_layer
    print(
        f"{args.model}, r={args.r}, batch {args.batch_size}, {args.threads} thread(s) "
        f"({'thread CPU time' if args.threads == 1 else 'wall time'}), {args.samples} interleaved samples"
    )
    print(f"{'model':<16} {'median ms':>10} {'speedup':>8} {'(IQR)':>12} {'minus ceiling ms':>17}")
    for name, series in times.items():
        ratios = [b / t for b, t in zip(times["unpatched"], series, strict=True)]
        q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        excess = statistics.median(t - c for t, c in zip(series, times["ceiling"], strict=True)) * 1e3
        print(
            f"{name:<16} {statistics.median(series) * 1e3:>10.2f} {med:>7.3f}x {f'{q1:.3f}-{q3:.3f}':>12} {excess:>17.2f}"
        )
    print(f"cost=auto schedule: {merged}")


if __name__ == "__main__":
    main()
