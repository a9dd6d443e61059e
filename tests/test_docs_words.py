"""User docs speak to users: no words from how the work was planned or organised, no history of
how a generator or a result came to be (tests/test_layout.py checks issue numbers)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: phrases that only ever come from planning notes; each is specific enough not to match a
#: legitimate sentence to a user ("the brief" never means "in brief", "target" alone is left out:
#: speed and FLOPs targets are the user's own words for ``plan``)
PLANNING_WORDS = re.compile(
    r"from the brief|\bthe brief\b|(?-i:\bTargets \()|just misses|was redefined|as it was before|\bthe team\b"
    r"|\bintegrator\b|\bengineers?\b|\bhelper session|\bthis session\b|\bour generators?\b",
    re.IGNORECASE,
)


def _user_docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_planning_words_catch_what_they_should_and_nothing_else() -> None:
    for planning in ("Targets (from the brief): at least", "This just misses the 1-point target",
                     "the generator as it was before the global class was redefined", "notes of the team"):  # fmt: skip
        assert PLANNING_WORDS.search(planning), planning
    for user in ("--target-speedup 2.0 is out of reach", "In brief: ToMe merges", "a helper function",
                 "the speed target is met", "a briefer run", "ties at both targets (within one error)"):  # fmt: skip
        assert not PLANNING_WORDS.search(user), user


def test_user_docs_have_no_planning_words() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _user_docs()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PLANNING_WORDS.search(line)
    ]
    assert not hits, "user docs use planning words (say what holds for the user instead):\n" + "\n".join(hits)
