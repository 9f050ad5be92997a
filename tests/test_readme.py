"""The README's two set-up commands stay true: CI runs the test command verbatim."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv \.venv && [^\n]+)\n```", readme)


def test_readme_has_the_two_setup_commands() -> None:
    commands = _commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("softsplat demo"), "the first command runs the main job"
    assert commands[1].endswith("&& pytest"), "the second command runs the tests"
    assert all("pip install torch==2.13.0 &&" in c for c in commands), "torch is pinned first"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci
