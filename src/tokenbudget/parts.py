"""Files of small trained parts: weights as safetensors, everything else as JSON beside them.

One convention for every trained part (DynamicViT predictors, exit heads, budget predictors, text
projections, VLM compressors, Slot Attention): a part saved at ``STEM`` is ``STEM.safetensors`` +
``STEM.json``, and either file name (or the stem) loads it. The JSON names a format and version so
that a file of another kind is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn


def part_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) paths of a part given as STEM, STEM.safetensors or STEM.json."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _safetensors(what: str, extra: str = "learned") -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            f"saving and loading {what} needs safetensors: pip install 'tokenbudget[{extra}]'"
        ) from None
    return safetensors.torch


def save_part(
    module: nn.Module, config: dict[str, Any], path: str | Path, what: str, extra: str = "learned"
) -> tuple[Path, Path]:
    """Write ``module``'s weights and ``config`` (which must hold ``format``); returns both paths.
    ``extra``: the pip extra that brings safetensors, named when it is missing."""
    weights, config_path = part_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    _safetensors(what, extra).save_file(tensors, str(weights), metadata={"format": config["format"]})
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return weights, config_path


def read_part(
    path: str | Path, fmt: str, version: int, what: str, hint: str, extra: str = "learned"
) -> tuple[dict[str, Any], dict[str, Tensor], Path]:
    """(config, weights, weights path) of a part written by :func:`save_part`.

    ``FileNotFoundError`` naming ``hint`` (the command that makes one) when a file is missing;
    ``ValueError`` when the JSON is not format ``fmt`` version ``version``."""
    weights, config_path = part_paths(path)
    missing = [str(p) for p in (weights, config_path) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no {what} at {path} (missing {', '.join(missing)}); {hint}")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != fmt or meta.get("version") != version:
        raise ValueError(f"{config_path} is not a tokenbudget {what} config (format {fmt} v{version})")
    return meta, _safetensors(what, extra).load_file(str(weights)), weights


def load_weights(module: nn.Module, state: dict[str, Tensor], weights: Path, what: str) -> None:
    """Load ``state`` into ``module``; ``ValueError`` when the file does not fit its config."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match its config ({what}): {err}") from None
