"""Checks an installed softsplat wheel (``nox -s wheel_test`` and cibuildwheel's test step run it):
``softsplat info`` shows the cpp backend prebuilt and none of the test suite's host backends, the
wheel holds none of conformance/host's files, and the cpp conformance suite (or the tests given
as arguments, paths under conformance/) passes at every CPU level this machine runs, with nothing
compiled (TORCH_EXTENSIONS_DIR, an empty directory, stays empty).

Run it with the environment's Python, the wheel installed with pytest and hypothesis. It runs
the suite from a copy, so that the checkout's own ``softsplat`` cannot be imported instead of
the installed one. With ``--no-compiler`` it first fails if a C++ compiler is reachable.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
COMPILERS = ("cc", "c++", "g++", "gcc", "clang++", "cl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compiler", action="store_true", help="fail if a C++ compiler is reachable")
    parser.add_argument("tests", nargs="*", default=["conformance"], help="what pytest runs (default: conformance)")
    arguments = parser.parse_args()
    if arguments.no_compiler:
        found = [c for c in COMPILERS if shutil.which(c)] + [v for v in ("CXX", "CC") if os.environ.get(v)]
        if found:
            sys.exit(f"a compiler is reachable ({', '.join(found)}): this check is of a machine without one")
    with tempfile.TemporaryDirectory() as work:
        work = pathlib.Path(work)
        shutil.copytree(CHECKOUT / "conformance", work / "conformance", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(CHECKOUT / "conftest.py", work / "conftest.py")
        extensions = work / "extensions"
        extensions.mkdir()
        environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}

        def run(*command: str, **extra: str) -> str:
            result = subprocess.run(command, cwd=work, env={**environment, **extra}, capture_output=True, text=True)
            print(result.stdout[-6000:], result.stderr[-3000:], sep="\n", flush=True)
            if result.returncode:
                sys.exit(f"failed ({result.returncode}): {' '.join(command)}")
            return result.stdout

        where = run(sys.executable, "-c", "import softsplat; print(softsplat.__file__)").strip()
        if pathlib.Path(where).is_relative_to(CHECKOUT / "softsplat"):
            sys.exit(f"softsplat was imported from the checkout ({where}), not from the installed wheel")
        info = run(sys.executable, "-m", "softsplat.cli", "info")
        if "prebuilt" not in info:
            sys.exit("softsplat info does not show the cpp backend prebuilt")
        # The test suite's host backends (conformance/host) are no part of the wheel.
        test_code = {path.name for path in (CHECKOUT / "conformance" / "host").iterdir()} - {"__init__.py", "__pycache__"}
        shipped = sorted(str(p) for p in pathlib.Path(where).parent.rglob("*") if p.name in test_code)
        if shipped or "cuda-host" in info or "cupy-host" in info:
            sys.exit(f"the wheel holds the test suite's host backends: {shipped or 'softsplat info lists them'}")
        levels = run(sys.executable, "-c", "from softsplat.backends import build_flags; print(*build_flags.supported_levels())").split()
        for level in levels:
            print(f"== conformance, cpp, CPU level {level}", flush=True)
            run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *arguments.tests, "--backend", "cpp",
                "--require-backends", "cpp", "--ignore=conformance/test_onnx.py", "--ignore=conformance/meta",
                SOFTSPLAT_CPU_LEVEL=level)
        built = list(extensions.rglob("*"))
        if built:
            sys.exit(f"something was built ({built[:3]}): the prebuilt libraries were not used")
    print(f"wheel check passed: prebuilt cpp, conformance at {', '.join(levels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
