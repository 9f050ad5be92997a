"""The checks of ``nox -s arm``, run inside its aarch64 Debian root (under qemu-user on another
architecture) by the root's environment, with the checkout copied to the working directory:

1. ``softsplat info`` on an editable install (a source checkout) names the aarch64 CPU level;
2. ``softsplat build``: the first-use build of the cpp backend, by the root's g++;
3. the given tests (noxfile.ARM_TESTS) on ``cpp`` at every CPU level this machine runs;
4. ``nox -s wheel``: the aarch64 wheel (unless one of these sources is in the wheel cache);
5. ``nox -s wheel_test``: that wheel in a fresh environment with no compiler reachable, the
   same tests at every level, nothing built.

Each part's duration is printed after it and again at the end: under emulation they say
nothing about speed. ``--part build`` runs 1-3 only, ``--part wheel`` 4-5 only (each takes over
an hour emulated); both by default.

usage: python .ci/arm_check.py --wheel-cache DIR --nox-envdir DIR [--part build|wheel] TEST [TEST ...]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
#: What the wheel is made of: the whole package (its Python code goes into the wheel beside the
#: libraries built from csrc) and how it is built. A wheel of these files' contents is taken
#: from the cache; a change to any of them builds one anew.
WHEEL_INPUTS = ["setup.py", "pyproject.toml", "noxfile.py", "softsplat"]
TIMES: list[tuple[str, float]] = []
PARTS = ("build", "wheel")


def run(title: str, *command: str, **environment: str) -> str:
    """``command`` in the checkout, its output shown and returned; a failure stops the checks."""
    print(f"\n== {title}: {' '.join(command)}", flush=True)
    start = time.monotonic()
    result = subprocess.run(command, cwd=CHECKOUT, env={**os.environ, **environment}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    TIMES.append((title, time.monotonic() - start))
    print(result.stdout[-8000:], flush=True)
    print(f"-- {TIMES[-1][1]:.0f} s (emulated: a cost, not a speed)", flush=True)
    if result.returncode:
        sys.exit(f"arm: failed ({result.returncode}): {title}")
    return result.stdout


def wheel_key(torch_requirement: str) -> str:
    digest = hashlib.sha256(torch_requirement.encode())
    for name in WHEEL_INPUTS:
        path = CHECKOUT / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(CHECKOUT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-cache", required=True, type=pathlib.Path)
    parser.add_argument("--nox-envdir", required=True)
    parser.add_argument("--part", action="append", choices=PARTS, help="build: parts 1-3; wheel: 4-5 (default: both)")
    parser.add_argument("tests", nargs="+")
    arguments = parser.parse_args()
    if platform.machine() != "aarch64":
        sys.exit(f"arm: this is {platform.machine()}, not aarch64")
    python = sys.executable
    # The environment's programs first (ninja, which the first-use build runs), then the root's (g++).
    os.environ["PATH"] = f"{pathlib.Path(python).parent}{os.pathsep}{os.environ['PATH']}"
    summary = [python, "-c", "from softsplat import backends; cpp = backends.get('cpp'); "
               "print(cpp.unavailable_reason or 'available:', cpp.summary)"]
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *arguments.tests, "--backend", "cpp",
              "--require-backends", "cpp"]
    parts = arguments.part or PARTS
    if "build" in parts:
        check_first_use_build(python, pytest, summary)
    if "wheel" in parts:
        check_wheel(python, arguments)
    print(f"\narm: passed ({', '.join(parts)}). Durations under emulation (they say nothing about speed):")
    for title, seconds in TIMES:
        print(f"  {seconds:7.0f} s  {title}")
    return 0


def check_first_use_build(python: str, pytest: list[str], summary: list[str]) -> None:
    """Parts 1-3: info, the first-use build, the tests at every level on what it built."""
    with tempfile.TemporaryDirectory() as extensions:
        built = {"TORCH_EXTENSIONS_DIR": extensions}  # empty: the build below is a first use
        run("install the checkout (editable, nothing built)", python, "-m", "pip", "install", "-q", "--no-deps",
            "--no-build-isolation", "-e", ".")
        run("softsplat info", python, "-m", "softsplat.cli", "info", **built)
        state = run("the cpp backend's line of softsplat info", *summary, **built)
        if not state.startswith("available: fused C++ kernels (builds on first use); CPU level baseline"):
            sys.exit("arm: softsplat info does not show the cpp backend at the aarch64 baseline, to build on first use")
        run("first-use build of the cpp backend (g++)", python, "-m", "softsplat.cli", "build", **built)
        state = run("the cpp backend's line of softsplat info after the build", *summary, **built)
        if not state.startswith("available: fused C++ kernels (built); CPU level baseline"):
            sys.exit("arm: softsplat info does not show the cpp backend built")
        levels = run("CPU levels", python, "-c", "from softsplat.backends import build_flags as b; "
                     "print(b.architecture(), *b.supported_levels())", **built).split()
        if levels[0] != "aarch64":
            sys.exit(f"arm: build_flags takes this machine for {levels[0]}")
        for level in levels[1:]:
            run(f"tests on cpp at CPU level {level} (first-use build)", *pytest, **built, SOFTSPLAT_CPU_LEVEL=level)


def check_wheel(python: str, arguments: argparse.Namespace) -> None:
    """Parts 4-5: the wheel (unless cached), then its check in a fresh environment."""
    torch_requirement = os.environ["SOFTSPLAT_TORCH"]
    cached = arguments.wheel_cache / wheel_key(torch_requirement)
    nox = [python, "-m", "nox", "--envdir", arguments.nox_envdir]
    if not glob.glob(str(cached / "*.whl")):
        shutil.rmtree("wheelhouse", ignore_errors=True)
        run("nox -s wheel (the aarch64 wheel, g++)", *nox, "--reuse-existing-virtualenvs", "-s", "wheel")
        (wheel,) = glob.glob(str(CHECKOUT / "wheelhouse" / "*manylinux*.whl"))
        cached.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, cached)
    else:
        TIMES.append(("nox -s wheel: taken from the wheel cache", 0.0))
    (wheel,) = glob.glob(str(cached / "*.whl"))
    print(f"\n== the wheel: {wheel}", flush=True)
    # wheel_test makes its environment anew (no --reuse-existing-virtualenvs): a fresh one.
    run("nox -s wheel_test (fresh environment, no compiler)", *nox, "-s", "wheel_test", "--", wheel, *arguments.tests)


if __name__ == "__main__":
    sys.exit(main())
