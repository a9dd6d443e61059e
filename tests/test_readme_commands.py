"""Every ``tokenbudget ...`` line of the README's command-line section runs as written and exits 0
(slow stage: the embedded model at the sizes the README names, a few minutes per command)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """The argument lists of the ``tokenbudget`` lines in the README's "Command line" section, in
    order (``a && b`` gives two; comments dropped)."""
    text = README.read_text()
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] == "tokenbudget":
                    commands.append(words[1:])
    return commands


def test_the_readme_section_is_found() -> None:
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"bench", "eval", "plan", "visualize", "explore", "cache"}
    assert all("#" not in word for c in commands for word in c)


def _explore(args: list[str], cwd: Path, env: dict) -> int:
    """``explore`` serves until stopped: wait for its address line, then stop it as Ctrl-C does."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenbudget", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "http://" in line:
                break
            if not line and proc.poll() is not None:
                return proc.returncode
        # The address is printed just before serving starts: wait until the page answers, so that
        # the interrupt reaches a serving explorer (as a user's Ctrl-C does).
        url = re.search(r"http://\S+", line).group(0)
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=10) as page:
                    if page.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for all the lines, run in order: later lines read what earlier ones wrote."""
    return tmp_path_factory.mktemp("readme")


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_readme_command_exits_0(args: list[str], workdir: Path) -> None:
    if args[0] == "explore":
        code, err = _explore(args, workdir, dict(os.environ)), ""
    else:
        run = subprocess.run(
            [sys.executable, "-m", "tokenbudget", *args],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=1700,
        )
        code, err = run.returncode, run.stderr[-3000:]
    assert code == 0, f"tokenbudget {shlex.join(args)} exited {code}:\n{err}"
