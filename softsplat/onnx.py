"""Export to ONNX: softsplat's ops as standard ONNX operators (opset 18), written with onnxscript.

    import softsplat
    torch.onnx.export(model, args, "model.onnx", dynamo=True,
                      custom_translation_table=softsplat.onnx.translations())

The translation follows docs/spec.md as the oracle does, with static shapes: every source pixel
has four taps; a tap that is dropped (the pixel does not land, or the tap lies outside the
image) is sent to index 0 with weight 0. The splat is one ``ScatterElements`` with
``reduction="add"`` over all four taps of the channels and the normaliser together (the
numerator and ``D`` of one mode); stable soft and max splatting add one ``ScatterElements``
with ``reduction="max"`` for ``M`` (max: over the taps of positive weight), then weigh each tap
against the ``M`` it gathers (``GatherElements``). Shapes are read at run time (``Shape``, ``Range``), so batch,
height and width may be dynamic. Sums are taken in the runtime's order, not the oracle's: results
agree within the conformance tolerances, not bitwise.

A NaN metric wins ``M`` as in the oracle, without relying on how a runtime's ``max`` treats
NaN (ONNX leaves that unspecified).
"""

from __future__ import annotations

import torch

from .modes import EPS, Kind, Mode, Normalisation
from .modules import Splat, SplatMany

#: The opset the translation needs (ScatterElements with reduction "max").
OPSET = 18


def _op():
    from onnxscript import opset18

    return opset18


def _constant(value: float, like):
    """A scalar of ``like``'s dtype."""
    op = _op()
    return op.CastLike(op.Constant(value_float=value), like)


def _ints(*values: int):
    return _op().Constant(value_ints=list(values))


def _taps(flow):
    """The four taps of every source pixel of ``flow`` ``[N, 2, H, W]`` (docs/spec.md, section 2),
    tap-major along the last axis: ``(index [N, 1, 4HW] int64, weight [N, 1, 4HW], keep [N, 1,
    4HW] bool, shape [N, C, H, W] parts)``. A dropped tap has index 0 and is masked by ``keep``."""
    op = _op()
    shape = op.Shape(flow)
    N, H, W = (op.Slice(shape, _ints(a), _ints(a + 1)) for a in (0, 2, 3))
    xs = op.CastLike(op.Range(op.Constant(value_int=0), op.Squeeze(W), op.Constant(value_int=1)), flow)
    ys = op.Unsqueeze(op.CastLike(op.Range(op.Constant(value_int=0), op.Squeeze(H), op.Constant(value_int=1)), flow), _ints(1))
    fx = op.Add(op.Squeeze(op.Slice(flow, _ints(0), _ints(1), _ints(1)), _ints(1)), xs)  # [N, H, W]
    fy = op.Add(op.Squeeze(op.Slice(flow, _ints(1), _ints(2), _ints(1)), _ints(1)), ys)
    Wf, Hf = op.CastLike(W, flow), op.CastLike(H, flow)
    one, zero, minus_one = _constant(1.0, flow), _constant(0.0, flow), _constant(-1.0, flow)
    lands = op.And(
        op.And(op.GreaterOrEqual(fx, minus_one), op.Less(fx, Wf)),
        op.And(op.GreaterOrEqual(fy, minus_one), op.Less(fy, Hf)),
    )  # NaN and infinities fail a bound
    fx, fy = op.Where(lands, fx, zero), op.Where(lands, fy, zero)
    x0, y0 = op.Floor(fx), op.Floor(fy)
    x1, y1 = op.Add(x0, one), op.Add(y0, one)
    corners = (
        (x0, y0, op.Mul(op.Sub(x1, fx), op.Sub(y1, fy))),
        (x1, y0, op.Mul(op.Sub(fx, x0), op.Sub(y1, fy))),
        (x0, y1, op.Mul(op.Sub(x1, fx), op.Sub(fy, y0))),
        (x1, y1, op.Mul(op.Sub(fx, x0), op.Sub(fy, y0))),
    )
    W_last, H_last = op.Sub(Wf, one), op.Sub(Hf, one)
    indices, weights, keeps = [], [], []
    for tx, ty, weight in corners:
        keep = op.And(
            op.And(lands, op.And(op.GreaterOrEqual(tx, zero), op.LessOrEqual(tx, W_last))),
            op.And(op.GreaterOrEqual(ty, zero), op.LessOrEqual(ty, H_last)),
        )
        index = op.Add(op.Mul(op.Cast(ty, to=7), W), op.Cast(tx, to=7))  # 7: int64
        indices.append(op.Where(keep, index, op.Constant(value_int=0)))
        weights.append(weight)
        keeps.append(keep)
    flat = op.Concat(N, _ints(1), _ints(-1), axis=0)  # [N, 1, 4HW]
    index = op.Reshape(op.Concat(*indices, axis=1), flat)
    weight = op.Reshape(op.Concat(*weights, axis=1), flat)
    keep = op.Reshape(op.Concat(*keeps, axis=1), flat)
    return index, weight, keep, (N, H, W)


def _per_tap(values, N):
    """``values`` ``[N, K, H, W]`` as ``[N, K, 4HW]``: each pixel's value once per tap."""
    op = _op()
    return op.Tile(op.Reshape(values, op.Concat(N, _ints(0), _ints(-1), axis=0)), _ints(1, 1, 4))


def _scatter_add(updates, index, N, H, W):
    """``S`` of docs/spec.md: ``updates`` ``[N, K, 4HW]`` added at ``index`` ``[N, 1, 4HW]``."""
    op = _op()
    K = op.Slice(op.Shape(updates), _ints(1), _ints(2))
    HW = op.Mul(H, W)
    data = op.Expand(op.CastLike(op.Constant(value_float=0.0), updates), op.Concat(N, K, HW, axis=0))
    summed = op.ScatterElements(data, op.Expand(index, op.Shape(updates)), updates, axis=2, reduction="add")
    return op.Reshape(summed, op.Concat(N, K, H, W, axis=0))


def _maximum(flow, metric, kind: int = Kind.STABLE):
    """``M`` of stable soft splatting ``[N, 1, H, W]``: a scatter-max, -inf where nothing lands;
    of max splatting (``kind`` MAX), over the taps of positive weight only. NaN wins, as in the
    oracle, whatever the runtime's ``max`` makes of NaN: one ``ScatterElements`` takes the
    maximum of two channels, the metric with its NaNs left out and a flag of 1 for a NaN, and a
    target the flag reached is NaN."""
    op = _op()
    index, weight, keep, (N, H, W) = _taps(flow)
    minus_infinity = _constant(float("-inf"), flow)
    if kind == Kind.MAX:
        keep = op.And(keep, op.Greater(weight, _constant(0.0, flow)))
    metric = _per_tap(metric, N)
    nan = op.IsNaN(metric)
    updates = op.Concat(
        op.Where(op.And(keep, op.Not(nan)), metric, minus_infinity),
        op.Where(op.And(keep, nan), _constant(1.0, flow), minus_infinity),
        axis=1,
    )
    data = op.Expand(minus_infinity, op.Concat(N, _ints(2), op.Mul(H, W), axis=0))
    both = op.ScatterElements(data, op.Expand(index, op.Shape(updates)), updates, axis=2, reduction="max")
    maximum = op.Slice(both, _ints(0), _ints(1), _ints(1))
    flagged = op.Greater(op.Slice(both, _ints(1), _ints(2), _ints(1)), minus_infinity)
    maximum = op.Where(flagged, _constant(float("nan"), flow), maximum)
    return op.Reshape(maximum, op.Concat(N, _ints(1), H, W, axis=0))


def _safe_normaliser(D, normalisation: int):
    op = _op()
    eps = _constant(EPS, D)
    if normalisation == Normalisation.ADDEPS:
        return op.Add(D, eps)
    if normalisation == Normalisation.ZEROEPS:
        return op.Where(op.Equal(D, _constant(0.0, D)), _constant(1.0, D), D)
    return op.Where(op.Less(D, eps), eps, D)  # clipeps; NaN stays NaN


def _forward(input, flow, metric=None, kind: int = Kind.SUM, normalisation: int = Normalisation.ADDEPS, maximum=None,
             deterministic: bool = False, cast: bool = False):
    """``splat_forward`` of csrc/schemas.h: (result or numerator, normaliser) in flow's dtype
    (with ``cast``, the result in input's). ``deterministic`` is the runtime's business: one
    scatter either way."""
    out, normaliser = _sums(input, flow, metric, kind, normalisation, maximum)
    return (_op().CastLike(out, input) if cast else out), normaliser


def _sums(input, flow, metric, kind: int, normalisation: int, maximum):
    """``_forward``'s (result or numerator, normaliser), both in flow's dtype."""
    op = _op()
    index, weight, keep, (N, H, W) = _taps(flow)
    x = op.CastLike(input, flow)
    zero = _constant(0.0, flow)
    ones = op.Expand(_constant(1.0, flow), op.Concat(N, _ints(1), H, W, axis=0))  # [N, 1, H, W]
    if kind in (Kind.STABLE, Kind.MAX):
        per_tap = _per_tap(op.Concat(x, ones, axis=1), N)
        reached = op.GatherElements(op.Reshape(maximum, op.Concat(N, _ints(1), _ints(-1), axis=0)), index, axis=2)
        lost = op.Equal(reached, _constant(float("-inf"), flow))  # only metrics of -inf landed
        if kind == Kind.MAX:  # 1 for the winners, 0 for the others, NaN where M is NaN
            wins = op.And(op.Equal(_per_tap(metric, N), reached), op.Not(lost))
            w = op.Where(op.IsNaN(reached), reached, op.Where(wins, _constant(1.0, flow), zero))
        else:
            w = op.Where(lost, zero, op.Exp(op.Sub(_per_tap(metric, N), reached)))
        updates = op.Mul(weight, op.Mul(per_tap, w))
    else:
        if kind == Kind.SUM:
            values = x
        else:
            w = metric if kind == Kind.LINEAR else op.Exp(metric) if kind == Kind.SOFT else ones  # avg: 1
            values = op.Concat(op.Mul(x, w), w, axis=1)
        updates = op.Mul(weight, _per_tap(values, N))
    sums = _scatter_add(op.Where(keep, updates, zero), index, N, H, W)
    if kind == Kind.SUM:
        return sums, op.CastLike(op.Constant(value_floats=[]), flow)
    C = op.Slice(op.Shape(input), _ints(1), _ints(2))
    numerator = op.Slice(sums, _ints(0), C, _ints(1))
    D = op.Slice(sums, C, op.Add(C, _ints(1)), _ints(1))
    if normalisation == Normalisation.RAW:
        return numerator, D
    return op.Div(numerator, _safe_normaliser(D, normalisation)), D


def _stable_forward(input, flow, metric, normalisation: int, cast: bool = False):
    """``splat_stable_forward``: (result, normaliser, maximum)."""
    maximum = _maximum(flow, metric)
    out, normaliser = _forward(input, flow, metric, Kind.STABLE, normalisation, maximum, cast=cast)
    return out, normaliser, maximum


def translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: the ONNX
    translation of every op of the ``softsplat`` library (the ``cpp`` backend's, built and loaded
    here if need be), which is what a model calling ``splat``/``splat_many`` traces to."""
    from .backends import cpp

    ops = cpp.library().ops()
    return {
        ops.splat_forward.default: _forward,
        ops.splat_maximum.default: _maximum,
        ops.splat_stable_forward.default: _stable_forward,
    }


def example_arguments(mode, dtype: torch.dtype = torch.float32, sources: int = 1) -> tuple:
    """Example inputs for exporting (N, C, H, W = 2, 3, 5, 7: distinct and none 1, so that every
    size stays dynamic), each source's tensors distinct."""
    mode = Mode.parse(mode)
    generator = torch.Generator().manual_seed(0)
    N, C, H, W = 2, 3, 5, 7
    arguments = []
    for _ in range(sources):
        arguments += [torch.rand(N, C, H, W, generator=generator).to(dtype), torch.randn(N, 2, H, W, generator=generator)]
        if mode.needs_metric:
            arguments.append(torch.randn(N, 1, H, W, generator=generator))
    return tuple(arguments)


def dynamic_shapes(arguments) -> tuple:
    """Batch, height and width dynamic for every tensor; channels too for the inputs."""
    dims = {0: torch.export.Dim("N"), 2: torch.export.Dim("H"), 3: torch.export.Dim("W")}
    return tuple({**dims, 1: torch.export.Dim("C")} if a.shape[1] == 3 else dims for a in arguments)


def standalone(mode: str, *, stable: bool = False, return_normaliser: bool = False, sources: int = 1,
               dtype: torch.dtype = torch.float32):
    """A standalone splatting model exported to ONNX (an ``ONNXProgram``; ``.save(path)`` writes
    it): inputs ``input``, ``flow`` (float32) and, for linear, soft and max, ``metric`` (float32) per
    source, with dynamic batch, channels, height and width; outputs the result (and the
    normaliser)."""
    if sources == 1:
        model = Splat(mode, stable, return_normaliser)
    else:
        model = SplatMany(mode, sources, stable)
    arguments = example_arguments(mode, dtype, sources)
    names = [f"{name}{i if sources > 1 else ''}" for i in range(sources) for name in ("input", "flow", "metric")]
    names = [n for n in names if len(arguments) == len(names) or not n.startswith("metric")]
    outputs = ["result", "normaliser"] if return_normaliser else ["result"]
    return torch.onnx.export(
        model, arguments, dynamo=True, custom_translation_table=translations(),
        dynamic_shapes=dynamic_shapes(arguments) if sources == 1 else (dynamic_shapes(arguments),), opset_version=OPSET, input_names=names, output_names=outputs,
        verbose=False,
    )
