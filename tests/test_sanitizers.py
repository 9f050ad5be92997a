"""The C++ CPU kernels and the host-executed CUDA kernels, built with AddressSanitizer and
UndefinedBehaviorSanitizer, run the conformance edge cases (non-finite and far out-of-bounds
flows, targets just outside the image, exp overflow, zero sizes, non-contiguous layouts) and the
Hypothesis suite with zero sanitizer reports. Also `nox -s sanitize`."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def sanitizer_environment() -> dict[str, str] | None:
    compiler = shutil.which("gcc")
    if compiler is None:
        return None
    libraries = [subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip() for name in ("libasan.so", "libubsan.so")]
    if not all(os.path.isabs(path) and os.path.exists(path) for path in libraries):
        return None
    return {
        **os.environ,
        "SOFTSPLAT_SANITIZE": "1",
        "LD_PRELOAD": " ".join(libraries),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }


ENVIRONMENT = sanitizer_environment()


@pytest.mark.skipif(ENVIRONMENT is None, reason="gcc's libasan/libubsan are not installed: cannot sanitize here")
def test_kernels_run_clean_under_address_and_undefined_behaviour_sanitizers() -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--backend", "cpp,cuda-host",
               "conformance/test_edge_cases.py", "conformance/test_against_oracle.py"]
    result = subprocess.run(command, cwd=ROOT, env=ENVIRONMENT, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert "AddressSanitizer" not in output and "runtime error:" not in output, output[-6000:]
    assert result.returncode == 0, output[-6000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.split("\n")[-2], result.stdout[-2000:]
