"""The deterministic paths against the oracle: every backend that computes another way under
``torch.use_deterministic_algorithms(True)`` (``deterministic_when_asked_on``: the CUDA kernels'
ordered forward on ``cpp``/``cupy`` and on the host backends, torch's deterministic
``index_add_`` on CUDA) checked there, forward and gradients, as ``test_against_oracle`` checks
the default paths."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from .strategies import CHANNEL_BOUNDARIES, cases, seeds
from .test_against_oracle import check_case


@contextlib.contextmanager
def asked(backend, device):
    """Deterministic mode, for a backend whose path on ``device`` it changes (else skipped)."""
    if device not in backend.deterministic_when_asked_on:
        pytest.skip(f"backend {backend.name!r} has no path of its own for deterministic mode on {device}")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@given(data=st.data())
def test_the_deterministic_path_matches_oracle(backend, device, data) -> None:
    with asked(backend, device):
        case = data.draw(cases(dtypes=backend.dtypes, device=device), label="case")
        check_case(backend, case, data.draw(seeds(), label="cotangent seed"))


@given(data=st.data())
def test_the_deterministic_path_with_many_channels_matches_oracle(backend, device, data) -> None:
    with asked(backend, device):
        case = data.draw(cases(dtypes=backend.dtypes, device=device, channels=CHANNEL_BOUNDARIES, max_side=5),
                         label="case")
        check_case(backend, case, data.draw(seeds(), label="cotangent seed"))
