"""What the thread gate of a patch costs per forward: a patched model with its gate against the same
patched model whose gate is switched off (no-op enter/leave, model hooks detached), interleaved in
one process. Prints the per-forward time of both, the difference in microseconds and the ratio.

    PYTHONPATH=src python scripts/experiments/gate_overhead.py [--model tiny|vit_tiny_patch16_224] [--batch 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import tokenbudget as tb
from tokenbudget.bench.throughput import measure_interleaved
from tokenbudget.patch import _context


def _gateless(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the patched ``model`` whose gate does nothing."""
    clone = copy.deepcopy(model)
    gate = _context(clone).gate
    gate.detach()
    gate.enter = lambda blocks=False: True
    gate.leave = lambda blocks=False: None
    return clone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny", help="'tiny' (32 px, 4 blocks, width 48) or a timm name")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "tiny":
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=4,
            embed_dim=48,
            depth=4,
            num_heads=3,
        )
        size = 32
    else:
        model = timm.create_model(args.model, pretrained=False)
        size = model.patch_embed.img_size[0]
    model.eval()
    tb.apply(model, tb.ToMe(r=8))
    gateless = _gateless(model)
    x = torch.randn(args.batch, 3, size, size)

    def run(m: torch.nn.Module):  # noqa: ANN202
        def call() -> None:
            with torch.inference_mode():
                m(x)

        return call

    times = measure_interleaved(
        {"gate": run(model), "no gate": run(gateless)}, torch.device("cpu"), samples=args.samples
    )
    gate, none = statistics.median(times["gate"]), statistics.median(times["no gate"])
    diffs = [a - b for a, b in zip(times["gate"], times["no gate"], strict=True)]
    spread = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    print(
        f"model {args.model}, batch {args.batch}, {args.samples} interleaved samples, {args.threads} thread(s)"
    )
    print(f"with gate    {gate * 1e3:8.3f} ms per forward (median)")
    print(f"without gate {none * 1e3:8.3f} ms per forward (median)")
    # The gate's own work per forward (a model call entering and leaving, its blocks entering and
    # leaving), timed alone: what the end-to-end difference above cannot resolve on a busy machine.
    g = _context(model).gate
    reps = 20000
    start = time.perf_counter()
    for _ in range(reps):
        g.enter()
        g.enter(blocks=True)
        g.leave(blocks=True)
        g.leave()
    alone = (time.perf_counter() - start) / reps
    print(f"gate bookkeeping alone: {alone * 1e6:.2f} us per forward ({reps} repetitions)")
    print(
        f"difference   {(gate - none) * 1e6:8.1f} us (median of paired samples "
        f"{statistics.median(diffs) * 1e6:.1f} us, s.e. of the mean {spread * 1e6:.1f} us); "
        f"ratio {gate / none:.4f}"
    )


if __name__ == "__main__":
    main()
