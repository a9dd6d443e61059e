"""What the explorer computes, without the web: merge pictures, token counts, FLOPs, fidelity, time.

One :class:`Explorer` holds one model and serves every request with it. ``tb.apply`` patches the
model object itself, so a lock makes apply -> forward -> remove one step: concurrent requests
queue (on a CPU they would only share its cores anyway). Outside the lock the model is unpatched.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import io
import statistics
import threading
import time
from collections import OrderedDict
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import find_adapter
from ..bench.throughput import time_once
from ..config import config_class, method_names
from ..data.images import center_crop_resize, preprocess
from ..evaluate import extract_features, fastest_keep, keep_for_flops_speedup
from ..flops import ideal_speedup, model_flops
from ..patch import apply, last_state, remove
from ..viz import draw_merge_groups, merge_groups
from .images import ImageStore

BUDGET_KINDS = ("keep", "speedup")


def merging_methods() -> list[str]:
    """Registered methods that can draw merge groups: a per-layer budget (``keep``) and
    ``trace_source``; ``tome-optimal`` only when scipy is installed."""
    names = []
    for name in method_names():
        fields = {f.name for f in dataclasses.fields(config_class(name))}
        if not {"keep", "trace_source"} <= fields:
            continue
        if name == "tome-optimal" and importlib.util.find_spec("scipy") is None:
            continue  # its exact assignment needs scipy (tokenbudget[optimal])
        names.append(name)
    return names


def png_data_url(picture: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URL of an [H, W, 3] uint8 picture."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Explorer:
    """Merge ``model``'s tokens on one image with one method at one budget, and report what it did.

    Args:
        model: a vision transformer with an adapter (timm, Hugging Face, OpenCLIP) and a default
            input size and patch grid.
        model_name: how the page names the model.
        max_uploads: uploaded images kept (oldest dropped first).
        max_cached_images: images whose input tensor and unreduced feature are kept.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        model_name: str = "model",
        max_uploads: int = 16,
        max_cached_images: int = 32,
    ) -> None:
        adapter = find_adapter(model)
        if adapter.image_size is None or adapter.grid is None:
            raise ValueError(
                "the explorer needs a model with a default input size and patch grid (e.g. a timm ViT "
                "built for one size); build it with img_size=..."
            )
        self.model = model.eval()
        self.adapter = adapter
        self.model_name = model_name
        self.images = ImageStore(max_uploads)
        self.methods = merging_methods()
        self.min_keep, self.max_speedup = fastest_keep(model)
        self._max_cached = max_cached_images
        self._cache: OrderedDict[str, tuple[np.ndarray, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # apply / forward / remove, and the caches
        self._keep_for_speedup = lru_cache(maxsize=256)(lambda s: keep_for_flops_speedup(self.model, s))

    def close(self) -> None:
        """Wait for the forward in progress, then take the model for good: a request still arriving
        waits forever, so a process that exits next never stops inside a forward (which aborts
        the interpreter)."""
        self._lock.acquire()

    # -- what the page needs to draw its controls ------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The model, the methods, the sample images and the budget ranges."""
        dims = self.adapter.block_dims()
        tokens = self.adapter.default_num_tokens
        return {
            "model": self.model_name,
            "image_size": list(self.adapter.image_size),
            "grid": list(self.adapter.grid),
            "num_prefix": self.adapter.num_prefix,
            "num_layers": self.adapter.num_layers,
            "input_tokens": tokens,
            "gflops_full": model_flops(tokens, [tokens] * len(dims), dims) / 1e9,
            "methods": self.methods,
            "samples": self.images.sample_ids(),
            "keep_range": [self.min_keep, 1.0],
            "speedup_range": [1.0, self.max_speedup],
            "threads": torch.get_num_threads(),
        }

    # -- checking a request ----------------------------------------------------------------------
    def check_method(self, method: Any) -> str:
        if method not in self.methods:
            raise ValueError(f"unknown method {method!r}; the explorer draws {', '.join(self.methods)}")
        return method

    def keep_of(self, kind: Any, value: Any) -> float:
        """The ``keep`` of a budget given as a keep fraction or a FLOPs-ideal speedup."""
        if kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, got {kind!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"the budget value must be a number, got {value!r}")
        if kind == "keep":
            if not self.min_keep <= value <= 1.0:
                raise ValueError(
                    f"keep {value} is out of range: choose a fraction of tokens in "
                    f"[{self.min_keep:.4f}, 1] (fewer cannot be reached, at most half merge per block)"
                )
            return float(value)
        if not 1.0 <= value <= self.max_speedup:
            raise ValueError(
                f"a FLOPs-ideal speedup of {value} is out of range: choose one in [1, {self.max_speedup:.2f}]"
            )
        return self._keep_for_speedup(round(float(value), 4))

    # -- images ----------------------------------------------------------------------------------
    def add_upload(self, data: bytes) -> str:
        """Keep an uploaded image (its bytes); returns its id. ``ValueError`` for bad files."""
        with self._lock:
            return self.images.add_upload(data)

    def _prepared(self, image_id: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(crop [H, W, 3] uint8, model input [1, 3, H, W], unreduced feature [2C]) of an image.
        Call with the lock held (the model is unpatched then)."""
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id]
        image = self.images.get(image_id)
        size = self.adapter.image_size[0]
        rows, cols = self.adapter.grid
        crop = center_crop_resize(image, size)
        # The picture's side is a multiple of the grid (equal to the input when patches tile it).
        shown = np.asarray(
            crop.resize((cols * self.adapter.patch_size[1], rows * self.adapter.patch_size[0]))
        )
        x = preprocess(image, size, *self.adapter.normalization()).unsqueeze(0)
        full = extract_features(self.model, x)[0]
        self._cache[image_id] = (shown, x, full)
        while len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return self._cache[image_id]

    def crop(self, image_id: str) -> np.ndarray:
        """[H, W, 3] uint8: the centre crop the model sees."""
        with self._lock:
            return self._prepared(image_id)[0]

    # -- one budget ------------------------------------------------------------------------------
    def run(self, image_id: str, method: str, kind: str, value: float) -> dict[str, Any]:
        """Merge with ``method`` at the budget (``kind`` ``"keep"`` or ``"speedup"``, ``value``) on
        one image: one patched forward. Returns the merge picture (PNG data URL), tokens after each
        block (input first), FLOPs, and the cosine similarity of the reduced feature to the full one."""
        start = time.perf_counter()
        method = self.check_method(method)
        keep = self.keep_of(kind, value)
        config = config_class(method)(keep=keep, trace_source=True)
        with self._lock:
            shown, x, full = self._prepared(image_id)
            apply(self.model, config)
            try:
                reduced = extract_features(self.model, x)[0]
                state = last_state(self.model)
            finally:
                remove(self.model)
        groups = merge_groups(state.token_map[0], state.num_prefix, state.grid)
        tokens = state.real_tokens_per_layer[0].tolist()
        dims = self.adapter.block_dims()
        width = reduced.shape[0] // 2
        return {
            "image": image_id,
            "method": method,
            "keep": keep,
            "picture": png_data_url(draw_merge_groups(shown, groups)),
            "tokens_per_layer": [state.input_tokens, *tokens],
            "groups": int(len(np.unique(groups))),
            "ideal_speedup": ideal_speedup(state.input_tokens, tokens, dims),
            "gflops": model_flops(state.input_tokens, tokens, dims) / 1e9,
            "cosine": F.cosine_similarity(reduced, full, dim=0).item(),
            "cosine_class": F.cosine_similarity(reduced[:width], full[:width], dim=0).item(),
            "cosine_mean": F.cosine_similarity(reduced[width:], full[width:], dim=0).item(),
            "request_ms": (time.perf_counter() - start) * 1e3,
        }

    def measure_speed(
        self, image_id: str, method: str, kind: str, value: float, samples: int = 5
    ) -> dict[str, Any]:
        """Seconds per forward (batch 1) of the model unpatched and patched with ``method`` at the
        budget, measured interleaved (``samples`` pairs after one warm-up each, order alternating).
        The speedup is the median of the per-pair ratios, with their quartiles."""
        method = self.check_method(method)
        keep = self.keep_of(kind, value)
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= 50:
            raise ValueError(f"samples must be an int in [1, 50], got {samples!r}")
        config = config_class(method)(keep=keep)
        device = next(self.model.parameters()).device
        times: dict[str, list[float]] = {"unpatched": [], "patched": []}
        with self._lock:
            _, x, _ = self._prepared(image_id)

            def forward() -> None:
                with torch.inference_mode():
                    self.adapter.features(x)

            def timed(name: str, keep_sample: bool) -> None:
                if name == "patched":
                    apply(self.model, config)
                try:
                    seconds = time_once(forward, device, 1)
                finally:
                    remove(self.model)
                if keep_sample:
                    times[name].append(seconds)

            timed("unpatched", False)
            timed("patched", False)
            for i in range(samples):
                for name in ("unpatched", "patched") if i % 2 == 0 else ("patched", "unpatched"):
                    timed(name, True)
        ratios = sorted(a / b for a, b in zip(times["unpatched"], times["patched"], strict=True))
        quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        return {
            "image": image_id,
            "method": method,
            "keep": keep,
            "samples": samples,
            "unpatched_ms": statistics.median(times["unpatched"]) * 1e3,
            "patched_ms": statistics.median(times["patched"]) * 1e3,
            "speedup": quartiles[1],
            "speedup_quartiles": [quartiles[0], quartiles[2]],
            "threads": torch.get_num_threads(),
        }
