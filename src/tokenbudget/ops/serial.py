"""Run a small piece of tensor work on one intra-op thread.

ATen splits an elementwise, reduction or index-copy operation over its intra-op thread pool once
the operation has more than about 32768 elements. A merging block at batch 1 is a dozen
operations just above that size (ViT-S: 197 x 384 = 75k elements), each worth a few microseconds
of work: split over threads, each one pays a fork and join of the pool, which costs more than it
saves on an idle machine and up to milliseconds when other processes hold the cores (measured
here: ``index_select`` of 181 rows of 384 floats took 22 us on one thread and 790 us on two, on a
busy 2-core machine). :class:`SmallWork` runs such work on one thread and gives the thread count
back afterwards.

``torch.set_num_threads`` sets OpenMP's per-thread count (and MKL's thread-local one), so other
Python threads, and their concurrent forwards, keep theirs.
"""

from __future__ import annotations

from typing import Any

import torch

#: work on tensors of at most this many elements runs on one thread (batch 1 of ViT-S/B/L at 224 px:
#: 75k, 151k, 202k elements); ``0`` turns :class:`SmallWork` off
SERIAL_MAX_ELEMENTS = 1 << 18


class SmallWork:
    """Context manager: one intra-op thread while active, when the work on ``tensor`` is small.

    ``tensor`` is the largest tensor the work touches. Does nothing for tensors off the CPU, with
    more than :data:`SERIAL_MAX_ELEMENTS` elements, when torch already runs one thread, or under
    ``torch.compile`` tracing (the compiled graph has no thread calls).
    """

    __slots__ = ("threads",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.threads = 0
        if (
            tensor.device.type == "cpu"
            and tensor.numel() <= SERIAL_MAX_ELEMENTS
            and not torch.compiler.is_compiling()
        ):
            threads = torch.get_num_threads()
            if threads > 1:
                self.threads = threads

    def __enter__(self) -> SmallWork:
        if self.threads:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
