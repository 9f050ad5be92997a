"""Gradients by finite differences (float64 gradcheck) and exactly at integer coordinates."""

from __future__ import annotations

import pytest
import torch

import softsplat
from softsplat import Mode

from .compare import compare, gradient_scale, run
from .strategies import Case

MODES = list(Mode)


def smooth_inputs(mode: Mode, device: str, seed: int = 0, shape=(2, 3, 5, 6)):
    """float64 inputs whose target coordinates stay >= 0.1 away from integers (floor is flat)."""
    generator = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    input = torch.randn(shape, generator=generator, dtype=torch.float64)
    whole = torch.randint(-2, 3, (N, 2, H, W), generator=generator).double()
    fraction = 0.1 + 0.8 * torch.rand((N, 2, H, W), generator=generator, dtype=torch.float64)
    flow = whole + fraction
    metric = torch.randn((N, 1, H, W), generator=generator, dtype=torch.float64)
    if mode.kind == "linear":
        metric = metric.abs() + 0.5
    tensors = [t.to(device).requires_grad_() for t in (input, flow, metric)]
    return tensors if mode.needs_metric else tensors[:2] + [None]


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_gradcheck_float64(backend, device, mode) -> None:
    if torch.float64 not in backend.dtypes:
        pytest.skip(f"backend {backend.name!r} declares no float64 (dtypes: {backend.dtypes})")
    input, flow, metric = smooth_inputs(mode, device)
    arguments = (input, flow) if metric is None else (input, flow, metric)

    def function(*tensors):
        return softsplat.splat(*tensors, mode=mode, backend=backend.name)

    # Triton's interpreter spends ~10 ms per kernel launch: the full numerical Jacobian (one
    # forward per input element) would take minutes, so there gradcheck checks random
    # directional derivatives instead (fast_mode), with the same tolerances.
    slow = backend.name == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(function, arguments, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=slow)


def _integer_case(backend, device, mode: Mode) -> Case:
    dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    input, flow, metric = smooth_inputs(mode, device, seed=1, shape=(1, 2, 4, 5))
    flow = flow.detach().round()  # every target coordinate is an integer
    tensors = [None if t is None else t.detach().to(dtype) for t in (input, flow, metric)]
    return Case(*tensors, mode, (True, True, metric is not None))


def test_integer_coordinates_sum_is_the_right_derivative(backend, device) -> None:
    """At integer targets the flow gradient is that of the cell floor() selects: the one-sided
    derivative towards +x/+y, as the reference computes it. ``sum`` is linear in the tap
    weights, so a one-sided finite difference of the float64 oracle is exact up to rounding."""
    case = _integer_case(backend, device, Mode.SUM)
    cotangent = torch.randn(case.input.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    got = run(backend.name, case, cotangent).grads["flow"]

    def objective(flow):
        return (softsplat.splat(case.input.double(), flow, mode="sum", backend="torch") * cotangent).sum()

    step, base = 1e-3, case.flow.double()
    expected = torch.zeros_like(base)
    for index in range(base.numel()):
        moved = base.clone().flatten()
        moved[index] += step
        expected.view(-1)[index] = (objective(moved.view_as(base)) - objective(base)) / step
    compare("grad of flow", got, expected, expected, gradient_scale(expected))


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_integer_coordinates_match_the_oracle(backend, device, mode) -> None:
    case = _integer_case(backend, device, mode)
    cotangent = torch.randn(case.input.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    got = run(backend.name, case, cotangent)
    reference = run("torch", case, cotangent, dtype=torch.float64)
    same_dtype = run("torch", case, cotangent)
    for name, grad in got.grads.items():
        expected = reference.grads[name]
        compare(f"grad of {name}", grad, expected, same_dtype.grads[name], gradient_scale(expected))


def test_nonfinite_flow_pixels_contribute_nothing(backend, device) -> None:
    """A source pixel with a NaN or infinite target adds nothing and gets zero gradients."""
    dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    input = torch.arange(1.0, 13.0, dtype=dtype, device=device).view(1, 1, 3, 4)
    flow = torch.zeros(1, 2, 3, 4, dtype=dtype, device=device)
    flow[0, 0, 1, 1] = float("nan")
    flow[0, 1, 2, 3] = float("inf")
    flow[0, 0, 0, 0] = -1e30
    input.requires_grad_()
    flow.requires_grad_()
    out = softsplat.splat(input, flow, mode="sum", backend=backend.name)
    expected = input.detach().clone()
    for y, x in ((1, 1), (2, 3), (0, 0)):
        expected[0, 0, y, x] = 0
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    grad_input, grad_flow = torch.autograd.grad(out, (input, flow), torch.ones_like(out))
    for y, x in ((1, 1), (2, 3), (0, 0)):
        assert grad_input[0, 0, y, x] == 0 and (grad_flow[0, :, y, x] == 0).all()


def test_requested_gradients_only(backend, device) -> None:
    """Each combination of arguments requiring grad gets exactly those gradients, right."""
    for flags in [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1) if a or b or c]:
        input, flow, metric = smooth_inputs(Mode.SOFT, device, seed=3, shape=(1, 2, 4, 4))
        dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
        case = Case(*(t.detach().to(dtype) for t in (input, flow, metric)), Mode.SOFT, tuple(map(bool, flags)))
        cotangent = torch.randn(case.input.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
        got = run(backend.name, case, cotangent)
        reference = run("torch", case, cotangent, dtype=torch.float64)
        assert set(got.grads) == {n for n, f in zip(("input", "flow", "metric"), flags) if f}
        for name, grad in got.grads.items():
            compare(f"grad of {name}", grad, reference.grads[name], reference.grads[name], gradient_scale(reference.grads[name]))
