"""Options and Hypothesis profiles shared by ``tests/`` and ``conformance/``."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# The Triton backend can only be verified here through its interpreter, which must be chosen
# before Triton is imported. Machines with CUDA test the compiled kernels instead.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# The test command draws the same examples on every run and every machine ("ci", derandomised),
# so a failure in CI reproduces anywhere. `pytest --hypothesis-profile=dev` draws new random
# examples each run (exploration); "nightly" draws many more.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("nightly", max_examples=1000, **_COMMON)
settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("softsplat conformance")
    group.addoption(
        "--backend",
        default=None,
        help="comma-separated backends to check (default: SOFTSPLAT_BACKEND, else every "
        "registered backend; unavailable ones are skipped with their reason)",
    )
    group.addoption(
        "--require-backends",
        default="",
        help="comma-separated backends that must be available: a missing one fails instead of "
        "being skipped (GPU CI: --require-backends cupy,cpp,triton)",
    )
    group.addoption(
        "--device",
        default=None,
        help="device to run the conformance suite on (default: cuda if available, else cpu)",
    )
