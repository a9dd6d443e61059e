"""Data-parallel ``evaluate`` under torchrun (2 gloo processes on the CPU) and its helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tokenbudget.evaluate import distributed as dist_utils

COMPARED = (
    "method",
    "keep",
    "config",
    "knn_acc",
    "linear_acc",
    "cosine",
    "final_tokens",
    "flops_ratio",
    "knn_k",
)

SCRIPT = textwrap.dedent(
    """
    import json, os, sys

    import torch
    from timm.models.vision_transformer import VisionTransformer

    from tokenbudget.data.eval_sets import EvalData

    from tokenbudget.evaluate.quality import evaluate
    from tokenbudget.evaluate.features import extract_features

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:  # other weights on the other ranks: evaluate must use rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)

    def images(n, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 2
        x = torch.randn(n, 3, 32, 32, generator=g) + (labels.float() * 2 - 1)[:, None, None, None] * 0.04
        return x, labels

    tr_x, tr_y = images(30, 0)
    te_x, te_y = images(14, 1)
    rows = evaluate(
        model, EvalData("toy", tr_x, tr_y, te_x, te_y), ("tome", "random", "pool"), (1.0, 0.5),
        batch_size=4, k=5, speed_batch_size=2, speed_samples=1,
    )
    with open(os.path.join(sys.argv[1], f"out_rank{rank}.json"), "w") as fh:
        json.dump([r.to_dict() for r in rows], fh)
    # Gathered features (every rank holds all of them), in single-process order, with an uneven last batch.
    torch.save(extract_features(model, te_x, batch_size=3), os.path.join(sys.argv[1], f"features{rank}.pt"))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compared(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in rows]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert [(r["method"], r["keep"]) for r in a] == [(r["method"], r["keep"]) for r in b]
    for x, y in zip(_compared(a), _compared(b), strict=True):
        for key in COMPARED:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], abs=1e-6), key
            else:
                assert x[key] == y[key], key


def test_torchrun_matches_single_process(tmp_path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(script), str(single)], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-4000:]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(script), str(multi)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(f"single + torchrun: {time.perf_counter() - t0:.1f} s")
    reference = json.loads((single / "out_rank0.json").read_text())
    rank0 = json.loads((multi / "out_rank0.json").read_text())
    rank1 = json.loads((multi / "out_rank1.json").read_text())
    assert [r["method"] for r in reference] == ["full", "tome", "random", "pool"]
    _assert_same(rank0, reference)
    _assert_same(rank1, reference)
    reference_features = torch.load(single / "features0.pt")
    assert reference_features.shape == (14, 96)
    for r in (0, 1):
        assert torch.allclose(torch.load(multi / f"features{r}.pt"), reference_features, atol=1e-6)
    # The speed rows come from rank 0 alone and are broadcast: identical on both ranks.
    assert [(r["img_s"], r["speedup"]) for r in rank0] == [(r["img_s"], r["speedup"]) for r in rank1]


@pytest.mark.parametrize("n, world", [(0, 1), (0, 3), (7, 1), (7, 2), (7, 3), (8, 4), (2, 5), (30, 4)])
def test_shard_bounds_cover_contiguously_and_balanced(n: int, world: int) -> None:
    bounds = [dist_utils.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(
        a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    )  # contiguous, in rank order
    lengths = [stop - start for start, stop in bounds]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_shard_bounds_rejects_bad_ranks() -> None:
    with pytest.raises(ValueError):
        dist_utils.shard_bounds(4, 2, 2)
    with pytest.raises(ValueError):
        dist_utils.shard_bounds(4, 0, 0)


def test_single_process_fallbacks(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_utils.maybe_init_distributed() is False
    assert (dist_utils.rank(), dist_utils.world_size(), dist_utils.is_main()) == (0, 1, True)
    local = torch.randn(5, 6)
    assert dist_utils.gather_rows(local, 5) is local
    with pytest.raises(ValueError):
        dist_utils.gather_rows(local, 6)
    assert dist_utils.broadcast_object([1, 2]) == [1, 2]
    dist_utils.barrier()  # a no-op
