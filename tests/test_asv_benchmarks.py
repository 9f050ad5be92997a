"""The asv benchmarks run (not timed): every parameter set once at a tiny size, and `asv check`."""

from __future__ import annotations

import importlib.util
import itertools
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def splat_benchmarks(monkeypatch):
    monkeypatch.setenv("SOFTSPLAT_ASV_TINY", "1")
    spec = importlib.util.spec_from_file_location("asv_splat", ROOT / "asv_bench" / "benchmarks" / "splat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_parameter_set_runs_once(splat_benchmarks) -> None:
    ran, skipped = [], []
    for params in itertools.product(*splat_benchmarks.Splat.params):
        benchmark = splat_benchmarks.Splat()
        try:
            benchmark.setup(*params)
        except NotImplementedError as reason:
            skipped.append((params, str(reason)))
            continue
        benchmark.time_splat(*params)
        benchmark.peakmem_splat(*params)
        if params[-1] == "forward":
            fraction = benchmark.track_bandwidth_fraction(*params)
            assert 0 < fraction < 100
        ran.append(params)
    assert {p[0] for p in ran} >= {"torch", "cpp"}, f"ran {sorted({p[0] for p in ran})}, skipped {skipped[:3]}"
    assert all(reason for _, reason in skipped)


@pytest.mark.skipif(importlib.util.find_spec("asv") is None, reason="asv is not installed (pip install -e '.[bench]')")
def test_asv_check() -> None:
    result = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT / "asv_bench", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
