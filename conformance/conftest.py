"""Which backends the suite checks, and on which device.

Default: every registered backend; an unavailable one is skipped with its reason, unless it is
named in ``--require-backends``, which turns the skip into a failure (GPU CI uses it). With
``--deterministic`` (root conftest.py) the session runs under
``torch.use_deterministic_algorithms(True)`` and a backend with no deterministic path on the
device is skipped likewise.
"""

from __future__ import annotations

import os

import pytest
import torch

from softsplat import backends


def _listed(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def selected_backends(config: pytest.Config) -> list[str]:
    chosen = _listed(config.getoption("--backend")) or _listed(os.environ.get("SOFTSPLAT_BACKEND"))
    names = chosen or list(backends.names())
    unknown = [n for n in names + _listed(config.getoption("--require-backends")) if n not in backends.names()]
    if unknown:
        raise pytest.UsageError(f"--backend/--require-backends: unknown backends {unknown}; known: {backends.names()}")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", selected_backends(metafunc.config), scope="session")


@pytest.fixture(scope="session")
def device(request) -> str:
    chosen = request.config.getoption("--device")
    return chosen or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def backend(backend_name: str, device: str, request) -> backends.Backend:
    """The backend under test; skipped (or failed, if required) where it cannot run."""
    candidate = backends.get(backend_name)
    required = backend_name in _listed(request.config.getoption("--require-backends"))
    reason = candidate.unavailable_reason
    if reason is None and device not in candidate.devices():
        reason = f"runs on {'/'.join(candidate.devices())}, not on {device}"
    if reason is None and request.config.getoption("--deterministic") and not candidate.is_deterministic(device):
        reason = f"--deterministic: it has no deterministic path on {device}"
    if reason is not None:
        if required:
            pytest.fail(f"required backend {backend_name!r} cannot run on {device}: {reason}")
        pytest.skip(f"backend {backend_name!r} not checked on {device}: {reason}")
    return candidate
