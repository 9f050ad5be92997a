"""Fixed edge cases, every backend, forward and gradients against the oracle: non-finite and far
out-of-bounds targets, targets just outside [-1, W), exp overflow, values at the edges of each
dtype, zero sizes and non-contiguous layouts. Also what the sanitizer session runs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from .strategies import Case, cases, laid_out, seeds
from .test_against_oracle import check_case

MODES = ["sum", "avg-zeroeps", "linear-clipeps", "soft", "soft-zeroeps"]


def _edge_flows(H: int, W: int) -> list[float]:
    return [math.nan, math.inf, -math.inf, 1e30, -1e30, 3.4e38, -3.4e38, float(W), -1.0 - 1e-3, -1.0, W - 1e-3,
            float(H), -(W + 1.0), 0.5, 1e-40, -2.0]


def _case(mode: str, dtype: torch.dtype, device: str, shape=(2, 3, 4, 5), layout=None, metric_values=None, seed=0) -> Case:
    from softsplat import Mode

    mode = Mode.parse(mode)
    N, C, H, W = shape
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(shape, generator=generator, dtype=torch.float64)
    flow = torch.randn((N, 2, H, W), generator=generator, dtype=torch.float64) * 2
    edges = torch.tensor(_edge_flows(H, W), dtype=torch.float64)
    if flow.numel():
        flow.view(-1)[: min(flow.numel(), len(edges))] = edges[: flow.numel()]
    metric = torch.randn((N, 1, H, W), generator=generator, dtype=torch.float64) * 5
    if metric_values is not None and metric.numel():
        values = torch.tensor(metric_values, dtype=torch.float64)
        metric.view(-1)[: min(metric.numel(), len(values))] = values[: metric.numel()]
    if mode.kind == "linear":
        metric = metric.abs()

    def place(t):
        if layout == "channels_last":
            return t.to(dtype).contiguous(memory_format=torch.channels_last).to(device)
        if layout == "transposed":  # a non-contiguous view with H and W strides swapped
            return t.to(dtype).transpose(2, 3).contiguous().transpose(2, 3).to(device)
        return t.to(dtype).to(device)

    return Case(place(input), place(flow), place(metric) if mode.needs_metric else None, mode, (True, True, mode.needs_metric))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", [None, "channels_last", "transposed"])
def test_edge_flows(backend, device, mode, layout) -> None:
    for dtype in backend.dtypes:
        check_case(backend, _case(mode, dtype, device, layout=layout), torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["soft", "soft-zeroeps", "soft-clipeps", "linear"])
@pytest.mark.parametrize("channels", [3, 17])
def test_exp_overflow_and_underflow(backend, device, mode, channels) -> None:
    # Normalisers past float32's range, and near its ends: subnormal, or so large that 1 / D is
    # subnormal (where a result finished as x * (1 / D) would lose its precision). 17 channels:
    # the channel blocks of the CPU kernels, three: their packed path.
    metrics = [88.0, 89.0, 100.0, 709.0, 710.0, 1e4, -88.0, -104.0, -800.0, 3.4e38, -3.4e38, 11.0, 12.0, 0.0,
               87.5, -87.5, -100.0, 1e38, 2e-39]
    for dtype in backend.dtypes:
        check_case(backend, _case(mode, dtype, device, shape=(2, channels, 4, 5), metric_values=metrics),
                   torch.Generator().manual_seed(2))


@pytest.mark.parametrize("mode", ["soft-zeroeps", "linear-zeroeps"])
@pytest.mark.parametrize("channels", [3, 17])
def test_subnormal_normalisers(backend, device, mode, channels) -> None:
    # Pixels that stay where they are, each alone on its target, with weights whose float32
    # normaliser is subnormal (1 / D overflows), normal, or near float32's largest (1 / D is
    # subnormal): each result is its input.
    from softsplat import Mode

    generator = torch.Generator().manual_seed(3)
    shape = (1, channels, 3, 4)
    input = torch.randn(shape, generator=generator, dtype=torch.float64)
    flow = torch.zeros((1, 2, 3, 4), dtype=torch.float64)
    weights = [-89.0, -95.0, -100.0, -87.0, 0.0, 3.0, 87.5, 88.5, -89.0, -89.0, -92.0, 1.0]
    metric = torch.tensor(weights, dtype=torch.float64).view(1, 1, 3, 4)
    if Mode.parse(mode).kind == "linear":
        metric = metric.exp()  # the same weights
    for dtype in backend.dtypes:
        case = Case(input.to(dtype).to(device), flow.to(dtype).to(device), metric.to(dtype).to(device), Mode.parse(mode),
                    (True, True, True))
        check_case(backend, case, torch.Generator().manual_seed(4))


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0), (1, 1, 1, 1)])
@pytest.mark.parametrize("mode", ["sum", "soft"])
def test_zero_and_unit_sizes(backend, device, shape, mode) -> None:
    for dtype in backend.dtypes:
        check_case(backend, _case(mode, dtype, device, shape=shape), torch.Generator().manual_seed(3))


@pytest.mark.parametrize("reach", [0.5, 3.0, 60.0])
@pytest.mark.parametrize("mode", ["sum", "soft", "soft-stable"])
def test_taller_images_and_far_flows(backend, device, reach, mode) -> None:
    """Images tall enough for the CPU kernels to cut them into many bands: flows of ~0.5 and ~3
    rows keep the bands apart (their own schedule and per-band backward buffers); flows of ~60
    rows make every band reach the whole image (bands merged; whole-image backward). Rows of 37
    pixels: vectorised 16-pixel blocks and a remainder in the CPU kernels' packing."""
    from softsplat import Mode

    stable = mode.endswith("-stable")
    parsed = Mode.parse(mode.removesuffix("-stable"))
    generator = torch.Generator().manual_seed(4)
    N, C, H, W = 2, 3, 72, 37
    input = torch.randn((N, C, H, W), generator=generator, dtype=torch.float64)
    flow = torch.randn((N, 2, H, W), generator=generator, dtype=torch.float64) * reach
    metric = torch.randn((N, 1, H, W), generator=generator, dtype=torch.float64) * 3
    for dtype in backend.dtypes:
        case = Case(input.to(dtype).to(device), flow.to(dtype).to(device),
                    metric.to(dtype).to(device) if parsed.needs_metric else None, parsed,
                    (True, True, parsed.needs_metric), stable=stable)
        check_case(backend, case, torch.Generator().manual_seed(5))


DTYPE_EDGES = {
    dtype: [torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny, torch.finfo(dtype).eps,
            math.inf, -math.inf, math.nan, 0.0, -0.0]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


@given(data=st.data())
def test_no_value_where_the_oracle_has_none(backend, device, data) -> None:
    """Flows and metrics at the edges of each dtype: the backend's NaN/inf pattern is the
    oracle's (check_case compares every non-finite element's kind)."""
    dtype = data.draw(st.sampled_from(backend.dtypes), label="dtype")
    case = data.draw(cases(dtypes=(dtype,), device=device), label="case")
    edges = st.sampled_from(DTYPE_EDGES[dtype])
    flat_flow = case.flow.detach().cpu().double().flatten().clone()
    for _ in range(data.draw(st.integers(0, 6))):
        if flat_flow.numel():
            flat_flow[data.draw(st.integers(0, flat_flow.numel() - 1))] = data.draw(edges)
    flow = data.draw(laid_out(flat_flow.view(case.flow.shape), case.flow.dtype)).to(device)
    metric = case.metric
    if metric is not None and metric.numel():
        flat_metric = metric.detach().cpu().double().flatten().clone()
        for _ in range(data.draw(st.integers(0, 4))):
            flat_metric[data.draw(st.integers(0, flat_metric.numel() - 1))] = data.draw(edges)
        if case.mode.kind == "linear":
            flat_metric = flat_metric.abs()
        metric = flat_metric.view(metric.shape).to(metric.dtype).to(device)
    check_case(backend, Case(case.input, flow, metric, case.mode, case.requires_grad), data.draw(seeds()))


@pytest.mark.parametrize("x_or_y", [0, 1])
def test_a_negative_subnormal_flow_keeps_its_pixel_in_its_own_cell(backend, device, x_or_y) -> None:
    """A pixel in column (row) 0 with a flow of -1e-40 lands just left of (above) itself: its
    cell is the one from -1, so its flow gradient is that cell's difference. An instruction that
    flushes subnormals to zero (a floor with .ftz on a GPU) puts it in the cell from 0 instead:
    a gradient of 21 where 6 is right, though the forward differs only subnormally."""
    values = torch.tensor([[3.0, 5.0, 7.0, 11.0], [1.0, 2.0, 3.0, 4.0]]).view(1, 1, 2, 4)
    weights = torch.tensor([[2.0, 9.0, 4.0, 1.0], [1.0, 1.0, 1.0, 1.0]]).view(1, 1, 2, 4)
    if x_or_y:  # the same case transposed: the pixel moves up
        values, weights = values.transpose(2, 3).contiguous(), weights.transpose(2, 3).contiguous()
    import softsplat

    for dtype in (d for d in (torch.float32, torch.float64) if d in backend.dtypes):
        flow = torch.zeros((1, 2, *values.shape[2:]), dtype=dtype)
        flow[0, x_or_y, 0, 0] = -1e-40
        flow = flow.to(device).requires_grad_()
        out = softsplat.splat(values.to(dtype).to(device), flow, mode="sum", backend=backend.name)
        (out * weights.to(dtype).to(device)).sum().backward()
        assert flow.grad[0, x_or_y, 0, 0].item() == 6.0, f"{dtype}: {flow.grad[0, :, 0, 0].tolist()}"
        check_case(backend, Case(values.to(dtype).to(device), flow.detach(), None, softsplat.Mode.parse("sum"),
                                 (True, True, False)), torch.Generator().manual_seed(6))
