"""`auto` survives a backend that cannot be built: one warning saying why and how to fix it, the
next backend, no second build attempt; a named backend raises with the build error's tail;
`softsplat info` shows the failure and `softsplat build` tries again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import warnings, torch, softsplat
from softsplat import backends
x, f, m = torch.rand(1, 2, 5, 6), torch.randn(1, 2, 5, 6), torch.randn(1, 1, 5, 6)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = softsplat.splat(x, f, m, mode="soft")
    second = softsplat.splat(x, f, m, mode="soft")
print("WARNINGS", len([w for w in caught if "softsplat" in str(w.message)]))
print("MESSAGE", str(caught[0].message).replace("\n", " ") if caught else "")
print("SAME", torch.allclose(first, softsplat.splat(x, f, m, mode="soft", backend="torch")))
print("CHOSEN", softsplat.resolve_backend(x, "soft"))
try:
    softsplat.splat(x, f, m, mode="soft", backend="cpp")
except softsplat.BackendFailedError as error:
    print("NAMED", str(error).replace("\n", " "))
"""


@pytest.fixture
def failing_compiler(tmp_path):
    """A `c++` that fails every call and counts them."""
    calls = tmp_path / "calls"
    compiler = tmp_path / "bad-c++"
    compiler.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'bad-c++: this compiler is broken' >&2\nexit 1\n")
    compiler.chmod(0o755)
    environment = {**os.environ, "CXX": str(compiler), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    environment.pop("SOFTSPLAT_BACKEND", None)
    return environment, calls


def run(command, environment) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def test_auto_falls_back_once_and_a_named_backend_raises(failing_compiler) -> None:
    environment, calls = failing_compiler
    result = run([sys.executable, "-c", SCRIPT], environment)
    assert result.returncode == 0, result.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert out["WARNINGS"] == "1", result.stdout
    assert "'cpp' failed to build or load" in out["MESSAGE"] and "fix: install a working C++ compiler" in out["MESSAGE"]
    assert out["SAME"] == "True" and out["CHOSEN"] != "cpp"
    assert "backend 'cpp' failed to build or load" in out["NAMED"] and "bad-c++" in out["NAMED"], out["NAMED"]
    attempts = calls.read_text().count("x")
    assert attempts >= 1

    # A later process does not build again (the failure is recorded), warns once, and info says
    # so. It asks the compiler who it is (`--version`, for the flags), nothing more.
    result = run([sys.executable, "-c", SCRIPT], environment)
    assert result.returncode == 0 and "WARNINGS 1" in result.stdout, result.stderr[-3000:]
    assert "softsplat: building" not in result.stderr
    assert calls.read_text().count("x") <= attempts + 1
    attempts = calls.read_text().count("x")
    info = run([sys.executable, "-m", "softsplat", "info"], {**environment, "COLUMNS": "300"})
    assert "build failed" in info.stdout and "softsplat build" in info.stdout, info.stdout

    # softsplat build tries again (and fails again with this compiler, saying so).
    build = run([sys.executable, "-m", "softsplat", "build"], environment)
    assert build.returncode == 1 and "cpp: FAILED" in build.stdout
    assert calls.read_text().count("x") > attempts
