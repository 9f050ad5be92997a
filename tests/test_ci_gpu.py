"""``.ci/gpu``, the one command for a machine with a GPU: its dry run where there is none (every
part that needs no GPU runs and passes, then it stops and says so), its time limits, and its
refusal to start without a GPU unless dry."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / ".ci" / "gpu"


def _module():
    loader = importlib.machinery.SourceFileLoader("ci_gpu", str(SCRIPT))
    spec = importlib.util.spec_from_loader("ci_gpu", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ci_gpu"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a CUDA device")
def test_the_dry_run_passes_up_to_the_first_part_that_needs_a_gpu(tmp_path) -> None:
    report = tmp_path / "report.md"
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--report", str(report)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert "(dry run)" in text and "'build' and the parts after it need a GPU" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    for part in ("install", "info", "collect"):
        assert "| passed" in rows[part], rows[part]
    for part in ("build", "tests", "bench", "bench-rgb", "bench-half"):
        assert "not run (needs a GPU)" in rows[part], rows[part]
    assert "conformance/test_against_oracle.py" in text or "tests collected" in text or "collected" in text


def test_without_a_gpu_and_not_dry_it_stops_at_once(tmp_path, monkeypatch) -> None:
    module = _module()
    monkeypatch.setattr(module, "gpu_reason", lambda: "no CUDA device (test)")
    assert module.main(["--report", str(tmp_path / "r.md")]) == 2
    assert not (tmp_path / "r.md").exists()


def test_a_part_past_its_limit_is_killed_and_reported(tmp_path, monkeypatch) -> None:
    """One hang cannot eat the budget: the part's process group is killed at its limit, the
    report says so, the parts after it still run, and the command fails."""
    module = _module()
    hang = module.Part("hang", [sys.executable, "-c", "import subprocess, sys, time; "
                                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                                "print('started', flush=True); time.sleep(60)"], 2, False, "a hang")
    after = module.Part("after", [sys.executable, "-c", "print('ran')"], 10, False, "runs after it")
    monkeypatch.setattr(module, "parts", lambda: [hang, after])
    monkeypatch.setattr(module, "gpu_reason", lambda: None)
    report = tmp_path / "report.md"
    assert module.main(["--report", str(report)]) == 1
    text = report.read_text()
    assert "| hang | a hang | timed out (killed after 2 s)" in text and "started" in text
    assert "| after | runs after it | passed" in text


def test_each_part_gets_at_most_what_is_left_of_the_budget(tmp_path, monkeypatch) -> None:
    module = _module()
    slow = module.Part("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 100, False, "slow")
    later = module.Part("later", [sys.executable, "-c", "print('ran')"], 100, False, "later")
    monkeypatch.setattr(module, "parts", lambda: [slow, later])
    monkeypatch.setattr(module, "gpu_reason", lambda: None)
    report = tmp_path / "report.md"
    assert module.main(["--report", str(report), "--budget", "8"]) == 1
    text = report.read_text()
    assert "| slow | slow | timed out (killed after 8 s)" in text
    assert "| later | later | not run (the budget is spent)" in text


def test_the_bench_parts_time_the_ordered_forward_beside_the_atomic_one() -> None:
    """GPU CI measures the deterministic path's cost: every bench part runs --deterministic."""
    module = _module()
    benches = [part for part in module.parts() if part.name.startswith("bench")]
    assert [part.name for part in benches] == ["bench", "bench-rgb", "bench-half"]
    assert all("--deterministic" in part.command for part in benches)
