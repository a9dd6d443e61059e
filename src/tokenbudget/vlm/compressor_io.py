"""Files of trained resamplers and autoencoders: ``STEM.safetensors`` (weights) + ``STEM.json`` (config).

``load_compressor(path)`` rebuilds the module from the JSON and loads the weights in one call; a
file of another format, version or kind, or weights that do not fit their config, is refused.
Compatibility with the tokens (width C, patch count) is checked on every ``compress`` call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .autoencoder import TokenAutoencoder
from .latent import KINDS, LatentCompressor
from .resampler import Resampler

FORMAT = "tokenbudget-vlm-compressor"
VERSION = 1
_CLASSES = {"resampler": Resampler, "autoencoder": TokenAutoencoder}


def _paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) paths of a compressor given as STEM, STEM.safetensors or STEM.json."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "saving and loading VLM compressors needs safetensors: pip install 'tokenbudget[learned]'"
        ) from None
    return safetensors.torch


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
    weights, config = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in compressor.state_dict().items()}
    _safetensors().save_file(tensors, str(weights), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": VERSION, **compressor.config()}
    config.write_text(json.dumps(meta, indent=2) + "\n")
    return weights, config


def load_compressor(path: str | Path, *, kind: str | None = None) -> LatentCompressor:
    """Load a compressor written by :func:`save_compressor` (STEM, STEM.safetensors or STEM.json), in
    eval mode. ``kind``: refuse a file of the other kind ("resampler" or "autoencoder")."""
    weights, config = _paths(path)
    missing = [str(p) for p in (weights, config) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"no VLM compressor at {path} (missing {', '.join(missing)}); "
            "train one with: tokenbudget train-compressor --kind resampler --out PATH"
        )
    meta = json.loads(config.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{config} is not a tokenbudget VLM compressor config (format {FORMAT} v{VERSION})")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{config} holds a {meta.get('kind')}, not a {kind}")
    compressor = build_compressor(meta)
    state = _safetensors().load_file(str(weights))
    try:
        compressor.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match its config {config}: {err}") from None
    return compressor.eval()
