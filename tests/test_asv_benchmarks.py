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
    """Every benchmark body runs for every parameter set whose setup does not skip it: a body
    never raises (asv would report the cell as failed, not skipped)."""
    ran, skipped = [], []
    bodies = {
        splat_benchmarks.Splat: lambda b, p: (b.time_splat(*p), b.peakmem_splat(*p)),
        splat_benchmarks.Bandwidth: lambda b, p: 0 < b.track_bandwidth_fraction(*p) < 100 or pytest.fail(str(p)),
        splat_benchmarks.CudaMemory: lambda b, p: b.track_peak_cuda_memory(*p) > 0 or pytest.fail(str(p)),
        splat_benchmarks.Workload: lambda b, p: (b.time_call(*p), b.track_times_the_bound(*p) > 0 or pytest.fail(str(p))),
    }
    for cls, body in bodies.items():
        for params in itertools.product(*cls.params):
            benchmark = cls()
            try:
                benchmark.setup(*params)
            except NotImplementedError as reason:
                skipped.append((cls.__name__, params, str(reason)))
                continue
            body(benchmark, params)
            ran.append((cls.__name__, params))
    assert {p[1][0] for p in ran} >= {"torch", "cpp"}, f"ran {sorted({p[1][0] for p in ran})}, skipped {skipped[:3]}"
    assert {p[0] for p in ran} >= {"Splat", "Bandwidth", "Workload"}
    assert all(reason for *_, reason in skipped)


@pytest.mark.skipif(importlib.util.find_spec("asv") is None, reason="asv is not installed (pip install -e '.[bench]')")
def test_asv_check() -> None:
    result = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT / "asv_bench", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(importlib.util.find_spec("asv") is None, reason="asv is not installed (pip install -e '.[bench]')")
def test_asv_run_exits_0_with_no_benchmark_failed(tmp_path) -> None:
    """A plain quick run in this environment (the subset, tiny sizes): skips where a benchmark does
    not apply, never a failed cell, exit code 0. Launched by asv's forkserver (the benchmarks
    imported once, a fork per cell), not a fresh interpreter per cell: ten times quicker on a
    CPU (no CUDA is initialised before the forks there)."""
    import json
    import os
    import shutil

    config = json.loads((ROOT / "asv_bench" / "asv.conf.json").read_text())
    config.update(repo=str(ROOT), results_dir=str(tmp_path / "results"), html_dir=str(tmp_path / "html"),
                  benchmark_dir=str(ROOT / "asv_bench" / "benchmarks"), env_dir=str(tmp_path / "env"))
    (tmp_path / "asv.conf.json").write_text(json.dumps(config))
    environment = {**os.environ, "SOFTSPLAT_ASV_TINY": "1", "SOFTSPLAT_ASV_SUBSET": "1"}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not commit or shutil.which("git") is None:
        pytest.skip("not a git checkout: asv needs a commit to file results under")
    asv = [sys.executable, "-m", "asv"]
    subprocess.run([*asv, "machine", "--yes", "--machine", "test"], cwd=tmp_path, env=environment, capture_output=True, check=True)
    result = subprocess.run([*asv, "run", "--python=same", "--quick", "--launch-method", "forkserver", "--machine", "test",
                             "--set-commit-hash", commit],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "failed" not in output, output[-4000:]
