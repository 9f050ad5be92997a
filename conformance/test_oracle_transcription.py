"""The oracle against an independent, loop-by-loop transcription of the reference's semantics.

``_ReferenceSplat`` follows the reference's CUDA kernels one source pixel at a time (forward, and
its hand-written input and flow gradients); ``reference_softsplat`` wraps it the way the
reference's Python function does (concatenated weight channel, eps variants). The oracle's
forward and autograd gradients must agree with it, for every mode, on random and edge inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from softsplat import Mode
from softsplat.backends import torch as oracle


def _corners(x, y, fx, fy):
    x0, y0 = math.floor(fx), math.floor(fy)
    x1, y1 = x0 + 1, y0 + 1
    # (target x, target y, weight, d weight / d fx, d weight / d fy)
    return (
        (x0, y0, (x1 - fx) * (y1 - fy), -(y1 - fy), -(x1 - fx)),
        (x1, y0, (fx - x0) * (y1 - fy), (y1 - fy), -(fx - x0)),
        (x0, y1, (x1 - fx) * (fy - y0), -(fy - y0), (x1 - fx)),
        (x1, y1, (fx - x0) * (fy - y0), (fy - y0), (fx - x0)),
    )


def _pixels(flow):
    N, _, H, W = flow.shape
    for n in range(N):
        for y in range(H):
            for x in range(W):
                fx, fy = x + float(flow[n, 0, y, x]), y + float(flow[n, 1, y, x])
                if math.isfinite(fx) and math.isfinite(fy):
                    for tx, ty, w, dwx, dwy in _corners(x, y, fx, fy):
                        if 0 <= tx < W and 0 <= ty < H:
                            yield n, y, x, tx, ty, w, dwx, dwy


class _ReferenceSplat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, flow):
        ctx.save_for_backward(values, flow)
        out = torch.zeros_like(values)
        for n, y, x, tx, ty, w, _, _ in _pixels(flow):
            out[n, :, ty, tx] += w * values[n, :, y, x]
        return out

    @staticmethod
    def backward(ctx, grad):
        values, flow = ctx.saved_tensors
        grad_values, grad_flow = torch.zeros_like(values), torch.zeros_like(flow)
        for n, y, x, tx, ty, w, dwx, dwy in _pixels(flow):
            grad_values[n, :, y, x] += w * grad[n, :, ty, tx]
            dot = float((values[n, :, y, x] * grad[n, :, ty, tx]).sum())
            grad_flow[n, 0, y, x] += dwx * dot
            grad_flow[n, 1, y, x] += dwy * dot
        return grad_values, grad_flow


class _ReferenceMaxSplat(torch.autograd.Function):
    """Max splatting (docs/spec.md, section 4) one tap at a time: ``M`` over the taps of positive
    weight, each tap weighted 1 where its metric is ``M`` (0 where smaller or ``M`` is -inf, NaN
    where ``M`` is NaN); returns the numerator and the normaliser, the metric held constant."""

    @staticmethod
    def maximum(flow, metric):
        best = {}
        for n, y, x, tx, ty, w, _, _ in _pixels(flow):
            if w > 0:
                m, key = float(metric[n, 0, y, x]), (n, ty, tx)
                current = best.get(key, -math.inf)
                if not math.isnan(current) and (math.isnan(m) or m > current):  # NaN wins
                    best[key] = m
        return best

    @staticmethod
    def share(best, n, tx, ty, m):
        M = best.get((n, ty, tx), -math.inf)
        return math.nan if math.isnan(M) else 1.0 if m == M and M != -math.inf else 0.0

    @staticmethod
    def forward(ctx, values, flow, metric):
        ctx.save_for_backward(values, flow, metric)
        best = _ReferenceMaxSplat.maximum(flow, metric)
        out = torch.zeros_like(values)
        normaliser = torch.zeros_like(values[:, :1])
        for n, y, x, tx, ty, w, _, _ in _pixels(flow):
            s = _ReferenceMaxSplat.share(best, n, tx, ty, float(metric[n, 0, y, x]))
            out[n, :, ty, tx] += w * (values[n, :, y, x] * s)
            normaliser[n, 0, ty, tx] += w * s
        return out, normaliser

    @staticmethod
    def backward(ctx, grad, grad_normaliser):
        values, flow, metric = ctx.saved_tensors
        best = _ReferenceMaxSplat.maximum(flow, metric)
        grad_values, grad_flow = torch.zeros_like(values), torch.zeros_like(flow)
        for n, y, x, tx, ty, w, dwx, dwy in _pixels(flow):
            s = _ReferenceMaxSplat.share(best, n, tx, ty, float(metric[n, 0, y, x]))
            grad_values[n, :, y, x] += w * s * grad[n, :, ty, tx]
            dot = float((values[n, :, y, x] * s * grad[n, :, ty, tx]).sum() + s * grad_normaliser[n, 0, ty, tx])
            grad_flow[n, 0, y, x] += dwx * dot
            grad_flow[n, 1, y, x] += dwy * dot
        return grad_values, grad_flow, torch.zeros_like(metric)


def reference_softsplat(input, flow, metric, mode: str):
    kind, _, suffix = mode.partition("-")
    if kind == "max":
        out, normaliser = _ReferenceMaxSplat.apply(input, flow, metric)
        out = torch.cat([out, normaliser], 1)
        input = None
    if kind == "avg":
        input = torch.cat([input, input.new_ones(input.shape[0], 1, *input.shape[2:])], 1)
    elif kind == "linear":
        input = torch.cat([input * metric, metric], 1)
    elif kind == "soft":
        input = torch.cat([input * metric.exp(), metric.exp()], 1)
    if kind != "max":
        out = _ReferenceSplat.apply(input, flow)
    if kind == "sum":
        return out
    normalise = out[:, -1:, :, :]
    if suffix in ("", "addeps"):
        normalise = normalise + 0.0000001
    elif suffix == "zeroeps":
        normalise = normalise.clone()
        normalise[normalise == 0.0] = 1.0
    elif suffix == "clipeps":
        normalise = normalise.clip(0.0000001, None)
    return out[:, :-1, :, :] / normalise


def _inputs(seed, flavour):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 3, 4, 5)
    input = torch.randn(shape, generator=generator, dtype=torch.float64)
    flow = torch.randn((2, 2, 4, 5), generator=generator, dtype=torch.float64) * 3
    metric = torch.randn((2, 1, 4, 5), generator=generator, dtype=torch.float64) * 2
    if flavour == "integer":
        flow = flow.round()
    elif flavour == "edges":
        flow.view(-1)[::7] = float("nan")
        flow.view(-1)[3::11] = float("inf")
        flow.view(-1)[5::13] = 1e30
        flow.view(-1)[2::9] = -1.0
        metric.view(-1)[::5] = -800.0  # exp underflows to 0: zeroeps and clipeps differ
        metric.view(-1)[4::17] = float("-inf")  # max: never wins
    elif flavour == "ties":  # max: depth layers, several sources tie on a target
        metric = metric.round().clamp(-1, 1)
    return input, flow, metric


@pytest.mark.parametrize("flavour", ["random", "integer", "edges", "ties"])
@pytest.mark.parametrize("mode", [m.value for m in Mode] + ["avg", "linear", "soft", "max"])
def test_oracle_matches_reference_semantics(mode, flavour) -> None:
    tensors = _inputs(hash((mode, flavour)) % 1000, flavour)
    parsed = Mode.parse(mode)
    metric_used = parsed.needs_metric
    leaves_ref = [t.clone().requires_grad_() for t in tensors]
    leaves_oracle = [t.clone().requires_grad_() for t in tensors]
    expected = reference_softsplat(*leaves_ref[:2], leaves_ref[2] if metric_used else None, mode)
    got = oracle.splat(*leaves_oracle[:2], leaves_oracle[2] if metric_used else None, parsed)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    cotangent = torch.randn(got.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    count = 3 if metric_used else 2
    grads_ref = torch.autograd.grad(expected, leaves_ref[:count], cotangent)
    grads_oracle = torch.autograd.grad(got, leaves_oracle[:count], cotangent)
    for name, a, b in zip(("input", "flow", "metric"), grads_oracle, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True, msg=f"grad of {name}")
