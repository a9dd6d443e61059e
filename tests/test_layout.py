"""The package layout: layers import only downward, no import circles, small files, framework
knowledge only in adapters/ and models/, and project text that speaks to users.

The layer order is stated once, here. A module may import its own layer and the layers below it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tokenbudget"

#: lowest first; names are top-level modules or subpackages of tokenbudget
LAYERS: list[set[str]] = [
    {"version"},  # the package version
    {"ops"},  # pure tensor functions
    {
        "flops",
        "parts",
        "schedule",
        "state",
    },  # FLOPs arithmetic, trained-part files, budgets, per-forward state
    {"config"},  # one dataclass per method
    {"context"},  # what a patched model carries
    {"strategies"},  # one file per method: plan + reduce
    {"adapters"},  # the only code that reads a framework's model internals
    {"patch"},  # apply / remove / last_state
    # Data loaders sit above the adapters: they use the model's own preprocessing and features.
    {"models", "data"},
    {"adaptive", "vlm", "learned"},  # library code: early exit, budgets, VLM compressors, trainers
    {"bench", "viz"},
    {"evaluate"},  # one evaluation protocol per file
    {"demo", "explore"},
    {"cli"},  # the command line: nothing below imports it
    {"__init__", "__main__"},  # the public API
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}

MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every tokenbudget module ``path`` imports (at any depth, lazy imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("tokenbudget"):
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tokenbudget")}
    found.discard(name)
    return {m for m in found if m in modules}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer() -> None:
    unknown = sorted({_top(m) for m in _modules()} - set(LAYER_OF))
    assert not unknown, f"add these to LAYERS in tests/test_layout.py: {unknown}"


def test_imports_flow_downward() -> None:
    modules = _modules()
    upward = []
    for module, path in modules.items():
        if module.endswith("__main__"):
            continue
        layer = LAYER_OF[_top(module)]
        for target in _imports(path, modules):
            if LAYER_OF[_top(target)] > layer:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a lower layer up to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {m: _imports(p, modules) for m, p in modules.items()}
    # A package imports its own submodules from __init__; a submodule naming its package for one of
    # the package's re-exports would be a circle, and is one here.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_file_over_the_size_limit() -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"


# Attribute reads that tie code to one framework's model internals.
# (``adapter.blocks`` is the protocol's own attribute.)
FRAMEWORK_READS = re.compile(
    r"(?<!adapter)\.(blocks|patch_embed|num_prefix_tokens|cls_token|qkv|forward_features|_pos_embed|"
    r"pretrained_cfg|resblocks|in_proj_weight)\b"
)
FRAMEWORK_PLACES = ("adapters", "models")


def test_framework_internals_are_read_only_in_adapters() -> None:
    reads = []
    for path in PACKAGE.rglob("*.py"):
        if _top(_module_name(path)) in FRAMEWORK_PLACES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            # Only code: skip docstring and comment prose, which may name what adapters read.
            if FRAMEWORK_READS.search(code) and not code.strip().startswith(("*", '"', "``")):
                reads.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not reads, "read framework internals through the adapter protocol:\n" + "\n".join(reads)


ISSUE_TALK = re.compile(r"\b(issue|issues|ticket)\s*#?\d+|\(issue \d|\bPR #\d+", re.IGNORECASE)


@pytest.mark.parametrize("root", ["src", "README.md", "docs"])
def test_project_text_speaks_to_users(root: str) -> None:
    """No issue numbers or notes about how the work was organised in code, docs or the README."""
    base = SRC.parent / root
    paths = [base] if base.is_file() else [p for p in base.rglob("*") if p.suffix in (".py", ".md")]
    hits = [
        f"{p.relative_to(SRC.parent)}:{n}: {line.strip()}"
        for p in paths
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if ISSUE_TALK.search(line)
    ]
    assert not hits, "project text mentions issues:\n" + "\n".join(hits)
