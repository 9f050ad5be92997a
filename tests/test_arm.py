"""What ``nox -s arm`` runs on aarch64 (its run itself is a scheduled workflow, .github/workflows/
arm.yml: emulation takes longer than the test command may): its tests exist and collect, and
conformance/test_cpu_paths.py's grid reaches every combination it is there for."""

from __future__ import annotations

import itertools
import pathlib
import re
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
