"""float16 and bfloat16 results written in their own dtype: where nothing is differentiated,
the ops-based backends' kernels round the result into the input's dtype themselves (the ops'
``cast``, no cast pass after). It must be, bitwise, the compute-dtype result rounded by torch's
cast, which is what a differentiated call returns (docs/spec.md, dtypes)."""

from __future__ import annotations

import unittest.mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import softsplat
from softsplat.backends import ops
from softsplat.backends.ops import OpsBackend
from softsplat.modes import Mode

from .strategies import CHANNEL_BOUNDARIES, Case, cases

NARROW = (torch.float16, torch.bfloat16)


def _splat(backend, case, cast: bool):
    """The result and normaliser under inference, with the ops' ``cast`` as given."""
    with unittest.mock.patch.object(ops, "casts", lambda problem: cast and problem.input.dtype in NARROW):
        with torch.inference_mode():
            return softsplat.splat(
                case.input, case.flow, case.metric, mode=case.mode, backend=backend.name, stable=case.stable,
                return_normaliser=case.mode.kind != "sum",
            )


@given(data=st.data())
def test_a_16_bit_result_is_the_compute_dtype_result_rounded(backend, device, data) -> None:
    if not isinstance(backend, OpsBackend):
        pytest.skip(f"backend {backend.name!r} computes with torch's ops and casts after (no ops of its own)")
    dtypes = [dtype for dtype in NARROW if dtype in backend.dtypes]
    case = data.draw(cases(dtypes=dtypes, device=device, channels=CHANNEL_BOUNDARIES, max_side=7), label="case")
    check_rounded(backend, device, case)


@pytest.mark.parametrize("width", [8, 15, 16, 17, 24, 33, 40])
@pytest.mark.parametrize("dtype", NARROW)
def test_wide_rows_are_rounded_alike(backend, device, dtype, width) -> None:
    """Rows as wide as the CPU kernels' vectors (16 and 8 values at a time, then one by one),
    for one to three channels (packed), a block and a block and one, every mode."""
    if not isinstance(backend, OpsBackend):
        pytest.skip(f"backend {backend.name!r} computes with torch's ops and casts after (no ops of its own)")
    if dtype not in backend.dtypes:
        pytest.skip(f"backend {backend.name!r} does not take {dtype}")
    generator = torch.Generator().manual_seed(width)
    for channels, mode, stable in [(3, Mode.SOFT, False), (17, Mode.SOFT, True), (16, Mode.SUM, False),
                                   (2, Mode.LINEAR_CLIPEPS, False), (33, Mode.MAX, False), (1, Mode.AVG, False)]:
        shape = (2, channels, 3, width)
        input = torch.randn(shape, generator=generator).to(dtype).to(device)
        flow = (3 * torch.randn(2, 2, 3, width, generator=generator)).to(device)
        metric = torch.randn(2, 1, 3, width, generator=generator).to(device)
        case = Case(input, flow, None if mode in (Mode.SUM, Mode.AVG) else metric, mode, (False, False, False), stable)
        check_rounded(backend, device, case)


def check_rounded(backend, device, case) -> None:
    """The result ``case`` gets in its own dtype (cast) against the compute-dtype result rounded."""
    # Bitwise where the sums are the same on every run: a deterministic forward, the ordered
    # forward of a backend that has one (asked for), Triton's interpreter (a launch's programs
    # one after another). Else float32 atomics add in any order, and the two results may differ
    # as the sums do (less than a unit in the last place of the 16-bit dtype, but for sums that
    # cancel).
    ordered = device not in backend.deterministic_on and device in backend.deterministic_when_asked_on
    repeatable = ordered or device in backend.deterministic_on or (backend.name == "triton" and device == "cpu")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(previous or ordered)
    try:
        own = _splat(backend, case, cast=True)
        rounded = _splat(backend, case, cast=False)
    finally:
        torch.use_deterministic_algorithms(previous)
    if case.mode.kind == "sum":
        own, rounded = (own, None), (rounded, None)
    assert own[0].dtype == case.input.dtype and own[0].shape == case.input.shape
    if not repeatable:
        eps = torch.finfo(case.input.dtype).eps
        torch.testing.assert_close(own[0].float(), rounded[0].float(), rtol=eps, atol=eps * 2**-10, equal_nan=True)
        return
    # Bitwise but for a NaN's payload (which nothing promises).
    nan = own[0].isnan()
    assert torch.equal(nan, rounded[0].isnan()), (own[0], rounded[0])
    bits = [torch.where(nan, 0, t).view(torch.int16) for t in (own[0], rounded[0])]
    assert torch.equal(*bits), (own[0], rounded[0])
    if own[1] is not None:
        torch.testing.assert_close(own[1], rounded[1], rtol=0, atol=0, equal_nan=True)
