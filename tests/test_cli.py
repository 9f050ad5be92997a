"""The command line, run as users run it."""

from __future__ import annotations

import subprocess
import sys

from softsplat import backends


def test_info_prints_every_backend() -> None:
    result = subprocess.run([sys.executable, "-m", "softsplat", "info"], capture_output=True, text=True, check=True, env={"COLUMNS": "200", "PATH": ""})
    for name in backends.names():
        assert name in result.stdout
    assert "available" in result.stdout and "deterministic" in result.stdout


def test_unknown_command_fails_with_usage() -> None:
    result = subprocess.run([sys.executable, "-m", "softsplat", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'frobnicate'" in result.stderr
