"""Every Hypothesis strategy of the conformance suite, as ``@composite`` functions.

Large arrays are not drawn element by element: a case draws a seed for the bulk of its values and
a short list of special values (integer, half-integer, far out-of-bounds, infinite, NaN) placed at
drawn positions, so that shrinking stays fast and failures stay small.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import strategies as st

from softsplat import Mode

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("contiguous", "channels_last", "strided")

#: Flow values that exercise docs/spec.md's edge cases; ``W``/``H`` are replaced by the image size.
SPECIAL_FLOWS = (0.0, 1.0, -1.0, 0.5, -0.5, 2.0, 1e30, -1e30, 1e6, -1e6, math.inf, -math.inf, math.nan)
#: Metric values of large magnitude: ``exp`` overflows in float32 past ~88.7 and in float64
#: past ~709.8; far below zero it underflows to exactly 0.
SPECIAL_METRICS = (0.0, 20.0, -20.0, 60.0, -60.0, 200.0, -200.0, 1e4, -1e4)
#: Max mode's metrics beside those: the non-finite values its rule names (docs/spec.md, max
#: splatting). It has no exp, so they give defined answers there.
SPECIAL_MAX_METRICS = (math.inf, -math.inf, math.nan)
#: Channel counts where a kernel's channel loop can change course: the packed counts (1-4) and
#: both sides of every power of two a channel block or vector could span, through the 64-192
#: channels of the feature pyramids frame interpolation splats, and past them.
CHANNEL_BOUNDARIES = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 48, 63, 64, 65, 96,
    127, 128, 129, 160, 191, 192, 193, 255, 256, 257, 320,
)


@dataclasses.dataclass
class Case:
    """One call of ``splat``: its tensors, mode and which arguments require grad."""

    input: torch.Tensor
    flow: torch.Tensor
    metric: torch.Tensor | None
    mode: Mode
    requires_grad: tuple[bool, bool, bool]  # input, flow, metric
    stable: bool = False  # stable soft splatting (soft modes only)

    def __repr__(self) -> str:  # what Hypothesis prints for a falsifying example
        def describe(t):
            if t is None:
                return "None"
            return f"{tuple(t.shape)} {str(t.dtype)[6:]} strides={t.stride()}\n{t.detach()}"

        return (
            f"Case(mode={self.mode.value!r}, stable={self.stable}, requires_grad={self.requires_grad},\n"
            f" input={describe(self.input)},\n flow={describe(self.flow)},\n"
            f" metric={describe(self.metric)})"
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.input, self.flow, self.metric)


@st.composite
def shapes(draw, max_batch: int = 2, max_channels: int = 4, max_side: int = 9, channels=None, widths=None):
    """``(N, C, H, W)``: 1x1 and odd sizes are common; one of the sizes is 0 in ~1 case of 12.
    ``channels``: the channel counts to draw from (else 1 to ``max_channels``); ``widths``: the
    least and the most W (else 1 to ``max_side``, as H)."""
    shape = [
        draw(st.integers(1, max_batch)),
        draw(st.integers(1, max_channels) if channels is None else st.sampled_from(channels)),
        draw(st.integers(1, max_side)),
        draw(st.integers(*(widths or (1, max_side)))),
    ]
    if draw(st.integers(0, 11)) == 0:
        shape[draw(st.integers(0, 3))] = 0
    return tuple(shape)


@st.composite
def seeds(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


@st.composite
def with_specials(draw, bulk: torch.Tensor, values, max_count: int = 6) -> torch.Tensor:
    """``bulk`` with up to ``max_count`` of its elements replaced by draws from ``values``."""
    if bulk.numel() == 0:
        return bulk
    flat = bulk.flatten().clone()
    for _ in range(draw(st.integers(0, max_count))):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(values)
    return flat.view_as(bulk)


@st.composite
def flows(draw, shape) -> torch.Tensor:
    """Flows of one flavour per case (continuous, integer, half-integer, small) plus specials."""
    N, _, H, W = shape
    generator = draw(seeds())
    reach = float(max(H, W) + 2)
    continuous = (torch.rand((N, 2, H, W), generator=generator, dtype=torch.float64) * 2 - 1) * reach
    flavour = draw(st.sampled_from(("continuous", "integer", "half-integer", "subpixel")))
    bulk = {
        "continuous": continuous,
        "integer": continuous.round(),
        "half-integer": continuous.floor() + 0.5,
        "subpixel": continuous / reach,
    }[flavour]
    specials = st.sampled_from(SPECIAL_FLOWS) | st.sampled_from((float(W), float(-W), W - 0.5, -1.5))
    return draw(with_specials(bulk, specials))


@st.composite
def metrics(draw, shape, mode: Mode) -> torch.Tensor | None:
    """``None`` for ``sum``/``avg``; otherwise values of a drawn scale plus large specials.

    ``linear`` metrics are kept non-negative: with weights of both signs the normaliser can cancel
    to ~0 and the result is ill-conditioned, so no two summation orders agree on it. ``max``
    metrics are often drawn from a few values (depth layers), so that sources tie on a target,
    and take infinite and NaN specials too.
    """
    if not mode.needs_metric:
        return None
    N, _, H, W = shape
    scale = draw(st.sampled_from((0.1, 1.0, 10.0, 30.0)))
    generator = draw(seeds())
    bulk = torch.randn((N, 1, H, W), generator=generator, dtype=torch.float64) * scale
    specials = st.sampled_from(SPECIAL_METRICS)
    if mode.kind == "max":
        levels = draw(st.sampled_from((1, 2, 3, None)))  # None: continuous, no ties
        if levels is not None:
            bulk = torch.randint(0, levels, (N, 1, H, W), generator=generator).double() * scale
        specials = specials | st.sampled_from(SPECIAL_MAX_METRICS)
    values = draw(with_specials(bulk, specials))
    return values.abs() if mode.kind == "linear" else values


@st.composite
def laid_out(draw, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``, contiguous, channels_last, or a strided view of a larger tensor."""
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "channels_last":
        return values.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        N, C, H, W = values.shape
        big = torch.full((N, C, H, 2 * W), 7.0, dtype=dtype)  # odd columns: never read
        big[..., ::2] = values.to(dtype)
        return big[..., ::2]
    return values.to(dtype)


@st.composite
def cases(draw, dtypes=DTYPES, modes=tuple(Mode), max_side: int = 9, device: str = "cpu", channels=None, widths=None):
    """A full call of ``splat``: shape, mode, dtypes, values, layouts and requires_grad flags.
    ``channels``: the channel counts to draw from (default: 1 to 4); ``widths``: as shapes()."""
    shape = draw(shapes(max_side=max_side, channels=channels, widths=widths))
    mode = draw(st.sampled_from(modes))
    dtype = draw(st.sampled_from(dtypes))
    # flow/metric in input's dtype, or in another floating dtype that is read in compute dtype
    other = st.sampled_from((dtype, dtype, torch.float32, torch.float64))
    input_values = torch.randn(shape, generator=draw(seeds()), dtype=torch.float64)
    input = draw(laid_out(input_values, dtype)).to(device)
    flow = draw(laid_out(draw(flows(shape)), draw(other))).to(device)
    metric_values = draw(metrics(shape, mode))
    metric = None if metric_values is None else draw(laid_out(metric_values, draw(other))).to(device)
    requires_grad = (
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st.booleans()) and metric is not None,
    )
    stable = mode.kind == "soft" and draw(st.booleans())
    return Case(input, flow, metric, mode, requires_grad, stable)
