"""What ``nox -s arm`` runs on aarch64 (its run itself is a scheduled workflow, .github/workflows/
arm.yml: emulation takes longer than the test command may): its tests exist and collect,
conformance/test_cpu_paths.py's grid reaches every combination it is there for, and the key of
its cached aarch64 wheel changes with whatever goes into the wheel."""

from __future__ import annotations

import importlib.util
import itertools
import pathlib
import re
import shutil
import subprocess
import sys

import torch

from conformance import test_cpu_paths
from softsplat import Mode

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _arm_tests() -> list[str]:
    text = (ROOT / "noxfile.py").read_text()
    listed = re.search(r"^ARM_TESTS = \[(.*?)\]", text, re.S | re.M)
    assert listed, "noxfile.py has no ARM_TESTS list"
    return re.findall(r'"([^"]+)"', listed.group(1))


def test_the_arm_tests_collect_for_cpp() -> None:
    tests = _arm_tests()
    assert "conformance/test_cpu_paths.py" in tests and all((ROOT / t).is_file() for t in tests), tests
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *tests,
                             "--backend", "cpp"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    collected = re.search(r"(\d+) tests? collected", result.stdout)
    assert result.returncode == 0 and collected and int(collected.group(1)) >= 80, result.stdout[-3000:]


def test_the_cpu_paths_grid_covers_each_axis_with_each_other() -> None:
    cells = [param.values for param in test_cpu_paths._grid()]
    modes = {mode for mode, *_ in cells}
    assert modes == {m.value for m in Mode}
    soft = {m.value for m in Mode if m.kind == "soft"}
    channel_counts = test_cpu_paths.CHANNELS
    assert any(c < 4 for c in channel_counts) and any(c >= 5 for c in channel_counts) and 4 in channel_counts
    # every mode at every channel count; soft also stable, with and without its shortcut
    assert {(m, c) for m, _, c, *_ in cells} == set(itertools.product(modes, channel_counts))
    assert {(m, s, c) for m, s, c, *_ in cells if m in soft} == set(itertools.product(soft, (False, True), channel_counts))
    # every channel count in every dtype and both layouts, and each dtype in both layouts
    assert {(c, d) for _, _, c, d, *_ in cells} == set(itertools.product(channel_counts, test_cpu_paths.DTYPES))
    assert {(c, la) for _, _, c, _, la, _ in cells} == set(itertools.product(channel_counts, test_cpu_paths.LAYOUTS))
    assert {(d, la) for _, _, _, d, la, _ in cells} == set(itertools.product(test_cpu_paths.DTYPES, test_cpu_paths.LAYOUTS))
    assert torch.float32 in test_cpu_paths.DTYPES and torch.float64 in test_cpu_paths.DTYPES


def _arm_check(checkout: pathlib.Path):
    spec = importlib.util.spec_from_file_location("arm_check", checkout / ".ci" / "arm_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wheel_cache_key_changes_with_anything_the_wheel_holds(tmp_path: pathlib.Path) -> None:
    """``nox -s arm`` takes a cached aarch64 wheel when this key matches: a change to the
    package's Python code (shipped in the wheel beside the libraries) builds one anew too."""
    for name in (".ci/arm_check.py", "setup.py", "pyproject.toml", "noxfile.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "softsplat", tmp_path / "softsplat", ignore=shutil.ignore_patterns("__pycache__"))
    check = _arm_check(tmp_path)
    assert check.wheel_key("torch==2.10.0") == _arm_check(ROOT).wheel_key("torch==2.10.0")
    keys = {check.wheel_key("torch==2.10.0"), check.wheel_key("torch==2.11.0")}
    for name in ("softsplat/cli.py", "softsplat/backends/csrc/cpu/blocks.h", "setup.py"):
        with open(tmp_path / name, "a") as file:
            file.write("\n")
        keys.add(check.wheel_key("torch==2.10.0"))
    assert len(keys) == 5, keys
