"""Options, Hypothesis profiles and the host backends shared by ``tests/`` and ``conformance/``."""

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

# The backends that run the GPU code on the CPU (cuda-host, cupy-host) are the test suite's own,
# not softsplat's: registered here for tests/ and conformance/ alike (and for the pytest runs
# that tests start), so the suite checks the CUDA kernels and the cupy backend without a GPU.
from conformance import host  # noqa: E402

host.register()

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
    group.addoption(
        "--deterministic",
        action="store_true",
        help="run under torch.use_deterministic_algorithms(True): each backend's deterministic path (the CUDA "
        "kernels' ordered forward); the conformance suite skips a backend that has none on the device",
    )
    group.addoption(
        "--require-gpu",
        action="store_true",
        help="GPU CI: refuse to start without a CUDA device, and fail (not skip) every test that "
        "would skip for want of one",
    )


#: Skip reasons that mean "no GPU here"; under --require-gpu such a skip is a failure.
GPU_SKIP_WORDS = ("CUDA", "GPU", "cuda")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--require-gpu"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(
                "--require-gpu: no CUDA device is visible (torch.cuda.is_available() is False); GPU CI "
                "runs on a runner with a GPU and a CUDA build of torch (SOFTSPLAT_TORCH)"
            )


@pytest.fixture(scope="session", autouse=True)
def _deterministic_session(request):
    """--deterministic: the whole session under torch.use_deterministic_algorithms(True)."""
    if not request.config.getoption("--deterministic"):
        yield
        return
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.config.getoption("--require-gpu"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if any(word in reason for word in GPU_SKIP_WORDS):
            report.outcome = "failed"
            report.longrepr = f"--require-gpu: skipped for want of a GPU on a GPU runner: {reason}"
