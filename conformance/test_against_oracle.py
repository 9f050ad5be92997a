"""Every backend's forward and VJP against the oracle, on Hypothesis-drawn cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import softsplat
from softsplat.modes import Mode

from .compare import compare, flushed, gradient_magnitudes, run
from .strategies import CHANNEL_BOUNDARIES, Case, cases, seeds


def check_case(backend, case, generator) -> None:
    """Forward and every requested gradient of ``backend`` against the oracle (see compare.py)."""
    out_shape = case.input.shape
    cotangent = torch.randn(out_shape, generator=generator, dtype=torch.float64)
    cotangent = cotangent.to(case.input.dtype).double().to(case.input.device)  # same values everywhere

    got = run(backend.name, case, cotangent)
    same_dtype = run("torch", case, cotangent)
    reference = run("torch", case, cotangent, dtype=torch.float64)

    # An output element's error is relative to the same splat of |input| (no cancellation).
    magnitude_case = type(case)(
        case.input.detach().double().abs(),
        case.flow.detach().double(),
        None if case.metric is None else case.metric.detach().double(),
        case.mode,
        (False, False, False),
        case.stable,
    )
    scale = run("torch", magnitude_case, cotangent).output.nan_to_num(posinf=0.0)
    assert got.output.dtype == case.input.dtype and got.output.device == case.input.device
    compute_dtype = softsplat.modes.compute_dtype(case.input.dtype)
    targets = sources = None
    # The ordered forward (deterministic mode) adds without atomics: it flushes nothing (docs/spec.md, section 9).
    ordered = torch.are_deterministic_algorithms_enabled() and case.input.device.type in backend.deterministic_when_asked_on
    if (case.input.device.type in backend.flushes_subnormals_on and not ordered and compute_dtype == torch.float32
            and case.mode.kind != "sum"):
        targets, sources = flushed(case)
    compare("output", got.output, reference.output, same_dtype.output, scale, compute_dtype, targets)
    assert set(got.grads) == set(reference.grads), f"gradients {set(got.grads)} != {set(reference.grads)}"
    magnitudes = gradient_magnitudes(case, cotangent) if got.grads else {}
    for name, grad in got.grads.items():
        tensor = dict(zip(("input", "flow", "metric"), case.tensors()))[name]
        assert grad.dtype == tensor.dtype, f"grad of {name}: dtype {grad.dtype}, expected {tensor.dtype}"
        expected = reference.grads[name]
        compare(
            f"grad of {name}", grad, expected, same_dtype.grads[name], magnitudes[name], compute_dtype, sources
        )


@given(data=st.data())
def test_matches_oracle(backend, device, data) -> None:
    case = data.draw(cases(dtypes=backend.dtypes, device=device), label="case")
    check_case(backend, case, data.draw(seeds(), label="cotangent seed"))


@given(data=st.data())
def test_many_channels_match_oracle(backend, device, data) -> None:
    """Feature maps: channel counts up to 320 (the 64-192 of frame interpolation's pyramids and
    both sides of every channel block a kernel may use), on small images, forward and gradients."""
    case = data.draw(
        cases(dtypes=backend.dtypes, device=device, channels=CHANNEL_BOUNDARIES, max_side=5), label="case"
    )
    check_case(backend, case, data.draw(seeds(), label="cotangent seed"))


@pytest.mark.parametrize("channels", [9, 17, 33, 65, 193])
@given(data=st.data())
def test_many_channels_on_wide_rows_match_oracle(backend, device, channels, data) -> None:
    """Feature maps on rows of 33 to 40 pixels, up to 3 rows: the vector kernels move a row's
    targets 8 or 16 at a time (tiles of channels by pixels) and the rest one by one, which no
    row of the small images above reaches. Channel counts one past whole 8- and 16-channel
    blocks (tiles and a rest), each one every run (drawn from many, the simplest come first)."""
    if backend.name == "triton" and device == "cpu":
        pytest.skip("Triton's kernels take pixels in flat blocks, not rows (their channel blocks: the "
                    "test above); its interpreter takes minutes on these sizes")
    case = data.draw(
        cases(dtypes=backend.dtypes, device=device, channels=(channels,), max_side=3, widths=(33, 40)),
        label="case",
    )
    check_case(backend, case, data.draw(seeds(), label="cotangent seed"))


def jumping_reaches_case(channels: int, mode: str, stable: bool, device) -> Case:
    """Two 64 x 12 images, in bands of 8 rows (the CPU kernels' smallest): most pixels move by a
    quarter pixel, but band b's first column lands on row 32 - 4b and its second on row 38 + 4b
    (at most 62), so that from the fifth band on each band's reach starts above the previous
    one's and is wider: the CPU backward's rings of prepared rows would prepare them again and
    again, and it prepares each image once, whole, instead (one buffer, used by both)."""
    generator = torch.Generator().manual_seed(channels)
    N, H, W = 2, 64, 12
    flow = torch.full((N, 2, H, W), 0.25, dtype=torch.float64)
    rows = torch.arange(H, dtype=torch.float64)
    band = rows // 8
    flow[:, 1, :, 0] = 32 - 4 * band - rows + 0.5
    flow[:, 1, :, 1] = torch.clamp(38 + 4 * band, max=62) - rows + 0.5
    input = torch.randn(N, channels, H, W, generator=generator, dtype=torch.float64)
    metric = torch.randn(N, 1, H, W, generator=generator, dtype=torch.float64)
    mode = Mode(mode)
    uses_metric = mode.kind in ("linear", "soft", "max")
    return Case(input.float().to(device), flow.float().to(device), metric.float().to(device) if uses_metric else None,
                mode, (True, True, uses_metric), stable)


@pytest.mark.parametrize("channels", [3, 16, 64])
@pytest.mark.parametrize("mode, stable", [("soft-addeps", False), ("sum", False), ("soft-addeps", True)])
def test_bands_whose_reaches_jump_about_match_oracle(backend, device, channels, mode, stable) -> None:
    """Forward and gradients of jumping_reaches_case against the oracle (the conformance suite's
    images are too small to have more than two bands)."""
    if torch.float32 not in backend.dtypes:
        pytest.skip(f"{backend.name} does not take float32")
    check_case(backend, jumping_reaches_case(channels, mode, stable, device), torch.Generator().manual_seed(1))
