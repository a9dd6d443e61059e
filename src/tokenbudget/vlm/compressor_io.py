"""Files of trained resamplers and autoencoders: ``STEM.safetensors`` (weights) + ``STEM.json`` (config).

``load_compressor(path)`` rebuilds the module from the JSON and loads the weights in one call; a
file of another format, version or kind, or weights that do not fit their config, is refused.
Compatibility with the tokens (width C, patch count) is checked on every ``compress`` call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..parts import load_weights, part_paths, read_part, save_part
from .autoencoder import TokenAutoencoder
from .latent import KINDS, LatentCompressor
from .resampler import Resampler

FORMAT = "tokenbudget-vlm-compressor"
VERSION = 1
_CLASSES = {"resampler": Resampler, "autoencoder": TokenAutoencoder}


def build_compressor(config: dict[str, Any]) -> LatentCompressor:
    """A fresh (untrained) :class:`Resampler` or :class:`TokenAutoencoder` from its config dict."""
    kind = config.get("kind")
    if kind not in _CLASSES:
        raise ValueError(f"unknown compressor kind {kind!r}; use one of {KINDS}")
    return _CLASSES[kind](
        config["dim"],
        tuple(config["grid"]),
        config["k_max"],
        width=config["width"],
        depth=config["depth"],
        heads=config["heads"],
        decoder_depth=config["decoder_depth"],
        num_prefix=config.get("num_prefix", 1),
        info=config.get("info"),
    )


def save_compressor(compressor: LatentCompressor, path: str | Path) -> tuple[Path, Path]:
    """Write ``STEM.safetensors`` and ``STEM.json``; returns both paths."""
    return save_part(
        compressor, {"format": FORMAT, "version": VERSION, **compressor.config()}, path, "VLM compressors"
    )


def load_compressor(path: str | Path, *, kind: str | None = None) -> LatentCompressor:
    """Load a compressor written by :func:`save_compressor` (STEM, STEM.safetensors or STEM.json), in
    eval mode. ``kind``: refuse a file of the other kind ("resampler" or "autoencoder")."""
    hint = "train one with: tokenbudget train-compressor --kind resampler --out PATH"
    meta, state, weights = read_part(path, FORMAT, VERSION, "VLM compressor", hint)
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{part_paths(path)[1]} holds a {meta.get('kind')}, not a {kind}")
    compressor = build_compressor(meta)
    load_weights(compressor, state, weights, "VLM compressor")
    return compressor.eval()
