"""``tokenbudget cache``: where tokenbudget's caches are, how big, and clearing them."""

from __future__ import annotations

import argparse
import json

from . import options

#: the kinds of :data:`tokenbudget.data.cache.CACHE_KINDS` (listed here so --help needs no import)
KINDS = ("weights", "tokens", "scenes", "anomaly", "textures", "geometry", "partial")


def register(sub: argparse._SubParsersAction) -> None:
    cache = options.add_command(
        sub, "cache", cmd_cache, "show where the caches are and their size per kind; --clear removes them"
    )
    cache.add_argument(
        "--clear",
        nargs="?",
        const="all",
        default=None,
        choices=(*KINDS, "all"),
        help="remove the cached files of one kind, or of every kind (no value or 'all'); files "
        "tokenbudget did not write are never touched, and every kind is rebuilt on demand",
    )
    cache.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_cache(args: argparse.Namespace) -> int:
    from ..data.cache import cache_info, clear_cache

    removed = None
    if args.clear is not None:
        removed = clear_cache(None if args.clear == "all" else args.clear)
    info = cache_info()
    if args.json:
        out = {
            "root": str(info.root),
            "kinds": {name: {"files": k.files, "bytes": k.bytes} for name, k in info.kinds.items()},
            "total_bytes": info.total_bytes,
        }
        if removed is not None:
            out["removed"] = {"files": removed.files, "bytes": removed.bytes}
        print(json.dumps(out, indent=2))
        return 0
    if removed is not None:
        print(f"removed {removed.files} files ({removed.bytes / 2**20:.1f} MB)")
    print(info)
    return 0
