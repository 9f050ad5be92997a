"""Properties that hold exactly (or to rounding) whatever the backend."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import softsplat

from .compare import TOLERANCES
from .strategies import seeds, shapes


def _dtype(backend, data):
    return data.draw(st.sampled_from(backend.dtypes), label="dtype")


@given(data=st.data())
def test_zero_flow_sum_is_identity(backend, device, data) -> None:
    dtype = _dtype(backend, data)
    shape = data.draw(shapes(), label="shape")
    input = torch.randn(shape, generator=data.draw(seeds())).to(dtype).to(device)
    flow = torch.zeros(shape[0], 2, *shape[2:], dtype=dtype, device=device)
    out = softsplat.splat(input, flow, mode="sum", backend=backend.name)
    torch.testing.assert_close(out, input, rtol=0, atol=0)


@given(data=st.data())
def test_integer_flow_is_an_exact_shift(backend, device, data) -> None:
    dtype = _dtype(backend, data)
    N, C, H, W = data.draw(shapes(), label="shape")
    dx = data.draw(st.integers(-W - 1, W + 1), label="dx")
    dy = data.draw(st.integers(-H - 1, H + 1), label="dy")
    input = torch.randn((N, C, H, W), generator=data.draw(seeds())).to(dtype).to(device)
    flow = torch.empty(N, 2, H, W, dtype=dtype, device=device)
    flow[:, 0], flow[:, 1] = dx, dy
    out = softsplat.splat(input, flow, mode="sum", backend=backend.name)
    expected = torch.zeros_like(input)
    def overlap(shift, size):  # (source, destination) ranges of a shift, empty when out of view
        kept = max(0, size - abs(shift))
        return slice(max(0, -shift), max(0, -shift) + kept), slice(max(0, shift), max(0, shift) + kept)

    (src_x, dst_x), (src_y, dst_y) = overlap(dx, W), overlap(dy, H)
    expected[:, :, dst_y, dst_x] = input[:, :, src_y, src_x]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@given(data=st.data())
def test_sum_conserves_the_total_when_all_targets_are_inside(backend, device, data) -> None:
    dtype = _dtype(backend, data)
    N, C, H, W = data.draw(shapes(), label="shape")
    generator = data.draw(seeds())
    input = torch.rand((N, C, H, W), generator=generator, dtype=torch.float64)
    # targets anywhere in [0, W-1] x [0, H-1]: all four taps of every pixel are kept
    tx = torch.rand((N, H, W), generator=generator, dtype=torch.float64) * max(W - 1, 0)
    ty = torch.rand((N, H, W), generator=generator, dtype=torch.float64) * max(H - 1, 0)
    flow = torch.stack([tx - torch.arange(W).view(1, 1, W), ty - torch.arange(H).view(1, H, 1)], 1)
    out = softsplat.splat(input.to(dtype).to(device), flow.to(dtype).to(device), mode="sum", backend=backend.name)
    tol = TOLERANCES[dtype]
    total = input.to(dtype).double().sum(dim=(2, 3))
    torch.testing.assert_close(out.double().cpu().sum(dim=(2, 3)), total, rtol=tol.rtol * 10, atol=tol.atol * 10 + tol.rtol * H * W)


@given(data=st.data())
def test_batched_equals_one_sample_at_a_time(backend, device, data) -> None:
    dtype = _dtype(backend, data)
    N, C, H, W = data.draw(shapes(max_batch=3), label="shape")
    generator = data.draw(seeds())
    input = torch.randn((N, C, H, W), generator=generator).to(dtype).to(device)
    flow = (torch.randn((N, 2, H, W), generator=generator) * 3).to(dtype).to(device)
    metric = torch.randn((N, 1, H, W), generator=generator).to(dtype).to(device)
    batched = softsplat.splat(input, flow, metric, mode="soft", backend=backend.name)
    for n in range(N):
        single = softsplat.splat(input[n : n + 1], flow[n : n + 1], metric[n : n + 1], mode="soft", backend=backend.name)
        torch.testing.assert_close(batched[n : n + 1], single, rtol=TOLERANCES[dtype].rtol, atol=TOLERANCES[dtype].atol)
