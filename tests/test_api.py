"""The public API: one level at the top, complete, each public object reachable by one advertised path."""

from __future__ import annotations

import importlib
import subprocess
import sys

import tokenbudget as tb
from tokenbudget.config import config_class, method_names


def test_every_top_level_name_resolves() -> None:
    for name in tb.__all__:
        assert getattr(tb, name) is not None, name


def test_every_method_config_is_exported_at_the_top() -> None:
    missing = [config_class(m).__name__ for m in method_names() if config_class(m).__name__ not in tb.__all__]
    assert not missing, f"configs missing from tokenbudget.__all__: {missing}"


def test_no_object_is_advertised_under_two_paths() -> None:
    namespaces = {"tokenbudget": tb} | {
        f"tokenbudget.{name}": importlib.import_module(f"tokenbudget.{name}") for name in tb._SUBPACKAGES
    }
    seen: dict[int, str] = {}
    duplicates = []
    for prefix, module in namespaces.items():
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if isinstance(obj, type(tb)) or name == "__version__":  # submodules are namespaces
                continue
            path = f"{prefix}.{name}"
            if id(obj) in seen and not isinstance(obj, (int, float, str)):
                duplicates.append(f"{seen[id(obj)]} and {path}")
            seen.setdefault(id(obj), path)
    assert not duplicates, "advertised twice: " + "; ".join(duplicates)


def test_import_is_light() -> None:
    """``import tokenbudget`` and the config classes load neither torch nor timm."""
    code = "import sys, tokenbudget, tokenbudget.config; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_dir_lists_the_api_and_nothing_else() -> None:
    import tokenbudget

    tokenbudget.ToMe, tokenbudget.config  # noqa: B018 - loaded names and submodules must not leak in
    names = dir(tokenbudget)
    assert names == sorted(tokenbudget.__all__)
    assert not {"Any", "annotations", "importlib", "_importlib", "version", "config", "patch"} & set(names)
    assert all(hasattr(tokenbudget, name) for name in names)
