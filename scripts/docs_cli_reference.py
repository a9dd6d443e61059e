"""mkdocs hook: replace ``<!-- cli-reference -->`` with every command's usage and options, generated
from the parser itself, so the reference can never drift from the code."""

from __future__ import annotations

import argparse
from typing import Any

MARKER = "<!-- cli-reference -->"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(f"`{n}`" for n in action.option_strings) or f"`{action.dest}`"
        default = action.default
        shown = "" if default in (None, False, argparse.SUPPRESS) else f" (default: `{default}`)"
        text = (action.help or "").replace("|", "\\|").replace("\n", " ")
        if "%(default)" in text:
            text = text.replace("%(default)s", str(default))
            shown = ""
        rows.append(f"| {names} | {text}{shown} |")
    return rows


def reference() -> str:
    from tokenbudget.cli import build_parser

    parser = build_parser()
    helps = _helps(parser)
    out = []
    for name, sub in _subcommands(parser).items():
        sub.prog = f"tokenbudget {name}"
        out += [
            f"### `tokenbudget {name}`",
            "",
            helps.get(name, ""),
            "",
            "```text",
            sub.format_usage().strip(),
            "```",
            "",
        ]
        rows = _option_rows(sub)
        if rows:
            out += ["| option | meaning |", "|---|---|", *rows, ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
