"""Stable soft splatting: finite where plain soft overflows, and equal to soft where soft is
finite, up to the eps effect; every backend and dtype."""

from __future__ import annotations

import math

import pytest
import torch

import softsplat

from .strategies import Case
from .test_against_oracle import check_case


def _collision(dtype, device, big: float):
    """Four source pixels of a 1x4 row, all landing on pixel 1, with metrics near ``big``."""
    input = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=torch.float64)
    flow = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    flow[0, 0, 0] = torch.tensor([1.0, 0.0, -1.0, -2.0])
    metric = torch.tensor([[[[big, big - 1.0, big - 2.0, big - 30.0]]]], dtype=torch.float64)
    return (input.to(dtype).to(device), flow.to(dtype).to(device), metric.to(dtype).to(device))


@pytest.mark.parametrize("big", [1e4, -1e4, 100.0])
def test_stable_is_finite_and_right_where_soft_overflows(backend, device, big) -> None:
    for dtype in backend.dtypes:
        input, flow, metric = _collision(dtype, device, big)
        expected_weights = torch.softmax(metric.double().flatten(), 0)
        expected = (expected_weights * input.double().flatten()).sum()
        stable = softsplat.splat(input, flow, metric, mode="soft", backend=backend.name, stable=True)
        assert stable.isfinite().all(), (dtype, stable)
        tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
        # the winner's weight: 1 / (1 + e^-1 + e^-2 + ...) in the shifted exps: eps is negligible
        torch.testing.assert_close(stable[0, 0, 0, 1].double().cpu(), expected, rtol=tolerance, atol=tolerance)
        if big > 0 and dtype != torch.float64 or big > 709:
            plain = softsplat.splat(input, flow, metric, mode="soft", backend=backend.name)
            assert not plain[0, 0, 0, 1].isfinite(), f"soft should overflow at metric {big} in {dtype}"


def test_stable_equals_soft_where_soft_is_finite(backend, device) -> None:
    generator = torch.Generator().manual_seed(0)
    dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    input = torch.randn(2, 3, 6, 7, generator=generator, dtype=torch.float64)
    flow = torch.randn(2, 2, 6, 7, generator=generator, dtype=torch.float64) * 2
    metric = torch.randn(2, 1, 6, 7, generator=generator, dtype=torch.float64)
    tensors = [t.to(dtype).to(device) for t in (input, flow, metric)]
    soft, coverage = softsplat.splat(*tensors, mode="soft-zeroeps", backend=backend.name, return_normaliser=True)
    stable = softsplat.splat(*tensors, mode="soft-zeroeps", backend=backend.name, stable=True)
    # zeroeps divides by D itself where it is non-zero: no eps effect, the shift cancels exactly
    torch.testing.assert_close(stable, soft, rtol=1e-5, atol=1e-6)
    assert (coverage > 0).any()


@pytest.mark.parametrize("spreads", [(38.0, 42.0), (290.0, 310.0), (1.0, math.inf), (30.0, math.nan)])
@pytest.mark.parametrize("mode", ["soft", "soft-zeroeps", "soft-clipeps"])
def test_stable_across_metric_spreads(backend, device, spreads, mode) -> None:
    """A batch of two images whose metrics spread over (max - min) either side of a limit:
    40 and 300 are where the cpp CPU kernels stop splatting exp(metric - image maximum) and
    rescaling per target (float32 and float64), and take the per-tap weights; one image with
    an infinite or NaN metric takes them too, beside one that need not. Every backend must give
    the oracle's answer, forward and gradients, whichever way it computes it."""
    from softsplat import Mode

    generator = torch.Generator().manual_seed(6)
    N, C, H, W = 2, 3, 40, 37
    input = torch.randn((N, C, H, W), generator=generator, dtype=torch.float64)
    flow = torch.randn((N, 2, H, W), generator=generator, dtype=torch.float64) * 3
    unit = torch.rand((N, 1, H, W), generator=generator, dtype=torch.float64)
    metric = torch.empty_like(unit)
    for n, spread in enumerate(spreads):
        finite = spread if math.isfinite(spread) else 20.0
        metric[n] = (unit[n] - unit[n].min()) / (unit[n].max() - unit[n].min()) * finite - finite / 2
        if not math.isfinite(spread):
            metric[n, 0, H // 2, W // 2] = spread
    for dtype in backend.dtypes:
        case = Case(input.to(dtype).to(device), flow.to(dtype).to(device), metric.to(dtype).to(device),
                    Mode.parse(mode), (True, True, True), stable=True)
        check_case(backend, case, torch.Generator().manual_seed(7))
