"""Backend ``torch``: the oracle. Pure, differentiable torch, written to be read, not to be fast.

This module is the executable form of docs/spec.md; every other backend is tested against it, and its
gradients are whatever autograd makes of it. Where it and docs/spec.md disagree, fix one of them.
"""

from __future__ import annotations

import torch

from ..modes import Mode, safe_normaliser
from .base import Backend, Problem


def taps(flow: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The four bilinear taps of every source pixel of ``flow [N, 2, H, W]``.

    Returns, per tap (north-west, north-east, south-west, south-east), ``(target, weight, keep)``:
    the flat target index ``(n * H + ty) * W + tx`` where kept, the differentiable bilinear
    weight ``[N, H, W]``, and whether the tap is kept (the pixel lands and the tap is inside).
    """
    N, _, H, W = flow.shape
    xs = torch.arange(W, dtype=flow.dtype, device=flow.device).view(1, 1, W)
    ys = torch.arange(H, dtype=flow.dtype, device=flow.device).view(1, H, 1)
    fx = xs + flow[:, 0]  # [N, H, W]
    fy = ys + flow[:, 1]
    x0, y0 = torch.floor(fx), torch.floor(fy)
    # Checked in floating point, before any conversion to integers: non-finite and far
    # out-of-bounds pixels contribute nothing.
    lands = fx.isfinite() & fy.isfinite() & (x0 >= -1) & (x0 <= W - 1) & (y0 >= -1) & (y0 <= H - 1)
    # Pixels that do not land get coordinate 0, so their (discarded) taps stay finite and pass
    # no NaN into the flow gradient; `where` gives them a zero gradient.
    fx, fy = torch.where(lands, fx, 0), torch.where(lands, fy, 0)
    x0, y0 = torch.where(lands, x0, 0), torch.where(lands, y0, 0)
    x1, y1 = x0 + 1, y0 + 1
    # floor() has zero derivative, so at integer coordinates the gradient is that of the cell
    # floor() selects.
    corners = (
        (x0, y0, (x1 - fx) * (y1 - fy)),
        (x1, y0, (fx - x0) * (y1 - fy)),
        (x0, y1, (x1 - fx) * (fy - y0)),
        (x1, y1, (fx - x0) * (fy - y0)),
    )
    batch = torch.arange(N, device=flow.device).view(N, 1, 1)
    result = []
    for tx, ty, weight in corners:
        keep = lands & (tx >= 0) & (tx <= W - 1) & (ty >= 0) & (ty <= H - 1)
        target = (batch * H + torch.where(keep, ty, 0).long()) * W + torch.where(keep, tx, 0).long()
        result.append((target, weight, keep))
    return result


def splat_sum(values: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Summation splatting ``S(values)``: ``values [N, K, H, W]``, ``flow [N, 2, H, W]``, one dtype.

    Every source pixel ``(n, y, x)`` lands at ``(x + flow[n, 0], y + flow[n, 1])`` and adds
    ``tap weight * values[n, :, y, x]`` to each of the four pixels around it that is in bounds.
    """
    N, K, H, W = values.shape
    per_pixel = values.permute(0, 2, 3, 1)  # [N, H, W, K]
    out = values.new_zeros(N * H * W, K)
    for target, weight, keep in taps(flow):
        out.index_add_(0, target[keep], weight[keep].unsqueeze(1) * per_pixel[keep])
    return out.view(N, H, W, K).permute(0, 3, 1, 2)


def splat_maximum(metric: torch.Tensor, flow: torch.Tensor, covering: bool = False) -> torch.Tensor:
    """``M``: per target pixel, the maximum metric over the source pixels with a kept tap on it
    (stable soft splatting); with ``covering`` (max splatting), over the kept taps of positive
    bilinear weight only. -inf where nothing counts; NaN propagates. No gradient."""
    N, _, H, W = flow.shape
    maximum = torch.full((N * H * W,), float("-inf"), dtype=flow.dtype, device=flow.device)
    values = metric.detach().to(flow.dtype)[:, 0]
    for target, weight, keep in taps(flow.detach()):
        counts = keep & (weight > 0) if covering else keep
        maximum.scatter_reduce_(0, target[counts], values[counts], "amax")
    return maximum.view(N, 1, H, W)


def stable_tap_weight(metric: torch.Tensor, reached: torch.Tensor) -> torch.Tensor:
    """Stable soft splatting's weight of a tap on a target whose maximum is ``reached``:
    ``exp(metric - M)``, 0 where ``M`` is -inf (only metrics of -inf landed there)."""
    return torch.where(reached == float("-inf"), 0.0, torch.exp(metric - reached))


class _Winners(torch.autograd.Function):
    """Max splatting's tap weights (``max_tap_weight``); the metric's gradient is zero."""

    @staticmethod
    def forward(ctx, metric, reached):
        ctx.mark_non_differentiable(reached)
        wins = (metric == reached) & (reached != float("-inf"))
        return torch.where(reached.isnan(), float("nan"), wins.to(reached.dtype))

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad), None


def max_tap_weight(metric: torch.Tensor, reached: torch.Tensor) -> torch.Tensor:
    """Max splatting's weight of a tap on a target whose maximum is ``reached``: 1 where the
    source's metric is that maximum (ties all count), else 0; 0 where ``M`` is -inf, NaN where
    ``M`` is NaN. Piecewise constant in ``metric``: its gradient there is zero."""
    return _Winners.apply(metric, reached.detach())


def splat_per_tap(values: torch.Tensor, metric: torch.Tensor, flow: torch.Tensor, maximum: torch.Tensor,
                  tap_weight=stable_tap_weight):
    """``(S(values * w), S(w))`` with per-tap weights ``w = tap_weight(metric, M(target))``, ``M``
    given and detached: stable soft splatting (``stable_tap_weight``) or max splatting
    (``max_tap_weight``)."""
    N, K, H, W = values.shape
    per_pixel = values.permute(0, 2, 3, 1)  # [N, H, W, K]
    flat_maximum = maximum.detach().reshape(-1)
    numerator = values.new_zeros(N * H * W, K)
    normaliser = values.new_zeros(N * H * W, 1)
    for target, weight, keep in taps(flow):
        w = tap_weight(metric[:, 0][keep], flat_maximum[target[keep]])
        numerator.index_add_(0, target[keep], weight[keep].unsqueeze(1) * (per_pixel[keep] * w.unsqueeze(1)))
        normaliser.index_add_(0, target[keep], weight[keep].unsqueeze(1) * w.unsqueeze(1))
    return (numerator.view(N, H, W, K).permute(0, 3, 1, 2), normaliser.view(N, H, W, 1).permute(0, 3, 1, 2))


def splat(input, flow, metric, mode: Mode) -> torch.Tensor:
    """docs/spec.md's ``splat``, computed in the compute dtype and returned in ``input``'s dtype."""
    return splat_with_normaliser(input, flow, metric, mode)[0]


def splat_with_normaliser(input, flow, metric, mode: Mode, raw: bool = False, stable: bool = False, maximum=None):
    """``(result, D)``: the result in ``input``'s dtype (``raw``: the numerator, not divided, in
    the compute dtype) and the normaliser ``D`` in the compute dtype (None for sum). ``stable``
    (soft only) subtracts each target's maximum metric, and max mode counts only the sources
    whose metric is that maximum: ``maximum`` if given (a joint one), else this call's
    ``splat_maximum``."""
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    values, flow = input.to(dtype), flow.to(dtype)
    if stable or mode.kind == "max":
        metric = metric.to(dtype)
        covering = mode.kind == "max"
        maximum = splat_maximum(metric, flow, covering) if maximum is None else maximum.to(dtype)
        tap_weight = max_tap_weight if covering else stable_tap_weight
        numerator, normaliser = splat_per_tap(values, metric, flow, maximum, tap_weight)
        if raw:
            return numerator, normaliser
        return (numerator / safe_normaliser(normaliser, mode)).to(input.dtype), normaliser
    if mode.kind == "sum":
        out = splat_sum(values, flow)
        return (out if raw else out.to(input.dtype)), None
    if mode.kind == "avg":
        weight = values.new_ones(values.shape[0], 1, *values.shape[2:])
    elif mode.kind == "linear":
        weight = metric.to(dtype)
    else:
        weight = torch.exp(metric.to(dtype))  # no max subtracted: exactly the reference
    # S(input * w) and S(w), the reference's cat([input * w, w]) splatted as two tensors (the
    # same values): a loss on one of them then differentiates that one alone, never 0 * inf
    # through the other.
    numerator, normaliser = splat_sum(values * weight, flow), splat_sum(weight, flow)
    if raw:
        return numerator, normaliser
    return (numerator / safe_normaliser(normaliser, mode)).to(input.dtype), normaliser


class TorchBackend(Backend):
    name = "torch"
    summary = ("pure-torch oracle (index_add_ of four taps), readable, autograd gradients; any device torch runs "
               "those ops on (MPS, XPU included)")
    deterministic_on = ("cpu",)
    # On CUDA index_add_ adds with atomics, unless deterministic algorithms are asked for.
    deterministic_when_asked_on = ("cuda",)

    def devices(self) -> tuple[str, ...]:
        """Every device type whose torch runs index_add_, scatter_reduce_ and exp: CPU, CUDA,
        Apple's GPUs (MPS) and Intel's (XPU). It computes float16, bfloat16 and float32 in
        float32 (float64 only for float64 inputs), so a device without float64 (MPS) runs it."""
        return ("cpu", "cuda", "mps", "xpu")

    def _call_reasons(self, call) -> list[str]:
        if call.device_type == "mps" and call.dtype == torch.float64:
            return ["MPS has no float64 (pass float32, float16 or bfloat16)"]
        return []

    def maximum(self, problem: Problem) -> torch.Tensor:
        dtype = problem.compute_dtype
        return splat_maximum(problem.metric.to(dtype), problem.flow.to(dtype), problem.mode.kind == "max")

    def run(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
        return splat_with_normaliser(
            problem.input, problem.flow, problem.metric, problem.mode, problem.raw, problem.stable, problem.maximum
        )
