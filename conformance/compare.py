"""Running a backend on a case with its VJP, and comparing results with the oracle.

The reference is the oracle computed in float64 on the same values. Where the oracle computed in
the call's own compute dtype (docs/spec.md: float32 for float16/bfloat16/float32) differs from that
float64 result beyond tolerance, the answer depends on the compute dtype (``exp`` overflow or
underflow, a coordinate whose rounding crosses an integer): there the backend may match either.
Non-finite values must match exactly in kind (NaN, +inf, -inf) one of the two.

Allowed error, per element: ``atol + rtol * scale`` from the table for the coarser of the
tensor's dtype and the compute dtype (a float64 gradient of a float32 computation has float32
precision), plus twice the largest error of the oracle itself run in the compute dtype (as
FlashAttention's tests bound a kernel by the error of the reference in the same precision): a
gradient that is a cancellation of large terms is no more accurate in any implementation.
"""

from __future__ import annotations

import dataclasses

import torch

import softsplat
from softsplat.backends import torch as oracle
from softsplat.modes import safe_normaliser

from .strategies import Case


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float  # relative to the element's scale (see `compare`)
    atol: float


#: One table for the whole suite, by the dtype of the tensor compared. float16/bfloat16 results
#: are float32 computations rounded once: two units in the last place of their own format.
#: float32 allows for target coordinates of magnitude ~40 rounded to float32 (ulp ~4e-6).
TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-12),
    torch.float32: Tolerance(rtol=2e-5, atol=1e-6),
    torch.float16: Tolerance(rtol=2e-3, atol=1e-4),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1e-3),
}


@dataclasses.dataclass
class Result:
    output: torch.Tensor
    grads: dict[str, torch.Tensor]  # by argument name, for those that required grad and got one


def run(backend: str, case: Case, cotangent: torch.Tensor, *, dtype=None) -> Result:
    """``splat`` and its VJP with ``cotangent`` (in the output's dtype) for the flagged arguments.

    With ``dtype``, every tensor is first converted to that dtype (the float64 reference).
    """
    names = ("input", "flow", "metric")
    leaves = {}
    for name, tensor, flag in zip(names, case.tensors(), case.requires_grad):
        if tensor is None:
            continue
        # detach() keeps the case's strides (channels_last, strided views) for the backend
        leaf = tensor.detach().to(dtype) if dtype else tensor.detach()
        leaves[name] = leaf.requires_grad_(flag)
    out = softsplat.splat(
        leaves["input"], leaves["flow"], leaves.get("metric"), mode=case.mode, backend=backend, stable=case.stable
    )
    wanted = [name for name in leaves if leaves[name].requires_grad]
    grads = {}
    if wanted and out.requires_grad:  # a gradient that is None (unused) is left out: a bug
        values = torch.autograd.grad(
            out, [leaves[n] for n in wanted], cotangent.to(out.dtype), allow_unused=True
        )
        grads = {name: grad for name, grad in zip(wanted, values) if grad is not None}
    return Result(out.detach(), grads)


def _same_kind(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Elementwise: both NaN, or both the same infinity, or both finite."""
    both_nan = got.isnan() & expected.isnan()
    same_inf = got.isinf() & expected.isinf() & (got.sign() == expected.sign())
    return both_nan | same_inf | (got.isfinite() & expected.isfinite())


def _close(got, expected, scale, tol: Tolerance) -> torch.Tensor:
    finite = got.isfinite() & expected.isfinite()
    error = (got - expected).abs()
    within = error <= tol.atol + tol.rtol * scale
    return _same_kind(got, expected) & (~finite | within)


def _precision(dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """The coarser of two dtypes: the one whose tolerance applies."""
    return max(dtype, compute_dtype, key=lambda d: TOLERANCES[d].rtol)


def compare(
    what: str,
    got: torch.Tensor,
    reference: torch.Tensor,
    compute_dtype_result: torch.Tensor,
    scale: torch.Tensor,
    compute_dtype: torch.dtype = torch.float64,
    unspecified: torch.Tensor | None = None,
) -> None:
    """Assert ``got`` is close to the float64 ``reference`` or to the compute-dtype result.

    ``scale`` (float64, broadcastable) is the magnitude an element's error is relative to.
    ``unspecified`` (boolean, broadcastable): elements the spec leaves open (``flushed``).
    A failure names the worst element, its index, both expectations and the fraction off.
    """
    assert got.shape == reference.shape, f"{what}: shape {tuple(got.shape)} != {tuple(reference.shape)}"
    if got.numel() == 0:
        return
    table = TOLERANCES[_precision(got.dtype, compute_dtype)]
    got64, alt64 = got.double().cpu(), compute_dtype_result.double().cpu()
    reference, scale = reference.double().cpu(), scale.double().cpu().expand_as(reference)
    # A sum of |terms| is never below |sum|; where the magnitude estimate overflowed (exp of a
    # metric of ~1e4 even in float64) it reads 0, so the result's own size bounds it from below.
    scale = torch.maximum(scale, reference.abs().nan_to_num(nan=0.0, posinf=0.0))
    oracle_error = (alt64 - reference).abs()
    oracle_error = oracle_error[oracle_error.isfinite()]
    slack = 2 * float(oracle_error.max()) if oracle_error.numel() else 0.0
    tol = Tolerance(table.rtol, table.atol + slack)
    # The float64 reference rounded to the result's dtype is the best that dtype can hold
    # (a finite 1e44 is inf in float16).
    rounded = reference.to(got.dtype).double()
    ok = _close(got64, reference, scale, tol) | _close(got64, rounded, scale, tol) | _close(got64, alt64, scale, tol)
    if unspecified is not None:
        ok = ok | unspecified.cpu().expand_as(ok)
    if bool(ok.all()):
        return
    bound = tol.atol + tol.rtol * scale
    badness = torch.where(ok, 0.0, ((got64 - reference).abs() / bound).nan_to_num(float("inf")))
    worst = int(badness.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), got.shape))
    raise AssertionError(
        f"{what}: {int((~ok).sum())} of {ok.numel()} elements off "
        f"({float((~ok).double().mean()):.2%}); worst at {index}: got {got64[index].item()!r}, "
        f"float64 oracle {reference[index].item()!r}, compute-dtype oracle "
        f"{alt64[index].item()!r}, allowed error {bound[index].item():.3g} "
        f"(rtol={tol.rtol}, atol={table.atol} + 2 x the compute-dtype oracle's error {slack:.3g}, "
        f"dtype={str(got.dtype)[6:]}, compute dtype={str(compute_dtype)[6:]})"
    )


#: Normaliser contributions below this leave a target open on flushing backends (see flushed);
#: below float32's smallest normal number (2^-126) a GPU's float32 atomic add reads and writes 0.
FLUSHED_BELOW = 2.0**-100


@torch.no_grad()
def flushed(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, sources)`` [N, 1, H, W] booleans: the targets every float32 normaliser
    contribution ``b * w`` of which is below 2^-100, and the source pixels with a tap into one.
    An add that flushes subnormals, as GPUs' float32 atomics do, leaves such a target's
    normaliser 0 where its contributions are subnormal, and can drop a numerator contribution
    ``b * (x * w)`` that is (a value of 0.5 with ``b * w`` = 1.6e-38 makes 8e-39); from 2^-100 on,
    what it drops is below 2^-26 of the result, under the float32 tolerance. The spec
    (docs/spec.md, "Floating point") leaves their results, and those sources' gradients, open on
    such backends."""
    flow = case.flow.float().cpu()
    N, _, H, W = flow.shape
    metric = None if case.metric is None else case.metric.float().cpu()
    if case.mode.kind == "avg" or metric is None:
        weight = torch.ones(N, H, W)
    elif case.mode.kind == "linear":
        weight = metric[:, 0]
    else:
        weight = metric[:, 0].exp()
    largest = torch.zeros(N * H * W)
    tap_weight = _tap_weight(case)
    maximum = oracle.splat_maximum(metric, flow, case.mode.kind == "max").reshape(-1) if tap_weight else None
    for target, b, keep in oracle.taps(flow):
        w = tap_weight(metric[:, 0], maximum[target]) if tap_weight else weight
        largest.scatter_reduce_(0, target[keep], (b * w).abs()[keep], "amax")
    targets = (largest > 0) & (largest < FLUSHED_BELOW)
    sources = torch.zeros(N, H, W, dtype=torch.bool)
    for target, _, keep in oracle.taps(flow):
        sources |= keep & targets[target]
    return targets.view(N, 1, H, W), sources.view(N, 1, H, W)


def gradient_scale(reference: torch.Tensor) -> torch.Tensor:
    """Norm-wise scale: the largest finite reference magnitude (for hand-made checks)."""
    finite = reference[reference.isfinite()]
    return finite.abs().max().double() if finite.numel() else torch.tensor(0.0, dtype=torch.float64)


def _tap_weight(case: Case):
    """The oracle's per-tap weight function of ``case`` (stable soft or max), else None."""
    if case.mode.kind == "max":
        return oracle.max_tap_weight
    return oracle.stable_tap_weight if case.stable else None


def _gather(per_target: torch.Tensor, flow: torch.Tensor, weighted: bool, stable=None) -> torch.Tensor:
    """Per source pixel: sum over its kept taps of (|tap weight| or 1) * ``per_target[tap]``,
    times the tap's own weight (|exp(metric - M(tap))| or max mode's 0, 1 or NaN) when
    ``stable`` is ``(tap_weight, metric, M)``."""
    N, K, H, W = per_target.shape
    table = per_target.permute(0, 2, 3, 1).reshape(N * H * W, K)
    result = per_target.new_zeros(N, H, W, K)
    for target, weight, keep in oracle.taps(flow):
        factor = (weight.abs() if weighted else torch.ones_like(weight)) * keep
        if stable is not None:
            tap_weight, metric, maximum = stable
            factor = factor * torch.where(keep, tap_weight(metric[:, 0], maximum.reshape(-1)[target]).abs().nan_to_num(nan=0.0), 0.0)
        result += factor.unsqueeze(-1) * table[target]
    return result.permute(0, 3, 1, 2)


@torch.no_grad()
def gradient_magnitudes(
    case: Case, cotangent: torch.Tensor, normaliser_cotangent: torch.Tensor | None = None, joint=None
) -> dict[str, torch.Tensor]:
    """Per element, the sum of the absolute values of the terms each gradient adds up (float64).

    A gradient element is a sum of products; rounding errs relative to the sum of the terms'
    magnitudes, not to the result, which may cancel to ~0 (a pixel that alone covers its
    targets has a metric gradient of exactly 0 made of terms of size 1/D). The tap-weight
    derivatives are bounded by 1, which bounds the flow gradient's terms. With
    ``normaliser_cotangent`` the normaliser output is used too; ``joint`` is ``(divisor, out)``
    of a joint splat (splat_many) when this case is one of its sources.
    """
    x, flow = case.input.double().cpu(), case.flow.double().cpu()
    g = cotangent.double().cpu().abs()
    mode = case.mode
    N, _, H, W = x.shape
    ones = x.new_ones(N, 1, H, W)
    stable = None
    if mode.kind == "sum":
        weight = ones
        g_numerator, g_normaliser = g, torch.zeros_like(ones)
    else:
        metric = None if case.metric is None else case.metric.double().cpu()
        weight = {"avg": ones, "linear": metric, "soft": metric.exp() if metric is not None else None, "max": ones}[mode.kind]
        tap_weight = _tap_weight(case)
        if tap_weight:  # per-tap weights: gathered below; the per-pixel factor is 1
            stable = (tap_weight, metric, oracle.splat_maximum(metric, flow, mode.kind == "max"))
            weight = ones
        if joint is None:
            numerator, normaliser = oracle.splat_with_normaliser(x, flow, metric, mode, raw=True, stable=case.stable)
            divisor = safe_normaliser(normaliser, mode).abs()
            out = (numerator / divisor).abs()
        else:
            divisor, out = (t.double().cpu().abs() for t in joint)
        g_numerator = g / divisor
        g_normaliser = (g_numerator * out).sum(1, keepdim=True)
        if normaliser_cotangent is not None:
            g_normaliser = g_normaliser + normaliser_cotangent.double().cpu().abs()
    w = weight.abs()
    weighted_n, weighted_d = _gather(g_numerator, flow, True, stable), _gather(g_normaliser, flow, True, stable)
    unweighted_n, unweighted_d = _gather(g_numerator, flow, False, stable), _gather(g_normaliser, flow, False, stable)
    magnitudes = {
        "input": w * weighted_n,
        "flow": ((x.abs() * w * unweighted_n).sum(1, keepdim=True) + w * unweighted_d).expand(-1, 2, -1, -1),
    }
    if case.metric is not None:
        derivative = weight.abs() if mode.kind == "soft" and not case.stable else torch.ones_like(w)
        magnitudes["metric"] = derivative * ((x.abs() * weighted_n).sum(1, keepdim=True) + weighted_d)
    return {name: m.nan_to_num(nan=0.0, posinf=0.0) for name, m in magnitudes.items()}
