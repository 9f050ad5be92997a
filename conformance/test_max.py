"""Max splatting (docs/spec.md, section 4): the nearest surface wins, ties average, no holes at
integer flows, the non-finite metric rule, zero metric gradients; every backend and dtype."""

from __future__ import annotations

import math

import pytest
import torch

import softsplat
from softsplat import Mode

from .strategies import Case
from .test_against_oracle import check_case


def _row(dtype, device, metric):
    """Four source pixels of a 1x4 row, all landing on pixel 1, with the given metrics."""
    input = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=torch.float64)
    flow = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    flow[0, 0, 0] = torch.tensor([1.0, 0.0, -1.0, -2.0])
    metric = torch.tensor([[[metric]]], dtype=torch.float64)
    return [t.to(dtype).to(device) for t in (input, flow, metric)]


@pytest.mark.parametrize(
    "metric, expected",
    [
        ([0.0, 5.0, 1.0, -3.0], 2.0),  # the largest alone
        ([7.0, 5.0, 7.0, -3.0], 2.0),  # a tie: (1 + 3) / 2
        ([-math.inf, -math.inf, 2.0, -math.inf], 3.0),  # -inf never wins
        ([math.inf, 100.0, math.inf, math.inf], (1.0 + 3.0 + 4.0) / 3),  # +inf ties with +inf
    ],
)
def test_the_largest_metric_wins(backend, device, metric, expected) -> None:
    for dtype in backend.dtypes:
        input, flow, m = _row(dtype, device, metric)
        out, coverage = softsplat.splat(input, flow, m, mode="max-zeroeps", backend=backend.name, return_normaliser=True)
        tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
        assert abs(float(out[0, 0, 0, 1]) - expected) <= tolerance * expected, (dtype, out)
        winners = sum(1 for v in metric if v == max(metric))
        assert float(coverage[0, 0, 0, 1]) == winners, (dtype, coverage)
        assert float(coverage.sum()) == winners  # integer flows: nothing anywhere else


def test_nan_and_lone_minus_infinity(backend, device) -> None:
    """A NaN metric makes its target NaN (result and coverage); a target reached only by
    metrics of -inf gets nothing: coverage 0, result 0."""
    for dtype in backend.dtypes:
        input, flow, m = _row(dtype, device, [0.0, math.nan, 1.0, 2.0])
        out, coverage = softsplat.splat(input, flow, m, mode="max", backend=backend.name, return_normaliser=True)
        assert out[0, 0, 0, 1].isnan() and coverage[0, 0, 0, 1].isnan(), (dtype, out, coverage)
        input, flow, m = _row(dtype, device, [-math.inf] * 4)
        out, coverage = softsplat.splat(input, flow, m, mode="max", backend=backend.name, return_normaliser=True)
        assert not out.any() and not coverage.any(), (dtype, out, coverage)


def test_integer_flow_leaves_no_holes(backend, device) -> None:
    """A foreground pixel moved by an integer flow has weight 0 on its east and south
    neighbours; those taps take no part, so the background there still shows. Zero flow
    gives back the input exactly, whatever the metric."""
    generator = torch.Generator().manual_seed(3)
    input = torch.randn(2, 3, 6, 7, generator=generator, dtype=torch.float64)
    metric = torch.randint(0, 3, (2, 1, 6, 7), generator=generator).double() * 10  # depth layers
    shift = torch.zeros(2, 2, 6, 7, dtype=torch.float64)
    shift[:, 0] = torch.randint(-2, 3, (2, 6, 7), generator=generator).double()  # disparity: along x only
    for dtype in backend.dtypes:
        x, f, m = (t.to(dtype).to(device) for t in (input, torch.zeros_like(shift), metric))
        out = softsplat.splat(x, f, m, mode="max-zeroeps", backend=backend.name)
        torch.testing.assert_close(out, x, rtol=0, atol=0)
        f = shift.to(dtype).to(device)
        out, coverage = softsplat.splat(x, f, m, mode="max-zeroeps", backend=backend.name, return_normaliser=True)
        # each target is a plain copy of its winners' average: coverage counts whole pixels
        assert torch.equal(coverage, coverage.round()), coverage
        reference = softsplat.splat(x, f, m, mode="max-zeroeps", backend="torch")
        torch.testing.assert_close(out, reference)  # dtype's tolerance: ties sum in any order


def test_max_is_the_limit_of_soft(backend, device) -> None:
    """max-zeroeps is the limit of soft-zeroeps with metric alpha * metric as alpha grows:
    with metrics 1 apart and alpha = 200, the losers' share is below e^-200."""
    generator = torch.Generator().manual_seed(4)
    input = torch.randn(1, 2, 8, 9, generator=generator, dtype=torch.float64)
    flow = torch.randn(1, 2, 8, 9, generator=generator, dtype=torch.float64) * 2
    metric = torch.randint(0, 5, (1, 1, 8, 9), generator=generator).double()
    dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    x, f, m = (t.to(dtype).to(device) for t in (input, flow, metric))
    got = softsplat.splat(x, f, m, mode="max-zeroeps", backend=backend.name)
    soft = softsplat.splat(x, f, 200 * m, mode="soft-zeroeps", backend="torch", stable=True)
    torch.testing.assert_close(got, soft, rtol=1e-5, atol=1e-6)


def test_metric_gradient_is_zero(backend, device) -> None:
    generator = torch.Generator().manual_seed(5)
    shape = (1, 3, 5, 6)
    input = torch.randn(shape, generator=generator, dtype=torch.float64)
    flow = torch.randn((1, 2, 5, 6), generator=generator, dtype=torch.float64) * 2
    metric = torch.randn((1, 1, 5, 6), generator=generator, dtype=torch.float64)
    metric[0, 0, 0, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    dtype = torch.float32 if torch.float32 in backend.dtypes else backend.dtypes[0]
    leaves = [t.to(dtype).to(device).requires_grad_() for t in (input, flow, metric)]
    out, coverage = softsplat.splat(*leaves, mode="max", backend=backend.name, return_normaliser=True)
    grad = torch.autograd.grad((out.nan_to_num() * 2).sum() + coverage.nan_to_num().sum(), leaves[2])[0]
    assert grad.dtype == dtype and torch.equal(grad, torch.zeros_like(grad)), grad


@pytest.mark.parametrize("mode", [m for m in Mode if m.kind == "max"], ids=str)
def test_depth_layers_match_the_oracle(backend, device, mode) -> None:
    """Depth layers with ties, integer and fractional flows, and every non-finite metric."""
    generator = torch.Generator().manual_seed(6)
    N, C, H, W = 2, 3, 12, 11
    input = torch.randn((N, C, H, W), generator=generator, dtype=torch.float64)
    flow = torch.randn((N, 2, H, W), generator=generator, dtype=torch.float64) * 3
    flow[0] = flow[0].round()
    metric = torch.randint(0, 3, (N, 1, H, W), generator=generator).double()
    metric.view(-1)[::13] = math.inf
    metric.view(-1)[5::17] = -math.inf
    metric.view(-1)[7::41] = math.nan
    for dtype in backend.dtypes:
        case = Case(input.to(dtype).to(device), flow.to(dtype).to(device), metric.to(dtype).to(device),
                    mode, (True, True, True))
        check_case(backend, case, torch.Generator().manual_seed(7))


def test_stable_is_refused(backend, device) -> None:
    input, flow, metric = _row(backend.dtypes[0], device, [0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="stable: .*max mode"):
        softsplat.splat(input, flow, metric, mode="max", backend=backend.name, stable=True)
    with pytest.raises(ValueError, match="metric: mode 'max-addeps' needs a metric"):
        softsplat.splat(input, flow, None, mode="max", backend=backend.name)
