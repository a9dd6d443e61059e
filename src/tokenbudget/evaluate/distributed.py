"""Data-parallel feature extraction under ``torchrun``: shard the images, gather the features.

Without a process group (``WORLD_SIZE`` unset or 1) every helper falls back to the single
process: rank 0 of 1, the whole range as the shard, and the local rows as the gathered result.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_active() -> bool:
    """Whether a process group of more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def maybe_init_distributed() -> bool:
    """Join the process group ``torchrun`` describes (``nccl`` with CUDA, else ``gloo``) if there is one.

    Returns whether distributed execution is active. A group already initialized by the caller is used
    as it is.
    """
    if not dist.is_available():
        return False
    if not dist.is_initialized() and _env_world_size() > 1:
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
            dist.init_process_group(backend="nccl")
        else:
            dist.init_process_group(backend="gloo")
        atexit.register(_destroy)
    return is_active()


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous ``[start, stop)`` of ``n`` items that ``rank`` of ``world`` takes.

    Shards differ in size by at most one; the first ``n % world`` ranks take the larger ones.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _collective_device(local: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if local.device.type != "cpu" else local.device


def gather_rows(local: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate every rank's ``[n_i, ...]`` block in rank order (on every rank).

    Blocks may differ in length (uneven shards, empty ones included): each is padded to the
    longest, gathered, and trimmed. The result has ``n_total`` rows, in the order a single process
    extracting the whole range would produce; without a process group it is ``local`` itself.
    """
    if not is_active():
        if len(local) != n_total:
            raise ValueError(f"expected {n_total} rows, got {len(local)}")
        return local
    device = _collective_device(local)
    world = dist.get_world_size()
    size = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    if sum(counts) != n_total:
        raise ValueError(f"gathered {sum(counts)} rows across {world} ranks, expected {n_total}")
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded.contiguous())
    out = torch.cat([b[:c] for b, c in zip(blocks, counts, strict=True)])
    return out.to(local.device)


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` from rank ``src`` on every rank (itself without a process group)."""
    if not is_active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_active():
        dist.barrier()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s, in place.

    Ranks that built a model with random weights (no ``--pretrained``, no shared seed) would
    otherwise embed their shards with different networks.
    """
    if not is_active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            device = _collective_device(tensor)
            data = tensor.detach().to(device).contiguous()
            dist.broadcast(data, src=src)
            if data is not tensor:
                tensor.copy_(data.to(tensor.device))
