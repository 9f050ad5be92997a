"""The normaliser output (``return_normaliser=True``) and joint splatting (``splat_many``),
every backend, forward and gradients against the oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import softsplat
from softsplat import Mode
from softsplat.backends import torch as oracle
from softsplat.modes import compute_dtype, safe_normaliser

from .compare import compare, gradient_magnitudes
from .strategies import CHANNEL_BOUNDARIES, Case, cases, seeds

NORMALISED = tuple(m for m in Mode if m.normalisation)
NAMES = ("input", "flow", "metric")


def _leaves(case: Case, dtype=None):
    leaves = []
    for tensor, flag in zip(case.tensors(), case.requires_grad):
        leaf = None if tensor is None else (tensor.detach().to(dtype) if dtype else tensor.detach())
        leaves.append(leaf.requires_grad_(flag) if leaf is not None else None)
    return leaves


def joint_oracle(sources, mode: Mode, stable: bool = False, return_normaliser: bool = False):
    """docs/spec.md's joint splatting (section 7) built from the oracle's own pieces, not through
    ``softsplat.splat_many``: each source's raw numerator and normaliser, summed, one division;
    for stable and max mode the elementwise maximum of the sources' maxima, shared by every source."""
    dtype = sources[0][0].dtype
    cd = compute_dtype(dtype)
    maximum = None
    if stable or mode.kind == "max":
        maxima = [oracle.splat_maximum(metric.to(cd), flow.to(cd), mode.kind == "max") for _, flow, metric in sources]
        maximum = maxima[0]
        for other in maxima[1:]:
            maximum = torch.maximum(maximum, other)
    parts = [
        oracle.splat_with_normaliser(input, flow, metric, mode, raw=True, stable=stable, maximum=maximum)
        for input, flow, metric in sources
    ]
    numerator = parts[0][0]
    for part in parts[1:]:
        numerator = numerator + part[0]
    if mode.kind == "sum":
        return numerator.to(dtype)
    normaliser = parts[0][1]
    for part in parts[1:]:
        normaliser = normaliser + part[1]
    out = (numerator / safe_normaliser(normaliser, mode)).to(dtype)
    return (out, normaliser) if return_normaliser else out


def _grads(outputs, cotangents, leaves):
    """Gradients of the outputs (with their cotangents) for every leaf requiring grad, with
    the leaves' positions in ``leaves``."""
    positions = [i for i, leaf in enumerate(leaves) if leaf is not None and leaf.requires_grad]
    wanted = [leaves[i] for i in positions]
    connected = [o for o in outputs if o.requires_grad]
    if not wanted or not connected:
        return [None] * len(wanted), positions
    grads = torch.autograd.grad(
        [o for o in outputs if o.requires_grad],
        wanted,
        [c.to(o.dtype) for o, c in zip(outputs, cotangents) if o.requires_grad],
        allow_unused=True,
    )
    return list(grads), positions


#: Cases drawn with 1-4 channels, or over the channel counts where kernels change course.
CHANNELS = pytest.mark.parametrize("channels", [None, CHANNEL_BOUNDARIES], ids=["few-channels", "many-channels"])


@CHANNELS
@given(data=st.data())
def test_normaliser_output(backend, device, channels, data) -> None:
    case = data.draw(
        cases(dtypes=backend.dtypes, modes=NORMALISED, device=device, channels=channels, max_side=9 if channels is None else 5),
        label="case",
    )
    generator = data.draw(seeds())
    N, C, H, W = case.input.shape
    cot_out = torch.randn((N, C, H, W), generator=generator, dtype=torch.float64).to(case.input.dtype).double()
    cot_norm = torch.randn((N, 1, H, W), generator=generator, dtype=torch.float64)
    # Which outputs the loss uses: autograd hands the backward None for an unused one.
    used = data.draw(st.sampled_from(("both", "result", "normaliser")), label="outputs in the loss")
    if used == "result":
        cot_norm = torch.zeros_like(cot_norm)
    if used == "normaliser":
        cot_out = torch.zeros_like(cot_out)
    results = {}
    for name, backend_name, dtype in (("got", backend.name, None), ("same", "torch", None), ("ref", "torch", torch.float64)):
        leaves = _leaves(case, dtype)
        out, normaliser = softsplat.splat(
            *leaves, mode=case.mode, backend=backend_name, return_normaliser=True, stable=case.stable
        )
        pairs = [(out, cot_out), (normaliser, cot_norm)]
        pairs = pairs[:1] if used == "result" else pairs[1:] if used == "normaliser" else pairs
        grads, positions = _grads([o for o, _ in pairs], [c.to(device) for _, c in pairs], leaves)
        results[name] = (out.detach(), normaliser.detach(), {NAMES[i]: g for i, g in zip(positions, grads)})
    got, same, ref = results["got"], results["same"], results["ref"]
    cd = compute_dtype(case.input.dtype)
    assert got[1].dtype == cd and got[1].shape == (N, 1, H, W)
    magnitude = oracle.splat_with_normaliser(
        case.input.double().abs(), case.flow.double(), None if case.metric is None else case.metric.double(),
        case.mode, stable=case.stable,
    )
    compare("output", got[0], ref[0], same[0], magnitude[0].nan_to_num(posinf=0.0), cd)
    compare("normaliser", got[1], ref[1], same[1], ref[1].abs().nan_to_num(posinf=0.0), cd)
    magnitudes = gradient_magnitudes(case, cot_out, cot_norm)
    assert set(got[2]) == set(ref[2])
    for name, grad in got[2].items():
        if ref[2][name] is None:  # the loss does not depend on it (the input, when only D is used)
            assert grad is None or not grad.any(), f"gradient of {name}: the loss does not depend on it"
            continue
        assert grad is not None, f"no gradient for {name}"
        compare(f"grad of {name}", grad, ref[2][name], same[2][name], magnitudes[name], cd)


@CHANNELS
@given(data=st.data())
def test_splat_many(backend, device, channels, data) -> None:
    side = 9 if channels is None else 5
    first = data.draw(cases(dtypes=backend.dtypes, device=device, channels=channels, max_side=side), label="first source")
    second = data.draw(cases(dtypes=(first.input.dtype,), modes=(first.mode,), device=device), label="second source")
    if second.input.shape != first.input.shape:  # the second source gets the first's shape
        generator = data.draw(seeds())
        N, C, H, W = first.input.shape
        second = Case(
            torch.randn(first.input.shape, generator=generator).to(first.input.dtype).to(device),
            (torch.randn((N, 2, H, W), generator=generator) * 3).to(device),
            None if first.metric is None else (torch.rand((N, 1, H, W), generator=generator) * 5).to(device),
            first.mode, second.requires_grad[:2] + (second.requires_grad[2] and first.metric is not None,),
        )
    second = Case(*second.tensors(), first.mode, second.requires_grad, first.stable)
    generator = data.draw(seeds())
    cotangent = torch.randn(first.input.shape, generator=generator, dtype=torch.float64).to(first.input.dtype).double()
    results = {}
    for name, dtype in (("got", None), ("same", None), ("ref", torch.float64)):
        sources = [_leaves(first, dtype), _leaves(second, dtype)]
        if name == "got":
            out = softsplat.splat_many([tuple(s) for s in sources], mode=first.mode, backend=backend.name, stable=first.stable)
        else:
            out = joint_oracle(sources, first.mode, first.stable)
        flat = [leaf for source in sources for leaf in source]
        grads, positions = _grads([out], [cotangent.to(device)], flat)
        results[name] = (out.detach(), {f"{NAMES[i % 3]} of source {i // 3}": g for i, g in zip(positions, grads)})
    cd = compute_dtype(first.input.dtype)
    magnitude_sources = [tuple(None if t is None else t.detach().double() for t in c.tensors()) for c in (first, second)]
    magnitude_sources = [(s[0].abs(), s[1], s[2]) for s in magnitude_sources]
    scale = joint_oracle(magnitude_sources, first.mode, first.stable).nan_to_num(posinf=0.0)
    compare("output", results["got"][0], results["ref"][0], results["same"][0], scale, cd)
    joint = None
    if first.mode.kind != "sum":
        _, normaliser = joint_oracle(magnitude_sources, first.mode, first.stable, return_normaliser=True)
        joint = (safe_normaliser(normaliser, first.mode), scale)
    for index, case in enumerate((first, second)):
        magnitudes = gradient_magnitudes(case, cotangent, joint=joint)
        for name in NAMES:
            label = f"{name} of source {index}"
            if label in results["ref"][1]:
                got = results["got"][1].get(label)
                assert got is not None, f"no gradient for {label}"
                compare(f"grad of {label}", got, results["ref"][1][label], results["same"][1][label], magnitudes[name], cd)


def test_normaliser_alone_where_the_result_overflows(backend, device) -> None:
    """A loss on the normaliser alone differentiates D only: where exp(metric) overflows, the
    result is NaN, but its (unused) gradient path must not turn the metric's gradient into NaN."""
    dtype = torch.float32 if torch.float32 in backend.dtypes else backend.dtypes[0]
    input = torch.full((1, 2, 3, 3), 0.5, dtype=dtype, device=device)
    flow = torch.full((1, 2, 3, 3), 0.25, dtype=dtype, device=device)
    metric = torch.full((1, 1, 3, 3), 200.0, dtype=dtype, device=device)  # exp overflows: D = inf
    grads = {}
    for name in (backend.name, "torch"):
        leaves = [t.clone().requires_grad_() for t in (input, flow, metric)]
        out, normaliser = softsplat.splat(*leaves, mode="soft", backend=name, return_normaliser=True)
        assert out.isnan().any(), "the case should overflow the result"
        grads[name] = torch.autograd.grad(normaliser.sum(), leaves[2])[0]
    got, reference = grads[backend.name], grads["torch"]
    assert not got.isnan().any(), f"NaN in the metric's gradient: {got}"
    assert torch.equal(got.isinf(), reference.isinf()) and torch.equal(got.sign(), reference.sign())
